"""The lab itself: NAT behaviour, the routers' firewalls, isolation from the host, and clean teardown."""

from __future__ import annotations

import ipaddress
import json
import os
import subprocess
import time
from pathlib import Path

import pytest

from tests.lab import Lab, Topology, easy_nat_pair, hard_nat_pair, mixed, one_lan, sweep
from tests.lab.lab import RUN_DIR, SOCK_DIR, list_netns
from tests.lab.udp import COUNT, PROBE, REFLECT, py

pytestmark = pytest.mark.lab

ALLOWED = [ipaddress.ip_network(n) for n in (
    "192.0.2.0/24", "198.51.100.0/24", "203.0.113.0/24", "100.64.0.0/10", "fd7a:115c:a1e0::/48", "fe80::/10",
    "127.0.0.0/8", "::1/128", "ff00::/8",
)]


def start_reflectors(lab: Lab, port: int = 3478) -> None:
    for s in lab.servers:
        proc = lab.spawn("inet", py(REFLECT, s, port))
        assert proc.pid in lab.procs
    wait_udp_listening(lab, "inet", [f"{s}:{port}" for s in lab.servers])


def wait_udp_listening(lab: Lab, ns: str, addrs: list[str]) -> None:
    deadline = time.monotonic() + 10
    while time.monotonic() < deadline:
        out = lab.exec(ns, ["ss", "-Hnul"]).stdout
        if all(a in out for a in addrs):
            return
        time.sleep(0.02)
    raise AssertionError(f"nothing listening on {addrs} in {ns}")


def probe(lab: Lab, node: str, port: int, dests: list[str]) -> dict[str, str]:
    out = lab.exec(node, py(PROBE, port, *dests), timeout=20).stdout
    return dict(line.split() for line in out.splitlines())


def test_topology_parse_and_validation() -> None:
    t = Topology.parse("lan1: easy n1 n2; lan2: hard n3; public: n4; lan3: n5")
    assert [(lan.name, lan.nat, lan.nodes) for lan in t.lans] == [
        ("lan1", "easy", ("n1", "n2")), ("lan2", "hard", ("n3",)), ("lan3", "none", ("n5",))]
    assert t.public == ("n4",)
    assert one_lan(2).nodes() == ("n1", "n2")
    assert mixed(1, 1, 1).nodes() == ("ne0", "nh0", "pub0")
    for bad in ("lan1: easy n1; lan2: n1", "lan1: eight888", "lan1 n1", "inet: n1"):
        with pytest.raises(ValueError):
            Topology.parse(bad)


def test_easy_nat_preserves_port(lab: Lab) -> None:
    lab.build(easy_nat_pair())
    start_reflectors(lab)
    dests = [f"{s}:3478" for s in lab.servers]
    seen = probe(lab, "a", 41641, dests)
    wan = lab.routers["lana"].wan_addr
    assert seen == {d: f"{wan}:41641" for d in dests}


def test_hard_nat_changes_port_per_destination(lab: Lab) -> None:
    lab.build(hard_nat_pair())
    start_reflectors(lab)
    dests = [f"{s}:3478" for s in lab.servers]
    seen = probe(lab, "a", 41641, dests)
    wan = lab.routers["lana"].wan_addr
    ips = {v.rsplit(":", 1)[0] for v in seen.values()}
    ports = {v.rsplit(":", 1)[1] for v in seen.values()}
    assert ips == {wan}
    assert len(ports) == 2, f"hard NAT kept one mapping for two destinations: {seen}"


def test_nodes_reach_each_other_and_the_internet(lab: Lab) -> None:
    lab.build(Topology.parse("lan: n1 n2; e: easy n3; public: n4"))
    start_reflectors(lab)
    for n in ("n1", "n3", "n4"):
        lab.exec(n, ["ping", "-c1", "-W2", lab.servers[0]])
    lab.exec("n1", ["ping", "-c1", "-W2", lab.nodes["n2"].addr])
    # a plain (non-NAT) LAN is routed: the internet sees the node's own address
    assert probe(lab, "n1", 5000, [f"{lab.servers[0]}:3478"])[f"{lab.servers[0]}:3478"] == \
        f"{lab.nodes['n1'].addr}:5000"


def test_router_drops_unsolicited_inbound(lab: Lab, tmp_path: Path) -> None:
    lab.build(easy_nat_pair())
    router = lab.routers["lana"]
    log = tmp_path / "count.log"
    log.touch()
    try:
        counter = lab.spawn("lana", py(COUNT, router.wan_addr, 41641, 2.5), log_path=log)
        deadline = time.monotonic() + 5
        while "ready" not in log.read_text() and time.monotonic() < deadline:
            time.sleep(0.02)
        lab.exec("inet", py(PROBE, 41641, f"{router.wan_addr}:41641"))
        ping = lab.exec("inet", ["ping", "-c1", "-W1", router.wan_addr], check=False)
        assert ping.returncode != 0, "router answered an unsolicited ping from the internet"
        counter.wait(10)
        assert log.read_text().split() == ["ready", "0"], "unsolicited UDP reached the router"
        # the counter does count when the firewall lets datagrams in: from the LAN side
        log.write_text("")
        counter = lab.spawn("lana", py(COUNT, router.lan_addr, 41641, 2.0), log_path=log)
        while "ready" not in log.read_text() and time.monotonic() < deadline + 5:
            time.sleep(0.02)
        lab.exec("a", py(PROBE, 41641, f"{router.lan_addr}:41641"))
        counter.wait(10)
        assert log.read_text().split()[1] == "10"
    finally:
        log.unlink(missing_ok=True)


def test_block_udp_and_renumber(lab: Lab) -> None:
    lab.build(easy_nat_pair())
    start_reflectors(lab)
    dest = f"{lab.servers[0]}:3478"
    lab.block_udp("a")
    assert probe(lab, "a", 41641, [dest]) == {dest: "-"}
    lab.unblock_udp("a")
    assert probe(lab, "a", 41641, [dest]) == {dest: f"{lab.routers['lana'].wan_addr}:41641"}
    lab.renumber("lana", "203.0.113.99")
    assert lab.routers["lana"].wan_addr == "203.0.113.99"
    assert probe(lab, "a", 41641, [dest]) == {dest: "203.0.113.99:41641"}


def test_no_route_or_link_to_the_host(lab: Lab) -> None:
    lab.build(mixed(1, 1, 1, 1))
    for ns in lab.namespaces:
        for fam in ("-4", "-6"):
            routes = json.loads(lab.exec(ns, ["ip", "-j", fam, "route", "show", "table", "all"]).stdout)
            for r in routes:
                for key in ("dst", "gateway", "prefsrc"):
                    v = r.get(key)
                    if v in (None, "default"):
                        continue
                    net = ipaddress.ip_network(v, strict=False)
                    assert any(a.supernet_of(net) for a in ALLOWED if a.version == net.version), (ns, r)  # type: ignore[arg-type]
        links = json.loads(lab.exec(ns, ["ip", "-j", "-d", "link"]).stdout)
        for link in links:
            kind = link.get("linkinfo", {}).get("info_kind")
            assert link["ifname"] == "lo" or kind in ("veth", "bridge"), (ns, link["ifname"], kind)
    # every veth's peer lives in a lab namespace: the host namespace holds no lab interface
    host_links = subprocess.run(["ip", "-j", "link"], capture_output=True, text=True, check=True).stdout
    assert lab.prefix not in host_links
    assert all(link.get("ifname") not in ("wan0", "eth0") or "link_netnsid" not in link
               for link in json.loads(host_links))


def test_teardown_leaves_nothing(lab_sweep: list[str]) -> None:
    lab = Lab()
    try:
        lab.build(one_lan(2))
        sleeper = lab.spawn("n1", ["sleep", "600"])
        stray = lab.exec("n2", ["sh", "-c", "sleep 600 >/dev/null 2>&1 & echo $!"]).stdout.strip()
        lab.spawn("n1", ["wireguard-go", "-f", lab.iface("n1")])
        sock = SOCK_DIR / f"{lab.iface('n1')}.sock"
        deadline = time.monotonic() + 10
        while not sock.exists() and time.monotonic() < deadline:
            time.sleep(0.02)
        assert sock.exists()
        wggo = [p for p in lab.procs if p != sleeper.pid]
    finally:
        lab.teardown()
    assert not [ns for ns in list_netns() if ns.startswith(lab.prefix)]
    for pid in (sleeper.pid, int(stray), *wggo):
        assert not alive(pid), f"process {pid} survived teardown"
    assert not list(SOCK_DIR.glob(f"{lab.prefix}*"))
    assert not (RUN_DIR / lab.prefix).exists()


def test_sweep_removes_dead_runs_only(lab_sweep: list[str]) -> None:
    dead = subprocess.Popen(["true"])
    dead.wait()
    crashed = Lab(owner_pid=dead.pid).build(one_lan(1))
    live = Lab().build(one_lan(1))  # owned by this (live) process
    try:
        crashed.spawn("n1", ["sleep", "600"])
        pid = next(iter(crashed.procs))
        removed = sweep()
        assert crashed.prefix in removed and live.prefix not in removed
        assert not [ns for ns in list_netns() if ns.startswith(crashed.prefix)]
        assert [ns for ns in list_netns() if ns.startswith(live.prefix)]
        crashed.procs[pid].wait(5)
    finally:
        crashed.teardown()
        live.teardown()


def alive(pid: int) -> bool:
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()[0] != "Z"
    except FileNotFoundError:
        return False


def test_lab_name_limits() -> None:
    lab = Lab(prefix="sh123abc")
    assert lab.iface("abcdefg") == "sh123abcabcdefg"
    assert len(lab.iface("abcdefg")) == 15
    assert os.path.basename(lab.ns_name("n1")) == "sh123abc-n1"
