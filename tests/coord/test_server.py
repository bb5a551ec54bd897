"""The control protocol end to end: a real server on loopback, simulated nodes with real sealed requests."""

from __future__ import annotations

import asyncio
import os
from pathlib import Path
from typing import Any

import httpx
import pytest

from coord import wire
from node.control import ControlClient, ControlError, PinMismatch
from tests.coord.harness import Running, SimNode, running_server, sim_node

pytestmark = pytest.mark.anyio


async def make_key(r: Running, **kw: Any) -> str:
    if not r.svc.state.user_by_name("alice"):
        await r.svc.create_user("alice")
    out = await r.svc.create_key("alice", reusable=kw.pop("reusable", True), ephemeral=kw.pop("ephemeral", False),
                                 expiration=kw.pop("expiration", 3600.0), tags=kw.pop("tags", ()))
    return str(out["key"])


async def next_map(it: Any, timeout: float = 5.0) -> dict[str, Any]:
    while True:
        msg: dict[str, Any] = await asyncio.wait_for(it.__anext__(), timeout)
        if not msg.get("KeepAlive"):
            return msg


async def until(it: Any, key: str, timeout: float = 5.0) -> dict[str, Any]:
    """The next map that carries ``key`` (self-record updates may come first)."""
    while True:
        msg = await next_map(it, timeout)
        if msg.get(key):
            return msg


async def test_register_and_stream_full_then_delta(tmp_path: Path) -> None:
    async with running_server(tmp_path) as r:
        key = await make_key(r)
        a, b = sim_node(r.url, "alpha"), sim_node(r.url, "beta")
        resp = await a.join(key)
        assert resp["MachineAuthorized"] is True
        sa = a.client.stream(a.map_request(endpoints=("192.0.2.1:41641",)))
        full = await next_map(sa)
        assert full["Node"]["Name"] == "alpha.shoal.internal."
        assert full["Node"]["Addresses"] == ["100.64.0.1/32", "fd7a:115c:a1e0::1/128"]
        assert full["Peers"] == []
        assert full["PacketFilter"][0]["SrcIPs"] == ["*"]
        assert full["DERPMap"] == {"Regions": {}}
        await b.join(key)
        delta = await until(sa, "PeersChanged")
        assert [p["Name"] for p in delta["PeersChanged"]] == ["beta.shoal.internal."]
        assert "Peers" not in delta
        sb = b.client.stream(b.map_request(endpoints=("192.0.2.2:41641",)))
        fb = await next_map(sb)
        assert [p["Endpoints"] for p in fb["Peers"]] == [["192.0.2.1:41641"]]
        # b's connect shows up at a as an online patch
        patch = await until(sa, "PeersChangedPatch")
        assert patch["PeersChangedPatch"][0]["Online"] is True
        await sa.aclose()
        await sb.aclose()
        await a.client.close()
        await b.client.close()


async def test_same_machine_keeps_addresses_and_hostname_collisions(tmp_path: Path) -> None:
    async with running_server(tmp_path) as r:
        key = await make_key(r)
        a = sim_node(r.url, "laptop")
        await a.join(key)
        b, c = sim_node(r.url, "laptop"), sim_node(r.url, "Laptop.local")
        await b.join(key)
        await c.join(key)
        names = sorted(n.given_name for n in r.svc.state.nodes.values())
        assert names == ["laptop", "laptop-1", "laptop-2"]
        ip = r.svc.state.nodes[1].ipv4
        # the same machine registers again with a new node key: same record, same addresses
        from nacl.public import PrivateKey

        a.node = PrivateKey.generate()
        await a.client.register(a.register_request(key))
        assert len(r.svc.state.nodes) == 3
        assert r.svc.state.nodes[1].ipv4 == ip
        for n in (a, b, c):
            await n.client.close()


async def test_bad_auth_keys_get_401_with_reason(tmp_path: Path) -> None:
    async with running_server(tmp_path) as r:
        once = await make_key(r, reusable=False)
        a, b = sim_node(r.url), sim_node(r.url)
        await a.join(once)
        with pytest.raises(ControlError) as e:
            await b.join(once)
        assert e.value.status == 401 and "already been used" in e.value.message
        with pytest.raises(ControlError) as e:
            await b.join("skey-000000000000-" + "0" * 48)
        assert e.value.status == 401 and e.value.message == "invalid auth key"
        with pytest.raises(ControlError) as e:
            await b.join("not-a-key")
        assert e.value.status == 401
        expired = await make_key(r, expiration=0.0)
        with pytest.raises(ControlError) as e:
            await b.join(expired)
        assert "expired" in e.value.message
        revoked = await make_key(r)
        await r.svc.revoke_key(revoked.split("-")[1])
        with pytest.raises(ControlError) as e:
            await b.join(revoked)
        assert "revoked" in e.value.message
        assert len(r.svc.state.nodes) == 1
        await a.client.close()
        await b.client.close()


async def test_malformed_requests_write_nothing(tmp_path: Path) -> None:
    async with running_server(tmp_path) as r:
        key = await make_key(r)
        before = r.svc.state.last_seq
        mkey = os.urandom(32).hex()
        async with httpx.AsyncClient(base_url=r.url) as h:
            for body in (b"", b"garbage", os.urandom(200)):
                resp = await h.post(f"/machine/{mkey}/register", content=body)
                assert resp.status_code == 400, resp.text
            resp = await h.post("/machine/zz/register", content=b"x")
            assert resp.status_code == 400 and "machine key" in resp.text
            resp = await h.post(f"/machine/{mkey}/register", content=b"x" * (wire.MAX_REQUEST + 1))
            assert resp.status_code == 400 and "over" in resp.text
        # a sealed but malformed body
        a = sim_node(r.url)
        await a.client.pin()
        with pytest.raises(ControlError) as e:
            await a.client._post("register", {"NodeKey": "nope"})
        assert e.value.status == 400 and "NodeKey" in e.value.message
        # map from an unknown machine is 401
        with pytest.raises(ControlError) as e:
            await a.client.update(a.map_request(stream=False))
        assert e.value.status == 401
        assert r.svc.state.last_seq == before
        # the server still serves
        assert (await a.join(key))["MachineAuthorized"]
        await a.client.close()


async def test_replayed_request_refused(tmp_path: Path) -> None:
    async with running_server(tmp_path) as r:
        key = await make_key(r)
        a = sim_node(r.url)
        await a.client.pin()
        _rid, sealed, _ = a.client._seal(a.register_request(key).to_json())
        async with httpx.AsyncClient(base_url=r.url) as h:
            first = await h.post(a.client._path("register"), content=sealed)
            again = await h.post(a.client._path("register"), content=sealed)
        assert first.status_code == 200
        assert again.status_code == 400 and "replay" in again.text
        # and a stale timestamp
        a.client.clock = lambda: 1000.0
        with pytest.raises(ControlError) as e:
            await a.client.register(a.register_request(key))
        assert "off the server clock" in e.value.message
        await a.client.close()


async def test_pinned_key_mismatch_is_refused(tmp_path: Path) -> None:
    async with running_server(tmp_path) as r:
        a = sim_node(r.url)
        a.client.server_public = os.urandom(32)
        with pytest.raises(PinMismatch, match="refusing"):
            await a.client.pin()
        await a.client.close()


async def test_interactive_registration_waits_for_approval(tmp_path: Path) -> None:
    async with running_server(tmp_path) as r:
        await r.svc.create_user("bob")
        a = sim_node(r.url, "pending-box")
        await a.client.pin()
        first = await a.client.register(a.register_request())
        assert first["MachineAuthorized"] is False and "/register/" in first["AuthURL"]
        auth_id = first["AuthURL"].rsplit("/", 1)[1]
        async with httpx.AsyncClient(base_url=r.url) as h:
            page = await h.get(f"/register/{auth_id}")
        assert "nodes approve" in page.text
        followup = asyncio.create_task(a.client.register(a.register_request(followup=first["AuthURL"])))
        await asyncio.sleep(0.2)
        assert not followup.done()
        node = await r.logins.approve(auth_id, "bob")
        resp = await asyncio.wait_for(followup, 5)
        assert resp["MachineAuthorized"] is True
        assert node["name"] == "pending-box"
        await a.client.close()


async def test_new_stream_replaces_old_and_delete_removes_peer(tmp_path: Path) -> None:
    async with running_server(tmp_path) as r:
        key = await make_key(r)
        a, b = sim_node(r.url, "a"), sim_node(r.url, "b")
        await a.join(key)
        await b.join(key)
        s1 = a.client.stream(a.map_request())
        await next_map(s1)
        s2 = a.client.stream(a.map_request())
        full = await next_map(s2)
        assert len(full["Peers"]) == 1
        with pytest.raises((ControlError, StopAsyncIteration)):
            await next_map(s1)
        await r.svc.delete_node("b")
        delta = await until(s2, "PeersRemoved")
        assert delta["PeersRemoved"] == [2]
        await s2.aclose()
        await a.client.close()
        await b.client.close()


async def test_ephemeral_node_deleted_after_stream_ends(tmp_path: Path) -> None:
    async with running_server(tmp_path, ephemeral_timeout="300ms") as r:
        key = await make_key(r, ephemeral=True)
        a = sim_node(r.url)
        await a.join(key)
        s = a.client.stream(a.map_request())
        await next_map(s)
        await asyncio.sleep(0.5)
        assert len(r.svc.state.nodes) == 1, "deleted while its stream was open"
        await s.aclose()
        await a.client.close()
        for _ in range(50):
            if not r.svc.state.nodes:
                break
            await asyncio.sleep(0.05)
        assert not r.svc.state.nodes


async def test_logout_and_key_expiry(tmp_path: Path) -> None:
    async with running_server(tmp_path, key_expiry="1s") as r:
        key = await make_key(r)
        a, b = sim_node(r.url, "a"), sim_node(r.url, "b")
        await a.join(key)
        await b.join(key)
        sa = a.client.stream(a.map_request())
        assert len((await next_map(sa))["Peers"]) == 1
        # b's key expires: a's map drops it; b is told to re-authenticate
        for _ in range(60):
            if r.svc.state.nodes[2].expired:
                break
            await asyncio.sleep(0.05)
        msg = await next_map(sa)
        while 2 not in (msg.get("PeersRemoved") or []):
            msg = await next_map(sa)
        resp = await b.client.register(b.register_request())
        assert resp["NodeKeyExpired"] is True
        # b logs out
        out = await b.client.register(b.register_request(expiry=1.0))
        assert out.get("LoggedOut") is True
        assert r.svc.state.nodes[2].logged_out
        await sa.aclose()
        await a.client.close()
        await b.client.close()


async def test_server_key_file_is_private(tmp_path: Path) -> None:
    async with running_server(tmp_path):
        pass
    assert (tmp_path / "server.key").stat().st_mode & 0o777 == 0o600


async def test_client_unreachable_is_clear() -> None:
    c = ControlClient("http://127.0.0.1:9", os.urandom(32), os.urandom(32))
    with pytest.raises(ControlError, match="cannot reach"):
        await c.fetch_server_key()
    await c.close()


def test_simnode_is_usable(tmp_path: Path) -> None:
    n: SimNode = sim_node("http://127.0.0.1:1")
    assert len(n.node_key) == 32
