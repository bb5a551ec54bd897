"""netcheck: what the network looks like from here, by STUN to each DERP region (ts:net/netcheck).

It answers: is UDP out usable at all; which public ip:port(s) the NAT gives us (per family); does the mapping
vary by destination IP (a "hard" NAT: two STUN servers at different addresses see different ports, so a peer
cannot learn our port for it); how far each region is; which region should be home.

`Netcheck` is the sans-IO core (now in, `next_timer()` out, datagrams to send drained with `next_transmit()`,
replies fed with `receive()`); STUN bytes come from derp.stun. It sends one binding request per STUN server,
retransmits an unanswered one after 100 ms and then every 200 ms (a new transaction ID each time, so the
latency of whichever answer comes is exact), and is done when every server answered or `timeout` passed.

The home region is the lowest-latency one, with Tailscale's stickiness: the previous home is kept while it
answered and the best is not clearly better (less than 10 ms better, or more than 2/3 of the old latency).
Tailscale also smooths latency over 5 minutes of reports; we keep only the last report.

The asyncio glue below (`run`, `netcheck_udp`) sends through any `send(data, addr)` callback, so the agent can
send from the WireGuard port through the raw socket and feed replies from its packet dispatch; `netcheck_udp`
uses a plain UDP socket of its own (for `shoal netcheck` without the agent, and for tests).

Scheduling (the agent's job): re-STUN every 20-26 s while the session is active, to keep NAT mappings under the
common 30 s UDP timeout, and every 5 s while UDP looks blocked (`restun_delay`).
"""

from __future__ import annotations

import asyncio
import contextlib
import ipaddress
import os
import socket
from collections import deque
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field
from typing import Any, Final

from coord import wire
from derp import stun
from node.disco import AddrPort

DEFAULT_STUN_PORT: Final = 3478
RETRANSMITS: Final = (0.1, 0.2, 0.2)  # gaps before the 2nd, 3rd and 4th try
TIMEOUT: Final = 3.0
STICKY_LATENCY: Final = 0.010
RESTUN_MIN, RESTUN_MAX = 20.0, 26.0
RESTUN_BLOCKED: Final = 5.0


@dataclass(frozen=True, slots=True)
class StunServer:
    region_id: int
    name: str
    addr: AddrPort


@dataclass(frozen=True, slots=True)
class Region:
    region_id: int
    code: str
    servers: tuple[StunServer, ...]


# A DERP map that cannot be read is refused where the map is parsed (coord/wire/schema.py).
DerpMapError = wire.DERPMapError


def regions_from_derp_map(derp_map: wire.DERPMap) -> list[Region]:
    """STUN servers of a DERP map. Per node: IPv4 and IPv6 fields ("none" = off), else a HostName that is an IP
    literal; STUNPort 0 = 3478, -1 = no STUN. Names that need DNS are skipped (resolve them first and put the
    address in IPv4/IPv6). Regions without STUN or with NoMeasureNoHome are left out."""
    out: list[Region] = []
    for r in derp_map.regions:
        if r.no_measure_no_home:
            continue
        servers: list[StunServer] = []
        for n in r.nodes:
            port = n.stun_port or DEFAULT_STUN_PORT
            if port < 0:
                continue
            for ip in _node_ips(n):
                servers.append(StunServer(r.region_id, n.name, (ip, port)))
        if servers:
            out.append(Region(r.region_id, r.region_code, tuple(servers)))
    return sorted(out, key=lambda x: x.region_id)


def _node_ips(n: wire.DERPNode) -> list[str]:
    ips = [v for v in (n.ipv4, n.ipv6) if v and v != "none"]
    if not ips and n.ipv4 != "none":
        with contextlib.suppress(ValueError):
            ips.append(str(ipaddress.ip_address(n.host_name.strip("[]"))))
    return ips


@dataclass(slots=True)
class Report:
    udp: bool = False
    ipv4: bool = False
    ipv6: bool = False
    global_v4: AddrPort | None = None
    global_v6: AddrPort | None = None
    # None: not measured (fewer than two servers at different IPv4 addresses answered).
    mapping_varies_by_dest_ip: bool | None = None
    region_latency: dict[int, float] = field(default_factory=dict)
    region_v4_latency: dict[int, float] = field(default_factory=dict)
    region_v6_latency: dict[int, float] = field(default_factory=dict)
    preferred_derp: int = 0
    # Every (server, what it saw) pair, for the endpoint list and for debugging.
    seen: dict[AddrPort, AddrPort] = field(default_factory=dict)

    def endpoints(self) -> list[AddrPort]:
        """Distinct STUN-reflexive endpoints, in the order first seen (candidates for the netmap)."""
        return list(dict.fromkeys(self.seen.values()))

    def to_json(self) -> dict[str, Any]:
        def ap(a: AddrPort | None) -> str | None:
            return None if a is None else (f"[{a[0]}]:{a[1]}" if ":" in a[0] else f"{a[0]}:{a[1]}")

        return {
            "UDP": self.udp,
            "IPv4": self.ipv4,
            "IPv6": self.ipv6,
            "GlobalV4": ap(self.global_v4),
            "GlobalV6": ap(self.global_v6),
            "MappingVariesByDestIP": self.mapping_varies_by_dest_ip,
            "PreferredDERP": self.preferred_derp,
            "RegionLatency": {str(k): round(v, 6) for k, v in sorted(self.region_latency.items())},
            "RegionV4Latency": {str(k): round(v, 6) for k, v in sorted(self.region_v4_latency.items())},
            "RegionV6Latency": {str(k): round(v, 6) for k, v in sorted(self.region_v6_latency.items())},
        }


@dataclass(slots=True)
class _Probe:
    server: StunServer
    tries: int = 0
    next_at: float = 0.0
    done: bool = False


class Netcheck:
    """One netcheck run. Drain `next_transmit()` after `start`, `receive` and `handle_timer`."""

    def __init__(
        self,
        regions: Iterable[Region],
        now: float,
        *,
        previous_home: int = 0,
        timeout: float = TIMEOUT,
        rand: Callable[[int], bytes] = os.urandom,
    ) -> None:
        self._rand = rand
        self.previous_home = previous_home
        self.deadline = now + timeout
        self._probes = [_Probe(s, next_at=now) for r in regions for s in r.servers]
        self._inflight: dict[bytes, tuple[_Probe, float]] = {}
        self._out: deque[tuple[bytes, AddrPort]] = deque()
        self.report = Report()
        self.finished = False
        self.handle_timer(now)

    def next_transmit(self) -> tuple[bytes, AddrPort] | None:
        return self._out.popleft() if self._out else None

    def receive(self, data: bytes, src: AddrPort, now: float) -> bool:
        """Feed a datagram; True if it answered one of our requests."""
        try:
            resp = stun.parse_response(data)
        except stun.StunError:
            return False
        hit = self._inflight.pop(resp.txid, None)
        if hit is None:
            return False
        probe, sent_at = hit
        if probe.done or self.finished:
            return True
        # Only the server we asked may answer for it: anyone could send a reply with a guessed txid otherwise.
        if _norm(src) != _norm(probe.server.addr):
            self._inflight[resp.txid] = hit
            return False
        probe.done = True
        self._record(probe.server, (resp.host, resp.port), max(0.0, now - sent_at))
        self._finish_if_done()
        return True

    def handle_timer(self, now: float) -> None:
        if self.finished:
            return
        if now >= self.deadline:
            self._finish()
            return
        for p in self._probes:
            if p.done or p.tries > len(RETRANSMITS) or now < p.next_at:
                continue
            txid = self._rand(12)
            self._inflight[txid] = (p, now)
            self._out.append((stun.build_request(txid), p.server.addr))
            p.next_at = now + (RETRANSMITS[p.tries] if p.tries < len(RETRANSMITS) else float("inf"))
            p.tries += 1
        self._finish_if_done()

    def next_timer(self) -> float | None:
        if self.finished:
            return None
        pending = [p.next_at for p in self._probes if not p.done and p.tries <= len(RETRANSMITS)]
        return min([self.deadline, *pending])

    def _record(self, server: StunServer, seen: AddrPort, latency: float) -> None:
        r = self.report
        seen = _norm(seen)
        r.udp = True
        r.seen[server.addr] = seen
        v6 = ":" in server.addr[0]
        per_family = r.region_v6_latency if v6 else r.region_v4_latency
        for table in (per_family, r.region_latency):
            old = table.get(server.region_id)
            table[server.region_id] = latency if old is None else min(old, latency)
        if v6:
            r.ipv6 = True
            r.global_v6 = r.global_v6 or seen
        else:
            r.ipv4 = True
            r.global_v4 = r.global_v4 or seen

    def _finish_if_done(self) -> None:
        if all(p.done for p in self._probes):
            self._finish()

    def _finish(self) -> None:
        self.finished = True
        self._inflight.clear()
        r = self.report
        v4 = {srv: seen for srv, seen in r.seen.items() if ":" not in srv[0]}
        if len({srv[0] for srv in v4}) >= 2:
            r.mapping_varies_by_dest_ip = len(set(v4.values())) > 1
        r.preferred_derp = preferred_region(r.region_latency, self.previous_home)


def preferred_region(latency: Mapping[int, float], previous: int = 0) -> int:
    if not latency:
        return 0
    best = min(sorted(latency), key=lambda rid: latency[rid])
    old = latency.get(previous)
    sticky = old is not None and (old - latency[best] < STICKY_LATENCY or latency[best] > old * 2 / 3)
    if previous and best != previous and sticky:
        return previous
    return best


def restun_delay(udp_ok: bool, rand: Callable[[int], bytes] = os.urandom) -> float:
    """Seconds until the next periodic STUN: 20-26 s (random, so nodes do not synchronise), 5 s while blocked."""
    if not udp_ok:
        return RESTUN_BLOCKED
    frac = int.from_bytes(rand(2), "big") / 0xFFFF
    return RESTUN_MIN + (RESTUN_MAX - RESTUN_MIN) * frac


def _norm(addr: AddrPort) -> AddrPort:
    ip = ipaddress.ip_address(addr[0].split("%", 1)[0])
    if isinstance(ip, ipaddress.IPv6Address) and ip.ipv4_mapped is not None:
        ip = ip.ipv4_mapped
    return (str(ip), int(addr[1]))


# --- asyncio glue --------------------------------------------------------------------------------------------


class Runner:
    """Runs one `Netcheck` on the loop: sends with `send`, and the owner of the receiving socket calls `feed`
    for each STUN datagram (returns True if it was ours)."""

    def __init__(self, send: Callable[[bytes, AddrPort], None]) -> None:
        self.send = send
        self.current: Netcheck | None = None
        self._wake = asyncio.Event()

    def feed(self, data: bytes, src: AddrPort) -> bool:
        nc = self.current
        if nc is None:
            return False
        ours = nc.receive(data, src, asyncio.get_running_loop().time())
        if ours:
            self._wake.set()
        return ours

    async def run(self, regions: Iterable[Region], *, previous_home: int = 0, timeout: float = TIMEOUT) -> Report:
        loop = asyncio.get_running_loop()
        nc = self.current = Netcheck(regions, loop.time(), previous_home=previous_home, timeout=timeout)
        try:
            while True:
                while (out := nc.next_transmit()) is not None:
                    # An unreachable family or network: that server simply does not answer.
                    with contextlib.suppress(OSError):
                        self.send(*out)
                if nc.finished:
                    return nc.report
                t = nc.next_timer()
                self._wake.clear()
                if t is not None:
                    with contextlib.suppress(TimeoutError):
                        await asyncio.wait_for(self._wake.wait(), max(0.0, t - loop.time()))
                nc.handle_timer(loop.time())
        finally:
            self.current = None


async def netcheck_udp(
    regions: Iterable[Region], *, bind: AddrPort = ("0.0.0.0", 0), previous_home: int = 0, timeout: float = TIMEOUT
) -> Report:
    """netcheck from a UDP socket of our own (not the WireGuard port)."""
    regions = list(regions)
    loop = asyncio.get_running_loop()
    family = socket.AF_INET6 if ":" in bind[0] else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_DGRAM)
    try:
        if family == socket.AF_INET6:
            sock.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 0)
        sock.setblocking(False)
        sock.bind(bind)

        def send(data: bytes, addr: AddrPort) -> None:
            target = addr
            if family == socket.AF_INET6 and ":" not in addr[0]:
                target = (f"::ffff:{addr[0]}", addr[1])
            elif family == socket.AF_INET and ":" in addr[0]:
                return
            sock.sendto(data, target)

        runner = Runner(send)

        def readable() -> None:
            for _ in range(64):
                try:
                    data, addr = sock.recvfrom(2048)
                except (BlockingIOError, InterruptedError):
                    return
                except OSError:
                    continue
                runner.feed(data, (str(addr[0]), int(addr[1])))

        loop.add_reader(sock.fileno(), readable)
        try:
            return await runner.run(regions, previous_home=previous_home, timeout=timeout)
        finally:
            loop.remove_reader(sock.fileno())
    finally:
        sock.close()
