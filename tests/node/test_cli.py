"""shoal and shoald as processes: one-line errors, exit codes, the local API's 400s, the socket's mode, state errors.

The daemon here never gets a netmap (no server answers), so it touches nothing outside its temp dir."""

from __future__ import annotations

import json
import os
import socket
import stat
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest

from node.keys import KeyStore

PY = sys.executable


def closed_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def shoal(sock: Path, *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([PY, "-m", "node.cli", "--socket", str(sock), *args], capture_output=True, text=True,
                          timeout=60)


def start_daemon(tmp: Path) -> tuple[subprocess.Popen[bytes], Path]:
    sock = tmp / "run" / "shoald.sock"
    with open(tmp / "shoald.log", "wb") as log:  # the child keeps its own copy of the descriptor
        proc = subprocess.Popen([PY, "-m", "node.daemon", "--state-dir", str(tmp / "state"), "--socket",
                                 str(sock), "--iface", "shtestcli0", "--engine", "wireguard-go"],
                                stdout=subprocess.DEVNULL, stderr=log)
    deadline = time.monotonic() + 15
    while not sock.exists():
        if proc.poll() is not None or time.monotonic() > deadline:
            proc.kill()
            raise AssertionError(f"shoald did not start: {(tmp / 'shoald.log').read_text()}")
        time.sleep(0.05)
    return proc, sock


@pytest.fixture
def daemon(tmp_path: Path) -> Iterator[Path]:
    proc, sock = start_daemon(tmp_path)
    try:
        yield sock
    finally:
        proc.terminate()
        assert proc.wait(10) == 0
        assert not sock.exists()


def one_line_error(p: subprocess.CompletedProcess[str], code: int = 1) -> str:
    assert p.returncode == code, (p.returncode, p.stdout, p.stderr)
    lines = p.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("shoal: "), p.stderr
    return lines[0]


def test_no_daemon_is_one_line(tmp_path: Path) -> None:
    line = one_line_error(shoal(tmp_path / "nope.sock", "status"))
    assert "cannot reach shoald" in line and "nope.sock" in line


def test_bad_flags_exit_2(tmp_path: Path) -> None:
    one_line_error(shoal(tmp_path / "x.sock", "up", "--bogus"), 2)
    one_line_error(shoal(tmp_path / "x.sock", "ip", "-4", "-6"), 2)
    one_line_error(shoal(tmp_path / "x.sock", "frobnicate"), 2)


def test_cli_errors_against_a_live_daemon(daemon: Path) -> None:
    assert stat.S_IMODE(os.stat(daemon).st_mode) == 0o600
    st = json.loads(shoal(daemon, "status", "--json").stdout)
    assert st["BackendState"] == "NeedsLogin" and st["Engine"] == "wireguard-go" and st["Peers"] == []
    assert "NeedsLogin" in shoal(daemon, "status").stdout
    assert "no login server" in one_line_error(shoal(daemon, "up"))
    port = closed_port()
    line = one_line_error(shoal(daemon, "up", "--login-server", f"http://127.0.0.1:{port}", "--auth-key", "k"))
    assert "cannot reach" in line and str(port) in line
    assert "must be an http" in one_line_error(shoal(daemon, "up", "--login-server", "ftp://x"))
    assert "tag:name" in one_line_error(shoal(daemon, "up", "--login-server", "http://x", "--advertise-tags", "x"))
    assert "no tailnet address" in one_line_error(shoal(daemon, "ip"))
    assert "no peer named" in one_line_error(shoal(daemon, "ip", "ghost"))
    assert "not logged in" in one_line_error(shoal(daemon, "logout"))
    # down while never up is harmless
    assert shoal(daemon, "down").returncode == 0


def test_local_api_answers_garbage_with_400(daemon: Path) -> None:
    with httpx.Client(transport=httpx.HTTPTransport(uds=str(daemon)), base_url="http://shoald") as h:
        for body in (b"{", b"[1]", b"\xff\xfe", b'{"login_server": 5}', b'{"nope": 1}',
                     b'{"advertise_tags": ["x"]}', b'{"wait": -1}', b'{"wait": true}'):
            r = h.post("/up", content=body)
            assert r.status_code == 400, (body, r.text)
            assert r.json()["error"].startswith("bad request")
        assert h.post("/down", content=b"not json").status_code == 400
        assert h.post("/up", content=b"x" * (70 << 10)).status_code == 400
        assert h.get("/up").status_code == 405
        assert h.get("/nothing").status_code == 404
    # bytes that are not HTTP at all
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as s:
        s.settimeout(5)
        s.connect(str(daemon))
        s.sendall(b"\x00\x01garbage garbage\r\n\r\n")
        assert s.recv(100).startswith(b"HTTP/1.1 400")
    # and it still serves
    with httpx.Client(transport=httpx.HTTPTransport(uds=str(daemon)), base_url="http://shoald") as h:
        assert h.get("/status").status_code == 200


def test_second_daemon_on_same_state_dir_refused(daemon: Path, tmp_path: Path) -> None:
    p = subprocess.run([PY, "-m", "node.daemon", "--state-dir", str(tmp_path / "state"), "--socket",
                        str(tmp_path / "other.sock"), "--engine", "wireguard-go"], capture_output=True, text=True,
                       timeout=30)
    assert p.returncode == 1 and "another shoald is running" in p.stderr


def test_keys_persist_and_a_corrupt_state_file_is_named(tmp_path: Path) -> None:
    proc, _ = start_daemon(tmp_path)
    proc.terminate()
    assert proc.wait(10) == 0
    keys = KeyStore(tmp_path / "state")
    for prefix in ("mkey", "nodekey", "discokey"):
        assert stat.S_IMODE(os.stat(keys.path(prefix)).st_mode) == 0o600
    machine = keys.load("mkey")
    proc, _ = start_daemon(tmp_path)
    proc.terminate()
    assert proc.wait(10) == 0
    assert keys.load("mkey") == machine, "a restart must keep the identity"
    for name, junk in (("node.key", "privkey:xyz\n"), ("prefs.json", "{not json"), ("netmap.json", "[]")):
        path = tmp_path / "state" / name
        saved = path.read_bytes() if path.exists() else None
        path.write_text(junk)
        p = subprocess.run([PY, "-m", "node.daemon", "--state-dir", str(tmp_path / "state"), "--socket",
                            str(tmp_path / "s.sock"), "--engine", "wireguard-go"], capture_output=True, text=True,
                           timeout=30)
        assert p.returncode == 1, p.stderr
        assert str(path) in p.stderr and "delete it" in p.stderr, p.stderr
        assert path.read_text() == junk, "the bad file must be left for the admin"
        if saved is None:
            path.unlink()
        else:
            path.write_bytes(saved)
