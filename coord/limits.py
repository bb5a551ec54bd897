"""Bounds on what an unauthenticated caller can make the server hold or do. Sans-IO: callers pass ``now``.

Anyone can mint a machine key, so the server counts work per *source*, not per key: an IPv4 address, or an IPv6
/64 (one host usually holds a whole /64; an IPv4-mapped IPv6 address counts as its IPv4 address). Behind a
reverse proxy every request comes from the proxy: the client's address is then read from ``X-Forwarded-For``,
but only when the request comes from a proxy the configuration names (``trusted_proxies``), so nobody else can
choose the address they are counted under.

- ``RateLimit``: a token bucket per source (``burst`` requests at once, then ``rate`` per second). Its table of
  sources is bounded too: past ``max_sources`` the least recently seen source is forgotten (it starts again with
  a full bucket, which costs an attacker a new source to reach).
- ``Refusals``: what was refused and why, for ``shoal-server info`` and ``/health``.
"""

from __future__ import annotations

import ipaddress
from collections import Counter, OrderedDict
from dataclasses import dataclass, field

IPNetwork = ipaddress.IPv4Network | ipaddress.IPv6Network

UNKNOWN_SOURCE = "unknown"


def source_key(host: str | None) -> str:
    """The unit limits count in: ``192.0.2.7``, ``2001:db8:1:2::/64``; ``unknown`` for what is no address."""
    if not host:
        return UNKNOWN_SOURCE
    try:
        ip = ipaddress.ip_address(host.strip("[]"))
    except ValueError:
        return UNKNOWN_SOURCE
    if isinstance(ip, ipaddress.IPv6Address):
        if ip.ipv4_mapped is not None:
            return str(ip.ipv4_mapped)
        return str(ipaddress.IPv6Network((int(ip) >> 64 << 64, 64)))
    return str(ip)


def parse_proxies(text: str) -> tuple[IPNetwork, ...]:
    """``"10.0.0.1, 192.0.2.0/24"`` -> networks; raises ValueError naming the entry that is not one."""
    out = []
    for item in text.replace(",", " ").split():
        try:
            out.append(ipaddress.ip_network(item, strict=False))
        except ValueError:
            raise ValueError(f"{item!r} is not an address or CIDR prefix") from None
    return tuple(out)


def _trusted(host: str, proxies: tuple[IPNetwork, ...]) -> bool:
    try:
        ip = ipaddress.ip_address(host.strip("[]"))
    except ValueError:
        return False
    if isinstance(ip, ipaddress.IPv6Address) and ip.ipv4_mapped is not None:
        ip = ip.ipv4_mapped
    return any(ip.version == net.version and ip in net for net in proxies)


def client_address(peer: str | None, forwarded_for: str | None, proxies: tuple[IPNetwork, ...]) -> str:
    """The address a request is counted under: the TCP peer, unless it is a trusted proxy; then the rightmost
    ``X-Forwarded-For`` entry that is not a trusted proxy (entries to its left are whatever the client wrote)."""
    host = peer or ""
    if not proxies or not forwarded_for or not _trusted(host, proxies):
        return host
    for entry in reversed([e.strip() for e in forwarded_for.split(",")]):
        if not entry:
            continue
        if not _trusted(entry, proxies):
            return entry
        host = entry
    return host


@dataclass
class RateLimit:
    """Token buckets per source key."""

    rate: float  # tokens per second
    burst: float
    max_sources: int = 65_536
    buckets: OrderedDict[str, tuple[float, float]] = field(default_factory=OrderedDict)  # key -> (tokens, at)

    def _tokens(self, key: str, now: float) -> float:
        tokens, at = self.buckets.get(key, (self.burst, now))
        return min(self.burst, tokens + max(0.0, now - at) * self.rate)

    def available(self, key: str, now: float) -> bool:
        """Whether ``allow`` would say yes, without taking a token."""
        return self._tokens(key, now) >= 1.0

    def allow(self, key: str, now: float) -> bool:
        """Take a token if there is one."""
        tokens = self._tokens(key, now)
        self.buckets.pop(key, None)
        ok = tokens >= 1.0
        if ok:
            tokens -= 1.0
        self.buckets[key] = (tokens, now)
        while len(self.buckets) > self.max_sources:
            self.buckets.popitem(last=False)
        return ok


@dataclass
class Refusals:
    """Counts of refused requests by reason (``rate``, ``pending_source``, ``pending_total``, ``replay_source``,
    ``replay_total``, ``bad_request``)."""

    counts: Counter[str] = field(default_factory=Counter)

    def note(self, reason: str) -> None:
        self.counts[reason] += 1

    def as_json(self) -> dict[str, int]:
        return {"total": sum(self.counts.values()), **dict(sorted(self.counts.items()))}
