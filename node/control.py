"""The node's control client: sealed register and map requests, and the map stream (formats in coord/wire/).

`login` and `poll` give typed answers, parsed where they are read (a malformed one raises WireError);
`register` and `stream` give the JSON the server sent, for tools and the server's tests."""

from __future__ import annotations

import asyncio
import contextlib
import os
import ssl
import time
from collections.abc import AsyncGenerator, Callable, Iterable
from dataclasses import dataclass, field
from typing import Any

import anyio.abc
import httpcore
import httpx
from httpcore._backends.anyio import AnyIOStream
from nacl.public import Box

from coord import wire
from node import sockmark
from node.errors import RemoteError


class ControlError(RemoteError):
    """The server refused a request (``status`` is its HTTP status) or could not be reached (status 0)."""

    def __init__(self, status: int, message: str) -> None:
        super().__init__(message if status == 0 else f"{message} (HTTP {status})")
        self.status = status
        self.message = message


class PinMismatch(RemoteError):
    """The server presents a key other than the pinned one (or none is pinned yet)."""


class _MarkedBackend(httpcore.AsyncNetworkBackend):
    """httpcore's TCP connect with SO_MARK set *before* connect. httpx's `socket_options` are applied after
    the connection is made (httpcore/_backends/anyio.py), so the SYN would go out unmarked: with an exit node
    it would be routed into the tunnel while the rest of the connection bypasses it."""

    def __init__(self, mark: int) -> None:
        self.mark = mark
        self.inner = httpcore.AnyIOBackend()

    async def connect_tcp(self, host: str, port: int, timeout: float | None = None,
                          local_address: str | None = None,
                          socket_options: Iterable[Any] | None = None) -> httpcore.AsyncNetworkStream:
        try:
            async with asyncio.timeout(timeout):
                sock = await sockmark.connect_tcp(host, port, self.mark)
        except TimeoutError:
            raise httpcore.ConnectTimeout(f"connecting to {host}:{port} timed out") from None
        except OSError as e:
            raise httpcore.ConnectError(str(e)) from None
        for opt in socket_options or ():
            sock.setsockopt(*opt)
        stream = await anyio.abc.SocketStream.from_socket(sock)
        return AnyIOStream(stream)

    async def connect_unix_socket(self, path: str, timeout: float | None = None,
                                  socket_options: Iterable[Any] | None = None) -> httpcore.AsyncNetworkStream:
        return await self.inner.connect_unix_socket(path, timeout, socket_options)

    async def sleep(self, seconds: float) -> None:
        await self.inner.sleep(seconds)


def marked_transport(verify: ssl.SSLContext | bool, mark: int) -> httpx.AsyncHTTPTransport:
    """An httpx transport whose every connection carries `mark` from its first packet."""
    t = httpx.AsyncHTTPTransport(verify=verify)
    t._pool = httpcore.AsyncConnectionPool(ssl_context=t._pool._ssl_context,
                                           network_backend=_MarkedBackend(mark))
    return t


@dataclass
class ControlClient:
    server_url: str
    machine_private: bytes
    machine_public: bytes
    server_public: bytes | None = None
    clock: Callable[[], float] = time.time
    timeout: float = 30.0
    transport: httpx.AsyncBaseTransport | None = None
    ca_file: str = ""  # PEM CA bundle an https server's certificate must chain to ("" = the system store)
    fwmark: int = 0  # SO_MARK on every connection (node/sockmark.py: the exit-node bypass); 0 = none
    _client: httpx.AsyncClient | None = field(default=None, repr=False)

    def _http(self) -> httpx.AsyncClient:
        if self._client is None:
            verify: ssl.SSLContext | bool = True
            if self.ca_file:
                try:
                    verify = ssl.create_default_context(cafile=self.ca_file)
                except (OSError, ssl.SSLError) as e:
                    raise ControlError(0, f"CA file {self.ca_file}: {e}") from None
            transport = self.transport
            if transport is None and self.fwmark:
                transport = marked_transport(verify, self.fwmark)
            self._client = httpx.AsyncClient(
                base_url=self.server_url.rstrip("/"),
                timeout=httpx.Timeout(self.timeout, read=None),
                transport=transport,
                verify=verify,
            )
        return self._client

    async def close(self) -> None:
        if self._client is not None:
            await self._client.aclose()
            self._client = None

    async def fetch_server_key(self) -> bytes:
        try:
            r = await self._http().get("/key", timeout=self.timeout)
        except httpx.HTTPError as e:
            raise ControlError(0, f"cannot reach {self.server_url}: {e.__class__.__name__}: {e}") from None
        if r.status_code != 200:
            raise ControlError(r.status_code, "GET /key failed")
        try:
            key = wire.parse_key(r.json().get("publicKey"), "mkey", "publicKey")
        except (ValueError, AttributeError) as e:
            raise ControlError(r.status_code, f"bad /key answer: {e}") from None
        return key

    async def pin(self) -> bytes:
        """Pins the server key on first contact; afterwards refuses a server that presents another."""
        key = await self.fetch_server_key()
        if self.server_public is None:
            self.server_public = key
        elif key != self.server_public:
            raise PinMismatch(
                f"{self.server_url} presents server key {wire.key_text('mkey', key)}, but this node pinned "
                f"{wire.key_text('mkey', self.server_public)}; refusing to talk to it (a different server, or "
                "someone in between)"
            )
        return key

    def _box(self) -> Box:
        if self.server_public is None:
            raise PinMismatch("no server key pinned yet")
        return wire.make_box(self.machine_private, self.server_public)

    def _seal(self, body: dict[str, Any]) -> tuple[str, bytes, Box]:
        box = self._box()
        rid = os.urandom(16).hex()
        return rid, wire.seal_request(box, body, now=self.clock(), request_id=rid, nonce=os.urandom(24)), box

    def _path(self, what: str) -> str:
        return f"/machine/{self.machine_public.hex()}/{what}"

    async def _post(self, what: str, body: dict[str, Any], timeout: float | None = None) -> dict[str, Any]:
        rid, sealed, box = self._seal(body)
        try:
            r = await self._http().post(self._path(what), content=sealed, timeout=timeout or self.timeout)
        except httpx.HTTPError as e:
            raise ControlError(0, f"cannot reach {self.server_url}: {e.__class__.__name__}: {e}") from None
        if r.status_code != 200:
            raise ControlError(r.status_code, r.text.strip() or "request failed")
        return wire.open_response(box, r.content, rid)

    async def register(self, req: wire.RegisterRequest) -> dict[str, Any]:
        # A followup is held open by the server until an admin approves, up to a minute.
        return await self._post("register", req.to_json(), timeout=90 if req.followup else None)

    async def login(self, req: wire.RegisterRequest) -> wire.RegisterResponse:
        """Register (or, with an expiry in the past, log out); the server's typed answer."""
        return wire.RegisterResponse.from_json(await self.register(req))

    async def update(self, req: wire.MapRequest) -> None:
        await self._post("map", req.to_json())

    async def poll(self, req: wire.MapRequest) -> AsyncGenerator[wire.MapResponse, None]:
        """The typed MapResponses of a long poll, in order (see `stream`)."""
        async with contextlib.aclosing(self.stream(req)) as frames:
            async for msg in frames:
                yield wire.MapResponse.from_json(msg)

    async def stream(self, req: wire.MapRequest) -> AsyncGenerator[dict[str, Any], None]:
        """MapResponses of a long poll, in order; raises ControlError or WireError when it breaks."""
        rid, sealed, box = self._seal(req.to_json())
        reader = wire.FrameReader(box, rid)
        try:
            async with self._http().stream("POST", self._path("map"), content=sealed) as r:
                if r.status_code != 200:
                    text = (await r.aread()).decode(errors="replace").strip()
                    raise ControlError(r.status_code, text or "map request failed")
                async for chunk in r.aiter_raw():
                    for msg in reader.feed(chunk):
                        yield msg
        except httpx.HTTPError as e:
            raise ControlError(0, f"map stream to {self.server_url} broke: {e.__class__.__name__}: {e}") from None
        raise ControlError(0, "map stream ended")
