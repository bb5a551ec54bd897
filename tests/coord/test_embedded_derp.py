"""The relay embedded in shoal-server: same HTTP port, admits only this tailnet's active node keys."""

from __future__ import annotations

import asyncio
from pathlib import Path

import httpx
import pytest
from nacl.public import PrivateKey

from derp import frames
from derp.client import DerpClient
from tests.coord.harness import running_server, sim_node

pytestmark = pytest.mark.anyio


async def test_embedded_relay_forwards_between_tailnet_nodes(tmp_path: Path) -> None:
    async with running_server(tmp_path, derp=True, stun_listen="127.0.0.1:0") as r:
        await r.svc.create_user("alice")
        key = (await r.svc.create_key("alice", reusable=True, ephemeral=False, expiration=60, tags=()))["key"]
        a, b = sim_node(r.url, "a"), sim_node(r.url, "b")
        await a.join(key)
        await b.join(key)
        url = r.url + "/derp"
        async with DerpClient(url, bytes(a.node)) as ca, DerpClient(url, bytes(b.node)) as cb:
            await ca.wait_connected(5)
            await cb.wait_connected(5)
            assert ca.send(b.node_key, b"ciphertext")
            while True:
                ev = await asyncio.wait_for(cb.recv(), 5)
                if isinstance(ev, frames.RecvPacket):
                    break
            assert ev.src == a.node_key and ev.packet == b"ciphertext"
        # the normal app still answers on the same port
        async with httpx.AsyncClient(base_url=r.url) as h:
            assert (await h.get("/key")).status_code == 200
        assert r.svc.settings.derp_map["Regions"]["900"]["Nodes"][0]["URL"] == url
        await a.client.close()
        await b.client.close()


async def test_embedded_relay_refuses_strangers(tmp_path: Path) -> None:
    async with running_server(tmp_path, derp=True, stun_listen="") as r:
        stranger = DerpClient(r.url + "/derp", bytes(PrivateKey.generate()), backoff_min=5)
        stranger.start()
        with pytest.raises(TimeoutError):
            await stranger.wait_connected(1.5)
        await stranger.close()
