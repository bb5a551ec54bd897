"""Enforcement edges in the lab (issue 21 item 5): a narrowed policy cuts the established flows it no longer allows.

Two nodes; the policy first lets a@ reach b@ on UDP 7000 and TCP 80. A UDP flow (echoed, so conntrack holds it
as established) and a TCP echo stream run from a to b; then the policy narrows to TCP 22. Our nft table accepts
`ct state established` before any rule, so without the agent deleting the flows' conntrack entries both would
live on; with it, b stops receiving them within 2 s of `policy set` returning.
"""

from __future__ import annotations

import json
import subprocess
import time
from pathlib import Path

import pytest

from tests.lab import Topology
from tests.lab.udp import py
from tests.lab_tests.tailnet import Tailnet
from tests.lab_tests.test_policy import SERVE, STREAM, USERS, set_policy, table

pytestmark = pytest.mark.lab

WIDE = """{"acls": [
  {"action": "accept", "src": ["a@example.com"], "proto": "udp", "dst": ["b@example.com:7000"]},
  {"action": "accept", "src": ["a@example.com"], "proto": "tcp", "dst": ["b@example.com:80"]},
]}
"""
NARROW = """{"acls": [{"action": "accept", "src": ["a@example.com"], "proto": "tcp", "dst": ["b@example.com:22"]}]}
"""

# argv: port. Dual-stack UDP echo; prints the arrival time of each datagram.
UDP_ECHO = r"""
import socket, sys, time
s = socket.socket(socket.AF_INET6, socket.SOCK_DGRAM)
s.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 0)
s.bind(("::", int(sys.argv[1])))
while True:
    d, peer = s.recvfrom(2048)
    print(f"{time.time():.3f}", flush=True)
    s.sendto(d, peer)
"""

# argv: host port stopfile. One UDP flow (one source port), a datagram every 50 ms until stopfile exists.
UDP_SEND = r"""
import os, socket, sys, time
s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
s.connect((sys.argv[1], int(sys.argv[2])))
s.setblocking(False)
end = time.time() + 30
while not os.path.exists(sys.argv[3]) and time.time() < end:
    try:
        s.send(b"ping")
    except OSError:
        pass
    try:
        while s.recv(2048):
            pass
    except OSError:
        pass
    time.sleep(0.05)
"""


def arrivals(path: Path) -> list[float]:
    return [float(x) for x in path.read_text().split()]


def test_policy_narrowed_cuts_established_udp_flow(tailnet: Tailnet, tmp_path: Path) -> None:
    tn, lab = tailnet, tailnet.lab
    lab.build(Topology.parse("lan: a b"))
    tn.start_server()
    (tmp_path / "wide.hujson").write_text(WIDE)
    (tmp_path / "narrow.hujson").write_text(NARROW)
    set_policy(tn, tmp_path / "wide.hujson")
    for n in ("a", "b"):
        tn.start_agent(n)
        tn.up(n, tn.auth_key(USERS[n]))
    b4 = tn.ip("b", "-4")
    tn.wait_for("b's filter", lambda: "udp dport 7000 ct state new accept" in table(tn, "b"), timeout=10)
    log = tmp_path / "udp-arrivals.log"
    lab.spawn("b", py(UDP_ECHO, 7000), log_path=log)
    lab.spawn("b", py(SERVE, 80), log_path=tmp_path / "serve-b.log")
    tn.wait_for("listeners on b", lambda: ":80 " in lab.exec("b", ["ss", "-Hntl"]).stdout, timeout=5)
    stop = tmp_path / "stop"
    lab.spawn("a", py(UDP_SEND, b4, 7000, stop))
    stream = subprocess.Popen(["ip", "netns", "exec", lab.ns("a"), *py(STREAM, b4, 80, stop)],
                              stdout=subprocess.PIPE, text=True)
    try:
        assert stream.stdout is not None and stream.stdout.readline().strip() == "connected"
        tn.wait_for("the UDP flow arrives", lambda: log.exists() and len(arrivals(log)) >= 10, timeout=10)
        ct = lab.exec("b", ["conntrack", "-L", "-p", "udp", "--dport", "7000"], check=False).stdout
        assert "ASSURED" in ct or "src=" in ct, ct  # tracked, with replies seen
        # per-rule counters: rule 0 (UDP 7000) and rule 1 (TCP 80) each let their flow's first packet in
        filt = json.loads(tn.shoal("b", "status", "--filter", "--json").stdout)
        print(f"b's filter counters: {filt}")
        counted = {r["Rule"]: r["Packets"] for r in filt["Rules"]}
        assert filt["InPlace"] and not filt["AllowAll"] and counted[0] >= 1 and counted[1] >= 1, filt
        text = tn.shoal("b", "status", "--filter").stdout
        assert text.splitlines()[0].split() == ["rule", "packets", "bytes"], text
        set_policy(tn, tmp_path / "narrow.hujson")
        changed = time.time()
        tn.wait_for("b's narrowed filter", lambda: "dport 7000" not in table(tn, "b"), timeout=5, step=0.02)
        time.sleep(max(0.0, changed + 3.5 - time.time()))  # the sender keeps sending all along
        got = arrivals(log)
        last = max(got)
        print(f"udp: {len(got)} datagrams, the last {last - changed:+.3f}s after `policy set` returned")
        assert last < changed + 2.0, (last, changed)
        assert lab.exec("a", ["pgrep", "-f", "UDP_SEND|s.send"], check=False).returncode in (0, 1)
        stop.touch()
        out, _ = stream.communicate(timeout=10)
    finally:
        stop.touch()
        if stream.poll() is None:
            stream.kill()
            stream.wait()
    s = json.loads(out.strip().splitlines()[-1])
    print(f"tcp stream across the change (policy set returned at {changed:.3f}): {s}")
    # the stream's echoes stopped within 2 s of the change, and it ended on a stall (timeout), not on the stop file
    assert s["error"] is not None and s["last"] < changed + 2.0, s
