"""``shoal-server doctor`` (issue 23.5) against real running servers on loopback: a healthy deployment, then
widened secrets, a URL that reaches another server, a stopped server; and the clock verdicts."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

from coord.doctor import Status, clock_check, mode_check
from tests.coord.harness import free_port
from tests.ops.test_metrics import stop, wait_http

NOW = 1_800_000_000.0


def write_config(path: Path, data: Path, port: int, url_port: int | None = None) -> Path:
    stun, metrics = free_port(), free_port()
    path.write_text(
        f'server_url = "http://127.0.0.1:{url_port or port}"\nlisten = "127.0.0.1:{port}"\n'
        f'data_dir = "{data}"\nstun_listen = "127.0.0.1:{stun}"\nmetrics_listen = "127.0.0.1:{metrics}"\n'
    )
    return path


def serve(config: Path) -> subprocess.Popen[bytes]:
    proc = subprocess.Popen([sys.executable, "-m", "coord.cli", "serve", "--config", str(config),
                             "--log-level", "warning"],
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, env={**os.environ, "SHOAL_CONFIG": ""})
    port = config.read_text().split('listen = "127.0.0.1:')[1].split('"')[0]
    wait_http(f"http://127.0.0.1:{port}/health", proc)
    return proc


def doctor(config: Path) -> tuple[int, list[dict[str, Any]], str]:
    env = {**os.environ, "SHOAL_CONFIG": ""}
    j = subprocess.run([sys.executable, "-m", "coord.cli", "doctor", "--config", str(config), "--json"],
                       capture_output=True, text=True, timeout=60, env=env)
    t = subprocess.run([sys.executable, "-m", "coord.cli", "doctor", "--config", str(config)],
                       capture_output=True, text=True, timeout=60, env=env)
    assert j.returncode == t.returncode, (j, t)
    return j.returncode, json.loads(j.stdout), t.stdout


def by_name(checks: list[dict[str, Any]]) -> dict[str, dict[str, Any]]:
    return {c["name"]: c for c in checks}


def test_doctor_healthy_then_broken_deployment(tmp_path: Path) -> None:
    data, port = tmp_path / "data", free_port()
    config = write_config(tmp_path / "server.toml", data, port)
    proc = serve(config)
    try:
        rc, checks, text = doctor(config)
        print(text)
        assert rc == 0, text
        assert all(c["status"] == "ok" for c in checks), text
        names = by_name(checks)
        assert "answers with this server's key" in names["server_url"]["detail"]
        assert "STUN on UDP" in names["relay 900/900a"]["detail"]
        assert {"file server.key", "file derp.key", "file checkpoint.key", "file shoal.db", "file admin.sock",
                "data_dir", "clock", "metrics"} <= set(names)
        assert text.rstrip().endswith("all good")

        # A restore that widened the modes: each is named with the chmod that fixes it.
        (data / "server.key").chmod(0o644)
        data.chmod(0o755)
        rc, checks, text = doctor(config)
        names = by_name(checks)
        assert rc == 1
        assert names["file server.key"]["status"] == "fail" and f"chmod 600 {data / 'server.key'}" in text
        assert names["data_dir"]["status"] == "fail" and f"chmod 700 {data}" in text
        (data / "server.key").chmod(0o600)
        data.chmod(0o700)

        # The URL reaches another server (say, a proxy pointing at the wrong one).
        other = write_config(tmp_path / "other.toml", tmp_path / "other", free_port())
        wrong = write_config(tmp_path / "wrong.toml", data, port, url_port=int(
            other.read_text().split('listen = "127.0.0.1:')[1].split('"')[0]))
        proc2 = serve(other)
        try:
            rc, checks, text = doctor(wrong)
            assert rc == 1 and "reaches another server" in by_name(checks)["server_url"]["fix"], text
        finally:
            stop(proc2)
    finally:
        stop(proc)
    # Stopped: the URL does not answer, and doctor says to start it.
    rc, checks, text = doctor(config)
    assert rc == 1 and by_name(checks)["server_url"]["status"] == "fail"
    assert "start the server" in text


def test_doctor_verdicts() -> None:
    assert clock_check(NOW, NOW - 10, None).status is Status.OK
    back = clock_check(NOW, NOW + 600, None)
    assert back.status is Status.FAIL and "600 s in the future" in back.detail
    skew = clock_check(NOW, None, NOW + 45)
    assert skew.status is Status.WARN and "+45 s" in skew.detail
    p = Path("/srv/x/server.key")
    assert mode_check("k", p, 0o600, 0o600).status is Status.OK
    assert mode_check("k", p, 0o400, 0o600).status is Status.OK
    assert mode_check("k", p, 0o640, 0o600).status is Status.FAIL
    assert mode_check("k", p, None, 0o600).status is Status.OK


def test_doctor_postgres_replica_and_unreachable_database(tmp_path: Path, pg_dsn: str) -> None:
    """With ``postgres`` set: the database answers, its log head, the replica's heartbeat; then the server stops (its
    heartbeat goes stale: a warning) and a URL to no database is a failure, with the password hidden."""
    data, port = tmp_path / "data", free_port()
    config = write_config(tmp_path / "server.toml", data, port)
    config.write_text(config.read_text() + f'postgres = "{pg_dsn}"\n')
    proc = serve(config)
    try:
        for _ in range(50):  # the first heartbeat comes a moment after start
            rc, checks, text = doctor(config)
            if any(c["name"].startswith("replica ") for c in checks):
                break
        print(text)
        got = by_name(checks)
        assert rc == 0, text
        assert got["storage"]["status"] == "ok" and "log head" in got["storage"]["detail"]
        (replica,) = [c for c in checks if c["name"].startswith("replica ")]
        assert replica["status"] == "ok" and f"127.0.0.1:{port}" in replica["name"] and "up" in replica["detail"]
    finally:
        proc.kill()  # a crash: the replica's row stays, its heartbeat ages
        proc.wait(10)
    import time

    time.sleep(6)  # past the stale heartbeat threshold (doctor.REPLICA_STALE_S)
    rc, checks, text = doctor(config)
    print(text)
    (replica,) = [c for c in checks if c["name"].startswith("replica ")]
    assert replica["status"] == "warn" and "(down)" in replica["detail"], text
    bad = tmp_path / "bad.toml"
    bad.write_text(config.read_text().replace(pg_dsn, "postgresql://shoal:s3cret@127.0.0.1:1/none"))
    rc, checks, text = doctor(bad)
    assert rc == 1 and by_name(checks)["storage"]["status"] == "fail", text
    assert "s3cret" not in text and "shoal:***@127.0.0.1:1" in text
