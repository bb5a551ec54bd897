"""Subnet routes on the server: advertised, approved (by an admin or autoApprovers), one primary per prefix, and
what netmaps and packet filters make of them. The write path is the real Service on an in-memory store; the CLI
test runs ``shoal-server routes`` against a real server."""

from __future__ import annotations

import asyncio
import json
import os
from pathlib import Path
from typing import Any

import pytest

from coord import decide, wire
from coord import events as ev
from coord.errors import DomainError
from coord.netmap import Settings, default_dns
from coord.service import Service
from coord.state import Node, State, fold
from coord.store.memory import MemoryStore
from tests.coord.harness import free_port, sim_node
from tests.coord.test_crash import start_server
from tests.coord.util import POOL, cli, cli_json

pytestmark = pytest.mark.anyio

LAN = "198.51.100.0/24"
POLICY = """{
  "tagOwners": {"tag:router": ["alice@example.com"]},
  "autoApprovers": {"routes": {"198.51.100.0/24": ["tag:router"], "203.0.113.0/24": ["bob@example.com"]},
                    "exitNode": ["tag:router"]},
  "acls": [{"action": "accept", "src": ["alice@example.com"], "dst": ["198.51.100.0/24:*"]}]
}"""


class Net:
    def __init__(self) -> None:
        self.now = 1_800_000_000.0
        cfg = Settings("shoal.internal", {"Regions": {}}, default_dns("shoal.internal"))
        self.svc = Service(MemoryStore(), State(), decide.Rules(POOL, None), cfg, lambda: self.now)
        self.changes: list[Any] = []
        self.svc.publish = self.changes.append

    @property
    def state(self) -> State:
        return self.svc.state

    async def user(self, name: str) -> None:
        await self.svc.create_user(name)

    async def join(self, user: str, host: str, routes: tuple[str, ...] = (), tags: tuple[str, ...] = ()) -> int:
        u = self.state.user_by_name(user)
        assert u is not None
        req = wire.RegisterRequest(node_key=os.urandom(32), disco_key=os.urandom(32),
                                   hostinfo=wire.Hostinfo(hostname=host, routable_ips=routes))
        owner = decide.Owner(u, tags, False, None)
        (r, *_) = await self.svc.execute(lambda s: decide.register(s, os.urandom(32), req, owner, self.svc.rules,
                                                                   self.now), "test")
        assert isinstance(r.event, ev.NodeRegistered)
        return r.event.node_id

    async def online(self, nid: int, up: bool = True) -> None:
        self.now += 1
        await self.svc.execute(lambda s: [ev.NodeConnected(nid) if up else ev.NodeDisconnected(nid)], "test")

    async def advertise(self, nid: int, routes: tuple[str, ...]) -> None:
        n = self.state.nodes[nid]
        await self.svc.map_update(nid, wire.MapRequest(node_key=bytes.fromhex(n.node_key[8:]),
                                                       hostinfo=wire.Hostinfo(hostname=n.hostname, os="linux",
                                                                              routable_ips=routes)))

    def peer(self, viewer: int, nid: int) -> dict[str, Any]:
        body, _ = self.svc.builder.full(self.svc.visibility, viewer, self.now)
        peers = {p["ID"]: p for p in json.loads(body)["Peers"]}
        return peers[nid]  # type: ignore[no-any-return]

    def records(self) -> list[ev.Record]:
        assert isinstance(self.svc.store, MemoryStore)
        return self.svc.store.records

    def replayed(self) -> State:
        return fold(self.records())


def routes(n: Node) -> tuple[tuple[str, ...], tuple[str, ...], tuple[str, ...]]:
    """(approved, served, primary)"""
    return n.approved_routes, n.served_routes, n.primary_routes


async def tailnet() -> tuple[Net, int, int]:
    net = Net()
    await net.user("alice@example.com")
    client = await net.join("alice@example.com", "laptop")
    router = await net.join("alice@example.com", "router", (LAN,))
    await net.online(client)
    await net.online(router)
    return net, client, router


async def test_subnet_router_routes_count_only_once_approved() -> None:
    net, client, router = await tailnet()
    r = net.state.nodes[router]
    assert r.routes == (LAN,) and routes(r) == ((), (), ())
    assert net.peer(client, router)["AllowedIPs"] == [f"{r.ipv4}/32", f"{r.ipv6}/128"]
    assert net.peer(client, router)["PrimaryRoutes"] == []
    await net.svc.approve_routes("router", (LAN,))
    assert routes(r) == ((LAN,), (LAN,), (LAN,))
    assert net.peer(client, router)["AllowedIPs"][-1] == LAN
    assert net.peer(client, router)["PrimaryRoutes"] == [LAN]
    assert router in net.changes[-1].peers
    # withdrawn from Hostinfo: no longer served, though still approved
    await net.advertise(router, ())
    assert routes(r) == ((LAN,), (), ())
    await net.advertise(router, (LAN,))
    assert routes(r) == ((LAN,), (LAN,), (LAN,))
    await net.svc.unapprove_routes("router", (LAN,))
    assert routes(r) == ((), (), ())
    assert [type(x.event).__name__ for x in net.records()].count("NodeRoutesApproved") == 2
    assert net.replayed().nodes[router] == r


async def test_subnet_router_approve_refuses_bad_prefixes() -> None:
    net, _, _ = await tailnet()
    with pytest.raises(DomainError, match="masked CIDR"):
        await net.svc.approve_routes("router", ("198.51.100.7/24",))
    with pytest.raises(DomainError, match="masked CIDR"):
        await net.svc.approve_routes("router", ("not-a-route",))
    # approving the same thing twice writes nothing the second time
    await net.svc.approve_routes("router", (LAN,))
    seq = net.state.last_seq
    await net.svc.approve_routes("router", (LAN,))
    assert net.state.last_seq == seq
    # one default route approves both: an exit node
    await net.svc.approve_routes("router", ("0.0.0.0/0",))
    assert net.state.nodes[2].approved_routes == ("0.0.0.0/0", LAN, "::/0")


def test_subnet_router_hostinfo_refuses_unmasked_routes() -> None:
    with pytest.raises(wire.WireError, match=r"RoutableIPs\[1\].*masked"):
        wire.Hostinfo.from_json({"Hostname": "r", "RoutableIPs": [LAN, "10.0.0.1/8"]})
    hi = wire.Hostinfo.from_json({"Hostname": "r", "RoutableIPs": ["2001:DB8::/32", "2001:db8::/32"]})
    assert hi.routable_ips == ("2001:db8::/32",)


async def test_subnet_router_primary_is_stable_and_fails_over() -> None:
    net, client, r1 = await tailnet()
    r2 = await net.join("alice@example.com", "router2", (LAN,))
    await net.svc.approve_routes(str(r1), (LAN,))
    await net.svc.approve_routes(str(r2), (LAN,))
    await net.online(r2)
    nodes = net.state.nodes
    assert nodes[r1].primary_routes == (LAN,) and nodes[r2].primary_routes == ()
    await net.online(r1, False)
    assert nodes[r1].primary_routes == () and nodes[r2].primary_routes == (LAN,)
    assert {r1, r2} <= net.changes[-1].peers
    assert LAN in net.peer(client, r2)["AllowedIPs"] and LAN not in net.peer(client, r1)["AllowedIPs"]
    # r1 comes back: r2 keeps the prefix (no flapping)
    await net.online(r1)
    assert nodes[r2].primary_routes == (LAN,) and nodes[r1].primary_routes == ()
    # with no router online, nobody is primary; the first back takes it
    await net.online(r1, False)
    await net.online(r2, False)
    assert nodes[r1].primary_routes == nodes[r2].primary_routes == ()
    await net.online(r1)
    assert nodes[r1].primary_routes == (LAN,)
    # deleting the primary hands the prefix on
    await net.online(r2)
    await net.svc.delete_node(str(r1))
    assert nodes[r2].primary_routes == (LAN,)
    assert net.replayed().nodes[r2] == nodes[r2]


async def test_subnet_router_auto_approvers_at_registration_tags_and_policy() -> None:
    net = Net()
    await net.user("alice@example.com")
    await net.user("bob@example.com")
    await net.svc.set_policy(POLICY)
    tagged = await net.join("alice@example.com", "r1", (LAN, "0.0.0.0/0", "::/0"), tags=("tag:router",))
    assert net.state.nodes[tagged].approved_routes == ("0.0.0.0/0", LAN, "::/0")
    assert net.state.nodes[tagged].exit_node
    approvals = [r for r in net.records() if isinstance(r.event, ev.NodeRoutesApproved)]
    assert [r.actor for r in approvals] == ["system"]
    # alice's own (untagged) router is not an approver of the LAN; bob's is for his prefix only
    mine = await net.join("alice@example.com", "r2", (LAN,))
    bobs = await net.join("bob@example.com", "r3", (LAN, "203.0.113.0/24"))
    assert net.state.nodes[mine].approved_routes == ()
    assert net.state.nodes[bobs].approved_routes == ("203.0.113.0/24",)
    # tagging alice's router makes it an approver: evaluated when the tags change
    await net.svc.tag_node(str(mine), ("tag:router",))
    assert net.state.nodes[mine].approved_routes == (LAN,)
    # a new advertisement is evaluated too
    await net.advertise(bobs, ("203.0.113.0/25",))
    assert net.state.nodes[bobs].served_routes == ("203.0.113.0/25",)
    # a policy change approves what is now granted (and takes nothing back)
    other = await net.join("bob@example.com", "r4", ("192.0.2.0/24",))
    assert net.state.nodes[other].approved_routes == ()
    await net.svc.set_policy(POLICY.replace("203.0.113.0/24", "192.0.2.0/24", 1))
    assert net.state.nodes[other].approved_routes == ("192.0.2.0/24",)
    assert net.state.nodes[bobs].served_routes == ("203.0.113.0/25",)
    assert net.replayed().nodes == net.state.nodes


async def test_subnet_router_filters_allow_approved_routes_only() -> None:
    net = Net()
    await net.user("alice@example.com")
    await net.user("carol@example.com")
    await net.svc.set_policy(POLICY)
    client = await net.join("alice@example.com", "laptop")
    other = await net.join("carol@example.com", "other")
    router = await net.join("alice@example.com", "r", (LAN,), tags=("tag:router",))
    vis = net.svc.visibility
    assert any(d["IP"] == LAN for rule in vis.filter(router) for d in rule["DstPorts"])
    assert router in set(vis.peers(client)) and router not in set(vis.peers(other))
    # unapproved, the router is no destination: the filter and the peer set follow
    await net.svc.unapprove_routes(str(router), (LAN,))
    vis = net.svc.visibility
    assert not any(d["IP"] == LAN for rule in vis.filter(router) for d in rule["DstPorts"])
    assert router not in set(vis.peers(client))


async def test_subnet_router_cli_against_a_real_server(tmp_path: Path) -> None:
    data, port = tmp_path / "data", free_port()
    server = start_server(data, port)
    node = sim_node(f"http://127.0.0.1:{port}", "gw")
    try:
        await asyncio.to_thread(cli, data, "users", "create", "alice")
        key = (await asyncio.to_thread(cli_json, data, "keys", "create", "--user", "alice", "--reusable"))["key"]
        await node.client.pin()
        base = node.register_request(key)
        await node.client.register(wire.RegisterRequest(
            node_key=base.node_key, disco_key=base.disco_key, auth_key=key,
            hostinfo=wire.Hostinfo(hostname="gw", os="linux", routable_ips=(LAN,))))
        stream = node.client.stream(node.map_request())
        first = await asyncio.wait_for(stream.__anext__(), 5)
        assert first["Node"]["PrimaryRoutes"] == []

        def run(*args: str) -> str:
            return cli(data, "routes", *args).stdout

        listed = json.loads(await asyncio.to_thread(run, "list", "--json"))
        assert listed[0]["advertised"] == [LAN] and listed[0]["approved"] == []
        assert listed[0]["online"] is True
        out = await asyncio.to_thread(run, "approve", "gw", LAN)
        assert f"primary for {LAN}" in out
        text = await asyncio.to_thread(run, "list")
        assert "PRIMARY" in text and LAN in text
        while True:
            msg = await asyncio.wait_for(stream.__anext__(), 5)
            if msg.get("Node", {}).get("PrimaryRoutes"):
                assert msg["Node"]["PrimaryRoutes"] == [LAN] and LAN in msg["Node"]["AllowedIPs"]
                break
        bad = await asyncio.to_thread(lambda: cli(data, "routes", "approve", "gw", "10.0.0.1/8", check=False))
        assert bad.returncode != 0 and "masked CIDR" in bad.stderr
        out = await asyncio.to_thread(run, "unapprove", "gw", LAN)
        assert "approved -" in out
        log = [json.loads(x) for x in (await asyncio.to_thread(
            cli, data, "events", "tail", "--type", "NodeRoutesApproved", "--json")).stdout.splitlines()]
        assert [(e["actor"], e["data"]["routes"]) for e in log] == [("admin", [LAN]), ("admin", [])]
        await stream.aclose()
    finally:
        await node.client.close()
        server.terminate()
        server.wait(10)


async def test_ha_failover_routers_get_frequent_keepalives() -> None:
    """A router's stream idles at most ROUTER_KEEPALIVE: unacknowledged keep-alives are how a cut link is noticed
    (the server's TCP user timeout, coord/serve.py); other nodes keep the configured interval."""
    from coord.fanout import KEEPALIVE, ROUTER_KEEPALIVE, Fanout

    net, client, router = await tailnet()
    f = Fanout(net.svc, batch_delay=0.05, keepalive=50.0)
    sr, _ = f.open(router)
    sc, _ = f.open(client)
    for s in (sr, sc):
        assert f.next_frame(s, 0.0) is not None  # the full map
        assert f.next_frame(s, 1.0) is None  # idle from now
    assert f.session_timer(sr) == f.session_timer(sc) == 51.0  # advertised, not approved: not a router yet
    await net.svc.approve_routes(str(router), (LAN,))
    assert f.session_timer(sr) == 1.0 + ROUTER_KEEPALIVE and f.session_timer(sc) == 51.0
    assert f.next_frame(sr, 1.0 + ROUTER_KEEPALIVE) == KEEPALIVE
