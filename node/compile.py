"""Netmap -> OS configuration, without I/O: WireGuard peers, addresses and routes, the nft filter script.

Also the other pure pieces of the agent: reading the node's own endpoints from `ip -j addr` output, the
jittered back-off of the control connection, and the peer rows of `shoal status`.

Two places are meant to be replaced when NAT traversal lands:
- what a node reports as its endpoints (`local_endpoints`: interface addresses with the WireGuard port, type 1
  "local"); STUN-reflexive ones will be added beside them;
- which endpoint a peer's WireGuard gets (`EndpointChooser`; `first_endpoint` picks the first usable one
  the peer reported); the disco path machine will answer this per peer instead.
"""

from __future__ import annotations

import ipaddress
import json
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass
from datetime import datetime
from typing import Any

from coord import wire
from node.keys import BadKey, PrivateKey, PublicKey
from node.render import nft
from node.render.routes import TAILNET_V4, TAILNET_V6, RouteConfig
from node.wg.config import ConfigError, DeviceState, WgConfig, WgPeer, canonical_endpoint

KEEPALIVE = 25
EP_LOCAL = 1  # EndpointTypes: an address of one of the node's interfaces
FILTER_TABLE = "shoal_filter"
TAILNET_NETS = (ipaddress.ip_network(TAILNET_V4), ipaddress.ip_network(TAILNET_V6))

EndpointChooser = Callable[[Mapping[str, Any]], "str | None"]


def as_list(v: object) -> list[Any]:
    """A list field of a server record, or nothing: a malformed record must not break the whole map."""
    return v if isinstance(v, list) else []


# --- endpoints ------------------------------------------------------------------------------------------


def usable_endpoint(ep: object, families: Iterable[int] = (4, 6)) -> str | None:
    """The canonical form of a peer's reported endpoint if this node could send to it, else None."""
    if not isinstance(ep, str):
        return None
    try:
        host, _ = wire.check_endpoint(ep)
        text = canonical_endpoint(ep)
    except (wire.WireError, ConfigError):
        return None
    ip = ipaddress.ip_address(host)
    if ip.version not in set(families):
        return None
    if ip.is_loopback or ip.is_link_local or ip.is_multicast or ip.is_unspecified:
        return None
    if any(ip in net for net in TAILNET_NETS):
        return None  # a tunnel address as an underlay endpoint would loop through the tunnel
    return text


def first_endpoint(families: Iterable[int] = (4, 6)) -> EndpointChooser:
    """Until NAT traversal: the first endpoint of the peer that this node can reach by address family."""
    fams = tuple(families)

    def choose(peer: Mapping[str, Any]) -> str | None:
        for ep in as_list(peer.get("Endpoints")):
            text = usable_endpoint(ep, fams)
            if text is not None:
                return text
        return None

    return choose


def local_endpoints(ip_addr_json: str, port: int, exclude: Iterable[str] = ()) -> tuple[list[str], list[int]]:
    """Endpoints from `ip -j addr show` output: global addresses of up interfaces, not loopback, not the
    tailnet interface (`exclude`), not tailnet addresses. Returns (endpoints, EndpointTypes)."""
    try:
        links = json.loads(ip_addr_json or "[]")
    except ValueError:
        return [], []
    skip = set(exclude)
    eps: list[str] = []
    if not isinstance(links, list):
        return [], []
    for link in links:
        if not isinstance(link, dict) or link.get("ifname") in skip or link.get("ifname") == "lo":
            continue
        flags = link.get("flags") or []
        if "LOOPBACK" in flags or "UP" not in flags:
            continue
        for a in link.get("addr_info") or []:
            if not isinstance(a, dict) or a.get("scope") != "global" or a.get("family") not in ("inet", "inet6"):
                continue
            if a.get("tentative") or a.get("dadfailed"):
                continue
            try:
                ip = ipaddress.ip_address(str(a.get("local")))
            except ValueError:
                continue
            if any(ip in net for net in TAILNET_NETS):
                continue
            ep = f"[{ip}]:{port}" if ip.version == 6 else f"{ip}:{port}"
            if ep not in eps:
                eps.append(ep)
    # IPv4 first: the chooser takes the first usable one, and the lab underlays are IPv4
    eps.sort(key=lambda e: e.startswith("["))
    eps = eps[: wire.MAX_ENDPOINTS]
    return eps, [EP_LOCAL] * len(eps)


def families_of(endpoints: Iterable[str]) -> tuple[int, ...]:
    fams = {6 if e.startswith("[") else 4 for e in endpoints}
    return tuple(sorted(fams))


# --- WireGuard, routes, filter --------------------------------------------------------------------------


def peer_key(peer: Mapping[str, Any]) -> PublicKey | None:
    try:
        return PublicKey(wire.parse_key(peer.get("Key"), "nodekey", "Key"), "nodekey")
    except (wire.WireError, BadKey):
        return None


def _prefixes(items: object) -> tuple[str, ...]:
    out = []
    for x in items if isinstance(items, list) else ():
        try:
            out.append(str(ipaddress.ip_network(str(x), strict=False)))
        except ValueError:
            continue
    return tuple(out)


def wg_config(
    nm: wire.NetMap, private_key: PrivateKey, port: int, choose: EndpointChooser, keepalive: int = KEEPALIVE
) -> WgConfig:
    """One WireGuard peer per netmap peer with a valid key: its AllowedIPs, the chosen endpoint, a keepalive.

    A peer whose record is broken (bad key, a key shared with another peer or with us) is left out rather than
    failing the whole map."""
    own = private_key.public().raw
    peers: list[WgPeer] = []
    seen = {own}
    for pid in sorted(nm.peers):
        p = nm.peers[pid]
        if p.get("Expired"):
            continue
        key = peer_key(p)
        if key is None or key.raw in seen:
            continue
        seen.add(key.raw)
        try:
            peers.append(WgPeer(key, _prefixes(p.get("AllowedIPs")), choose(p), keepalive))
        except ConfigError:
            continue
    return WgConfig(private_key, port, tuple(peers))


def self_addresses(nm: wire.NetMap) -> tuple[str, ...]:
    node = nm.node or {}
    out = []
    for a in as_list(node.get("Addresses")):
        try:
            out.append(str(ipaddress.ip_interface(str(a))))
        except ValueError:
            continue
    return tuple(out)


def route_config(nm: wire.NetMap, iface: str) -> RouteConfig:
    """The node's tailnet addresses; the tailnet prefixes are always routed through the interface."""
    return RouteConfig(iface, self_addresses(nm))


def is_allow_all(rules: Sequence[Mapping[str, Any]]) -> bool:
    for r in rules:
        if not isinstance(r, Mapping) or "*" not in as_list(r.get("SrcIPs")) or r.get("IPProto"):
            continue
        for dp in as_list(r.get("DstPorts")):
            ports = dp.get("Ports") if isinstance(dp, Mapping) else None
            if isinstance(ports, Mapping) and dp.get("IP") == "*" and (ports.get("First"), ports.get("Last")) == (
                0, 65535
            ):
                return True
    return False


def filter_script(nm: wire.NetMap, iface: str, table: str = FILTER_TABLE) -> str:
    """The `nft -f -` script for the netmap's PacketFilter.

    Allow-all drops our table, so nothing of ours filters (every protocol passes, not only the four the
    renderer spells out). A missing filter blocks everything, as an empty one does."""
    rules = nm.packet_filter or []
    if is_allow_all(rules):
        return f"table inet {table} {{}}\ndelete table inet {table}\n"
    try:
        return nft.render(rules, iface, self_addresses(nm), table=table)
    except (TypeError, AttributeError, KeyError) as e:
        # the renderer expects well-formed rules; a server sending others gets a clear error, not a crash
        raise nft.RenderError(f"malformed PacketFilter: {e}") from None


def delete_filter_script(table: str = FILTER_TABLE) -> str:
    return f"table inet {table} {{}}\ndelete table inet {table}\n"


# --- expiry and status ----------------------------------------------------------------------------------


def parse_time(text: object) -> float | None:
    if not isinstance(text, str) or not text:
        return None
    try:
        return datetime.fromisoformat(text.replace("Z", "+00:00")).timestamp()
    except ValueError:
        return None


def self_expired(nm: wire.NetMap, now: float) -> bool:
    node = nm.node or {}
    if node.get("Expired"):
        return True
    exp = parse_time(node.get("KeyExpiry"))
    return exp is not None and now >= exp


def short_name(fqdn: object) -> str:
    return str(fqdn or "").split(".", 1)[0]


def peer_rows(nm: wire.NetMap, dev: DeviceState | None,
              paths: Mapping[bytes, Mapping[str, Any]] | None = None) -> list[dict[str, Any]]:
    """`shoal status` rows: the netmap's view of each peer joined with the engine's counters, and (`paths`,
    by node key) what NAT traversal knows: Path "direct" | "derp" | "none" from the engine's actual endpoint,
    DERPRegion, and the path state."""
    rows = []
    for pid in sorted(nm.peers):
        p = nm.peers[pid]
        key = peer_key(p)
        st = dev.peer(key) if (dev is not None and key is not None) else None
        endpoint = st.endpoint if st is not None else None
        rows.append({
            "ID": pid,
            "Name": p.get("Name", ""),
            "HostName": short_name(p.get("Name")),
            "Addresses": [str(a).split("/")[0] for a in as_list(p.get("Addresses"))],
            "Online": bool(p.get("Online")),
            "LastSeen": p.get("LastSeen"),
            "Key": p.get("Key"),
            "Endpoint": endpoint,
            "Path": "direct" if endpoint else "none",
            "LastHandshake": st.last_handshake if st is not None else None,
            "RxBytes": st.rx_bytes if st is not None else 0,
            "TxBytes": st.tx_bytes if st is not None else 0,
            "InEngine": st is not None,
        })
        extra = paths.get(key.raw) if paths is not None and key is not None else None
        if extra:
            rows[-1].update(extra)
            if extra.get("Path") == "none" and endpoint:
                rows[-1]["Path"] = "direct"
    return rows


# --- back-off -------------------------------------------------------------------------------------------


@dataclass
class Backoff:
    """Exponential back-off with full jitter: the n-th wait is uniform in [base*2^n / 2, base*2^n], capped.

    `rand` (0 <= rand < 1) is passed in, so this stays deterministic under test."""

    base: float = 0.5
    cap: float = 10.0
    attempt: int = 0

    def next(self, rand: float) -> float:
        ceiling = min(self.cap, self.base * float(1 << min(self.attempt, 30)))
        self.attempt += 1
        return ceiling / 2 + ceiling / 2 * rand

    def reset(self) -> None:
        self.attempt = 0
