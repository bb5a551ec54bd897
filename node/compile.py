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
from node.render.exitroute import ExitConfig
from node.render.routes import TAILNET_V4, TAILNET_V6, RouteConfig
from node.sockmark import BYPASS_MARK
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


def _peer_allowed(peer: wire.Node, accept_routes: bool, exit_node: bool = False) -> tuple[str, ...]:
    """A peer's own tailnet addresses from its AllowedIPs; its subnet routes only with --accept-routes; the
    default routes only for the chosen exit node."""
    own = [str(n) for n in peer.allowed_ips if any(n.version == t.version and n.subnet_of(t)  # type: ignore[arg-type]
                                                   for t in TAILNET_NETS)]
    defaults = tuple(str(n) for n in peer.allowed_ips if n.prefixlen == 0) if exit_node else ()
    return tuple(own) + (subnet_routes(peer) if accept_routes else ()) + defaults


# --- exit nodes -----------------------------------------------------------------------------------------


def offers_exit(peer: wire.Node) -> bool:
    """The server puts 0.0.0.0/0 and ::/0 in an approved exit node's AllowedIPs."""
    return any(n.prefixlen == 0 for n in peer.allowed_ips)


def _names(peer: wire.Node) -> set[str]:
    full = peer.name.rstrip(".").lower()
    return {x for x in (full, full.split(".")[0], peer.hostinfo.hostname.lower()) if x}


def find_exit_node(nm: NetMap, spec: str) -> wire.Node | None:
    """The peer `shoal up --exit-node` names (tailnet IP, MagicDNS label or full name), if it is one this node
    may use as an exit node (approved, in the netmap, not expired). None: none such, and traffic stops."""
    if not spec:
        return None
    for p in nm.sorted_peers():
        if p.expired or p.key is None or not offers_exit(p):
            continue
        if spec in {str(a.ip) for a in p.addresses} or spec in _names(p):
            return p
    return None


def exit_nodes(nm: NetMap) -> list[wire.Node]:
    return [p for p in nm.sorted_peers() if not p.expired and p.key is not None and offers_exit(p)]


def suggest_exit_node(nm: NetMap, home_derp: int = 0, direct: Callable[[wire.Node], bool] = lambda _p: False,
                      ) -> wire.Node | None:
    """An online exit node: one we have a direct path to first, then one on our home DERP region, then the
    lowest node id (a stable choice)."""
    online = [p for p in exit_nodes(nm) if p.online]
    if not online:
        return None
    return min(online, key=lambda p: (not direct(p), p.home_derp != home_derp or not home_derp, p.id))


def exit_config(nm: NetMap, iface: str, exit_node: str, allow_lan: bool, lan: Sequence[str],
                mark: int = BYPASS_MARK) -> ExitConfig:
    """Table 52 and its rules (node/render/exitroute.py) while an exit node is chosen, found or not: when it
    is gone, traffic goes into the tunnel and stops there rather than out through the local gateway."""
    return ExitConfig(iface, on=bool(exit_node), throw=tuple(lan) if allow_lan and exit_node else (), mark=mark)


def lan_prefixes(ip_addr_json: str, exclude: Iterable[str] = ()) -> list[str]:
    """The directly connected prefixes of this host's up interfaces (not loopback, not the tailnet
    interface, not link-local, not host routes), from `ip -j addr show`: what --exit-node-allow-lan-access
    keeps outside the tunnel."""
    try:
        links = json.loads(ip_addr_json or "[]")
    except ValueError:
        return []
    out: list[str] = []
    skip = set(exclude)
    for link in links if isinstance(links, list) else []:
        if not isinstance(link, dict) or link.get("ifname") in skip or "LOOPBACK" in (link.get("flags") or []):
            continue
        if "UP" not in (link.get("flags") or []):
            continue
        for a in link.get("addr_info") or []:
            if not isinstance(a, dict) or a.get("scope") != "global":
                continue
            try:
                net = ipaddress.ip_interface(f"{a.get('local')}/{a.get('prefixlen')}").network
            except ValueError:
                continue
            if net.prefixlen == net.max_prefixlen or any(net.version == t.version and net.overlaps(t)
                                                          for t in TAILNET_NETS):
                continue
            if str(net) not in out:
                out.append(str(net))
    return out


def wg_config(
    nm: NetMap, private_key: PrivateKey, port: int, choose: EndpointChooser, keepalive: int = KEEPALIVE,
    accept_routes: bool = False, exit_node: str = "", fwmark: int = 0,
) -> WgConfig:
    """One WireGuard peer per netmap peer with a key: its AllowedIPs, the chosen endpoint, a keepalive.

    AllowedIPs are the peer's tailnet addresses, plus the subnet routes it is primary for when this node accepts
    routes (`shoal up --accept-routes`), plus 0.0.0.0/0 and ::/0 for the chosen exit node only: what WireGuard
    sends to the peer and accepts from it. `fwmark` marks the engine's own UDP socket (the bypass mark).
    A peer that cannot be used (no key, a key shared with another peer or with us, expired) is left out rather
    than failing the whole map."""
    own = private_key.public().raw
    chosen = find_exit_node(nm, exit_node)
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
            allowed = _peer_allowed(p, accept_routes, chosen is not None and p.id == chosen.id)
            peers.append(WgPeer(key, allowed, choose(p), keepalive))
        except ConfigError:
            continue
    return WgConfig(private_key, port, tuple(peers), fwmark)


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


def route_health(prefs_routes: Sequence[str], ipv4: str | None, ipv6: str | None, lan: Sequence[str],
                 probe: str = "", probe_ok: bool = True) -> tuple[tuple[str, ...], str]:
    """The router's self-check: (the routes it may offer now, why the others are withheld, "" when none are).

    Forwarding off for a family withholds that family's routes (default routes included); a subnet route
    needs an up interface connected to it (`lan`: lan_prefixes of the up links) or, with `--route-probe`,
    the probe answering; a probe that does not answer withholds every subnet route (the LAN is gone)."""
    fwd_off = {fam for fam, v in ((4, ipv4), (6, ipv6)) if (v or "").strip() != "1"}
    lan_nets = [ipaddress.ip_network(x) for x in lan]
    keep: list[str] = []
    why: list[str] = []
    for r in prefs_routes:
        net = ipaddress.ip_network(r, strict=False)
        if net.version in fwd_off:
            why.append(f"{r}: IP forwarding is off")
        elif net.prefixlen == 0:
            keep.append(r)
        elif probe and not probe_ok:
            why.append(f"{r}: route probe {probe} does not answer")
        elif not probe and not any(n.version == net.version and n.overlaps(net) for n in lan_nets):
            why.append(f"{r}: no up interface on it")
        else:
            keep.append(r)
    return tuple(keep), "; ".join(why)


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
