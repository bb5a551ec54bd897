"""The event log: hash chain, replay, point-in-time views and the admin CLI, on a history made by a real server."""

from __future__ import annotations

import asyncio
import json
import shutil
import sqlite3
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

from coord import events as ev
from coord.state import State, fold
from coord.store import sqlite as db
from tests.coord.harness import running_server, sim_node
from tests.coord.util import cli, cli_json


@dataclass(frozen=True)
class History:
    data: Path
    t1: str  # after the first phase: alice, bob, carol; nodes a, b, srv
    t0: str  # before anything happened


async def next_map(it: Any) -> dict[str, Any]:
    while True:
        msg: dict[str, Any] = await asyncio.wait_for(it.__anext__(), 5)
        if not msg.get("KeepAlive"):
            return msg


async def aclose(stream: Any) -> None:
    await stream.aclose()


async def build(data: Path, **overrides: Any) -> History:
    t0 = ev.rfc3339(time.time() - 1)
    async with running_server(data, ephemeral_timeout="200ms", **overrides) as r:
        s = r.svc
        for name in ("alice", "bob", "carol"):
            await s.create_user(name)
        ka = (await s.create_key("alice", reusable=True, ephemeral=False, expiration=3600, tags=()))["key"]
        kb = (await s.create_key("bob", reusable=False, ephemeral=False, expiration=3600, tags=()))["key"]
        kt = (await s.create_key("alice", reusable=True, ephemeral=False, expiration=None, tags=("tag:srv",)))["key"]
        ke = (await s.create_key("alice", reusable=True, ephemeral=True, expiration=3600, tags=()))["key"]
        a, b, srv = sim_node(r.url, "a"), sim_node(r.url, "Bee.local"), sim_node(r.url, "srv")
        await a.join(ka)
        await b.join(kb)
        await srv.join(kt)
        sa = a.client.stream(a.map_request(endpoints=("192.0.2.1:41641",)))
        await next_map(sa)
        sb = b.client.stream(b.map_request(endpoints=("192.0.2.2:41641",)))
        await next_map(sb)
        await aclose(sb)
        await asyncio.sleep(0.1)
        t1 = ev.rfc3339(time.time())
        await asyncio.sleep(0.02)
        # second phase: renames, tags, endpoint changes, logout, deletes, an ephemeral node that comes and goes
        await s.rename_user("alice", "alicia")
        await s.rename_node("a", "alpha")
        await s.tag_node("srv", ("tag:srv", "tag:web"))
        await a.client.update(a.map_request(stream=False, endpoints=("192.0.2.1:41641", "198.51.100.7:1")))
        await s.revoke_key(ka.split("-")[1])
        await b.client.register(b.register_request(expiry=1.0))  # logout
        await s.delete_node("srv")
        await s.delete_user("carol")
        await s.expire_node("alpha")
        e = sim_node(r.url, "eph")
        await e.join(ke)
        se = e.client.stream(e.map_request())
        await next_map(se)
        await aclose(se)
        for _ in range(100):
            if not any(n.ephemeral for n in s.state.nodes.values()):
                break
            await asyncio.sleep(0.05)
        c = sim_node(r.url, "c")
        await c.join((await s.create_key("alicia", reusable=False, ephemeral=False, expiration=60, tags=()))["key"])
        await aclose(sa)
        for n in (a, b, srv, e, c):
            await n.client.close()
        await asyncio.sleep(0.1)
    return History(data, t1, t0)


@pytest.fixture(scope="module")
def history(tmp_path_factory: pytest.TempPathFactory) -> History:
    return asyncio.run(build(tmp_path_factory.mktemp("history") / "data"))


def copy_of(h: History, tmp_path: Path) -> Path:
    dst = tmp_path / "copy"
    shutil.copytree(h.data, dst, ignore=shutil.ignore_patterns("*.sock", "server.lock"))
    return dst


def types_in(data: Path) -> list[str]:
    with sqlite3.connect(data / "shoal.db") as conn:
        return [r[0] for r in conn.execute("SELECT type FROM events ORDER BY seq")]


def test_history_is_realistic(history: History) -> None:
    types = set(types_in(history.data))
    for t in ("UserCreated", "UserRenamed", "UserDeleted", "AuthKeyCreated", "AuthKeyRevoked", "NodeRegistered",
              "NodeRenamed", "NodeTagged", "NodeEndpointsChanged", "NodeConnected", "NodeDisconnected",
              "NodeLoggedOut", "NodeDeleted", "NodeExpired"):
        assert t in types, t


# --- the chain ---------------------------------------------------------------------------------------------


def test_verify_passes(history: History) -> None:
    out = cli_json(history.data, "events", "verify")
    assert out["ok"] is True and out["events"] == len(types_in(history.data))
    text = cli(history.data, "events", "verify").stdout
    assert "hash chain intact" in text


def tamper(data: Path, sql: str, *args: Any) -> None:
    with sqlite3.connect(data / "shoal.db") as conn:
        conn.execute(sql, args)


@pytest.mark.parametrize(
    ("what", "sql", "bad", "reason"),
    [
        ("data", "UPDATE events SET data = replace(data, 'bob', 'eve') WHERE seq = 2", 2, "hash does not match"),
        ("time", "UPDATE events SET time = '2020-01-01T00:00:00.000000Z' WHERE seq = 7", 7, "hash does not match"),
        ("actor", "UPDATE events SET actor = 'system' WHERE seq = 5", 5, "hash does not match"),
        ("hash", "UPDATE events SET hash = '" + "ab" * 32 + "' WHERE seq = 6", 6, "hash does not match"),
        ("prev", "UPDATE events SET prev_hash = '" + "cd" * 32 + "' WHERE seq = 4", 4, "prev_hash"),
        ("delete", "DELETE FROM events WHERE seq = 9", 9, "missing"),
        ("undecodable", "UPDATE events SET data = '{not json' WHERE seq = 3", 3, "undecodable"),
    ],
)
def test_verify_names_the_first_bad_seq(history: History, tmp_path: Path, what: str, sql: str, bad: int,
                                         reason: str) -> None:
    data = copy_of(history, tmp_path)
    tamper(data, sql)
    p = cli(data, "events", "verify", *(["--json"] if what != "data" else []), check=False)
    assert p.returncode == 1, what
    if what == "data":
        assert f"chain broken at event {bad}: {reason}" in p.stdout
        return
    out = json.loads(p.stdout)
    assert out["ok"] is False and out["first_bad_seq"] == bad and reason in out["reason"], out


def test_verify_names_a_reordering(history: History, tmp_path: Path) -> None:
    data = copy_of(history, tmp_path)
    with sqlite3.connect(data / "shoal.db") as conn:
        rows = {r[0]: r[1:] for r in conn.execute(
            "SELECT seq, time, actor, type, schema, data, prev_hash, hash FROM events WHERE seq IN (10, 11)")}
        conn.execute("DELETE FROM events WHERE seq IN (10, 11)")
        for seq, other in ((10, 11), (11, 10)):
            conn.execute("INSERT INTO events VALUES (?, ?, ?, ?, ?, ?, ?, ?)", (seq, *rows[other]))
    out = json.loads(cli(data, "events", "verify", "--json", check=False).stdout)
    assert out["first_bad_seq"] == 10


# --- replay and folds ----------------------------------------------------------------------------------------


def dump(path: Path) -> dict[str, list[tuple[Any, ...]]]:
    with sqlite3.connect(path) as conn:
        return {t: conn.execute(f"SELECT * FROM {t} ORDER BY 1").fetchall() for t in db.PROJECTION_TABLES}


def test_replay_into_new_db_equals_live(history: History, tmp_path: Path) -> None:
    into = tmp_path / "replayed.db"
    out = cli_json(history.data, "events", "replay", "--into", str(into))
    assert out["projections_equal_live"] is True and out["events"] == len(types_in(history.data))
    live, replayed = dump(history.data / "shoal.db"), dump(into)
    assert live == replayed
    assert live["users"] and live["nodes"] and live["auth_keys"]
    # and the replayed log is the same chain
    with sqlite3.connect(into) as a, sqlite3.connect(history.data / "shoal.db") as b:
        assert a.execute("SELECT * FROM events ORDER BY seq").fetchall() == b.execute(
            "SELECT * FROM events ORDER BY seq").fetchall()
    p = cli(history.data, "events", "replay", "--into", str(into), check=False)
    assert p.returncode == 1 and "exists" in p.stderr and len(p.stderr.strip().splitlines()) == 1


def test_replay_detects_a_projection_that_drifted(history: History, tmp_path: Path) -> None:
    data = copy_of(history, tmp_path)
    tamper(data, "UPDATE nodes SET hostname = 'drifted' WHERE id = 1")
    p = cli(data, "events", "replay", "--into", str(tmp_path / "r.db"), "--json", check=False)
    assert p.returncode == 1 and json.loads(p.stdout)["projections_equal_live"] is False


def read_all(data: Path) -> list[ev.Record]:
    async def go() -> list[ev.Record]:
        conn = await db.connect(data / "shoal.db")
        try:
            return [r async for r in db.read(conn, batch=7)]
        finally:
            await conn.close()

    return asyncio.run(go())


def test_fold_is_deterministic_and_incremental(history: History) -> None:
    records = read_all(history.data)
    assert [r.seq for r in records] == list(range(1, len(records) + 1))
    one, two = fold(records), fold(records)
    assert one == two
    for k in (1, len(records) // 3, len(records) // 2, len(records) - 1):
        part = fold(records[:k])
        assert fold(records[k:], part) == one
    assert one.last_seq == len(records) and one.last_hash == records[-1].hash
    # the fold of the log is what the live projections hold
    nodes = {row[0]: row for row in dump(history.data / "shoal.db")["nodes"]}
    assert set(nodes) == set(one.nodes)
    for nid, n in one.nodes.items():
        assert nodes[nid][1] == n.machine_key and nodes[nid][8] == n.given_name and nodes[nid][10] == n.ipv4


def test_fold_of_nothing_is_empty() -> None:
    assert fold([]) == State()


# --- point in time -----------------------------------------------------------------------------------------


def test_users_and_nodes_at_a_time(history: History) -> None:
    then = cli_json(history.data, "users", "list", "--at", history.t1)
    assert [u["name"] for u in then] == ["alice", "bob", "carol"]
    now = cli_json(history.data, "users", "list")
    assert [u["name"] for u in now] == ["alicia", "bob"]
    nodes_then = cli_json(history.data, "nodes", "list", "--at", history.t1)
    assert [(n["name"], n["tags"], n["logged_out"], n["expired"]) for n in nodes_then] == [
        ("a", [], False, False), ("bee", [], False, False), ("srv", ["tag:srv"], False, False)]
    assert nodes_then[0]["online"] is True and nodes_then[1]["online"] is False
    assert nodes_then[0]["endpoints"] == ["192.0.2.1:41641"]
    nodes_now = cli_json(history.data, "nodes", "list")
    assert [(n["name"], n["logged_out"], n["expired"]) for n in nodes_now] == [
        ("alpha", False, True), ("bee", True, False), ("c", False, False)]
    assert nodes_now[0]["user"] == "alicia"
    assert cli_json(history.data, "nodes", "list", "--at", history.t0) == []
    assert cli_json(history.data, "users", "list", "--at", history.t0) == []
    # a date alone is midnight UTC; text output is a table
    assert "NAME" in cli(history.data, "nodes", "list", "--at", history.t1).stdout


# --- the event CLI -------------------------------------------------------------------------------------------


def test_events_tail_show(history: History) -> None:
    total = len(types_in(history.data))
    lines = cli(history.data, "events", "tail", "-n", "5", "--json").stdout.splitlines()
    recs = [json.loads(x) for x in lines]
    assert [r["seq"] for r in recs] == list(range(total - 4, total + 1))
    assert set(recs[0]) >= {"seq", "time", "actor", "type", "schema", "data", "prev_hash", "hash"}
    regs = [json.loads(x) for x in cli(history.data, "events", "tail", "--type", "NodeRegistered", "-n", "1000",
                                       "--json").stdout.splitlines()]
    assert [r["data"]["given_name"] for r in regs] == ["a", "bee", "srv", "eph", "c"]
    about_1 = [json.loads(x) for x in cli(history.data, "events", "tail", "--node", "1", "-n", "1000",
                                          "--json").stdout.splitlines()]
    assert about_1 and all(r["data"]["node_id"] == 1 for r in about_1)
    since = [json.loads(x) for x in cli(history.data, "events", "tail", "--since", history.t1,
                                        "--json").stdout.splitlines()]
    assert since[0]["type"] == "UserRenamed" and all(r["time"] >= history.t1 for r in since)
    text = cli(history.data, "events", "tail", "-n", "3").stdout
    assert len(text.splitlines()) == 3
    shown = cli_json(history.data, "events", "show", "1")
    assert shown["seq"] == 1 and shown["type"] == "UserCreated" and shown["data"]["name"] == "alice"
    assert shown["prev_hash"] == ev.GENESIS


def test_events_errors_are_one_line(history: History) -> None:
    for args, words in (
        (("events", "show", "99999"), "no event 99999"),
        (("events", "tail", "--since", "yesterday"), "yesterday"),
        (("nodes", "list", "--at", "not-a-time"), "--at"),
        (("users", "list", "--at", "2026-13-45"), "--at"),
    ):
        p = cli(history.data, *args, check=False)
        assert p.returncode != 0, args
        lines = p.stderr.strip().splitlines()
        assert len(lines) == 1 and words in lines[0], (args, p.stderr)
        assert "Traceback" not in p.stderr


# --- users and keys through the CLI --------------------------------------------------------------------------


def test_users_and_keys_cli_session(tmp_path: Path) -> None:
    data = tmp_path / "data"
    created = cli_json(data, "users", "create", "alice")
    assert created["name"] == "alice" and created["id"] == 1
    assert cli_json(data, "users", "create", "bob")["id"] == 2
    assert [u["name"] for u in cli_json(data, "users", "list")] == ["alice", "bob"]
    assert cli_json(data, "users", "rename", "bob", "robert")["name"] == "robert"
    key = cli_json(data, "keys", "create", "--user", "alice", "--reusable", "--expiration", "1h",
                   "--tags", "tag:a,tag:b")
    assert key["key"].startswith("skey-" + key["prefix"] + "-")
    assert key["reusable"] and key["tags"] == ["tag:a", "tag:b"]
    text = cli(data, "keys", "create", "--user", "robert").stdout
    assert "shown once" in text
    listed = cli_json(data, "keys", "list")
    assert [k["user"] for k in listed] == ["alice", "robert"]
    assert all("key" not in k for k in listed), "a secret must never be listed"
    assert all(k["usable"] for k in listed)
    revoked = cli_json(data, "keys", "revoke", key["prefix"])
    assert revoked["revoked"] is True and revoked["usable"] is False
    assert cli_json(data, "users", "delete", "robert") == {"deleted": 2, "name": "robert"}
    assert [u["name"] for u in cli_json(data, "users", "list")] == ["alice"]
    with sqlite3.connect(data / "shoal.db") as conn:
        hashes = [r[0] for r in conn.execute("SELECT hash FROM auth_keys")]
    assert key["key"].split("-")[2] not in json.dumps(hashes), "the secret is stored hashed"
    assert cli_json(data, "events", "verify")["ok"]
    # every --json output is one JSON document
    for args in (("users", "list"), ("keys", "list"), ("nodes", "list")):
        json.loads(cli(data, *args, "--json").stdout)


@pytest.fixture(scope="module")
def alice_only(tmp_path_factory: pytest.TempPathFactory) -> Path:
    data = tmp_path_factory.mktemp("alice") / "data"
    cli(data, "users", "create", "alice")
    return data


@pytest.mark.parametrize(
    ("args", "code", "words"),
    [
        (("users", "rename", "nobody", "x"), 1, "no user 'nobody'"),
        (("users", "create", "alice"), 1, "already exists"),
        (("users", "create", "bad name"), 1, "not valid"),
        (("keys", "create", "--user", "nobody"), 1, "no user 'nobody'"),
        (("keys", "create", "--user", "alice", "--expiration", "soon"), 1, "--expiration"),
        (("keys", "create", "--user", "alice", "--tags", "server"), 1, "tag"),
        (("keys", "revoke", "nope"), 1, "no auth key"),
        (("nodes", "delete", "ghost"), 1, "no node 'ghost'"),
        (("users", "list", "--bogus"), 2, "--bogus"),
        (("users", "frobnicate"), 2, "frobnicate"),
    ],
)
def test_cli_errors(alice_only: Path, args: tuple[str, ...], code: int, words: str) -> None:
    p = cli(alice_only, *args, check=False)
    assert p.returncode == code, p
    lines = p.stderr.strip().splitlines()
    assert len(lines) == 1 and words in lines[0], p.stderr
    assert p.stdout == ""


def test_every_event_class_can_be_read_back() -> None:
    """A kind missing from EVENT_TYPES is written fine and then unreadable: verify, replay and start-up would fail."""
    def subclasses(c: type[ev.Event]) -> set[type[ev.Event]]:
        return {s for d in c.__subclasses__() for s in {d, *subclasses(d)}}

    assert {c.__name__ for c in subclasses(ev.Event)} == set(ev.EVENT_TYPES)
