"""The composition root: ``create_app(config)`` builds the whole server; nothing here is a module global.

Routes (the control protocol is documented in coord/wire.py):
    GET  /key                          server public key (pinned by nodes)
    POST /machine/<mkey hex>/register  sealed RegisterRequest -> sealed RegisterResponse
    POST /machine/<mkey hex>/map       sealed MapRequest -> sealed response, or a stream of sealed frames
    GET  /register/<id>                the page a login URL opens
    POST /derp/admit                   {"NodePublic": "nodekey:..", "Source": ip} -> {"Allow": bool}, for relays
    GET  /health
The admin API listens on a Unix socket in the data dir (mode 0600): POST /admin {"command", "args"}.
"""

from __future__ import annotations

import asyncio
import contextlib
import html
import json
import logging
import os
import time
from collections import OrderedDict
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

from nacl.exceptions import CryptoError
from nacl.public import Box, PrivateKey, PublicKey
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import HTMLResponse, JSONResponse, PlainTextResponse, Response, StreamingResponse
from starlette.routing import Route

from coord import admin, db, decide, wire
from coord.config import Config, parse_hostport
from coord.errors import DomainError
from coord.ipam import Pool
from coord.netmap import Settings, default_dns
from coord.service import Service
from derp.server import DerpServer
from derp.stunserver import StunServer, start_stun_server

log = logging.getLogger("shoal.server")

EMBEDDED_REGION = 900
BOX_CACHE = 20_000
STREAM_SLICE = 32 << 10


def load_or_create_key(path: Path) -> bytes:
    """The server's long-term private key, created 0600 on first start."""
    if path.exists():
        data = path.read_text().strip()
        try:
            raw = bytes.fromhex(data.removeprefix("privkey:"))
        except ValueError:
            raw = b""
        if len(raw) != 32:
            raise DomainError(f"{path}: not a server private key; move it away to create a new one")
        return raw
    raw = bytes(PrivateKey.generate())
    tmp = path.with_suffix(".tmp")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "w") as f:
        f.write("privkey:" + raw.hex() + "\n")
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)
    return raw


def derp_map(config: Config) -> dict[str, Any]:
    regions: dict[str, Any] = {}
    if config.derp:
        u = urlsplit(config.server_url)
        port = u.port or (443 if u.scheme == "https" else 80)
        stun_port = config.stun_listen.rpartition(":")[2] if config.stun_listen else "-1"
        regions[str(EMBEDDED_REGION)] = {
            "RegionID": EMBEDDED_REGION,
            "RegionCode": "shoal",
            "RegionName": "Shoal embedded relay",
            "Nodes": [
                {
                    "Name": f"{EMBEDDED_REGION}a",
                    "RegionID": EMBEDDED_REGION,
                    "HostName": u.hostname,
                    "DERPPort": port,
                    "STUNPort": int(stun_port),
                    "URL": f"{config.server_url.rstrip('/')}/derp",
                    "InsecureForTests": u.scheme == "http",
                }
            ],
        }
    if config.derp_map_file:
        try:
            extra = json.loads(Path(config.derp_map_file).read_text())
        except (OSError, ValueError) as e:
            raise DomainError(f"derp_map_file {config.derp_map_file}: {e}") from None
        if not isinstance(extra, dict) or not isinstance(extra.get("Regions"), dict):
            raise DomainError(f"derp_map_file {config.derp_map_file}: expected {{\"Regions\": {{...}}}}")
        regions.update(extra["Regions"])
    return {"Regions": regions}


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
class Server:
    """Everything one running server owns, built by ``create_app``."""

    config: Config
    private_key: bytes
    clock: Callable[[], float] = time.time
    service: Service | None = None
    guard: wire.ReplayGuard = field(default_factory=wire.ReplayGuard)
    boxes: Boxes | None = None
    background: list[asyncio.Task[Any]] = field(default_factory=list)
    relay: DerpServer | None = None
    stun: StunServer | None = None

    @property
    def public_key(self) -> bytes:
        return bytes(PrivateKey(self.private_key).public_key)

    @property
    def svc(self) -> Service:
        assert self.service is not None, "server not started"
        return self.service

    async def start(self, background: bool = True) -> None:
        """Open the database and fold the log. ``background=False`` (CLI in-process) skips the node timers."""
        cfg = self.config
        cfg.data_path.mkdir(parents=True, exist_ok=True)
        conn = await db.connect(cfg.data_path / "shoal.db")
        state = await Service.load_state(conn)
        rules = decide.Rules(Pool.parse(cfg.prefix_v4, cfg.prefix_v6), cfg.key_expiry_s)
        settings = Settings(cfg.base_domain, derp_map(cfg), default_dns(cfg.base_domain))
        self.service = Service(
            conn, state, rules, settings, self.clock, cfg.server_url, cfg.ephemeral_timeout_s,
            batch_delay=cfg.batch_delay_s, keepalive=cfg.keepalive_s,
        )
        self.boxes = Boxes(PrivateKey(self.private_key))
        if background:
            await self.service.startup()
            self.background.append(asyncio.create_task(self.service.expiry_loop()))
            if cfg.derp:
                await self.start_relay()

    async def start_relay(self) -> None:
        """The embedded DERP relay (region 900) admits only node keys of this tailnet's active nodes."""
        cfg = self.config

        async def admit(node_key: bytes, source: str) -> bool:
            nid = self.svc.state.by_node_key.get(wire.key_text("nodekey", node_key))
            return nid is not None and self.svc.state.nodes[nid].active

        self.relay = DerpServer(load_or_create_key(cfg.data_path / "derp.key"), admit=admit)
        await self.relay.start()
        if cfg.stun_listen:
            host, port = parse_hostport(cfg.stun_listen, "stun_listen")
            self.stun = await start_stun_server(host, port)
            self.relay.stun = self.stun

    async def stop(self) -> None:
        for t in self.background:
            t.cancel()
        if self.stun is not None:
            self.stun.close()
        if self.relay is not None:
            await self.relay.close()
        if self.service is not None:
            await self.service.shutdown()
            await self.service.conn.close()

    # --- handlers ---------------------------------------------------------------------------------------

    async def key(self, request: Request) -> Response:
        return JSONResponse(
            {"publicKey": wire.key_text("mkey", self.public_key), "capabilityVersion": wire.CAPABILITY_VERSION}
        )

    async def _open(self, request: Request) -> tuple[bytes, Box, wire.OpenedRequest]:
        mkey = wire.parse_hex_key(request.path_params["mkey"], "machine key in URL")
        body = await read_body(request, wire.MAX_REQUEST)
        assert self.boxes is not None
        box = self.boxes.get(mkey)
        opened = wire.open_request(box, body, now=self.clock(), guard=self.guard)
        return mkey, box, opened

    async def register(self, request: Request) -> Response:
        mkey, box, opened = await self._open(request)
        req = wire.RegisterRequest.from_json(opened.body)
        resp = await self.svc.register(mkey, req)
        return Response(wire.seal_response(box, opened.request_id, resp, os.urandom(24)),
                        media_type="application/octet-stream")

    async def map(self, request: Request) -> Response:
        mkey, box, opened = await self._open(request)
        req = wire.MapRequest.from_json(opened.body)
        svc = self.svc
        nid = svc.node_for_map(mkey, req)
        await svc.map_update(nid, req)
        if not req.stream:
            return Response(wire.seal_response(box, opened.request_id, {}, os.urandom(24)),
                            media_type="application/octet-stream")
        session = svc.fanout.open(nid, box, opened.request_id)
        await svc.connected(nid)

        async def stream() -> AsyncIterator[bytes]:
            try:
                async for chunk in svc.fanout.frames(session):
                    # Starlette holds the last chunk it sent until the next one, which may be a keep-alive
                    # away: slices stop a big full map from staying alive per idle session.
                    for i in range(0, len(chunk), STREAM_SLICE):
                        yield chunk[i : i + STREAM_SLICE]
                    del chunk
            finally:
                if svc.fanout.release(session):
                    svc.spawn(svc.disconnected(nid))

        return StreamingResponse(stream(), media_type="application/octet-stream")

    async def login_page(self, request: Request) -> Response:
        auth_id = request.path_params["auth_id"]
        p = self.svc.pending.get(auth_id)
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
        nid = self.svc.state.by_node_key.get(nkey)
        allow = nid is not None and self.svc.state.nodes[nid].active
        return JSONResponse({"Allow": allow})

    async def health(self, request: Request) -> Response:
        return JSONResponse({"ok": True, "nodes": len(self.svc.state.nodes), "sessions": len(self.svc.fanout.sessions)})

    async def admin(self, request: Request) -> Response:
        try:
            data = json.loads(await read_body(request, wire.MAX_REQUEST))
            command, args = data["command"], data.get("args") or {}
            if not isinstance(command, str) or not isinstance(args, dict):
                raise ValueError("command must be a string and args an object")
        except (ValueError, KeyError, TypeError) as e:
            return JSONResponse({"error": f"bad admin request: {e}"}, status_code=400)
        result = await admin.run(self.svc, command, args)
        return JSONResponse({"result": result})


async def _wire_error(request: Request, exc: Exception) -> Response:
    mkey = request.path_params.get("mkey", "")[:8]
    log.warning("rejected %s %s from mkey %s: %s", request.method, request.url.path, mkey or "-", exc)
    return PlainTextResponse(f"bad request: {exc}\n", status_code=400)


async def _domain_error(request: Request, exc: Exception) -> Response:
    assert isinstance(exc, DomainError)
    if request.url.path == "/admin":
        return JSONResponse({"error": exc.message}, status_code=exc.status)
    return PlainTextResponse(exc.message + "\n", status_code=exc.status)


def create_app(config: Config, *, server: Server | None = None) -> Starlette:
    """The public HTTP app. ``server`` may be passed in (tests, the admin socket) to share one Server."""
    config.data_path.mkdir(parents=True, exist_ok=True)
    srv = server or Server(config, load_or_create_key(config.data_path / "server.key"))

    @contextlib.asynccontextmanager
    async def lifespan(app: Starlette) -> AsyncIterator[None]:
        if srv.service is None:
            await srv.start()
        try:
            yield
        finally:
            await srv.stop()

    app = Starlette(
        routes=[
            Route("/key", srv.key, methods=["GET"]),
            Route("/machine/{mkey}/register", srv.register, methods=["POST"]),
            Route("/machine/{mkey}/map", srv.map, methods=["POST"]),
            Route("/register/{auth_id}", srv.login_page, methods=["GET"]),
            Route("/derp/admit", srv.derp_admit, methods=["POST"]),
            Route("/health", srv.health, methods=["GET"]),
        ],
        exception_handlers={wire.WireError: _wire_error, DomainError: _domain_error},
        lifespan=lifespan,
    )
    app.state.server = srv
    return app


def create_admin_app(srv: Server) -> Starlette:
    return Starlette(
        routes=[Route("/admin", srv.admin, methods=["POST"])],
        exception_handlers={DomainError: _domain_error},
    )
