"""node/agent.py with a fake engine and a fake runner: what the shell does with each netmap, as one transcript of
OS commands and engine calls compared as text; the login state machine; the status from one snapshot."""

from __future__ import annotations

import asyncio
from pathlib import Path
from typing import Any

from coord import wire
from node import compile, login, mapsession
from node.agent import Agent, AgentConfig
from node.login import Answer, Login, State
from node.run import FakeRunner, Result
from tests.node.fakes import FakeEngine

NOW = 1_900_000_000.0
LO, HI = "nodekey:" + "00" * 31 + "01", "nodekey:" + "ff" * 32  # below and above any key the agent makes
SSH_FROM_N2 = [{"SrcIPs": ["100.64.0.2/32"], "DstPorts": [{"IP": "100.64.0.1/32", "Ports": {"First": 22, "Last": 22}}],
                "IPProto": [6]}]
ALLOW_ALL = [{"SrcIPs": ["*"], "DstPorts": [{"IP": "*", "Ports": {"First": 0, "Last": 65535}}]}]
LINK = '[{"ifname": "shoal0", "flags": ["UP"], "mtu": 1280, "addr_info": []}]'
ADDRS = ('[{"ifname": "eth0", "flags": ["UP"], "addr_info": [{"family": "inet", "local": "192.0.2.10", '
         '"prefixlen": 24, "scope": "global"}]}]')
ROUTES = """ip -j addr show dev shoal0
ip -j route show dev shoal0
ip -j -6 route show dev shoal0
ip addr add 100.64.0.1/32 dev shoal0
ip -6 addr add fd7a:115c:a1e0::1/128 dev shoal0 nodad
ip route add 100.64.0.0/10 dev shoal0
ip -6 route add fd7a:115c:a1e0::/48 dev shoal0
"""
# The exit-node applier reads once at start even with no exit node: leftovers of a crash go (see exitroute.set).
EXIT_READ = """ip -j -4 rule show
ip -j -4 route show table 52
ip -j -6 rule show
ip -j -6 route show table 52
"""


def peer(pid: int, key: str) -> dict[str, Any]:
    addrs = [f"100.64.0.{pid}/32", f"fd7a:115c:a1e0::{pid}/128"]
    return {"ID": pid, "Name": f"n{pid}.shoal.internal.", "Key": key, "Addresses": addrs, "AllowedIPs": addrs,
            "Endpoints": [f"192.0.2.{10 + pid}:41641"], "Online": True}


def nft(script: str) -> str:
    return "nft -f -\n" + "".join(f"    {line}\n" for line in script.splitlines())


class Harness:
    def __init__(self, tmp: Path) -> None:
        self.runner = FakeRunner()
        self.runner.respond("ip -j addr show", ADDRS)
        self.runner.respond("ip -j addr show dev shoal0", LINK)
        self.engines: list[FakeEngine] = []
        self.agent = Agent(AgentConfig(state_dir=tmp / "state", endpoint_poll=3600, nat_traversal=False),
                           self.runner, self.make_engine, clock=lambda: NOW)

    def make_engine(self, iface: str, on_restart: Any) -> FakeEngine:
        self.engines.append(FakeEngine(self.runner, iface))
        return self.engines[-1]

    async def start(self) -> Agent:
        await self.agent.start()
        assert self.agent.backend is State.NEEDS_LOGIN
        self.agent.prefs.want_running = True  # what `up` leaves behind; the control loop is not run here
        self.runner.clear()
        return self.agent

    async def netmap(self, peers: list[dict[str, Any]], filt: list[dict[str, Any]]) -> None:
        """What the control loop does with one MapResponse."""
        a = self.agent
        msg = wire.MapResponse.from_json({
            "Node": {"ID": 1, "Name": "n1.shoal.internal.", "Key": str(a.node_key.public()),
                     "Addresses": ["100.64.0.1/32", "fd7a:115c:a1e0::1/128"]},
            "Peers": peers, "PacketFilter": filt, "Domain": "shoal.internal"})
        a.netmap = mapsession.apply(a.netmap, msg)
        a.login.netmap(compile.self_expired(a.netmap, NOW))
        await a._reconcile()

    def mark(self, text: str) -> None:
        self.runner.lines.append(f"--- {text}")

    def script(self, filt: list[dict[str, Any]]) -> str:
        return compile.filter_script(mapsession.apply(mapsession.NetMap(), wire.MapResponse.from_json({
            "Node": {"ID": 1, "Key": str(self.agent.node_key.public()),
                     "Addresses": ["100.64.0.1/32", "fd7a:115c:a1e0::1/128"]}, "PacketFilter": filt})), "shoal0")


def test_shape_agent_applies_filter_routes_wireguard_in_order_and_only_what_differs(tmp_path: Path) -> None:
    h = Harness(tmp_path)

    async def go() -> dict[str, Any]:
        a = await h.start()
        await h.netmap([peer(2, LO)], SSH_FROM_N2)
        h.mark("the same map again")
        await h.netmap([peer(2, LO)], SSH_FROM_N2)
        h.mark("a peer with a higher key joins; the policy becomes allow-all")
        await h.netmap([peer(2, LO), peer(3, HI)], ALLOW_ALL)
        h.mark("n2's initiation arrived: the next engine read releases it")
        h.engines[0].handshake(bytes.fromhex(LO[8:]), NOW - 1, "192.0.2.12:41641")
        await a._engine_read()
        await asyncio.sleep(0.01)
        st = await a.status()
        h.mark("down")
        await a.down()
        await a.stop()
        return st

    st = asyncio.run(go())
    # n2 has the lower key: it initiates, we hold it (no endpoint, no keepalive); n3's key is higher: we initiate
    assert h.runner.transcript == (
        "engine start\n" + nft(h.script(SSH_FROM_N2)) + ROUTES + EXIT_READ
        + "wg add 00000000 allowed=100.64.0.2/32,fd7a:115c:a1e0::2/128\n"
        "--- the same map again\n"
        "--- a peer with a higher key joins; the policy becomes allow-all\n"
        + nft(h.script(ALLOW_ALL))
        + "wg add ffffffff endpoint=192.0.2.13:41641 keepalive=25 allowed=100.64.0.3/32,fd7a:115c:a1e0::3/128\n"
        "--- n2's initiation arrived: the next engine read releases it\n"
        "wg update 00000000 keepalive=25\n"
        "--- down\n"
        "engine stop\n" + nft(compile.delete_filter_script()))
    rows = {r["HostName"]: r for r in st["Peers"]}
    assert (rows["n2"]["Path"], rows["n2"]["PathText"]) == ("direct", "direct 192.0.2.12:41641")
    assert (rows["n3"]["Path"], rows["n3"]["PathText"]) == ("connecting", "connecting")
    assert st["BackendState"] == "Running"


def test_sec_agent_with_nft_failing_keeps_peers_out_and_says_so(tmp_path: Path) -> None:
    h = Harness(tmp_path)

    async def go() -> tuple[dict[str, Any], dict[str, Any]]:
        a = await h.start()
        h.runner.responses["nft -f -"] = Result(1, "", "Error: Could not process rule: No such file")
        await h.netmap([peer(2, LO), peer(3, HI)], SSH_FROM_N2)
        failing = await a.status()
        h.mark("nft works again; the next map goes in")
        del h.runner.responses["nft -f -"]
        await h.netmap([peer(2, LO), peer(3, HI)], SSH_FROM_N2)
        return failing, await a.status()

    failing, fixed = asyncio.run(go())
    before, after = h.runner.transcript.split("--- nft works again; the next map goes in\n")
    # the policy, then the closed table: both refused; no peer enters WireGuard
    assert before == "engine start\n" + nft(h.script(SSH_FROM_N2)) + nft(compile.closed_filter_script(
        "shoal0")) + ROUTES + EXIT_READ
    assert after == (nft(h.script(SSH_FROM_N2))
                     + "wg add 00000000 allowed=100.64.0.2/32,fd7a:115c:a1e0::2/128\n"
                     "wg add ffffffff endpoint=192.0.2.13:41641 keepalive=25 "
                     "allowed=100.64.0.3/32,fd7a:115c:a1e0::3/128\n")
    assert [p["InEngine"] for p in failing["Peers"]] == [False, False]
    assert any(h_.startswith("packet filter not in place: `nft -f -` exited 1: Error: Could not process rule")
               and "(2 now)" in h_ for h_ in failing["Health"]), failing["Health"]
    assert not any("filter" in h_ for h_ in fixed["Health"])
    assert [p["InEngine"] for p in fixed["Peers"]] == [True, True]


def test_shape_login_reads_registration_answers_one_way() -> None:
    class R:
        def __init__(self, **kw: Any) -> None:
            self.machine_authorized = kw.get("machine_authorized", False)
            self.node_key_expired = kw.get("node_key_expired", False)
            self.auth_url = kw.get("auth_url", "")
            self.error = kw.get("error", "")

    assert login.read(R(node_key_expired=True, machine_authorized=True)).answer is Answer.KEY_EXPIRED
    assert login.read(R(error="bad key")) == login.Reading(Answer.REFUSED, error="bad key")
    assert login.read(R(machine_authorized=True)).answer is Answer.AUTHORIZED
    assert login.read(R(auth_url="http://x/a/1")) == login.Reading(Answer.NEEDS_AUTH, auth_url="http://x/a/1")
    assert login.read(R()).answer is Answer.UNCLEAR
    s = Login()
    assert s.state is State.NO_STATE
    s.started(logged_in=False, want_running=False)
    assert s.state is State.NEEDS_LOGIN
    s.registered(login.read(R(auth_url="http://x/a/1")))
    assert (s.state, s.auth_url) == (State.NEEDS_LOGIN, "http://x/a/1")
    s.registered(login.read(R(machine_authorized=True)))
    assert (s.state, s.auth_url) == (State.STARTING, "")
    s.netmap(self_expired=False)
    assert s.state is State.RUNNING
    s.netmap(self_expired=True)
    assert (s.state, s.key_expired) == (State.NEEDS_LOGIN, True)
    s.registered(login.read(R(node_key_expired=True)))
    assert (s.state, s.key_expired) == (State.NEEDS_LOGIN, True)
    s.down(logged_in=True)
    assert s.state is State.STOPPED
    s.logged_out()
    assert s.state is State.NEEDS_LOGIN
    s.started(logged_in=True, want_running=True)
    assert s.state is State.STARTING
    s.started(logged_in=True, want_running=False)
    assert s.state is State.STOPPED


def test_pg_failover_up_remembers_every_control_url() -> None:
    p = login.up_prefs(login.Prefs(), "http://192.0.2.1:8080/", None, None,
                       control_urls=["http://192.0.2.2:8080", "http://192.0.2.1:8080", "http://192.0.2.2:8080/"])
    assert p.login_server == "http://192.0.2.1:8080" and p.control_urls == ["http://192.0.2.2:8080"]
    # kept by a later `up` that names no replicas, dropped when the node moves to another server
    assert login.up_prefs(p, "", None, None).control_urls == ["http://192.0.2.2:8080"]
    try:
        login.up_prefs(p, "", None, None, control_urls=["ftp://192.0.2.3"])
    except login.UpRefused as e:
        assert "must be an http" in str(e)
    else:
        raise AssertionError("a bad control URL was accepted")
    from node.state import Prefs

    assert Prefs.from_json({"control_urls": ["http://192.0.2.2:8080"]}).control_urls == ["http://192.0.2.2:8080"]


UDP_FLOW = ("udp      17 29 src=100.64.0.2 dst=100.64.0.1 sport=5000 dport=7000 src=100.64.0.1 dst=100.64.0.2 "
            "sport=7000 dport=5000 [ASSURED] mark=0 use=1\n")


def test_policy_agent_narrowed_filter_cuts_refused_flows_unless_the_server_keeps_them(tmp_path: Path) -> None:
    h = Harness(tmp_path)
    h.runner.respond("conntrack -L -f ipv4 -p udp", UDP_FLOW)

    async def go() -> None:
        a = await h.start()
        await h.netmap([peer(2, LO)], ALLOW_ALL)  # the agent's first filter: nothing to narrow
        h.mark("narrowed to ssh from n2")
        await h.netmap([peer(2, LO)], SSH_FROM_N2)
        h.mark("the server keeps established flows; allow-all, then narrowed again")
        a.netmap = mapsession.apply(a.netmap, wire.MapResponse.from_json({"KeepEstablished": True}))
        await h.netmap([peer(2, LO)], ALLOW_ALL)
        await h.netmap([peer(2, LO)], SSH_FROM_N2)
        await a.stop()

    asyncio.run(go())
    lines = h.runner.transcript.split("--- ")
    ct = [[x for x in part.splitlines() if x.startswith("conntrack")] for part in lines]
    assert ct[0] == []
    assert ct[1] == [
        "conntrack -L -f ipv4 -p tcp", "conntrack -L -f ipv4 -p udp",
        "conntrack -L -f ipv6 -p tcp", "conntrack -L -f ipv6 -p udp",
        "conntrack -D -f ipv4 -p udp -s 100.64.0.2 -d 100.64.0.1 --sport 5000 --dport 7000",
    ]
    assert ct[2] == []
