"""NAT traversal through shoald, the nine scenarios of issue 6, in one lab (real namespaces, nftables NAT).

One topology and one tailnet for the whole module, to keep the runtime modest:

    lan:  plain router      l1 l2     (scenario 1: same LAN)
    home: easy NAT          a1 a2     (9: two nodes behind the same NAT; 2 with c1; 4 with h1)
    cafe: easy NAT          c1        (2; 8: its router's outside address is renumbered)
    hl1:  hard NAT          h1        (3 with p1; 4; 5 with h2)
    hl2:  hard NAT          h2        (5)
    public:                 p1 u1     (3; 6 and 7: u1 starts with all UDP blocked)

shoal-server runs in the internet namespace with its embedded relay (region 900, STUN on 203.0.113.1) and a
`shoal-derp` (region 901, STUN on 203.0.113.2), so netcheck can tell hard NATs. Every scenario sends real
traffic (ping and a TCP transfer through the tunnel) and asserts on the path `shoal status` reports, which is
the endpoint wireguard-go actually holds. The tests run in file order: 7 continues 6, and 8 renumbers a router.
"""

from __future__ import annotations

import subprocess
import sys
import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import pytest

from tests.lab import Lab, Topology
from tests.lab_tests.tailnet import Tailnet

pytestmark = pytest.mark.lab

PY = sys.executable
PORT = 41641
TCP_PORT = 7001
TOPOLOGY = "lan: l1 l2; home: easy a1 a2; cafe: easy c1; hl1: hard h1; hl2: hard h2; public: p1 u1"
NEW_CAFE_WAN = "203.0.113.60"

SINK = r"""
import socket, threading
PORT = int(__import__("sys").argv[1])
s = socket.socket()
s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
s.bind(("0.0.0.0", PORT))
s.listen(16)
def serve(c):
    n = 0
    while True:
        b = c.recv(65536)
        if not b:
            break
        n += len(b)
    c.sendall(str(n).encode())
    c.close()
while True:
    c, _ = s.accept()
    threading.Thread(target=serve, args=(c,), daemon=True).start()
"""

# argv: ip, port, chunks, chunk size, seconds between chunks. Prints the byte count the sink saw.
SOURCE = r"""
import socket, sys, time
ip, port, chunks, size = sys.argv[1], int(sys.argv[2]), int(sys.argv[3]), int(sys.argv[4])
gap = float(sys.argv[5])
c = socket.create_connection((ip, port), timeout=20)
c.settimeout(30)
for _ in range(chunks):
    c.sendall(b"x" * size)
    if gap:
        time.sleep(gap)
c.shutdown(socket.SHUT_WR)
print(c.recv(100).decode())
"""


class Net:
    def __init__(self, lab: Lab, tn: Tailnet) -> None:
        self.lab, self.tn = lab, tn
        self.ips: dict[str, str] = {}

    def row(self, a: str, b: str) -> dict[str, Any]:
        for p in self.tn.status(a)["Peers"]:
            if p["HostName"] == b:
                return dict(p)
        raise AssertionError(f"{b} not in {a}'s status")

    def path(self, a: str, b: str) -> tuple[str, str | None]:
        r = self.row(a, b)
        return str(r["Path"]), r["Endpoint"]

    def ping(self, a: str, b: str, count: int = 1, wait: float = 1) -> bool:
        return self.tn.ping(a, self.ips[b], count=count, wait=wait)

    def transfer(self, a: str, b: str, nbytes: int = 1 << 20) -> None:
        size = 64 << 10
        chunks = max(1, nbytes // size)
        argv = [PY, "-c", SOURCE, self.ips[b], str(TCP_PORT), str(chunks), str(size), "0"]
        out = self.lab.exec(a, argv, timeout=60).stdout
        assert out.strip() == str(chunks * size), f"{a} -> {b}: sink saw {out.strip()!r}"

    def wait_path(self, a: str, b: str, kind: str, timeout: float) -> float:
        """Traffic both ways (so both sessions are active) until both sides report `kind`."""
        t0 = time.monotonic()
        while True:
            self.ping(a, b, wait=0.5)
            self.ping(b, a, wait=0.5)
            if self.path(a, b)[0] == kind and self.path(b, a)[0] == kind:
                return time.monotonic() - t0
            if time.monotonic() - t0 > timeout:
                raise AssertionError(f"{a}<->{b} not {kind} after {timeout}s: {self.row(a, b)} / {self.row(b, a)}")
            time.sleep(0.2)


@pytest.fixture(scope="module")
def net(lab_sweep: list[str], tmp_path_factory: pytest.TempPathFactory) -> Iterator[Net]:
    lab = Lab()
    tn = Tailnet(lab, Path(tmp_path_factory.mktemp("nat")))
    try:
        lab.build(Topology.parse(TOPOLOGY))
        lab.block_udp("u1")  # scenario 6: outbound UDP blocked from the start
        tn.start_server(derp=True)
        tn.start_relay2()
        key = tn.auth_key()
        names = list(lab.nodes)
        for n in names:
            tn.start_agent(n)
            lab.spawn(n, [PY, "-c", SINK, str(TCP_PORT)])
        with ThreadPoolExecutor(4) as pool:
            list(pool.map(lambda n: tn.up(n, key), names))
        the_net = Net(lab, tn)
        the_net.ips = {name: tn.ip(name) for name in names}
        yield the_net
    finally:
        try:
            for name in list(tn.agents):
                print(f"--- shoald {name} ---\n{tn.log(name)[-2500:]}")
        finally:
            lab.teardown()


def test_1_same_lan_goes_direct_over_lan_addresses(net: Net) -> None:
    net.wait_path("l1", "l2", "direct", 10)
    assert net.path("l1", "l2")[1] == f"{net.lab.nodes['l2'].addr}:{PORT}"
    assert net.path("l2", "l1")[1] == f"{net.lab.nodes['l1'].addr}:{PORT}"
    assert net.ping("l1", "l2", count=3)
    net.transfer("l1", "l2")
    assert "direct 192.0.2.11:41641" in net.tn.shoal("l1", "status").stdout


def test_9_same_nat_goes_direct_over_lan_addresses(net: Net) -> None:
    net.wait_path("a1", "a2", "direct", 10)
    # both share the NAT's outside address; hairpinning is not needed: the LAN address wins
    assert net.path("a1", "a2")[1] == f"{net.lab.nodes['a2'].addr}:{PORT}"
    assert net.path("a2", "a1")[1] == f"{net.lab.nodes['a1'].addr}:{PORT}"
    net.transfer("a2", "a1")


def test_2_easy_and_easy_nat_go_direct(net: Net) -> None:
    took = net.wait_path("a1", "c1", "direct", 15)
    home, cafe = net.lab.routers["home"].wan_addr, net.lab.routers["cafe"].wan_addr
    assert net.path("a1", "c1")[1] == f"{cafe}:{PORT}"
    # a1 shares its NAT with a2: whichever of them sent first kept port 41641, the other got another one
    a1_public = net.tn.status("a1")["Magic"]["Netcheck"]["GlobalV4"]
    assert a1_public.split(":")[0] == home
    assert net.path("c1", "a1")[1] == a1_public
    net.transfer("a1", "c1")
    net.transfer("c1", "a1")
    print(f"a1<->c1 direct after {took:.1f}s")
    # shoal ping reports the direct path
    out = net.tn.shoal("a1", "ping", "-c", "3", "c1").stdout
    assert f"via {cafe}:{PORT}" in out, out
    # netcheck: an easy NAT keeps one mapping for both STUN servers
    nc = net.tn.shoal("c1", "netcheck", "--json").stdout
    assert '"MappingVariesByDestIP": false' in nc and f'"GlobalV4": "{cafe}:{PORT}"' in nc, nc


def test_3_public_and_hard_nat_go_direct(net: Net) -> None:
    net.wait_path("p1", "h1", "direct", 15)
    ep = net.path("p1", "h1")[1]
    assert ep is not None and ep.split(":")[0] == net.lab.routers["hl1"].wan_addr  # learnt from h1's ping
    assert net.path("h1", "p1")[1] == f"{net.lab.nodes['p1'].addr}:{PORT}"
    net.transfer("h1", "p1")
    nc = net.tn.shoal("h1", "netcheck", "--json").stdout
    assert '"MappingVariesByDestIP": true' in nc, nc


def test_4_and_5_easy_hard_and_hard_hard_stay_on_derp(net: Net) -> None:
    # 4: the easy side only accepts the exact address:port it sent to, and the hard side's port toward it is
    # unknowable (no port spraying); 5: neither side's port is knowable. Several discovery rounds of traffic:
    end = time.monotonic() + 8
    while time.monotonic() < end:
        for a, b in (("c1", "h1"), ("h1", "h2")):
            assert net.ping(a, b), f"{a} cannot reach {b} over DERP"
        time.sleep(0.3)
    for a, b in (("c1", "h1"), ("h1", "c1"), ("h1", "h2"), ("h2", "h1")):
        row = net.row(a, b)
        assert row["Path"] == "derp" and row["DERPRegion"] in (900, 901), row
        assert row["Endpoint"].startswith("127.0.0.1:"), row
    net.transfer("c1", "h1")
    net.transfer("h2", "h1")
    out = net.tn.shoal("h1", "ping", "-c", "2", "--no-until-direct", "h2").stdout
    assert "via DERP(90" in out, out


def test_6_udp_blocked_uses_derp_over_tcp(net: Net) -> None:
    for _ in range(3):
        assert net.ping("u1", "p1") and net.ping("p1", "u1")
    assert net.path("u1", "p1")[0] == "derp" and net.path("p1", "u1")[0] == "derp"
    net.transfer("u1", "p1")
    st = net.tn.status("u1")
    assert st["Magic"]["Netcheck"]["UDP"] is False
    assert st["Magic"]["DERPConnected"][str(st["Magic"]["HomeDERP"])] is True


def test_7_unblocked_upgrades_to_direct_without_dropping_tcp(net: Net) -> None:
    # a TCP stream through the tunnel for 25 s, across the switch from DERP to direct
    stream = subprocess.Popen(
        ["ip", "netns", "exec", net.lab.ns("u1"), PY, "-c", SOURCE, net.ips["p1"], str(TCP_PORT), "100",
         str(16 << 10), "0.25"],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        time.sleep(2)
        assert net.path("u1", "p1")[0] == "derp"
        net.lab.unblock_udp("u1")
        took = net.wait_path("u1", "p1", "direct", 30)
        print(f"u1<->p1 direct {took:.1f}s after unblocking")
        assert net.path("u1", "p1")[1] == f"{net.lab.nodes['p1'].addr}:{PORT}"
        out, err = stream.communicate(timeout=60)
        assert stream.returncode == 0, err
        assert out.strip() == str(100 * (16 << 10))
    finally:
        if stream.poll() is None:
            stream.kill()
            stream.wait()


def test_8_renumbered_nat_router_traffic_resumes(net: Net) -> None:
    net.wait_path("c1", "a1", "direct", 15)
    net.lab.renumber("cafe", NEW_CAFE_WAN)
    t0 = time.monotonic()
    for a, b in (("c1", "a1"), ("a1", "c1")):
        while not net.ping(a, b, wait=0.5):
            assert time.monotonic() - t0 < 15, f"{a} -> {b} did not resume within 15 s"
    resumed = time.monotonic() - t0
    print(f"traffic resumed {resumed:.1f}s after the renumbering")
    # c1 saw its direct path miss the trust window: it re-STUNned and checked (or redialled) its home relay
    assert net.tn.status("c1")["Magic"]["Counters"]["roam_checks"] >= 1
    net.transfer("c1", "a1")
    # the new outside address is found by STUN and the pair goes direct again
    net.wait_path("c1", "a1", "direct", 30)
    assert net.path("a1", "c1")[1] == f"{NEW_CAFE_WAN}:{PORT}"
