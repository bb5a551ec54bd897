"""Quad-100's asyncio shell: UDP and TCP on 100.100.100.100:53 and [fd7a:115c:a1e0::53]:53, forwarding.

Sockets are bound with IP_FREEBIND, so they can be made before the routes applier has put the addresses on
the tailnet interface (and survive a wireguard-go restart that takes them away for a moment). TCP is the
usual two-byte length prefix per message (RFC 7766); a connection idle for `TCP_IDLE` is closed.

Forwarding: the query goes to each upstream in turn over UDP with a fresh random id (an answer must match
it and the question), `timeout / len(upstreams)` each; an answer with TC is asked again over TCP. When every
upstream fails or the time is up the client gets SERVFAIL: the resolver never leaves a query unanswered.
At most `MAX_INFLIGHT` forwards run at once; past that, queries needing one are answered SERVFAIL.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import secrets
import socket
import struct
from collections.abc import Iterable
from typing import cast

from dnslib import DNSRecord

from node.dns.answer import Answerer, Forward, Reply, fit_udp, servfail
from node.dns.table import Upstream

log = logging.getLogger("shoald.dns")

TIMEOUT = 2.5
TCP_IDLE = 10.0
MAX_INFLIGHT = 256
IP_FREEBIND = 15  # linux/in.h; the socket module does not export it everywhere
IPV6_FREEBIND = 78


def _socket(addr: str, port: int, kind: int) -> socket.socket:
    fam = socket.AF_INET6 if ":" in addr else socket.AF_INET
    s = socket.socket(fam, kind)
    try:
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        if fam == socket.AF_INET6:
            s.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 1)
            with contextlib.suppress(OSError):
                s.setsockopt(socket.IPPROTO_IPV6, IPV6_FREEBIND, 1)
        s.setsockopt(socket.SOL_IP, IP_FREEBIND, 1)
        s.bind((addr, port))
        s.setblocking(False)
    except BaseException:
        s.close()
        raise
    return s


class _Udp(asyncio.DatagramProtocol):
    def __init__(self, server: DNSServer) -> None:
        self.server = server
        self.transport: asyncio.DatagramTransport | None = None

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = cast(asyncio.DatagramTransport, transport)

    def datagram_received(self, data: bytes, addr: tuple[str, int]) -> None:
        self.server.queries += 1
        try:
            out = self.server.answerer.handle(data, udp=True)
        except Exception:  # a bug in the core must not stop the resolver; the client retries
            log.exception("dns: query from %s", addr[0])
            return
        if out is None:
            return
        if isinstance(out, Reply):
            assert self.transport is not None
            self.transport.sendto(out.data, addr)
            return
        self.server.spawn_forward(out, self, addr)

    def error_received(self, exc: Exception) -> None:
        pass


class _Answer(asyncio.DatagramProtocol):
    def __init__(self, ident: int) -> None:
        self.ident = ident
        self.done: asyncio.Future[bytes] = asyncio.get_running_loop().create_future()

    def datagram_received(self, data: bytes, addr: tuple[str, int]) -> None:
        ours = len(data) >= 12 and struct.unpack_from("!H", data)[0] == self.ident and data[2] & 0x80
        if ours and not self.done.done():
            self.done.set_result(data)

    def error_received(self, exc: Exception) -> None:
        if not self.done.done():
            self.done.set_exception(exc)


async def ask_udp(up: Upstream, query: bytes, timeout: float) -> bytes:
    ident = secrets.randbelow(65536)
    pkt = struct.pack("!H", ident) + query[2:]
    loop = asyncio.get_running_loop()
    transport, proto = await loop.create_datagram_endpoint(lambda: _Answer(ident), remote_addr=up)
    try:
        transport.sendto(pkt)
        data = await asyncio.wait_for(proto.done, timeout)
    finally:
        transport.close()
    return query[:2] + data[2:]


async def ask_tcp(up: Upstream, query: bytes, timeout: float) -> bytes:
    async def go() -> bytes:
        reader, writer = await asyncio.open_connection(*up)
        try:
            writer.write(struct.pack("!H", len(query)) + query)
            await writer.drain()
            n = struct.unpack("!H", await reader.readexactly(2))[0]
            return await reader.readexactly(n)
        finally:
            writer.close()
            with contextlib.suppress(Exception):
                await writer.wait_closed()

    data = await asyncio.wait_for(go(), timeout)
    if len(data) < 12 or data[:2] != query[:2] or not data[2] & 0x80:
        raise ValueError("answer does not match the query")
    return data


async def forward(fwd: Forward, timeout: float = TIMEOUT, tcp_first: bool = False) -> bytes:
    """The upstreams' answer to `fwd.packet` (its own id), or SERVFAIL when none gave one in time."""
    ups = fwd.upstreams
    each = timeout / max(len(ups), 1)
    for up in ups:
        try:
            data = await ask_tcp(up, fwd.packet, each) if tcp_first else await ask_udp(up, fwd.packet, each)
            if not tcp_first and data[2] & 0x02:  # TC: the full answer over TCP
                data = await ask_tcp(up, fwd.packet, each)
            _check_question(data, fwd.query)
            return data
        except (OSError, TimeoutError, asyncio.IncompleteReadError, ValueError) as e:
            log.debug("dns: upstream %s:%d: %s", up[0], up[1], e or type(e).__name__)
    return servfail(fwd.query)


def _check_question(data: bytes, query: DNSRecord) -> None:
    try:
        got = DNSRecord.parse(data)
    except Exception:
        raise ValueError("unreadable answer") from None
    if got.questions and (str(got.q.qname).lower() != str(query.q.qname).lower() or got.q.qtype != query.q.qtype):
        raise ValueError("answer for another question")


class DNSServer:
    def __init__(self, answerer: Answerer, addrs: Iterable[str], port: int = 53, timeout: float = TIMEOUT) -> None:
        self.answerer = answerer
        self.addrs = tuple(addrs)
        self.port = port
        self.timeout = timeout
        self.queries = 0
        self.failed = 0  # forwards that ended in SERVFAIL
        self.listening: list[str] = []
        self.bound: list[tuple[str, int]] = []  # (address, port) of each UDP socket (port 0 in tests)
        self.errors: dict[str, str] = {}
        self._udp: list[asyncio.DatagramTransport] = []
        self._tcp: list[asyncio.Server] = []
        self._tasks: set[asyncio.Task[None]] = set()

    async def start(self) -> None:
        loop = asyncio.get_running_loop()
        for a in self.addrs:
            where = f"[{a}]:{self.port}" if ":" in a else f"{a}:{self.port}"
            try:
                us = _socket(a, self.port, socket.SOCK_DGRAM)
                bound = us.getsockname()[:2]
                t, _ = await loop.create_datagram_endpoint(lambda: _Udp(self), sock=us)
                self._udp.append(t)
                ts = _socket(a, bound[1], socket.SOCK_STREAM)
                self._tcp.append(await asyncio.start_server(self._tcp_client, sock=ts))
                self.listening.append(where)
                self.bound.append(bound)
            except OSError as e:
                self.errors[where] = str(e)
                log.error("dns: cannot listen on %s: %s", where, e)

    async def close(self) -> None:
        for t in self._udp:
            t.close()
        for s in self._tcp:
            s.close()
        for task in list(self._tasks):
            task.cancel()
        for s in self._tcp:
            with contextlib.suppress(Exception):
                await asyncio.wait_for(s.wait_closed(), 1)
        self._udp, self._tcp, self.listening, self.bound = [], [], [], []

    def spawn_forward(self, fwd: Forward, proto: _Udp, addr: tuple[str, int]) -> None:
        if len(self._tasks) >= MAX_INFLIGHT:
            if proto.transport is not None:
                proto.transport.sendto(servfail(fwd.query), addr)
            return

        async def go() -> None:
            data = await self.resolve_forward(fwd)
            if proto.transport is not None and not proto.transport.is_closing():
                proto.transport.sendto(fit_udp(data, fwd.query), addr)

        task = asyncio.create_task(go())
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    async def resolve_forward(self, fwd: Forward, tcp: bool = False) -> bytes:
        data = await forward(fwd, self.timeout, tcp_first=tcp)
        if data[3] & 0x0F == 2:
            self.failed += 1
        return data

    async def resolve(self, packet: bytes, udp: bool = False) -> bytes | None:
        """One query through the same path a client's takes (the TCP path, and `shoal dns query`)."""
        out = self.answerer.handle(packet, udp=udp)
        if out is None or isinstance(out, Reply):
            return None if out is None else out.data
        return await self.resolve_forward(out)

    async def _tcp_client(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            while True:
                head = await asyncio.wait_for(reader.readexactly(2), TCP_IDLE)
                n = struct.unpack("!H", head)[0]
                packet = await asyncio.wait_for(reader.readexactly(n), TCP_IDLE)
                self.queries += 1
                out = await self.resolve(packet, udp=False)
                if out is None:
                    return
                writer.write(struct.pack("!H", len(out)) + out)
                await writer.drain()
        except (OSError, TimeoutError, asyncio.IncompleteReadError):
            pass
        except Exception:
            log.exception("dns: TCP client")
        finally:
            writer.close()
            with contextlib.suppress(Exception):
                await writer.wait_closed()
