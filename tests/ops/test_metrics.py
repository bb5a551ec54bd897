"""Prometheus metrics (issue 23.1): the real ``shoal-server serve`` and ``shoal-derp`` processes on loopback, their
``/metrics`` checked by ``promtool check metrics`` (Debian's prometheus 2.42), and a real Prometheus that scrapes
the server and answers a query through its HTTP API."""

from __future__ import annotations

import asyncio
import json
import os
import re
import signal
import subprocess
import sys
import time
import urllib.parse
import urllib.request
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from prometheus_client import CollectorRegistry, Counter

from derp.expose import respond
from tests.coord.harness import free_port, sim_node
from tests.coord.test_server import next_map
from tests.coord.util import cli

PROMTOOL = "/usr/bin/promtool"
PROMETHEUS = "/usr/bin/prometheus"


def get(url: str, timeout: float = 2.0) -> tuple[int, str, str]:
    with urllib.request.urlopen(url, timeout=timeout) as r:
        return r.status, r.headers.get("Content-Type", ""), r.read().decode()


def wait_http(url: str, proc: subprocess.Popen[bytes], seconds: float = 20.0) -> None:
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise AssertionError(f"exited {proc.returncode}: {proc.stderr.read() if proc.stderr else b''!r}")
        try:
            get(url, 1)
            return
        except OSError:
            time.sleep(0.05)
    raise AssertionError(f"{url} did not answer in {seconds}s")


def stop(proc: subprocess.Popen[bytes]) -> None:
    if proc.poll() is None:
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(20)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(5)


class Server:
    def __init__(self, data: Path) -> None:
        self.data, self.port, self.mport = data, free_port(), free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.metrics_url = f"http://127.0.0.1:{self.mport}/metrics"


@pytest.fixture
def server(tmp_path: Path) -> Iterator[Server]:
    s = Server(tmp_path / "data")
    proc = subprocess.Popen(
        [sys.executable, "-m", "coord.cli", "serve", "--data", str(s.data), "--listen", f"127.0.0.1:{s.port}",
         "--server-url", s.url, "--stun-listen", "", "--metrics-listen", f"127.0.0.1:{s.mport}",
         "--batch-delay", "10ms", "--log-level", "warning"],
        stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, env={**os.environ, "SHOAL_CONFIG": ""},
    )
    try:
        wait_http(f"{s.url}/health", proc)
        wait_http(s.metrics_url, proc)
        yield s
    finally:
        stop(proc)


def promtool(text: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([PROMTOOL, "check", "metrics"], input=text, capture_output=True, text=True, timeout=30)


def value(text: str, series: str) -> float:
    m = re.search(rf"^{re.escape(series)} (\S+)$", text, re.M)
    assert m, f"no {series} in:\n{text}"
    return float(m.group(1))


async def stream_one_node(url: str, key: str) -> None:
    """A node registers and holds its map stream open while the caller scrapes."""
    n = sim_node(url, "alpha")
    await n.join(key)
    it = n.client.stream(n.map_request())
    try:
        await next_map(it)
        await asyncio.sleep(30)
    finally:
        await it.aclose()
        await n.client.close()


def test_metrics_server_promtool_clean(server: Server) -> None:
    cli(server.data, "users", "create", "alice")
    key = cli(server.data, "keys", "create", "--user", "alice").stdout.split()[0]

    async def scrape_with_a_node() -> str:
        task = asyncio.create_task(stream_one_node(server.url, key))
        try:
            deadline = time.monotonic() + 10
            while True:
                text = (await asyncio.to_thread(get, server.metrics_url))[2]
                if value(text, "shoal_map_sessions") == 1 or time.monotonic() > deadline:
                    return text
                if task.done():
                    task.result()
                await asyncio.sleep(0.05)
        finally:
            task.cancel()
            await asyncio.gather(task, return_exceptions=True)

    text = asyncio.run(scrape_with_a_node())
    status, ctype, _ = get(server.metrics_url)
    assert status == 200 and ctype.startswith("text/plain; version=0.0.4")
    checked = promtool(text)
    print(f"promtool check metrics: rc={checked.returncode} stdout={checked.stdout!r} stderr={checked.stderr!r}")
    assert checked.returncode == 0 and checked.stdout == "" and checked.stderr == ""
    # What happened is what the series say: user + key + node registered, one stream open, one node online.
    assert value(text, "shoal_events_appended_total") >= 3
    assert value(text, "shoal_append_seconds_count") >= 3
    assert value(text, "shoal_map_sessions") == 1
    assert value(text, 'shoal_nodes{state="online"}') == 1
    assert value(text, 'shoal_requests_refused_total{reason="rate"}') == 0
    assert value(text, "shoal_fanout_seconds_count") >= 1
    # The embedded relay's series are in the same registry; no key or address is a label value.
    assert value(text, "derp_clients") == 0
    labels = re.findall(r'="([^"]*)"', text)
    assert labels and all(re.fullmatch(r"[a-z_]+|[0-9.+Inf]+", v) for v in labels), labels
    # Not on the public port.
    with pytest.raises(urllib.error.HTTPError):
        get(f"{server.url}/metrics")


def test_metrics_relay_promtool_clean(tmp_path: Path) -> None:
    port, mport = free_port(), free_port()
    proc = subprocess.Popen(
        [sys.executable, "-m", "derp.cli", "--addr", f"127.0.0.1:{port}", "--no-stun", "--key-file",
         str(tmp_path / "derp.key"), "--metrics-listen", f"127.0.0.1:{mport}", "--log-level", "warning"],
        stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
    )
    try:
        wait_http(f"http://127.0.0.1:{mport}/metrics", proc)
        text = get(f"http://127.0.0.1:{mport}/metrics")[2]
        checked = promtool(text)
        assert checked.returncode == 0 and checked.stdout == "" and checked.stderr == "", checked
        assert value(text, "derp_clients") == 0
        assert value(text, 'derp_packets_dropped_total{reason="queue_full"}') == 0
        with pytest.raises(urllib.error.HTTPError) as e:
            get(f"http://127.0.0.1:{mport}/other")
        assert e.value.code == 404
    finally:
        stop(proc)


def test_metrics_promtool_rejects_broken_exposition() -> None:
    # The check can fail: promtool flags a counter without _total and a malformed line.
    bad = "# TYPE shoal_things counter\nshoal_things 1\n"
    assert "counter metrics should have \"_total\" suffix" in promtool(bad).stdout + promtool(bad).stderr
    assert promtool("shoal_x{a=} 1\n").returncode != 0


def query(prom: str, q: str) -> list[dict[str, Any]]:
    url = f"{prom}/api/v1/query?" + urllib.parse.urlencode({"query": q})
    body = json.loads(get(url)[2])
    assert body["status"] == "success", body
    result: list[dict[str, Any]] = body["data"]["result"]
    return result


def test_metrics_prometheus_scrapes_the_server(server: Server, tmp_path: Path) -> None:
    cli(server.data, "users", "create", "alice")
    cli(server.data, "users", "create", "bob")
    pport = free_port()
    conf = tmp_path / "prometheus.yml"
    conf.write_text(
        "global:\n  scrape_interval: 1s\n  evaluation_interval: 1s\n"
        "scrape_configs:\n  - job_name: shoal\n    static_configs:\n"
        f"      - targets: ['127.0.0.1:{server.mport}']\n"
    )
    log = (tmp_path / "prometheus.log").open("wb")
    prom = subprocess.Popen(
        [PROMETHEUS, f"--config.file={conf}", f"--storage.tsdb.path={tmp_path / 'tsdb'}",
         f"--web.listen-address=127.0.0.1:{pport}", "--log.level=warn"],
        stdout=log, stderr=subprocess.STDOUT, cwd=tmp_path,
    )
    base = f"http://127.0.0.1:{pport}"
    try:
        wait_http(f"{base}/-/ready", prom, 30)
        deadline, result = time.monotonic() + 30, []
        while time.monotonic() < deadline:
            result = query(base, 'shoal_events_appended_total{job="shoal"}')
            if result:
                break
            time.sleep(0.25)
        print("prometheus /api/v1/query shoal_events_appended_total:", json.dumps(result))
        assert len(result) == 1 and result[0]["metric"]["instance"] == f"127.0.0.1:{server.mport}"
        assert float(result[0]["value"][1]) >= 2  # two users created
        up = query(base, 'up{job="shoal"}')
        assert [r["value"][1] for r in up] == ["1"]
        online = query(base, 'shoal_nodes{state="online"}')
        assert [r["value"][1] for r in online] == ["0"]
    finally:
        stop(prom)
        log.close()


@given(st.binary(max_size=300))
@settings(max_examples=300, deadline=None)
def test_metrics_listener_answers_any_head(head: bytes) -> None:
    # The listener's request parsing (derp/expose.py): any bytes get one well-formed response, never a crash.
    reg = CollectorRegistry()
    out = respond(reg, head + b"\r\n\r\n")
    status = out.split(b"\r\n", 1)[0]
    assert status in (b"HTTP/1.1 200 OK", b"HTTP/1.1 400 Bad Request", b"HTTP/1.1 404 Not Found",
                      b"HTTP/1.1 405 Method Not Allowed")
    line = head.split(b"\r\n", 1)[0].split()
    scrape = (len(line) == 3 and line[2].startswith(b"HTTP/") and line[1].split(b"?")[0] == b"/metrics"
              and line[0] in (b"GET", b"HEAD"))
    assert status.endswith(b"200 OK") == scrape


def test_metrics_listener_paths() -> None:
    reg = CollectorRegistry()
    Counter("shoal_x", "x", registry=reg).inc()
    ok = respond(reg, b"GET /metrics HTTP/1.1\r\nHost: x\r\n\r\n")
    assert ok.startswith(b"HTTP/1.1 200 OK\r\n") and b"shoal_x_total 1.0" in ok
    assert b"Content-Type: text/plain; version=0.0.4; charset=utf-8" in ok
    head = respond(reg, b"HEAD /metrics?x=1 HTTP/1.1\r\n\r\n")
    assert head.startswith(b"HTTP/1.1 200 OK") and head.endswith(b"\r\n\r\n")
    assert respond(reg, b"POST /metrics HTTP/1.1\r\n\r\n").startswith(b"HTTP/1.1 405")
    assert respond(reg, b"GET / HTTP/1.1\r\n\r\n").startswith(b"HTTP/1.1 404")
    assert respond(reg, b"\x00garbage\r\n\r\n").startswith(b"HTTP/1.1 400")
