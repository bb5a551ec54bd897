"""API v2 webhook endpoints (raw HTTP, httpx), the new webhook types, and acl/preview?type=ipport."""

from __future__ import annotations

import asyncio
import datetime
import json
import sqlite3
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import httpx
import pytest

from coord import events as ev
from coord import webhooks as core
from coord.state import State
from coord.store import Filter
from tests.coord.apiv2_util import admin, tailscale_client, tls_server, token
from tests.coord.harness import Running, running_server, sim_node
from tests.coord.webhook_receiver import Path as Endpoint
from tests.coord.webhook_receiver import Receiver

pytestmark = pytest.mark.anyio
T = "/api/v2/tailnet/-"


def bearer(tok: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {tok}"}


async def until(pred: Callable[[], bool], timeout: float = 15.0) -> None:
    end = time.monotonic() + timeout
    while not pred():
        assert time.monotonic() < end, "timed out"
        await asyncio.sleep(0.05)


async def events_of(srv: Running) -> list[ev.Record]:
    return [r async for r in srv.svc.store.read(Filter())]


async def test_apiv2_webhooks_crud_rotate_and_test(tmp_path: Path) -> None:
    recv = Receiver()
    try:
        async with running_server(tmp_path) as srv, httpx.AsyncClient(base_url=srv.url) as http:
            tok = await token(srv, "ops@example.com", "network-admin")
            h = bearer(tok)
            r = await http.post(f"{T}/webhooks", headers=h, json={
                "endpointUrl": recv.url("/a"), "providerType": "", "subscriptions": ["userCreated"]})
            assert r.status_code == 200, r.text
            made = r.json()
            eid, secret = made["endpointId"], made["secret"]
            assert secret.startswith("whsec-") and made["subscriptions"] == ["userCreated"]
            assert made["creatorLoginName"] == "ops@example.com" and made["created"]
            recv.paths["/a"] = Endpoint(secret=secret)
            # the secret is shown once: neither the list nor the get has it, nor any event
            listed = (await http.get(f"{T}/webhooks", headers=h)).json()["webhooks"]
            assert [w["endpointId"] for w in listed] == [eid] and "secret" not in listed[0]
            got = (await http.get(f"/api/v2/webhooks/{eid}", headers=h)).json()
            assert "secret" not in got and got["endpointUrl"] == recv.url("/a")
            # the same command as the CLI: `webhooks list` sees it, and the log's actor is the credential
            assert [e["id"] for e in await admin(srv, "webhooks.list")] == [eid]
            recs = await events_of(srv)
            added = [x for x in recs if isinstance(x.event, ev.WebhookEndpointAdded)]
            assert added[-1].actor == f"api:{tok.split('-')[2]}"
            # delivery with the secret given at creation
            await admin(srv, "users.create", name="new@example.com")
            await until(lambda: any(e["type"] == "userCreated" for x in recv.of("/a") for e in x.events))
            # PATCH the subscriptions: userRoleUpdated now, userCreated no longer
            r = await http.patch(f"/api/v2/webhooks/{eid}", headers=h, json={"subscriptions": ["userRoleUpdated"]})
            assert r.status_code == 200 and r.json()["subscriptions"] == ["userRoleUpdated"], r.text
            assert srv.svc.state.webhooks[eid][1] == ("userRoleUpdated",)
            r = await http.patch(f"/api/v2/webhooks/{eid}", headers=h, json={"subscriptions": ["nope"]})
            assert r.status_code == 400 and "nope" in r.json()["message"]
            r = await http.patch(f"/api/v2/webhooks/{eid}", headers=h, json={"subscriptions": []})
            assert r.status_code == 400 and "subscriptions" in r.json()["message"]
            # rotate: a new secret, once; the old one signs nothing after
            r = await http.post(f"/api/v2/webhooks/{eid}/rotate", headers=h)
            assert r.status_code == 200, r.text
            new = r.json()["secret"]
            assert new != secret and new.startswith("whsec-")
            n_before = len(recv.of("/a"))
            await admin(srv, "users.create", name="other@example.com")
            await admin(srv, "users.role", user="other@example.com", role="auditor")
            await until(lambda: len(recv.refused) > 0)  # signed with the new secret: the receiver refuses it
            assert len(recv.of("/a")) == n_before
            recv.paths["/a"].secret = new
            await until(lambda: any(e["type"] == "userRoleUpdated" for x in recv.of("/a") for e in x.events))
            hit = next(e for x in recv.of("/a") for e in x.events if e["type"] == "userRoleUpdated")
            assert hit["data"]["user"] == "other@example.com" and hit["data"]["newRoles"] == ["auditor"]
            assert not any(e["type"] == "userCreated" and e["data"]["user"] == "other@example.com"
                           for x in recv.of("/a") for e in x.events)
            # test: 202, and a signed "test" event arrives
            r = await http.post(f"/api/v2/webhooks/{eid}/test", headers=h)
            assert r.status_code == 202
            assert any(e["type"] == "test" for x in recv.of("/a") for e in x.events)
            # no secret in any event
            for x in await events_of(srv):
                assert secret not in json.dumps(x.event.data()) and new not in json.dumps(x.event.data())
            # bad bodies name the field; unknown ids are 404
            r = await http.post(f"{T}/webhooks", headers=h, json={"endpointUrl": "ftp://x", "subscriptions": ["x"]})
            assert r.status_code == 400 and "endpointUrl" in r.json()["message"]
            r = await http.post(f"{T}/webhooks", headers=h, json={"endpointUrl": recv.url("/b")})
            assert r.status_code == 400 and "subscriptions" in r.json()["message"]
            for method in ("GET", "DELETE", "PATCH"):
                r = await http.request(method, "/api/v2/webhooks/nothere", headers=h, json={"subscriptions": ["x"]})
                assert r.status_code == 404, (method, r.text)
            assert (await http.post("/api/v2/webhooks/nothere/rotate", headers=h)).status_code == 404
            # DELETE
            assert (await http.delete(f"/api/v2/webhooks/{eid}", headers=h)).status_code == 200
            assert eid not in srv.svc.state.webhooks
            assert (await http.get(f"{T}/webhooks", headers=h)).json() == {"webhooks": []}
    finally:
        recv.close()


async def test_apiv2_webhooks_roles(tmp_path: Path) -> None:
    async with running_server(tmp_path) as srv, httpx.AsyncClient(base_url=srv.url) as http:
        body = {"endpointUrl": "http://127.0.0.1:9/x", "subscriptions": ["nodeCreated"]}
        for role in ("owner", "admin", "network-admin", "it-admin"):
            tok = await token(srv, f"{role}@example.com", role)
            r = await http.post(f"{T}/webhooks", headers=bearer(tok), json=body)
            assert r.status_code == 200, (role, r.text)
            assert (await http.get(f"{T}/webhooks", headers=bearer(tok))).status_code == 200
        n = len(srv.svc.state.webhooks)
        for role in ("auditor", "billing-admin", "member"):
            tok = await token(srv, f"{role}@example.com", role)
            calls: list[tuple[str, dict[str, Any]]] = [("GET", {}), ("POST", {"json": body})]
            for method, kw in calls:
                r = await http.request(method, f"{T}/webhooks", headers=bearer(tok), **kw)
                assert r.status_code == 403 and "network-admin" in r.json()["message"], (role, method)
        assert len(srv.svc.state.webhooks) == n
        # an OAuth client needs the webhooks scope (webhooks:read reads only)
        for scopes, read, write in ((["webhooks:read"], 200, 403), (["webhooks"], 200, 200), (["dns"], 403, 403)):
            c = await admin(srv, "tokens.client", user="owner@example.com", scopes=scopes)
            r = await http.post("/api/v2/oauth/token", data={"client_id": c["client_id"],
                                                              "client_secret": c["client_secret"]})
            assert r.status_code == 200, r.text
            at = bearer(r.json()["access_token"])
            assert (await http.get(f"{T}/webhooks", headers=at)).status_code == read, scopes
            assert (await http.post(f"{T}/webhooks", headers=at, json=body)).status_code == write, scopes


def test_user_role_updated_rendered() -> None:
    st = State()
    rec = ev.Record(seq=5, time="2026-12-02T18:00:00.000000Z", actor="admin", event=ev.UserRoleSet(3, "auditor"),
                    prev_hash="", hash="")
    assert core.types_of(rec) == ["userRoleUpdated"]
    # the user is gone from the state: the name comes from the log
    assert core.deleted_names([rec], st) == {("user", 3)}
    (out,) = core.render([rec], ["userRoleUpdated"], "t.example", st, {("user", 3): "bob@example.com"})
    assert out["message"] == "User bob@example.com role updated to auditor"
    assert out["data"]["newRoles"] == ["auditor"] and out["data"]["userID"] == "3"
    assert core.render([rec], ["userCreated"], "t.example", st) == []


POLICY = json.dumps({
    "groups": {"group:ops": ["alice@example.com"]},
    "tagOwners": {"tag:web": ["alice@example.com"]},
    "acls": [
        {"action": "accept", "src": ["group:ops"], "dst": ["tag:web:22"]},
        {"action": "accept", "src": ["*"], "dst": ["tag:web:443"]},
        {"action": "accept", "src": ["bob@example.com"], "dst": ["alice@example.com:*"]},
    ],
})


async def test_apiv2_acl_preview_ipport(tmp_path: Path) -> None:
    async with running_server(tmp_path) as srv, httpx.AsyncClient(base_url=srv.url) as http:
        tok = await token(srv, "alice@example.com", "admin")
        await admin(srv, "policy.set", text=POLICY)
        key = await admin(srv, "keys.create", user="alice@example.com", tags=["tag:web"])
        node = sim_node(srv.url, "web")
        try:
            await node.join(str(key["key"]))
        finally:
            await node.client.close()
        web = srv.svc.state.nodes[max(srv.svc.state.nodes)]
        h = bearer(tok)

        async def preview(who: str) -> httpx.Response:
            return await http.post(f"{T}/acl/preview", params={"type": "ipport", "previewFor": who}, headers=h,
                                   content=POLICY)

        r = await preview(f"{web.ipv4}:22")
        assert r.status_code == 200, r.text
        assert r.json()["matches"] == [{"users": ["group:ops"], "ports": ["tag:web:22"], "lineNumber": 0}]
        got = (await preview(f"{web.ipv4}:443")).json()["matches"]
        assert [m["users"] for m in got] == [["*"]]
        assert (await preview(f"{web.ipv4}:80")).json()["matches"] == []
        assert (await preview(f"[{web.ipv6}]:22")).json()["matches"][0]["users"] == ["group:ops"]
        # an address no node has: no tag, no owner
        assert (await preview("100.100.1.1:22")).json()["matches"] == []
        for bad in ("100.64.0.1", "100.64.0.1:0", "nohost:22", "100.64.0.0/10:22"):
            r = await preview(bad)
            assert r.status_code == 400 and "previewFor" in r.json()["message"], bad
        r = await http.post(f"{T}/acl/preview", params={"type": "x", "previewFor": "a"}, headers=h, content=POLICY)
        assert r.status_code == 400 and "ipport" in r.json()["message"]


async def test_apiv2_client_webhooks_and_audit_filters(tmp_path: Path) -> None:
    """The PyPI client's webhook methods, and configuration_audit_logs(actors=, targets=)."""
    async with tls_server(tmp_path) as (srv, ca):
        tok = await token(srv, "alice@example.com", "owner")
        await admin(srv, "users.create", name="bob@example.com")
        async with tailscale_client(srv, ca, api_key=tok) as ts:
            made = await ts.create_webhook(endpoint_url="http://127.0.0.1:9/a", subscriptions=["nodeCreated"])
            assert made.secret and made.secret.startswith("whsec-") and made.created is not None
            assert made.creator_login_name == "alice@example.com"
            assert [w.endpoint_id for w in await ts.webhooks()] == [made.endpoint_id]
            assert (await ts.webhook(made.endpoint_id)).secret is None
            up = await ts.update_webhook(made.endpoint_id, subscriptions=["nodeDeleted", "userRoleUpdated"])
            assert up.subscriptions == ["nodeDeleted", "userRoleUpdated"]
            assert up.created == made.created and up.last_modified is not None and made.created is not None
            assert up.last_modified > made.created
            rotated = await ts.rotate_webhook_secret(made.endpoint_id)
            assert rotated.secret and rotated.secret != made.secret
            await ts.test_webhook(made.endpoint_id)  # 202, though nothing listens on port 9
            await ts.set_user_role(str(srv.svc.state.user_by_name("bob@example.com").id),  # type: ignore[union-attr]
                                   role="auditor")
            await ts.delete_webhook(made.endpoint_id)
            assert await ts.webhooks() == []
            now = datetime.datetime.now(datetime.UTC)
            start, end = now - datetime.timedelta(hours=1), now + datetime.timedelta(minutes=1)

            async def audit(actors: list[str] | None = None, targets: list[str] | None = None) -> list[Any]:
                return list(await ts.configuration_audit_logs(start=start, end=end, actors=actors,
                                                              targets=targets))

            everything = await audit()
            mine = await audit(actors=["~alice"])
            cid = tok.split("-")[2]
            assert mine and all(log.actor.actor_id == f"api:{cid}" for log in mine)
            assert len(mine) < len(everything)  # users.create etc. were the CLI's ("admin")
            by_cli = await audit(actors=["admin"])
            assert by_cli and all(log.actor.actor_id == "admin" for log in by_cli)
            assert await audit(actors=["~nobody"]) == []
            bob = await audit(targets=["bob@"])
            assert bob and {log.target.property for log in bob} == {"UserCreated", "UserRoleSet"}
            hooks = await audit(targets=["Webhook"])
            assert {log.target.property for log in hooks} == {"WebhookEndpointAdded", "WebhookEndpointUpdated",
                                                             "WebhookEndpointRemoved"}


def test_webhook_cli_update_and_rotate(tmp_path: Path) -> None:
    """The CLI has the API's two new commands: `webhooks update --events` and `webhooks rotate`."""
    from tests.coord.util import cli, cli_json

    data = tmp_path / "data"
    added = cli_json(data, "webhooks", "add", "https://hooks.example/x", "--events", "nodeCreated")
    out = cli_json(data, "webhooks", "update", added["id"], "--events", "userRoleUpdated,nodeDeleted")
    assert out["events"] == ["userRoleUpdated", "nodeDeleted"]
    p = cli(data, "webhooks", "update", added["id"], "--events", "nodeExploded", check=False)
    assert p.returncode != 0 and "unknown type(s) nodeExploded" in p.stderr
    p = cli(data, "webhooks", "rotate", added["id"])
    new = p.stdout.split()[0]
    assert new.startswith("whsec-") and new != added["secret"] and "shown once" in p.stdout
    db = sqlite3.connect(data / "shoal.db")
    try:
        assert db.execute("SELECT secret FROM webhook_secrets").fetchall() == [(new,)]
    finally:
        db.close()
    p = cli(data, "webhooks", "rotate", "nope", check=False)
    assert p.returncode != 0 and "no webhook endpoint 'nope'" in p.stderr
