"""SIGKILL the server while another process registers nodes: nothing acknowledged is lost, the log stays whole."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

from tests.coord.harness import free_port
from tests.coord.util import cli, cli_json

REGISTRAR = r"""
import asyncio, os, sys
from nacl.public import PrivateKey
from coord import wire
from node.control import ControlClient

url, key, out = sys.argv[1], sys.argv[2], sys.argv[3]

async def main() -> None:
    with open(out, "a") as f:
        i = 0
        while True:
            m = PrivateKey.generate()
            c = ControlClient(url, bytes(m), bytes(m.public_key), timeout=5)
            try:
                await c.pin()
                resp = await c.register(wire.RegisterRequest(
                    node_key=os.urandom(32), disco_key=os.urandom(32), auth_key=key,
                    hostinfo=wire.Hostinfo(hostname=f"crash-{i}")))
            except Exception as e:
                print(f"registration {i} failed: {e}", file=sys.stderr, flush=True)
                return
            finally:
                await c.close()
            if resp.get("MachineAuthorized"):
                f.write(wire.key_text("mkey", bytes(m.public_key)) + "\n")
                f.flush()
            i += 1

asyncio.run(main())
"""


def start_server(data: Path, port: int) -> subprocess.Popen[bytes]:
    proc = subprocess.Popen(
        [sys.executable, "-m", "coord.cli", "serve", "--data", str(data), "--listen", f"127.0.0.1:{port}",
         "--server-url", f"http://127.0.0.1:{port}", "--no-derp", "--stun-listen", "", "--log-level", "warning"],
        stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, env={**os.environ, "SHOAL_CONFIG": ""},
    )
    deadline = time.monotonic() + 20
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise AssertionError(f"server exited {proc.returncode}: {proc.stderr.read() if proc.stderr else ''!r}")
        try:
            with urllib.request.urlopen(f"http://127.0.0.1:{port}/health", timeout=1) as r:
                if r.status == 200 and (data / "admin.sock").exists():
                    return proc
        except OSError:
            pass
        time.sleep(0.05)
    proc.kill()
    raise AssertionError("server did not start")


def acked(path: Path) -> list[str]:
    return [x for x in path.read_text().splitlines() if x] if path.exists() else []


def test_sigkill_during_registrations(tmp_path: Path) -> None:
    data, port = tmp_path / "data", free_port()
    server = start_server(data, port)
    registrar = None
    try:
        cli(data, "users", "create", "crash")
        key = cli_json(data, "keys", "create", "--user", "crash", "--reusable", "--expiration", "1h")["key"]
        out = tmp_path / "acked.txt"
        registrar = subprocess.Popen([sys.executable, "-c", REGISTRAR, f"http://127.0.0.1:{port}", key, str(out)],
                                     stderr=subprocess.PIPE, text=True)
        deadline = time.monotonic() + 60
        while len(acked(out)) < 150:
            assert registrar.poll() is None, registrar.stderr.read() if registrar.stderr else ""
            assert time.monotonic() < deadline, f"only {len(acked(out))} registrations in 60 s"
            time.sleep(0.01)
        server.send_signal(signal.SIGKILL)
        server.wait(10)
        registrar.wait(30)
        assert registrar.stderr is not None and "failed" in registrar.stderr.read()
        acknowledged = acked(out)
        assert len(acknowledged) >= 150
        # the data dir of a killed server: the stale lock is free, the stale socket is replaced
        server = start_server(data, port)

        verify = cli_json(data, "events", "verify")
        assert verify["ok"] is True
        replay = cli_json(data, "events", "replay", "--into", str(tmp_path / "replayed.db"))
        assert replay["projections_equal_live"] is True and replay["events"] == verify["events"]
        nodes = cli_json(data, "nodes", "list")
        have = {n["machine_key"] for n in nodes}
        missing = [m for m in acknowledged if m not in have]
        assert not missing, f"{len(missing)} acknowledged registrations lost, e.g. {missing[:2]}"
        # at most the one in flight was committed without its answer arriving
        assert len(nodes) - len(acknowledged) in (0, 1)
        assert len({n["ipv4"] for n in nodes}) == len(nodes) and len({n["name"] for n in nodes}) == len(nodes)
        # the restarted server takes registrations again, on fresh addresses
        out2 = tmp_path / "after.txt"
        again = subprocess.Popen([sys.executable, "-c", REGISTRAR, f"http://127.0.0.1:{port}", key, str(out2)],
                                 stderr=subprocess.DEVNULL)
        deadline = time.monotonic() + 30
        while len(acked(out2)) < 5 and time.monotonic() < deadline:
            time.sleep(0.05)
        again.kill()
        again.wait(10)
        assert len(acked(out2)) >= 5
        after = cli_json(data, "nodes", "list")
        assert len({n["ipv4"] for n in after}) == len(after)
        assert cli_json(data, "events", "verify")["ok"]
        health = json.loads(urllib.request.urlopen(f"http://127.0.0.1:{port}/health", timeout=5).read())
        assert health["nodes"] == len(after)
    finally:
        for p in (registrar, server):
            if p is not None and p.poll() is None:
                p.kill()
                p.wait(10)
