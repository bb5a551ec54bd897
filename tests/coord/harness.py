"""Runs a real shoal-server (in this event loop, on a loopback port) and makes simulated nodes for it."""

from __future__ import annotations

import asyncio
import contextlib
import socket
from collections.abc import AsyncIterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import uvicorn
from nacl.public import PrivateKey

from coord import wire
from coord.app import App, create_app
from coord.config import Config, load
from coord.logins import Logins
from coord.serve import QuietServer
from coord.service import Service
from derp.embed import derp_http_protocol
from node.control import ControlClient


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@dataclass
class Running:
    url: str
    app: App
    config: Config

    @property
    def svc(self) -> Service:
        return self.app.service

    @property
    def logins(self) -> Logins:
        return self.app.logins


@contextlib.asynccontextmanager
async def running_server(data: Path, app_kw: dict[str, Any] | None = None, **overrides: Any) -> AsyncIterator[Running]:
    port = free_port()
    settings: dict[str, Any] = {
        "data_dir": str(data), "listen": f"127.0.0.1:{port}", "server_url": f"http://127.0.0.1:{port}",
        "stun_listen": "", "batch_delay": "10ms", "derp": False,
    }
    settings.update(overrides)
    config = load(None, env={}, overrides=settings)
    port = config.listen_addr[1]  # the caller may have chosen it (an IdP must know the callback URL first)
    app = await create_app(config, **(app_kw or {}))
    await app.start()
    extra: dict[str, Any] = {"http": derp_http_protocol(app.relay)} if app.relay is not None else {}
    if config.tls_cert:
        extra.update(ssl_certfile=config.tls_cert, ssl_keyfile=config.tls_key)
    userver = QuietServer(
        uvicorn.Config(app.http, host="127.0.0.1", port=port, log_level="warning", lifespan="off",
                       proxy_headers=False, **extra)
    )
    task = asyncio.create_task(userver.serve())
    while not userver.started:
        if task.done():
            task.result()
        await asyncio.sleep(0.01)
    try:
        yield Running(config.server_url, app, config)
    finally:
        userver.should_exit = True
        await asyncio.wait_for(task, 10)
        await app.close()


@dataclass
class SimNode:
    machine: PrivateKey
    node: PrivateKey
    disco: PrivateKey
    client: ControlClient
    hostname: str

    @property
    def node_key(self) -> bytes:
        return bytes(self.node.public_key)

    def register_request(self, auth_key: str = "", **kw: Any) -> wire.RegisterRequest:
        return wire.RegisterRequest(
            node_key=self.node_key, disco_key=bytes(self.disco.public_key), auth_key=auth_key,
            hostinfo=wire.Hostinfo(hostname=self.hostname, os="linux"), **kw,
        )

    def map_request(self, stream: bool = True, **kw: Any) -> wire.MapRequest:
        return wire.MapRequest(node_key=self.node_key, disco_key=bytes(self.disco.public_key), stream=stream, **kw)

    async def join(self, auth_key: str) -> dict[str, Any]:
        await self.client.pin()
        return await self.client.register(self.register_request(auth_key))


def sim_node(url: str, hostname: str = "host") -> SimNode:
    m = PrivateKey.generate()
    client = ControlClient(url, bytes(m), bytes(m.public_key))
    return SimNode(m, PrivateKey.generate(), PrivateKey.generate(), client, hostname)
