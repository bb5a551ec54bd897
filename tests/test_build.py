"""The release artifacts of ``scripts/build``: the single-file server and the wheel.

The build runs once per test session (a module fixture; PyInstaller takes a while). The executable is then copied
into an otherwise empty directory and run from there with an empty environment (``env -i``): no venv, no PATH, no
HOME, nothing of the repository. It must carry the README's walkthrough: serve, users create, keys create, nodes
list, and a real client registering with the key it printed.
"""

from __future__ import annotations

import asyncio
import json
import shutil
import signal
import subprocess
import sys
import time
import urllib.request
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from tests.coord.harness import free_port, sim_node

ROOT = Path(__file__).resolve().parent.parent


@pytest.fixture(scope="module")
def built() -> Iterator[Path]:
    t0 = time.monotonic()
    r = subprocess.run([str(ROOT / "scripts" / "build")], cwd=ROOT, capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, f"scripts/build failed:\n{r.stdout}\n{r.stderr}"
    print(f"scripts/build took {time.monotonic() - t0:.1f} s")
    yield ROOT / "dist"


def bare(exe: Path, cwd: Path, *args: str, timeout: float = 60) -> subprocess.CompletedProcess[str]:
    """Runs the executable the way a machine without Python would: env -i, from cwd."""
    return subprocess.run(["env", "-i", str(exe), *args], cwd=cwd, capture_output=True, text=True, timeout=timeout)


def test_build_single_file_runs_the_walkthrough_with_an_empty_environment(built: Path, tmp_path: Path) -> None:
    box = tmp_path / "box"
    box.mkdir()
    exe = box / "shoal-server"
    shutil.copy2(built / "bin" / "shoal-server", exe)
    size = exe.stat().st_size
    t0 = time.monotonic()
    r = bare(exe, box, "--help")
    started = time.monotonic() - t0
    assert r.returncode == 0 and "shoal-server" in r.stdout, r.stderr
    print(f"dist/bin/shoal-server: {size / 1e6:.1f} MB, --help in {started:.2f} s under env -i")

    port = free_port()
    url = f"http://127.0.0.1:{port}"
    server = subprocess.Popen(
        ["env", "-i", str(exe), "serve", "--listen", f"127.0.0.1:{port}", "--server-url", url,
         "--stun-listen", "", "--log-level", "warning"],
        cwd=box, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
    )
    try:
        data = box / "data"  # the default data dir, relative to where it was started
        deadline = time.monotonic() + 30
        while True:
            assert server.poll() is None, server.stderr.read() if server.stderr else ""
            try:
                with urllib.request.urlopen(f"{url}/health", timeout=1) as h:
                    if h.status == 200 and (data / "admin.sock").exists():
                        break
            except OSError:
                pass
            assert time.monotonic() < deadline, "the single-file server did not start"
            time.sleep(0.05)

        r = bare(exe, box, "users", "create", "alice@example.com")
        assert r.returncode == 0, r.stderr
        r = bare(exe, box, "keys", "create", "--user", "alice@example.com", "--reusable")
        assert r.returncode == 0, r.stderr
        key = r.stdout.split()[0]
        assert key.startswith("skey-")

        # the key works: a real control client registers with it against the frozen server
        node = sim_node(url, "laptop")

        async def join() -> dict[str, Any]:
            resp = await node.join(key)
            await node.client.update(node.map_request(stream=False, endpoints=("192.0.2.10:41641",)))
            await node.client.close()
            return resp

        resp = asyncio.run(join())
        assert not resp.get("AuthURL"), resp

        r = bare(exe, box, "--json", "nodes", "list")
        assert r.returncode == 0, r.stderr
        nodes = json.loads(r.stdout)
        assert [(n["name"], n["user"]) for n in nodes] == [("laptop", "alice@example.com")]
        r = bare(exe, box, "nodes", "list")
        assert "laptop" in r.stdout and "alice@example.com" in r.stdout

        # the commands went to the running server (its admin socket), which applied the migrations it carries
        r = bare(exe, box, "--json", "info")
        assert r.returncode == 0, r.stderr
        assert json.loads(r.stdout)["Running"] is True
        r = bare(exe, box, "events", "verify")
        assert r.returncode == 0, r.stdout + r.stderr

        # a plain-WireGuard device through the laptop: nacl makes the key, segno the QR code, inside the file
        r = bare(exe, box, "devices", "add-wg", "phone", "--via", "laptop", "--user", "alice@example.com",
                 "--qr-png", "phone.png")
        assert r.returncode == 0, r.stderr
        assert "[Interface]" in r.stdout and "Endpoint = 192.0.2.10:41641" in r.stdout
        assert (box / "phone.png").read_bytes()[:4] == b"\x89PNG"
        (box / "phone.png").unlink()
    finally:
        server.send_signal(signal.SIGTERM)
        server.wait(20)
    assert server.returncode == 0, server.stderr.read() if server.stderr else ""
    assert sorted(p.name for p in box.iterdir()) == ["data", "shoal-server"]


def test_build_wheel_installs_all_four_commands(built: Path, tmp_path: Path) -> None:
    wheels = sorted((built / "wheels").glob("shoal-*.whl"))
    assert len(wheels) == 1, wheels
    venv = tmp_path / "venv"
    subprocess.run([sys.executable, "-m", "venv", str(venv)], check=True, timeout=120)
    r = subprocess.run([str(venv / "bin" / "python"), "-m", "pip", "install", "-q", str(wheels[0])],
                       capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stdout + r.stderr
    for cmd in ("shoal-server", "shoal-derp", "shoald", "shoal"):
        exe = venv / "bin" / cmd
        assert exe.exists(), f"the wheel gave no {cmd}"
        r = subprocess.run(["env", "-i", str(exe), "--help"], cwd=tmp_path, capture_output=True, text=True,
                           timeout=60)
        assert r.returncode == 0 and "usage" in r.stdout.lower(), (cmd, r.stdout, r.stderr)
    # the wheel carries the migrations the server needs
    r = subprocess.run(["env", "-i", str(venv / "bin" / "shoal-server"), "--data", str(tmp_path / "d"),
                        "users", "create", "bob"], cwd=tmp_path, capture_output=True, text=True, timeout=60)
    assert r.returncode == 0, r.stderr
