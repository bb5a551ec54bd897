"""`shoal status` without I/O: the status document, its health lines, and each peer's path by what was observed.

The agent reads the engine once (`DeviceState`) and, with no await in between, what path discovery knows
(`Observer`, MagicSock's view); everything here is a function of that one snapshot and `now`.

Path rule (`path()`, JSON `Peers[].Path`, CLI words in `Peers[].PathText`):
- `direct`: the engine's endpoint is the direct address path discovery confirmed (for a peer without disco,
  the one we gave it) *and* a handshake completed within WireGuard's session lifetime (180 s);
- `derp`: the engine's endpoint is the peer's DERP socket, with such a handshake (`relay DERP(900)`);
- `unconfirmed`: such a handshake, but the engine holds an address path discovery has not confirmed (it roamed
  there, or the confirmation lapsed and the engine has not been set back yet);
- `connecting`: the peer is in the engine and no handshake has completed yet;
- `stale`: the last handshake is older than the session lifetime (`no handshake for 212s`);
- `none`: the peer is not in the engine (not running, or kept out because its filter is not in place).
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

from coord import wire
from node.compile import find_exit_node, peer_key, subnet_routes
from node.login import Login, State
from node.mapsession import NetMap
from node.netcheck import Region, Report
from node.paths import PathKind
from node.state import Prefs
from node.wg.config import DeviceState, PeerState

SESSION_LIFETIME = 180.0  # WireGuard's REJECT_AFTER_TIME: no session outlives it without a new handshake


@dataclass(frozen=True)
class PathView:
    """What path discovery knows of one peer, read beside the engine snapshot."""

    derp: bool  # the engine's endpoint is this peer's DERP socket
    region: int | None  # the DERP region its relayed packets take
    confirmed: str | None  # the confirmed direct address; None while there is none
    fields: Mapping[str, Any] = field(default_factory=dict)  # PeerHomeDERP, Best, Trusted, ... for the JSON


# (node key, the engine's endpoint for it) -> PathView, or None for a peer path discovery does not handle
Observer = Callable[[bytes, "str | None"], "PathView | None"]


def no_magic(key: bytes, endpoint: str | None) -> PathView | None:
    return None


def path(st: PeerState | None, view: PathView | None, now: float) -> PathKind:
    if st is None:
        return PathKind.NONE
    if not st.last_handshake:
        return PathKind.CONNECTING
    if now - st.last_handshake > SESSION_LIFETIME:
        return PathKind.STALE
    if view is not None and view.derp:
        return PathKind.DERP
    confirmed = st.endpoint if view is None else view.confirmed
    if st.endpoint and st.endpoint == confirmed:
        return PathKind.DIRECT
    return PathKind.UNCONFIRMED


def path_text(kind: PathKind, st: PeerState | None, region: int | None, now: float) -> str:
    """The CLI's words for a path (`shoal status`, `shoal ping`)."""
    endpoint = st.endpoint if st is not None else None
    if kind is PathKind.DIRECT:
        return f"direct {endpoint}"
    if kind is PathKind.DERP:
        return f"relay DERP({region})"
    if kind is PathKind.UNCONFIRMED:
        return f"unconfirmed {endpoint}"
    if kind is PathKind.CONNECTING:
        return "connecting"
    if kind is PathKind.STALE and st is not None and st.last_handshake:
        return f"no handshake for {max(0.0, now - st.last_handshake):.0f}s"
    return "no path"


def peer_row(p: wire.Node, dev: DeviceState | None, observe: Observer, now: float) -> dict[str, Any]:
    key = peer_key(p)
    st = dev.peer(key) if (dev is not None and key is not None) else None
    view = observe(key.raw, st.endpoint if st is not None else None) if key is not None else None
    kind = path(st, view, now)
    row: dict[str, Any] = {
        "ID": p.id,
        "Name": p.name,
        "HostName": p.short_name,
        "Addresses": p.ips(),
        "Online": p.online,
        "LastSeen": wire.time_json(p.last_seen),
        "Key": p.key_text,
        "Endpoint": st.endpoint if st is not None else None,
        "Path": kind,
        "PathText": path_text(kind, st, view.region if view is not None else None, now),
        "LastHandshake": st.last_handshake if st is not None else None,
        "RxBytes": st.rx_bytes if st is not None else 0,
        "TxBytes": st.tx_bytes if st is not None else 0,
        "InEngine": st is not None,
        # Subnet routes the server made this peer primary for, and those WireGuard sends to it now (observed in
        # the engine: only with --accept-routes).
        "PrimaryRoutes": [str(n) for n in p.primary_routes],
        "RoutesInUse": [r for r in subnet_routes(p) if st is not None and r in st.allowed_ips],
        # What WireGuard sends to this peer now (read back from the engine): a hub's include its devices' addresses.
        "AllowedIPs": [str(a) for a in st.allowed_ips] if st is not None else [],
    }
    if view is not None:
        row["DERPRegion"] = view.region if kind is PathKind.DERP else None
        row["Confirmed"] = view.confirmed
        row.update(view.fields)
    return row


def peer_rows(nm: NetMap, dev: DeviceState | None, observe: Observer, now: float) -> list[dict[str, Any]]:
    return [peer_row(p, dev, observe, now) for p in nm.sorted_peers()]


def health(login: Login, *, want_running: bool, connected: bool, last_error: str, os_errors: Mapping[str, str],
           kept_out: int) -> list[str]:
    out = []
    if login.key_expired:
        out.append("node key expired: run `shoal up` (with --auth-key or the login URL) to re-authenticate")
    if want_running and not connected and login.state != State.NEEDS_LOGIN:
        out.append("not connected to the coordination server; using the last network map")
    if last_error:
        out.append(last_error)
    for name, err in os_errors.items():
        if name == "filter":
            out.append(f"packet filter not in place: {err}; new peers are kept out of WireGuard until it is"
                       f" ({kept_out} now)")
        else:
            out.append(f"applying the network map: {name}: {err}")
    return out


def document(*, login: Login, prefs: Prefs, connected: bool, health: Sequence[str], engine: str, iface: str,
             port: int, netmap: NetMap, node_key: str, hostname: str, endpoints: Sequence[str],
             peers: list[dict[str, Any]], magic: dict[str, Any] | None,
             dev: DeviceState | None = None) -> dict[str, Any]:
    """The `/status` JSON (node/api.py documents it)."""
    node = netmap.node
    return {
        "BackendState": login.state,
        "AuthURL": login.auth_url,
        "LoginServer": prefs.login_server,
        "Connected": connected,
        "KeyExpired": login.key_expired,
        "Engine": engine,
        "Interface": iface,
        "Port": port,
        "Health": list(health),
        "MagicDNSSuffix": netmap.domain,
        "Self": {
            "ID": node.id if node is not None else None,
            "Name": node.name if node is not None else "",
            "HostName": (node.short_name if node is not None else "") or hostname,
            "Addresses": node.ips() if node is not None else [],
            "Key": node_key,
            "KeyExpiry": wire.time_json(node.key_expiry) if node is not None else None,
            "Endpoints": list(endpoints),
            "Online": connected,
            # Offered by us (prefs); approved and elected primary by the server (its map says so).
            "AdvertisedRoutes": list(prefs.routable_ips()),
            "PrimaryRoutes": [str(n) for n in node.primary_routes] if node is not None else [],
            "ExitNodeApproved": node is not None and any(n.prefixlen == 0 for n in node.allowed_ips),
            "AcceptRoutes": prefs.accept_routes,
            "ExitNode": prefs.exit_node,
            "ExitNodeAllowLANAccess": prefs.exit_node_allow_lan_access,
        },
        "ExitNode": exit_node_row(netmap, prefs.exit_node, dev),
        "Peers": peers,
        "Magic": magic,
    }


def exit_node_row(netmap: NetMap, wanted: str, dev: DeviceState | None) -> dict[str, Any] | None:
    """The exit node in the prefs, as found in the netmap, and whether the engine holds 0.0.0.0/0 for it now
    (read back, not assumed). None when no exit node is chosen."""
    if not wanted:
        return None
    p = find_exit_node(netmap, wanted)
    if p is None:
        return {"Wanted": wanted, "ID": None, "Name": "", "Online": False, "InUse": False}
    key = peer_key(p)
    st = dev.peer(key) if dev is not None and key is not None else None
    return {"Wanted": wanted, "ID": p.id, "Name": p.name, "Online": p.online,
            "InUse": st is not None and "0.0.0.0/0" in st.allowed_ips}


def netcheck(report: Report, regions: Sequence[Region], per_region: Mapping[int, str], home: int) -> dict[str, Any]:
    """The `/netcheck` JSON: the report, our public endpoint and code per region, the home region."""
    out = report.to_json()
    out["RegionEndpoints"] = {str(k): v for k, v in sorted(per_region.items())}
    out["RegionCodes"] = {str(r.region_id): r.code for r in regions}
    out["HomeDERP"] = home
    return out
