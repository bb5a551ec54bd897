"""Issue 11.2: nothing the server writes is wider than its owner, from the first instant.

A watcher thread polls every path under the data dir (lstat, as fast as it can) from before the server starts
until it has stopped, and remembers the widest mode it ever saw per path. Directories may be 0700 at most,
everything else (the admin socket, shoal.db and its -wal/-shm, server.lock, key files, and whatever later code adds
there) 0600 at most.
"""

from __future__ import annotations

import asyncio
import os
import signal
import stat
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from nacl.public import PrivateKey

from coord import wire
from node.control import ControlClient
from tests.coord.harness import free_port
from tests.coord.test_crash import start_server
from tests.coord.util import cli, cli_json


class Watcher(threading.Thread):
    def __init__(self, root: Path) -> None:
        super().__init__(daemon=True)
        self.root = root
        self.widest: dict[str, int] = {}
        self.rounds = 0
        self._halt = threading.Event()

    def _see(self, path: str) -> bool:
        try:
            st = os.lstat(path)
        except FileNotFoundError:
            return False
        mode = stat.S_IMODE(st.st_mode)
        name = os.path.relpath(path, self.root.parent)
        if mode | self.widest.get(name, 0) != self.widest.get(name, 0):
            self.widest[name] = self.widest.get(name, 0) | mode
        return stat.S_ISDIR(st.st_mode)

    def run(self) -> None:
        while not self._halt.is_set():
            self.rounds += 1
            todo = [str(self.root)]
            while todo:
                path = todo.pop()
                if not self._see(path):
                    continue
                try:
                    names = os.listdir(path)
                except OSError:
                    continue
                for n in names:
                    p = os.path.join(path, n)
                    if self._see(p):
                        todo.append(p)

    def stop(self) -> None:
        self._halt.set()
        self.join(10)

    def too_wide(self) -> dict[str, str]:
        out = {}
        for name, mode in sorted(self.widest.items()):
            is_dir = os.path.isdir(self.root.parent / name) or name == self.root.name
            if mode & 0o077:
                out[name] = f"{mode:04o} ({'dir' if is_dir else 'file'})"
        return out


@contextmanager
def watching(root: Path) -> Iterator[Watcher]:
    w = Watcher(root)
    w.start()
    try:
        yield w
    finally:
        w.stop()


async def register(url: str, auth_key: str) -> None:
    m = PrivateKey.generate()
    c = ControlClient(url, bytes(m), bytes(m.public_key), timeout=10)
    try:
        await c.pin()
        resp = await c.register(wire.RegisterRequest(node_key=os.urandom(32), disco_key=os.urandom(32),
                                                     auth_key=auth_key, hostinfo=wire.Hostinfo(hostname="modes")))
        assert resp["MachineAuthorized"], resp
    finally:
        await c.close()


def test_sec_modes_never_wider_than_owner(tmp_path: Path) -> None:
    data, port = tmp_path / "data", free_port()
    with watching(data) as w:
        # the CLI running in-process on a fresh dir (no server yet) creates the dir and the database
        cli(data, "users", "create", "early")
        server = start_server(data, port)
        try:
            cli(data, "users", "create", "alice")
            key = cli_json(data, "keys", "create", "--user", "alice", "--reusable")["key"]
            asyncio.run(register(f"http://127.0.0.1:{port}", key))
            cli(data, "nodes", "list")
        finally:
            server.send_signal(signal.SIGTERM)
            server.wait(20)
        time.sleep(0.05)
    names = set(w.widest)
    assert w.rounds > 100, f"the watcher looked only {w.rounds} times"
    for want in ("data", "data/shoal.db", "data/server.key", "data/server.lock", "data/admin.sock"):
        assert want in names, f"the watcher never saw {want}: saw {sorted(names)}"
    assert not w.too_wide(), f"wider than the owner at some instant: {w.too_wide()}"


def test_sec_modes_existing_wide_files_are_narrowed(tmp_path: Path) -> None:
    """A data dir left by an older version (0755, files 0644) is narrowed before the server uses it."""
    data, port = tmp_path / "data", free_port()
    cli(data, "users", "create", "alice")
    os.chmod(data, 0o755)
    for p in data.iterdir():
        os.chmod(p, 0o644)
    server = start_server(data, port)
    try:
        modes = {p.name: stat.S_IMODE(p.lstat().st_mode) for p in [data, *data.iterdir()]}
    finally:
        server.send_signal(signal.SIGTERM)
        server.wait(20)
    wide = {n: f"{m:04o}" for n, m in modes.items() if m & 0o077}
    assert not wide, f"still wider than the owner after start: {wide}"


def test_sec_modes_under_a_permissive_umask(tmp_path: Path) -> None:
    """umask 000 (a careless service manager): the server still creates nothing wider than its owner."""
    data, port = tmp_path / "data", free_port()
    script = (
        "import os, sys, runpy; os.umask(0); sys.argv = ['shoal-server'] + sys.argv[1:]; "
        "runpy.run_module('coord.cli', run_name='__main__')"
    )
    with watching(data) as w:
        proc = subprocess.Popen(
            [sys.executable, "-c", script, "serve", "--data", str(data), "--listen", f"127.0.0.1:{port}",
             "--server-url", f"http://127.0.0.1:{port}", "--no-derp", "--stun-listen", "", "--log-level", "warning"],
            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, env={**os.environ, "SHOAL_CONFIG": ""},
        )
        try:
            deadline = time.monotonic() + 20
            while not (data / "admin.sock").exists():
                assert proc.poll() is None, proc.stderr.read() if proc.stderr else b""
                assert time.monotonic() < deadline, "server did not start"
                time.sleep(0.05)
            cli(data, "users", "create", "alice")
        finally:
            proc.send_signal(signal.SIGTERM)
            proc.wait(20)
    assert "data/admin.sock" in w.widest
    assert not w.too_wide(), f"wider than the owner at some instant: {w.too_wide()}"
