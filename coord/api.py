"""The HTTP endpoints: parse -> call the service (or logins, the fan-out) -> respond. No SQL, no state of their own.

Public routes (the control protocol is documented in coord/wire.py):
    GET  /key                          server public key (pinned by nodes)
    POST /machine/<mkey hex>/register  sealed RegisterRequest -> sealed RegisterResponse
    POST /machine/<mkey hex>/map       sealed MapRequest -> sealed response, or a stream of sealed frames
    GET  /register/<id>                the page a login URL opens (without sign-in: how an admin approves)
    GET  /login/<token>, /oidc/...     sign-in with OpenID Connect, when configured (coord/auth/web.py)
    POST /derp/admit                   {"NodePublic": "nodekey:..", "Source": ip} -> {"Allow": bool}, for relays
    GET  /health                       {"ok", "nodes", "sessions", "refused": <requests refused by the limits>}
Registrations that hold no auth key (or a wrong one) are rate-limited per source (coord/logins.py); a source
whose bucket is empty is answered 429 before its request is opened. coord/limits.py says what a source is.
Admin route (served by coord/serve.py on ``<data dir>/admin.sock``, mode 0600): POST /admin {"command", "args"}.
"""

from __future__ import annotations

import html
import json
import logging
import os
from collections import OrderedDict
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass, field

from nacl.exceptions import CryptoError
from nacl.public import Box, PrivateKey, PublicKey
from starlette.requests import Request
from starlette.responses import HTMLResponse, JSONResponse, PlainTextResponse, Response, StreamingResponse
from starlette.routing import Route

from coord import admin, wire
from coord.errors import DomainError
from coord.lifecycle import Lifecycle
from coord.limits import IPNetwork, Refusals, client_address, source_key
from coord.logins import Logins, active_node_key, node_for_map
from coord.poll import Poll
from coord.service import Service

log = logging.getLogger("shoal.server")

BOX_CACHE = 20_000
STREAM_SLICE = 32 << 10


@dataclass
class Boxes:
    """NaCl boxes per machine key: computing the shared key costs more than sealing a small message."""

    private: PrivateKey
    cache: OrderedDict[bytes, Box] = field(default_factory=OrderedDict)

    def get(self, machine_key: bytes) -> Box:
        box = self.cache.get(machine_key)
        if box is None:
            try:
                box = Box(self.private, PublicKey(machine_key))
            except CryptoError:
                # Low-order points (all zeros, ...) give no shared key; libsodium refuses them.
                raise wire.WireError("machine key in URL: not a usable Curve25519 public key") from None
            self.cache[machine_key] = box
            if len(self.cache) > BOX_CACHE:
                self.cache.popitem(last=False)
        return box


async def read_body(request: Request, limit: int) -> bytes:
    length = request.headers.get("content-length")
    if length is not None and (not length.isdigit() or int(length) > limit):
        raise wire.WireError(f"request body over {limit} bytes")
    chunks, size = [], 0
    async for chunk in request.stream():
        size += len(chunk)
        if size > limit:
            raise wire.WireError(f"request body over {limit} bytes")
        chunks.append(chunk)
    return b"".join(chunks)


@dataclass
class Api:
    service: Service
    fanout: Poll
    logins: Logins
    lifecycle: Lifecycle
    admin: admin.Admin
    private_key: bytes
    clock: Callable[[], float]
    guard: wire.ReplayGuard = field(default_factory=wire.ReplayGuard)
    refusals: Refusals = field(default_factory=Refusals)
    proxies: tuple[IPNetwork, ...] = ()

    def __post_init__(self) -> None:
        self.boxes = Boxes(PrivateKey(self.private_key))
        self.public_key = bytes(PrivateKey(self.private_key).public_key)

    def routes(self) -> list[Route]:
        return [
            Route("/key", self.key, methods=["GET"]),
            Route("/machine/{mkey}/register", self.register, methods=["POST"]),
            Route("/machine/{mkey}/map", self.map, methods=["POST"]),
            Route("/register/{auth_id}", self.login_page, methods=["GET"]),
            Route("/derp/admit", self.derp_admit, methods=["POST"]),
            Route("/health", self.health, methods=["GET"]),
        ]

    def admin_routes(self) -> list[Route]:
        return [Route("/admin", self.admin_request, methods=["POST"])]

    async def key(self, request: Request) -> Response:
        return JSONResponse(
            {"publicKey": wire.key_text("mkey", self.public_key), "capabilityVersion": wire.CAPABILITY_VERSION}
        )

    def address(self, request: Request) -> str:
        """The sender's address: the TCP peer, or the client behind a trusted proxy (coord/limits.py)."""
        peer = request.client.host if request.client else None
        return client_address(peer, request.headers.get("x-forwarded-for"), self.proxies)

    async def _open(self, request: Request, source: str) -> tuple[bytes, Box, wire.OpenedRequest]:
        mkey = wire.parse_hex_key(request.path_params["mkey"], "machine key in URL")
        body = await read_body(request, wire.MAX_CONTROL)
        box = self.boxes.get(mkey)
        try:
            known = wire.key_text("mkey", mkey) in self.service.state.by_machine
            opened = wire.open_request(box, body, now=self.clock(), guard=self.guard, source=source, known=known,
                                       limit=wire.MAX_CONTROL)
        except wire.Busy:
            self.refusals.note("replay_guard")
            raise
        return mkey, box, opened

    async def register(self, request: Request) -> Response:
        address = self.address(request)
        source = source_key(address)
        if not self.logins.rate.available(source, self.clock()):
            self.refusals.note("rate")
            return PlainTextResponse(f"too many registrations from {source}; slow down\n", status_code=429,
                                     headers={"Retry-After": str(int(1 / self.logins.rate.rate))})
        mkey, box, opened = await self._open(request, source)
        req = wire.RegisterRequest.from_json(opened.body)
        resp = await self.logins.register(mkey, req, address)
        return Response(wire.seal_response(box, opened.request_id, resp, os.urandom(24)),
                        media_type="application/octet-stream")

    async def map(self, request: Request) -> Response:
        mkey, box, opened = await self._open(request, source_key(self.address(request)))
        req = wire.MapRequest.from_json(opened.body)
        nid = node_for_map(self.service.state, mkey, req, self.clock())
        await self.service.map_update(nid, req)
        if not req.stream:
            return Response(wire.seal_response(box, opened.request_id, {}, os.urandom(24)),
                            media_type="application/octet-stream")
        fanout, lifecycle = self.fanout, self.lifecycle
        st = fanout.open(nid, box, opened.request_id)
        await lifecycle.connected(nid)

        async def stream() -> AsyncIterator[bytes]:
            try:
                async for chunk in fanout.frames(st):
                    # Starlette holds the last chunk it sent until the next one, which may be a keep-alive
                    # away: slices stop a big full map from staying alive per idle session.
                    for i in range(0, len(chunk), STREAM_SLICE):
                        yield chunk[i : i + STREAM_SLICE]
                    del chunk
            finally:
                if fanout.release(st):
                    lifecycle.spawn(lifecycle.disconnected(nid))

        return StreamingResponse(stream(), media_type="application/octet-stream")

    async def login_page(self, request: Request) -> Response:
        auth_id = request.path_params["auth_id"]
        p = self.logins.pending.get(auth_id)
        if p is None:
            return HTMLResponse("<h1>Unknown or expired login</h1>", status_code=404)
        host = html.escape(p.request.hostinfo.hostname or "a machine")
        cmd = html.escape(f"shoal-server nodes approve {auth_id} --user USER")
        return HTMLResponse(
            f"<h1>Approve {host}</h1><p>An admin of this tailnet approves this machine with:</p><pre>{cmd}</pre>"
        )

    async def derp_admit(self, request: Request) -> Response:
        try:
            data = json.loads(await read_body(request, 4096))
            nkey = wire.key_text("nodekey", wire.parse_key(data.get("NodePublic"), "nodekey", "NodePublic"))
        except (ValueError, AttributeError) as e:
            return PlainTextResponse(f"bad request: {e}", status_code=400)
        return JSONResponse({"Allow": active_node_key(self.service.state, nkey)})

    async def health(self, request: Request) -> Response:
        return JSONResponse({"ok": True, "nodes": len(self.service.state.nodes), "sessions": len(self.fanout.sessions),
                             "refused": self.refusals.as_json()["total"]})

    async def admin_request(self, request: Request) -> Response:
        try:
            data = json.loads(await read_body(request, wire.MAX_REQUEST))
            command, args = data["command"], data.get("args") or {}
            if not isinstance(command, str) or not isinstance(args, dict):
                raise ValueError("command must be a string and args an object")
        except (ValueError, KeyError, TypeError) as e:
            return JSONResponse({"error": f"bad admin request: {e}"}, status_code=400)
        result = await admin.run(self.admin, command, args)
        return JSONResponse({"result": result})


async def wire_error(request: Request, exc: Exception) -> Response:
    mkey = request.path_params.get("mkey", "")[:8]
    if isinstance(exc, wire.Busy):
        return PlainTextResponse(f"{exc}\n", status_code=429, headers={"Retry-After": "60"})
    log.warning("rejected %s %s from mkey %s: %s", request.method, request.url.path, mkey or "-", exc)
    return PlainTextResponse(f"bad request: {exc}\n", status_code=400)


async def domain_error(request: Request, exc: Exception) -> Response:
    assert isinstance(exc, DomainError)
    if request.url.path == "/admin":
        return JSONResponse({"error": exc.message}, status_code=exc.status)
    return PlainTextResponse(exc.message + "\n", status_code=exc.status)


async def database_down(request: Request, exc: Exception) -> Response:
    """A write refused because the shared database is unreachable (coord/store/postgres.py): 503, retry later."""
    if request.url.path == "/admin":
        return JSONResponse({"error": str(exc)}, status_code=503)
    return PlainTextResponse(f"{exc}\n", status_code=503, headers={"Retry-After": "2"})
