"""node/reconcile.py and node/handshake.py: appliers in order, the filter gating WireGuard peers, the tie-break;
transcripts compared as text (FakeRunner + FakeEngine)."""

from __future__ import annotations

import asyncio

from node.handshake import HOLD, Initiator
from node.keys import PrivateKey
from node.reconcile import Desired, Reconciler
from node.render.routes import RouteConfig
from node.run import FakeRunner, Result
from node.wg.config import WgConfig, WgPeer
from tests.node.fakes import FakeEngine

ME = PrivateKey(bytes([0x50]) * 32)
LO = PrivateKey(bytes([1]) * 32).public()  # keys are compared as raw public keys
HI = PrivateKey(bytes([2]) * 32).public()
LINK = '[{"ifname": "shoal0", "flags": ["UP"], "mtu": 1280, "addr_info": []}]'


def peer(key: object, ip: str) -> WgPeer:
    assert hasattr(key, "raw")
    return WgPeer(key, (ip,), "192.0.2.7:41641", 25)  # type: ignore[arg-type]


def want(peers: tuple[WgPeer, ...], script: str | None = "table inet shoal_filter { policy }\n",
         error: str = "") -> Desired:
    return Desired(filter=script, closed="table inet shoal_filter { closed }\n",
                   routes=RouteConfig("shoal0", ("100.64.0.1/32",)), wg=WgConfig(ME, 41641, peers),
                   filter_error=error)


def setup() -> tuple[FakeRunner, FakeEngine, Reconciler]:
    runner = FakeRunner()
    runner.respond("ip -j addr show dev shoal0", LINK)
    engine = FakeEngine(runner)
    return runner, engine, Reconciler(runner, engine)


def test_shape_filter_then_routes_then_wireguard_and_each_only_when_it_differs() -> None:
    runner, _engine, rec = setup()
    a, b = peer(LO, "100.64.0.2/32"), peer(HI, "100.64.0.3/32")

    async def go() -> None:
        assert await rec.wireguard.start()
        assert (await rec.apply(want((a,)))).ok
        runner.lines.append("--- same netmap")
        assert (await rec.apply(want((a,)))).ok
        runner.lines.append("--- a second peer")
        assert (await rec.apply(want((a, b)))).ok
        runner.lines.append("--- down")
        assert await rec.clear() == []

    asyncio.run(go())
    lo, hi = LO.hex[:8], HI.hex[:8]
    assert runner.transcript == f"""engine start
nft -f -
    table inet shoal_filter {{ policy }}
ip -j addr show dev shoal0
ip -j route show dev shoal0
ip -j -6 route show dev shoal0
ip addr add 100.64.0.1/32 dev shoal0
ip route add 100.64.0.0/10 dev shoal0
ip -6 route add fd7a:115c:a1e0::/48 dev shoal0
wg add {lo} endpoint=192.0.2.7:41641 keepalive=25 allowed=100.64.0.2/32
--- same netmap
--- a second peer
wg add {hi} endpoint=192.0.2.7:41641 keepalive=25 allowed=100.64.0.3/32
--- down
engine stop
nft -f -
    table inet shoal_filter {{}}
    delete table inet shoal_filter
"""


def test_sec_a_failing_filter_keeps_new_peers_out_and_admitted_ones_as_they_were() -> None:
    runner, engine, rec = setup()
    a, b = peer(LO, "100.64.0.2/32"), peer(HI, "100.64.0.3/32")

    async def go() -> None:
        await rec.wireguard.start()
        runner.responses["nft -f -"] = Result(1, "", "Error: nft is broken")
        out = await rec.apply(want((a,)))
        assert out.errors.keys() == {"filter"} and "nft is broken" in out.errors["filter"]
        assert out.kept_out == (LO.raw,)
        assert (await engine.get()).peers == ()
        runner.lines.append("--- nft works again")
        runner.responses.clear()
        runner.respond("ip -j addr show dev shoal0", LINK)
        assert (await rec.apply(want((a,)))).ok
        runner.lines.append("--- the renderer refuses the next netmap, which adds b and widens a")
        wider = WgPeer(LO, ("100.64.0.2/32", "10.0.0.0/8"), "192.0.2.7:41641", 25)
        out = await rec.apply(want((wider, b), None, "rule 0: bad address 'x'"))
        assert out.errors == {"filter": "rule 0: bad address 'x'"} and out.kept_out == (HI.raw,)

    asyncio.run(go())
    lo = LO.hex[:8]
    assert runner.transcript.split("--- nft works again")[0] == """engine start
nft -f -
    table inet shoal_filter { policy }
nft -f -
    table inet shoal_filter { closed }
ip -j addr show dev shoal0
ip -j route show dev shoal0
ip -j -6 route show dev shoal0
ip addr add 100.64.0.1/32 dev shoal0
ip route add 100.64.0.0/10 dev shoal0
ip -6 route add fd7a:115c:a1e0::/48 dev shoal0
"""
    assert runner.transcript.split("--- the renderer")[1] == """ refuses the next netmap, which adds b and widens a
nft -f -
    table inet shoal_filter { closed }
"""
    assert f"wg add {lo} endpoint=192.0.2.7:41641 keepalive=25 allowed=100.64.0.2/32\n" in runner.transcript
    assert "10.0.0.0/8" not in runner.transcript and HI.hex[:8] not in runner.transcript


def test_truth_lower_key_initiates_at_once_higher_holds_until_a_handshake_or_hold() -> None:
    cfg_for = {LO.raw: WgConfig(ME, 41641, (peer(HI, "100.64.0.3/32"),)),
               HI.raw: WgConfig(ME, 41641, (peer(LO, "100.64.0.2/32"),))}
    lo, hi = Initiator(LO.raw), Initiator(HI.raw)
    for side in (lo, hi):
        side.engine_started()
    assert lo.shape(cfg_for[LO.raw], 10.0).peers[0].endpoint == "192.0.2.7:41641"
    assert lo.shape(cfg_for[LO.raw], 10.0).peers[0].persistent_keepalive == 25
    held = hi.shape(cfg_for[HI.raw], 10.0).peers[0]
    assert (held.endpoint, held.persistent_keepalive) == (None, 0) and hi.held(LO.raw)
    assert hi.next_timer() == 10.0 + HOLD and lo.next_timer() is None
    assert not hi.handle_timer(10.5)
    # the lower side's initiation arrived: wireguard-go answered from its source; next engine read releases
    runner = FakeRunner()
    engine = FakeEngine(runner)

    async def go() -> None:
        await engine.set(hi.shape(cfg_for[HI.raw], 10.6))
        engine.handshake(LO.raw, 1e9, "203.0.113.9:41641")
        assert hi.observe(await engine.get())
        await engine.set(hi.shape(cfg_for[HI.raw], 10.7))

    asyncio.run(go())
    assert not hi.held(LO.raw)
    assert runner.transcript == (f"wg add {LO.hex[:8]} allowed=100.64.0.2/32\n"
                                 f"wg update {LO.hex[:8]} endpoint=192.0.2.7:41641 keepalive=25\n")


def test_truth_hold_ends_at_its_deadline_and_known_peers_are_rekeyed_at_once() -> None:
    hi = Initiator(HI.raw)
    hi.engine_started()
    cfg = WgConfig(ME, 41641, (peer(LO, "100.64.0.2/32"),))
    assert hi.shape(cfg, 0.0).peers[0].endpoint is None
    assert hi.handle_timer(HOLD) and not hi.held(LO.raw)
    assert hi.shape(cfg, HOLD).peers[0].endpoint == "192.0.2.7:41641"
    # a restarted engine (down/up, shoald restart): the peer holds a session with our old engine
    hi.engine_started()
    assert hi.shape(cfg, 50.0).peers[0].endpoint == "192.0.2.7:41641"
    restarted = Initiator(HI.raw)
    restarted.remember([LO.raw])  # from the saved netmap
    restarted.engine_started()
    assert restarted.shape(cfg, 0.0).peers[0].persistent_keepalive == 25
    # a peer that leaves and comes back is new to both sides again
    assert restarted.shape(WgConfig(ME, 41641, ()), 1.0).peers == ()
    assert restarted.shape(cfg, 2.0).peers[0].endpoint is None
