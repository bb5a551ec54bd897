"""Exit nodes in the lab (issue 16): an "internet" host reached through an exit node, and nothing leaking out of
the client's own gateway when the exit node goes away.

Topology: alice's client c and an agentless LAN host l behind a NAT router ("home", the client's own gateway);
alice's exit node e and bob's node x on the internet; behind the internet namespace a host "ih" on
198.51.100.0/24 (a documentation range standing for the internet) that tells each TCP client the source
address it came from. The policy lets alice use exit nodes (autogroup:internet) and reach her own nodes; bob
may reach alice's nodes on TCP 22 only (so e is his peer) but not the internet through them. The client runs
with strict reverse-path filtering (rp_filter=1): replies to the agent's marked traffic must still get in.
"""

from __future__ import annotations

import contextlib
import json
import os
import signal
import sys
from pathlib import Path

import pytest

from tests.lab import Lab, Topology
from tests.lab.lab import netns_pids
from tests.lab.udp import py
from tests.lab_tests.tailnet import Tailnet
from tests.lab_tests.test_subnet_router_lab import ASK, WHO

pytestmark = pytest.mark.lab

INET_GW, HOST = "198.51.100.1", "198.51.100.10"
ALICE, BOB = "alice@example.com", "bob@example.com"
POLICY = """{
  "autoApprovers": {"exitNode": ["alice@example.com"]},
  "acls": [
    {"action": "accept", "src": ["alice@example.com"], "dst": ["autogroup:internet:*", "alice@example.com:*"]},
    {"action": "accept", "src": ["bob@example.com"], "dst": ["alice@example.com:22"]},
  ],
}
"""
MARK = "0x80000"


def internet_host(lab: Lab, tmp: Path) -> str:
    """The "internet" host behind the internet namespace; every LAN router gets a route to it (the lab's routers
    have no default route)."""
    ns = lab.add_ns("ih")
    a, b = lab.iface("ia"), lab.iface("ib")
    lab.veth(lab.inet, a, ns, b)
    lab.exec(lab.inet, ["ip", "addr", "add", f"{INET_GW}/24", "dev", a])
    lab.exec(lab.inet, ["ip", "link", "set", a, "up"])
    lab.exec(ns, ["ip", "addr", "add", f"{HOST}/24", "dev", b])
    lab.exec(ns, ["ip", "link", "set", b, "up"])
    lab.exec(ns, ["ip", "route", "add", "default", "via", INET_GW])
    for r in lab.routers.values():
        lab.exec(r.ns, ["ip", "route", "add", "198.51.100.0/24", "via", lab.servers[0]])
    lab.spawn(ns, py(WHO), log_path=tmp / "who.log")
    return ns


def ask(tn: Tailnet, name: str, timeout: float = 1.0) -> str:
    return tn.lab.exec(name, py(ASK, HOST, timeout), timeout=timeout + 20).stdout.strip()


def counter(lab: Lab, name: str, table: str, ctr: str) -> int:
    out = lab.exec(name, ["nft", "-j", "list", "counter", "inet", table, ctr]).stdout
    return int(next(x["counter"] for x in json.loads(out)["nftables"] if "counter" in x)["packets"])


def count_to_host(lab: Lab, router: str) -> int:
    """Packets to the internet host that the client's gateway forwarded (its own nft counter)."""
    return counter(lab, router, f"{lab.prefix}leak", "tohost")


def count_marks(lab: Lab, name: str) -> None:
    """Counters on what leaves the node's underlay interface: disco datagrams (the raw socket's: UDP from the
    WireGuard port starting with the disco magic) with and without the bypass mark, and any packet without it
    (but the kernel's own IPv6 multicast: router and neighbour solicitations, MLD)."""
    disco = "udp sport 41641 @th,64,32 0x5453f09f"
    unmarked = f'oifname "eth0" meta mark & 0xff0000 != {MARK}'
    lab.nft(lab.ns(name), f"""table inet {lab.prefix}marks {{
  counter disco_marked {{}}
  counter disco_unmarked {{}}
  counter unmarked {{}}
  set unmarked_to {{ type ipv4_addr . inet_proto . inet_service; flags dynamic; }}
  chain out {{
    type filter hook postrouting priority 100;
    oifname "eth0" {disco} meta mark & 0xff0000 == {MARK} counter name disco_marked
    oifname "eth0" {disco} meta mark & 0xff0000 != {MARK} counter name disco_unmarked
    {unmarked} meta nfproto ipv4 counter name unmarked
    {unmarked} ip6 daddr != ff00::/8 counter name unmarked
    {unmarked} meta l4proto {{ tcp, udp }} add @unmarked_to {{ ip daddr . meta l4proto . th dport }}
    {unmarked} meta l4proto != {{ tcp, udp }} add @unmarked_to {{ ip daddr . meta l4proto . 0 }}
  }}
}}
""")


def dropped(tn: Tailnet, name: str) -> int:
    out = tn.lab.exec(name, ["nft", "-j", "list", "counter", "inet", "shoal_filter", "dropped"]).stdout
    return int(next(x["counter"] for x in json.loads(out)["nftables"] if "counter" in x)["packets"])


def server_cli(tn: Tailnet, *args: str) -> str:
    p = tn.lab.exec(tn.server_ns, [sys.executable, "-m", "coord.cli", *args, "--data", str(tn.data)], check=False)
    assert p.returncode == 0, p.stdout + p.stderr
    return p.stdout


def marked_sockets(lab: Lab, name: str) -> dict[str, list[str]]:
    """`ss -e` lines of the agent's sockets, by kind: TCP to the server (control and DERP), UDP (wireguard-go)
    and raw (disco/STUN)."""
    out = {}
    for kind, flag in (("tcp", "-tn"), ("udp", "-un"), ("raw", "-wn")):
        lines = lab.exec(name, ["ss", flag, "-a", "-e", "-p"]).stdout.splitlines()[1:]
        out[kind] = [line for line in lines if "python" in line or "wireguard" in line]
    return out


def test_exit_node_lab_internet_through_the_exit_node_no_leak_and_lan_access(tailnet: Tailnet,
                                                                              tmp_path: Path) -> None:
    tn, lab = tailnet, tailnet.lab
    lab.build(Topology.parse("home: easy c l; public: e x"))
    internet_host(lab, tmp_path)
    lan_host = lab.nodes["l"].addr
    router_wan = lab.routers["home"].wan_addr
    e_addr = lab.nodes["e"].addr
    lab.sysctl(lab.ns("e"), "net.ipv4.ip_forward", "1")
    lab.sysctl(lab.ns("e"), "net.ipv6.conf.all.forwarding", "1")
    lab.sysctl(lab.ns("c"), "net.ipv4.conf.all.rp_filter", "1")
    # the client's own gateway counts every packet it forwards to the internet host
    lab.nft(lab.ns("home"), f"""table inet {lab.prefix}leak {{
  counter tohost {{}}
  chain counting {{ type filter hook forward priority -10; ip daddr {HOST} counter name tohost; }}
}}
""")
    tn.start_server(derp=True)
    f = tmp_path / "policy.hujson"
    f.write_text(POLICY)
    assert "policy applied" in server_cli(tn, "policy", "set", str(f))
    for n in ("c", "e", "x"):
        tn.start_agent(n)
    tn.up("e", tn.auth_key(ALICE), "--advertise-exit-node")
    tn.up("c", tn.auth_key(ALICE))
    tn.up("x", tn.auth_key(BOB))

    # without an exit node the host sees the client's gateway (it goes out directly)
    assert ask(tn, "c") == router_wan
    direct = count_to_host(lab, "home")
    assert direct > 0

    # approved by autoApprovers (exitNode): offered to c, suggested, and chosen by name
    routes = {x["name"]: x for x in json.loads(server_cli(tn, "routes", "list", "--json"))}
    assert routes["e"]["approved"] == ["0.0.0.0/0", "::/0"]
    tn.wait_for("c sees e as an exit node", lambda: "e" in tn.shoal("c", "exit-node", "list").stdout, timeout=10)
    assert "shoal up --exit-node=e." in tn.shoal("c", "exit-node", "suggest").stdout
    count_marks(lab, "c")
    tn.up("c", tn.auth_key(ALICE), "--exit-node", "e")
    tn.wait_for("the host sees the exit node's address", lambda: ask(tn, "c") == e_addr, timeout=15, step=0.2)
    through = count_to_host(lab, "home")
    assert through == direct  # what went through e went to e, encrypted: nothing to the host from the gateway
    st = tn.status("c")
    assert st["ExitNode"]["InUse"] and st["ExitNode"]["Online"]
    wg_allowed = {p["HostName"]: p for p in st["Peers"]}
    assert wg_allowed["e"]["InEngine"]
    print("--- shoal status on the client ---\n" + tn.shoal("c", "status").stdout)
    print("--- shoal status on the exit node ---\n" + tn.shoal("e", "status").stdout)
    rules = lab.exec("c", ["ip", "rule", "show"]).stdout
    assert f"5210:\tfrom all fwmark {MARK}/0xff0000 lookup main" in rules
    assert "5270:\tfrom all lookup 52" in rules
    # only e has the default routes in WireGuard, and every sender of the agent carries the bypass mark
    socks = marked_sockets(lab, "c")
    to_server = [line for line in socks["tcp"] if f"{tn.server_addr}:8080" in line]
    assert len(to_server) >= 2, socks  # control (map stream) and DERP
    assert all(f"fwmark:{MARK}" in line for line in to_server), to_server
    assert any("wireguard" in line and f"fwmark:{MARK}" in line for line in socks["udp"]), socks["udp"]
    assert socks["raw"], socks  # the raw sender's mark is not shown by ss: counted on the wire below

    # the src_valid_mark and connmark restore that let replies in under rp_filter=1
    assert lab.exec("c", ["sysctl", "-n", "net.ipv4.conf.all.src_valid_mark"]).stdout.strip() == "1"
    assert "ct mark set" in lab.exec("c", ["nft", "list", "table", "inet", "shoal_exit"]).stdout

    # bob's node sees e (the policy lets him reach alice's port 22) but not as an exit node: the server sends
    # him no default routes for it, so his traffic stops at his own node and never reaches e
    assert json.loads(tn.shoal("x", "exit-node", "list", "--json").stdout)["ExitNodes"] == []
    tn.up("x", tn.auth_key(BOB), "--exit-node", "e")
    before = dropped(tn, "e")
    assert ask(tn, "x") == "TimeoutError"
    assert "not an exit node in the network map" in tn.shoal("x", "status").stdout
    assert dropped(tn, "e") == before

    # without --exit-node-allow-lan-access the LAN goes into the tunnel too; with it, it is reached directly
    assert not tn.ping("c", lan_host, wait=1)
    assert "pong from" in tn.shoal("c", "ping", "-c", "2", "--no-until-direct", "x").stdout  # disco, raw socket
    marks = {k: counter(lab, "c", f"{lab.prefix}marks", k) for k in ("disco_marked", "disco_unmarked", "unmarked")}
    print(f"packets out of c's eth0 while the exit node is in use: {marks}")
    unmarked_to = lab.exec("c", ["nft", "list", "table", "inet", f"{lab.prefix}marks"]).stdout
    assert marks["disco_marked"] > 0 and marks["disco_unmarked"] == 0 and marks["unmarked"] == 0, unmarked_to
    tn.up("c", tn.auth_key(ALICE), "--exit-node-allow-lan-access")
    tn.wait_for("c reaches its LAN", lambda: tn.ping("c", lan_host, wait=1), timeout=10)
    assert ask(tn, "c") == e_addr

    # the exit node dies (its agent and the wireguard-go it started): traffic to the internet stops, and
    # nothing goes out through the client's gateway
    lab.kill(tn.agents.pop("e"), signal.SIGKILL)
    for pid in netns_pids(lab.ns("e")):
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signal.SIGKILL)
    tn.wait_for("c learns e is offline", lambda: not (tn.status("c")["ExitNode"] or {}).get("Online"),
                timeout=20, step=0.5)  # a netmap delta: control still flows
    at_kill = count_to_host(lab, "home")
    results = [ask(tn, "c", 0.5) for _ in range(5)]
    pinged = tn.ping("c", HOST, count=5, wait=1)
    leaked = count_to_host(lab, "home") - at_kill
    print(f"leak test: packets to {HOST} through the client's gateway: direct {direct}, via the exit node "
          f"{through - direct}, after the kill {leaked} (answers {results}, ping {pinged})")
    assert leaked == 0 and not pinged and all(r != router_wan for r in results)
    st = tn.status("c")
    assert st["Connected"] and all(st["Magic"]["DERPConnected"].values()), st["Magic"]
    # DERP and disco still flow outside the tunnel: c pings bob's node through them
    assert "pong from" in tn.shoal("c", "ping", "-c", "3", "--no-until-direct", "x").stdout
    assert tn.ping("c", lan_host, wait=1)  # and the LAN stays reachable

    # clearing the exit node goes out directly again
    tn.up("c", tn.auth_key(ALICE), "--exit-node=")
    st = tn.status("c")
    assert st["ExitNode"] is None and st["Self"]["ExitNode"] == "", st
    assert not any("exit" in h for h in st["Health"]), st["Health"]
    tn.wait_for("c goes out directly", lambda: ask(tn, "c") == router_wan, timeout=15, step=0.2)
    assert "lookup 52" not in lab.exec("c", ["ip", "rule", "show"]).stdout
    assert lab.exec("c", ["nft", "list", "table", "inet", "shoal_exit"], check=False).returncode != 0
