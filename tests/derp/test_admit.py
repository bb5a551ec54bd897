"""`shoal-derp --verify-client-url` against a real shoal-server's /derp/admit: the real CLI in a subprocess, the real
coordination server in this event loop, real DERP clients."""

from __future__ import annotations

import asyncio
import contextlib
import re
import sys
from collections.abc import AsyncIterator
from pathlib import Path

import pytest
from nacl.public import PrivateKey

from derp.client import Connected, DerpClient
from tests.coord.harness import free_port, running_server, sim_node

pytestmark = pytest.mark.anyio
ROOT = Path(__file__).resolve().parents[2]


@contextlib.asynccontextmanager
async def shoal_derp(tmp: Path, verify_url: str) -> AsyncIterator[tuple[str, list[str]]]:
    """A standalone relay process; yields its /derp URL and its log lines so far."""
    proc = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "derp.cli", "--addr", "127.0.0.1:0", "--no-stun", "--key-file", str(tmp / "derp.key"),
        "--verify-client-url", verify_url, "--log-level", "info",
        stderr=asyncio.subprocess.PIPE, cwd=ROOT,
    )
    assert proc.stderr is not None
    lines: list[str] = []

    async def pump() -> None:
        assert proc.stderr is not None
        async for raw in proc.stderr:
            lines.append(raw.decode())

    try:
        url = ""
        while not url:
            line = (await asyncio.wait_for(proc.stderr.readline(), 10)).decode()
            assert line, f"shoal-derp exited: {''.join(lines)}"
            lines.append(line)
            if m := re.search(r"listening on (http://\S+/derp)", line):
                url = m.group(1)
        task = asyncio.create_task(pump())
        yield url, lines
    finally:
        proc.terminate()
        await asyncio.wait_for(proc.wait(), 10)
        with contextlib.suppress(Exception):
            await asyncio.wait_for(task, 2)


async def connects(url: str, key: bytes, wait: float = 3.0) -> bool:
    c = DerpClient(url, key, backoff_min=10)
    c.start()
    try:
        await c.wait_connected(wait)
        return isinstance(await c.recv(), Connected)
    except TimeoutError:
        return False
    finally:
        await c.close()


async def until_logged(lines: list[str], text: str) -> None:
    for _ in range(100):
        if any(text in line for line in lines):
            return
        await asyncio.sleep(0.05)
    raise AssertionError(f"{text!r} not in the relay's log: {''.join(lines)}")


async def test_verify_client_url_admits_tailnet_nodes_only(tmp_path: Path) -> None:
    async with running_server(tmp_path / "coord") as r:
        await r.svc.create_user("alice")
        auth = str((await r.svc.create_key("alice", reusable=True, ephemeral=False, expiration=3600.0, tags=()))["key"])
        node = sim_node(r.url, "relayed")
        assert (await node.join(auth))["MachineAuthorized"] is True
        async with shoal_derp(tmp_path, f"{r.url}/derp/admit") as (url, lines):
            assert await connects(url, bytes(node.node))
            stranger = PrivateKey.generate()
            assert not await connects(url, bytes(stranger), wait=1.0)
            await until_logged(lines, f"node key {bytes(stranger.public_key).hex()} not admitted")
        await node.client.close()


async def test_verify_client_url_unreachable_fails_closed(tmp_path: Path) -> None:
    async with shoal_derp(tmp_path, f"http://127.0.0.1:{free_port()}/derp/admit") as (url, lines):
        assert not await connects(url, bytes(PrivateKey.generate()), wait=1.0)
        await until_logged(lines, "admission_error")
