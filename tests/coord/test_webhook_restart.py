"""Webhook delivery across a crash: a ``serve`` subprocess is SIGKILLed while a delivery is in flight (the
receiver holds the request), restarted on the same data dir, and every event still reaches each endpoint, at least
once and in log order, the unacknowledged batch again from its first event."""

from __future__ import annotations

import json
import signal
import sqlite3
import time
from pathlib import Path

import httpx

from tests.coord.harness import free_port
from tests.coord.test_dns_cli import start, stop
from tests.coord.util import cli, cli_json
from tests.coord.webhook_receiver import Hit, Receiver
from tests.coord.webhook_receiver import Path as Endpoint

USERS = 30


def admin(data: Path, command: str, args: dict[str, object]) -> None:
    with httpx.Client(transport=httpx.HTTPTransport(uds=str(data / "admin.sock")), timeout=30) as c:
        r = c.post("http://shoal/admin", json={"command": command, "args": args})
        assert r.status_code == 200, r.text


def wait(pred: object, timeout: float, what: str) -> None:
    deadline = time.monotonic() + timeout
    while not pred():  # type: ignore[operator]
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {what}")
        time.sleep(0.01)


def delivered(hits: list[Hit]) -> list[int]:
    """Seqs in the order they arrived, answered 2xx or not (an answer the server never read counts as sent)."""
    return [s for h in hits for s in h.seqs]


def check_order(hits: list[Hit], want: list[int]) -> None:
    seqs = delivered(hits)
    assert set(want) <= set(seqs), f"missing: {sorted(set(want) - set(seqs))}"
    # Each request is a run of the log in order; across requests, first occurrences come in log order.
    for h in hits:
        assert h.seqs == sorted(h.seqs)
    first = list(dict.fromkeys(seqs))
    assert first == sorted(first), f"out of order: {seqs}"


def test_webhook_delivery_survives_sigkill_mid_delivery(tmp_path: Path) -> None:
    data, port = tmp_path / "data", free_port()
    config = tmp_path / "shoal.toml"
    config.write_text("")
    receiver = Receiver()
    server = start(data, port, config)
    try:
        a = cli_json(data, "webhooks", "add", receiver.url("/a"), "--events", "userCreated")
        b = cli_json(data, "webhooks", "add", receiver.url("/b"), "--events", "userCreated,userDeleted")
        # /a answers its first request and holds the second unanswered: the kill lands mid-delivery.
        receiver.paths["/a"] = Endpoint(secret=a["secret"], hold_after=1)
        receiver.paths["/b"] = Endpoint(secret=b["secret"], delay=0.1)
        for i in range(USERS):
            admin(data, "users.create", {"name": f"u{i}"})
        wait(lambda: len(receiver.of("/a")) >= 2, 20, "a second request to /a")
        server.send_signal(signal.SIGKILL)
        server.wait(10)
        logged = server.stderr.read().decode() if server.stderr else ""
        killed_in_flight = receiver.of("/a")[-1].seqs
        before = len(receiver.of("/a"))
        receiver.paths["/a"].hold_after = None
        receiver.paths["/a"].release.set()

        with sqlite3.connect(data / "shoal.db") as c:
            want = [r[0] for r in c.execute("SELECT seq FROM events WHERE type = 'UserCreated' ORDER BY seq")]
            cursor_a = c.execute("SELECT seq FROM webhook_cursors WHERE endpoint_id = ?", (a["id"],)).fetchone()[0]
        assert len(want) == USERS
        # The cursor was written only for what was answered 2xx: it is before the batch in flight.
        assert cursor_a < killed_in_flight[0]

        server = start(data, port, config)
        admin(data, "users.delete", {"user": "u0"})
        wait(lambda: set(want) <= set(delivered(receiver.of("/a"))), 30, "every event at /a")
        wait(lambda: len(set(delivered(receiver.of("/b")))) == USERS + 1, 30, "every event at /b")
        hits_a, hits_b = receiver.of("/a"), receiver.of("/b")
        print("\n/a requests (seqs):", json.dumps([h.seqs for h in hits_a]))
        print("/b requests (seqs):", json.dumps([h.seqs for h in hits_b]))
        print(f"/a cursor at kill: {cursor_a}; batch in flight at kill: {killed_in_flight}")
        check_order(hits_a, want)
        check_order(hits_b, [*want, max(want) + 1])
        assert not receiver.refused
        # After the restart /a starts again at the batch that was in flight: at least once, nothing skipped.
        assert hits_a[before].seqs[0] == killed_in_flight[0] == cursor_a + 1
        assert hits_b[-1].events[-1]["type"] == "userDeleted" and hits_b[-1].events[-1]["data"]["user"] == "u0"
        listed = {r["id"]: r for r in cli_json(data, "webhooks", "list")}
        wait(lambda: all(r["behind"] == 0 for r in cli_json(data, "webhooks", "list")), 10, "cursors at the end")
        assert set(listed) == {a["id"], b["id"]}
        text = cli(data, "webhooks", "deliveries", a["id"]).stdout
        assert text.splitlines()[0].split() == ["ENDPOINT", "EVENTS", "ATTEMPT", "TIME", "STATUS", "OUTCOME", "ERROR"]
        assert f"{cursor_a + 1}-" in text and "delivered" in text
        stop(server)
        logged += server.stderr.read().decode() if server.stderr else ""
        assert a["secret"] not in logged and b["secret"] not in logged
    finally:
        if server.poll() is None:
            stop(server)
        receiver.close()
