"""The DERP relay: asyncio glue around derp.protocol (handshake), derp.registry (who is here) and derp.http.

Hot path. After the handshake each connection reads straight into its own buffer (asyncio.BufferedProtocol, so a
read allocates nothing) and the whole read is scanned in one loop. A SendPacket and the RecvPacket it becomes are the
same size (1 type byte, 4 length bytes, 32 key bytes, packet), so the relay rewrites the frame in place: type 0x04
-> 0x05, destination key -> source key. Consecutive frames to one destination stay contiguous, so they leave as one
``bytes`` copy and one ``transport.write``: the per-frame cost is a header unpack, a key compare and two small
in-place stores; dict lookups and writes happen once per run of frames, not once per frame.

Queues. Each client's transport buffer is capped (``write_high``); past it, asyncio pauses writing and frames go to a
per-client queue capped at ``queue_bytes`` that drops its oldest entries (counted as ``queue_full``). A client that
stops reading therefore never blocks a sender or the other clients.
"""

from __future__ import annotations

import asyncio
import hmac
import ipaddress
import logging
import random
import ssl as ssl_mod
from collections import deque
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

from nacl.public import PrivateKey

from derp import frames, http
from derp.frames import FrameType
from derp.protocol import ClientAuthenticated, DerpConnection, Role
from derp.registry import Announce, Registry, SendHealth, SendPeerGone

log = logging.getLogger("derp.server")

Admit = Callable[[bytes, str], Awaitable[bool]]

_unpack_header = frames.HEADER.unpack_from
_SEND = int(FrameType.SEND_PACKET)
_RECV = int(FrameType.RECV_PACKET)
_MAX_SEND = frames.KEY_LEN + frames.MAX_PACKET_SIZE
_SMALL_BUF = 16 << 10
_RECV_BYTE = bytes([_RECV])
# Longer than any header prefix we compare, so it never matches.
_NO_MATCH = b"\xff" * 64


@dataclass
class Metrics:
    accepts: int = 0
    packets_forwarded: int = 0
    bytes_forwarded: int = 0
    packets_received: int = 0
    bytes_received: int = 0
    drops: dict[str, int] = field(
        default_factory=lambda: dict.fromkeys(
            ("queue_full", "unknown_dest", "gone", "mesh_down", "write_error"), 0
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
        self.peer_ip = ""
        self.peer_port = 0
        self.mode = "http" if http_mode else "derp"
        self.key = b""
        self.conn: DerpConnection | None = None
        self.is_mesh = False
        self.preferred = False
        self.closed = False
        self.head = bytearray()
        self.buf = bytearray(_SMALL_BUF)
        self.mv = memoryview(self.buf)
        self.start = 0
        self.end = 0
        self.write_paused = False
        self.queue: deque[tuple[bytes, int]] = deque()
        self.queued_bytes = 0
        self.timer: asyncio.TimerHandle | None = None
        self.not_here_sent: dict[bytes, float] = {}
        self.admission: asyncio.Task[None] | None = None

    # asyncio callbacks

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        assert isinstance(transport, asyncio.Transport)
        self.transport = transport
        peer = transport.get_extra_info("peername")
        if isinstance(peer, tuple):
            self.peer_ip, self.peer_port = str(peer[0]), int(peer[1])
        transport.set_write_buffer_limits(high=self.server.write_high)
        self.server.conns.add(self)
        loop = asyncio.get_running_loop()
        self.timer = loop.call_later(self.server.handshake_timeout, self._handshake_expired)

    def get_buffer(self, sizehint: int) -> memoryview:
        if self.mode == "open":
            return self.mv[self.end :]
        return self.mv

    def buffer_updated(self, nbytes: int) -> None:
        if self.mode == "open":
            self.end += nbytes
            self._process()
            return
        data = bytes(self.mv[:nbytes])
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

    def resume_writing(self) -> None:
        self.write_paused = False
        t = self.transport
        q = self.queue
        m = self.server.metrics
        while q and not self.write_paused and t is not None and not t.is_closing():
            data, n = q.popleft()
            self.queued_bytes -= len(data)
            t.write(data)
            m.packets_forwarded += n
            m.bytes_forwarded += len(data)

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
        leftover = conn.take_buffered()
        self.key, self.is_mesh = key, is_mesh
        self.buf = bytearray(server.read_buffer)
        self.mv = memoryview(self.buf)
        self.buf[: len(leftover)] = leftover
        self.start, self.end = 0, len(leftover)
        self.mode = "open"
        if self.timer is not None:
            self.timer.cancel()
        self._schedule_keepalive()
        server.metrics.accepts += 1
        server._run(server.registry.add(key, self))
        log.info("client %s connected from %s%s", key.hex()[:16], self.peer_ip, " (mesh)" if is_mesh else "")
        t.resume_reading()
        if self.end:
            self._process()

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

    def _process(self) -> None:
        buf = self.buf
        pos = self.start
        end = self.end
        src = self.key
        unpack = _unpack_header
        run_key = b""
        run_start = pos
        run_n = 0
        # Header (type, length, destination) of the previous SendPacket and what it was rewritten to: a stream
        # of equal-sized packets to one peer then costs one compare and one 37-byte store per frame.
        hdr = _NO_MATCH
        out = b""
        step = 0
        while end - pos >= 5:
            if buf.startswith(hdr, pos):
                fend = pos + step
                if fend > end:
                    break
                buf[pos : pos + 37] = out
                pos = fend
                run_n += 1
                continue
            ftype, length = unpack(buf, pos)
            fend = pos + 5 + length
            if ftype == _SEND and 32 <= length <= _MAX_SEND:
                if fend > end:
                    break
                if not (run_n and buf.startswith(run_key, pos + 5)):
                    if run_n:
                        self._flush(run_key, run_start, pos, run_n)
                    run_key = bytes(buf[pos + 5 : pos + 37])
                    run_start = pos
                    run_n = 0
                hdr = bytes(buf[pos : pos + 37])
                out = _RECV_BYTE + hdr[1:5] + src
                step = 5 + length
                buf[pos : pos + 37] = out
                pos = fend
                run_n += 1
                continue
            if run_n:
                self._flush(run_key, run_start, pos, run_n)
                run_n = 0
                hdr = _NO_MATCH
            if length > frames.MAX_FRAME_LEN or ftype == _SEND:
                self.close("protocol_error", f"frame type 0x{ftype:02x} with bad length {length}")
                return
            if fend > end:
                break
            self._control(ftype, bytes(buf[pos + 5 : fend]))
            pos = fend
            if self.closed:
                return
        if run_n:
            self._flush(run_key, run_start, pos, run_n)
        self.server.metrics.bytes_received += pos - self.start
        if pos == end:
            self.start = self.end = 0
        else:
            self.start = pos
            if len(buf) - end < frames.MAX_FRAME_LEN + frames.HEADER_LEN:
                # Keep room for the largest frame: slide the partial frame to the front.
                n = end - pos
                buf[:n] = bytes(self.mv[pos:end])
                self.start, self.end = 0, n

    def _flush(self, key: bytes, start: int, stop: int, n: int) -> None:
        server = self.server
        m = server.metrics
        m.packets_received += n
        dst = server.registry.active.get(key)
        if dst is not None:
            server.registry.note_sent(self.key, key)
            dst.deliver(self.mv[start:stop].tobytes(), n)
            return
        fwd = server.registry.forwarders.get(key)
        if fwd is not None:
            fwd.forward(self.key, key, self.mv[start:stop], n)
            server.registry.note_sent(self.key, key)
            return
        m.drop("unknown_dest", n)
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

    def deliver(self, data: bytes, n: int) -> None:
        """Queue frames to this client: write now, or queue and drop the oldest when the client is slow."""
        t = self.transport
        if t is None or self.closed:
            self.server.metrics.drop("gone", n)
            return
        if not self.write_paused:
            t.write(data)
            m = self.server.metrics
            m.packets_forwarded += n
            m.bytes_forwarded += len(data)
            return
        q = self.queue
        q.append((data, n))
        self.queued_bytes += len(data)
        limit = self.server.queue_bytes
        while self.queued_bytes > limit and len(q) > 1:
            old, k = q.popleft()
            self.queued_bytes -= len(old)
            self.server.metrics.drop("queue_full", k)

    def deliver_control(self, data: bytes) -> None:
        if self.transport is not None and not self.closed:
            self.deliver(data, 0)

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
        if self.queue:
            server.metrics.drop("gone", sum(n for _, n in self.queue))
            self.queue.clear()
            self.queued_bytes = 0
        if self.mode == "open" and self.key:
            self.mode = "closed"
            server._run(server.registry.remove(self.key, self))


class DerpServer:
    """A DERP relay. Serve it standalone with ``serve()``, or hand it upgraded connections with ``upgrade()``.

    ``private_key`` is the relay's 32-byte Curve25519 key. ``admit(node_key, source_ip)`` decides whether a
    client may use the relay (None: everyone); it fails closed after ``admit_timeout`` seconds. Clients presenting
    ``mesh_key`` (32 bytes) are other relays of the region and are always admitted.
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
        self.write_high = write_high
        self.read_buffer = read_buffer
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

    async def close(self) -> None:
        for srv in self._servers:
            srv.close()
        for link in self.mesh_links:
            await link.stop()
        self.mesh_links.clear()
        for c in list(self.conns):
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

    def forward(self, src: bytes, dst: bytes, run: memoryview, n: int) -> None:
        # The run was rewritten in place to RecvPacket(src, packet) frames; re-frame each as ForwardPacket.
        if not self.connected:
            self.server.metrics.drop("mesh_down", n)
            return
        out: list[bytes] = []
        pos = 0
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
