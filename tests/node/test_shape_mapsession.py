"""node/mapsession.py without sockets: a full map, then deltas; the saved netmap; the node's error root; the
states that are enums."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest

from coord import wire
from node import control, disco, errors, keys, mapsession, netcheck, rawsock, run
from node.agent import AgentError, BackendState
from node.keys import StateFileError
from node.paths import PathKind
from node.render import nft, routes
from node.state import StateDir
from node.wg import config, go, uapi


def key(kind: str, b: int) -> str:
    return f"{kind}:{bytes([b]).hex() * 32}"


def peer(pid: int, **kw: Any) -> dict[str, Any]:
    rec = {"ID": pid, "Name": f"n{pid}.shoal.internal.", "Key": key("nodekey", pid),
           "Addresses": [f"100.64.0.{pid}/32"], "AllowedIPs": [f"100.64.0.{pid}/32"],
           "Endpoints": [f"192.0.2.{pid}:41641"], "Online": False, "DiscoKey": key("discokey", pid)}
    rec.update(kw)
    return rec


FULL = {
    "Node": peer(1, MachineAuthorized=True),
    "Peers": [peer(2), peer(3)],
    "DERPMap": {"Regions": {}},
    "DNSConfig": {"Resolvers": [], "Domains": ["shoal.internal"], "Proxied": True, "Routes": {}},
    "PacketFilter": wire.FILTER_ALLOW_ALL,
    "Domain": "shoal.internal",
    "ControlTime": "2026-01-01T00:00:00.000000Z",
}


def run_stream(*msgs: dict[str, Any]) -> mapsession.NetMap:
    nm = mapsession.NetMap()
    for m in msgs:
        nm = mapsession.apply(nm, wire.MapResponse.from_json(m))
    return nm


def test_shape_full_map_then_deltas() -> None:
    nm = run_stream(FULL)
    assert nm.node is not None and nm.node.id == 1 and sorted(nm.peers) == [2, 3]
    assert nm.packet_filter == (wire.ALLOW_ALL_RULE,) and nm.domain == "shoal.internal"
    before = nm
    nm = mapsession.apply(nm, wire.MapResponse.from_json({
        "PeersChanged": [peer(4), peer(2, Name="renamed.shoal.internal.")],
        "PeersRemoved": [3],
        "PeersChangedPatch": [{"NodeID": 4, "Online": True, "Endpoints": ["198.51.100.4:1"]},
                              {"NodeID": 99, "Online": True}],  # a patch for a peer we do not have: dropped
    }))
    assert sorted(nm.peers) == [2, 4]
    assert nm.peers[2].name == "renamed.shoal.internal."
    assert nm.peers[4].online and [str(e) for e in nm.peers[4].endpoints] == ["198.51.100.4:1"]
    # what a delta does not carry stays; the old netmap is untouched (a pure function)
    assert (nm.node, nm.derp_map, nm.dns, nm.packet_filter, nm.domain) == (
        before.node, before.derp_map, before.dns, before.packet_filter, before.domain)
    assert sorted(before.peers) == [2, 3] and before.peers[2].name == "n2.shoal.internal."


def test_shape_peers_replaces_and_wins_over_the_delta_fields() -> None:
    nm = run_stream(FULL, {"Peers": [peer(5)], "PeersChanged": [peer(6)], "PeersRemoved": [5]})
    assert sorted(nm.peers) == [5]
    # an empty Peers list is a full list with nobody in it
    assert run_stream(FULL, {"Peers": []}).peers == {}


def test_shape_an_empty_packet_filter_blocks_all_and_a_missing_one_keeps_the_last() -> None:
    nm = run_stream(FULL, {"PacketFilter": []})
    assert nm.packet_filter == ()
    assert run_stream(FULL, {"PeersRemoved": [2]}).packet_filter == (wire.ALLOW_ALL_RULE,)
    assert mapsession.NetMap().packet_filter is None


def test_shape_keepalives_and_empty_messages() -> None:
    ka = wire.MapResponse.from_json({"KeepAlive": True})
    assert ka.keep_alive and ka.empty
    assert not wire.MapResponse.from_json({"KeepAlive": True, "PeersRemoved": [1]}).empty
    nm = run_stream(FULL)
    assert mapsession.apply(nm, ka) == nm


def test_shape_saved_netmap_round_trips(tmp_path: Path) -> None:
    nm = run_stream(FULL, {"PeersChangedPatch": [{"NodeID": 2, "Online": True}]})
    state = StateDir(tmp_path)
    state.save_netmap(nm)
    again = state.load_netmap()
    assert again == nm
    saved = json.loads((tmp_path / "netmap.json").read_text())
    assert saved == nm.to_json() and list(saved) == ["Node", "Peers", "DERPMap", "DNSConfig", "PacketFilter",
                                                      "Domain", "SSHPolicy", "CapGrants", "KeepEstablished"]
    assert mapsession.NetMap.from_json(saved) == nm


@pytest.mark.parametrize(("text", "why"), [
    ('{"Peers": []}', "not a netmap: expected Node and Peers"),
    ('{"Node": {"ID": 1}, "Peers": {}}', "not a netmap: expected Node and Peers"),
    ('{"Node": {"ID": "x"}, "Peers": []}', "not a netmap: MapResponse.Node.ID: expected an integer"),
    ('{"Node": {"ID": 1}, "Peers": [], "PacketFilter": 3}', "not a netmap: MapResponse.PacketFilter: expected a list"),
])
def test_shape_a_bad_saved_netmap_is_named(tmp_path: Path, text: str, why: str) -> None:
    (tmp_path / "netmap.json").write_text(text)
    with pytest.raises(StateFileError) as e:
        StateDir(tmp_path).load_netmap()
    assert why in str(e.value) and str(tmp_path / "netmap.json") in str(e.value)


def test_shape_one_error_root_with_a_local_remote_split() -> None:
    local = [keys.BadKey, StateFileError, run.CommandError, config.ConfigError, uapi.UapiError, go.EngineError,
             routes.RouteStateError, AgentError]
    remote = [control.ControlError, control.PinMismatch, disco.DiscoError, rawsock.RawPacketError, nft.RenderError]
    for cls in local:
        assert issubclass(cls, errors.LocalError) and not issubclass(cls, errors.RemoteError), cls
    for cls in remote:
        assert issubclass(cls, errors.RemoteError) and not issubclass(cls, errors.LocalError), cls
    assert issubclass(errors.LocalError, errors.NodeError) and issubclass(errors.RemoteError, errors.NodeError)
    # parse errors that were ValueErrors still are
    for cls in (keys.BadKey, config.ConfigError, uapi.UapiError, routes.RouteStateError, disco.DiscoError,
                rawsock.RawPacketError, nft.RenderError):
        assert issubclass(cls, ValueError), cls
    assert netcheck.DerpMapError is wire.DERPMapError and issubclass(wire.DERPMapError, wire.WireError)


def test_shape_states_are_enums_that_encode_as_before() -> None:
    assert [s.value for s in BackendState] == ["NoState", "NeedsLogin", "Starting", "Running", "Stopped"]
    assert json.dumps({"BackendState": BackendState.NEEDS_LOGIN, "Path": PathKind.DERP}) == (
        '{"BackendState": "NeedsLogin", "Path": "derp"}')
    assert f"{BackendState.RUNNING}" == "Running" and str(PathKind.DIRECT) == "direct"  # as the daemon logs it
