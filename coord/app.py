"""The composition root: ``create_app(config)`` builds the whole server; nothing here is a module global.

It opens the store, folds the log and wires the parts: the service (the one writer), the fan-out core and its
long-poll shell, logins, node lifecycle timers, the embedded DERP relay, and the two HTTP apps. ``App.start()``
starts what runs in the background; ``App.close()`` stops it all. ``shoal-server serve`` and the CLI's in-process
admin path both build their server here.

Routes of the public app (the control protocol is documented in coord/wire.py):
    GET  /key                          server public key (pinned by nodes)
    POST /machine/<mkey hex>/register  sealed RegisterRequest -> sealed RegisterResponse
    POST /machine/<mkey hex>/map       sealed MapRequest -> sealed response, or a stream of sealed frames
    GET  /register/<id>                the page a login URL opens
    POST /derp/admit                   {"NodePublic": "nodekey:..", "Source": ip} -> {"Allow": bool}, for relays
    GET  /health
The admin app (served by coord/serve.py on ``<data dir>/admin.sock``, mode 0600): POST /admin {"command", "args"}.
"""

from __future__ import annotations

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

from coord import admin, decide, wire
from coord.config import Config, parse_hostport
from coord.errors import ConfigError, DomainError
from coord.fanout import Fanout
from coord.ipam import Pool
from coord.lifecycle import Lifecycle
from coord.logins import Logins, node_for_map
from coord.netmap import Settings, default_dns
from coord.poll import Poll
from coord.service import Service
from coord.store import load_state
from coord.store.sqlite import SqliteStore
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
            raise ConfigError(f"{path}: not a server private key; move it away to create a new one")
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
            raise ConfigError(f"derp_map_file {config.derp_map_file}: {e}") from None
        if not isinstance(extra, dict) or not isinstance(extra.get("Regions"), dict):
            raise ConfigError(f"derp_map_file {config.derp_map_file}: expected {{\"Regions\": {{...}}}}")
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
class App:
    """Everything one server is made of, built by ``create_app``."""

    config: Config
    private_key: bytes
    clock: Callable[[], float]
    service: Service
    fanout: Poll
    lifecycle: Lifecycle
    logins: Logins
    relay: DerpServer | None = None
    stun: StunServer | None = None
    guard: wire.ReplayGuard = field(default_factory=wire.ReplayGuard)
    started: bool = False

    def __post_init__(self) -> None:
        self.boxes = Boxes(PrivateKey(self.private_key))
        self.admin = admin.Admin(self.service, self.logins, self.fanout.has_session)
        self.http = self._public_app()
        self.admin_http = Starlette(
            routes=[Route("/admin", self.admin_request, methods=["POST"])],
            exception_handlers={DomainError: _domain_error},
        )

    @property
    def public_key(self) -> bytes:
        return bytes(PrivateKey(self.private_key).public_key)

    async def start(self) -> None:
        """Start the background: node timers (after marking every node offline) and the embedded relay."""
        self.started = True
        await self.lifecycle.start()
        if self.relay is not None:
            await self.relay.start()
            if self.config.stun_listen:
                host, port = parse_hostport(self.config.stun_listen, "stun_listen")
                self.stun = await start_stun_server(host, port)
                self.relay.stun = self.stun

    async def close(self) -> None:
        if self.stun is not None:
            self.stun.close()
        if self.relay is not None:
            await self.relay.close()
        self.fanout.close_all()
        await self.lifecycle.stop()
        await self.service.store.close()

    def _public_app(self) -> Starlette:
        @contextlib.asynccontextmanager
        async def lifespan(app: Starlette) -> AsyncIterator[None]:
            # Only for an ASGI server run with lifespan on; ours start and close the App themselves.
            if not self.started:
                await self.start()
            try:
                yield
            finally:
                await self.close()

        return Starlette(
            routes=[
                Route("/key", self.key, methods=["GET"]),
                Route("/machine/{mkey}/register", self.register, methods=["POST"]),
                Route("/machine/{mkey}/map", self.map, methods=["POST"]),
                Route("/register/{auth_id}", self.login_page, methods=["GET"]),
                Route("/derp/admit", self.derp_admit, methods=["POST"]),
                Route("/health", self.health, methods=["GET"]),
            ],
            exception_handlers={wire.WireError: _wire_error, DomainError: _domain_error},
            lifespan=lifespan,
        )

    def admits(self, node_key_text: str) -> bool:
        nid = self.service.state.by_node_key.get(node_key_text)
        return nid is not None and self.service.state.nodes[nid].active

    # --- handlers ---------------------------------------------------------------------------------------

    async def key(self, request: Request) -> Response:
        return JSONResponse(
            {"publicKey": wire.key_text("mkey", self.public_key), "capabilityVersion": wire.CAPABILITY_VERSION}
        )

    async def _open(self, request: Request) -> tuple[bytes, Box, wire.OpenedRequest]:
        mkey = wire.parse_hex_key(request.path_params["mkey"], "machine key in URL")
        body = await read_body(request, wire.MAX_REQUEST)
        box = self.boxes.get(mkey)
        opened = wire.open_request(box, body, now=self.clock(), guard=self.guard)
        return mkey, box, opened

    async def register(self, request: Request) -> Response:
        mkey, box, opened = await self._open(request)
        req = wire.RegisterRequest.from_json(opened.body)
        resp = await self.logins.register(mkey, req)
        return Response(wire.seal_response(box, opened.request_id, resp, os.urandom(24)),
                        media_type="application/octet-stream")

    async def map(self, request: Request) -> Response:
        mkey, box, opened = await self._open(request)
        req = wire.MapRequest.from_json(opened.body)
        nid = node_for_map(self.service.state, mkey, req)
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
        return JSONResponse({"Allow": self.admits(nkey)})

    async def health(self, request: Request) -> Response:
        return JSONResponse({"ok": True, "nodes": len(self.service.state.nodes), "sessions": len(self.fanout.sessions)})

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


async def _wire_error(request: Request, exc: Exception) -> Response:
    mkey = request.path_params.get("mkey", "")[:8]
    log.warning("rejected %s %s from mkey %s: %s", request.method, request.url.path, mkey or "-", exc)
    return PlainTextResponse(f"bad request: {exc}\n", status_code=400)


async def _domain_error(request: Request, exc: Exception) -> Response:
    assert isinstance(exc, DomainError)
    if request.url.path == "/admin":
        return JSONResponse({"error": exc.message}, status_code=exc.status)
    return PlainTextResponse(exc.message + "\n", status_code=exc.status)


async def create_app(config: Config, *, serve: bool = True, clock: Callable[[], float] = time.time) -> App:
    """Build the server on ``config``'s data dir: open the store, fold the log, wire the parts.

    ``serve=False`` (the CLI running an admin command in-process) builds no relay; such an App is never started.
    """
    config.data_path.mkdir(parents=True, exist_ok=True)
    private_key = load_or_create_key(config.data_path / "server.key")
    settings = Settings(config.base_domain, derp_map(config), default_dns(config.base_domain))
    rules = decide.Rules(Pool.parse(config.prefix_v4, config.prefix_v6), config.key_expiry_s)
    store = await SqliteStore.open(config.data_path / "shoal.db")
    try:
        state = await load_state(store)
    except BaseException:
        await store.close()
        raise
    service = Service(store, state, rules, settings, clock)
    fanout = Poll(Fanout(service, config.batch_delay_s, config.keepalive_s), clock)
    service.publish = fanout.submit
    lifecycle = Lifecycle(service, fanout.has_session, config.ephemeral_timeout_s)
    logins = Logins(service, lifecycle, config.server_url)
    app = App(config, private_key, clock, service, fanout, lifecycle, logins)
    if serve and config.derp:
        # The embedded relay (region 900) admits only node keys of this tailnet's active nodes.
        async def admit(node_key: bytes, source: str) -> bool:
            return app.admits(wire.key_text("nodekey", node_key))

        app.relay = DerpServer(load_or_create_key(config.data_path / "derp.key"), admit=admit)
    return app
