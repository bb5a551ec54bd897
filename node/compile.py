"""Netmap -> OS configuration, without I/O: WireGuard peers, addresses and routes, the nft filter script.

Also the other pure pieces of the agent: reading the node's own endpoints from `ip -j addr` output, the
jittered back-off of the control connection (the status rows are node/status.py). The netmap arrives parsed
(node/mapsession.py, coord/wire/schema.py): every key, address and endpoint here is already valid.

Endpoints: a node reports its interface addresses with the WireGuard port (`local_endpoints`, type 1 "local");
MagicSock adds the STUN-reflexive ones (type 2). A peer's WireGuard endpoint is MagicSock's choice (its confirmed
direct path, else its DERP socket); `first_endpoint` is the fallback for a peer MagicSock has no path for (no
disco key): the first endpoint it reported that this node can reach by address family.
"""

from __future__ import annotations

import ipaddress
import json
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass

from coord import wire
from node.keys import PrivateKey, PublicKey
from node.mapsession import NetMap
from node.render import nft
from node.render.routes import TAILNET_V4, TAILNET_V6, RouteConfig
from node.wg.config import ConfigError, WgConfig, WgPeer

KEEPALIVE = 25
FILTER_TABLE = "shoal_filter"
TAILNET_NETS = (ipaddress.ip_network(TAILNET_V4), ipaddress.ip_network(TAILNET_V6))

EndpointChooser = Callable[[wire.Node], "str | None"]


# --- endpoints ------------------------------------------------------------------------------------------


def usable_endpoint(ep: wire.Endpoint, families: Iterable[int] = (4, 6)) -> str | None:
    """The text of a peer's reported endpoint if this node could send to it, else None."""
    ip = ep.ip
    if ip.version not in set(families):
        return None
    if ip.is_loopback or ip.is_link_local or ip.is_multicast or ip.is_unspecified:
        return None
    if any(ip in net for net in TAILNET_NETS):
        return None  # a tunnel address as an underlay endpoint would loop through the tunnel
    return str(ep)


def first_endpoint(families: Iterable[int] = (4, 6)) -> EndpointChooser:
    """The first endpoint of the peer that this node can reach by address family."""
    fams = tuple(families)

    def choose(peer: wire.Node) -> str | None:
        for ep in peer.endpoints:
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
    return eps, [wire.EP_LOCAL] * len(eps)


def families_of(endpoints: Iterable[str]) -> tuple[int, ...]:
    fams = {6 if e.startswith("[") else 4 for e in endpoints}
    return tuple(sorted(fams))


# --- WireGuard, routes, filter --------------------------------------------------------------------------


def peer_key(peer: wire.Node) -> PublicKey | None:
    return None if peer.key is None else PublicKey(peer.key, "nodekey")


def subnet_routes(peer: wire.Node) -> tuple[str, ...]:
    """The subnet routes to send to ``peer``: those the server made it primary for and put in its AllowedIPs.
    Never a default route (exit nodes are chosen explicitly) nor anything overlapping the tailnet ranges."""
    allowed = set(peer.allowed_ips)
    out = []
    for n in peer.primary_routes:
        if n in allowed and n.prefixlen > 0 and not any(n.version == t.version and n.overlaps(t)
                                                         for t in TAILNET_NETS):
            out.append(str(n))
    return tuple(out)


def _peer_allowed(peer: wire.Node, accept_routes: bool) -> tuple[str, ...]:
    """A peer's own tailnet addresses from its AllowedIPs; its subnet routes only with --accept-routes."""
    own = [str(n) for n in peer.allowed_ips if any(n.version == t.version and n.subnet_of(t)  # type: ignore[arg-type]
                                                   for t in TAILNET_NETS)]
    return tuple(own) + (subnet_routes(peer) if accept_routes else ())


def wg_config(
    nm: NetMap, private_key: PrivateKey, port: int, choose: EndpointChooser, keepalive: int = KEEPALIVE,
    accept_routes: bool = False,
) -> WgConfig:
    """One WireGuard peer per netmap peer with a key: its AllowedIPs, the chosen endpoint, a keepalive.

    AllowedIPs are the peer's tailnet addresses, plus the subnet routes it is primary for when this node accepts
    routes (`shoal up --accept-routes`): what WireGuard sends to the peer and accepts from it.
    A peer that cannot be used (no key, a key shared with another peer or with us, expired) is left out rather
    than failing the whole map."""
    own = private_key.public().raw
    peers: list[WgPeer] = []
    seen = {own}
    for p in nm.sorted_peers():
        if p.expired:
            continue
        key = peer_key(p)
        if key is None or key.raw in seen:
            continue
        seen.add(key.raw)
        try:
            peers.append(WgPeer(key, _peer_allowed(p, accept_routes), choose(p), keepalive))
        except ConfigError:
            continue
    return WgConfig(private_key, port, tuple(peers))


def self_addresses(nm: NetMap) -> tuple[str, ...]:
    return () if nm.node is None else tuple(str(a) for a in nm.node.addresses)


QUAD100 = ("100.100.100.100/32", "fd7a:115c:a1e0::53/128")


def route_config(nm: NetMap, iface: str, accept_routes: bool = False, dns: bool = False) -> RouteConfig:
    """The node's tailnet addresses; the tailnet prefixes are always routed through the interface, and with
    --accept-routes the subnet routes of its peers (each from the peer that is primary for it). With `dns`,
    quad-100's addresses too, host scope (the resolver listens there; never a source address)."""
    routes: list[str] = []
    if accept_routes:
        for p in nm.sorted_peers():
            if not p.expired and p.key is not None:
                routes += subnet_routes(p)
    return RouteConfig(iface, self_addresses(nm), tuple(routes), host_addresses=QUAD100 if dns else ())


def is_allow_all(rules: Sequence[wire.FilterRule]) -> bool:
    return any(r.allows_all for r in rules)


def filter_script(nm: NetMap, iface: str, table: str = FILTER_TABLE, snat: bool = False,
                  ssh_port: int | None = None) -> str:
    """The `nft -f -` script for the netmap's PacketFilter.

    Allow-all lets every protocol from the tailnet in (not only the four the renderer spells out) in a table
    that keeps the always-on rules (tailnet sources only through the tunnel). A missing filter blocks
    everything, as an empty one does. The renderer checks every address again before it writes it into the
    script; it raises nft.RenderError."""
    rules = nm.packet_filter or ()
    if is_allow_all(rules):
        return nft.render_allow_all(iface, self_addresses(nm), table=table, snat=snat, ssh_port=ssh_port)
    return nft.render([r.to_json() for r in rules], iface, self_addresses(nm), table=table, snat=snat,
                      ssh_port=ssh_port)


def closed_filter_script(iface: str, table: str = FILTER_TABLE) -> str:
    """What goes in while the filter for the current netmap cannot: established flows only."""
    return nft.render([], iface, table=table)


def delete_filter_script(table: str = FILTER_TABLE) -> str:
    return nft.delete_script(table)


# --- expiry and status ----------------------------------------------------------------------------------


def self_expired(nm: NetMap, now: float) -> bool:
    node = nm.node
    if node is None:
        return False
    if node.expired:
        return True
    return node.key_expiry is not None and now >= node.key_expiry.timestamp()




def forwarding_warning(prefs_routes: Sequence[str], ipv4: str | None, ipv6: str | None) -> str:
    """A health message when this node offers routes the kernel will not forward (Tailscale's
    warn-ip-forwarding-off). ``ipv4``/``ipv6``: the contents of /proc/sys/net/ipv4/ip_forward and
    /proc/sys/net/ipv6/conf/all/forwarding (None when unreadable)."""
    fams = {ipaddress.ip_network(r, strict=False).version for r in prefs_routes}
    off = []
    if 4 in fams and (ipv4 or "").strip() != "1":
        off.append("net.ipv4.ip_forward")
    if 6 in fams and (ipv6 or "").strip() != "1":
        off.append("net.ipv6.conf.all.forwarding")
    if not off:
        return ""
    return (f"IP forwarding is off ({', '.join(off)} is not 1): the routes this node advertises will not work; "
            f"enable it with sysctl -w {'=1 '.join(off)}=1")


# --- back-off -------------------------------------------------------------------------------------------


@dataclass
class Backoff:
    """Exponential back-off with equal jitter: the n-th wait is uniform in [c/2, c], c = min(cap, base*2^n).

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
