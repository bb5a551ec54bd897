"""Real wireguard-go over the DERP loopback sockets: two lab nodes with UDP between them blocked still ping
each other through the tunnel, every packet carried by the (in-memory) relay."""

from __future__ import annotations

import asyncio

import pytest

from node.derpsock import DerpSockets
from node.keys import PrivateKey
from node.render.routes import RouteApplier, RouteConfig
from node.run import SubprocessRunner
from node.wg.config import WgConfig, WgPeer
from node.wg.go import GoEngine
from tests.lab import Lab, one_lan
from tests.lab.fixtures import lab, lab_sweep
from tests.lab.lab import aping
from tests.node.test_rawsock_lab import netns

__all__ = ["lab", "lab_sweep"]

pytestmark = pytest.mark.lab

PORT = 41641
TUN = {"n1": "100.64.0.1", "n2": "100.64.0.2"}


async def ping(lab: Lab, node: str, addr: str, count: int = 3) -> bool:
    return await aping(lab, node, addr, count)


def test_wireguard_go_over_derp_sockets(lab: Lab) -> None:
    lab.build(one_lan(2))
    lab.block_udp("n1")  # no direct UDP at all: only loopback works
    asyncio.run(over_derp(lab))


async def over_derp(lab: Lab) -> None:
    keys = {n: PrivateKey.generate() for n in TUN}
    relay_log: list[str] = []
    socks: dict[str, DerpSockets] = {}

    def relay_from(src: str):  # type: ignore[no-untyped-def]
        def send(dst_key: bytes, packet: bytes) -> None:
            dst = next(n for n in TUN if keys[n].public().raw == dst_key)
            relay_log.append(src)
            socks[dst].deliver(keys[src].public().raw, packet)

        return send

    engines = {n: GoEngine(lab.iface(n), netns=lab.ns(n)) for n in TUN}
    try:
        for n in TUN:
            other = "n2" if n == "n1" else "n1"
            with netns(lab.ns(n)):
                socks[n] = DerpSockets(PORT, relay_from(n))
                ep = socks[n].open(keys[other].public().raw)
            await engines[n].start()
            peer = WgPeer(keys[other].public(), (f"{TUN[other]}/32",), f"{ep[0]}:{ep[1]}")
            await engines[n].set(WgConfig(keys[n], PORT, (peer,)))
            await RouteApplier(SubprocessRunner(netns=lab.ns(n))).set(RouteConfig(lab.iface(n), (f"{TUN[n]}/32",)))

        assert await ping(lab, "n1", TUN["n2"])
        assert await ping(lab, "n2", TUN["n1"])
        assert relay_log.count("n1") >= 6 and relay_log.count("n2") >= 6
        # The engines still hold the loopback endpoints: nothing roamed to a direct address.
        for n in TUN:
            (peer_state,) = (await engines[n].get()).peers
            assert peer_state.endpoint is not None and peer_state.endpoint.startswith("127.0.0.1:")
            assert socks[n].stats["foreign"] == 0
    finally:
        for e in engines.values():
            await e.stop()
        for s in socks.values():
            s.close_all()
