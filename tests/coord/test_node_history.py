"""``shoal-server nodes history`` (issue 23.4): the pure fold over hand-made records, then the CLI against the log
a real server wrote while a node connected, moved, rotated its key and was renamed."""

from __future__ import annotations

import asyncio
import json
from pathlib import Path
from typing import Any

from coord import events as ev
from coord.nodehistory import fold
from tests.coord.harness import running_server, sim_node
from tests.coord.test_server import next_map
from tests.coord.util import cli

K1, K2 = "nodekey:" + "11" * 32, "nodekey:" + "22" * 32


def t(minute: int) -> str:
    return f"2026-12-01T10:{minute:02d}:00.000000Z"


def registered(nid: int, name: str) -> ev.NodeRegistered:
    return ev.NodeRegistered(nid, "mkey:" + "aa" * 32, K1, "discokey:" + "bb" * 32, 1, (), name, name,
                             "100.64.0.1", "fd7a:115c:a1e0::1", False, None, None)


def records(*items: tuple[int, ev.Event]) -> list[ev.Record]:
    out, prev = [], ev.GENESIS
    for seq, (minute, e) in enumerate(items, 1):
        r = ev.seal_record(prev, seq, t(minute), "system", e)
        out.append(r)
        prev = r.hash
    return out


LOG = records(
    (0, registered(1, "alpha")),
    (0, registered(2, "beta")),  # another node: ignored
    (1, ev.NodeConnected(1)),
    (1, ev.NodeEndpointsChanged(1, ("192.0.2.10:41641",), (1,), 900)),
    (2, ev.NodeConnected(2)),
    (5, ev.NodeDisconnected(1)),
    (7, ev.NodeReauthenticated(1, K2, 1, (), None, None)),
    (7, ev.NodeReauthenticated(1, K2, 1, (), None, None)),
    (8, ev.NodeConnected(1)),
    (8, ev.NodeEndpointsChanged(1, ("192.0.2.10:41641",), (1,), 901)),
    (9, ev.NodeRenamed(1, "gamma", True)),
    (12, ev.NodeDisconnected(1)),
)


def spans(h: Any) -> list[tuple[str, str, str, bool]]:
    return [(i.state, i.start[11:16], i.end[11:16], i.open) for i in h.intervals]


def test_node_history_intervals_rotations_renames() -> None:
    h = fold(1, LOG, now=t(30))
    assert h.name == "gamma" and h.registered == t(0) and h.deleted is None
    assert spans(h) == [("offline", "10:00", "10:01", False), ("online", "10:01", "10:05", False),
                        ("offline", "10:05", "10:08", False), ("online", "10:08", "10:12", False),
                        ("offline", "10:12", "10:30", True)]
    assert h.online_seconds() == 8 * 60
    kinds = [(c.kind, c.text) for c in h.changes]
    assert kinds[0][0] == "registered" and "alpha" in kinds[0][1] and "nodekey:11111111" in kinds[0][1]
    assert ("endpoints", "192.0.2.10:41641; home relay - -> 900") in kinds
    assert ("key_rotated", "nodekey:11111111… -> nodekey:22222222…") in kinds
    assert ("reauthenticated", "same key nodekey:22222222…") in kinds
    assert ("home_relay", "192.0.2.10:41641; home relay 900 -> 901") in kinds
    assert ("renamed", "alpha -> gamma (by admin)") in kinds
    assert all(c.data.get("node_id") == 1 for c in h.changes)
    # JSON shape: what --json prints
    j = h.as_json()
    assert j["online_seconds"] == 480 and j["intervals"][1] == {
        "state": "online", "start": t(1), "end": t(5), "open": False, "seconds": 240.0}


def test_node_history_time_window_clips_and_filters() -> None:
    h = fold(1, LOG, now=t(30), since=t(3), until=t(9))
    assert spans(h) == [("online", "10:03", "10:05", False), ("offline", "10:05", "10:08", False),
                        ("online", "10:08", "10:09", True)]
    assert [c.kind for c in h.changes] == ["key_rotated", "reauthenticated", "home_relay", "renamed"]
    # the key rotation is told against the key the node had before the window
    assert h.changes[0].text.startswith("nodekey:11111111")
    assert h.online_seconds() == 3 * 60


def test_node_history_deleted_node_ends() -> None:
    tail = records((13, ev.NodeConnected(1)), (14, ev.NodeDeleted(1, "admin")))
    # after LOG's seqs (the fold reads order, not hashes)
    log = LOG + [ev.Record(len(LOG) + i + 1, r.time, r.actor, r.event, "", "") for i, r in enumerate(tail)]
    h = fold(1, log, now=t(30))
    assert h.deleted == t(14) and spans(h)[-1] == ("online", "10:13", "10:14", False)
    assert h.changes[-1].kind == "deleted" and h.changes[-1].text == "admin"


async def _server_history(data: Path) -> None:
    async with running_server(data) as r:
        await r.svc.create_user("alice")
        key = (await r.svc.create_key("alice", reusable=True, ephemeral=False, expiration=None, tags=()))["key"]
        n = sim_node(r.url, "alpha")
        await n.join(key)
        it = n.client.stream(n.map_request())
        await next_map(it)
        await asyncio.sleep(0.3)
        await it.aclose()
        deadline = asyncio.get_running_loop().time() + 5
        while r.svc.state.nodes[1].online and asyncio.get_running_loop().time() < deadline:
            await asyncio.sleep(0.05)
        await r.svc.rename_node("alpha", "web1")
        await n.client.close()


def test_node_history_cli_from_a_real_log(tmp_path: Path) -> None:
    data = tmp_path / "data"
    asyncio.run(_server_history(data))
    j = json.loads(cli(data, "nodes", "history", "alpha", "--json").stdout)  # a former name finds it
    assert j["node_id"] == 1 and j["name"] == "web1"
    assert [i["state"] for i in j["intervals"]] == ["offline", "online", "offline"]
    assert j["intervals"][-1]["open"] and 0 < j["intervals"][1]["seconds"] < 10
    kinds = [c["kind"] for c in j["changes"]]
    assert kinds[0] == "registered" and "renamed" in kinds
    text = cli(data, "nodes", "history", "1").stdout
    assert text.startswith("node 1 web1, registered ") and "alpha -> web1 (by admin)" in text
    # a window before the node existed, and bad input
    early = cli(data, "nodes", "history", "1", "--until", "2000-01-01T00:00:00Z", check=False)
    assert early.returncode == 1 and "no node 1" in early.stderr
    bad = cli(data, "nodes", "history", "1", "--since", "yesterday", check=False)
    assert bad.returncode == 1 and "--since: 'yesterday' is not a time" in bad.stderr
    missing = cli(data, "nodes", "history", "nosuch", check=False)
    assert missing.returncode == 1 and "no node 'nosuch'" in missing.stderr
