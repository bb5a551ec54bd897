"""Subnet routers in the lab (issue 16): a LAN host with no agent, behind a tailnet node that advertises the LAN,
reached from another node by its LAN address.

Topology: one plain LAN with the router r, alice's client c and bob's node x; behind r a namespace "lh" on
198.51.100.0/24 (r is 198.51.100.1, the host 198.51.100.10), with no agent and no route to the tailnet unless
the test gives it one. The policy lets alice reach the subnet and bob only alice's nodes on TCP 22, so x sees the
router as a peer and its forwarded packets meet r's forward filter. The autoApprovers and failover tests put one
LAN host on a bridge behind two routers (198.51.100.1 and .2).
"""

from __future__ import annotations

import json
import signal
import sys
from pathlib import Path

import pytest

from tests.lab import Lab, Topology
from tests.lab.udp import py
from tests.lab_tests.tailnet import Tailnet

pytestmark = pytest.mark.lab

LAN = "198.51.100.0/24"
ROUTER_LAN, HOST = "198.51.100.1", "198.51.100.10"
ALICE, BOB = "alice@example.com", "bob@example.com"
POLICY = """{
  "tagOwners": {"tag:router": ["alice@example.com"]},
  "autoApprovers": {"routes": {"198.51.100.0/24": ["tag:router"]}},
  "acls": [
    {"action": "accept", "src": ["alice@example.com"], "dst": ["198.51.100.0/24:*", "alice@example.com:*"]},
    {"action": "accept", "src": ["bob@example.com"], "dst": ["alice@example.com:22"]},
  ],
}
"""

# On the LAN host: tell each TCP client the source address it came from.
WHO = r"""
import socket
s = socket.socket()
s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
s.bind(("0.0.0.0", 8000))
s.listen(16)
while True:
    c, a = s.accept()
    with c:
        c.sendall(a[0].encode())
"""
# argv: host timeout. Prints what WHO said, or the error.
ASK = r"""
import socket, sys
try:
    with socket.create_connection((sys.argv[1], 8000), timeout=float(sys.argv[2])) as s:
        print(s.recv(64).decode())
except OSError as e:
    print(type(e).__name__)
"""


def lan_host(lab: Lab, router: str, tmp: Path) -> str:
    """The agentless host behind `router`, with WHO running; returns its namespace."""
    ns = lab.add_ns("lh")
    r_if, h_if = lab.iface("rl"), lab.iface("hl")
    lab.veth(lab.ns(router), r_if, ns, h_if)
    lab.exec(router, ["ip", "addr", "add", f"{ROUTER_LAN}/24", "dev", r_if])
    lab.exec(router, ["ip", "link", "set", r_if, "up"])
    lab.exec(ns, ["ip", "addr", "add", f"{HOST}/24", "dev", h_if])
    lab.exec(ns, ["ip", "link", "set", h_if, "up"])
    lab.exec(ns, ["ip", "route", "add", "default", "via", ROUTER_LAN])
    lab.spawn(ns, py(WHO), log_path=tmp / "who.log")
    return ns


def ask(tn: Tailnet, name: str, timeout: float = 1.0) -> str:
    return tn.lab.exec(name, py(ASK, HOST, timeout), timeout=timeout + 20).stdout.strip()


def server_cli(tn: Tailnet, *args: str) -> str:
    p = tn.lab.exec(tn.server_ns, [sys.executable, "-m", "coord.cli", *args, "--data", str(tn.data)], check=False)
    assert p.returncode == 0, p.stdout + p.stderr
    return p.stdout


def set_policy(tn: Tailnet, tmp: Path, text: str = POLICY) -> None:
    f = tmp / "policy.hujson"
    f.write_text(text)
    assert "policy applied" in server_cli(tn, "policy", "set", str(f))


def dropped(tn: Tailnet, name: str) -> int:
    out = tn.lab.exec(name, ["nft", "-j", "list", "counter", "inet", "shoal_filter", "dropped"]).stdout
    return int(next(x["counter"] for x in json.loads(out)["nftables"] if "counter" in x)["packets"])


def test_subnet_router_lab_approval_snat_and_policy(tailnet: Tailnet, tmp_path: Path) -> None:
    tn, lab = tailnet, tailnet.lab
    lab.build(Topology.parse("lan: r c x"))
    host_ns = lan_host(lab, "r", tmp_path)
    tn.start_server()
    set_policy(tn, tmp_path)
    for n in ("r", "c", "x"):
        tn.start_agent(n)
    tn.up("r", tn.auth_key(ALICE), "--advertise-routes", LAN)
    tn.up("c", tn.auth_key(ALICE), "--accept-routes")
    tn.up("x", tn.auth_key(BOB), "--accept-routes")

    # forwarding is off in a fresh namespace: the router says so
    assert any(h.startswith("IP forwarding is off (net.ipv4.ip_forward") for h in tn.status("r")["Health"])
    lab.sysctl(lab.ns("r"), "net.ipv4.ip_forward", "1")
    # the self-check (every 2 s) withheld the route while forwarding was off; it offers it again
    tn.wait_for("the router's health clears", lambda: not any("forwarding" in h for h in tn.status("r")["Health"]),
                timeout=6, step=0.2)
    tn.wait_for("r offers the route", lambda: json.loads(server_cli(tn, "routes", "list", "--json"))[0]["advertised"],
                timeout=6, step=0.2)

    # advertised but not approved: nobody gets the route, the host is unreachable
    routes = json.loads(server_cli(tn, "routes", "list", "--json"))
    assert [(x["name"], x["advertised"], x["approved"], x["primary"]) for x in routes] == [("r", [LAN], [], [])]
    tn.wait_for("c sees r", lambda: "r" in tn.peer_names("c"))
    assert ask(tn, "c") != ROUTER_LAN
    assert LAN not in lab.exec("c", ["ip", "route"]).stdout

    server_cli(tn, "routes", "approve", "r", LAN)
    # with SNAT (the default) the host sees the router's LAN address
    tn.wait_for("c reaches the LAN host", lambda: ask(tn, "c") == ROUTER_LAN, timeout=15, step=0.2)
    assert tn.ping("c", HOST)
    # bob's node has the route (r is its peer) but the policy does not let it through r's forward chain
    tn.wait_for("x has the route", lambda: LAN in lab.exec("x", ["ip", "route"]).stdout, timeout=10)
    before = dropped(tn, "r")
    assert ask(tn, "x") == "TimeoutError"
    assert dropped(tn, "r") > before

    # without SNAT the host sees the client's tailnet address (and needs a route back through the router)
    lab.exec(host_ns, ["ip", "route", "add", "100.64.0.0/10", "via", ROUTER_LAN])
    tn.up("r", tn.auth_key(ALICE), "--snat-subnet-routes=false")
    c4 = tn.ip("c")
    tn.wait_for("the host sees c's own address", lambda: ask(tn, "c") == c4, timeout=15, step=0.2)

    # unapproved: the route goes away again
    server_cli(tn, "routes", "unapprove", "r", LAN)
    tn.wait_for("c loses the route", lambda: LAN not in lab.exec("c", ["ip", "route"]).stdout, timeout=10)
    assert ask(tn, "c") != c4


def test_subnet_router_lab_auto_approvers_on_policy_change_and_at_registration(tailnet: Tailnet,
                                                                                tmp_path: Path) -> None:
    tn, lab = tailnet, tailnet.lab
    lab.build(Topology.parse("lan: ra rb c"))
    a_lan, _ = shared_lan(lab, ["ra", "rb"], tmp_path)
    tn.start_server()
    set_policy(tn, tmp_path, POLICY.replace('"198.51.100.0/24": ["tag:router"]', '"192.0.2.0/24": ["tag:router"]'))
    for n in ("ra", "rb", "c"):
        tn.start_agent(n)
    tn.up("ra", tn.auth_key(ALICE), "--advertise-routes", LAN, "--advertise-tags", "tag:router")
    tn.up("c", tn.auth_key(ALICE), "--accept-routes")
    assert json.loads(server_cli(tn, "routes", "list", "--json"))[0]["approved"] == []
    # the policy now grants the prefix: approved when it is set, no admin involved
    set_policy(tn, tmp_path)
    tn.wait_for("c reaches the LAN host", lambda: ask(tn, "c") == a_lan, timeout=15, step=0.2)
    # and a router registering under it is approved at registration (a standby: ra stays primary)
    tn.up("rb", tn.auth_key(ALICE), "--advertise-routes", LAN, "--advertise-tags", "tag:router")
    routes = {x["name"]: x for x in json.loads(server_cli(tn, "routes", "list", "--json"))}
    assert [(routes[r]["approved"], routes[r]["primary"]) for r in ("ra", "rb")] == [([LAN], [LAN]), ([LAN], [])]
    approvals = [json.loads(line) for line in server_cli(
        tn, "events", "tail", "--type", "NodeRoutesApproved", "--json").splitlines()]
    assert [(e["actor"], e["data"]["node_id"], e["data"]["routes"]) for e in approvals] == [
        ("system", routes["ra"]["id"], [LAN]), ("system", routes["rb"]["id"], [LAN])]
    assert ask(tn, "c") == a_lan


def shared_lan(lab: Lab, routers: list[str], tmp: Path) -> list[str]:
    """One LAN host on a bridge that every router in `routers` joins (router i is 198.51.100.(i+1)); WHO runs
    there. Returns the routers' LAN addresses."""
    ns = lab.add_ns("lh")
    lab.exec(ns, ["ip", "link", "add", "br0", "type", "bridge"])
    lab.exec(ns, ["ip", "addr", "add", f"{HOST}/24", "dev", "br0"])
    lab.exec(ns, ["ip", "link", "set", "br0", "up"])
    addrs = []
    for i, r in enumerate(routers):
        r_if, h_if = lab.iface(f"rl{i}"), lab.iface(f"hl{i}")
        lab.veth(lab.ns(r), r_if, ns, h_if)
        lab.exec(ns, ["ip", "link", "set", h_if, "master", "br0", "up"])
        addr = f"198.51.100.{i + 1}"
        lab.exec(r, ["ip", "addr", "add", f"{addr}/24", "dev", r_if])
        lab.exec(r, ["ip", "link", "set", r_if, "up"])
        lab.sysctl(lab.ns(r), "net.ipv4.ip_forward", "1")
        addrs.append(addr)
    lab.spawn(ns, py(WHO), log_path=tmp / "who.log")
    return addrs


def test_ha_failover_killed_primary_router(tailnet: Tailnet, tmp_path: Path) -> None:
    """Two routers for one prefix: the first is primary; when its agent is killed (its control stream closes)
    the server makes the other primary and the client's traffic to the LAN goes through it within 15 s."""
    tn, lab = tailnet, tailnet.lab
    lab.build(Topology.parse("lan: ra rb c"))
    a_lan, b_lan = shared_lan(lab, ["ra", "rb"], tmp_path)
    tn.start_server()
    set_policy(tn, tmp_path)
    for n in ("ra", "rb", "c"):
        tn.start_agent(n)
    for r in ("ra", "rb"):
        tn.up(r, tn.auth_key(ALICE), "--advertise-routes", LAN, "--advertise-tags", "tag:router")
    tn.up("c", tn.auth_key(ALICE), "--accept-routes")
    routes = {x["name"]: x for x in json.loads(server_cli(tn, "routes", "list", "--json"))}
    assert (routes["ra"]["primary"], routes["rb"]["primary"]) == ([LAN], [])
    assert routes["rb"]["served"] == [LAN]
    tn.wait_for("c reaches the LAN through ra", lambda: ask(tn, "c") == a_lan, timeout=15, step=0.2)

    lab.kill(tn.agents.pop("ra"), signal.SIGKILL)  # no goodbye: the kernel closes its control stream
    took = tn.wait_for("c reaches the LAN through rb", lambda: ask(tn, "c", 0.5) == b_lan, timeout=15, step=0.1)
    print(f"failover took {took:.2f}s")
    routes = {x["name"]: x for x in json.loads(server_cli(tn, "routes", "list", "--json"))}
    assert (routes["ra"]["primary"], routes["rb"]["primary"], routes["ra"]["online"]) == ([], [LAN], False)
    peers = {p["HostName"]: p for p in tn.status("c")["Peers"]}
    assert peers["rb"]["RoutesInUse"] == [LAN] and peers["ra"]["RoutesInUse"] == []


def test_ha_failover_cut_link_to_the_primary_router(tailnet: Tailnet, tmp_path: Path) -> None:
    """The primary router's link to the server is cut (nothing more arrives, its TCP stream stays open): the server's
    keep-alives to routers go unacknowledged, its TCP user timeout ends the stream, and the client's traffic goes
    through the other router within 15 s. The cut router keeps its LAN and its tunnels to peers."""
    tn, lab = tailnet, tailnet.lab
    lab.build(Topology.parse("lan: ra rb c"))
    a_lan, b_lan = shared_lan(lab, ["ra", "rb"], tmp_path)
    tn.start_server()
    set_policy(tn, tmp_path)
    for n in ("ra", "rb", "c"):
        tn.start_agent(n)
    for r in ("ra", "rb"):
        tn.up(r, tn.auth_key(ALICE), "--advertise-routes", LAN, "--advertise-tags", "tag:router")
    tn.up("c", tn.auth_key(ALICE), "--accept-routes")
    tn.wait_for("c reaches the LAN through ra", lambda: ask(tn, "c") == a_lan, timeout=15, step=0.2)
    server = tn.server_addr
    lab.nft(lab.ns("ra"), f"""table inet {lab.prefix}cut {{
  chain out {{ type filter hook output priority -10; ip daddr {server} drop; }}
  chain in {{ type filter hook input priority -10; ip saddr {server} drop; }}
}}
""")
    took = tn.wait_for("c reaches the LAN through rb", lambda: ask(tn, "c", 0.5) == b_lan, timeout=15, step=0.1)
    print(f"failover after a cut link took {took:.2f}s")
    routes = {x["name"]: x for x in json.loads(server_cli(tn, "routes", "list", "--json"))}
    assert (routes["ra"]["online"], routes["rb"]["primary"]) == (False, [LAN])
