"""The DERP relay: asyncio glue around derp.protocol (handshake), derp.registry (who is here), derp.scan (the
forwarding fast path) and derp.http.

Hot path. After the handshake every connection reads into ONE read buffer shared by the whole relay
(asyncio.BufferedProtocol: ``get_buffer`` hands it out, ``buffer_updated`` scans it at once), so reads can be large
(256 KiB by default) at no per-client memory cost. Correct because asyncio calls ``get_buffer``, ``recv_into`` and
``buffer_updated`` back to back for one connection, and everything that uses the buffer finishes inside
``buffer_updated``. What does not fit, an incomplete last frame, is copied out to the connection (``partial``) and
back in front of the next read; one of 16 KiB or more gets a buffer of its own (``big``) until it is complete, so a
large frame trickling in is not copied again and again. ``derp.scan`` rewrites SendPacket frames into RecvPacket
frames in place; every destination then gets one write per read. On a plain TCP transport with nothing buffered
that write goes from the read buffer straight to the socket (``os.write`` on its fd): no copy at all when the
kernel takes it whole; the rest, and everything on TLS or into a non-empty transport, is copied (``bytes``) first,
because asyncio (3.12+) keeps references to what it buffers.

Queues. Each client's transport buffer is capped (``write_high``); past it, asyncio pauses writing. For ``hold``
seconds (50 ms) after that the relay still writes to it, but stops reading each sender that does so until the
client catches up: bounded backpressure, so a reader that is merely slower than its sender gets everything, as over
a plain TCP forwarder, while a sender is never stalled for long by a reader that has stopped. After ``hold`` the
client counts as far behind and its frames wait in two per-client queues: disco packets
(``derp.scan.DISCO_MAGIC``) and the relay's own control frames in one, everything else in the other, each capped in
bytes and dropping its oldest entries (counted as ``disco_queue_full`` and ``queue_full``). The first drains first.
A client that stops reading therefore never blocks a sender or the other clients for more than ``hold``, and bulk
data never pushes out the disco packets that find a direct path.

Shutdown. ``close()`` sends every client a Restarting frame (reconnect in about a second, keep trying for ten)
before closing, so clients come back quickly to the restarted relay instead of backing off.
"""

from __future__ import annotations

import asyncio
import hmac
import ipaddress
import logging
import os
import random
import ssl as ssl_mod
from collections import deque
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass, field
from typing import Any, cast

from nacl.public import PrivateKey

from derp import frames, http
from derp.frames import FrameType
from derp.protocol import ClientAuthenticated, DerpConnection, Role
from derp.registry import Announce, Registry, SendHealth, SendPeerGone
from derp.scan import DISCO_MAGIC, Scanner, split_disco

log = logging.getLogger("derp.server")

Admit = Callable[[bytes, str], Awaitable[bool]]

_unpack_header = frames.HEADER.unpack_from
# An incomplete frame at least this long waits in a buffer of its own rather than being copied into every read.
_BIG = 16 << 10
# Transports known to write straight to a TCP socket (asyncio's, uvloop's): never TLS ones.
_PLAIN_TRANSPORTS = frozenset({"_SelectorSocketTransport", "TCPTransport"})


@dataclass
class Metrics:
    accepts: int = 0
    packets_forwarded: int = 0
    bytes_forwarded: int = 0
    packets_received: int = 0
    bytes_received: int = 0
    drops: dict[str, int] = field(
        default_factory=lambda: dict.fromkeys(
            ("queue_full", "disco_queue_full", "unknown_dest", "gone", "mesh_down", "write_error"), 0
        )
    )
    closes: dict[str, int] = field(
        default_factory=lambda: dict.fromkeys(
            (
                "bad_http", "handshake_timeout", "handshake_error", "forged_client_info", "admission_denied",
                "admission_error", "protocol_error", "not_mesh", "client_closed",
            ),
            0,
        )
    )

    def drop(self, reason: str, packets: int = 1) -> None:
        self.drops[reason] = self.drops.get(reason, 0) + packets

    def close(self, reason: str) -> None:
        self.closes[reason] = self.closes.get(reason, 0) + 1


class _Conn(asyncio.BufferedProtocol):
    """One client connection: HTTP head, then handshake, then the open DERP stream."""

    def __init__(self, server: DerpServer, *, http_mode: bool = True) -> None:
        self.server = server
        self.transport: asyncio.Transport | None = None
        # The socket's fd when the transport is a plain TCP one, for writing straight from the read buffer.
        self.fd = -1
        self.peer_ip = ""
        self.peer_port = 0
        self.mode = "http" if http_mode else "derp"
        self.key = b""
        self.conn: DerpConnection | None = None
        self.is_mesh = False
        self.preferred = False
        self.closed = False
        self.head = bytearray()
        # The incomplete frame at the end of the last read, and how much of it sits at the front of the shared
        # buffer handed out by get_buffer.
        self.partial = b""
        self.pend = 0
        self.big: bytearray | None = None
        self.big_have = 0
        self.write_paused = False
        # (frames, packets in them); disco and control frames go in ``prio``, which drains first.
        self.queue: deque[tuple[bytes, int]] = deque()
        self.prio: deque[tuple[bytes, int]] = deque()
        self.queued_bytes = 0
        self.prio_bytes = 0
        # Backpressure: when writing was paused; senders whose reading we paused for it (``held``); the receivers
        # that hold our reading (``holders``).
        self.paused_at = 0.0
        self.held: set[_Conn] = set()
        self.holders: set[_Conn] = set()
        self.hold_timer: asyncio.TimerHandle | None = None
        self.timer: asyncio.TimerHandle | None = None
        self.not_here_sent: dict[bytes, float] = {}
        self.admission: asyncio.Task[None] | None = None

    # asyncio callbacks

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        # Not isinstance(): uvloop's transports do not subclass asyncio.Transport.
        self.transport = cast(asyncio.Transport, transport)
        peer = transport.get_extra_info("peername")
        if isinstance(peer, tuple):
            self.peer_ip, self.peer_port = str(peer[0]), int(peer[1])
        self.transport.set_write_buffer_limits(high=self.server.write_high)
        sock = transport.get_extra_info("socket")
        if (
            type(transport).__name__ in _PLAIN_TRANSPORTS
            and transport.get_extra_info("sslcontext") is None
            and sock is not None
        ):
            self.fd = sock.fileno()
        self.server.conns.add(self)
        loop = asyncio.get_running_loop()
        self.timer = loop.call_later(self.server.handshake_timeout, self._handshake_expired)

    def get_buffer(self, sizehint: int) -> memoryview:
        big = self.big
        if big is not None:
            return memoryview(big)[self.big_have :]
        server = self.server
        p = self.partial
        if p:
            n = len(p)
            server.rbuf[:n] = p
            self.pend = n
            return server.rmv[n:]
        self.pend = 0
        return server.rmv

    def buffer_updated(self, nbytes: int) -> None:
        if self.mode == "open":
            big = self.big
            if big is None:
                self._process(self.server.rbuf, self.pend + nbytes)
                return
            self.big_have += nbytes
            if self.big_have == len(big):
                self.big = None
                self._process(big, len(big))
            return
        data = bytes(self.server.rmv[:nbytes])
        if self.mode == "http":
            self._http(data)
        elif self.mode == "derp":
            self._handshake(data)

    def eof_received(self) -> bool | None:
        return None

    def connection_lost(self, exc: Exception | None) -> None:
        if not self.closed:
            self.server.metrics.close("client_closed")
        self._teardown()

    def pause_writing(self) -> None:
        self.write_paused = True
        self.paused_at = asyncio.get_running_loop().time()

    def resume_writing(self) -> None:
        self.write_paused = False
        t = self.transport
        m = self.server.metrics
        for q in (self.prio, self.queue):
            while q and not self.write_paused and t is not None and not t.is_closing():
                data, n = q.popleft()
                if q is self.prio:
                    self.prio_bytes -= len(data)
                else:
                    self.queued_bytes -= len(data)
                t.write(data)
                m.packets_forwarded += n
                m.bytes_forwarded += len(data) if n else 0
        if not self.write_paused:
            self._release()

    # Backpressure, bounded: a sender whose destination has just fallen behind stops being read until the
    # destination catches up, but for ``server.hold`` seconds at most; after that the destination counts as far
    # behind and its packets are queued and dropped instead, so a dead reader never stalls a sender for long.

    def _hold(self, sender: _Conn) -> None:
        if sender in self.held or sender.closed or sender.transport is None:
            return
        self.held.add(sender)
        sender.holders.add(self)
        if len(sender.holders) == 1:
            sender.transport.pause_reading()
        if self.hold_timer is None:
            self.hold_timer = asyncio.get_running_loop().call_at(self.paused_at + self.server.hold, self._release)

    def _release(self) -> None:
        if self.hold_timer is not None:
            self.hold_timer.cancel()
            self.hold_timer = None
        held, self.held = self.held, set()
        for sender in held:
            sender.holders.discard(self)
            if not sender.holders and not sender.closed and sender.transport is not None:
                sender.transport.resume_reading()

    # HTTP

    def _http(self, data: bytes) -> None:
        self.head += data
        try:
            end = http.head_end(self.head)
            if end < 0:
                return
            req = http.parse_head(bytes(self.head[:end]))
        except http.HttpError as e:
            self._write(http.response(400, "Bad Request", [("Content-Type", "text/plain")], f"{e}\n".encode()))
            self.close("bad_http", str(e))
            return
        rest = bytes(self.head[end:])
        self.head = bytearray()
        if req.path == "/derp" and req.wants_derp and req.method == "GET":
            self.begin_derp(rest)
            return
        self._write(http.simple_response(req, self.server.http_extra()))
        assert self.transport is not None
        self.closed = True
        self.transport.close()

    # Handshake

    def begin_derp(self, leftover: bytes) -> None:
        """Answer the upgrade and start the DERP handshake (also the entry point for an embedding HTTP server)."""
        self.mode = "derp"
        self._write(http.upgrade_response(self.server.public_key))
        loop = asyncio.get_running_loop()
        self.conn = DerpConnection(Role.SERVER, self.server.private_key, now=loop.time())
        self._write(self.conn.data_to_send())
        if leftover:
            self._handshake(leftover)

    def _handshake(self, data: bytes) -> None:
        conn = self.conn
        assert conn is not None
        try:
            conn.receive_data(data)
            ev = conn.next_event()
        except frames.RemoteFrameError as e:
            reason = "forged_client_info" if "does not open" in str(e) else "handshake_error"
            self.close(reason, str(e))
            return
        if isinstance(ev, ClientAuthenticated):
            assert self.transport is not None
            self.transport.pause_reading()
            self.admission = asyncio.get_running_loop().create_task(self._admit(ev))

    async def _admit(self, ev: ClientAuthenticated) -> None:
        server = self.server
        is_mesh = bool(server.mesh_key_hex) and hmac.compare_digest(
            ev.info.mesh_key.lower().encode(), server.mesh_key_hex.encode()
        )
        if not is_mesh and server.admit is not None:
            try:
                ok = await asyncio.wait_for(server.admit(ev.key, self.peer_ip), server.admit_timeout)
            except Exception as e:
                if not self.closed:
                    self.close("admission_error", f"admission check failed: {e!r}")
                return
            if not ok:
                if not self.closed:
                    self.close("admission_denied", f"node key {ev.key.hex()} not admitted")
                return
        if self.closed:
            return
        self._open(ev.key, is_mesh, ev.info.can_ack_pings)

    def _open(self, key: bytes, is_mesh: bool, can_ack_pings: bool) -> None:
        conn, t, server = self.conn, self.transport, self.server
        assert conn is not None and t is not None
        self._write(conn.accept())
        leftover = bytearray(conn.take_buffered())
        self.key, self.is_mesh = key, is_mesh
        self.mode = "open"
        if self.timer is not None:
            self.timer.cancel()
        self._schedule_keepalive()
        server.metrics.accepts += 1
        server._run(server.registry.add(key, self))
        log.info("client %s connected from %s%s", key.hex()[:16], self.peer_ip, " (mesh)" if is_mesh else "")
        t.resume_reading()
        if leftover:
            self._process(leftover, len(leftover))

    def _handshake_expired(self) -> None:
        if self.mode != "open" and not self.closed:
            self.close("handshake_timeout", "handshake did not finish in time")

    def _schedule_keepalive(self) -> None:
        s = self.server
        self.timer = asyncio.get_running_loop().call_later(
            s.keepalive + random.uniform(0, s.keepalive_jitter), self._keepalive
        )

    def _keepalive(self) -> None:
        if not self.closed:
            self.deliver_control(frames.encode_keep_alive())
            self._schedule_keepalive()

    # The open stream

    def _process(self, buf: bytearray, end: int) -> None:
        server = self.server
        res = server.scanner.scan(buf, end, self.key)
        server.metrics.bytes_received += res.pos
        runs = res.runs
        if runs:
            mv = server.rmv if buf is server.rbuf else memoryview(buf)
            if len(runs) == 1:
                key, start, stop, n = runs[0]
                self._send_run(key, mv[start:stop], n)
            else:
                # Several destinations in one read: still one write each.
                groups: dict[bytes, tuple[list[memoryview], list[int]]] = {}
                for key, start, stop, n in runs:
                    g = groups.get(key)
                    if g is None:
                        groups[key] = ([mv[start:stop]], [n])
                    else:
                        g[0].append(mv[start:stop])
                        g[1].append(n)
                for key, (parts, counts) in groups.items():
                    self._send_run(key, b"".join(parts), sum(counts))
        for ftype, payload in res.controls:
            self._control(ftype, payload)
            if self.closed:
                return
        if res.error:
            self.close("protocol_error", res.error)
            return
        rest = end - res.pos
        if not rest:
            self.partial = b""
        elif rest < _BIG:
            self.partial = bytes(buf[res.pos : end])
        else:
            # scan() stopped at an incomplete frame whose length it checked; give it a buffer of its own.
            _, length = _unpack_header(buf, res.pos)
            big = bytearray(frames.HEADER_LEN + length)
            big[:rest] = buf[res.pos : end]
            self.big, self.big_have, self.partial = big, rest, b""

    def _send_run(self, key: bytes, data: bytes | memoryview, n: int) -> None:
        server = self.server
        server.metrics.packets_received += n
        dst = server.registry.active.get(key)
        if dst is not None:
            server.registry.note_sent(self.key, key)
            dst.deliver(data, n, self)
            return
        fwd = server.registry.forwarders.get(key)
        if fwd is not None:
            fwd.forward(self.key, key, data, n)
            server.registry.note_sent(self.key, key)
            return
        server.metrics.drop("unknown_dest", n)
        self._not_here(key)

    def _not_here(self, key: bytes) -> None:
        # Tell the sender at most once a second per destination that the peer is not on this relay.
        now = asyncio.get_running_loop().time()
        last = self.not_here_sent.get(key)
        if last is not None and now - last < 1.0:
            return
        if len(self.not_here_sent) > 1024:
            self.not_here_sent.clear()
        self.not_here_sent[key] = now
        self.deliver_control(frames.encode_peer_gone(key, frames.PeerGoneReason.NOT_HERE))

    def _control(self, ftype: int, payload: bytes) -> None:
        try:
            f = frames.decode(ftype, payload)
        except frames.RemoteFrameError as e:
            self.close("protocol_error", str(e))
            return
        server = self.server
        if isinstance(f, frames.NotePreferred):
            self.preferred = f.preferred
        elif isinstance(f, frames.Ping):
            self.deliver_control(frames.encode_pong(f.data))
        elif isinstance(f, frames.WatchConns | frames.ClosePeer | frames.ForwardPacket):
            if not self.is_mesh:
                self.close("not_mesh", f"{type(f).__name__} without the mesh key")
                return
            if isinstance(f, frames.WatchConns):
                server.watchers.add(self)
                for key, c in list(server.registry.active.items()):
                    if not c.is_mesh:
                        self.deliver_control(c.peer_present_frame(key))
            elif isinstance(f, frames.ClosePeer):
                for c in server.registry.connections(f.key):
                    c.close("client_closed", "closed by a mesh peer")
            else:
                dst = server.registry.active.get(f.dst)
                server.metrics.packets_received += 1
                if dst is None:
                    server.metrics.drop("unknown_dest")
                else:
                    dst.deliver(frames.encode_recv_packet(f.src, f.packet), 1)
        elif isinstance(f, frames.ServerKey | frames.ClientInfo | frames.ServerInfo | frames.RecvPacket):
            self.close("protocol_error", f"{type(f).__name__} from a client")
        # KeepAlive, Pong, Health, PeerGone, PeerPresent and unknown frames from a client are ignored.

    def peer_present_frame(self, key: bytes) -> bytes:
        try:
            ip = ipaddress.ip_address(self.peer_ip)
            raw = (ipaddress.IPv6Address(b"\0" * 10 + b"\xff\xff" + ip.packed) if ip.version == 4 else ip).packed
        except ValueError:
            raw = bytes(16)
        return frames.encode_peer_present(key, raw, self.peer_port, frames.PeerPresentFlags.REGULAR)

    # Output

    def _write(self, data: bytes) -> None:
        if self.transport is not None and not self.transport.is_closing() and data:
            self.transport.write(data)

    def deliver(self, data: bytes | memoryview, n: int, sender: _Conn | None = None) -> None:
        """Send ``n`` RecvPacket frames to this client: write now, or queue them (dropping the oldest) when the
        client is slow. A ``sender`` is held (not read) while this client has only just fallen behind.

        ``data`` may be a view of the shared read buffer: it is used before this returns, never kept.
        """
        t = self.transport
        if t is None or self.closed:
            self.server.metrics.drop("gone", n)
            return
        if not self.write_paused or (
            sender is not None
            and sender.mode == "open"
            and asyncio.get_running_loop().time() - self.paused_at < self.server.hold
        ):
            # Past the high-water mark by at most one read per sender: each such sender is then held.
            if type(data) is bytes:
                t.write(data)
            else:
                self._write_view(t, data)
            m = self.server.metrics
            m.packets_forwarded += n
            m.bytes_forwarded += len(data)
            if self.write_paused and sender is not None:
                self._hold(sender)
            return
        data = bytes(data)
        if DISCO_MAGIC in data:
            disco, data, n = split_disco(data)
            for f in disco:
                self._enqueue_prio(f, 1)
            if not n:
                return
        q = self.queue
        q.append((data, n))
        self.queued_bytes += len(data)
        limit = self.server.queue_bytes
        while self.queued_bytes > limit and len(q) > 1:
            old, k = q.popleft()
            self.queued_bytes -= len(old)
            self.server.metrics.drop("queue_full", k)

    def _write_view(self, t: asyncio.Transport, view: bytes | memoryview) -> None:
        # With nothing buffered in the transport, write the view to the socket ourselves: no copy at all when the
        # kernel takes it whole, which it usually does. Only the rest is copied into the transport, whose buffer
        # (a deque of views since Python 3.12) must never point into the shared read buffer.
        sent = 0
        if self.fd >= 0 and not t.is_closing() and not t.get_write_buffer_size():
            try:
                sent = os.write(self.fd, view)
            except OSError:
                sent = 0  # would block, or a broken socket: the transport finds out itself
        if sent < len(view):
            t.write(bytes(view[sent:]))

    def deliver_control(self, data: bytes) -> None:
        """Send a frame of the relay's own (Pong, PeerGone, Health, ...): ahead of queued data."""
        t = self.transport
        if t is None or self.closed:
            return
        if not self.write_paused:
            t.write(data)
            return
        self._enqueue_prio(data, 0)

    def _enqueue_prio(self, data: bytes, n: int) -> None:
        q = self.prio
        q.append((data, n))
        self.prio_bytes += len(data)
        limit = self.server.disco_queue_bytes
        while self.prio_bytes > limit and len(q) > 1:
            old, k = q.popleft()
            self.prio_bytes -= len(old)
            self.server.metrics.drop("disco_queue_full", max(k, 1))

    def close(self, reason: str, detail: str = "") -> None:
        if self.closed:
            return
        self.closed = True
        self.server.metrics.close(reason)
        if reason not in ("client_closed",):
            log.info("closing %s (%s): %s %s", self.peer_ip, self.key.hex()[:16] or "-", reason, detail)
        if self.transport is not None:
            self.transport.close()
        self._teardown()

    def _teardown(self) -> None:
        self.closed = True
        server = self.server
        server.conns.discard(self)
        server.watchers.discard(self)
        if self.timer is not None:
            self.timer.cancel()
            self.timer = None
        if self.admission is not None and not self.admission.done():
            self.admission.cancel()
        if self.queue or self.prio:
            server.metrics.drop("gone", sum(n for _, n in self.queue) + sum(n for _, n in self.prio))
            self.queue.clear()
            self.prio.clear()
            self.queued_bytes = self.prio_bytes = 0
        self.partial, self.big = b"", None
        self._release()
        for dst in list(self.holders):
            dst.held.discard(self)
        self.holders.clear()
        if self.mode == "open" and self.key:
            self.mode = "closed"
            server._run(server.registry.remove(self.key, self))


class DerpServer:
    """A DERP relay. Serve it standalone with ``serve()``, or hand it upgraded connections with ``upgrade()``.

    ``private_key`` is the relay's 32-byte Curve25519 key. ``admit(node_key, source_ip)`` decides whether a
    client may use the relay (None: everyone); it fails closed after ``admit_timeout`` seconds. Clients presenting
    ``mesh_key`` (32 bytes) are other relays of the region and are always admitted. ``queue_bytes`` and
    ``disco_queue_bytes`` cap each client's data and disco queues; ``hold`` bounds how long a sender is not read
    while a destination it sends to catches up (0 turns this backpressure off); ``read_buffer`` is the one read
    buffer all connections share.
    """

    def __init__(
        self,
        private_key: bytes,
        *,
        admit: Admit | None = None,
        admit_timeout: float = 5.0,
        mesh_key: bytes | None = None,
        mesh_with: Sequence[str] = (),
        queue_bytes: int = 64 << 10,
        disco_queue_bytes: int = 64 << 10,
        hold: float = 0.05,
        write_high: int = 256 << 10,
        read_buffer: int = 256 << 10,
        keepalive: float = frames.KEEPALIVE_INTERVAL,
        keepalive_jitter: float = 5.0,
        handshake_timeout: float = frames.HANDSHAKE_TIMEOUT,
        mesh_ssl: ssl_mod.SSLContext | None = None,
    ) -> None:
        if len(private_key) != frames.KEY_LEN:
            raise ValueError("relay private key must be 32 bytes")
        if mesh_key is not None and len(mesh_key) != 32:
            raise ValueError("mesh key must be 32 bytes")
        if read_buffer < 2 * (frames.MAX_FRAME_LEN + frames.HEADER_LEN):
            raise ValueError("read_buffer must hold two of the largest frames")
        self.private_key = bytes(private_key)
        self.public_key = bytes(PrivateKey(private_key).public_key)
        self.admit = admit
        self.admit_timeout = admit_timeout
        self.mesh_key_hex = mesh_key.hex() if mesh_key else ""
        self.mesh_with = list(mesh_with)
        self.mesh_ssl = mesh_ssl
        self.queue_bytes = queue_bytes
        self.disco_queue_bytes = disco_queue_bytes
        self.hold = hold
        self.write_high = write_high
        self.read_buffer = read_buffer
        self.rbuf = bytearray(read_buffer)
        self.rmv = memoryview(self.rbuf)
        self.scanner = Scanner()
        self.keepalive = keepalive
        self.keepalive_jitter = keepalive_jitter
        self.handshake_timeout = handshake_timeout
        self.metrics = Metrics()
        self.registry: Registry[_Conn, _MeshLink] = Registry()
        self.conns: set[_Conn] = set()
        self.watchers: set[_Conn] = set()
        self.mesh_links: list[_MeshLink] = []
        self._servers: list[asyncio.Server] = []
        self.stun: Any = None  # a derp.stunserver.StunServer, when the CLI runs one, for /metrics

    # Serving

    async def start(self) -> None:
        """Start mesh links (if any). ``serve()`` calls this; embedders call it once themselves."""
        if self.mesh_with and not self.mesh_links:
            if not self.mesh_key_hex:
                raise ValueError("meshing needs a mesh key")
            for url in self.mesh_with:
                link = _MeshLink(self, url)
                self.mesh_links.append(link)
                link.start()

    async def serve(self, host: str, port: int, ssl: ssl_mod.SSLContext | None = None) -> asyncio.Server:
        """Listen for HTTP(S) on ``host:port``: the DERP upgrade plus the probe, health and metrics paths."""
        await self.start()
        loop = asyncio.get_running_loop()
        srv = await loop.create_server(lambda: _Conn(self), host, port, ssl=ssl, backlog=1024)
        self._servers.append(srv)
        return srv

    def upgrade(self, transport: asyncio.Transport, leftover: bytes = b"") -> None:
        """Take over ``transport`` whose ``GET /derp`` + ``Upgrade: DERP`` request head was already read.

        Writes the 101 response itself, then runs the DERP handshake. ``leftover`` is whatever arrived after
        the request head.
        """
        conn = _Conn(self, http_mode=False)
        transport.set_protocol(conn)
        conn.connection_made(transport)
        conn.begin_derp(leftover)

    async def close(self, *, reconnect_in: float = 1.0, try_for: float = 10.0) -> None:
        """Stop listening and close every connection.

        Each admitted client first gets a Restarting frame: come back in ``reconnect_in`` seconds (smeared per
        client over its second half, so they do not all return at once), and keep trying for ``try_for`` seconds
        before falling back to normal back-off. ``reconnect_in < 0`` sends none (the relay is going away).
        """
        for srv in self._servers:
            srv.close()
        for link in self.mesh_links:
            await link.stop()
        self.mesh_links.clear()
        for c in list(self.conns):
            if reconnect_in >= 0 and c.mode == "open" and not c.closed:
                ms_in = int(1000 * reconnect_in * random.uniform(0.5, 1.0))
                # Straight to the transport, past any queue: close() flushes the transport, not our queues.
                c._write(frames.encode_restarting(ms_in, int(1000 * try_for)))
            c.close("client_closed", "relay shutting down")
        for srv in self._servers:
            await srv.wait_closed()
        self._servers.clear()

    # Actions from the registry

    def _run(self, actions: Sequence[Any]) -> None:
        for a in actions:
            if isinstance(a, SendHealth):
                a.conn.deliver_control(frames.encode_health(a.problem))
            elif isinstance(a, SendPeerGone):
                to = self.registry.active.get(a.to)
                if to is not None:
                    to.deliver_control(frames.encode_peer_gone(a.key, frames.PeerGoneReason.DISCONNECTED))
            elif isinstance(a, Announce):
                conn = self.registry.active.get(a.key)
                if conn is not None and conn.is_mesh:
                    continue
                if a.present:
                    assert conn is not None
                    data = conn.peer_present_frame(a.key)
                else:
                    data = frames.encode_peer_gone(a.key, frames.PeerGoneReason.DISCONNECTED)
                for w in list(self.watchers):
                    w.deliver_control(data)

    def remote_gone(self, key: bytes) -> None:
        """A key left a meshed relay and is not here either: tell whoever sent to it."""
        for sender in sorted(self.registry.senders.pop(key, ())):
            to = self.registry.active.get(sender)
            if to is not None:
                to.deliver_control(frames.encode_peer_gone(key, frames.PeerGoneReason.DISCONNECTED))

    # Observability

    def http_extra(self) -> dict[str, tuple[str, bytes]]:
        return {
            "/health": ("text/plain", b"ok\n"),
            "/metrics": ("text/plain; version=0.0.4", self.render_metrics().encode()),
            "/": ("text/plain", b"shoal-derp: a DERP relay. Clients connect to /derp.\n"),
        }

    def render_metrics(self) -> str:
        m = self.metrics
        open_conns = [c for c in self.conns if c.mode == "open"]
        lines = [
            "# HELP derp_clients Connected, admitted clients (mesh peers included).",
            "# TYPE derp_clients gauge",
            f"derp_clients {len(open_conns)}",
            "# HELP derp_clients_home Clients that said this relay is their home.",
            "# TYPE derp_clients_home gauge",
            f"derp_clients_home {sum(1 for c in open_conns if c.preferred)}",
            "# HELP derp_unique_keys Distinct node keys connected.",
            "# TYPE derp_unique_keys gauge",
            f"derp_unique_keys {len(self.registry)}",
            "# TYPE derp_accepts_total counter",
            f"derp_accepts_total {m.accepts}",
            "# HELP derp_packets_forwarded_total Packets written to a receiving client.",
            "# TYPE derp_packets_forwarded_total counter",
            f"derp_packets_forwarded_total {m.packets_forwarded}",
            "# TYPE derp_bytes_forwarded_total counter",
            f"derp_bytes_forwarded_total {m.bytes_forwarded}",
            "# TYPE derp_packets_received_total counter",
            f"derp_packets_received_total {m.packets_received}",
            "# TYPE derp_bytes_received_total counter",
            f"derp_bytes_received_total {m.bytes_received}",
            "# HELP derp_packets_dropped_total Packets dropped, by reason.",
            "# TYPE derp_packets_dropped_total counter",
        ]
        lines += [f'derp_packets_dropped_total{{reason="{r}"}} {n}' for r, n in sorted(m.drops.items())]
        lines += ["# HELP derp_closes_total Connections closed, by reason.", "# TYPE derp_closes_total counter"]
        lines += [f'derp_closes_total{{reason="{r}"}} {n}' for r, n in sorted(m.closes.items())]
        depths = [c.queued_bytes for c in open_conns]
        lines += [
            "# HELP derp_queue_bytes Bytes waiting in per-client queues.",
            "# TYPE derp_queue_bytes gauge",
            f"derp_queue_bytes {sum(depths)}",
            "# TYPE derp_queue_bytes_max gauge",
            f"derp_queue_bytes_max {max(depths, default=0)}",
            "# HELP derp_mesh_peers Meshed relays this relay is connected to.",
            "# TYPE derp_mesh_peers gauge",
            f"derp_mesh_peers {sum(1 for link in self.mesh_links if link.connected)}",
            "# TYPE derp_mesh_forwarded_keys gauge",
            f"derp_mesh_forwarded_keys {len(self.registry.forwarders)}",
        ]
        if self.stun is not None:
            st = self.stun.stats
            lines += [
                "# TYPE derp_stun_requests_total counter",
                f"derp_stun_requests_total {st.requests}",
                "# TYPE derp_stun_bad_total counter",
                f"derp_stun_bad_total {st.bad}",
            ]
        return "\n".join(lines) + "\n"


class _MeshLink:
    """This relay as a watching client of one other relay of the region."""

    def __init__(self, server: DerpServer, url: str) -> None:
        from derp.client import DerpClient

        self.server = server
        self.url = url
        self.connected = False
        self.client = DerpClient(
            url,
            server.private_key,
            mesh_key=bytes.fromhex(server.mesh_key_hex),
            watch_conns=True,
            on_event=self._on_event,
            ssl=server.mesh_ssl,
            skip_server_key=server.public_key,
        )

    def start(self) -> None:
        self.client.start()

    async def stop(self) -> None:
        await self.client.close()

    def forward(self, src: bytes, dst: bytes, data: bytes | memoryview, n: int) -> None:
        # The run was rewritten in place to RecvPacket(src, packet) frames; re-frame each as ForwardPacket.
        if not self.connected:
            self.server.metrics.drop("mesh_down", n)
            return
        out: list[bytes] = []
        pos = 0
        run = memoryview(data)
        total = len(run)
        while pos < total:
            _, length = _unpack_header(run, pos)
            pkt = run[pos + 37 : pos + 5 + length]
            out.append(frames.header(FrameType.FORWARD_PACKET, 64 + len(pkt)) + src + dst + pkt.tobytes())
            pos += 5 + length
        if self.client.send_raw(b"".join(out)):
            self.server.metrics.packets_forwarded += n
        else:
            self.server.metrics.drop("mesh_down", n)

    def _on_event(self, ev: Any) -> None:
        from derp.client import Connected, Disconnected

        reg = self.server.registry
        if isinstance(ev, Connected):
            self.connected = True
        elif isinstance(ev, Disconnected):
            self.connected = False
            for key in reg.remove_forwarders_of(self):
                if key not in reg.active:
                    self.server.remote_gone(key)
        elif isinstance(ev, frames.PeerPresent):
            if ev.key != self.server.public_key:
                reg.add_forwarder(ev.key, self)
        elif isinstance(ev, frames.PeerGone) and reg.remove_forwarder(ev.key, self):
            self.server.remote_gone(ev.key)
