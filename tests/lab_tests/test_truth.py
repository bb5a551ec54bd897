"""Two nodes that start together connect at once, and `shoal status` tells the truth about paths (issue 13).

Two fresh nodes behind their own easy NATs run `shoal up` at the same moment, ten times over; each time both
first netmaps list the other, both engines are new, and a WireGuard handshake collision would cost the 5 s retry.
Every time, within 2 s of both `shoal up` returning, both engines must hold a completed handshake with the
direct (NATed public) endpoint, and pings both ways must all come back within 1 s.
"""

from __future__ import annotations

import shutil
import subprocess
import threading
import time
from concurrent.futures import ThreadPoolExecutor

import pytest

from tests.lab import Topology
from tests.lab_tests.tailnet import Tailnet

pytestmark = pytest.mark.lab

STARTS = 10
HANDSHAKE_WITHIN = 2.0


def wg_peer(tn: Tailnet, name: str) -> tuple[str, int]:
    """(endpoint, latest handshake in unix seconds) of the one peer in `name`'s engine, or ("", 0)."""
    out = tn.lab.exec(name, ["wg", "show", tn.lab.iface(name), "dump"], check=False).stdout.splitlines()
    for line in out[1:]:
        f = line.split("\t")
        return f[2], int(f[4])
    return "", 0


def direct(endpoint: str, router_wan: str) -> bool:
    return endpoint.split(":")[0] == router_wan


def ping_all(tn: Tailnet, src: str, dst: str, count: int = 3) -> str:
    p = subprocess.run(["ip", "netns", "exec", tn.agent_ns[src], "ping", "-n", "-c", str(count), "-i", "0.2",
                        "-W", "1", dst], capture_output=True, text=True, timeout=30)
    return p.stdout


def one_start(tn: Tailnet, key: str, i: int, wan: dict[str, str]) -> tuple[str, dict[str, float], dict[str, str]]:
    """Fresh state, both agents, both `shoal up` at once; then watch both engines and ping both ways."""
    for n in ("a", "b"):
        shutil.rmtree(tn.workdir / n, ignore_errors=True)
    with ThreadPoolExecutor(2) as pool:
        list(pool.map(tn.start_agent, ("a", "b")))
        t0 = time.monotonic()
        done = list(pool.map(lambda n: (tn.up(n, key, "--hostname", f"{n}{i}"), time.monotonic())[1], ("a", "b")))
    up = max(done)
    seen: dict[str, float] = {}
    snapshots: list[str] = []

    def watch() -> None:  # `shoal status` during the first second of the connection
        for _ in range(3):
            at = time.monotonic() - up
            snapshots.append(f"+{at:.2f}s\n" + tn.shoal("a", "status").stdout)

    watcher = threading.Thread(target=watch)
    if i == 0:
        watcher.start()
    while len(seen) < 2 and time.monotonic() - up < 10:
        for n in ("a", "b"):
            if n not in seen:
                ep, hs = wg_peer(tn, n)
                if hs and direct(ep, wan["b" if n == "a" else "a"]):
                    seen[n] = time.monotonic() - up
        time.sleep(0.02)
    if i == 0:
        watcher.join()
        print("`shoal status` on a after both `shoal up` returned:\n" + "\n".join(snapshots))
    ip = {n: tn.ip(n) for n in ("a", "b")}
    with ThreadPoolExecutor(2) as pool:
        pings = dict(zip(("a", "b"), pool.map(lambda n: ping_all(tn, n, ip["b" if n == "a" else "a"]), ("a", "b")),
                         strict=True))
    hs = {n: f"{seen[n]:.3f}s" if n in seen else "none" for n in ("a", "b")}
    line = (f"start {i}: both up {up - t0:.2f}s after they were run; then direct handshake a {hs['a']} "
            f"b {hs['b']}; pings " + "; ".join(
                f"{n}: {next((x for x in p.splitlines() if 'received' in x), p)}" for n, p in pings.items()))
    for n in ("a", "b"):
        tn.stop_agent(n)
    return line, seen, pings


def test_truth_two_fresh_nodes_behind_nats_started_together_handshake_direct_at_once(tailnet: Tailnet) -> None:
    tn, lab = tailnet, tailnet.lab
    lab.build(Topology.parse("lana: easy a; lanb: easy b"))
    tn.start_server("--ephemeral-timeout", "1s", derp=True)
    tn.start_relay2()
    key = tn.auth_key(ephemeral=True)
    wan = {"a": lab.routers["lana"].wan_addr, "b": lab.routers["lanb"].wan_addr}
    t_all = time.monotonic()
    results: list[str] = []
    for i in range(STARTS):
        line, seen, pings = one_start(tn, key, i, wan)
        print(line)
        results.append(line)
        assert len(seen) == 2 and max(seen.values()) <= HANDSHAKE_WITHIN, "\n".join(results)
        for n, p in pings.items():
            assert " 0% packet loss" in p, (n, p)
    took = time.monotonic() - t_all
    print(f"{STARTS} starts in {took:.0f}s")
    assert took < 180
