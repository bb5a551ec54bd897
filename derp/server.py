"""The DERP relay: asyncio glue around derp.protocol (handshake), derp.registry (who is here), derp.scan (the
forwarding fast path) and derp.http.

Layout. ``DerpServer`` (here) holds what all connections share: the relay key and settings, the one read buffer,
the scanner, the registry, the metrics, the listeners; it carries out the registry's actions and shuts down.
``derp.conn.Conn`` is one connection (HTTP head, handshake, the open stream: the hot path, queues and
backpressure). ``derp.mesh.MeshLink`` is a link to another relay of the region. ``derp.metrics`` holds the
counters and renders ``/metrics``.

Shutdown. ``close()`` sends every client a Restarting frame (reconnect in about a second, keep trying for ten)
before closing, so clients come back quickly to the restarted relay instead of backing off.
"""

from __future__ import annotations

import asyncio
import random
import ssl as ssl_mod
from collections.abc import Awaitable, Callable, Sequence

from nacl.public import PrivateKey

from derp import frames, metrics
from derp.conn import Conn, Mode
from derp.errors import CloseReason, ConfigError
from derp.mesh import MeshLink
from derp.metrics import Gauges, Metrics, StunCounts
from derp.registry import Action, Announce, Registry, SendHealth, SendPeerGone
from derp.scan import Scanner
from derp.stunserver import StunServer

__all__ = ["Admit", "DerpServer", "Metrics"]  # Metrics: where it was before derp.metrics

Admit = Callable[[bytes, str], Awaitable[bool]]


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
            raise ConfigError("relay private key must be 32 bytes")
        if mesh_key is not None and len(mesh_key) != 32:
            raise ConfigError("mesh key must be 32 bytes")
        if read_buffer < 2 * (frames.MAX_FRAME_LEN + frames.HEADER_LEN):
            raise ConfigError("read_buffer must hold two of the largest frames")
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
        self.registry: Registry[Conn, MeshLink] = Registry()
        self.conns: set[Conn] = set()
        self.watchers: set[Conn] = set()
        self.mesh_links: list[MeshLink] = []
        self._servers: list[asyncio.Server] = []
        self.stun: StunServer | None = None  # when the CLI or shoal-server runs one: its counters go in /metrics

    # Serving

    async def start(self) -> None:
        """Start mesh links (if any). ``serve()`` calls this; embedders call it once themselves."""
        if self.mesh_with and not self.mesh_links:
            if not self.mesh_key_hex:
                raise ConfigError("meshing needs a mesh key")
            for url in self.mesh_with:
                link = MeshLink(self, url)
                self.mesh_links.append(link)
                link.start()

    async def serve(self, host: str, port: int, ssl: ssl_mod.SSLContext | None = None) -> asyncio.Server:
        """Listen for HTTP(S) on ``host:port``: the DERP upgrade plus the probe, health and metrics paths."""
        await self.start()
        loop = asyncio.get_running_loop()
        srv = await loop.create_server(lambda: Conn(self), host, port, ssl=ssl, backlog=1024)
        self._servers.append(srv)
        return srv

    def upgrade(self, transport: asyncio.Transport, leftover: bytes = b"") -> None:
        """Take over ``transport`` whose ``GET /derp`` + ``Upgrade: DERP`` request head was already read.

        Writes the 101 response itself, then runs the DERP handshake. ``leftover`` is whatever arrived after
        the request head.
        """
        conn = Conn(self, http_mode=False)
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
            if reconnect_in >= 0 and c.mode is Mode.OPEN and not c.closed:
                ms_in = int(1000 * reconnect_in * random.uniform(0.5, 1.0))
                # Straight to the transport, past any queue: close() flushes the transport, not our queues.
                c.write(frames.encode_restarting(ms_in, int(1000 * try_for)))
            c.close(CloseReason.CLIENT_CLOSED, "relay shutting down")
        for srv in self._servers:
            await srv.wait_closed()
        self._servers.clear()

    # Actions from the registry

    def run_actions(self, actions: Sequence[Action[Conn]]) -> None:
        """Carry out what the registry decided."""
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
            "/": ("text/plain", b"shoal-derp: a DERP relay. Clients connect to /derp.\n"),
        }

    def render_metrics(self) -> str:
        return metrics.render(*self.snapshot())

    def snapshot(self) -> tuple[Metrics, Gauges]:
        """The counters and the gauges now (``derp.metrics.RelayCollector`` reads them at each scrape)."""
        is_open = Mode.OPEN
        open_conns = [c for c in self.conns if c.mode is is_open]
        depths = [c.queued_bytes for c in open_conns]
        stun = None
        if self.stun is not None:
            stun = StunCounts(self.stun.stats.requests, self.stun.stats.bad)
        return (
            self.metrics,
            Gauges(
                clients=len(open_conns),
                clients_home=sum(1 for c in open_conns if c.preferred),
                unique_keys=len(self.registry),
                queue_bytes=sum(depths),
                queue_bytes_max=max(depths, default=0),
                mesh_peers=sum(1 for link in self.mesh_links if link.connected),
                mesh_forwarded_keys=len(self.registry.forwarders),
                stun=stun,
            ),
        )
