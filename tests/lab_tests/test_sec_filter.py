"""The node's filter fails closed, and tailnet source addresses cannot be spoofed (issue 11 item 3), in the lab.

- `nft` on the agent's PATH is a wrapper that exits 1: the policy cannot be installed, so the peer is never put
  into WireGuard, a connection the policy does not allow cannot be opened, and `shoal status` says why.
- A host on the LAN gives itself a peer's tailnet address and sends to the node's tailnet address over the LAN
  link: the node's always-on rule drops it (counter `spoofed`), even under an allow-all policy.
"""

from __future__ import annotations

import os
import subprocess
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest

from tests.lab import Topology
from tests.lab.udp import py
from tests.lab_tests.tailnet import Tailnet
from tests.lab_tests.test_policy import SERVE, TABLE, hp, probe, set_policy, table

pytestmark = pytest.mark.lab

USERS = {"a": "a@example.com", "b": "b@example.com"}
SSH_ONLY = """{"acls": [{"action": "accept", "src": ["a@example.com"], "proto": "tcp", "dst": ["b@example.com:22"]}]}
"""
UDP_PORT = 7100

# argv: ip port file. Appends "src payload" per datagram to file.
SINK = r"""
import socket, sys
s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
s.bind((sys.argv[1], int(sys.argv[2])))
print("ready", flush=True)
while True:
    data, addr = s.recvfrom(2048)
    with open(sys.argv[3], "a") as f:
        f.write(f"{addr[0]} {data.decode(errors='replace')}\n")
"""

# argv: src dst port payload
SEND = r"""
import socket, sys
s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
s.bind((sys.argv[1], 0))
for _ in range(3):
    s.sendto(sys.argv[4].encode(), (sys.argv[2], int(sys.argv[3])))
"""


def spoofed(tn: Tailnet, name: str) -> int:
    out = tn.lab.exec(name, ["nft", "list", "counter", "inet", TABLE, "spoofed"]).stdout
    return int(out.split("packets")[1].split()[0])


def test_sec_nft_failing_keeps_peers_out_and_shows_in_status(tailnet: Tailnet, tmp_path: Path) -> None:
    tn, lab = tailnet, tailnet.lab
    lab.build(Topology.parse("lan: a b"))
    tn.start_server()
    (tmp_path / "p.hujson").write_text(SSH_ONLY)
    set_policy(tn, tmp_path / "p.hujson")
    broken = tmp_path / "broken-nft"
    broken.mkdir()
    (broken / "nft").write_text("#!/bin/sh\necho 'nft: broken for this test' >&2\nexit 1\n")
    (broken / "nft").chmod(0o755)
    env = {**os.environ, "PATH": f"{broken}:{os.environ.get('PATH', '/usr/bin:/bin')}"}
    tn.start_agent("a")
    tn.start_agent("b", env=env)
    lab.spawn("b", py(SERVE, 22, 80), log_path=tmp_path / "serve-b.log")
    with ThreadPoolExecutor(2) as pool:
        list(pool.map(lambda n: tn.up(n, tn.auth_key(USERS[n])), ("a", "b")))
    b4 = tn.ip("b")
    tn.wait_for("listeners on b", lambda: ":80 " in lab.exec("b", ["ss", "-Hntl"]).stdout, timeout=5)
    tn.wait_for("a knows b", lambda: tn.peer_names("a") == {"b"}, timeout=5)

    # the policy allows nothing to 80; with no filter in place b must not be reachable at all
    seen = probe(tn, "a", [hp(b4, 80), hp(b4, 22)], timeout=2.0)
    print(f"a -> b with b's nft failing: {seen}")
    assert seen[hp(b4, 80)] != "open"
    assert lab.exec("b", ["wg", "show", lab.iface("b"), "peers"]).stdout.split() == []
    assert TABLE not in lab.exec("b", ["nft", "list", "tables"]).stdout
    st = tn.status("b")
    assert any("filter" in h and "broken for this test" in h for h in st["Health"]), st["Health"]
    assert [p["InEngine"] for p in st["Peers"]] == [False]
    text = tn.shoal("b", "status").stdout
    print(text)
    assert "filter" in text and "broken for this test" in text

    # with a working nft the same node enforces the policy: 22 open, 80 closed
    tn.stop_agent("b")
    tn.start_agent("b")
    tn.wait_for("b's filter", lambda: "tcp dport 22" in table(tn, "b"), timeout=10)
    tn.wait_for("a -> b:22", lambda: probe(tn, "a", [hp(b4, 22)])[hp(b4, 22)] == "open", timeout=10, step=0)
    assert probe(tn, "a", [hp(b4, 80)])[hp(b4, 80)] == "timeout"
    assert not any("filter" in h for h in tn.status("b")["Health"])


def test_sec_spoofed_tailnet_source_over_the_lan_is_dropped(tailnet: Tailnet, tmp_path: Path) -> None:
    """m is a host on the LAN (no agent). It takes b's tailnet address and sends UDP to a's tailnet address
    through a's LAN address; under the default allow-all policy only the genuine datagram from b arrives."""
    tn, lab = tailnet, tailnet.lab
    lab.build(Topology.parse("lan: a b m"))
    tn.start_server()
    for n in ("a", "b"):
        tn.start_agent(n)
    with ThreadPoolExecutor(2) as pool:
        list(pool.map(lambda n: tn.up(n, tn.auth_key(USERS[n])), ("a", "b")))
    a4, b4 = tn.ip("a"), tn.ip("b")
    got = tmp_path / "sink.txt"
    got.touch()
    sink = subprocess.Popen(["ip", "netns", "exec", lab.ns("a"), *py(SINK, "0.0.0.0", UDP_PORT, got)],
                            stdout=subprocess.PIPE, text=True)
    try:
        assert sink.stdout is not None and sink.stdout.readline().strip() == "ready"
        tn.wait_for("b -> a", lambda: tn.ping("b", a4, wait=0.5), timeout=10, step=0)
        lab.exec("b", py(SEND, b4, a4, UDP_PORT, "genuine"))
        tn.wait_for("the genuine datagram", lambda: "genuine" in got.read_text(), timeout=5)

        lab.exec("m", ["ip", "addr", "add", f"{b4}/32", "dev", "eth0"])
        lab.exec("m", ["ip", "route", "add", f"{a4}/32", "via", lab.nodes["a"].addr])
        lab.exec("m", py(SEND, b4, a4, UDP_PORT, "spoofed"))
        time.sleep(1.0)
        text = got.read_text()
        print(f"a's sink saw:\n{text}")
        assert "spoofed" not in text
        assert f"{b4} genuine" in text
        assert spoofed(tn, "a") >= 3
    finally:
        sink.kill()
        sink.wait()
