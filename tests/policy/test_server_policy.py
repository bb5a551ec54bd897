"""The policy on a running server: set, refuse, diff, and netmaps that follow it."""

from __future__ import annotations

import asyncio
from pathlib import Path
from typing import Any

import pytest

from coord.errors import DomainError
from tests.coord.harness import Running, running_server, sim_node

pytestmark = pytest.mark.anyio

POLICY = """
// alice may reach the servers on SSH; nobody else may reach anything
{
  "tagOwners": {"tag:srv": ["alice@example.com"]},
  "acls": [
    {"action": "accept", "src": ["alice@example.com"], "dst": ["tag:srv:22"]},
  ],
  "tests": [
    {"src": "alice@example.com", "accept": ["tag:srv:22"], "deny": ["tag:srv:80"]},
  ],
}
"""

BROKEN_TEST = POLICY.replace('"deny": ["tag:srv:80"]', '"deny": ["tag:srv:22"]')
UNDEFINED = POLICY.replace('"dst": ["tag:srv:22"]', '"dst": ["group:nobody:22"]')


async def tailnet(r: Running) -> dict[str, Any]:
    for u in ("alice@example.com", "bob@example.com"):
        await r.svc.create_user(u)
    keys = {}
    keys["a"] = (await r.svc.create_key("alice@example.com", reusable=True, ephemeral=False, expiration=600,
                                         tags=()))["key"]
    keys["b"] = (await r.svc.create_key("bob@example.com", reusable=True, ephemeral=False, expiration=600,
                                         tags=()))["key"]
    keys["c"] = (await r.svc.create_key("alice@example.com", reusable=True, ephemeral=False, expiration=600,
                                         tags=("tag:srv",)))["key"]
    nodes = {}
    for name in ("a", "b", "c"):
        n = sim_node(r.url, name)
        await n.join(keys[name])
        nodes[name] = n
    return nodes


async def test_policy_drives_peers_and_filters(tmp_path: Path) -> None:
    async with running_server(tmp_path) as r:
        nodes = await tailnet(r)
        streams = {k: n.client.stream(n.map_request()) for k, n in nodes.items()}
        full = {k: await asyncio.wait_for(s.__anext__(), 5) for k, s in streams.items()}
        assert all(len(m["Peers"]) == 2 for m in full.values())  # no policy: allow all
        result = await r.svc.set_policy(POLICY)
        assert result["changed"] and result["tests"]["passed"] == 2

        async def removed(k: str, want: set[int]) -> None:
            got: set[int] = set()
            while not want <= got:
                msg = await asyncio.wait_for(streams[k].__anext__(), 5)
                got |= set(msg.get("PeersRemoved") or [])

        await removed("b", {1, 3})  # b sees nobody
        vis = r.svc._visibility
        assert set(vis.peers(1)) == {3} and set(vis.peers(3)) == {1} and set(vis.peers(2)) == set()
        filt = vis.filter(3)
        assert filt == [{"SrcIPs": ["100.64.0.1/32", "fd7a:115c:a1e0::1/128"],
                         "DstPorts": [{"IP": "100.64.0.3/32", "Ports": {"First": 22, "Last": 22}},
                                      {"IP": "fd7a:115c:a1e0::3/128", "Ports": {"First": 22, "Last": 22}}]}]
        assert vis.filter(1) == [] and vis.filter(2) == []
        hist = await r.svc.policy_history()
        assert [h["actor"] for h in hist] == ["admin"]
        for s in streams.values():
            await s.aclose()
        for n in nodes.values():
            await n.client.close()


async def test_refused_policies_keep_the_old_one(tmp_path: Path) -> None:
    async with running_server(tmp_path) as r:
        await tailnet(r)
        await r.svc.set_policy(POLICY)
        seq = r.svc.state.last_seq
        with pytest.raises(DomainError) as e:
            await r.svc.set_policy(BROKEN_TEST, "broken.hujson")
        assert "tests[0]" in e.value.message and "expected deny" in e.value.message
        with pytest.raises(DomainError) as e:
            await r.svc.set_policy(UNDEFINED, "undefined.hujson")
        assert "undefined.hujson:" in e.value.message and "acls[0].dst[0]" in e.value.message
        with pytest.raises(DomainError) as e:
            await r.svc.set_policy("{ not json", "bad.hujson")
        assert "bad.hujson:1:" in e.value.message
        assert r.svc.state.last_seq == seq
        assert r.svc.get_policy()["policy"] == POLICY


async def test_diff_names_nodes(tmp_path: Path) -> None:
    async with running_server(tmp_path) as r:
        await tailnet(r)
        d = r.svc.diff_policy(POLICY)
        assert "a" in d["text"] and d["diff"]["removed"]
        assert not d["diff"]["added"]


async def test_tag_owners_gate_requested_tags(tmp_path: Path) -> None:
    async with running_server(tmp_path) as r:
        await tailnet(r)
        await r.svc.set_policy(POLICY)
        from coord import wire

        key_b = (await r.svc.create_key("bob@example.com", reusable=True, ephemeral=False, expiration=600,
                                         tags=()))["key"]
        key_a = (await r.svc.create_key("alice@example.com", reusable=True, ephemeral=False, expiration=600,
                                         tags=()))["key"]
        from node.control import ControlError

        for key, ok in ((key_b, False), (key_a, True)):
            n = sim_node(r.url, "wants-tag")
            await n.client.pin()
            req = n.register_request(key)
            req = wire.RegisterRequest(node_key=req.node_key, auth_key=key,
                                       hostinfo=wire.Hostinfo(hostname="wants-tag", request_tags=("tag:srv",)))
            if ok:
                assert (await n.client.register(req))["MachineAuthorized"]
            else:
                with pytest.raises(ControlError, match="may not apply tag:srv"):
                    await n.client.register(req)
            await n.client.close()
