"""PostgreSQL storage (asyncpg): the same log, projections and migrations as coord/store/sqlite.py, shared by
several replicas of one tailnet (docs/ha.md).

- Migrations are migrations/*.sql, written for SQLite, run through ``pg_dialect`` (INTEGER -> BIGINT, REAL ->
  DOUBLE PRECISION); the projection statements of ``sqlite.projection_ops`` through ``pg_statement`` (``?`` ->
  ``$n``, ``INSERT OR REPLACE`` -> ``INSERT ... ON CONFLICT (id) DO UPDATE``). Replicas migrate under a session
  advisory lock (``MIGRATE_LOCK``), so starting several at once is safe.
- Appends are serialised by a transaction-scoped advisory lock (``APPEND_LOCK``); under it the head is read and
  must be the event the batch follows, else ``StaleHead`` (another replica appended since this one last caught
  up): nothing is written, and the service catches up and decides again (coord/service.py). So the log stays one
  hash chain and no decision commits on a stale state.
- Each committed append sends ``NOTIFY shoal_events, '<last seq>'`` (delivered at commit); ``watch`` LISTENs on a
  connection of its own and falls back to polling when it is gone.
- ``replicas``: one row per replica (name, URL, the seq it has folded, its streams, a heartbeat time), for
  ``shoal-server replicas``; ``leases``: leader leases for run-once work (``acquire``). Neither is a projection
  of the log: they are not in migrations/ and a replay ignores them.
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import json
import logging
import re
from collections.abc import AsyncIterator, Callable
from functools import lru_cache
from typing import Any

import asyncpg

from coord import events as ev
from coord.state import State
from coord.store import ChainBroken, DatabaseDown, Filter, StaleHead
from coord.store import sqlite as lite

log = logging.getLogger("shoal.store.postgres")

# Advisory lock keys (pg_advisory_*): arbitrary, fixed, distinct ("shoal" + 1 / + 2).
APPEND_LOCK = 0x73686F616C01
MIGRATE_LOCK = 0x73686F616C02
CHANNEL = "shoal_events"

COLUMNS = "seq, time, actor, type, schema, data, prev_hash, hash"

RUNTIME_TABLES = (
    "CREATE TABLE IF NOT EXISTS replicas (name TEXT PRIMARY KEY, url TEXT NOT NULL, seq BIGINT NOT NULL, "
    "streams BIGINT NOT NULL, started DOUBLE PRECISION NOT NULL, seen DOUBLE PRECISION NOT NULL, "
    "nodes TEXT NOT NULL DEFAULT '[]')",
    "CREATE TABLE IF NOT EXISTS leases (name TEXT PRIMARY KEY, holder TEXT NOT NULL, "
    "until DOUBLE PRECISION NOT NULL)",
)


def pg_dialect(sql: str) -> str:
    """A migration written for SQLite, in PostgreSQL's types (the only differences migrations/ has)."""
    sql = re.sub(r"\bINTEGER\b", "BIGINT", sql)
    return re.sub(r"\bREAL\b", "DOUBLE PRECISION", sql)


_OR_REPLACE = re.compile(r"^INSERT OR REPLACE INTO (\w+) \(([^)]*)\) VALUES \(([^)]*)\)$")


@lru_cache(maxsize=64)
def pg_statement(sql: str) -> str:
    """One of ``sqlite.projection_ops``'s statements in PostgreSQL's syntax."""
    m = _OR_REPLACE.match(sql)
    if m:
        table, cols, values = m.groups()
        names = [c.strip() for c in cols.split(",")]
        sets = ", ".join(f"{c} = EXCLUDED.{c}" for c in names if c != "id")
        sql = f"INSERT INTO {table} ({cols}) VALUES ({values}) ON CONFLICT (id) DO UPDATE SET {sets}"
    n = itertools.count(1)
    return re.sub(r"\?", lambda _: f"${next(n)}", sql)


def _where(f: Filter) -> tuple[str, list[object]]:
    clauses: list[str] = ["seq > $1"]
    args: list[object] = [f.since_seq]

    def arg(v: object) -> str:
        args.append(v)
        return f"${len(args)}"

    if f.until_seq is not None:
        clauses.append(f"seq <= {arg(f.until_seq)}")
    if f.until_time:
        clauses.append(f"time <= {arg(f.until_time)}")
    if f.since_time:
        clauses.append(f"time >= {arg(f.since_time)}")
    if f.types:
        clauses.append(f"type = ANY({arg(list(f.types))}::text[])")
    if f.node_id is not None:
        clauses.append(f"(data::jsonb ->> 'node_id') = {arg(str(f.node_id))}")
    return " AND ".join(clauses), args


def _no_failpoint(where: str) -> None:
    pass


def _down(e: BaseException) -> bool:
    return isinstance(e, (OSError, asyncpg.exceptions.ConnectionDoesNotExistError,
                          asyncpg.exceptions.CannotConnectNowError, asyncpg.exceptions.InterfaceError,
                          asyncpg.exceptions.AdminShutdownError, asyncio.TimeoutError))


class PgStore:
    """A pool of connections to one database; ``append`` takes one for its transaction."""

    shared = True  # several replicas write this log (coord/service.py catches up before deciding)

    def __init__(self, pool: asyncpg.Pool, dsn: str) -> None:
        self.pool = pool
        self.dsn = dsn
        self.failpoint: Callable[[str], None] = _no_failpoint

    @classmethod
    async def open(cls, dsn: str) -> PgStore:
        pool = await asyncpg.create_pool(dsn, min_size=1, max_size=4, command_timeout=30)
        store = cls(pool, dsn)
        try:
            await store.migrate()
        except BaseException:
            await pool.close()
            raise
        return store

    async def migrate(self) -> list[int]:
        applied = []
        async with self.pool.acquire() as c:
            await c.execute("SELECT pg_advisory_lock($1)", MIGRATE_LOCK)
            try:
                await c.execute(
                    "CREATE TABLE IF NOT EXISTS schema_migrations (version BIGINT PRIMARY KEY, name TEXT NOT NULL, "
                    "applied TEXT NOT NULL DEFAULT to_char(now() AT TIME ZONE 'UTC', "
                    "'YYYY-MM-DD\"T\"HH24:MI:SS.MS\"Z\"'))"
                )
                for stmt in RUNTIME_TABLES:
                    await c.execute(stmt)
                done = {r[0] for r in await c.fetch("SELECT version FROM schema_migrations")}
                for version, name, sql in lite.migration_files():
                    if version in done:
                        continue
                    async with c.transaction():
                        for stmt in lite._statements(sql):
                            await c.execute(pg_dialect(stmt))
                        await c.execute("INSERT INTO schema_migrations (version, name) VALUES ($1, $2)",
                                        version, name)
                    applied.append(version)
            finally:
                await c.execute("SELECT pg_advisory_unlock($1)", MIGRATE_LOCK)
        return applied

    # --- reading ------------------------------------------------------------------------------------------

    async def read(self, f: Filter = Filter(), batch: int = 5000) -> AsyncIterator[ev.Record]:
        where, args = _where(f)
        seq = f.since_seq
        while True:
            rows = await self.pool.fetch(
                f"SELECT {COLUMNS} FROM events WHERE {where} ORDER BY seq LIMIT {int(batch)}", seq, *args[1:]
            )
            for row in rows:
                yield lite.decode_row(tuple(row))
            if len(rows) < batch:
                return
            seq = int(rows[-1][0])

    async def last(self) -> tuple[int, str]:
        row = await self.pool.fetchrow("SELECT seq, hash FROM events ORDER BY seq DESC LIMIT 1")
        return (0, ev.GENESIS) if row is None else (int(row[0]), str(row[1]))

    async def last_at(self, time: str) -> int:
        v = await self.pool.fetchval("SELECT MAX(seq) FROM events WHERE time <= $1", time)
        return 0 if v is None else int(v)

    async def event_at(self, seq: int) -> ev.Record | None:
        async for r in self.read(Filter(since_seq=seq - 1, until_seq=seq)):
            return r if r.seq == seq else None
        return None

    # --- the write path -----------------------------------------------------------------------------------

    async def append(self, records: list[ev.Record], state: State, policy: bool) -> None:
        # Everything read from ``state`` is read before the first await (group commit, coord/service.py).
        events = [r.event for r in records]
        users, keys, nodes = lite.touched(events)
        rows = lite.event_rows(records)
        ops = lite.projection_ops(state, users, keys, nodes, policy, lite.patched_only(events, nodes),
                                  lite.dns_touched(events))
        after = records[0].seq - 1
        try:
            async with self.pool.acquire() as c, c.transaction():
                await c.execute("SELECT pg_advisory_xact_lock($1)", APPEND_LOCK)
                head = await c.fetchrow("SELECT seq, hash FROM events ORDER BY seq DESC LIMIT 1")
                seq, hash_ = (0, ev.GENESIS) if head is None else (int(head[0]), str(head[1]))
                if seq != after or hash_ != records[0].prev_hash:
                    raise StaleHead(after, seq)
                await c.executemany(pg_statement(lite.INSERT_EVENTS), rows)
                self.failpoint("insert")
                for sql, group in itertools.groupby(ops, key=lambda op: op[0]):
                    await c.executemany(pg_statement(sql), [params for _, params in group])
                await c.execute("SELECT pg_notify($1, $2)", CHANNEL, str(records[-1].seq))
        except StaleHead:
            raise
        except Exception as e:
            if _down(e):
                raise DatabaseDown(f"PostgreSQL unreachable, write refused (nothing stored): {e}") from e
            raise

    async def verify(self) -> int:
        prev, expect_seq = ev.GENESIS, 1
        after = 0
        while True:
            rows = await self.pool.fetch(
                f"SELECT {COLUMNS} FROM events WHERE seq > $1 ORDER BY seq LIMIT 5000", after
            )
            for row in rows:
                seq, time, actor, type_name, schema, data, prev_hash, hash_ = tuple(row)
                seq = int(seq)
                if seq != expect_seq:
                    raise ChainBroken(expect_seq, f"missing (next stored event is {seq})")
                if prev_hash != prev:
                    raise ChainBroken(seq, "prev_hash does not match the hash of the event before it")
                try:
                    obj = json.loads(str(data))
                    ev.from_data(str(type_name), int(schema), obj)
                except (ValueError, ev.BadEvent) as e:
                    raise ChainBroken(seq, f"undecodable data ({e})") from None
                want = ev.chain_hash_text(prev, seq, str(time), str(actor), str(type_name), int(schema), str(data))
                if want != hash_:
                    want = ev.chain_hash(prev, seq, str(time), str(actor), str(type_name), int(schema), obj)
                if want != hash_:
                    raise ChainBroken(seq, "hash does not match the event's contents")
                prev, expect_seq = str(hash_), seq + 1
            if len(rows) < 5000:
                return expect_seq - 1
            after = int(rows[-1][0])

    async def dump_projections(self) -> dict[str, list[tuple[Any, ...]]]:
        out = {}
        for table in lite.PROJECTION_TABLES:
            out[table] = [tuple(r) for r in await self.pool.fetch(f"SELECT * FROM {table} ORDER BY 1")]
        return out

    # --- replicas -----------------------------------------------------------------------------------------

    async def watch(self, wake: Callable[[int], None], stop: asyncio.Event, poll: float = 1.0) -> None:
        """Call ``wake(seq)`` for each NOTIFY; ``wake(0)`` every ``poll`` seconds as well (the fall-back when
        the listening connection is gone, reconnected with backoff). Runs until ``stop`` is set."""
        backoff = 0.2
        while not stop.is_set():
            conn: asyncpg.Connection | None = None
            try:
                conn = await asyncpg.connect(self.dsn, timeout=5)

                def heard(_c: object, _pid: int, _channel: str, payload: str) -> None:
                    wake(int(payload) if payload.isdigit() else 0)

                await conn.add_listener(CHANNEL, heard)
                backoff = 0.2
                wake(0)  # whatever was appended while nobody listened
                while not stop.is_set() and not conn.is_closed():
                    try:
                        await asyncio.wait_for(stop.wait(), poll)
                    except TimeoutError:
                        wake(0)
            except Exception as e:
                if not _down(e):
                    log.exception("listening for new events failed")
                wake(0)
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(stop.wait(), backoff)
                backoff = min(backoff * 2, poll)
            finally:
                if conn is not None and not conn.is_closed():
                    conn.terminate()

    async def heartbeat(self, name: str, url: str, seq: int, nodes: list[int], started: float, now: float) -> None:
        """This replica's row: the seq it folded, the nodes whose streams it holds, ``now``."""
        await self.pool.execute(
            "INSERT INTO replicas (name, url, seq, streams, started, seen, nodes) "
            "VALUES ($1, $2, $3, $4, $5, $6, $7) "
            "ON CONFLICT (name) DO UPDATE SET url = EXCLUDED.url, seq = EXCLUDED.seq, streams = EXCLUDED.streams, "
            "started = EXCLUDED.started, seen = EXCLUDED.seen, nodes = EXCLUDED.nodes",
            name, url, seq, len(nodes), started, now, json.dumps(sorted(nodes)),
        )

    async def replicas(self) -> tuple[int, list[dict[str, Any]]]:
        head = await self.pool.fetchval("SELECT COALESCE(MAX(seq), 0) FROM events")
        rows = await self.pool.fetch(
            "SELECT name, url, seq, streams, started, seen, nodes FROM replicas ORDER BY name"
        )
        out = []
        for r in rows:
            d = dict(r)
            d["nodes"] = json.loads(d["nodes"])
            out.append(d)
        return int(head), out

    async def acquire(self, name: str, holder: str, now: float, ttl: float) -> bool:
        """Take or renew the lease ``name`` until ``now + ttl``: True when ``holder`` holds it now."""
        got = await self.pool.fetchval(
            "INSERT INTO leases (name, holder, until) VALUES ($1, $2, $3) ON CONFLICT (name) DO UPDATE "
            "SET holder = EXCLUDED.holder, until = EXCLUDED.until "
            "WHERE leases.holder = EXCLUDED.holder OR leases.until < $4 RETURNING holder",
            name, holder, now + ttl, now,
        )
        return bool(got == holder)

    async def close(self) -> None:
        await self.pool.close()
