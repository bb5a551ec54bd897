"""Issue 11.4: what an unauthenticated caller can make the server hold is bounded.

10,000 junk registrations from 127.0.0.2-127.0.0.254 against a real server: its RSS grows by less than 150 MB,
a real node registers from 127.0.0.1 during the flood, and the server counts what it refused. The 100,000-request
version is scripts/bench/flood.
"""

from __future__ import annotations

import asyncio
import json
import urllib.request
from pathlib import Path

from tests.coord import flood
from tests.coord.harness import free_port

REQUESTS = 10_000
RSS_LIMIT_MB = 150.0


def test_sec_flood_junk_registrations_are_bounded(tmp_path: Path) -> None:
    server = flood.start(tmp_path / "data", free_port())
    try:
        server.cli("users", "create", "alice")
        key = server.cli("keys", "create", "--user", "alice", "--reusable")["key"]
        r = asyncio.run(flood.flood(server, key, REQUESTS, rss_limit_mb=RSS_LIMIT_MB))
        info = server.cli("info")
        with urllib.request.urlopen(f"{server.url}/health", timeout=5) as resp:
            health = json.loads(resp.read())
        pending = server.cli("nodes", "pending")
    finally:
        server.stop()
    summary = (f"{r.requests} requests in {r.seconds:.1f}s, statuses {dict(r.statuses)}, RSS "
               f"{r.rss_before_mb:.0f} -> {r.rss_max_mb:.0f} MB, aborted {r.aborted!r}")
    print(summary)
    assert not r.aborted, summary
    assert r.requests == REQUESTS, summary
    assert r.rss_growth_mb < RSS_LIMIT_MB, summary
    assert r.real_login_ok, f"the real node could not register during the flood: {r.real_login_error}"
    assert r.interactive_ok, f"an interactive login from 127.0.0.1 was refused: {r.real_login_error}"
    refused = info["Refused"]
    assert refused["total"] > 0 and refused["total"] == health["refused"], (refused, health)
    # every request was answered: accepted ones wait for approval, the rest are counted refusals
    assert r.statuses[0] == 0, summary
    # (which limit refuses depends on speed: a slow flood finds the rate buckets refilled and meets the pending cap)
    reasons = ("rate", "pending_source", "pending_total", "replay_guard")
    assert r.statuses[429] + r.statuses[503] == sum(refused.get(k, 0) for k in reasons), (summary, refused)
    # every source holds at most its share of the pending registrations (plus the real interactive one)
    assert len(pending) <= len(flood.SOURCES) * info["Limits"]["PendingPerSource"] + 1, len(pending)
