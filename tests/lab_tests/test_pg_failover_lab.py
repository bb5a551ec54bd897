"""High availability in the lab (issue 20): three shoal-server replicas on one PostgreSQL (tests/pgcluster.py, its
unix socket reached from the server namespace), real shoald + wireguard-go nodes spread over them, each given all
three URLs. kill -9 of the replica holding a node's stream: the node streams from another replica within 10 s,
its tunnel never drops (every ping answered), and a node that joins meanwhile is seen by all."""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import time
from typing import Any

import pytest

from tests.lab import one_lan
from tests.lab.lab import LabError
from tests.lab_tests.tailnet import PY, Tailnet, _connectable

pytestmark = pytest.mark.lab

SHARED_KEYS = ("server.key", "checkpoint.key", "derp.key")
PORTS = (8080, 8081, 8082)


def start_replicas(tn: Tailnet, dsn: str) -> list[tuple[str, subprocess.Popen[bytes]]]:
    out = []
    for i, port in enumerate(PORTS):
        data = tn.data if i == 0 else tn.workdir / f"replica{i}"
        data.mkdir(parents=True, exist_ok=True, mode=0o700)
        if i > 0:
            for k in SHARED_KEYS:  # the admin copies the first replica's keys, 0600
                if (tn.data / k).exists():
                    shutil.copy2(tn.data / k, data / k)
        url = f"http://{tn.server_addr}:{port}"
        argv = [PY, "-m", "coord.cli", "serve", "--data", str(data), "--listen", f"{tn.server_addr}:{port}",
                "--server-url", url, "--stun-listen", "", "--no-derp", "--batch-delay", "10ms",
                "--log-level", "warning"]
        proc = tn.lab.spawn(tn.server_ns, argv, log_path=tn.workdir / f"replica{i}.log",
                            env={**os.environ, "SHOAL_POSTGRES": dsn, "SHOAL_REPLICA_NAME": f"r{i}"})
        deadline = time.monotonic() + 20
        while not _connectable(data / "admin.sock"):
            if proc.poll() is not None or time.monotonic() > deadline:
                raise LabError(f"replica {i}: {(tn.workdir / f'replica{i}.log').read_text()[-2000:]}")
            time.sleep(0.05)
        out.append((url, proc))
    return out


def replicas(tn: Tailnet, dsn: str) -> dict[str, Any]:
    p = subprocess.run([PY, "-m", "coord.cli", "replicas", "--data", str(tn.workdir / "replica1"), "--json"],
                       capture_output=True, text=True, timeout=30, env={**os.environ, "SHOAL_POSTGRES": dsn})
    assert p.returncode == 0, p.stderr
    return {r["name"]: r for r in json.loads(p.stdout)["replicas"]}


def test_pg_failover_lab_kill9_moves_nodes_and_keeps_tunnels(tailnet: Tailnet, pg_dsn: str) -> None:
    tn, lab = tailnet, tailnet.lab
    lab.build(one_lan(4))
    rs = start_replicas(tn, pg_dsn)
    urls = [u for u, _ in rs]
    key = tn.auth_key()
    names = ["n1", "n2", "n3"]
    for i, n in enumerate(names):
        tn.start_agent(n)
        order = urls[i:] + urls[:i]  # n1 prefers r0, n2 r1, n3 r2
        servers = [a for u in order for a in ("--login-server", u)]
        tn.shoal(n, "up", *servers, "--auth-key", key, "--hostname", n)
    for n in names:
        tn.wait_for(f"{n} sees its peers", lambda n=n: len(tn.peer_names(n)) == 2, timeout=15)
    addr2 = tn.ip("n2")
    assert tn.ping("n1", addr2)
    tn.wait_for("a stream on every replica", lambda: all(r["streams"] == 1 for r in replicas(tn, pg_dsn).values()),
                timeout=10)
    # 60 pings n1 -> n2 across the kill
    pinger = subprocess.Popen(["ip", "netns", "exec", tn.agent_ns["n1"], "ping", "-c", "60", "-i", "0.2", "-W", "2",
                               addr2], stdout=subprocess.PIPE, text=True)
    time.sleep(1.0)
    t0 = time.monotonic()
    rs[0][1].send_signal(signal.SIGKILL)
    rs[0][1].wait(10)
    # n1's stream is on r1 or r2 within 10 s
    took = tn.wait_for("n1 on another replica", lambda: (
        lambda by: sum(by[r]["streams"] for r in ("r1", "r2")) == 3)(replicas(tn, pg_dsn)), timeout=10, step=0.2)
    # a node that joins meanwhile (through r2) is seen by all
    tn.start_agent("n4")
    tn.shoal("n4", "up", "--login-server", urls[2], "--login-server", urls[1], "--auth-key", key, "--hostname", "n4")
    for n in names:
        tn.wait_for(f"{n} sees n4", lambda n=n: "n4" in tn.peer_names(n), timeout=10)
    out, _ = pinger.communicate(timeout=30)
    print(f"\nkill -9 r0: n1 streaming from another replica after {took:.1f} s "
          f"({time.monotonic() - t0:.1f} s incl. n4 join); ping: {out.strip().splitlines()[-2]}")
    assert " 60 received" in out, out
    assert tn.ping("n1", tn.ip("n4"), wait=5)
