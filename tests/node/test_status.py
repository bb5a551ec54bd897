"""node/status.py: the path rule (direct only when observed), peer rows from one engine snapshot, and what the
CLI prints from them (`shoal status`, `shoal ping`)."""

from __future__ import annotations

from typing import Any

import pytest

from coord import wire
from node import mapsession, status
from node.cli import render_status, wireguard_note
from node.keys import PrivateKey, PublicKey
from node.paths import PathKind
from node.status import PathView, path, path_text
from node.wg.config import DeviceState, PeerState

SELF_PRIV = PrivateKey(bytes(range(32)))
K2 = "nodekey:" + "22" * 32
K3 = "nodekey:" + "33" * 32
NOW = 10_000.0
DERP_SOCK = "127.0.0.1:40001"
DIRECT = "203.0.113.9:41641"


def peer(pid: int, key: str, eps: list[str], **kw: Any) -> dict[str, Any]:
    addrs = [f"100.64.0.{pid}/32", f"fd7a:115c:a1e0::{pid}/128"]
    rec = {"ID": pid, "Name": f"n{pid}.shoal.internal.", "Key": key, "Addresses": addrs, "AllowedIPs": addrs,
           "Endpoints": eps, "Online": True, "Expired": False}
    rec.update(kw)
    return rec


def netmap(peers: list[dict[str, Any]]) -> mapsession.NetMap:
    return mapsession.apply(mapsession.NetMap(), wire.MapResponse.from_json({
        "Node": {"ID": 1, "Name": "n1.shoal.internal.", "Key": str(SELF_PRIV.public()),
                 "Addresses": ["100.64.0.1/32"]}, "Peers": peers, "PacketFilter": [], "Domain": "shoal.internal"}))


def st(endpoint: str | None, handshake: float | None) -> PeerState:
    return PeerState(PublicKey.parse(K2), ("100.64.0.2/32",), endpoint, 25, handshake, 10, 20)


@pytest.mark.parametrize(("state", "view", "want", "text"), [
    (None, None, PathKind.NONE, "no path"),
    (st(DERP_SOCK, None), PathView(True, 900, None), PathKind.CONNECTING, "connecting"),
    (st(DIRECT, None), PathView(False, 900, DIRECT), PathKind.CONNECTING, "connecting"),
    (st(DERP_SOCK, NOW - 3), PathView(True, 900, None), PathKind.DERP, "relay DERP(900)"),
    (st(DIRECT, NOW - 3), PathView(False, 900, DIRECT), PathKind.DIRECT, f"direct {DIRECT}"),
    # the engine roamed to an address path discovery has not confirmed
    (st("198.51.100.7:9", NOW - 3), PathView(False, 900, DIRECT), PathKind.UNCONFIRMED,
     "unconfirmed 198.51.100.7:9"),
    (st(DIRECT, NOW - 3), PathView(False, 900, None), PathKind.UNCONFIRMED, f"unconfirmed {DIRECT}"),
    # the session is over: WireGuard's 180 s
    (st(DIRECT, NOW - 181), PathView(False, 900, DIRECT), PathKind.STALE, "no handshake for 181s"),
    (st(DIRECT, NOW - 180), PathView(False, 900, DIRECT), PathKind.DIRECT, f"direct {DIRECT}"),
    # a peer without disco: the endpoint we gave it, confirmed by a handshake
    (st("192.0.2.12:41641", NOW - 3), None, PathKind.DIRECT, "direct 192.0.2.12:41641"),
])
def test_truth_path_rule(state: PeerState | None, view: PathView | None, want: PathKind, text: str) -> None:
    kind = path(state, view, NOW)
    assert kind is want
    assert path_text(kind, state, view.region if view else None, NOW) == text


def test_truth_rows_join_one_engine_snapshot_with_path_state() -> None:
    nm = netmap([peer(2, K2, ["192.0.2.12:41641"]), peer(3, K3, [], Online=False)])
    dev = DeviceState(SELF_PRIV, 41641, (st(DERP_SOCK, NOW - 5),))
    seen: list[tuple[bytes, str | None]] = []

    def observe(key: bytes, endpoint: str | None) -> PathView | None:
        seen.append((key, endpoint))
        return PathView(endpoint == DERP_SOCK, 901, None, {"Best": None, "Trusted": False})

    rows = status.peer_rows(nm, dev, observe, NOW)
    assert seen == [(bytes.fromhex("22" * 32), DERP_SOCK), (bytes.fromhex("33" * 32), None)]
    assert [(r["HostName"], r["Online"], r["Path"], r["PathText"], r["Endpoint"], r["LastHandshake"],
             r["RxBytes"], r["TxBytes"], r["DERPRegion"]) for r in rows] == [
        ("n2", True, "derp", "relay DERP(901)", DERP_SOCK, NOW - 5, 10, 20, 901),
        ("n3", False, "none", "no path", None, None, 0, 0, None)]
    assert rows[0]["Addresses"] == ["100.64.0.2", "fd7a:115c:a1e0::2"] and rows[0]["Trusted"] is False
    # before the first engine poll the engine's DERP socket is never called direct (issue 13)
    rows = status.peer_rows(nm, DeviceState(SELF_PRIV, 41641, (st(DERP_SOCK, None),)), observe, NOW)
    assert rows[0]["PathText"] == "connecting"


def test_truth_cli_prints_the_agents_words() -> None:
    doc = {"BackendState": "Running", "LoginServer": "http://s", "Connected": True, "Engine": "wireguard-go",
           "Interface": "shoal0", "Port": 41641, "Health": [],
           "Self": {"Addresses": ["100.64.0.1"], "HostName": "n1", "Endpoints": ["192.0.2.10:41641"]},
           "Peers": [{"Addresses": ["100.64.0.2"], "HostName": "n2", "Online": True, "Path": "connecting",
                      "PathText": "connecting", "Endpoint": "127.0.0.1:40001", "LastHandshake": None},
                     {"Addresses": ["100.64.0.3"], "HostName": "n3", "Online": True, "Path": "stale",
                      "PathText": "no handshake for 212s", "Endpoint": DIRECT, "LastHandshake": NOW - 212}]}
    text = render_status(doc, NOW)
    assert "n2  online  connecting" in text and "127.0.0.1" not in text
    assert "no handshake for 212s" in text and "direct" not in text
    pong = {"Path": DIRECT, "WireGuard": "connecting", "WireGuardText": "connecting"}
    assert wireguard_note(pong) == " (WireGuard: connecting)"
    assert wireguard_note({**pong, "WireGuard": "direct", "WireGuardText": f"direct {DIRECT}"}) == ""
    assert wireguard_note({"Path": "DERP(900)", "WireGuard": "derp", "WireGuardText": "relay DERP(900)"}) == ""
