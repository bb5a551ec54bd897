"""node/magicsock.py: the agent's NAT-traversal glue.

Pure helpers (netmap endpoints, DERP map URLs) with hypothesis; then two MagicSocks on loopback with a real
in-process DERP relay and raw ports (root): disco ping over DERP, the DERP loopback endpoint, bad disco packets
counted, a malformed netmap tolerated, the engine's endpoint reconciled.
"""

from __future__ import annotations

import asyncio
from typing import Any

import pytest
from hypothesis import given
from hypothesis import strategies as st

from coord import wire
from derp.server import DerpServer
from node import disco
from node.keys import PrivateKey, PublicKey
from node.magicsock import EP_LOCAL, EP_STUN, MagicSock, derp_url, parse_endpoint, region_urls
from node.wg.config import DeviceState, PeerState


def test_parse_endpoint() -> None:
    assert parse_endpoint("203.0.113.5:41641") == ("203.0.113.5", 41641)
    assert parse_endpoint("[2001:db8::1]:7") == ("2001:db8::1", 7)
    for bad in ("", "1.2.3.4", "1.2.3.4:0", "1.2.3.4:65536", "host:1", "1.2.3.4:x", None, 5, "[::1]"):
        assert parse_endpoint(bad) is None, bad


@given(st.one_of(st.text(max_size=60), st.binary(max_size=20), st.integers(), st.none()))
def test_parse_endpoint_never_raises(x: object) -> None:
    r = parse_endpoint(x)
    assert r is None or (isinstance(r, tuple) and 0 < r[1] < 65536)


def test_derp_urls_from_map() -> None:
    m = {"Regions": {
        "900": {"RegionID": 900, "Nodes": [{"HostName": "203.0.113.1", "DERPPort": 8080, "URL":
                                             "http://203.0.113.1:8080/derp"}]},
        "901": {"RegionID": 901, "Nodes": [{"HostName": "203.0.113.2", "DERPPort": 8081, "InsecureForTests": True}]},
        "902": {"RegionID": 902, "Nodes": [{"HostName": "relay.example"}]},
        "903": {"RegionID": 903, "Nodes": [{"DERPPort": 1}]},  # no host: skipped
        "bad": "not an object",
        "x": {"RegionID": "nope", "Nodes": []},
    }}
    assert region_urls(wire.DERPMap.from_json(m, problems=[])) == {
        900: "http://203.0.113.1:8080/derp",
        901: "http://203.0.113.2:8081/derp",
        902: "https://relay.example/derp",
    }
    assert derp_url(wire.DERPNode(host_name="2001:db8::1", derp_port=443)) == "https://[2001:db8::1]:443/derp"
    assert region_urls(None) == {} and region_urls(wire.DERPMap.from_json({"Regions": []}, problems=[])) == {}


@given(st.recursive(st.none() | st.integers() | st.text(max_size=8),
                    lambda c: st.lists(c, max_size=3) | st.dictionaries(st.text(max_size=8), c, max_size=3),
                    max_leaves=12))
def test_region_urls_never_raises(m: Any) -> None:
    if isinstance(m, dict):
        region_urls(wire.DERPMap.from_json({"Regions": m}, problems=[]))


class Node:
    def __init__(self, port: int) -> None:
        self.key = PrivateKey.generate()
        self.disco = PrivateKey.generate("discokey")
        self.port = port
        self.applied = 0
        self.engine_endpoint: str | None = None
        self.peer_key: bytes = b""
        self.ms: MagicSock | None = None

    async def get(self) -> DeviceState:
        return DeviceState(peers=(PeerState(PublicKey(self.peer_key), endpoint=self.engine_endpoint),))

    async def apply(self) -> None:
        self.applied += 1
        assert self.ms is not None
        self.engine_endpoint = self.ms.endpoint_for(self.peer_key)

    def start(self) -> MagicSock:
        self.ms = MagicSock(self.port, self.key.raw, self.key.public().raw, self.disco.raw, engine_get=self.get,
                            apply=self.apply, on_endpoints=lambda: None, poll_interval=0.1)
        return self.ms

    def record(self, node_id: int, endpoints: list[str]) -> dict[str, Any]:
        return {"ID": node_id, "Key": f"nodekey:{self.key.public().raw.hex()}",
                "DiscoKey": f"discokey:{disco.public_key(self.disco.raw).hex()}", "Endpoints": endpoints,
                "HomeDERP": 900}


@pytest.mark.anyio
async def test_two_magicsocks_ping_over_derp_and_count_bad_disco() -> None:
    relay = DerpServer(PrivateKey.generate().raw)
    server = await relay.serve("127.0.0.1", 0)
    port = server.sockets[0].getsockname()[1]
    derp_map = {"Regions": {"900": {"RegionID": 900, "RegionCode": "t", "Nodes": [
        {"Name": "900a", "RegionID": 900, "HostName": "127.0.0.1", "DERPPort": port, "STUNPort": -1,
         "InsecureForTests": True}]}}}
    a, b = Node(47101), Node(47102)
    a.peer_key, b.peer_key = b.key.public().raw, a.key.public().raw
    ma, mb = a.start(), b.start()
    try:
        for n, other in ((a, b), (b, a)):
            assert n.ms is not None
            n.ms.set_derp_map(wire.DERPMap.from_json(derp_map))
            # a malformed record and one without a disco key are skipped, not fatal
            peers = wire.MapResponse.from_json({"Peers": [
                other.record(1, ["not an endpoint", "192.0.2.9:41641"]), {"ID": 2, "Key": "junk"},
                {"ID": 3, "Key": f"nodekey:{'11' * 32}"}]}).peers
            assert peers is not None
            n.ms.set_peers({p.id: p for p in peers})
            assert await n.ms.wait_home(5)
        assert ma.home == 900 and set(ma.peers) == {b.key.public().raw}
        # no direct path: the WireGuard endpoint is the peer's DERP loopback socket
        ep = ma.endpoint_for(b.key.public().raw)
        assert ep is not None and ep.startswith("127.0.0.1:")
        path, took, direct = await ma.ping(b.key.public().raw, timeout=5)
        assert path == "DERP(900)" and direct is None and took < 2
        # the engine poll puts our choice back when the engine holds something else
        a.engine_endpoint = "198.51.100.7:9"
        await asyncio.sleep(0.5)
        assert a.engine_endpoint == ep and a.applied >= 1 and ma.stats["reconciled"] >= 1
        assert ma.peer_path(b.key.public().raw)["Path"] == "derp"
        # bad disco over DERP: counted, never raised
        sealed = disco.seal(disco.Ping(b"x" * 12, None), disco.public_key(a.disco.raw),
                            disco.box_for(a.disco.raw, disco.public_key(b.disco.raw)))
        stranger = disco.MAGIC + bytes(32) + bytes(24) + bytes(40)
        for pkt in (sealed[:-1] + bytes([sealed[-1] ^ 1]), stranger):
            ma._send_derp(b.key.public().raw, pkt)
        await asyncio.sleep(0.3)
        assert mb.magic.stats.drops["bad_box"] == 1 and mb.magic.stats.drops["unknown_key"] == 1
        # endpoints: STUN ones (type 2) before local ones (type 1)
        ma.stun_endpoints = [("203.0.113.9", 47101)]
        ma.set_local_endpoints([("192.0.2.9", 47101)])
        assert ma.endpoints() == (["203.0.113.9:47101", "192.0.2.9:47101"], [EP_STUN, EP_LOCAL])
        st_ = ma.status()
        assert st_["HomeDERP"] == 900 and st_["DERPConnected"] == {"900": True}
    finally:
        await ma.close()
        await mb.close()
        server.close()
        await relay.close()
