"""The OS side of MagicDNS when systemd-resolved owns /etc/resolv.conf: per-link DNS over D-Bus.

    mode_of(/etc/resolv.conf) -> "systemd-resolved" | "direct"
    plan(LinkConfig) -> [Call(member, signature, body)]      # pure: what `Resolved.set` sends, in order
    Resolved(bus_address).set(cfg) / .revert(ifindex)       # dbus-fast shell, idempotent (equal cfg: no calls)

Calls go to org.freedesktop.resolve1, /org/freedesktop/resolve1, interface org.freedesktop.resolve1.Manager
(ts:net/dns/resolved.go): SetLinkDNS(quad-100), SetLinkDomains (search domains, and `~suffix` routing-only
domains for the local zones and split-DNS suffixes; `~.` as well when the netmap has global resolvers, so quad-100
answers everything), SetLinkDefaultRoute (only with `~.`), LLMNR, mDNS, DNSSEC and DNS-over-TLS off on the
link, then FlushCaches. `revert` is RevertLink. Without global resolvers the host's own resolvers keep the rest:
quad-100 must not forward to 127.0.0.53, which would loop back to it.

Tested against a stand-in org.freedesktop.resolve1 on a private dbus-daemon (these machines have no systemd as
PID 1): tests/node/test_dns_resolved.py.
"""

from __future__ import annotations

import ipaddress
import os
import socket
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

DEST = "org.freedesktop.resolve1"
PATH = "/org/freedesktop/resolve1"
IFACE = "org.freedesktop.resolve1.Manager"
STUBS = ("127.0.0.53", "127.0.0.54")


def mode_of(resolv_conf: Path) -> str:
    """Who owns resolv.conf: a link into /run/systemd/resolve/, or a file naming only resolved's stub."""
    try:
        if resolv_conf.is_symlink() and "/run/systemd/resolve/" in os.path.realpath(resolv_conf):
            return "systemd-resolved"
        text = resolv_conf.read_text()
    except OSError:
        return "direct"
    servers = [p[1] for line in text.splitlines() if len(p := line.split()) >= 2 and p[0] == "nameserver"]
    return "systemd-resolved" if servers and all(s in STUBS for s in servers) else "direct"


@dataclass(frozen=True)
class LinkConfig:
    ifindex: int
    dns: tuple[str, ...]  # quad-100
    search: tuple[str, ...] = ()
    routing: tuple[str, ...] = ()  # routing-only suffixes ("." = everything)

    @classmethod
    def build(cls, ifindex: int, dns: Iterable[str], search: Iterable[str], local_zones: Iterable[str],
              split: Iterable[str], capture_all: bool) -> LinkConfig:
        routing = [*local_zones, *split, *(["."] if capture_all else [])]
        return cls(ifindex, tuple(dns), tuple(dict.fromkeys(d.rstrip(".") for d in search if d.rstrip("."))),
                   tuple(dict.fromkeys(r.rstrip(".") or "." for r in routing)))


@dataclass(frozen=True)
class Call:
    member: str
    signature: str
    body: list[Any]


def plan(cfg: LinkConfig) -> list[Call]:
    i = cfg.ifindex
    addrs = []
    for a in cfg.dns:
        ip = ipaddress.ip_address(a)
        addrs.append([int(socket.AF_INET if ip.version == 4 else socket.AF_INET6), ip.packed])
    domains = [[d, False] for d in cfg.search] + [[r, True] for r in cfg.routing]
    return [
        Call("SetLinkDNS", "ia(iay)", [i, addrs]),
        Call("SetLinkDomains", "ia(sb)", [i, domains]),
        Call("SetLinkDefaultRoute", "ib", [i, "." in cfg.routing]),
        Call("SetLinkLLMNR", "is", [i, "no"]),
        Call("SetLinkMulticastDNS", "is", [i, "no"]),
        Call("SetLinkDNSSEC", "is", [i, "no"]),
        Call("SetLinkDNSOverTLS", "is", [i, "no"]),
        Call("FlushCaches", "", []),
    ]


class ResolvedError(Exception):
    pass


class Resolved:
    """Sends `plan(cfg)` over the system bus (or `bus_address`); one connection per set/revert."""

    def __init__(self, bus_address: str | None = None) -> None:
        self.bus_address = bus_address
        self.applied: LinkConfig | None = None

    async def _send(self, calls: list[Call]) -> None:
        from dbus_fast import BusType, Message, MessageType
        from dbus_fast.aio import MessageBus

        bus = MessageBus(bus_address=self.bus_address) if self.bus_address else MessageBus(bus_type=BusType.SYSTEM)
        await bus.connect()
        try:
            for c in calls:
                reply = await bus.call(Message(destination=DEST, path=PATH, interface=IFACE, member=c.member,
                                               signature=c.signature, body=c.body))
                if reply is None or reply.message_type == MessageType.ERROR:
                    why = reply.body[0] if reply is not None and reply.body else "no reply"
                    raise ResolvedError(f"resolved {c.member}: {reply.error_name if reply else ''} {why}".strip())
        finally:
            bus.disconnect()

    async def set(self, cfg: LinkConfig) -> bool:
        if cfg == self.applied:
            return False
        self.applied = None
        await self._send(plan(cfg))
        self.applied = cfg
        return True

    async def revert(self, ifindex: int) -> None:
        self.applied = None
        await self._send([Call("RevertLink", "i", [ifindex])])
