"""Real WireGuard in the lab: two wireguard-go engines configured through our engine API and route applier."""

from __future__ import annotations

import asyncio
import os
import signal

import pytest

from node.keys import PrivateKey
from node.render.routes import RouteApplier, RouteConfig
from node.run import SubprocessRunner
from node.wg.config import WgConfig, WgPeer
from node.wg.go import GoEngine
from tests.lab import Lab, one_lan
from tests.lab.lab import aping

pytestmark = pytest.mark.lab

PORT = 41641


def addrs(i: int) -> tuple[str, str]:
    return f"100.64.0.{i}", f"fd7a:115c:a1e0::{i}"


async def ping(lab: Lab, node: str, addr: str, count: int = 1) -> bool:
    return await aping(lab, node, addr, count)


def test_two_wireguard_go_nodes_ping_over_tailnet(lab: Lab) -> None:
    lab.build(one_lan(2))
    asyncio.run(two_nodes(lab))


async def two_nodes(lab: Lab) -> None:
    names = ("n1", "n2")
    keys = {n: PrivateKey.generate() for n in names}
    routes = {n: RouteApplier(SubprocessRunner(netns=lab.ns(n))) for n in names}
    cfgs = {}
    for i, n in enumerate(names, 1):
        v4, v6 = addrs(i)
        cfgs[n] = RouteConfig(lab.iface(n), (f"{v4}/32", f"{v6}/128"))
    restarted: list[str] = []

    def on_restart(n: str):  # type: ignore[no-untyped-def]
        async def again() -> None:
            restarted.append(n)
            await routes[n].set(cfgs[n])
        return again

    engines = {n: GoEngine(lab.iface(n), netns=lab.ns(n), on_restart=on_restart(n)) for n in names}
    try:
        for e in engines.values():
            await e.start()
        wg = {}
        for i, n in enumerate(names, 1):
            other_i = 3 - i
            other = names[other_i - 1]
            v4, v6 = addrs(other_i)
            wg[n] = WgConfig(keys[n], PORT, (
                WgPeer(keys[other].public(), (f"{v4}/32", f"{v6}/128"), f"{lab.nodes[other].addr}:{PORT}"),
            ))
            await engines[n].set(wg[n])
            assert await routes[n].set(cfgs[n]), "a fresh interface needs commands"
        # idempotent: nothing left to do on a second pass
        for n in names:
            assert await routes[n].set(cfgs[n]) == []
            before = await engines[n].get()
            await engines[n].set(wg[n])
            assert await engines[n].get() == before

        assert await ping(lab, "n1", addrs(2)[0])
        assert await ping(lab, "n2", addrs(1)[1])
        state = await engines["n1"].get()
        (peer,) = state.peers
        assert peer.public_key == keys["n2"].public()
        assert peer.last_handshake is not None and peer.rx_bytes > 0 and peer.tx_bytes > 0
        assert peer.endpoint == f"{lab.nodes['n2'].addr}:{PORT}"
        show = lab.exec("n1", ["wg", "show", lab.iface("n1"), "dump"]).stdout
        assert keys["n2"].public().b64 in show

        # the supervisor restarts a killed wireguard-go, re-applies the config, and the owner its routes
        old = engines["n2"].pid
        assert old is not None
        os.kill(old, signal.SIGKILL)
        for _ in range(200):
            if restarted:
                break
            await asyncio.sleep(0.05)
        assert restarted == ["n2"] and engines["n2"].pid != old
        assert (await engines["n2"].get()).peers[0].public_key == keys["n1"].public()
        # the new child has no session; n1 still holds the old one and would only re-handshake after ~15 s of
        # unanswered data, so the restarted side speaks first (its handshake replaces n1's stale session)
        assert await ping(lab, "n2", addrs(1)[0], count=2)
        assert await ping(lab, "n1", addrs(2)[0])

        # removing the peer cuts the tunnel
        await engines["n1"].set(WgConfig(keys["n1"], PORT, ()))
        assert (await engines["n1"].get()).peers == ()
        assert not await ping(lab, "n1", addrs(2)[0])
    finally:
        for e in engines.values():
            await e.stop()
    for n in names:
        assert not engines[n].sock_path.exists()
