"""Checkpoints, monotonic time, ``--at``/``--at-seq``, supervised loops and expired nodes, end to end.

A small history is made by the real server (``create_app`` with an injected clock that steps back), then the CLI
runs as a subprocess on its data dir: ``info``, ``events checkpoint`` (one line, nothing appended), ``events verify
--checkpoint`` catching a truncated tail and a whole table rewritten with a fresh, valid chain.
"""

from __future__ import annotations

import asyncio
import itertools
import json
import logging
import sqlite3
import stat
from pathlib import Path
from typing import Any

import pytest

from coord import events as ev
from coord import wire
from coord.app import create_app
from coord.config import load
from coord.errors import Unauthorized
from coord.logins import node_for_map
from tests.coord.util import cli, cli_json

START = 1_800_000_000.0


class Clock:
    def __init__(self) -> None:
        self.now = START

    def __call__(self) -> float:
        return self.now


def config(data: Path, **kw: str) -> Any:
    return load(None, env={}, overrides={"data_dir": str(data), "derp": False, "stun_listen": "", **kw})


async def make_history(data: Path) -> list[str]:
    """alice created; the clock steps back a minute; alice renamed, bob created. Returns the times asked for."""
    clock = Clock()
    app = await create_app(config(data), serve=False, clock=clock)
    try:
        svc = app.service
        await svc.create_user("alice")
        clock.now -= 60
        await svc.rename_user("alice", "alicia")
        clock.now += 5
        await svc.create_user("bob")
        clock.now += 120
        await svc.create_user("carol")
        return [ev.rfc3339(START - 30), ev.rfc3339(START), ev.rfc3339(START + 100)]
    finally:
        await app.close()


@pytest.fixture
def history(tmp_path: Path) -> Path:
    data = tmp_path / "data"
    asyncio.run(make_history(data))
    return data


def rows(data: Path) -> list[tuple[Any, ...]]:
    with sqlite3.connect(data / "shoal.db") as c:
        return list(c.execute("SELECT seq, time, type FROM events ORDER BY seq"))


def test_log_event_times_never_go_back(history: Path) -> None:
    r = rows(history)
    assert [x[2] for x in r] == ["UserCreated", "UserRenamed", "UserCreated", "UserCreated"]
    times = [x[1] for x in r]
    # the rename happened while the clock was a minute behind: it gets alice's creation time, not an earlier one
    assert times[1] == times[0] == ev.rfc3339(START)
    assert times[2] == times[0]  # still behind (START - 55)
    assert times[3] == ev.rfc3339(START + 65)
    assert times == sorted(times)


def test_log_at_is_a_prefix_of_the_log(history: Path) -> None:
    """Before the fix, ``users list --at`` folded the events by wall-clock time and crashed with KeyError."""
    before, at_start, later = ev.rfc3339(START - 30), ev.rfc3339(START), ev.rfc3339(START + 30)
    assert cli_json(history, "users", "list", "--at", before) == []
    # everything stamped at START: alice created and renamed, bob created
    assert [u["name"] for u in cli_json(history, "users", "list", "--at", at_start)] == ["alicia", "bob"]
    assert [u["name"] for u in cli_json(history, "users", "list", "--at", later)] == ["alicia", "bob"]
    assert len(cli_json(history, "users", "list", "--at", ev.rfc3339(START + 65))) == 3
    assert [u["name"] for u in cli_json(history, "users", "list", "--at-seq", "1")] == ["alice"]
    assert [u["name"] for u in cli_json(history, "users", "list", "--at-seq", "2")] == ["alicia"]
    assert [u["name"] for u in cli_json(history, "users", "list", "--at-seq", "4")] == ["alicia", "bob", "carol"]
    assert cli_json(history, "nodes", "list", "--at-seq", "0") == []
    p = cli(history, "users", "list", "--at-seq", "9", check=False)
    assert p.returncode == 1 and "no event 9: the log has 4" in p.stderr
    p = cli(history, "users", "list", "--at", "x", "--at-seq", "1", check=False)
    assert p.returncode == 2


def test_log_info_and_checkpoint_key(history: Path) -> None:
    key = history / "checkpoint.key"
    assert stat.S_IMODE(key.stat().st_mode) == 0o600
    assert key.read_text().startswith("ckptsecret:")
    info = cli_json(history, "info")
    assert info["checkpoint_key"].startswith("ckptkey:") and len(info["checkpoint_key"]) == 8 + 64
    assert info["server_key"].startswith("mkey:")
    text = cli(history, "info").stdout
    assert f"checkpoint_key: {info['checkpoint_key']}" in text


def test_log_checkpoint_prints_one_line_and_appends_nothing(history: Path, tmp_path: Path) -> None:
    before = rows(history)
    p = cli(history, "events", "checkpoint")
    lines = p.stdout.splitlines()
    assert len(lines) == 1 and lines[0].startswith("shoal-checkpoint/1 4 ")
    assert rows(history) == before
    cp = tmp_path / "cp.line"
    cp.write_text(p.stdout)
    ok = cli(history, "events", "verify", "--checkpoint", str(cp))
    assert ok.stdout.splitlines() == [
        "ok: 4 events, hash chain intact",
        f"ok: the log (4 events) extends the checkpoint at seq 4 (head {lines[0].split()[2][:16]}, "
        f"{lines[0].split()[3]})",
    ]
    info = cli_json(history, "info")
    assert cli_json(history, "events", "verify", "--checkpoint", str(cp), "--key", info["checkpoint_key"])["ok"]


def test_log_verify_checkpoint_catches_tail_truncation(history: Path, tmp_path: Path) -> None:
    cp = tmp_path / "cp.line"
    cp.write_text(cli(history, "events", "checkpoint").stdout)
    with sqlite3.connect(history / "shoal.db") as c:
        c.execute("DELETE FROM events WHERE seq > 2")
    assert cli_json(history, "events", "verify")["ok"]  # the chain alone cannot tell
    p = cli(history, "events", "verify", "--checkpoint", str(cp), check=False)
    assert p.returncode == 1
    assert p.stdout.splitlines()[-1] == (
        "the log does not extend the checkpoint at seq 4: events 3..4 missing: the log ends at seq 2, "
        "the checkpoint covers seq 4 (the tail was truncated)"
    )
    j = json.loads(cli(history, "events", "verify", "--checkpoint", str(cp), "--json", check=False).stdout)
    assert j["ok"] is False and j["reason"].startswith("events 3..4 missing")


def test_log_verify_checkpoint_catches_a_rewritten_table(history: Path, tmp_path: Path) -> None:
    cp = tmp_path / "cp.line"
    cp.write_text(cli(history, "events", "checkpoint").stdout)
    # Rewrite history: bob never existed. A fresh, valid chain over the remaining events, and one more so the
    # length is the same.
    with sqlite3.connect(history / "shoal.db") as c:
        old = list(c.execute("SELECT seq, time, actor, type, schema, data FROM events ORDER BY seq"))
        c.execute("DELETE FROM events")
        kept = [r for r in old if "bob" not in r[5]]
        kept.append((0, kept[-1][1], "admin", "UserCreated", 1, '{"name":"dave","user_id":4}'))
        prev = ev.GENESIS
        for i, (_, t, actor, typ, schema, data) in enumerate(kept, 1):
            h = ev.chain_hash(prev, i, t, actor, typ, schema, json.loads(data))
            c.execute("INSERT INTO events VALUES (?, ?, ?, ?, ?, ?, ?, ?)", (i, t, actor, typ, schema, data, prev, h))
            prev = h
    assert cli_json(history, "events", "verify") == {"ok": True, "events": 4}
    p = cli(history, "events", "verify", "--checkpoint", str(cp), check=False)
    assert p.returncode == 1
    last = p.stdout.splitlines()[-1]
    assert last.startswith("the log does not extend the checkpoint at seq 4: event 4 changed: its hash is ")
    assert last.endswith("(the log was rewritten at or before seq 4)")


def test_log_verify_checkpoint_refuses_bad_files_and_keys(history: Path, tmp_path: Path) -> None:
    line = cli(history, "events", "checkpoint").stdout
    cases = {
        "two.line": line + line,
        "junk.line": "hello\n",
        "forged.line": line.replace(line.split()[2], "0" * 64),
    }
    for name, text in cases.items():
        (tmp_path / name).write_text(text)
    for name, words in (("two.line", "exactly one line"), ("junk.line", "not a checkpoint line"),
                        ("forged.line", "signature does not verify")):
        p = cli(history, "events", "verify", "--checkpoint", str(tmp_path / name), check=False)
        assert p.returncode == 1 and words in p.stdout, (name, p.stdout, p.stderr)
    good = tmp_path / "good.line"
    good.write_text(line)
    other = "ckptkey:" + "11" * 32
    p = cli(history, "events", "verify", "--checkpoint", str(good), "--key", other, check=False)
    assert p.returncode == 1 and "does not verify with ckptkey:1111" in p.stdout
    p = cli(history, "events", "verify", "--checkpoint", str(tmp_path / "missing.line"), check=False)
    assert p.returncode == 1 and "missing.line" in p.stdout


def test_log_server_writes_checkpoints_to_a_file_and_a_command(tmp_path: Path) -> None:
    data = tmp_path / "data"
    sink = tmp_path / "latest.line"
    collected = tmp_path / "all.lines"

    async def main() -> None:
        cfg = config(data, checkpoint_every="3", checkpoint_interval="1h", checkpoint_file=str(sink),
                     checkpoint_command=f"cat >> {collected}")
        app = await create_app(cfg, serve=False)
        await app.start()
        try:
            for i in range(7):
                await app.service.create_user(f"u{i}")
                await asyncio.sleep(0.05)
            for _ in range(100):
                if sink.exists() and sink.read_text().split()[1] == "6":
                    break
                await asyncio.sleep(0.05)
        finally:
            await app.close()

    asyncio.run(main())
    assert stat.S_IMODE(sink.stat().st_mode) == 0o600
    seqs = [int(x.split()[1]) for x in collected.read_text().splitlines()]
    assert seqs[-1] >= 6 and seqs == sorted(seqs) and all(b - a >= 3 for a, b in itertools.pairwise(seqs))
    assert cli_json(data, "events", "verify", "--checkpoint", str(sink))["ok"]


def test_log_expiry_loop_survives_a_failing_sweep(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    """A locked database (or a bug) in one sweep: logged, counted, backed off; the next sweep expires the node."""

    async def main() -> None:
        clock = Clock()
        app = await create_app(config(tmp_path / "data"), serve=False, clock=clock)
        svc = app.service
        await svc.create_user("alice")
        key = (await svc.create_key("alice", reusable=True, ephemeral=False, expiration=None, tags=()))["key"]
        m, nk = b"\x05" * 32, b"\x06" * 32
        await app.logins.register(m, wire.RegisterRequest(node_key=nk, auth_key=key,
                                                          hostinfo=wire.Hostinfo(hostname="n")))
        nid = svc.state.by_machine[wire.key_text("mkey", m)]
        await svc.set_node_expiry(str(nid), START + 10)
        real = svc.store.append
        fails = {"left": 2}

        async def flaky(*a: Any) -> None:
            # only the sweep's appends fail: start-up and other loops append too, in an order load decides
            if fails["left"] and any(isinstance(r.event, ev.NodeExpired) for r in a[0]):
                fails["left"] -= 1
                raise sqlite3.OperationalError("database is locked")
            await real(*a)

        svc.store.append = flaky  # type: ignore[method-assign]
        app.lifecycle.expiry_interval = 0.01
        app.lifecycle.supervisor.base = 0.01
        # before the sweep: a map request for the expired node is already refused
        clock.now = START + 11
        with pytest.raises(Unauthorized, match="expired"):
            node_for_map(svc.state, m, wire.MapRequest(node_key=nk), clock.now)
        await app.start()
        try:
            stats = app.lifecycle.supervisor.stats
            for _ in range(1000):
                # the fold runs ahead of the commit: wait for the sweep that committed, not for the flag alone
                if svc.state.nodes[nid].expired and "expiry" in stats and stats["expiry"].failures == 2 \
                        and stats["expiry"].consecutive == 0:
                    break
                await asyncio.sleep(0.01)
            assert svc.state.nodes[nid].expired
            st = stats["expiry"]
            assert st.failures == 2 and st.consecutive == 0 and "database is locked" in st.last_error
        finally:
            await app.close()

    with caplog.at_level(logging.ERROR):
        asyncio.run(main())
    assert any("background loop expiry failed" in r.getMessage() for r in caplog.records)
