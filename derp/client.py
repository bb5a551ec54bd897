"""DERP client: one relay, kept connected with back-off, for the node agent and for relay meshing.

    client = DerpClient("http://relay.example:8080/derp", node_private_key)
    client.start()
    await client.wait_connected(5)
    client.note_preferred(True)            # remembered and re-sent after every reconnect
    client.send(peer_public_key, packet)   # False when not connected or too far behind: the packet is dropped
    ev = await client.recv()               # frames.RecvPacket, frames.PeerGone, frames.Health, Connected, ...
    rtt = await client.ping()
    await client.close()

Sending never blocks: DERP carries datagrams, and a stale packet is worth less than a fresh one.

Reconnecting: jittered exponential back-off from ``backoff_min`` to ``backoff_max``. A Restarting frame from the
relay (reconnect in R ms, try for T ms) overrides it once: the next attempt waits R, and failed attempts within the
following T are retried every quarter second at most, so the client is back as soon as the restarted relay is;
after T the normal back-off resumes.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import random
import socket
import ssl as ssl_mod
from collections.abc import Callable
from dataclasses import dataclass
from urllib.parse import urlsplit

from derp import frames, http
from derp.errors import ConfigError, DerpError, RemoteError
from derp.protocol import ClientInfoJSON, DerpConnection, Role
from derp.protocol import Connected as _HandshakeDone

log = logging.getLogger("derp.client")

# Retry interval while a Restarting frame's try-for window is open.
_RESTART_RETRY = 0.25


@dataclass(frozen=True, slots=True)
class Connected:
    server_key: bytes


@dataclass(frozen=True, slots=True)
class Disconnected:
    reason: str


ClientEvent = frames.Frame | Connected | Disconnected


class RelayRefused(RemoteError, ConnectionError):
    """The relay did not answer as a DERP relay (no 101, or a ServerKey other than the one it advertised)."""


class _Stop(DerpError):
    """Do not reconnect (e.g. a mesh link that dialled its own relay)."""


class DerpClient:
    def __init__(
        self,
        url: str,
        private_key: bytes,
        *,
        mesh_key: bytes | None = None,
        watch_conns: bool = False,
        on_event: Callable[[ClientEvent], None] | None = None,
        ssl: ssl_mod.SSLContext | None = None,
        preferred: bool = False,
        backoff_min: float = 0.1,
        backoff_max: float = 10.0,
        connect_timeout: float = 10.0,
        read_timeout: float = 120.0,
        queue_size: int = 4096,
        max_write_buffer: int = 1 << 20,
        skip_server_key: bytes | None = None,
        fwmark: int = 0,
    ) -> None:
        u = urlsplit(url)
        if u.scheme not in ("http", "https") or not u.hostname:
            raise ConfigError(f"relay URL must be http://host[:port]/derp or https://..., got {url!r}")
        if mesh_key is not None and len(mesh_key) != 32:
            raise ConfigError("mesh key must be 32 bytes")
        self.url = url
        self.fwmark = fwmark  # SO_MARK on the TCP socket, set before connect (the agent's exit-node bypass)
        self.host = u.hostname
        self.port = u.port or (443 if u.scheme == "https" else 80)
        self.path = u.path or "/derp"
        self.tls = u.scheme == "https"
        self.ssl = ssl if ssl is not None else (ssl_mod.create_default_context() if self.tls else None)
        self.private_key = bytes(private_key)
        self.info = ClientInfoJSON(mesh_key=mesh_key.hex() if mesh_key else "", can_ack_pings=True)
        self.public_key = DerpConnection(Role.CLIENT, self.private_key).public_key
        self.watch_conns = watch_conns
        self.on_event = on_event
        self.preferred = preferred
        self.backoff_min, self.backoff_max = backoff_min, backoff_max
        self.connect_timeout, self.read_timeout = connect_timeout, read_timeout
        self.max_write_buffer = max_write_buffer
        self.skip_server_key = skip_server_key
        self.server_key: bytes | None = None
        self.connects = 0
        self.dropped = 0
        self._queue: asyncio.Queue[ClientEvent] = asyncio.Queue(queue_size)
        self._writer: asyncio.StreamWriter | None = None
        self._task: asyncio.Task[None] | None = None
        self._connected = asyncio.Event()
        self._pings: dict[bytes, asyncio.Future[None]] = {}
        # From a Restarting frame, in loop time: first retry at, keep retrying quickly until.
        self._restart_at: float | None = None
        self._restart_until = 0.0
        self._closing = False

    @property
    def connected(self) -> bool:
        return self._writer is not None

    def start(self) -> None:
        if self._task is None:
            self._task = asyncio.get_running_loop().create_task(self._run())

    async def close(self) -> None:
        # The flag as well as the cancel: asyncio.wait_for on 3.11 can swallow a cancel that races a result.
        self._closing = True
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task
            self._task = None
        self._drop_writer()

    async def __aenter__(self) -> DerpClient:
        self.start()
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.close()

    async def wait_connected(self, timeout: float | None = None) -> None:
        await asyncio.wait_for(self._connected.wait(), timeout)

    # Sending

    def send(self, dst: bytes, packet: bytes) -> bool:
        return self.send_raw(frames.encode_send_packet(dst, packet))

    def send_raw(self, data: bytes) -> bool:
        """Write pre-encoded frames. False (and counted in ``dropped``) when disconnected or backed up."""
        w = self._writer
        if w is None or w.transport.is_closing() or w.transport.get_write_buffer_size() > self.max_write_buffer:
            self.dropped += 1
            return False
        w.write(data)
        return True

    def note_preferred(self, preferred: bool) -> None:
        self.preferred = preferred
        self.send_raw(frames.encode_note_preferred(preferred))

    async def ping(self, timeout: float = 5.0) -> float:
        """Round-trip time of a Ping to the relay, in seconds."""
        data = os.urandom(8)
        fut: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        self._pings[data] = fut
        loop = asyncio.get_running_loop()
        t0 = loop.time()
        try:
            if not self.send_raw(frames.encode_ping(data)):
                raise ConnectionError("not connected to the relay")
            await asyncio.wait_for(fut, timeout)
        finally:
            self._pings.pop(data, None)
        return loop.time() - t0

    # Receiving

    async def recv(self) -> ClientEvent:
        return await self._queue.get()

    def _emit(self, ev: ClientEvent) -> None:
        if self.on_event is not None:
            self.on_event(ev)
            return
        if self._queue.full():
            self._queue.get_nowait()
            self.dropped += 1
        self._queue.put_nowait(ev)

    # Connection loop

    async def _run(self) -> None:
        delay = self.backoff_min
        while not self._closing:
            reason = ""
            try:
                await self._session()
            except _Stop as e:
                log.info("derp %s: %s; not reconnecting", self.url, e)
                return
            except (OSError, EOFError, TimeoutError, ValueError, frames.FrameError, asyncio.IncompleteReadError) as e:
                reason = f"{type(e).__name__}: {e}"
            was_connected = self._writer is not None
            self._drop_writer()
            if was_connected:
                self._emit(Disconnected(reason or "connection closed"))
                delay = self.backoff_min
            now = asyncio.get_running_loop().time()
            if self._restart_at is not None and now < self._restart_until:
                wait = max(self._restart_at - now, min(self.backoff_min, _RESTART_RETRY))
                self._restart_at = now  # later failures in the window retry at the short interval
                delay = self.backoff_min
            else:
                self._restart_at = None
                wait = delay * random.uniform(0.8, 1.2)
                delay = min(delay * 2, self.backoff_max)
            log.debug("derp %s: %s; retrying in %.2fs", self.url, reason, wait)
            await asyncio.sleep(wait)

    def _drop_writer(self) -> None:
        w, self._writer = self._writer, None
        self._connected.clear()
        if w is not None:
            w.close()
        for fut in self._pings.values():
            if not fut.done():
                fut.set_exception(ConnectionError("relay connection lost"))

    async def _session(self) -> None:
        reader, writer = await asyncio.wait_for(self._open(), self.connect_timeout)
        try:
            await self._talk(reader, writer)
        finally:
            if self._writer is None:
                writer.close()

    async def _open(self) -> tuple[asyncio.StreamReader, asyncio.StreamWriter]:
        hostname = self.host if self.tls else None
        if not self.fwmark:
            return await asyncio.open_connection(self.host, self.port, ssl=self.ssl, server_hostname=hostname,
                                                 limit=1 << 20)
        # the mark must be on the socket before connect, so the SYN is routed by it
        loop = asyncio.get_running_loop()
        infos = await loop.getaddrinfo(self.host, self.port, type=socket.SOCK_STREAM)
        err: OSError = OSError(f"cannot resolve {self.host}")
        for family, kind, proto, _, addr in infos:
            sock = socket.socket(family, kind, proto)
            try:
                sock.setsockopt(socket.SOL_SOCKET, socket.SO_MARK, self.fwmark)
                sock.setblocking(False)
                await loop.sock_connect(sock, addr)
            except OSError as e:
                sock.close()
                err = e
                continue
            return await asyncio.open_connection(sock=sock, ssl=self.ssl, server_hostname=hostname, limit=1 << 20)
        raise err

    async def _talk(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        host = self.host if self.port in (80, 443) else f"{self.host}:{self.port}"
        writer.write(
            f"GET {self.path} HTTP/1.1\r\nHost: {host}\r\nUpgrade: DERP\r\nConnection: Upgrade\r\n"
            f"Derp-Version: 2\r\nUser-Agent: shoal-derp-client\r\n\r\n".encode()
        )
        head = await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), self.connect_timeout)
        status = head.split(b" ", 2)
        if len(status) < 2 or status[1] != b"101":
            first = head.split(b"\r\n", 1)[0]
            raise RelayRefused(f"relay answered {first!r} to the DERP upgrade")
        req = http.parse_head(b"GET / HTTP/1.1\r\n" + head.split(b"\r\n", 1)[1])
        loop = asyncio.get_running_loop()
        conn = DerpConnection(Role.CLIENT, self.private_key, now=loop.time(), client_info=self.info)
        advertised = req.header("derp-public-key")
        while True:
            data = await asyncio.wait_for(reader.read(1 << 18), self.read_timeout)
            if not data:
                raise EOFError("relay closed the connection")
            conn.receive_data(data)
            while True:
                ev = conn.next_event()
                if not isinstance(ev, frames.Frame | _HandshakeDone):
                    break
                self._handle(ev, writer, advertised)
            out = conn.data_to_send()
            if out:
                writer.write(out)

    def _handle(self, ev: frames.Frame | _HandshakeDone, writer: asyncio.StreamWriter, advertised: str) -> None:
        if isinstance(ev, frames.ServerKey):
            if advertised and advertised.lower() != ev.key.hex():
                raise RelayRefused("ServerKey does not match the Derp-Public-Key header")
            if self.skip_server_key is not None and ev.key == self.skip_server_key:
                raise _Stop("this URL is the local relay itself")
            self.server_key = ev.key
        elif isinstance(ev, _HandshakeDone):
            self._writer = writer
            self.connects += 1
            if self.preferred:
                writer.write(frames.encode_note_preferred(True))
            if self.watch_conns:
                writer.write(frames.encode_watch_conns())
            self._connected.set()
            self._emit(Connected(ev.server_key))
        elif isinstance(ev, frames.Ping):
            writer.write(frames.encode_pong(ev.data))
        elif isinstance(ev, frames.Pong):
            fut = self._pings.get(ev.data)
            if fut is not None and not fut.done():
                fut.set_result(None)
        elif isinstance(ev, frames.KeepAlive):
            pass
        elif isinstance(ev, frames.Restarting):
            now = asyncio.get_running_loop().time()
            self._restart_at = now + ev.reconnect_in_ms / 1000
            self._restart_until = self._restart_at + ev.try_for_ms / 1000
            self._emit(ev)
        else:
            self._emit(ev)

