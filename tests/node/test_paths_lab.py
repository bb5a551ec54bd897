"""The NAT-traversal pieces composed, for real: two nodes behind easy NATs (nftables masquerade with a home
router's input firewall), each with wireguard-go on port 41641, netcheck and disco over raw sockets on that port,
and an in-memory DERP carrying CallMeMaybe and, until a direct path is confirmed, the WireGuard packets
(through derpsock). Traffic starts over DERP, then both sides punch through and move to the direct path.

`Mini` below is the wiring the agent needs, kept small; it is a model for node/agent.py, not a part of it.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
from collections.abc import Callable

import pytest

from derp.stunserver import StunServer as StunServer_
from derp.stunserver import start_stun_server
from node import disco, netcheck, paths, rawsock
from node.derpsock import DerpSockets
from node.disco import AddrPort
from node.keys import PrivateKey
from node.netcheck import Region, StunServer
from node.render.routes import RouteApplier, RouteConfig
from node.run import SubprocessRunner
from node.wg.config import WgConfig, WgPeer
from node.wg.go import GoEngine
from tests.lab import Lab, Topology, easy_nat_pair
from tests.lab.fixtures import lab, lab_sweep
from tests.lab.lab import aping
from tests.node.test_rawsock_lab import netns

__all__ = ["lab", "lab_sweep"]

pytestmark = pytest.mark.lab

PORT = 41641
TUN = {"a": "100.64.0.1", "b": "100.64.0.2", "ne": "100.64.0.3", "nh": "100.64.0.4", "pub": "100.64.0.5"}


class Mini:
    def __init__(self, lab: Lab, name: str, derp: Callable[[str, bytes, bytes], None]) -> None:
        self.lab, self.name, self.derp = lab, name, derp
        self.loop = asyncio.get_running_loop()
        self.key = PrivateKey.generate()
        self.node_key = self.key.public().raw
        self.magic = paths.Magic(PrivateKey.generate().raw, self.node_key, rand=os.urandom)
        self.engine = GoEngine(lab.iface(name), netns=lab.ns(name))
        self.peer: Mini | None = None
        self.endpoint_log: list[tuple[float, AddrPort | None]] = []
        self.tasks: set[asyncio.Task[None]] = set()
        self.timer: asyncio.TimerHandle | None = None
        self.reconciled = 0
        self.stun: netcheck.Runner = netcheck.Runner(self._send_udp)
        with netns(lab.ns(name)):
            self.raw = rawsock.RawPort(PORT, self._on_raw)
            self.derpsock = DerpSockets(PORT, lambda dst, pkt: derp(self.name, dst, pkt))

    def _send_udp(self, data: bytes, addr: AddrPort) -> None:
        self.raw.sendto(data, addr)

    def _on_raw(self, payload: bytes, src: AddrPort) -> None:
        if disco.looks_like_disco(payload):
            self.magic.receive(payload, src, self.loop.time())
            self.pump()
        else:
            self.stun.feed(payload, src)

    def from_derp(self, src_key: bytes, packet: bytes) -> None:
        if disco.looks_like_disco(packet):
            self.magic.receive(packet, None, self.loop.time(), derp_src=src_key)
            self.pump()
        else:
            self.derpsock.deliver(src_key, packet)

    async def start(self, peer: Mini, peer_endpoints: list[AddrPort], own_endpoints: list[AddrPort]) -> None:
        self.peer = peer
        await self.engine.start()
        await self.set_endpoint(None)
        await RouteApplier(SubprocessRunner(netns=self.lab.ns(self.name))).set(
            RouteConfig(self.lab.iface(self.name), (f"{TUN[self.name]}/32",))
        )
        self.magic.set_self_endpoints(own_endpoints)
        self.magic.upsert_peer(peer.magic.public, peer.node_key, peer_endpoints, self.loop.time())
        self.pump()
        self.tasks.add(self.loop.create_task(self.reconcile()))

    def path_state(self) -> paths.Peer:
        assert self.peer is not None
        state = self.magic.peer_by_node(self.peer.node_key)
        assert state is not None
        return state

    def path(self) -> AddrPort | None:
        """Our choice for the peer: a direct address, or None for DERP."""
        return self.path_state().endpoint

    def desired_endpoint(self) -> str:
        assert self.peer is not None
        ep = self.path() or self.derpsock.endpoint(self.peer.node_key)
        assert ep is not None
        return f"{ep[0]}:{ep[1]}"

    async def reconcile(self) -> None:
        """wireguard-go moves the endpoint to the source of the last authenticated packet (a WireGuard packet
        still in flight over DERP after we went direct, say): put our choice back."""
        while True:
            await asyncio.sleep(0.25)
            (state,) = (await self.engine.get()).peers
            if state.endpoint != self.desired_endpoint():
                self.reconciled += 1
                await self.set_endpoint(self.path())

    async def set_endpoint(self, addr: AddrPort | None) -> None:
        assert self.peer is not None
        with netns(self.lab.ns(self.name)):  # the loopback socket must be in the node's namespace
            ep = addr or self.derpsock.open(self.peer.node_key)
        wg_peer = WgPeer(self.peer.key.public(), (f"{TUN[self.peer.name]}/32",), f"{ep[0]}:{ep[1]}")
        await self.engine.set(WgConfig(self.key, PORT, (wg_peer,)))

    def note_activity(self) -> None:
        assert self.peer is not None
        self.magic.note_activity(self.peer.node_key, self.loop.time())
        self.pump()

    def pump(self) -> None:
        while (a := self.magic.next_action()) is not None:
            if isinstance(a, paths.EndpointChanged):
                self.endpoint_log.append((self.loop.time(), a.addr))
                task = self.loop.create_task(self.set_endpoint(a.addr))
                self.tasks.add(task)
                task.add_done_callback(self.tasks.discard)
            elif a.addr is None:
                self.derp(self.name, a.node_key, a.data)
            else:
                self.raw.sendto(a.data, a.addr)
        if self.timer is not None:
            self.timer.cancel()
        t = self.magic.next_timer()
        self.timer = None if t is None else self.loop.call_at(t, self._on_timer)

    def _on_timer(self) -> None:
        self.timer = None
        self.magic.handle_timer(self.loop.time())
        self.pump()

    async def close(self) -> None:
        if self.timer is not None:
            self.timer.cancel()
        for t in list(self.tasks):
            t.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await t
        self.raw.close()
        self.derpsock.close_all()
        await self.engine.stop()


async def until(cond: Callable[[], bool], active: tuple[Mini, ...], timeout: float) -> float:
    """Wait for cond while traffic flows (note_activity keeps the sessions active); returns when it held."""
    loop = asyncio.get_running_loop()
    end = loop.time() + timeout
    while loop.time() < end:
        if cond():
            return loop.time()
        for m in active:
            m.note_activity()
        await asyncio.sleep(0.1)
    raise AssertionError("condition not reached")


async def ping(lab: Lab, node: str, addr: str, count: int = 2) -> bool:
    return await aping(lab, node, addr, count)


def test_derp_first_then_direct_through_easy_nats(lab: Lab) -> None:
    lab.build(easy_nat_pair())
    asyncio.run(scenario(lab))


class Pair:
    """Two Minis, a fake DERP between them, and two STUN servers in the internet namespace."""

    def __init__(self, lab: Lab) -> None:
        self.lab = lab
        self.loop = asyncio.get_running_loop()
        self.nodes: dict[str, Mini] = {}
        self.relayed = {"disco": 0, "wireguard": 0}
        self.stuns: list[StunServer_] = []
        self.reports: dict[str, netcheck.Report] = {}

    def derp(self, src: str, dst_key: bytes, packet: bytes) -> None:
        dst = next(n for n in self.nodes.values() if n.node_key == dst_key)
        self.relayed["disco" if disco.looks_like_disco(packet) else "wireguard"] += 1
        self.loop.call_later(0.005, dst.from_derp, self.nodes[src].node_key, packet)

    async def start(self, x: str, y: str) -> tuple[Mini, Mini]:
        s1, s2 = self.lab.servers
        with netns(self.lab.inet):
            self.stuns = [await start_stun_server(s1, 3478), await start_stun_server(s2, 3478)]
        regions = [Region(900, "lab", (StunServer(900, "a", (s1, 3478)), StunServer(900, "b", (s2, 3478))))]
        for n in (x, y):
            self.nodes[n] = Mini(self.lab, n, self.derp)
        # Endpoints as the agent would report them: STUN-reflexive (from the WireGuard port) and the LAN address.
        endpoints: dict[str, list[AddrPort]] = {}
        for n, m in self.nodes.items():
            self.reports[n] = await m.stun.run(regions, timeout=2.0)
            endpoints[n] = [*self.reports[n].endpoints(), (self.lab.nodes[n].addr, PORT)]
        a, b = self.nodes[x], self.nodes[y]
        await a.start(b, endpoints[y], endpoints[x])
        await b.start(a, endpoints[x], endpoints[y])
        return a, b

    async def close(self) -> None:
        for m in self.nodes.values():
            await m.close()
        for s in self.stuns:
            s.close()


async def scenario(lab: Lab) -> None:
    loop = asyncio.get_running_loop()
    pair = Pair(lab)
    relayed = pair.relayed
    try:
        a, b = await pair.start("a", "b")
        for n in ("a", "b"):
            assert pair.reports[n].global_v4 == (lab.routers[f"lan{n}"].wan_addr, PORT)
            assert pair.reports[n].mapping_varies_by_dest_ip is False

        # Traffic starts at once, over DERP (a's first disco pings die at b's NAT firewall).
        t0 = loop.time()
        a.note_activity()
        assert await ping(lab, "a", TUN["b"], count=1)
        assert relayed["wireguard"] > 0

        # Both sides punch (CallMeMaybe over DERP) and confirm the direct path.
        for _ in range(100):
            if a.path() and b.path():
                break
            a.note_activity()
            b.note_activity()
            await asyncio.sleep(0.05)
        direct_after = loop.time() - t0
        assert a.endpoint_log[-1][1] == (lab.routers["lanb"].wan_addr, PORT)
        assert b.endpoint_log[-1][1] == (lab.routers["lana"].wan_addr, PORT)
        assert direct_after < 5.0
        # Until the engines agree (packets that were in flight over DERP may have moved them back).
        for _ in range(40):
            states = [(await m.engine.get()).peers[0].endpoint for m in (a, b)]
            if states == [a.desired_endpoint(), b.desired_endpoint()]:
                break
            await asyncio.sleep(0.1)
        engines_direct_after = loop.time() - t0

        # Now traffic goes direct: DERP carries no more WireGuard packets, and wireguard-go holds the NAT address.
        before = relayed["wireguard"]
        assert await ping(lab, "a", TUN["b"], count=3)
        assert await ping(lab, "b", TUN["a"], count=3)
        assert relayed["wireguard"] == before
        (peer_state,) = (await a.engine.get()).peers
        assert peer_state.endpoint == f"{lab.routers['lanb'].wan_addr}:{PORT}"
        assert a.magic.stats.drops["bad_box"] == 0 and a.magic.stats.drops["unknown_key"] == 0
        assert a.magic.stats.received["Pong"] >= 1 and b.magic.stats.received["CallMeMaybe"] >= 1
        assert engines_direct_after < 3.0

        # The direct path breaks (all UDP of a dropped): once the trust window runs out, back to DERP.
        lab.block_udp("a")
        t_block = loop.time()
        trust_at_block = a.path_state().trust_until
        fell = await until(lambda: a.path() is None, (a, b), 15.0)
        # Not before the trust from the last pong ran out, and soon after it did.
        assert trust_at_block - 0.05 <= fell <= trust_at_block + 0.5
        assert fell - t_block <= paths.TRUST_UDP + 0.5
        await until(lambda: b.path() is None, (a, b), 5.0)
        before = relayed["wireguard"]
        assert await ping(lab, "a", TUN["b"], count=3)
        assert relayed["wireguard"] > before

        # It comes back: heartbeats keep probing, and both sides upgrade again.
        lab.unblock_udp("a")
        t_unblock = loop.time()
        back = await until(
            lambda: a.path() is not None and b.path() is not None,
            (a, b),
            15.0,
        )
        assert back - t_unblock <= paths.DISCO_PING_INTERVAL + paths.HEARTBEAT + 1.0
        await asyncio.sleep(1.0)  # reconcile
        before = relayed["wireguard"]
        assert await ping(lab, "a", TUN["b"], count=3)
        assert relayed["wireguard"] == before
    finally:
        await pair.close()


def test_public_and_hard_nat_go_direct(lab: Lab) -> None:
    # The hard side's port for us is unknowable in advance; its ping (after our CallMeMaybe) teaches it to us.
    lab.build(Topology.parse("lh: hard nh; public: pub"))
    asyncio.run(public_and_hard(lab))


async def public_and_hard(lab: Lab) -> None:
    pair = Pair(lab)
    try:
        pub, nh = await pair.start("pub", "nh")
        assert pair.reports["nh"].mapping_varies_by_dest_ip is True
        await until(lambda: pub.path() is not None and nh.path() is not None, (pub, nh), 10.0)
        learned = pub.path()
        assert learned is not None and learned[0] == lab.routers["lh"].wan_addr
        assert learned not in pair.reports["nh"].endpoints()  # not a STUN endpoint: learned from its ping
        assert not pub.path_state().endpoints[learned].from_netmap
        assert nh.path() == (lab.nodes["pub"].addr, PORT)
        await asyncio.sleep(1.0)  # reconcile
        before = pair.relayed["wireguard"]
        assert await ping(lab, "pub", TUN["nh"], count=3)
        assert await ping(lab, "nh", TUN["pub"], count=3)
        assert pair.relayed["wireguard"] == before
    finally:
        await pair.close()


def test_easy_and_hard_nat_stay_on_derp(lab: Lab) -> None:
    lab.build(Topology.parse("le: easy ne; lh: hard nh"))
    asyncio.run(easy_and_hard(lab))


async def easy_and_hard(lab: Lab) -> None:
    loop = asyncio.get_running_loop()
    pair = Pair(lab)
    try:
        ne, nh = await pair.start("ne", "nh")
        end = loop.time() + 8.0
        while loop.time() < end:
            ne.note_activity()
            nh.note_activity()
            await asyncio.sleep(0.2)
        # The easy side only lets in the exact address:port it sent to, and the hard side's port toward it is
        # not any port we know: no direct path, and traffic works over DERP.
        assert ne.path() is None and nh.path() is None
        assert ne.endpoint_log == [] and nh.endpoint_log == []
        before = pair.relayed["wireguard"]
        assert await ping(lab, "ne", TUN["nh"], count=3)
        assert pair.relayed["wireguard"] > before
        assert pair.relayed["disco"] >= 2  # CallMeMaybe both ways, more as the heartbeats retry
    finally:
        await pair.close()
