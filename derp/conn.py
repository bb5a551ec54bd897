"""One relay connection: the asyncio protocol from the HTTP head through the handshake to the open DERP stream,
with the forwarding hot path, per-client queues and bounded backpressure. ``derp.server.DerpServer`` owns the
shared state (read buffer, registry, metrics) and makes a ``Conn`` per accepted socket.

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

Closing. Every close names a ``CloseReason``; a close caused by bad input takes it from the error's class
(``RemoteError.reason``: a handshake error, a forged ClientInfo, a mesh frame without the mesh key, ...).
"""

from __future__ import annotations

import asyncio
import hmac
import ipaddress
import logging
import os
import random
from collections import deque
from enum import StrEnum
from typing import TYPE_CHECKING, cast

from derp import frames, http
from derp.errors import CloseReason, RemoteError
from derp.metrics import DropReason
from derp.protocol import ClientAuthenticated, DerpConnection, Role
from derp.scan import DISCO_MAGIC, split_disco

if TYPE_CHECKING:
    from derp.server import DerpServer

log = logging.getLogger("derp.server")

_unpack_header = frames.HEADER.unpack_from
# An incomplete frame at least this long waits in a buffer of its own rather than being copied into every read.
_BIG = 16 << 10
# Transports known to write straight to a TCP socket (asyncio's, uvloop's): never TLS ones.
_PLAIN_TRANSPORTS = frozenset({"_SelectorSocketTransport", "TCPTransport"})


class Mode(StrEnum):
    """Where a connection is: its HTTP head, the DERP handshake (and admission), the open stream, or gone."""

    HTTP = "http"
    HANDSHAKE = "handshake"
    OPEN = "open"
    CLOSED = "closed"


class NotMesh(RemoteError):
    """A mesh-only frame (WatchConns, ClosePeer, ForwardPacket) from a client without the mesh key."""

    reason = CloseReason.NOT_MESH


# Bound once: looking a member up on an Enum class costs about 130 ns on Python 3.11, a module global about 20.
_HTTP, _HANDSHAKE, _OPEN = Mode.HTTP, Mode.HANDSHAKE, Mode.OPEN
_QUEUE_FULL, _DISCO_QUEUE_FULL = DropReason.QUEUE_FULL, DropReason.DISCO_QUEUE_FULL
_UNKNOWN_DEST, _GONE = DropReason.UNKNOWN_DEST, DropReason.GONE


class Conn(asyncio.BufferedProtocol):
    """One client connection: HTTP head, then handshake, then the open DERP stream."""

    def __init__(self, server: DerpServer, *, http_mode: bool = True) -> None:
        self.server = server
        self.transport: asyncio.Transport | None = None
        # The socket's fd when the transport is a plain TCP one, for writing straight from the read buffer.
        self.fd = -1
        self.peer_ip = ""
        self.peer_port = 0
        self.mode = Mode.HTTP if http_mode else Mode.HANDSHAKE
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
        self.held: set[Conn] = set()
        self.holders: set[Conn] = set()
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
        if self.mode is _OPEN:
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
        if self.mode is _HTTP:
            self._http(data)
        elif self.mode is _HANDSHAKE:
            self._handshake(data)

    def eof_received(self) -> bool | None:
        return None

    def connection_lost(self, exc: Exception | None) -> None:
        if not self.closed:
            self.server.metrics.close(CloseReason.CLIENT_CLOSED)
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

    def _hold(self, sender: Conn) -> None:
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
            self.write(http.response(400, "Bad Request", [("Content-Type", "text/plain")], f"{e}\n".encode()))
            self.close(e.reason, str(e))
            return
        rest = bytes(self.head[end:])
        self.head = bytearray()
        if req.path == "/derp" and req.wants_derp and req.method == "GET":
            self.begin_derp(rest)
            return
        self.write(http.simple_response(req, self.server.http_extra()))
        assert self.transport is not None
        self.closed = True
        self.transport.close()

    # Handshake

    def begin_derp(self, leftover: bytes) -> None:
        """Answer the upgrade and start the DERP handshake (also the entry point for an embedding HTTP server)."""
        self.mode = Mode.HANDSHAKE
        self.write(http.upgrade_response(self.server.public_key))
        loop = asyncio.get_running_loop()
        self.conn = DerpConnection(Role.SERVER, self.server.private_key, now=loop.time())
        self.write(self.conn.data_to_send())
        if leftover:
            self._handshake(leftover)

    def _handshake(self, data: bytes) -> None:
        conn = self.conn
        assert conn is not None
        try:
            conn.receive_data(data)
            ev = conn.next_event()
        except RemoteError as e:
            self.close(e.reason, str(e))
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
                    self.close(CloseReason.ADMISSION_ERROR, f"admission check failed: {e!r}")
                return
            if not ok:
                if not self.closed:
                    self.close(CloseReason.ADMISSION_DENIED, f"node key {ev.key.hex()} not admitted")
                return
        if self.closed:
            return
        self._open(ev.key, is_mesh, ev.info.can_ack_pings)

    def _open(self, key: bytes, is_mesh: bool, can_ack_pings: bool) -> None:
        conn, t, server = self.conn, self.transport, self.server
        assert conn is not None and t is not None
        self.write(conn.accept())
        leftover = bytearray(conn.take_buffered())
        self.key, self.is_mesh = key, is_mesh
        self.mode = Mode.OPEN
        if self.timer is not None:
            self.timer.cancel()
        self._schedule_keepalive()
        server.metrics.accepts += 1
        server.run_actions(server.registry.add(key, self))
        log.info("client %s connected from %s%s", key.hex()[:16], self.peer_ip, " (mesh)" if is_mesh else "")
        t.resume_reading()
        if leftover:
            self._process(leftover, len(leftover))

    def _handshake_expired(self) -> None:
        if self.mode is not _OPEN and not self.closed:
            self.close(CloseReason.HANDSHAKE_TIMEOUT, "handshake did not finish in time")

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
        try:
            for ftype, payload in res.controls:
                self._control(ftype, payload)
                if self.closed:
                    return
        except RemoteError as e:
            self.close(e.reason, str(e))
            return
        if res.error:
            self.close(CloseReason.PROTOCOL_ERROR, res.error)
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
        server.metrics.drop(_UNKNOWN_DEST, n)
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
        """Handle one frame other than SendPacket. Raises a RemoteError for a frame the client may not send."""
        f = frames.decode(ftype, payload)
        server = self.server
        if isinstance(f, frames.NotePreferred):
            self.preferred = f.preferred
        elif isinstance(f, frames.Ping):
            self.deliver_control(frames.encode_pong(f.data))
        elif isinstance(f, frames.WatchConns | frames.ClosePeer | frames.ForwardPacket):
            if not self.is_mesh:
                raise NotMesh(f"{type(f).__name__} without the mesh key")
            if isinstance(f, frames.WatchConns):
                server.watchers.add(self)
                for key, c in list(server.registry.active.items()):
                    if not c.is_mesh:
                        self.deliver_control(c.peer_present_frame(key))
            elif isinstance(f, frames.ClosePeer):
                for c in server.registry.connections(f.key):
                    c.close(CloseReason.CLIENT_CLOSED, "closed by a mesh peer")
            else:
                dst = server.registry.active.get(f.dst)
                server.metrics.packets_received += 1
                if dst is None:
                    server.metrics.drop(_UNKNOWN_DEST)
                else:
                    dst.deliver(frames.encode_recv_packet(f.src, f.packet), 1)
        elif isinstance(f, frames.ServerKey | frames.ClientInfo | frames.ServerInfo | frames.RecvPacket):
            raise frames.RemoteFrameError(f"{type(f).__name__} from a client")
        # KeepAlive, Pong, Health, PeerGone, PeerPresent and unknown frames from a client are ignored.

    def peer_present_frame(self, key: bytes) -> bytes:
        try:
            ip = ipaddress.ip_address(self.peer_ip)
            raw = (ipaddress.IPv6Address(b"\0" * 10 + b"\xff\xff" + ip.packed) if ip.version == 4 else ip).packed
        except ValueError:
            raw = bytes(16)
        return frames.encode_peer_present(key, raw, self.peer_port, frames.PeerPresentFlags.REGULAR)

    # Output

    def write(self, data: bytes) -> None:
        """Straight to the transport, past any queue."""
        if self.transport is not None and not self.transport.is_closing() and data:
            self.transport.write(data)

    def deliver(self, data: bytes | memoryview, n: int, sender: Conn | None = None) -> None:
        """Send ``n`` RecvPacket frames to this client: write now, or queue them (dropping the oldest) when the
        client is slow. A ``sender`` is held (not read) while this client has only just fallen behind.

        ``data`` may be a view of the shared read buffer: it is used before this returns, never kept.
        """
        t = self.transport
        if t is None or self.closed:
            self.server.metrics.drop(_GONE, n)
            return
        if not self.write_paused or (
            sender is not None
            and sender.mode is _OPEN
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
            self.server.metrics.drop(_QUEUE_FULL, k)

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
            self.server.metrics.drop(_DISCO_QUEUE_FULL, max(k, 1))

    def close(self, reason: CloseReason, detail: str = "") -> None:
        if self.closed:
            return
        self.closed = True
        self.server.metrics.close(reason)
        if reason is not CloseReason.CLIENT_CLOSED:
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
            server.metrics.drop(_GONE, sum(n for _, n in self.queue) + sum(n for _, n in self.prio))
            self.queue.clear()
            self.prio.clear()
            self.queued_bytes = self.prio_bytes = 0
        self.partial, self.big = b"", None
        self._release()
        for dst in list(self.holders):
            dst.held.discard(self)
        self.holders.clear()
        if self.mode is _OPEN and self.key:
            self.mode = Mode.CLOSED
            server.run_actions(server.registry.remove(self.key, self))
