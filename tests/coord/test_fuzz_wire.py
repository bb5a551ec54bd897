"""Fuzzing every parser of network input: only WireError (a ValueError) may come out, never another exception.

The typed MapResponse parse (what a node makes of every frame) is fuzzed too; what it accepts survives its own
encoding."""

from __future__ import annotations

import asyncio
import json
import os
import queue
import threading
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Any

import httpx
import pytest
import zstandard
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from nacl.public import PrivateKey

from coord import wire
from coord.service import Service
from node.control import ControlClient
from tests.coord.harness import running_server, sim_node

NODE = PrivateKey(b"\x11" * 32)
SERVER = PrivateKey(b"\x22" * 32)
NODE_BOX = wire.make_box(bytes(NODE), bytes(SERVER.public_key))
SERVER_BOX = wire.make_box(bytes(SERVER), bytes(NODE.public_key))
NOW = 1_800_000_000.0
RID = "ab" * 16

json_values = st.recursive(
    st.none() | st.booleans() | st.integers(-(2**70), 2**70) | st.floats(allow_nan=True) | st.text(max_size=40),
    lambda inner: st.lists(inner, max_size=5) | st.dictionaries(st.text(max_size=12), inner, max_size=5),
    max_leaves=20,
)
KEYS = ("NodeKey", "OldNodeKey", "DiscoKey", "Auth", "Hostinfo", "Followup", "Expiry", "Ephemeral", "Stream",
        "OmitPeers", "Endpoints", "EndpointTypes", "HomeDERP", "AuthKey", "Hostname", "OS", "RequestTags",
        "RoutableIPs")
good_key = st.binary(min_size=32, max_size=32).map(lambda b: wire.key_text("nodekey", b))
near_values = st.one_of(
    json_values, good_key, st.just("nodekey:" + "0" * 63), st.just("discokey:" + "z" * 64),
    st.lists(st.sampled_from(["1.2.3.4:5", "[::1]:9", "1.2.3.4", "[::1]:0", "x:1", "1.2.3.4:99999", ":"]),
             max_size=4),
    st.dictionaries(st.sampled_from(KEYS), json_values, max_size=4),
)
messages = st.dictionaries(st.sampled_from(KEYS), near_values, max_size=8) | st.dictionaries(
    st.text(max_size=10), json_values, max_size=4)


def sealed(body: Any, *, ts: Any = NOW, rid: Any = RID) -> bytes:
    return wire.seal(NODE_BOX, json.dumps({"ts": ts, "id": rid, "body": body}).encode(), os.urandom(24))


@given(st.binary(max_size=300))
def test_open_request_random_bytes(data: bytes) -> None:
    with pytest.raises(wire.WireError):
        wire.open_request(SERVER_BOX, data, now=NOW, guard=wire.ReplayGuard())


@given(st.data())
def test_open_request_truncated_or_flipped(data: st.DataObject) -> None:
    good = wire.seal_request(NODE_BOX, {"NodeKey": "x"}, now=NOW, request_id=RID, nonce=os.urandom(24))
    cut = data.draw(st.integers(0, len(good) - 1))
    with pytest.raises(wire.WireError):
        wire.open_request(SERVER_BOX, good[:cut], now=NOW, guard=wire.ReplayGuard())
    i = data.draw(st.integers(0, len(good) - 1))
    bit = data.draw(st.integers(0, 7))
    flipped = bytearray(good)
    flipped[i] ^= 1 << bit
    with pytest.raises(wire.WireError):
        wire.open_request(SERVER_BOX, bytes(flipped), now=NOW, guard=wire.ReplayGuard())
    # the untouched request opens
    assert wire.open_request(SERVER_BOX, good, now=NOW, guard=wire.ReplayGuard()).request_id == RID


@given(json_values, json_values, json_values)
def test_open_request_random_envelope(body: Any, ts: Any, rid: Any) -> None:
    try:
        opened = wire.open_request(SERVER_BOX, sealed(body, ts=ts, rid=rid), now=NOW, guard=wire.ReplayGuard())
    except wire.WireError:
        return
    assert isinstance(opened.body, dict) and isinstance(opened.request_id, str)


def test_replay_guard_and_skew() -> None:
    g = wire.ReplayGuard()
    wire.open_request(SERVER_BOX, sealed({}), now=NOW, guard=g)
    with pytest.raises(wire.WireError, match="replay"):
        wire.open_request(SERVER_BOX, sealed({}), now=NOW + 1, guard=g)
    with pytest.raises(wire.WireError, match="off the server clock"):
        wire.open_request(SERVER_BOX, sealed({}, rid="cd" * 16), now=NOW + 301, guard=g)
    with pytest.raises(wire.WireError, match=r"over|limit"):
        wire.open_request(SERVER_BOX, b"\0" * (wire.MAX_REQUEST + 1), now=NOW, guard=g)


@given(messages)
def test_register_request_from_json(d: dict[str, Any]) -> None:
    try:
        r = wire.RegisterRequest.from_json(d)
    except wire.WireError:
        return
    # what parses survives its own encoding
    assert wire.RegisterRequest.from_json(json.loads(json.dumps(r.to_json()))) == r


@given(messages)
def test_map_request_from_json(d: dict[str, Any]) -> None:
    try:
        r = wire.MapRequest.from_json(d)
    except wire.WireError:
        return
    assert wire.MapRequest.from_json(json.loads(json.dumps(r.to_json()))) == r


def frame_bytes(seq: int, msg: bytes, *, compress: bool = False, rid: str = RID) -> bytes:
    c = zstandard.ZstdCompressor()
    if compress:
        payload = bytes([wire.FLAG_ZSTD]) + c.compress(b'{"req":"' + rid.encode() + b'","seq":' + str(seq).encode()
                                                       + b',"msg":' + msg + b"}")
        return wire.frame(wire.seal(SERVER_BOX, payload, os.urandom(24)))
    return wire.seal_frame(SERVER_BOX, rid, seq, msg, os.urandom(24), c)


@given(st.binary(max_size=400), st.integers(1, 64))
def test_frame_reader_random_bytes(data: bytes, chunk: int) -> None:
    r = wire.FrameReader(NODE_BOX, RID)
    try:
        for i in range(0, len(data), chunk):
            list(r.feed(data[i : i + chunk]))
    except wire.WireError:
        pass


@given(st.data())
def test_frame_reader_mangled_stream(data: st.DataObject) -> None:
    good = [frame_bytes(0, b'{"Peers":[]}'), frame_bytes(1, b'{"KeepAlive":true}', compress=True),
            frame_bytes(2, b'{"PeersRemoved":[1]}')]
    stream = bytearray(b"".join(good))
    r = wire.FrameReader(NODE_BOX, RID)
    assert [m for m in r.feed(bytes(stream))] == [{"Peers": []}, {"KeepAlive": True}, {"PeersRemoved": [1]}]
    how = data.draw(st.sampled_from(["flip", "cut", "swap", "replay", "junk-msg", "bad-zstd"]))
    if how == "flip":
        i = data.draw(st.integers(0, len(stream) - 1))
        stream[i] ^= 1 << data.draw(st.integers(0, 7))
    elif how == "cut":
        stream = stream[: data.draw(st.integers(0, len(stream) - 1))]
    elif how == "swap":
        stream = bytearray(good[1] + good[0] + good[2])
    elif how == "replay":
        stream = bytearray(good[0] + good[0])
    elif how == "junk-msg":
        msg = data.draw(st.sampled_from([b"[]", b"1", b"nope", b'"x"', b"{"]))
        stream = bytearray(frame_bytes(0, msg, compress=data.draw(st.booleans())))
    else:
        stream = bytearray(wire.frame(wire.seal(SERVER_BOX, bytes([wire.FLAG_ZSTD]) + os.urandom(40), os.urandom(24))))
    r = wire.FrameReader(NODE_BOX, RID)
    got: list[dict[str, Any]] = []
    try:
        for i in range(0, len(stream), 17):
            got.extend(r.feed(bytes(stream[i : i + 17])))
    except wire.WireError:
        return
    # without an error, what came out is a prefix of the real messages: nothing forged, reordered or repeated
    assert how in ("flip", "cut")
    assert got == [{"Peers": []}, {"KeepAlive": True}, {"PeersRemoved": [1]}][: len(got)]


def test_frame_from_another_request_is_refused() -> None:
    r = wire.FrameReader(NODE_BOX, RID)
    with pytest.raises(wire.WireError, match="another request"):
        list(r.feed(frame_bytes(0, b"{}", rid="cd" * 16)))


def test_oversized_frame_length_is_refused() -> None:
    r = wire.FrameReader(NODE_BOX, RID)
    with pytest.raises(wire.WireError, match="exceeds"):
        list(r.feed((wire.MAX_FRAME + 1).to_bytes(4, "little")))


@given(st.text(max_size=80))
def test_check_endpoint(ep: str) -> None:
    try:
        _host, port = wire.check_endpoint(ep)
    except wire.WireError:
        return
    assert 0 < port < 65536


# --- the typed MapResponse (what a node parses from each frame) -----------------------------------------------

MAP_KEYS = ("Node", "Peers", "PeersChanged", "PeersRemoved", "PeersChangedPatch", "DERPMap", "DNSConfig",
            "PacketFilter", "Domain", "KeepAlive", "ControlTime")
NODE_KEYS = ("ID", "StableID", "Name", "User", "Key", "KeyExpiry", "Machine", "DiscoKey", "Addresses", "AllowedIPs",
             "Endpoints", "HomeDERP", "Online", "LastSeen", "Tags", "Hostinfo", "Created", "Expired",
             "MachineAuthorized", "NodeID")
node_values = st.one_of(
    json_values, good_key, st.integers(0, 70000), st.booleans(),
    st.binary(min_size=32, max_size=32).map(lambda b: wire.key_text("discokey", b)),
    st.sampled_from(["2026-01-01T00:00:00.000000Z", "2026-01-01", "0001-01-01T00:00:00+05:00", "soon", ""]),
    st.lists(st.sampled_from(["1.2.3.4:5", "[::1]:9", "100.64.0.1/32", "fd7a::1/128", "10.0.0.0/8", "x", "*"]),
             max_size=4),
)
node_records = st.dictionaries(st.sampled_from(NODE_KEYS), node_values, max_size=10)
rule_records = st.fixed_dictionaries({}, optional={
    "SrcIPs": st.lists(st.sampled_from(["*", "100.64.0.1/32", "10.0.0.0/8"]) | json_values, max_size=3),
    "DstPorts": st.lists(st.fixed_dictionaries({}, optional={
        "IP": st.sampled_from(["*", "100.64.0.2/32"]) | json_values,
        "Ports": st.fixed_dictionaries({}, optional={"First": st.integers(-1, 70000) | json_values,
                                                      "Last": st.integers(-1, 70000) | json_values})}), max_size=2),
    "IPProto": st.lists(st.integers(-1, 300), max_size=3) | json_values,
})
derp_records = st.fixed_dictionaries({}, optional={"Regions": st.dictionaries(
    st.sampled_from(["1", "900", "x"]), st.fixed_dictionaries({}, optional={
        "RegionID": st.integers(0, 1000) | json_values, "RegionCode": json_values, "NoMeasureNoHome": json_values,
        "Nodes": st.lists(st.dictionaries(st.sampled_from(["Name", "HostName", "IPv4", "IPv6", "STUNPort",
                                                           "DERPPort", "URL", "InsecureForTests"]),
                                          node_values, max_size=5), max_size=2) | json_values}) | json_values,
    max_size=3) | json_values})
map_values = st.one_of(
    json_values, node_records, st.lists(node_records, max_size=3), st.lists(rule_records, max_size=3),
    derp_records, st.lists(st.integers(-3, 10), max_size=3),
)
map_messages = st.dictionaries(st.sampled_from(MAP_KEYS), map_values, max_size=8)


def typed_round_trip(d: Any, parse: Callable[[Any], Any] = wire.MapResponse.from_json) -> None:
    """Refused with a WireError, or parsed into a value that survives its own encoding (with nothing left out)."""
    try:
        msg = parse(d)
    except wire.WireError:
        return
    again = parse(json.loads(json.dumps(msg.to_json())))
    assert again == msg and getattr(again, "problems", ()) == ()


@settings(max_examples=150)
@given(map_messages)
def test_map_response_from_json(d: dict[str, Any]) -> None:
    typed_round_trip(d)


@given(json_values)
def test_map_response_from_random_json(d: Any) -> None:
    typed_round_trip(d)


@given(st.data())
def test_map_response_mangled_server_map(data: st.DataObject) -> None:
    """One field of a real full map replaced with something else: refused or parsed, never another exception."""
    good: dict[str, Any] = {
        "Node": {"ID": 1, "Name": "a.shoal.internal.", "Key": wire.key_text("nodekey", b"\x01" * 32),
                 "Addresses": ["100.64.0.1/32"], "KeyExpiry": None, "MachineAuthorized": True},
        "Peers": [{"ID": 2, "Key": wire.key_text("nodekey", b"\x02" * 32), "Endpoints": ["192.0.2.2:41641"],
                   "AllowedIPs": ["100.64.0.2/32"], "LastSeen": "2026-01-01T00:00:00.000000Z"}],
        "DERPMap": {"Regions": {"999": {"RegionID": 999, "Nodes": [{"HostName": "203.0.113.1", "DERPPort": 80}]}}},
        "DNSConfig": {"Resolvers": [], "Domains": ["shoal.internal"], "Proxied": True, "Routes": {}},
        "PacketFilter": wire.FILTER_ALLOW_ALL, "Domain": "shoal.internal",
    }
    assert wire.MapResponse.from_json(good).problems == ()
    typed_round_trip(good)
    top = data.draw(st.sampled_from(sorted(good)))
    target: Any = good
    if top in ("Node", "DERPMap", "DNSConfig") or data.draw(st.booleans()):
        target = good[top] if isinstance(good[top], dict) else good
    if isinstance(target, dict) and target:
        target[data.draw(st.sampled_from(sorted(target)))] = data.draw(map_values)
    typed_round_trip(good)


@given(st.dictionaries(st.sampled_from(["MachineAuthorized", "NodeKeyExpired", "AuthURL", "User", "Login",
                                        "LoggedOut", "Error"]),
                       json_values | st.fixed_dictionaries({}, optional={"ID": json_values, "LoginName": json_values,
                                                                         "Tags": json_values}), max_size=6))
def test_register_response_from_json(d: dict[str, Any]) -> None:
    typed_round_trip(d, wire.RegisterResponse.from_json)


@given(st.text(max_size=60))
def test_endpoint_parse(text: str) -> None:
    try:
        ep = wire.Endpoint.parse(text)
    except wire.WireError:
        return
    assert 0 < ep.port < 65536 and wire.Endpoint.parse(str(ep)) == ep


# --- the running server ---------------------------------------------------------------------------------------


@dataclass
class Live:
    """A server on its own event loop in a thread, so hypothesis can drive it from plain sync tests."""

    url: str
    svc: Service
    machine: str
    client: ControlClient
    key: str
    loop: asyncio.AbstractEventLoop

    def call(self, coro: Any) -> Any:
        return asyncio.run_coroutine_threadsafe(coro, self.loop).result(30)


@pytest.fixture(scope="module")
def live(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Live]:
    ready: queue.Queue[Live | BaseException] = queue.Queue()
    loop = asyncio.new_event_loop()
    stop = asyncio.Event()

    async def main() -> None:
        try:
            async with running_server(tmp_path_factory.mktemp("fuzz")) as r:
                await r.svc.create_user("alice")
                key = await r.svc.create_key("alice", reusable=True, ephemeral=False, expiration=3600, tags=())
                a = sim_node(r.url, "a")
                await a.join(key["key"])
                ready.put(Live(r.url, r.svc, a.client.machine_public.hex(), a.client, key["key"], loop))
                await stop.wait()
                await a.client.close()
        except BaseException as e:
            ready.put(e)
            raise

    t = threading.Thread(target=lambda: loop.run_until_complete(main()), daemon=True)
    t.start()
    got = ready.get(timeout=30)
    if isinstance(got, BaseException):
        raise got
    yield got
    loop.call_soon_threadsafe(stop.set)
    t.join(15)


PATHS = ["/machine/MKEY/register", "/machine/MKEY/map", "/machine/" + "00" * 32 + "/map",
         "/machine/" + "00" * 32 + "/register", "/machine/zz/map", "/derp/admit"]


@settings(max_examples=80, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(st.sampled_from(PATHS), st.binary(max_size=600))
def test_server_refuses_random_bodies(live: Live, path: str, body: bytes) -> None:
    before = live.svc.state.last_seq
    resp = httpx.post(live.url + path.replace("MKEY", live.machine), content=body, timeout=10)
    assert resp.status_code in (400, 401), (path, resp.status_code, resp.text)
    assert resp.text.strip(), "an error needs a reason"
    assert live.svc.state.last_seq == before, "a refused request wrote an event"


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(st.sampled_from(["register", "map"]), messages)
def test_server_refuses_sealed_garbage(live: Live, what: str, body: dict[str, Any]) -> None:
    """Properly sealed requests whose messages are nonsense: 400 (or 401 for bad auth), nothing written."""
    before = live.svc.state.last_seq
    _, sealed_body, _ = live.client._seal(body)
    resp = httpx.post(live.url + live.client._path(what), content=sealed_body, timeout=10)
    if resp.status_code == 200:
        # only a well-formed request for this very machine can pass; it changes nothing here
        assert what == "map" or "NodeKey" in body
    else:
        assert resp.status_code in (400, 401, 409), (resp.status_code, resp.text)
    assert live.svc.state.last_seq == before or resp.status_code == 200


def test_server_still_serves_after_fuzzing(live: Live) -> None:
    b = sim_node(live.url, "after")

    async def join() -> dict[str, Any]:
        try:
            return await b.join(live.key)
        finally:
            await b.client.close()

    assert live.call(join())["MachineAuthorized"]
    assert httpx.get(live.url + "/health", timeout=10).json()["ok"]
