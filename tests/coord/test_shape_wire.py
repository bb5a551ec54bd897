"""coord/wire/schema.py: the typed messages. What the server sends parses and encodes back to the same bytes, the
typed delta application agrees with the JSON one the server's tests use, and each kind of bad input gets its
precise error (or, where the node tolerates it, is left out with its JSON path in ``problems``)."""

from __future__ import annotations

import json
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from coord import wire
from coord.change import Change
from coord.netmap import AllowAll, Builder, Settings, node_record, patch_record
from coord.state import Node, State
from node import mapsession

NOW = 1_800_000_000.123456
DERP_MAP = {"Regions": {"999": {
    "RegionID": 999, "RegionCode": "shoal", "RegionName": "Shoal embedded relay",
    "Nodes": [{"Name": "999a", "RegionID": 999, "HostName": "203.0.113.1", "DERPPort": 8080, "STUNPort": 3478,
               "URL": "http://203.0.113.1:8080/derp", "InsecureForTests": True}]}}}


def key(kind: str, b: int) -> str:
    return f"{kind}:{bytes([b]).hex() * 32}"


times = st.none() | st.floats(1e9, 4e9)
nodes = st.builds(
    Node,
    id=st.integers(1, 50),
    machine_key=st.integers(0, 255).map(lambda b: key("mkey", b)),
    node_key=st.integers(0, 255).map(lambda b: key("nodekey", b)),
    disco_key=st.sampled_from(["", key("discokey", 7)]),
    user_id=st.none() | st.integers(1, 5),
    tags=st.lists(st.sampled_from(["tag:a", "tag:b"]), max_size=2, unique=True).map(tuple),
    hostname=st.text("abcxyz-", max_size=10),
    given_name=st.text("abcxyz", min_size=1, max_size=10),
    ipv4=st.integers(1, 250).map(lambda i: f"100.64.0.{i}"),
    ipv6=st.integers(1, 250).map(lambda i: f"fd7a:115c:a1e0::{i:x}"),
    ephemeral=st.booleans(),
    key_expiry=times,
    created=st.floats(1e9, 4e9),
    os=st.sampled_from(["", "linux"]),
    routes=st.lists(st.sampled_from(["10.0.0.0/8", "192.168.1.0/24", "::/0"]), max_size=2, unique=True).map(tuple),
    endpoints=st.lists(st.sampled_from(["192.0.2.1:41641", "[2001:db8::1]:41641", "198.51.100.7:1"]),
                       max_size=3, unique=True).map(tuple),
    home_derp=st.integers(0, 999),
    online=st.booleans(),
    last_seen=times,
    expired=st.booleans(),
)


@given(nodes)
def test_shape_server_records_parse_and_encode_back_exactly(n: Node) -> None:
    rec = node_record(n, "shoal.internal")
    typed = wire.Node.from_json(rec)
    assert typed.to_json() == rec
    assert wire.Node.from_json(json.loads(json.dumps(typed.to_json()))) == typed
    patch = patch_record(n)
    assert wire.PeerChange.from_json(patch).to_json() == patch


def _state(ns: list[Node]) -> State:
    s = State()
    for i, n in enumerate(ns, 1):
        n.id = i
        n.version = 1
        s.nodes[i] = n
    return s


@settings(max_examples=50)
@given(st.lists(nodes, min_size=1, max_size=5), st.data())
def test_shape_full_and_delta_maps_round_trip_to_the_same_bytes(ns: list[Node], data: st.DataObject) -> None:
    state = _state(ns)
    b = Builder(state, Settings("shoal.internal", DERP_MAP))
    vis = AllowAll(state)
    body, sent = b.full(vis, 1, NOW)
    msg = wire.MapResponse.from_json(json.loads(body))
    assert msg.problems == ()
    assert json.dumps(msg.to_json(), separators=(",", ":")).encode() == body
    # a delta: some peers changed, some patched, one gone
    change = Change()
    for pid in data.draw(st.lists(st.sampled_from(sorted(state.nodes)), max_size=3)):
        state.nodes[pid].version += 1
        (change.patches if pid % 2 else change.peers).add(pid)
    if len(state.nodes) > 2:
        del state.nodes[max(state.nodes)]
        change.removed.add(len(ns))
    change.self_nodes.add(1)
    delta = b.delta(vis, 1, change, sent, NOW + 1)
    assert delta is not None
    dmsg = wire.MapResponse.from_json(json.loads(delta))
    assert json.dumps(dmsg.to_json(), separators=(",", ":")).encode() == delta
    # and the node's typed application of both agrees with the JSON one
    js = wire.NetMap()
    js.apply(json.loads(body))
    js.apply(json.loads(delta))
    typed = mapsession.apply(mapsession.apply(mapsession.NetMap(), msg), dmsg)
    assert typed.to_json() == js.as_json()


# --- errors ----------------------------------------------------------------------------------------------

GOOD_PEER: dict[str, Any] = {"ID": 2, "Key": key("nodekey", 2), "Addresses": ["100.64.0.2/32"],
                             "Endpoints": ["192.0.2.2:41641"]}


@pytest.mark.parametrize(("msg", "error"), [
    ([], "MapResponse: expected an object"),
    ({"Peers": {}}, "MapResponse.Peers: expected a list"),
    ({"Node": {"Name": "x"}}, "MapResponse.Node: missing ID"),
    ({"Node": {"ID": "1"}}, "MapResponse.Node.ID: expected an integer"),
    ({"Node": {"ID": 1, "Key": "nodekey:12"}}, "MapResponse.Node.Key: expected 64 hex digits"),
    ({"Node": {"ID": 1, "Key": key("discokey", 1)}}, "MapResponse.Node.Key: expected prefix nodekey:"),
    ({"Node": {"ID": 1, "KeyExpiry": "soon"}}, "MapResponse.Node.KeyExpiry: 'soon' is not an RFC 3339 time"),
    ({"Node": {"ID": 1, "Online": "yes"}}, "MapResponse.Node.Online: expected a boolean"),
    ({"Node": {"ID": 1, "HomeDERP": 70000}}, "MapResponse.Node.HomeDERP: expected an integer in 0..65535"),
    ({"Node": {"ID": 1, "Hostinfo": []}}, "MapResponse.Node.Hostinfo: expected an object"),
    ({"Node": {"ID": 1, "Endpoints": "x"}}, "MapResponse.Node.Endpoints: expected a list"),
    ({"PeersRemoved": ["2"]}, "MapResponse.PeersRemoved[0]: expected an integer"),
    ({"PacketFilter": {}}, "MapResponse.PacketFilter: expected a list"),
    ({"PacketFilter": [{"SrcIPs": ["*"]}]}, "MapResponse.PacketFilter[0]: missing SrcIPs or DstPorts"),
    ({"PacketFilter": [{"SrcIPs": "*", "DstPorts": []}]},
     "MapResponse.PacketFilter[0].SrcIPs: expected a list of address strings"),
    ({"PacketFilter": [{"SrcIPs": ["*"], "DstPorts": [{"IP": "*", "Ports": {"First": -1, "Last": 2}}]}]},
     "MapResponse.PacketFilter[0].DstPorts[0].Ports.First: expected an integer in 0..65535"),
    ({"PacketFilter": [{"SrcIPs": ["*"], "DstPorts": [{"IP": "*", "Ports": {"First": 9, "Last": 2}}]}]},
     "MapResponse.PacketFilter[0].DstPorts[0].Ports: bad port range 9-2"),
    ({"PacketFilter": [{"SrcIPs": ["*"], "DstPorts": [{"IP": 5, "Ports": {"First": 1, "Last": 2}}]}]},
     "MapResponse.PacketFilter[0].DstPorts[0].IP: expected an address string"),
    ({"PacketFilter": [{"SrcIPs": ["*"], "DstPorts": [], "IPProto": [256]}]},
     r"MapResponse.PacketFilter[0].IPProto[0]: expected an integer in 0..255"),
    ({"DERPMap": []}, "MapResponse.DERPMap: expected an object"),
    ({"DNSConfig": {"Domains": [1]}}, "MapResponse.DNSConfig.Domains[0]: expected a string"),
    ({"DNSConfig": {"Routes": []}}, "MapResponse.DNSConfig.Routes: expected an object"),
    ({"Domain": 5}, "MapResponse.Domain: expected a string"),
    ({"ControlTime": 5}, "MapResponse.ControlTime: expected an RFC 3339 time or null"),
])
def test_shape_malformed_map_responses_are_refused_with_their_path(msg: Any, error: str) -> None:
    with pytest.raises(wire.WireError) as e:
        wire.MapResponse.from_json(msg)
    assert str(e.value) == error


def test_shape_unreadable_peers_and_items_are_left_out_with_their_path() -> None:
    msg = wire.MapResponse.from_json({
        "Peers": [GOOD_PEER, {"ID": 3, "Key": "nodekey:zz"}, "junk",
                  {**GOOD_PEER, "ID": 4, "Key": key("nodekey", 4),
                   "Endpoints": ["nonsense", "::1:5", "192.0.2.4:1"], "AllowedIPs": ["bogus", "10.0.0.0/8"]}],
    })
    assert msg.peers is not None and [p.id for p in msg.peers] == [2, 4]
    assert [str(e) for e in msg.peers[1].endpoints] == ["192.0.2.4:1"]
    assert [str(n) for n in msg.peers[1].allowed_ips] == ["10.0.0.0/8"]
    assert msg.problems == (
        "MapResponse.Peers[1].Key: expected 64 hex digits",
        "MapResponse.Peers[2]: expected an object",
        "MapResponse.Peers[3].AllowedIPs[0]: 'bogus' is not a CIDR prefix",
        "MapResponse.Peers[3].Endpoints[0]: endpoint 'nonsense' is not host:port",
        "MapResponse.Peers[3].Endpoints[1]: IPv6 endpoint '::1:5' needs brackets: [addr]:port",
    )


def test_shape_a_peer_whose_new_record_cannot_be_read_is_dropped_not_kept_stale() -> None:
    nm = mapsession.apply(mapsession.NetMap(), wire.MapResponse.from_json({"Peers": [GOOD_PEER]}))
    for bad in ({"PeersChanged": [{"ID": 2, "Key": 7}]}, {"PeersChangedPatch": [{"NodeID": 2, "Online": "x"}]}):
        msg = wire.MapResponse.from_json(bad)
        assert msg.peers_removed == (2,) and len(msg.problems) == 1
        assert mapsession.apply(nm, msg).peers == {}


def test_shape_derp_map_regions_and_relays_that_cannot_be_read() -> None:
    m = {"Regions": {"1": {"RegionID": "x"}, "2": "nope", "3": {"Nodes": [{"HostName": "h", "STUNPort": "x"},
                                                                         {"HostName": "203.0.113.3"}]}}}
    problems: list[str] = []
    dm = wire.DERPMap.from_json(m, problems=problems)
    assert [r.region_id for r in dm.regions] == [3] and [n.host_name for n in dm.regions[0].nodes] == ["203.0.113.3"]
    assert problems == ["region 1: RegionID 'x' is not an integer", "region 2: not an object",
                        "region 3 node 0.STUNPort: expected an integer in -1..65535"]
    with pytest.raises(wire.DERPMapError, match="RegionID 'x'"):
        wire.DERPMap.from_json(m)
    with pytest.raises(wire.DERPMapError, match="IPv4: 'x' is not an IP address"):
        wire.DERPMap.from_json({"Regions": {"1": {"Nodes": [{"IPv4": "x"}]}}})
    assert wire.DERPMap.from_json(DERP_MAP).to_json() == DERP_MAP


@pytest.mark.parametrize(("text", "error"), [
    ("192.0.2.1", "endpoint '192.0.2.1' is not host:port"),
    ("192.0.2.1:x", "endpoint '192.0.2.1:x' is not host:port"),
    ("192.0.2.1:²", "endpoint '192.0.2.1:²' is not host:port"),
    ("192.0.2.1:0", "endpoint '192.0.2.1:0' has port out of range"),
    ("192.0.2.1:65536", "endpoint '192.0.2.1:65536' has port out of range"),
    ("host:1", "endpoint 'host:1' has no IP address"),
    ("2001:db8::1:5", "IPv6 endpoint '2001:db8::1:5' needs brackets: [addr]:port"),
    (5, "expected an endpoint string ip:port"),
])
def test_shape_endpoint_errors(text: object, error: str) -> None:
    with pytest.raises(wire.WireError) as e:
        wire.Endpoint.parse(text)
    assert str(e.value) == error


def test_shape_endpoints_are_canonical() -> None:
    assert str(wire.Endpoint.parse("[::ffff:192.0.2.1]:5")) == "192.0.2.1:5"
    assert str(wire.Endpoint.parse("[1.2.3.4]:5")) == "1.2.3.4:5"
    assert wire.Endpoint.parse("[2001:DB8::1]:7").addr == ("2001:db8::1", 7)
    assert wire.check_endpoint("[::1]:9") == ("::1", 9)


def test_shape_peer_change_keeps_what_was_not_sent() -> None:
    peer = wire.Node.from_json({**GOOD_PEER, "LastSeen": "2026-01-01T00:00:00.000000Z", "DiscoKey": key("discokey", 2)})
    kept = wire.PeerChange.from_json({"NodeID": 2, "Online": True}).apply(peer)
    assert kept.online and kept.last_seen == peer.last_seen and kept.disco_key == peer.disco_key
    cleared = wire.PeerChange.from_json({"NodeID": 2, "LastSeen": None, "DiscoKey": ""}).apply(peer)
    assert cleared.last_seen is None and cleared.disco_key is None and cleared.endpoints == peer.endpoints


def test_shape_register_response() -> None:
    for d in ({"MachineAuthorized": True, "NodeKeyExpired": False, "AuthURL": "",
               "User": {"ID": 1, "LoginName": "alice"}, "Login": {"Tags": ["tag:x"]}},
              {"MachineAuthorized": False, "NodeKeyExpired": False, "AuthURL": "", "LoggedOut": True},
              {"MachineAuthorized": False, "NodeKeyExpired": False, "AuthURL": "http://x/register/1"}):
        assert wire.RegisterResponse.from_json(d).to_json() == d
    for bad, error in (([], "RegisterResponse: expected an object"),
                       ({"AuthURL": 1}, "RegisterResponse.AuthURL: expected a string"),
                       ({"MachineAuthorized": 1}, "RegisterResponse.MachineAuthorized: expected a boolean"),
                       ({"User": {"ID": "1"}}, "RegisterResponse.User.ID: expected an integer")):
        with pytest.raises(wire.WireError) as e:
            wire.RegisterResponse.from_json(bad)
        assert str(e.value) == error


@given(st.floats(0, 4e9))
def test_shape_times_round_trip(ts: float) -> None:
    text = wire.rfc3339(ts)
    assert text.endswith("Z") and len(text) == 27
    assert wire.rfc3339(wire.parse_time(text)) == text
    assert wire.time_text(wire.parse_datetime(text)) == text


def test_shape_one_allow_all_filter() -> None:
    from coord import netmap, policy

    assert policy.FILTER_ALLOW_ALL is wire.FILTER_ALLOW_ALL
    assert netmap.AllowAll(State()).filter(1) is wire.FILTER_ALLOW_ALL
    assert wire.parse_filter(wire.FILTER_ALLOW_ALL) == (wire.ALLOW_ALL_RULE,)
    assert wire.ALLOW_ALL_RULE.allows_all


def test_policy_keep_established_setting_reaches_the_node_in_full_maps() -> None:
    from coord.config import load

    assert load(env={}).keep_established_on_policy_change is False
    assert load(env={"SHOAL_KEEP_ESTABLISHED_ON_POLICY_CHANGE": "true"}).keep_established_on_policy_change is True
    for keep in (False, True):
        state = _state([Node(id=1, machine_key=key("mkey", 1), node_key=key("nodekey", 1), disco_key="",
                             user_id=1, tags=(), hostname="a", ephemeral=False, key_expiry=None, created=1e9,
                             ipv4="100.64.0.1", ipv6="fd7a:115c:a1e0::1", given_name="a")])
        body, _ = Builder(state, Settings("shoal.internal", DERP_MAP, keep_established=keep)).full(
            AllowAll(state), 1, NOW)
        msg = wire.MapResponse.from_json(json.loads(body))
        assert json.loads(body)["KeepEstablished"] is keep and msg.keep_established is keep
        assert mapsession.apply(mapsession.NetMap(), msg).keep_established is keep
