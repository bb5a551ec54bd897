"""The resolver's view of the netmap: names, addresses, reverse names, local zones and forwarding routes (pure).

`Table.build(netmap_node, peers, dns_config)` reads:
- names: the self node's and each visible peer's `Node.name` (an FQDN with a trailing dot) -> its tailnet
  addresses; `DNSConfig.ExtraRecords` of type A/AAAA add addresses to a name (other types are ignored, as
  Tailscale does). Names are compared lowercased.
- reverse names: `d.c.b.a.in-addr.arpa.` / the 32-nibble `ip6.arpa.` name of every tailnet address -> the FQDN.
- local zones (answered with authority, unknown names NXDOMAIN): each `Routes` suffix with no resolvers, the
  MagicDNS suffix (the self name minus its first label) and, when `Proxied`, Tailscale's reverse zones
  `64..127.100.in-addr.arpa.` and `0.e.1.a.c.5.1.1.a.7.d.f.ip6.arpa.`.
- split routes: each `Routes` suffix with resolvers; the most specific one wins.
- upstreams: `Resolvers`; when there are none, the host's original resolvers (passed in by the shell), and
  when the host has none either, `FallbackResolvers`.
- search domains: `Domains`; a single-label query is also tried under each of them.

Resolver addresses are `IP`, `IP:port` or `[IPv6]:port`; anything else (DoH URLs) is left out and counted in
`skipped`, so status can say so.
"""

from __future__ import annotations

import ipaddress
from collections.abc import Iterable
from dataclasses import dataclass, field

from coord import wire

TTL = 5
NEG_TTL = 10
TAILNET_V4 = ipaddress.ip_network("100.64.0.0/10")
TAILNET_V6 = ipaddress.ip_network("fd7a:115c:a1e0::/48")
REVERSE_ZONES = (*(f"{i}.100.in-addr.arpa." for i in range(64, 128)), "0.e.1.a.c.5.1.1.a.7.d.f.ip6.arpa.")
QUAD100 = ("100.100.100.100", "fd7a:115c:a1e0::53")

Upstream = tuple[str, int]  # (ip, port)


def fqdn(name: str) -> str:
    n = name.strip().lower()
    if not n or n == ".":
        return "."
    return n if n.endswith(".") else n + "."


def reverse_name(ip: ipaddress.IPv4Address | ipaddress.IPv6Address) -> str:
    return ip.reverse_pointer.lower() + "."


def parse_upstream(text: str) -> Upstream | None:
    """`1.2.3.4`, `1.2.3.4:5353`, `::1`, `[::1]:5353` -> (ip, port); None for anything else."""
    t = text.strip()
    port = 53
    try:
        if t.startswith("["):
            host, _, rest = t[1:].partition("]")
            if rest:
                if not rest.startswith(":"):
                    return None
                port = int(rest[1:])
            t = host
        elif t.count(":") == 1:
            t, p = t.split(":")
            port = int(p)
        ip = ipaddress.ip_address(t)
    except ValueError:
        return None
    if not 0 < port < 65536 or (isinstance(ip, ipaddress.IPv6Address) and ip.scope_id):
        return None
    return (str(ip), port)


def _depth(zone: str) -> int:
    return -zone.count(".")


def in_zone(name: str, zone: str) -> bool:
    return zone == "." or name == zone or name.endswith("." + zone)


@dataclass(frozen=True)
class Table:
    hosts: dict[str, tuple[tuple[str, ...], tuple[str, ...]]] = field(default_factory=dict)  # name -> (A, AAAA)
    ptr: dict[str, str] = field(default_factory=dict)  # reverse name -> FQDN
    local_zones: tuple[str, ...] = ()  # most specific first
    routes: tuple[tuple[str, tuple[Upstream, ...]], ...] = ()  # most specific first
    upstreams: tuple[Upstream, ...] = ()
    search: tuple[str, ...] = ()
    skipped: int = 0  # resolver addresses we cannot use
    capture_all: bool = False  # the netmap has global resolvers: quad-100 answers everything

    @classmethod
    def build(cls, node: wire.Node | None, peers: Iterable[wire.Node], dns: wire.DNSConfig | None,
              host_resolvers: Iterable[str] = ()) -> Table:
        v4: dict[str, list[str]] = {}
        v6: dict[str, list[str]] = {}
        ptr: dict[str, str] = {}
        for n in ([node] if node is not None else []) + list(peers):
            if not n.name:
                continue
            name = fqdn(n.name)
            for a in n.addresses:
                ip = a.ip
                if ip in TAILNET_V4 or ip in TAILNET_V6:
                    (v4 if ip.version == 4 else v6).setdefault(name, []).append(str(ip))
                    ptr.setdefault(reverse_name(ip), name)
        skipped = 0
        cfg = dns or wire.DNSConfig()
        for rname, kind, value in cfg.extra_records:
            try:
                ip = ipaddress.ip_address(value)
            except ValueError:
                skipped += 1
                continue
            k = kind.upper() or ("A" if ip.version == 4 else "AAAA")
            if (k, ip.version) not in (("A", 4), ("AAAA", 6)):
                skipped += 1
                continue
            (v4 if ip.version == 4 else v6).setdefault(fqdn(rname), []).append(str(ip))
        hosts = {name: (tuple(dict.fromkeys(v4.get(name, ()))), tuple(dict.fromkeys(v6.get(name, ()))))
                 for name in {*v4, *v6}}
        local: list[str] = []
        routes: list[tuple[str, tuple[Upstream, ...]]] = []
        for suffix, rs in cfg.routes:
            ups = tuple(u for r in rs if (u := parse_upstream(r)) is not None)
            skipped += len(rs) - len(ups)
            if not rs:
                local.append(fqdn(suffix))
            elif ups:
                routes.append((fqdn(suffix), ups))
        if node is not None and node.name and "." in node.name.rstrip("."):
            local.append(fqdn(node.name.split(".", 1)[1]))
        if cfg.proxied:
            local.extend(REVERSE_ZONES)
        glob = [u for r in cfg.resolvers if (u := parse_upstream(r)) is not None]
        skipped += len(cfg.resolvers) - len(glob)
        if not glob:
            glob = [u for r in host_resolvers if (u := parse_upstream(r)) is not None and u[0] not in QUAD100]
        if not glob:
            glob = [u for r in cfg.fallback_resolvers if (u := parse_upstream(r)) is not None]
        return cls(
            hosts=hosts, ptr=ptr,
            local_zones=tuple(sorted(dict.fromkeys(local), key=_depth)),
            routes=tuple(sorted(routes, key=lambda r: _depth(r[0]))),
            upstreams=tuple(dict.fromkeys(glob)),
            search=tuple(fqdn(d) for d in cfg.domains if d.strip(". ")),
            skipped=skipped,
            capture_all=bool(cfg.resolvers) and bool(glob),
        )

    def lookup(self, name: str) -> tuple[str, tuple[tuple[str, ...], tuple[str, ...]]] | None:
        """The host entry for `name` (lowercased FQDN): exact, else a single label under a search domain."""
        hit = self.hosts.get(name)
        if hit is not None:
            return name, hit
        if name.count(".") == 1:
            for d in self.search:
                full = name + d if d != "." else name
                hit = self.hosts.get(full)
                if hit is not None:
                    return full, hit
        return None

    def local_zone(self, name: str) -> str | None:
        for z in self.local_zones:
            if in_zone(name, z):
                return z
        return None

    def route(self, name: str) -> tuple[Upstream, ...] | None:
        for suffix, ups in self.routes:
            if in_zone(name, suffix):
                return ups
        return None
