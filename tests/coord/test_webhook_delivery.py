"""Webhook delivery on a real server (``create_app`` on a data dir) to a real receiver on loopback: signatures, order,
retries signed afresh, a dead endpoint beside a live one, the give-up at the end of the window, and no secret in
any event."""

from __future__ import annotations

import asyncio
import base64
import hashlib
import hmac
import os
import sqlite3
import stat
import time
from collections.abc import AsyncIterator, Callable
from pathlib import Path
from typing import Any

import httpx
import pytest

from coord import admin
from coord.app import App, create_app
from coord.config import load
from tests.coord.harness import free_port
from tests.coord.webhook_receiver import Path as Endpoint
from tests.coord.webhook_receiver import Receiver

pytestmark = pytest.mark.anyio


@pytest.fixture
async def app(tmp_path: Path) -> AsyncIterator[App]:
    cfg = load(None, env={}, overrides={"data_dir": str(tmp_path / "data"), "derp": False, "stun_listen": ""})
    a = await create_app(cfg, serve=False)
    a.webhooks.poll = 0.05
    a.webhooks.retry_base = 0.3
    await a.webhooks.start()
    try:
        yield a
    finally:
        await a.close()


@pytest.fixture
def receiver() -> AsyncIterator[Receiver]:
    r = Receiver()
    yield r  # type: ignore[misc]
    r.close()


async def until(pred: Callable[[], bool], timeout: float = 15.0) -> None:
    deadline = time.monotonic() + timeout
    while not pred():
        if time.monotonic() > deadline:
            raise AssertionError("timed out")
        await asyncio.sleep(0.02)


async def rows_until(app: App, eid: str, pred: Callable[[list[dict[str, Any]]], bool],
                     timeout: float = 10.0) -> list[dict[str, Any]]:
    deadline = time.monotonic() + timeout
    while not pred(rows := await app.webhooks.deliveries(eid)):
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out; deliveries {rows}")
        await asyncio.sleep(0.05)
    return rows


async def add(app: App, receiver: Receiver, path: str, events: list[str], **kw: Any) -> dict[str, Any]:
    out: dict[str, Any] = await admin.run(app.admin, "webhooks.add", {"url": receiver.url(path), "events": events})
    receiver.paths[path] = Endpoint(secret=out["secret"], **kw)
    return out


def test_webhook_receiver_rejects_stale_and_forged_signatures(receiver: Receiver) -> None:
    receiver.paths["/r"] = Endpoint(secret="whsec-test")
    body = b'[{"type":"test","data":{"seq":1}}]'

    def header(t: int, secret: str = "whsec-test") -> str:
        return f"t={t},v1={hmac.new(secret.encode(), f'{t}.'.encode() + body, hashlib.sha256).hexdigest()}"

    now = int(time.time())
    codes = [httpx.post(receiver.url("/r"), content=body, headers={"Tailscale-Webhook-Signature": h}).status_code
             for h in (header(now), header(now - 301), header(now, "other"), "t=abc")]
    assert codes == [200, 400, 400, 400]


async def test_webhook_delivers_signed_events_in_order_and_retries_re_sign(app: App, receiver: Receiver) -> None:
    app.webhooks.retry_base = 1.0  # retries 1 s and 2 s later: their t (whole seconds) must differ
    app.webhooks.rand = lambda: 0.5  # no jitter
    ep = await add(app, receiver, "/a", ["userCreated", "userDeleted", "policyUpdate"], fail=2)
    names = [f"u{i}" for i in range(6)]
    for n in names:
        await app.service.create_user(n)
    await app.service.delete_user("u0")
    await until(lambda: any(h.code == 200 for h in receiver.of("/a")) and sum(
        len(h.events) for h in receiver.of("/a") if h.code == 200) >= 7)
    hits = receiver.of("/a")
    assert not receiver.refused
    # The first two attempts were answered 500: the retries carry the same events, each signed afresh.
    assert [h.code for h in hits[:3]] == [500, 500, 200]
    assert hits[0].events == hits[1].events == hits[2].events
    assert len({h.signature for h in hits[:3]}) == 3 and hits[0].t < hits[1].t < hits[2].t
    assert all(abs(h.t - h.wall) <= 1 for h in hits), "each attempt is signed when it is sent"
    delivered = [e for h in hits if h.code == 200 for e in h.events]
    assert [e["type"] for e in delivered] == ["userCreated"] * 6 + ["userDeleted"]
    assert [e["data"]["user"] for e in delivered] == [*names, "u0"]
    seqs = [e["data"]["seq"] for e in delivered]
    assert seqs == sorted(seqs) and len(set(seqs)) == 7
    assert set(delivered[0]) == {"timestamp", "version", "type", "tailnet", "message", "data"}
    await until(lambda: app.service.committed[0] == seqs[-1])
    (row,) = await admin.run(app.admin, "webhooks.list", {})
    assert row["id"] == ep["id"] and row["cursor"] == seqs[-1] and row["last"]["outcome"] == "delivered"
    rows = await admin.run(app.admin, "webhooks.deliveries", {"endpoint": ep["id"]})
    assert [r["outcome"] for r in rows[:3]] == ["failed", "failed", "delivered"]
    sample = app.metrics.registry.get_sample_value
    assert sample("shoal_webhook_deliveries_total", {"outcome": "failed"}) == 2
    assert sample("shoal_webhook_deliveries_total", {"outcome": "undeliverable"}) == 0
    assert sample("shoal_webhook_deliveries_total", {"outcome": "delivered"}) >= 1
    assert sample("shoal_webhook_events_delivered_total") == 7
    assert rows[0]["status"] == 500 and rows[2]["attempt"] == 3
    tested = await admin.run(app.admin, "webhooks.test", {"endpoint": ep["id"]})
    assert tested["ok"] and receiver.of("/a")[-1].events[0]["type"] == "test"


async def test_webhook_dead_endpoint_does_not_hold_up_others(app: App, receiver: Receiver) -> None:
    dead = await admin.run(app.admin, "webhooks.add",
                           {"url": f"http://127.0.0.1:{free_port()}/gone", "events": ["userCreated"]})
    await add(app, receiver, "/live", ["userCreated"])
    started = time.monotonic()
    for i in range(5):
        await app.service.create_user(f"u{i}")
    await until(lambda: sum(len(h.events) for h in receiver.of("/live")) == 5, timeout=5)
    assert time.monotonic() - started < 3
    rows = await rows_until(app, dead["id"], lambda rows: bool(rows))
    assert rows and all(r["outcome"] == "failed" and r["status"] is None for r in rows)
    assert "ConnectError" in rows[0]["error"]
    listed = {r["id"]: r for r in await admin.run(app.admin, "webhooks.list", {})}
    assert listed[dead["id"]]["behind"] >= 5 and listed[dead["id"]]["last"]["outcome"] == "failed"


async def test_webhook_gives_up_after_the_window_and_moves_on(app: App, receiver: Receiver) -> None:
    app.webhooks.max_age = 1.0
    await app.service.create_user("before")  # before the endpoint: never sent to it
    ep = await add(app, receiver, "/w", ["userCreated"])
    refused_seq = app.service.committed[0] + 1
    receiver.paths["/w"].refuse_seq = refused_seq
    await app.service.create_user("refused")
    assert app.service.committed[0] == refused_seq
    await rows_until(app, ep["id"], lambda rows: any(r["outcome"] == "undeliverable" for r in rows))
    await app.service.create_user("after")
    rows = await rows_until(app, ep["id"], lambda rows: rows[-1]["outcome"] == "delivered")
    outcomes = [(r["first_seq"], r["outcome"]) for r in rows]
    assert (refused_seq, "undeliverable") in outcomes
    assert outcomes[-1] == (refused_seq + 1, "delivered")
    assert all(h.seqs == [refused_seq] for h in receiver.of("/w") if h.code == 500)
    assert [h.seqs for h in receiver.of("/w") if h.code == 200] == [[refused_seq + 1]]


async def test_webhook_no_secret_in_any_event(app: App, receiver: Receiver) -> None:
    eps = [await add(app, receiver, f"/s{i}", []) for i in range(3)]
    await admin.run(app.admin, "webhooks.remove", {"endpoint": eps[0]["id"]})
    await app.service.create_user("alice")
    await until(lambda: bool(receiver.of("/s1")) and bool(receiver.of("/s2")))
    db = app.config.data_path / "shoal.db"
    assert stat.S_IMODE(os.stat(db).st_mode) == 0o600
    with sqlite3.connect(db) as c:
        texts = [" ".join(map(str, row)) for row in c.execute("SELECT * FROM events")]
        stored = dict(c.execute("SELECT endpoint_id, secret FROM webhook_secrets").fetchall())
    types = [t.split(" ")[3] for t in texts]
    assert types.count("WebhookEndpointAdded") == 3 and types.count("WebhookEndpointRemoved") == 1
    # The removed endpoint's secret is gone; the others are in their own table.
    assert stored == {e["id"]: e["secret"] for e in eps[1:]}
    log = "\n".join(texts) + "".join(h.signature + str(h.events) for h in receiver.hits)
    for e in eps:
        s = e["secret"]
        raw = s.removeprefix("whsec-")
        forms = [s, raw, s[:12], raw[:12], hashlib.sha256(s.encode()).hexdigest(),
                 hashlib.sha256(raw.encode()).hexdigest(), base64.b64encode(s.encode()).decode()[:16],
                 base64.b64encode(bytes.fromhex(raw)).decode()[:16]]
        assert not [f for f in forms if f in log], f"a form of endpoint {e['id']}'s secret is in the log"
        assert e["id"] in log


async def test_webhook_node_key_expiring_in_one_day_from_the_expiry_loop(app: App, receiver: Receiver) -> None:
    from coord import events as ev
    from coord.service import Actor

    await add(app, receiver, "/x", ["nodeCreated", "nodeKeyExpiringInOneDay", "nodeKeyExpired"])
    await app.service.create_user("alice")
    now = app.service.clock()
    reg = ev.NodeRegistered(1, "mkey:" + "1" * 64, "nodekey:" + "2" * 64, "discokey:" + "3" * 64, 1, (), "laptop",
                            "laptop", "100.64.0.1", "fd7a:115c:a1e0::1", False, now + 3600, None)
    await app.service.execute(lambda s: [reg], Actor.ADMIN)
    await app.lifecycle.expiry_sweep()
    await app.lifecycle.expiry_sweep()  # once per expiry, however often the loop runs
    await app.service.set_node_expiry("laptop", now + 7200)  # a new expiry is warned of again
    await app.lifecycle.expiry_sweep()
    await until(lambda: sum(len(h.events) for h in receiver.of("/x")) >= 3)
    events = [e for h in receiver.of("/x") for e in h.events]
    got = [(e["type"], e["data"].get("expiry")) for e in events]
    assert got == [("nodeCreated", None), ("nodeKeyExpiringInOneDay", ev.rfc3339(now + 3600)),
                   ("nodeKeyExpiringInOneDay", ev.rfc3339(now + 7200))]
    assert events[1]["message"] == "Node laptop key is expiring in one day"


def test_webhook_cli_refuses_bad_input_precisely(tmp_path: Path) -> None:
    from tests.coord.util import cli, cli_json

    data = tmp_path / "data"
    for args, want in (
        (("add", "ftp://hooks.example/x"), "url: 'ftp://hooks.example/x' is not an http:// or https:// URL"),
        (("add", "https://hooks.example/x", "--events", "nodeCreated,nodeExploded"),
         "events: unknown type(s) nodeExploded"),
        (("remove", "nope"), "no webhook endpoint 'nope'"),
        (("test", "nope"), "no webhook endpoint 'nope'"),
    ):
        p = cli(data, "webhooks", *args, check=False)
        assert p.returncode != 0 and want in p.stderr, p.stderr
    # Without a running server the command runs in-process on the data dir: the endpoint waits for the next start.
    added = cli_json(data, "webhooks", "add", "https://hooks.example/x", "--events", "nodeCreated")
    (row,) = cli_json(data, "webhooks", "list")
    assert row["id"] == added["id"] and row["events"] == ["nodeCreated"] and row["cursor"] == 1
    assert row["behind"] == 0 and row["last"] is None
    assert "no deliveries" in cli(data, "webhooks", "deliveries").stdout
