"""Issue 11.4 and 11.5: the replay guard is bounded, forgets correctly, and survives a restart."""

from __future__ import annotations

import os
from pathlib import Path

import httpx
import pytest
from nacl.public import PrivateKey

from coord import wire
from tests.coord import flood
from tests.coord.harness import free_port

NOW = 1_800_000_000.0


def rid(i: int) -> str:
    return f"{i:032x}"


def test_sec_guard_expiry_does_not_stop_at_a_future_entry() -> None:
    g = wire.ReplayGuard(window=300)
    g.check(rid(0), NOW + 299, NOW)  # from a client whose clock is ahead
    for i in range(1, 1001):
        g.check(rid(i), NOW - 299, NOW)  # from clients whose clocks are behind
    # 400 s later the behind ones cannot be replayed (out of the window) and must be forgotten; the ahead one not
    g.check(rid(5000), NOW + 400, NOW + 400)
    assert len(g) == 2
    with pytest.raises(wire.WireError, match="already seen"):
        g.check(rid(0), NOW + 299, NOW + 400)


def test_sec_guard_refuses_what_it_has_seen_until_it_leaves_the_window() -> None:
    g = wire.ReplayGuard(window=300)
    g.check(rid(1), NOW, NOW)
    for t in (NOW, NOW + 150, NOW + 300):
        with pytest.raises(wire.WireError, match="already seen"):
            g.check(rid(1), NOW, t)
    with pytest.raises(wire.WireError, match="off the server clock"):
        g.check(rid(1), NOW, NOW + 301)


def test_sec_guard_is_bounded_per_source_and_in_total() -> None:
    g = wire.ReplayGuard(window=300, max_ids=100, max_per_source=10)
    for i in range(10):
        g.check(rid(i), NOW, NOW, source="192.0.2.1")
    with pytest.raises(wire.Busy, match=r"192\.0\.2\.1"):
        g.check(rid(10), NOW, NOW, source="192.0.2.1")
    n = 10
    for s in range(2, 11):
        for _ in range(10):
            g.check(rid(n), NOW, NOW, source=f"192.0.2.{s}")
            n += 1
    assert len(g) == 100
    with pytest.raises(wire.Busy, match="in total"):
        g.check(rid(n), NOW, NOW, source="198.51.100.1")
    # known machines are neither capped nor crowded out
    g.check(rid(n), NOW, NOW, source="192.0.2.1", bounded=False)
    with pytest.raises(wire.WireError, match="already seen"):
        g.check(rid(n), NOW, NOW, source="192.0.2.1", bounded=False)
    # once the window has passed, every source gets its share again
    g.check(rid(n + 1), NOW + 301, NOW + 301, source="192.0.2.1")
    assert len(g) == 1 and g.bounded == 1


def test_sec_guard_refuses_requests_sealed_before_it_started() -> None:
    g = wire.ReplayGuard(window=300, not_before=NOW)
    with pytest.raises(wire.WireError, match="before the server started"):
        g.check(rid(1), NOW - 1, NOW + 1)
    g.check(rid(2), NOW + 0.5, NOW + 1)


def sealed_register(server_pub: bytes, auth_key: str) -> tuple[str, bytes]:
    m = PrivateKey.generate()
    box = wire.make_box(bytes(m), server_pub)
    req = wire.RegisterRequest(node_key=os.urandom(32), disco_key=os.urandom(32), auth_key=auth_key,
                               hostinfo=wire.Hostinfo(hostname="captured"))
    import time

    body = wire.seal_request(box, req.to_json(), now=time.time(), request_id=os.urandom(16).hex(),
                             nonce=os.urandom(wire.NONCE_LEN))
    return f"/machine/{bytes(m.public_key).hex()}/register", body


def test_sec_captured_request_not_replayable_after_restart(tmp_path: Path) -> None:
    data, port = tmp_path / "data", free_port()
    server = flood.start(data, port)
    try:
        server.cli("users", "create", "alice")
        key = server.cli("keys", "create", "--user", "alice", "--reusable")["key"]
        path, body = sealed_register(server.public_key(), key)
        assert httpx.post(server.url + path, content=body).status_code == 200
        again = httpx.post(server.url + path, content=body)
        assert again.status_code == 400 and "already seen" in again.text, again.text
    finally:
        server.stop()
    server = flood.start(data, port)
    try:
        replay = httpx.post(server.url + path, content=body)
        print("replay after restart:", replay.status_code, replay.text.strip())
        assert replay.status_code == 400, f"a captured request was accepted after a restart: {replay.text}"
        assert "before the server started" in replay.text, replay.text
        # a request sealed now goes through
        path2, body2 = sealed_register(server.public_key(), key)
        assert httpx.post(server.url + path2, content=body2).status_code == 200
    finally:
        server.stop()
