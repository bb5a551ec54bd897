"""Plain-WireGuard devices on the server (coord/devices.py): the event holds only the public key; the hub sees the
device as a peer, everyone else sees the hub carrying its addresses; the hub's filter enforces both directions;
revocation removes it everywhere; deltas agree with fresh maps, and a replay with the live state. The real
Service on an in-memory store, as in test_subnet_router.py; the lab test (tests/lab_tests/test_wg_device_lab.py)
runs wg-quick against a real hub."""

from __future__ import annotations

import dataclasses
import json
import os
import stat
from pathlib import Path
from typing import Any

import pytest
from nacl.public import PrivateKey

from coord import events as ev
from coord import wgdevice
from coord.errors import CoordError
from coord.state import fold
from tests.coord.test_subnet_router import Net
from tests.coord.util import cli

pytestmark = pytest.mark.anyio

ALICE, BOB = "alice@example.com", "bob@example.com"
POLICY = """{
  "acls": [
    {"action": "accept", "src": ["alice@example.com"], "dst": ["alice@example.com:*"]},
    {"action": "accept", "src": ["bob@example.com"], "dst": ["alice@example.com:22", "bob@example.com:*"]},
  ],
}"""


async def tailnet(policy: str | None = POLICY) -> tuple[Net, int, int, int]:
    net = Net()
    await net.user(ALICE)
    await net.user(BOB)
    if policy is not None:
        await net.svc.set_policy(policy, "policy.hujson")
    hub, a, b = await net.join(ALICE, "hub"), await net.join(ALICE, "a"), await net.join(BOB, "b")
    await net.svc.execute(lambda s: [ev.NodeEndpointsChanged(hub, ("192.0.2.10:41641",), (1,), 0)], "test")
    return net, hub, a, b


def peers(net: Net, viewer: int) -> dict[int, dict[str, Any]]:
    body, _ = net.svc.builder.full(net.svc.visibility, viewer, net.now)
    return {p["ID"]: p for p in json.loads(body)["Peers"]}


def filt(net: Net, viewer: int) -> list[dict[str, Any]]:
    body, _ = net.svc.builder.full(net.svc.visibility, viewer, net.now)
    return json.loads(body)["PacketFilter"]  # type: ignore[no-any-return]


async def test_wg_device_event_holds_only_the_public_key_and_maps_fold_it_into_the_hub() -> None:
    net, hub, a, b = await tailnet()
    k = PrivateKey.generate()
    res = await net.svc.add_wg_device("phone", ALICE, "hub", bytes(k.public_key))
    dev = res["id"]
    e = net.records()[-1].event
    assert isinstance(e, ev.NodeRegistered) and e.via == hub and e.disco_key == ""
    assert e.node_key == f"nodekey:{bytes(k.public_key).hex()}"
    assert bytes(k).hex() not in json.dumps(dataclasses.asdict(e))
    assert res["hub_node_key"] == net.state.nodes[hub].node_key and res["hub_endpoints"] == ["192.0.2.10:41641"]
    d4 = f"{res['ipv4']}/32"

    # the hub: the device as a WireGuard peer with its own addresses and no endpoint
    hp = peers(net, hub)
    assert hp[dev]["Key"] == e.node_key and hp[dev]["AllowedIPs"][0] == d4 and hp[dev]["Endpoints"] == []
    # everyone else: no device record, its addresses in the hub's AllowedIPs (also for bob, who sees the hub)
    for viewer in (a, b):
        ps = peers(net, viewer)
        assert dev not in ps and d4 in ps[hub]["AllowedIPs"]
    # a receiver's own filter admits the device as alice's (a); bob's node has nothing for it (b)
    assert any(d4 in r["SrcIPs"] for r in filt(net, a))
    assert not any(d4 in r["SrcIPs"] for r in filt(net, b))
    # the hub enforces both directions: to the device from alice's nodes, from the device only to alice's nodes
    hf = filt(net, hub)
    to_dev = [r for r in hf if any(p["IP"] == d4 for p in r["DstPorts"])]
    b4 = f"{net.state.nodes[b].ipv4}/32"
    assert any(f"{net.state.nodes[a].ipv4}/32" in r["SrcIPs"] for r in to_dev)
    # bob reaches alice's nodes, the device included, on TCP 22 only
    assert {(p["Ports"]["First"], p["Ports"]["Last"]) for r in to_dev if b4 in r["SrcIPs"] for p in r["DstPorts"]
            if p["IP"] == d4} == {(22, 22)}
    mine = {d4, f"{res['ipv6']}/128"}
    from_dev = {p["IP"] for r in hf if d4 in r["SrcIPs"] and set(r["SrcIPs"]) <= mine for p in r["DstPorts"]}
    assert f"{net.state.nodes[a].ipv4}/32" in from_dev and f"{net.state.nodes[b].ipv4}/32" not in from_dev

    # a replay folds to the same state
    again = fold(net.records())
    assert again.nodes[dev] == net.state.nodes[dev] and again.hubs == net.state.hubs == {hub: (dev,)}


async def test_wg_device_revocation_removes_it_everywhere_and_deltas_say_so() -> None:
    net, hub, a, _ = await tailnet(policy=None)
    res = await net.svc.add_wg_device("phone", ALICE, "hub", os.urandom(32))
    dev, d4 = res["id"], f"{res['ipv4']}/32"
    _, sent_hub = net.svc.builder.full(net.svc.visibility, hub, net.now)
    _, sent_a = net.svc.builder.full(net.svc.visibility, a, net.now)
    net.changes.clear()
    await net.svc.delete_node("phone")
    change = net.changes[-1] if net.changes else None
    assert change is not None
    dh = json.loads(net.svc.builder.delta(net.svc.visibility, hub, change, sent_hub, net.now) or b"{}")
    da = json.loads(net.svc.builder.delta(net.svc.visibility, a, change, sent_a, net.now) or b"{}")
    assert dh["PeersRemoved"] == [dev]
    assert [p["ID"] for p in da["PeersChanged"]] == [hub] and d4 not in da["PeersChanged"][0]["AllowedIPs"]
    assert dev not in peers(net, hub) and d4 not in peers(net, a)[hub]["AllowedIPs"]

    # a hub that goes takes its devices with it
    tablet = (await net.svc.add_wg_device("tablet", ALICE, "hub", os.urandom(32)))["id"]
    await net.svc.delete_node("hub")
    assert tablet not in net.state.nodes
    assert [(r.event.node_id, r.event.reason) for r in net.records()[-2:] if isinstance(r.event, ev.NodeDeleted)] == [
        (hub, "deleted by admin"), (tablet, f"its hub (node {hub}) was deleted")]


async def test_wg_device_refusals() -> None:
    net, _, a, _ = await tailnet()
    with pytest.raises(CoordError, match="reported no endpoint"):
        await net.svc.add_wg_device("phone", ALICE, str(a), os.urandom(32))
    await net.svc.add_wg_device("phone", ALICE, "hub", key := os.urandom(32))
    with pytest.raises(CoordError, match="already named"):
        await net.svc.add_wg_device("phone", ALICE, "hub", os.urandom(32))
    with pytest.raises(CoordError, match="public key is in use"):
        await net.svc.add_wg_device("tablet", ALICE, "hub", key)
    with pytest.raises(CoordError, match="WireGuard device itself"):
        await net.svc.add_wg_device("tablet", ALICE, "phone", os.urandom(32))
    with pytest.raises(CoordError, match="no user"):
        await net.svc.add_wg_device("tablet", "carol", "hub", os.urandom(32))


def test_wg_device_config_and_qr_png(tmp_path: Path) -> None:
    result = {"ipv4": "100.64.0.7", "ipv6": "fd7a:115c:a1e0::7", "hub_node_key": "nodekey:" + "11" * 32,
              "hub_endpoints": ["192.0.2.10:41641"], "tailnet": ["100.64.0.0/10", "fd7a:115c:a1e0::/48"]}
    private, _ = wgdevice.keypair()
    text = wgdevice.config_text(private, result)
    assert "Address = 100.64.0.7/32, fd7a:115c:a1e0::7/128" in text
    assert "Endpoint = 192.0.2.10:41641" in text and "AllowedIPs = 100.64.0.0/10, fd7a:115c:a1e0::/48" in text
    assert "DNS" not in text
    assert "Endpoint = 198.51.100.1:51820" in wgdevice.config_text(private, result, "198.51.100.1:51820")
    png = tmp_path / "d.png"
    wgdevice.write_png(text, png)
    assert stat.S_IMODE(png.stat().st_mode) == 0o600 and png.read_bytes()[:4] == b"\x89PNG"
    with pytest.raises(FileExistsError):
        wgdevice.write_png(text, png)
    with pytest.raises(ValueError, match="--endpoint"):
        wgdevice.config_text(private, {**result, "hub_endpoints": []})


def test_wg_device_cli_refuses_before_making_a_key_when_the_png_exists(tmp_path: Path) -> None:
    (tmp_path / "phone.png").write_text("x")
    r = cli(tmp_path / "data", "devices", "add-wg", "phone", "--via", "hub", "--user", ALICE,
            "--qr-png", str(tmp_path / "phone.png"), check=False)
    assert r.returncode == 1 and "exists" in r.stderr


async def test_wg_device_sees_agrees_with_peers() -> None:
    """The fan-out asks `sees` per change; `full` uses `peers`: they must agree for every pair."""
    for policy in (POLICY, None):
        net, *_ = await tailnet(policy)
        await net.svc.add_wg_device("phone", ALICE, "hub", os.urandom(32))
        await net.svc.add_wg_device("tv", BOB, "hub", os.urandom(32))
        vis = net.svc.visibility
        ids = sorted(net.state.nodes)
        for v in ids:
            assert {p for p in ids if vis.sees(v, p)} == set(vis.peers(v)), (policy is None, v)
