"""Quad-100's asyncio shell: UDP and TCP on 100.100.100.100:53 and [fd7a:115c:a1e0::53]:53, forwarding.

Sockets are bound with IP_FREEBIND, so they can be made before the routes applier has put the addresses on
the tailnet interface (and survive a wireguard-go restart that takes them away for a moment). TCP is the
usual two-byte length prefix per message (RFC 7766); a connection idle for `TCP_IDLE` is closed.

Forwarding: the query goes to each upstream in turn over UDP with a fresh random id, from one shared
socket per family (`Upstreams`; an answer must come from that upstream, carry that id and the question),
`timeout / len(upstreams)` each; an answer with TC is asked again over TCP. When every upstream fails or
the time is up the client gets SERVFAIL: the resolver never leaves a query unanswered. At most
`MAX_INFLIGHT` forwards run at once; past that, queries needing one are answered SERVFAIL.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import secrets
import socket
import struct
from collections.abc import Iterable

from dnslib import DNSRecord

from node import sockmark
from node.dns.answer import Answerer, Forward, Reply, fit_udp, key, question_bytes, servfail
from node.dns.table import Upstream

log = logging.getLogger("shoald.dns")

TIMEOUT = 2.5
TCP_IDLE = 10.0
MAX_INFLIGHT = 1024
BURST = 64  # datagrams read per wake-up
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


class Upstreams:
    """One UDP socket per address family for every forwarded query: answers are matched by (upstream, id),
    ids are random and unique among the queries in flight, and an answer from anyone else is ignored."""

    def __init__(self, fwmark: int = 0) -> None:
        self.fwmark = fwmark  # the exit-node bypass (node/sockmark.py): upstreams are the host's, never the tunnel's
        self.socks: dict[int, socket.socket] = {}
        self.pending: dict[tuple[str, int, int], asyncio.Future[bytes]] = {}

    def _sock(self, fam: int) -> socket.socket:
        sock = self.socks.get(fam)
        if sock is None:
            sock = socket.socket(fam, socket.SOCK_DGRAM)
            try:
                sockmark.mark(sock, self.fwmark)
            except OSError:
                sock.close()
                raise
            sock.setblocking(False)
            sock.bind(("::" if fam == socket.AF_INET6 else "0.0.0.0", 0))
            asyncio.get_running_loop().add_reader(sock.fileno(), self._ready, sock)
            self.socks[fam] = sock
        return sock

    def _ready(self, sock: socket.socket) -> None:
        for _ in range(BURST):
            try:
                data, addr = sock.recvfrom(65535)
            except (BlockingIOError, InterruptedError):
                return
            except OSError:  # ICMP errors surface here: the waiter times out or tries the next upstream
                continue
            if len(data) < 12 or not data[2] & 0x80:
                continue
            fut = self.pending.get((addr[0], addr[1], struct.unpack_from("!H", data)[0]))
            if fut is not None and not fut.done():
                fut.set_result(data)

    async def ask(self, up: Upstream, query: bytes, timeout: float) -> bytes:
        fam = socket.AF_INET6 if ":" in up[0] else socket.AF_INET
        sock = self._sock(fam)
        ident = secrets.randbelow(65536)
        while (up[0], up[1], ident) in self.pending:
            ident = secrets.randbelow(65536)
        key = (up[0], up[1], ident)
        fut: asyncio.Future[bytes] = asyncio.get_running_loop().create_future()
        self.pending[key] = fut
        timer = asyncio.get_running_loop().call_later(timeout, _expire, fut)
        try:
            sock.sendto(struct.pack("!H", ident) + query[2:], up)
            data = await fut
        finally:
            timer.cancel()
            self.pending.pop(key, None)
        return query[:2] + data[2:]

    def close(self) -> None:
        for sock in self.socks.values():
            with contextlib.suppress(Exception):
                asyncio.get_running_loop().remove_reader(sock.fileno())
            sock.close()
        self.socks = {}


def _expire(fut: asyncio.Future[bytes]) -> None:
    if not fut.done():
        fut.set_exception(TimeoutError("no answer"))


async def ask_tcp(up: Upstream, query: bytes, timeout: float, fwmark: int = 0) -> bytes:
    async def go() -> bytes:
        sock = await sockmark.connect_tcp(up[0], up[1], fwmark)
        reader, writer = await asyncio.open_connection(sock=sock)
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


async def forward(fwd: Forward, pool: Upstreams, timeout: float = TIMEOUT, tcp_first: bool = False) -> bytes:
    """The upstreams' answer to `fwd.packet` (its own id), or SERVFAIL when none gave one in time."""
    ups = fwd.upstreams
    each = timeout / max(len(ups), 1)
    for up in ups:
        try:
            if tcp_first:
                data = await ask_tcp(up, fwd.packet, each, pool.fwmark)
            else:
                data = await pool.ask(up, fwd.packet, each)
            if not tcp_first and data[2] & 0x02:  # TC: the full answer over TCP
                data = await ask_tcp(up, fwd.packet, each, pool.fwmark)
            q = question_bytes(fwd.packet)
            if q is None or question_bytes(data) is None:
                _check_question(data, fwd.query)
            elif key(question_bytes(data) or b"") != key(q):
                raise ValueError("answer for another question")
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
    def __init__(self, answerer: Answerer, addrs: Iterable[str], port: int = 53, timeout: float = TIMEOUT,
                 fwmark: int = 0) -> None:
        self.answerer = answerer
        self.addrs = tuple(addrs)
        self.port = port
        self.timeout = timeout
        self.queries = 0
        self.failed = 0  # forwards that ended in SERVFAIL
        self.listening: list[str] = []
        self.bound: list[tuple[str, int]] = []  # (address, port) of each UDP socket (port 0 in tests)
        self.errors: dict[str, str] = {}
        self._udp: list[socket.socket] = []
        self.pool = Upstreams(fwmark)
        self._tcp: list[asyncio.Server] = []
        self._tasks: set[asyncio.Task[None]] = set()

    async def start(self) -> None:
        loop = asyncio.get_running_loop()
        for a in self.addrs:
            where = f"[{a}]:{self.port}" if ":" in a else f"{a}:{self.port}"
            try:
                us = _socket(a, self.port, socket.SOCK_DGRAM)
                bound = us.getsockname()[:2]
                loop.add_reader(us.fileno(), self._udp_ready, us)
                self._udp.append(us)
                ts = _socket(a, bound[1], socket.SOCK_STREAM)
                self._tcp.append(await asyncio.start_server(self._tcp_client, sock=ts))
                self.listening.append(where)
                self.bound.append(bound)
            except OSError as e:
                self.errors[where] = str(e)
                log.error("dns: cannot listen on %s: %s", where, e)

    async def close(self) -> None:
        loop = asyncio.get_running_loop()
        for us in self._udp:
            loop.remove_reader(us.fileno())
            us.close()
        self.pool.close()
        for s in self._tcp:
            s.close()
        for task in list(self._tasks):
            task.cancel()
        for s in self._tcp:
            with contextlib.suppress(Exception):
                await asyncio.wait_for(s.wait_closed(), 1)
        self._udp, self._tcp, self.listening, self.bound = [], [], [], []

    def _udp_ready(self, sock: socket.socket) -> None:
        """Drains up to BURST datagrams per wake-up: the hot path (a cached answer) is a dict look-up and a
        sendto, with no transport, protocol or task in between."""
        handle = self.answerer.handle
        for _ in range(BURST):
            try:
                data, addr = sock.recvfrom(65535)
            except (BlockingIOError, InterruptedError):
                return
            except OSError:
                continue
            self.queries += 1
            try:
                out = handle(data, True)
            except Exception:  # a bug in the core must not stop the resolver; the client retries
                log.exception("dns: query from %s", addr[0])
                continue
            if out is None:
                continue
            if isinstance(out, Reply):
                with contextlib.suppress(OSError):  # a full send buffer drops the answer, as UDP may
                    sock.sendto(out.data, addr)
                continue
            self.spawn_forward(out, sock, addr)

    def spawn_forward(self, fwd: Forward, sock: socket.socket, addr: tuple[str, int]) -> None:
        if len(self._tasks) >= MAX_INFLIGHT:
            with contextlib.suppress(OSError):
                sock.sendto(servfail(fwd.query), addr)
            return

        async def go() -> None:
            data = await self.resolve_forward(fwd)
            if sock.fileno() >= 0:
                with contextlib.suppress(OSError):
                    sock.sendto(fit_udp(data, fwd.query), addr)

        task = asyncio.create_task(go())
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    async def resolve_forward(self, fwd: Forward, tcp: bool = False) -> bytes:
        data = await forward(fwd, self.pool, self.timeout, tcp_first=tcp)
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
