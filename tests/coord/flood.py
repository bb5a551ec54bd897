"""A flood of junk interactive registrations against a real ``shoal-server serve`` on loopback (issue 11.4).

Used by tests/coord/test_sec_flood.py (10,000 requests) and scripts/bench/flood (100,000). Every junk request is a
sealed, well-formed RegisterRequest from a fresh machine key, as large as the wire schema lets a request be that
a server must keep while it waits for an admin (hostname, tags and routable IPs at their limits), sent from
127.0.0.2-127.0.0.254 in turn over raw asyncio streams (one connection per request, ``Connection: close``), so
the server sees many sources. Meanwhile a real node (node.control.ControlClient, from 127.0.0.1) registers with an
auth key and sends a map update, and an interactive registration from 127.0.0.1 gets its login URL.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import signal
import subprocess
import sys
import time
import urllib.request
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from nacl.public import Box, PrivateKey, PublicKey

from coord import wire
from node.control import ControlClient

SOURCES = [f"127.0.0.{i}" for i in range(2, 255)]


def rss_mb(pid: int) -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    raise RuntimeError(f"no VmRSS for {pid}")


def junk_body() -> bytes:
    """The biggest RegisterRequest body the schema accepts, as JSON (the same for every machine key)."""
    hostinfo = {
        "Hostname": "j" * wire.MAX_HOSTNAME,
        "OS": "o" * 64,
        "RequestTags": [f"tag:{i:03d}" + "t" * (wire.MAX_TAG - 7) for i in range(wire.MAX_TAGS)],
        "RoutableIPs": [f"fd00:1234:5678:9abc:def0:1234:5678:{i:04x}/128" for i in range(wire.MAX_ROUTES)],
    }
    body = {"NodeKey": wire.key_text("nodekey", os.urandom(32)), "Hostinfo": hostinfo}
    return json.dumps(body, separators=(",", ":")).encode()


@dataclass
class Server:
    data: Path
    port: int
    proc: subprocess.Popen[bytes]

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def public_key(self) -> bytes:
        with urllib.request.urlopen(f"{self.url}/key", timeout=5) as r:
            return wire.parse_key(json.loads(r.read())["publicKey"], "mkey")

    def cli(self, *args: str) -> Any:
        p = subprocess.run([sys.executable, "-m", "coord.cli", *args, "--data", str(self.data), "--json"],
                           capture_output=True, text=True, timeout=60, env={**os.environ, "SHOAL_CONFIG": ""})
        if p.returncode != 0:
            raise AssertionError(f"shoal-server {' '.join(args)} exited {p.returncode}: {p.stderr}")
        return json.loads(p.stdout)

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(20)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()


def start(data: Path, port: int, *extra: str) -> Server:
    proc = subprocess.Popen(
        [sys.executable, "-m", "coord.cli", "serve", "--data", str(data), "--listen", f"127.0.0.1:{port}",
         "--server-url", f"http://127.0.0.1:{port}", "--no-derp", "--stun-listen", "", "--log-level", "error",
         *extra],
        stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, env={**os.environ, "SHOAL_CONFIG": ""},
    )
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise AssertionError(f"server exited {proc.returncode}")
        try:
            with urllib.request.urlopen(f"http://127.0.0.1:{port}/health", timeout=1) as r:
                if r.status == 200 and (data / "admin.sock").exists():
                    return Server(data, port, proc)
        except OSError:
            pass
        time.sleep(0.05)
    proc.kill()
    raise AssertionError("server did not start")


@dataclass
class Result:
    requests: int = 0
    statuses: Counter[int] = field(default_factory=Counter)
    rss_before_mb: float = 0.0
    rss_max_mb: float = 0.0
    aborted: str = ""
    real_login_ok: bool = False
    real_login_error: str = ""
    interactive_ok: bool = False
    seconds: float = 0.0

    @property
    def rss_growth_mb(self) -> float:
        return self.rss_max_mb - self.rss_before_mb


async def _post(host: str, port: int, source: str, path: str, body: bytes) -> int:
    reader, writer = await asyncio.open_connection(host, port, local_addr=(source, 0))
    try:
        writer.write(f"POST {path} HTTP/1.1\r\nHost: {host}:{port}\r\nContent-Type: application/octet-stream\r\n"
                     f"Content-Length: {len(body)}\r\nConnection: close\r\n\r\n".encode() + body)
        await writer.drain()
        head = await reader.readline()
        await reader.read()
    finally:
        writer.close()
        with contextlib.suppress(OSError):
            await writer.wait_closed()
    parts = head.split()
    return int(parts[1]) if len(parts) > 1 and parts[1].isdigit() else 0


async def real_login(url: str, auth_key: str, result: Result) -> None:
    """A real node's registration (auth key) and map update, and an interactive registration, from 127.0.0.1."""
    m = PrivateKey.generate()
    c = ControlClient(url, bytes(m), bytes(m.public_key), timeout=30)
    try:
        await c.pin()
        nk, dk = os.urandom(32), os.urandom(32)
        resp = await c.login(wire.RegisterRequest(node_key=nk, disco_key=dk, auth_key=auth_key,
                                                  hostinfo=wire.Hostinfo(hostname="real", os="linux")))
        if not resp.machine_authorized:
            raise AssertionError(f"not authorized: {resp}")
        await c.update(wire.MapRequest(node_key=nk, disco_key=dk, endpoints=("127.0.0.1:41641",),
                                       endpoint_types=(wire.EP_LOCAL,)))
        result.real_login_ok = True
    except Exception as e:  # the test reports what failed
        result.real_login_error = f"{e.__class__.__name__}: {e}"
    finally:
        await c.close()
    m2 = PrivateKey.generate()
    c2 = ControlClient(url, bytes(m2), bytes(m2.public_key), timeout=30)
    try:
        await c2.pin()
        resp = await c2.login(wire.RegisterRequest(node_key=os.urandom(32), disco_key=os.urandom(32),
                                                   hostinfo=wire.Hostinfo(hostname="real-interactive")))
        result.interactive_ok = bool(resp.auth_url) and not resp.machine_authorized
        if not result.interactive_ok:
            result.real_login_error += f" interactive: {resp}"
    except Exception as e:
        result.real_login_error += f" interactive: {e.__class__.__name__}: {e}"
    finally:
        await c2.close()


async def flood(server: Server, auth_key: str, n: int, *, concurrency: int = 48, rss_limit_mb: float = 0.0,
                progress: Callable[[str], None] | None = None) -> Result:
    """Send ``n`` junk registrations; the real login starts a fifth of the way in. ``rss_limit_mb`` > 0 stops
    the flood once the server has grown that much (a server that does not bound its state must not take the
    machine down with it)."""
    result = Result(rss_before_mb=rss_mb(server.proc.pid))
    result.rss_max_mb = result.rss_before_mb
    server_pub = PublicKey(server.public_key())
    body = junk_body()
    queue: asyncio.Queue[int] = asyncio.Queue()
    for i in range(n):
        queue.put_nowait(i)
    login_task: asyncio.Task[None] | None = None
    t0 = time.monotonic()

    async def worker() -> None:
        nonlocal login_task
        while not result.aborted:
            try:
                i = queue.get_nowait()
            except asyncio.QueueEmpty:
                return
            machine = PrivateKey.generate()
            box = Box(machine, server_pub)
            rid = os.urandom(16).hex()
            plain = b'{"ts":%.6f,"id":"%s","body":' % (time.time(), rid.encode()) + body + b"}"
            sealed = wire.seal(box, plain, os.urandom(wire.NONCE_LEN))
            path = f"/machine/{bytes(machine.public_key).hex()}/register"
            try:
                status = await _post("127.0.0.1", server.port, SOURCES[i % len(SOURCES)], path, sealed)
            except OSError:
                status = 0
            result.statuses[status] += 1
            result.requests += 1
            if result.requests == n // 5 and login_task is None:
                login_task = asyncio.create_task(real_login(server.url, auth_key, result))
            if result.requests % 250 == 0:
                rss = rss_mb(server.proc.pid)
                result.rss_max_mb = max(result.rss_max_mb, rss)
                if progress is not None:
                    progress(f"{result.requests}/{n} sent, server RSS {rss:.0f} MB, "
                             f"statuses {dict(sorted(result.statuses.items()))}")
                if rss_limit_mb and rss - result.rss_before_mb > rss_limit_mb:
                    result.aborted = f"server grew {rss - result.rss_before_mb:.0f} MB after {result.requests}"

    await asyncio.gather(*(worker() for _ in range(concurrency)))
    if login_task is None:
        login_task = asyncio.create_task(real_login(server.url, auth_key, result))
    await login_task
    result.rss_max_mb = max(result.rss_max_mb, rss_mb(server.proc.pid))
    result.seconds = time.monotonic() - t0
    return result
