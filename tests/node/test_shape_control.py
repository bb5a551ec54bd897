"""node/control.py gives typed answers, parsed where each frame is read: against a real server on loopback, and
against a server (an httpx mock transport) that seals a malformed map."""

from __future__ import annotations

import asyncio
import os
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import httpx
import pytest
import zstandard
from nacl.public import PrivateKey

from coord import wire
from node import mapsession
from node.control import ControlClient, ControlError
from tests.coord.harness import running_server, sim_node

pytestmark = pytest.mark.anyio
NOW = 1_800_000_000.0


async def next_map(it: AsyncIterator[wire.MapResponse]) -> wire.MapResponse:
    while True:
        msg = await asyncio.wait_for(it.__anext__(), 5)
        if not msg.empty:
            return msg


async def test_shape_login_and_poll_against_a_real_server(tmp_path: Path) -> None:
    async with running_server(tmp_path) as r:
        await r.svc.create_user("alice")
        key = str((await r.svc.create_key("alice", reusable=True, ephemeral=False, expiration=3600.0,
                                          tags=()))["key"])
        a, b = sim_node(r.url, "alpha"), sim_node(r.url, "beta")
        await a.client.pin()
        resp = await a.client.login(a.register_request(key))
        assert resp.machine_authorized and resp.login_name == "alice" and resp.tags == () and not resp.error
        it = a.client.poll(a.map_request(endpoints=("192.0.2.1:41641",)))
        try:
            full = await next_map(it)
            assert full.node is not None and full.node.name == "alpha.shoal.internal."
            assert [str(x) for x in full.node.addresses] == ["100.64.0.1/32", "fd7a:115c:a1e0::1/128"]
            assert full.peers == () and full.packet_filter == (wire.ALLOW_ALL_RULE,)
            assert full.derp_map == wire.DERPMap() and full.domain == "shoal.internal" and full.problems == ()
            await b.join(key)
            nm = mapsession.apply(mapsession.NetMap(), full)
            while 2 not in nm.peers:
                nm = mapsession.apply(nm, await next_map(it))
            assert nm.peers[2].name == "beta.shoal.internal." and nm.peers[2].key == b.node_key
        finally:
            await it.aclose()
            await a.client.close()
            await b.client.close()


def mock_server(server: PrivateKey, msg: bytes) -> httpx.MockTransport:
    """Answers every map request with one sealed frame carrying ``msg``."""

    def handle(request: httpx.Request) -> httpx.Response:
        machine = bytes.fromhex(request.url.path.split("/")[2])
        box = wire.make_box(bytes(server), machine)
        rid = wire.open_request(box, request.content, now=NOW, guard=wire.ReplayGuard()).request_id
        body = wire.seal_frame(box, rid, 0, msg, os.urandom(24), zstandard.ZstdCompressor())
        return httpx.Response(200, stream=httpx.ByteStream(body))

    return httpx.MockTransport(handle)


async def test_shape_a_malformed_map_is_refused_where_the_frame_is_read() -> None:
    server, machine = PrivateKey.generate(), PrivateKey.generate()
    client = ControlClient("http://control.invalid", bytes(machine), bytes(machine.public_key),
                           server_public=bytes(server.public_key), clock=lambda: NOW,
                           transport=mock_server(server, b'{"Peers": [], "PacketFilter": [{"SrcIPs": ["*"]}]}'))
    req = wire.MapRequest(node_key=bytes(PrivateKey.generate().public_key), stream=True)
    it = client.poll(req)
    with pytest.raises(wire.WireError) as e:
        await it.__anext__()
    assert str(e.value) == "MapResponse.PacketFilter[0]: missing SrcIPs or DstPorts"
    await it.aclose()
    # the same frame as JSON, for tools that want the raw message
    raw: list[dict[str, Any]] = []
    with pytest.raises(ControlError, match="map stream ended"):
        async for m in client.stream(req):
            raw.append(m)
    assert raw == [{"Peers": [], "PacketFilter": [{"SrcIPs": ["*"]}]}]
    await client.close()
