"""Addresses, MTU, link state and routes of the tailnet interface as `ip` commands: sans-IO renderer, applier.

The renderer compares a desired `RouteConfig` with the interface's current `LinkState` (parsed from
`ip -j addr show dev X`, `ip -j route show dev X`, `ip -j -6 route show dev X`) and returns only the commands
that close the gap, in an order the kernel accepts: MTU, link up (routes need an up device), stale addresses
out, new addresses in, stale routes out, new routes in.

What we own on the interface: every global-scope address, the host-scope ones (quad-100's, added `scope
host` so the kernel never picks them as a source address for traffic to peers), and routes with protocol
boot/static (the ones `ip route add` makes). Link-local addresses and kernel-made routes (protocol kernel:
fe80::/64, an IPv6 /128 of a local address) are left alone. IPv6 addresses are added with `nodad`: there is
nobody to collide with on a WireGuard link, and duplicate address detection would hold them tentative for a
second.

The applier has no I/O of its own: it awaits an injected Runner (node.run), so tests read its command
transcript.
"""

from __future__ import annotations

import ipaddress
import json
from collections.abc import Iterable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from node.errors import LocalError

if TYPE_CHECKING:
    from node.run import Runner

TAILNET_V4 = "100.64.0.0/10"
TAILNET_V6 = "fd7a:115c:a1e0::/48"
MTU = 1280
OWNED_PROTOCOLS = {None, "boot", "static"}


class RouteStateError(LocalError, ValueError):
    """`ip -j` output we cannot read, or the interface does not exist."""


@dataclass(frozen=True, slots=True)
class RouteConfig:
    iface: str
    addresses: tuple[str, ...] = ()  # with prefix length, e.g. 100.64.0.1/32, fd7a:115c:a1e0::1/128
    routes: tuple[str, ...] = ()  # extra prefixes through the interface (peers' subnet routes)
    mtu: int = MTU
    host_addresses: tuple[str, ...] = ()  # `scope host`: local only, never a source (quad-100)

    def __post_init__(self) -> None:
        if not 1 <= len(self.iface) <= 15 or "/" in self.iface or " " in self.iface:
            raise ValueError(f"bad interface name {self.iface!r}")
        object.__setattr__(self, "addresses", tuple(sorted({_iface_addr(a) for a in self.addresses},
                                                           key=_order)))
        object.__setattr__(self, "host_addresses", tuple(sorted({_iface_addr(a) for a in self.host_addresses},
                                                                key=_order)))
        object.__setattr__(self, "routes", tuple(sorted({_net(r) for r in self.routes}, key=_order)))

    def wanted_routes(self) -> tuple[str, ...]:
        return tuple(sorted({TAILNET_V4, TAILNET_V6, *self.routes}, key=_order))


@dataclass(frozen=True, slots=True)
class LinkState:
    up: bool
    mtu: int
    addresses: tuple[str, ...]
    routes: tuple[str, ...]
    host_addresses: tuple[str, ...] = ()


def _iface_addr(text: str) -> str:
    try:
        return str(ipaddress.ip_interface(text))
    except ValueError:
        raise ValueError(f"bad interface address {text!r}") from None


def _net(text: str) -> str:
    try:
        return str(ipaddress.ip_network(text, strict=False))
    except ValueError:
        raise ValueError(f"bad route prefix {text!r}") from None


def _order(text: str) -> tuple[int, int, int]:
    i = ipaddress.ip_interface(text)
    return (i.version, int(i.ip), i.network.prefixlen)


def _family(text: str) -> list[str]:
    return ["-6"] if ipaddress.ip_interface(text).version == 6 else []


def render(cfg: RouteConfig, cur: LinkState) -> list[list[str]]:
    dev = ["dev", cfg.iface]
    cmds: list[list[str]] = []
    if cur.mtu != cfg.mtu:
        cmds.append(["ip", "link", "set", *dev, "mtu", str(cfg.mtu)])
    if not cur.up:
        cmds.append(["ip", "link", "set", *dev, "up"])
    have_addrs = set(cur.addresses)
    want_addrs = set(cfg.addresses)
    for a in sorted(have_addrs - want_addrs, key=_order):
        cmds.append(["ip", *_family(a), "addr", "del", a, *dev])
    for a in cfg.addresses:
        if a not in have_addrs:
            nodad = ["nodad"] if ipaddress.ip_interface(a).version == 6 else []
            cmds.append(["ip", *_family(a), "addr", "add", a, *dev, *nodad])
    have_host = set(cur.host_addresses)
    for a in sorted(have_host - set(cfg.host_addresses), key=_order):
        cmds.append(["ip", *_family(a), "addr", "del", a, *dev])
    for a in cfg.host_addresses:
        if a not in have_host:
            nodad = ["nodad"] if ipaddress.ip_interface(a).version == 6 else []
            cmds.append(["ip", *_family(a), "addr", "add", a, *dev, "scope", "host", *nodad])
    have_routes = set(cur.routes)
    want_routes = cfg.wanted_routes()
    for r in sorted(have_routes - set(want_routes), key=_order):
        cmds.append(["ip", *_family(r), "route", "del", r, *dev])
    for r in want_routes:
        if r not in have_routes:
            cmds.append(["ip", *_family(r), "route", "add", r, *dev])
    return cmds


def render_down(cur: LinkState, iface: str) -> list[list[str]]:
    """Commands that remove everything we own from the interface (for `shoal down` when it is kept)."""
    dev = ["dev", iface]
    cmds = [["ip", *_family(r), "route", "del", r, *dev] for r in cur.routes]
    cmds += [["ip", *_family(a), "addr", "del", a, *dev] for a in (*cur.addresses, *cur.host_addresses)]
    return cmds


def _json(text: str, what: str) -> list[Any]:
    try:
        data = json.loads(text or "[]")
    except json.JSONDecodeError as e:
        raise RouteStateError(f"cannot parse {what}: {e}") from None
    if not isinstance(data, list) or not all(isinstance(x, dict) for x in data):
        raise RouteStateError(f"{what} is not a list of objects")
    return data


def parse_state(addr_json: str, route4_json: str, route6_json: str) -> LinkState:
    links = _json(addr_json, "ip -j addr")
    if len(links) != 1:
        raise RouteStateError(f"ip -j addr listed {len(links)} links, expected 1")
    link = links[0]
    flags = link.get("flags", [])
    mtu = link.get("mtu")
    if not isinstance(flags, list) or not isinstance(mtu, int):
        raise RouteStateError("ip -j addr: link without flags or mtu")
    addrs: list[str] = []
    host: list[str] = []
    for a in link.get("addr_info", []):
        if not isinstance(a, dict) or a.get("scope") not in ("global", "host"):
            continue
        try:
            (addrs if a.get("scope") == "global" else host).append(_iface_addr(f"{a['local']}/{a['prefixlen']}"))
        except (KeyError, ValueError):
            raise RouteStateError(f"ip -j addr: bad address entry {a!r:.80}") from None
    routes = []
    for r in _routes(_json(route4_json, "ip -j route")) + _routes(_json(route6_json, "ip -j -6 route")):
        routes.append(r)
    return LinkState("UP" in flags, mtu, tuple(sorted(addrs, key=_order)), tuple(sorted(routes, key=_order)),
                     tuple(sorted(host, key=_order)))


def _routes(entries: Iterable[dict[str, Any]]) -> list[str]:
    out = []
    for r in entries:
        proto = r.get("protocol")
        owned = proto is None or (isinstance(proto, str) and proto in OWNED_PROTOCOLS)
        foreign = not owned or "gateway" in r
        if foreign or r.get("type", "unicast") != "unicast":
            continue
        dst = r.get("dst")
        if not isinstance(dst, str):
            raise RouteStateError(f"ip -j route: entry without dst {r!r:.80}")
        if dst == "default":
            continue
        try:
            out.append(_net(dst))
        except ValueError:
            raise RouteStateError(f"ip -j route: bad dst {dst!r:.60}") from None
    return out


class RouteApplier:
    """Idempotent `set(cfg)` for the interface's addresses and routes, through a Runner."""

    def __init__(self, runner: Runner) -> None:
        self.runner = runner

    async def read(self, iface: str) -> LinkState:
        dev = ["dev", iface]
        addr = await self.runner.run(["ip", "-j", "addr", "show", *dev], check=False)
        if addr.rc != 0:
            raise RouteStateError(f"interface {iface}: {addr.err.strip() or 'not found'}")
        r4 = await self.runner.run(["ip", "-j", "route", "show", *dev])
        r6 = await self.runner.run(["ip", "-j", "-6", "route", "show", *dev])
        return parse_state(addr.out, r4.out, r6.out)

    async def set(self, cfg: RouteConfig) -> list[list[str]]:
        """Applies `cfg`; returns the commands it ran (empty when nothing differed)."""
        cmds = render(cfg, await self.read(cfg.iface))
        for argv in cmds:
            await self.runner.run(argv)
        return cmds

    async def clear(self, iface: str) -> None:
        for argv in render_down(await self.read(iface), iface):
            await self.runner.run(argv, check=False)
