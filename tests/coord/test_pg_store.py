"""The storage tests on both stores: the same history made by a real server on SQLite and on PostgreSQL (Debian's
postgresql, a throw-away cluster: tests/pgcluster.py) verifies, replays to the stored projections, is read through
the same filters, and names tampering at the right seq. Then what only a shared store does: an append decided on
a stale head is refused with nothing stored, and leases."""

from __future__ import annotations

import asyncio
import sqlite3
from collections.abc import Callable
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import asyncpg
import pytest

from coord import events as ev
from coord.state import State, fold
from coord.store import ChainBroken, Filter, StaleHead, Store
from coord.store import sqlite as db
from coord.store.postgres import PgStore, pg_dialect, pg_statement
from coord.store.sqlite import SqliteStore
from tests.coord.test_eventlog import build

BACKENDS = ["sqlite", "pg"]


def run(coro: Any) -> Any:
    return asyncio.run(coro)


class Backend:
    """A history made by the real server on one store, and a way to open that store and tamper with it."""

    def __init__(self, kind: str, data: Path, dsn: str) -> None:
        self.kind, self.data, self.dsn = kind, data, dsn

    async def open(self) -> Store:
        if self.kind == "pg":
            return await PgStore.open(self.dsn)
        return await SqliteStore.open(self.data / "shoal.db")

    async def sql(self, stmt: str) -> None:
        if self.kind == "pg":
            conn = await asyncpg.connect(self.dsn)
            try:
                await conn.execute(stmt)
            finally:
                await conn.close()
        else:
            with sqlite3.connect(self.data / "shoal.db") as c:
                c.execute(stmt)

    async def projections(self) -> dict[str, list[tuple[Any, ...]]]:
        if self.kind == "pg":
            s = await PgStore.open(self.dsn)
            try:
                return await s.dump_projections()
            finally:
                await s.close()
        conn = await db.connect(self.data / "shoal.db")
        try:
            return await db.dump_projections(conn)
        finally:
            await conn.close()


@pytest.fixture(scope="module", params=BACKENDS)
def backend(request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory) -> Backend:
    data = tmp_path_factory.mktemp(f"history-{request.param}") / "data"
    dsn = ""
    overrides: dict[str, Any] = {}
    if request.param == "pg":
        cluster = request.getfixturevalue("pg_cluster")
        dsn = cluster.dsn(cluster.new_database("hist"))
        overrides["postgres"] = dsn
    run(build(data, **overrides))
    return Backend(request.param, data, dsn)


@pytest.fixture
def tampered(backend: Backend, pg_cluster: Any, tmp_path: Path) -> Callable[[], Backend]:
    """A copy of the history to break (a new database on the cluster, or a copy of the file)."""

    def make() -> Backend:
        if backend.kind == "pg":
            name = pg_cluster.new_database("copy")
            pg_cluster.psql("postgres", f"DROP DATABASE {name}")
            src = urlsplit(backend.dsn).path.lstrip("/")
            pg_cluster.psql("postgres", f"CREATE DATABASE {name} TEMPLATE {src}")
            return Backend("pg", tmp_path, pg_cluster.dsn(name))
        import shutil

        dst = tmp_path / "copy"
        shutil.copytree(backend.data, dst, ignore=shutil.ignore_patterns("*.sock", "server.lock"))
        return Backend("sqlite", dst, "")

    return make


async def records(store: Store, f: Filter = Filter()) -> list[ev.Record]:
    return [r async for r in store.read(f)]


def test_pg_store_history_verifies(backend: Backend) -> None:
    async def main() -> None:
        store = await backend.open()
        try:
            rs = await records(store)
            assert len(rs) > 30
            assert await store.verify() == len(rs) == rs[-1].seq
            assert await store.last() == (rs[-1].seq, rs[-1].hash)
            types = {r.event.type for r in rs}
            assert {"UserCreated", "NodeRegistered", "NodeDeleted", "UserDeleted", "NodeEndpointsChanged"} <= types
        finally:
            await store.close()

    run(main())


async def replayed(rs: list[ev.Record]) -> dict[str, list[tuple[Any, ...]]]:
    """The projections a replay of ``rs`` writes into a fresh SQLite database."""
    conn = await db.connect(":memory:")
    try:
        await db.write_all_projections(conn, fold(rs))
        return await db.dump_projections(conn)
    finally:
        await conn.close()


def test_pg_store_replay_equals_stored_projections(backend: Backend) -> None:
    async def main() -> None:
        store = await backend.open()
        try:
            rs = await records(store)
        finally:
            await store.close()
        stored = await backend.projections()
        assert stored["nodes"] and stored["users"] and stored["auth_keys"]
        # the same rows, value for value, whichever store wrote them
        assert stored == await replayed(rs)

    run(main())


def test_pg_store_filters_select_what_filter_matches(backend: Backend) -> None:
    async def main() -> None:
        store = await backend.open()
        try:
            rs = await records(store)
            mid = rs[len(rs) // 2]
            node = next(r.event.data()["node_id"] for r in rs if r.event.type == "NodeRegistered")
            filters = [
                Filter(since_seq=5, until_seq=20),
                Filter(types=("UserCreated", "NodeRegistered")),
                Filter(node_id=node),
                Filter(until_time=mid.time),
                Filter(since_time=mid.time, types=("NodeEndpointsChanged",)),
            ]
            for f in filters:
                got = [r.seq for r in await records(store, f)]
                assert got == [r.seq for r in rs if f.matches(r)], f
                assert got, f
            assert await store.last_at(mid.time) == max(r.seq for r in rs if r.time <= mid.time)
            assert await store.last_at("1970-01-01T00:00:00Z") == 0
        finally:
            await store.close()

    run(main())


@pytest.mark.parametrize(("what", "stmt", "bad"), [
    ("altered", "UPDATE events SET time = '2000-01-01T00:00:00.000000Z' WHERE seq = 4", 4),
    ("deleted", "DELETE FROM events WHERE seq = 7", 7),
    ("actor", "UPDATE events SET actor = 'mallory' WHERE seq = 12", 12),
], ids=["altered", "deleted", "actor"])
def test_pg_store_verify_names_the_first_bad_seq(tampered: Callable[[], Backend], what: str, stmt: str,
                                                 bad: int) -> None:
    async def main() -> None:
        b = tampered()
        await b.sql(stmt)
        store = await b.open()
        try:
            with pytest.raises(ChainBroken) as e:
                await store.verify()
            assert e.value.seq == bad, what
        finally:
            await store.close()

    run(main())


def test_pg_dialect_translates_the_sqlite_forms() -> None:
    assert pg_dialect("a INTEGER PRIMARY KEY, b REAL, c TEXT") == "a BIGINT PRIMARY KEY, b DOUBLE PRECISION, c TEXT"
    assert pg_statement("INSERT OR REPLACE INTO policy (id, text, sha256) VALUES (1, ?, ?)") == (
        "INSERT INTO policy (id, text, sha256) VALUES (1, $1, $2) ON CONFLICT (id) DO UPDATE SET "
        "text = EXCLUDED.text, sha256 = EXCLUDED.sha256"
    )
    assert pg_statement("DELETE FROM nodes WHERE id = ?") == "DELETE FROM nodes WHERE id = $1"


def _user(prev: ev.Record | None, seq: int, name: str) -> ev.Record:
    return ev.seal_record(prev.hash if prev else ev.GENESIS, seq, "2026-01-01T00:00:00Z", "admin",
                          ev.UserCreated(seq, name))


def test_pg_stale_append_is_refused_and_stores_nothing(pg_dsn: str) -> None:
    async def main() -> None:
        a, b = await PgStore.open(pg_dsn), await PgStore.open(pg_dsn)
        try:
            r1 = _user(None, 1, "one")
            await a.append([r1], fold([r1]), False)
            # b decided on the empty log: its event 1 is not the head's successor
            other = _user(None, 1, "other")
            with pytest.raises(StaleHead) as e:
                await b.append([other], fold([other]), False)
            assert (e.value.expected, e.value.head) == (0, 1)
            # a different event 2 that does not follow event 1's hash is refused too
            forged = ev.seal_record("f" * 64, 2, "2026-01-01T00:00:00Z", "admin", ev.UserCreated(2, "forged"))
            with pytest.raises(StaleHead):
                await b.append([forged], State(), False)
            r2 = _user(r1, 2, "two")
            await b.append([r2], fold([r1, r2]), False)
            assert [r.hash for r in await records(a)] == [r1.hash, r2.hash]
            assert await a.verify() == 2
            assert [row[1] for row in (await a.dump_projections())["users"]] == ["one", "two"]
        finally:
            await a.close()
            await b.close()

    run(main())


def test_pg_migrations_run_once_with_replicas_starting_together(pg_dsn: str) -> None:
    async def main() -> None:
        stores = await asyncio.gather(*(PgStore.open(pg_dsn) for _ in range(4)))
        try:
            versions = [r[0] for r in await stores[0].pool.fetch("SELECT version FROM schema_migrations")]
            assert sorted(versions) == [v for v, _, _ in db.migration_files()]
            assert await stores[1].migrate() == []
        finally:
            for s in stores:
                await s.close()

    run(main())


def test_pg_lease_has_one_holder_until_it_lapses(pg_dsn: str) -> None:
    async def main() -> None:
        s = await PgStore.open(pg_dsn)
        try:
            assert await s.acquire("lifecycle", "r1", now=100.0, ttl=5.0)
            assert not await s.acquire("lifecycle", "r2", now=101.0, ttl=5.0)
            assert await s.acquire("lifecycle", "r1", now=104.0, ttl=5.0)  # renewed to 109
            assert not await s.acquire("lifecycle", "r2", now=108.0, ttl=5.0)
            assert await s.acquire("lifecycle", "r2", now=109.5, ttl=5.0)  # lapsed: r2 takes over
            assert not await s.acquire("lifecycle", "r1", now=110.0, ttl=5.0)
            assert await s.acquire("other", "r1", now=110.0, ttl=5.0)  # leases are per name
        finally:
            await s.close()

    run(main())

