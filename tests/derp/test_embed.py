"""The relay sharing uvicorn's port with a Starlette app, and the shoal-derp command line."""

from __future__ import annotations

import asyncio
import os
import socket
import subprocess
import sys
from pathlib import Path

import httpx
import pytest
import uvicorn
from nacl.public import PrivateKey
from starlette.applications import Starlette
from starlette.responses import PlainTextResponse
from starlette.routing import Route

from derp import frames as f
from derp.client import DerpClient
from derp.embed import derp_http_protocol
from derp.server import DerpServer

pytestmark = pytest.mark.anyio


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


async def test_derp_and_asgi_app_on_one_port() -> None:
    async def hello(request: object) -> PlainTextResponse:
        return PlainTextResponse("hello from the app")

    app = Starlette(routes=[Route("/hello", hello)])
    relay = DerpServer(bytes(PrivateKey.generate()))
    port = free_port()
    config = uvicorn.Config(app, host="127.0.0.1", port=port, http=derp_http_protocol(relay), log_level="warning")
    server = uvicorn.Server(config)
    task = asyncio.create_task(server.serve())
    try:
        for _ in range(100):
            if server.started:
                break
            await asyncio.sleep(0.05)
        # No keep-alive: only the first request of a connection is examined for the relay paths.
        async with httpx.AsyncClient(limits=httpx.Limits(max_keepalive_connections=0)) as http:
            r = await http.get(f"http://127.0.0.1:{port}/hello")
            assert (r.status_code, r.text) == (200, "hello from the app")
            r = await http.get(f"http://127.0.0.1:{port}/derp")
            assert r.status_code == 426
            r = await http.get(f"http://127.0.0.1:{port}/derp/probe")
            assert r.status_code == 200
            r = await http.get(f"http://127.0.0.1:{port}/missing")
            assert r.status_code == 404
        url = f"http://127.0.0.1:{port}/derp"
        a = DerpClient(url, bytes(PrivateKey.generate()))
        b = DerpClient(url, bytes(PrivateKey.generate()))
        a.start()
        b.start()
        try:
            await a.wait_connected(5)
            await b.wait_connected(5)
            a.send(b.public_key, b"same port")
            while True:
                ev = await asyncio.wait_for(b.recv(), 3)
                if isinstance(ev, f.RecvPacket):
                    break
            assert ev == f.RecvPacket(a.public_key, b"same port")
        finally:
            await a.close()
            await b.close()
    finally:
        await relay.close()
        server.should_exit = True
        await task


def shoal_derp(*args: str, cwd: Path) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "derp.cli", *args], capture_output=True, text=True, timeout=30, cwd=cwd,
        env={**os.environ, "PYTHONPATH": str(Path(__file__).resolve().parents[2])},
    )


def test_help_documents_every_flag(tmp_path: Path) -> None:
    out = shoal_derp("--help", cwd=tmp_path).stdout
    for flag in ("--addr", "--stun-port", "--certfile", "--keyfile", "--key-file", "--verify-client-url",
                 "--mesh-with", "--mesh-key-file", "--queue-bytes", "--no-stun"):
        assert flag in out


def test_bad_flags_and_files_are_clear_errors(tmp_path: Path) -> None:
    r = shoal_derp("--bogus", cwd=tmp_path)
    assert r.returncode == 2 and "unrecognized arguments: --bogus" in r.stderr
    r = shoal_derp("--certfile", "nope.pem", "--keyfile", "nope.key", cwd=tmp_path)
    assert r.returncode == 2 and "cannot read nope.pem: no such file" in r.stderr
    r = shoal_derp("--certfile", "x.pem", cwd=tmp_path)
    assert r.returncode == 2 and "--certfile and --keyfile go together" in r.stderr
    r = shoal_derp("--addr", "nonsense", cwd=tmp_path)
    assert r.returncode == 2 and "want [HOST]:PORT" in r.stderr
    (tmp_path / "mesh.key").write_text("short")
    r = shoal_derp("--mesh-key-file", "mesh.key", "--key-file", "k", cwd=tmp_path)
    assert r.returncode == 2 and "must hold 64 hex characters" in r.stderr


def test_key_file_created_0600_and_stable(tmp_path: Path) -> None:
    first = shoal_derp("--print-public-key", "--key-file", "relay.key", cwd=tmp_path)
    assert first.returncode == 0, first.stderr
    assert (tmp_path / "relay.key").stat().st_mode & 0o777 == 0o600
    again = shoal_derp("--print-public-key", "--key-file", "relay.key", cwd=tmp_path)
    assert again.stdout == first.stdout and len(first.stdout.strip()) == 64
