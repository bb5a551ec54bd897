"""SQLite storage (aiosqlite): pragmas, the migration runner, the hash-chained event log and its projections.

This module holds all of the server's SQL. The ``events`` row layout is documented in coord/events.py, the tables in
migrations/. ``SqliteStore`` is the ``coord.store.Store`` the server runs on; the module-level functions take a
connection, for the CLI's maintenance commands (``events replay``) and the migration tests.
"""

from __future__ import annotations

import asyncio
import itertools
import json
import re
import sqlite3
from collections.abc import AsyncIterator, Callable
from collections.abc import Set as AbstractSet
from importlib import resources
from pathlib import Path
from typing import Any

import aiosqlite

from coord import events as ev
from coord import private
from coord.state import State
from coord.store import ChainBroken, Filter

MIGRATION_NAME = re.compile(r"^(\d{4})_([a-z0-9_]+)\.sql$")


DURABILITY = {"normal": "NORMAL", "full": "FULL"}


async def connect(path: str | Path, durability: str = "normal") -> aiosqlite.Connection:
    """``durability``: "normal" keeps every acknowledged commit across a process crash (an OS crash or power loss
    may drop the last ones, never half of one); "full" fsyncs each commit, so it survives those too (docs/control.md).
    """
    if durability not in DURABILITY:
        raise ValueError(f"durability: {durability!r} is not one of {', '.join(DURABILITY)}")
    # 0600 before sqlite sees it: sqlite creates -wal, -shm and -journal with the database file's mode.
    if str(path) != ":memory:":  # sqlite's in-memory database has no file to narrow (nor to create in the cwd)
        path = Path(path)
        private.touch(path)
        for suffix in ("-wal", "-shm", "-journal"):
            private.narrow(path.with_name(path.name + suffix))
    conn = await aiosqlite.connect(str(path), isolation_level=None)
    # WAL: readers (the CLI, `events tail --follow`) never block the server.
    await conn.execute("PRAGMA journal_mode=WAL")
    await conn.execute(f"PRAGMA synchronous={DURABILITY[durability]}")
    await conn.execute("PRAGMA busy_timeout=5000")
    await conn.execute("PRAGMA foreign_keys=ON")
    await migrate(conn)
    return conn


def migration_files() -> list[tuple[int, str, str]]:
    out = []
    for entry in resources.files("migrations").iterdir():
        m = MIGRATION_NAME.match(entry.name)
        if m:
            out.append((int(m.group(1)), m.group(2), entry.read_text()))
    return sorted(out)


async def migrate(conn: aiosqlite.Connection) -> list[int]:
    await conn.execute(
        "CREATE TABLE IF NOT EXISTS schema_migrations (version INTEGER PRIMARY KEY, name TEXT NOT NULL, "
        "applied TEXT NOT NULL DEFAULT (strftime('%Y-%m-%dT%H:%M:%fZ','now')))"
    )
    async with conn.execute("SELECT version FROM schema_migrations") as cur:
        done = {row[0] for row in await cur.fetchall()}
    applied = []
    for version, name, sql in migration_files():
        if version in done:
            continue
        await conn.execute("BEGIN IMMEDIATE")
        try:
            for stmt in _statements(sql):
                await conn.execute(stmt)
            await conn.execute("INSERT INTO schema_migrations (version, name) VALUES (?, ?)", (version, name))
            await conn.execute("COMMIT")
        except BaseException:
            await conn.execute("ROLLBACK")
            raise
        applied.append(version)
    return applied


def _statements(sql: str) -> list[str]:
    lines = [ln for ln in sql.splitlines() if not ln.strip().startswith("--")]
    return [s.strip() for s in "\n".join(lines).split(";") if s.strip()]


# --- projections ------------------------------------------------------------------------------------------


# Events that change only a node's patchable columns (none of them UNIQUE): their rows get an UPDATE of those.
PATCH_EVENTS = ("NodeEndpointsChanged", "NodeConnected", "NodeDisconnected", "NodeDiscoKeyChanged")


def touched(events: list[ev.Event]) -> tuple[set[int], set[int], set[int]]:
    users: set[int] = set()
    keys: set[int] = set()
    nodes: set[int] = set()
    for e in events:
        d = e.data()
        if "user_id" in d and isinstance(d["user_id"], int):
            users.add(d["user_id"])
        if "key_id" in d:
            keys.add(d["key_id"])
        if d.get("auth_key_id") is not None:
            keys.add(d["auth_key_id"])
        if "node_id" in d:
            nodes.add(d["node_id"])
    return users, keys, nodes


def patched_only(events: list[ev.Event], nodes: set[int]) -> set[int]:
    """The touched nodes that only patch events touched (their row exists and keeps its UNIQUE columns)."""
    out = set(nodes)
    for e in events:
        if e.type not in PATCH_EVENTS:
            out.discard(getattr(e, "node_id", None))
    return out


_LIST = json.JSONEncoder(separators=(",", ":"))


def _j(v: Any) -> str:
    return _LIST.encode(list(v))


PATCH_NODE = (
    "UPDATE nodes SET disco_key = ?, endpoints = ?, endpoint_types = ?, home_derp = ?, online = ?, last_seen = ? "
    "WHERE id = ?"
)


DNS_EVENTS = ("DNSConfigSeeded", "DNSSettingsSet", "DNSBaseDomainSet", "DNSRecordAdded", "DNSRecordRemoved",
              "DNSRecordsFileLoaded")


def dns_touched(events: list[ev.Event]) -> bool:
    return any(e.type in DNS_EVENTS for e in events)


def _dns_settings_json(s: Any) -> str:
    return _LIST.encode([s.magic_dns, s.nameservers, s.split, s.search_domains, s.override_local_dns,
                         s.extra_records])


def projection_ops(
    state: State, users: set[int], keys: set[int], nodes: set[int], policy: bool,
    patched: AbstractSet[int] = frozenset(), dns: bool = False,
) -> list[tuple[str, tuple[Any, ...]]]:
    """The statements that bring the projection rows of these ids up to ``state`` (built on the event loop, where
    the state is consistent; run in the connection's thread). ``patched``: nodes among ``nodes`` whose row only
    needs its patchable columns (``patched_only``), an UPDATE instead of a delete and insert."""
    ops: list[tuple[str, tuple[Any, ...]]] = []
    for nid in sorted(patched):
        p = state.nodes[nid]
        ops.append((PATCH_NODE, (p.disco_key, _j(p.endpoints), _j(p.endpoint_types), p.home_derp, p.online,
                                 p.last_seen, nid)))
    nodes = nodes - patched
    for uid in users:
        u = state.users.get(uid)
        if u is None:
            ops.append(("DELETE FROM users WHERE id = ?", (uid,)))
        else:
            ops.append((
                "INSERT INTO users (id, name, created) VALUES (?, ?, ?) "
                "ON CONFLICT(id) DO UPDATE SET name = excluded.name",
                (u.id, u.name, u.created),
            ))
    for kid in keys:
        k = state.keys[kid]
        ops.append((
            "INSERT OR REPLACE INTO auth_keys (id, prefix, hash, user_id, reusable, ephemeral, expiration, tags, "
            "created, revoked, used_by) VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?)",
            (k.id, k.prefix, k.hash, k.user_id, k.reusable, k.ephemeral, k.expiration, _j(k.tags), k.created,
             k.revoked, _j(k.used_by)),
        ))
    for nid in nodes:
        # Delete first so that UNIQUE columns (names, keys) moving between nodes never collide mid-batch.
        ops.append(("DELETE FROM nodes WHERE id = ?", (nid,)))
    for nid in sorted(nodes):
        n = state.nodes.get(nid)
        if n is None:
            continue
        ops.append((
            "INSERT INTO nodes (id, machine_key, node_key, disco_key, user_id, tags, hostname, os, given_name, "
            "name_by_admin, ipv4, ipv6, ephemeral, key_expiry, created, auth_key_id, routes, endpoints, "
            "endpoint_types, home_derp, online, last_seen, expired, logged_out, approved_routes, via) "
            "VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?)",
            (n.id, n.machine_key, n.node_key, n.disco_key, n.user_id, _j(n.tags), n.hostname, n.os, n.given_name,
             n.name_by_admin, n.ipv4, n.ipv6, n.ephemeral, n.key_expiry, n.created, n.auth_key_id, _j(n.routes),
             _j(n.endpoints), _j(n.endpoint_types), n.home_derp, n.online, n.last_seen, n.expired, n.logged_out,
             _j(n.approved_routes), n.via),
        ))
    if policy:
        # The row exists exactly when a policy is in force, live and in a replay alike.
        if state.policy_text is None:
            ops.append(("DELETE FROM policy WHERE id = 1", ()))
        else:
            ops.append(("INSERT OR REPLACE INTO policy (id, text, sha256) VALUES (1, ?, ?)",
                        (state.policy_text, state.policy_sha256)))
    if dns:
        d = state.dns
        ops.append((
            "INSERT OR REPLACE INTO dns (id, magic_dns, nameservers, split, search_domains, override_local_dns, "
            "extra_records, file_records, seed, base_domain) VALUES (1, ?, ?, ?, ?, ?, ?, ?, ?, ?)",
            (d.magic_dns, _j(d.nameservers), _LIST.encode(d.split), _j(d.search_domains), d.override_local_dns,
             _LIST.encode(d.extra_records), _LIST.encode(state.dns_file_records), _dns_settings_json(state.dns_seed),
             state.base_domain),
        ))
    return ops


async def write_projections(
    conn: aiosqlite.Connection, state: State, users: set[int], keys: set[int], nodes: set[int], policy: bool,
    dns: bool = False,
) -> None:
    ops = projection_ops(state, users, keys, nodes, policy, dns=dns)
    for sql, group in itertools.groupby(ops, key=lambda op: op[0]):
        await conn.executemany(sql, [params for _, params in group])


async def write_all_projections(conn: aiosqlite.Connection, state: State) -> None:
    await write_projections(
        conn, state, set(state.users), set(state.keys), set(state.nodes), state.policy_text is not None,
        # The row exists exactly when a DNS event was logged, live and in a replay alike.
        dns=state.dns_version > 0,
    )


PROJECTION_TABLES = ("users", "auth_keys", "nodes", "policy", "dns")


async def dump_projections(conn: aiosqlite.Connection) -> dict[str, list[tuple[Any, ...]]]:
    out = {}
    for table in PROJECTION_TABLES:
        async with conn.execute(f"SELECT * FROM {table} ORDER BY 1") as cur:
            out[table] = [tuple(r) for r in await cur.fetchall()]
    return out


# --- the event log ---------------------------------------------------------------------------------------


async def insert(conn: aiosqlite.Connection, records: list[ev.Record]) -> None:
    """Insert inside the caller's transaction; the caller checked ``seq`` follows the last one."""
    await conn.executemany(
        "INSERT INTO events (seq, time, actor, type, schema, data, prev_hash, hash) VALUES (?, ?, ?, ?, ?, ?, ?, ?)",
        [
            (r.seq, r.time, r.actor, r.event.type, r.event.SCHEMA, ev.canonical_json(r.event.data()), r.prev_hash,
             r.hash)
            for r in records
        ],
    )


async def last(conn: aiosqlite.Connection) -> tuple[int, str]:
    async with conn.execute("SELECT seq, hash FROM events ORDER BY seq DESC LIMIT 1") as cur:
        row = await cur.fetchone()
    return (0, ev.GENESIS) if row is None else (int(row[0]), str(row[1]))


def _where(f: Filter) -> tuple[str, list[object]]:
    clauses: list[str] = ["seq > ?"]
    args: list[object] = [f.since_seq]
    if f.until_seq is not None:
        clauses.append("seq <= ?")
        args.append(f.until_seq)
    if f.until_time:
        clauses.append("time <= ?")
        args.append(f.until_time)
    if f.since_time:
        clauses.append("time >= ?")
        args.append(f.since_time)
    if f.types:
        clauses.append(f"type IN ({','.join('?' * len(f.types))})")
        args.extend(f.types)
    if f.node_id is not None:
        clauses.append("json_extract(data, '$.node_id') = ?")
        args.append(f.node_id)
    return " AND ".join(clauses), args


async def read(conn: aiosqlite.Connection, f: Filter = Filter(), batch: int = 5000) -> AsyncIterator[ev.Record]:
    """Records in order. Rows are decoded without trusting them: use ``verify`` to check the chain."""
    async for rows in read_rows(conn, f, batch):
        for row in rows:
            yield decode_row(row)


async def read_rows(
    conn: aiosqlite.Connection, f: Filter = Filter(), batch: int = 5000
) -> AsyncIterator[list[tuple[Any, ...]]]:
    """The stored rows (``INSERT_EVENTS`` order), ``batch`` at a time."""
    where, args = _where(f)
    seq = f.since_seq
    while True:
        async with conn.execute(
            f"SELECT seq, time, actor, type, schema, data, prev_hash, hash FROM events WHERE {where} "
            "ORDER BY seq LIMIT ?",
            [seq, *args[1:], batch],
        ) as cur:
            rows = [tuple(r) for r in await cur.fetchall()]
        if rows:
            yield rows
        if len(rows) < batch:
            return
        seq = int(rows[-1][0])


def decode_row(row: tuple[object, ...]) -> ev.Record:
    seq, time, actor, type_name, schema, data, prev_hash, hash_ = row
    obj = json.loads(str(data))
    event = ev.from_data(str(type_name), int(str(schema)), obj)
    return ev.Record(int(str(seq)), str(time), str(actor), event, str(prev_hash), str(hash_))


def check_row(prev: str, expect_seq: int, row: tuple[Any, ...]) -> tuple[str, int]:
    """One stored event in a walk of the chain (SQLite's and PostgreSQL's alike): (its hash, the next seq), or
    ChainBroken naming the first bad seq and why."""
    seq, time, actor, type_name, schema, data, prev_hash, hash_ = row
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
    # The stored text as it is, then (if it was re-encoded, e.g. by hand) its canonical form: a match of the first
    # proves the text is the one sealed, since the list around it is canonical JSON too.
    want = ev.chain_hash_text(prev, seq, str(time), str(actor), str(type_name), int(schema), str(data))
    if want != hash_:
        want = ev.chain_hash(prev, seq, str(time), str(actor), str(type_name), int(schema), obj)
    if want != hash_:
        raise ChainBroken(seq, "hash does not match the event's contents")
    return str(hash_), seq + 1


async def verify(conn: aiosqlite.Connection) -> int:
    """Walks the whole chain; returns the number of events, or raises ChainBroken at the first bad one."""
    prev, expect_seq = ev.GENESIS, 1
    async with conn.execute(
        "SELECT seq, time, actor, type, schema, data, prev_hash, hash FROM events ORDER BY seq"
    ) as cur:
        async for row in cur:
            prev, expect_seq = check_row(prev, expect_seq, tuple(row))
    return expect_seq - 1


# --- the Store ----------------------------------------------------------------------------------------------


def event_rows(records: list[ev.Record]) -> list[tuple[Any, ...]]:
    return [
        (r.seq, r.time, r.actor, r.event.type, r.event.SCHEMA, r.data_text or ev.canonical_json(r.event.data()),
         r.prev_hash, r.hash)
        for r in records
    ]


INSERT_EVENTS = (
    "INSERT INTO events (seq, time, actor, type, schema, data, prev_hash, hash) VALUES (?, ?, ?, ?, ?, ?, ?, ?)"
)


def _run(c: sqlite3.Connection, ops: list[tuple[str, tuple[Any, ...]]]) -> None:
    """Run ``ops`` in order, each run of one statement as one executemany."""
    for sql, group in itertools.groupby(ops, key=lambda op: op[0]):
        c.executemany(sql, [params for _, params in group])


def _no_failpoint(where: str) -> None:
    pass


class SqliteStore:
    """One connection, in autocommit mode; ``append`` opens its own transaction.

    ``failpoint(name)`` is called at each step of an append ("insert": events inserted, no projection row yet;
    "batch": half the projection rows of a multi-event batch written), inside the transaction; the crash tests
    kill the process there. ``split_commit`` commits the events and their projection rows in two transactions:
    wrong, and only there so that a test can show the crash tests catch it.
    """

    def __init__(self, conn: aiosqlite.Connection, writer: sqlite3.Connection | None = None) -> None:
        self.conn = conn
        self.writer = writer
        self.failpoint: Callable[[str], None] = _no_failpoint
        self.split_commit = False
        self._txn_lock = asyncio.Lock()

    @classmethod
    async def open(cls, path: str | Path, durability: str = "normal") -> SqliteStore:
        conn = await connect(path, durability)
        # Appends run on their own connection, one transaction per batch of commands (group commit); reads stay
        # on the aiosqlite connection.
        writer = sqlite3.connect(str(path), isolation_level=None, check_same_thread=False)
        writer.execute("PRAGMA journal_mode=WAL")
        writer.execute(f"PRAGMA synchronous={DURABILITY[durability]}")
        writer.execute("PRAGMA busy_timeout=5000")
        writer.execute("PRAGMA foreign_keys=ON")
        return cls(conn, writer)

    def read(self, f: Filter = Filter()) -> AsyncIterator[ev.Record]:
        return read(self.conn, f)

    async def last(self) -> tuple[int, str]:
        return await last(self.conn)

    async def last_at(self, time: str) -> int:
        async with self.conn.execute("SELECT MAX(seq) FROM events WHERE time <= ?", (time,)) as cur:
            row = await cur.fetchone()
        return 0 if row is None or row[0] is None else int(row[0])

    async def append(self, records: list[ev.Record], state: State, policy: bool) -> None:
        # Everything read from ``state`` is read here, before the first await: the service folds the next commands
        # while this transaction runs (group commit, coord/service.py).
        events = [r.event for r in records]
        users, keys, nodes = touched(events)
        rows = event_rows(records)
        ops = projection_ops(state, users, keys, nodes, policy, patched_only(events, nodes), dns_touched(events))
        async with self._txn_lock:
            if self.writer is None:
                await self.conn._execute(self._append_txn, self.conn._conn, rows, ops, len(records) > 1)  # type: ignore[no-untyped-call]
            else:
                # In a thread: the event loop folds the next batch meanwhile (sqlite releases the GIL), and an
                # fsync (``--durability full``) never stalls it. One thread switch per transaction, not per event.
                await asyncio.to_thread(self._append_txn, self.writer, rows, ops, len(records) > 1)

    def _append_txn(self, c: sqlite3.Connection, rows: list[tuple[Any, ...]], ops: list[tuple[str, tuple[Any, ...]]],
                    batch: bool) -> None:
        c.execute("BEGIN IMMEDIATE")
        try:
            c.executemany(INSERT_EVENTS, rows)
            self.failpoint("insert")
            if self.split_commit:
                c.execute("COMMIT")
                self.failpoint("split")
                c.execute("BEGIN IMMEDIATE")
            half = len(ops) // 2 if batch else len(ops)
            _run(c, ops[:half])
            if batch:
                self.failpoint("batch")
            _run(c, ops[half:])
            c.execute("COMMIT")
        except BaseException:
            c.execute("ROLLBACK")
            raise

    async def put_secret(self, credential_id: str, secret_hash: str) -> None:
        """The hash of a credential's secret, written (and committed) before the event that creates it."""
        await self.conn.execute(
            "INSERT OR REPLACE INTO credential_secrets (id, hash) VALUES (?, ?)", (credential_id, secret_hash)
        )
        await self.conn.commit()

    async def secrets(self) -> dict[str, str]:
        async with self.conn.execute("SELECT id, hash FROM credential_secrets") as cur:
            return {str(i): str(h) for i, h in await cur.fetchall()}

    async def event_at(self, seq: int) -> ev.Record | None:
        async for r in self.read(Filter(since_seq=seq - 1, until_seq=seq)):
            return r if r.seq == seq else None
        return None

    async def verify(self) -> int:
        return await verify(self.conn)

    async def close(self) -> None:
        if self.writer is not None:
            self.writer.close()
        await self.conn.close()


# --- webhooks (migrations/0006_webhooks.sql) -------------------------------------------------------------------


class WebhookTables:
    """Delivery bookkeeping and signing secrets of webhook endpoints: not projections of the log (no event holds a
    secret), so a replay leaves them alone. Each call is its own autocommit statement on the reader connection."""

    def __init__(self, conn: aiosqlite.Connection) -> None:
        self.conn = conn
        # Endpoints deliver concurrently on one connection: one write (or transaction) at a time.
        self._lock = asyncio.Lock()
        self._inflight: set[asyncio.Task[None]] = set()

    async def put_secret(self, endpoint_id: str, secret: str) -> None:
        async with self._lock:
            await self.conn.execute("INSERT OR REPLACE INTO webhook_secrets (endpoint_id, secret) VALUES (?, ?)",
                                    (endpoint_id, secret))

    async def secret(self, endpoint_id: str) -> str | None:
        async with self.conn.execute("SELECT secret FROM webhook_secrets WHERE endpoint_id = ?",
                                     (endpoint_id,)) as cur:
            row = await cur.fetchone()
        return None if row is None else str(row[0])

    async def forget(self, endpoint_id: str) -> None:
        """An endpoint removed: its secret and cursor go; its delivery history stays."""
        async with self._lock:
            await self.conn.execute("DELETE FROM webhook_secrets WHERE endpoint_id = ?", (endpoint_id,))
            await self.conn.execute("DELETE FROM webhook_cursors WHERE endpoint_id = ?", (endpoint_id,))

    async def cursor(self, endpoint_id: str) -> int | None:
        async with self.conn.execute("SELECT seq FROM webhook_cursors WHERE endpoint_id = ?", (endpoint_id,)) as cur:
            row = await cur.fetchone()
        return None if row is None else int(row[0])

    async def set_cursor(self, endpoint_id: str, seq: int) -> None:
        async with self._lock:
            await self._set_cursor(endpoint_id, seq)

    async def _set_cursor(self, endpoint_id: str, seq: int) -> None:
        """Never backwards: a cursor only moves on."""
        await self.conn.execute(
            "INSERT INTO webhook_cursors (endpoint_id, seq) VALUES (?, ?) "
            "ON CONFLICT(endpoint_id) DO UPDATE SET seq = max(seq, excluded.seq)", (endpoint_id, seq))

    async def attempt(self, endpoint_id: str, first_seq: int, last_seq: int, events: int, attempt: int,
                      time: float, status: int | None, error: str, outcome: str) -> None:
        async with self._lock:
            await self._attempt(endpoint_id, first_seq, last_seq, events, attempt, time, status, error, outcome)

    async def _attempt(self, endpoint_id: str, first_seq: int, last_seq: int, events: int, attempt: int,
                       time: float, status: int | None, error: str, outcome: str) -> None:
        await self.conn.execute(
            "INSERT INTO webhook_deliveries (endpoint_id, first_seq, last_seq, events, attempt, time, status, "
            "error, outcome) VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?)",
            (endpoint_id, first_seq, last_seq, events, attempt, time, status, error, outcome))

    async def attempt_and_cursor(self, endpoint_id: str, first_seq: int, last_seq: int, events: int, attempt: int,
                                 time: float, status: int | None, error: str, outcome: str) -> None:
        """The last attempt of a batch (delivered or undeliverable) and the cursor past it, in one transaction.

        Shielded: a cancellation (shutdown) while it runs must neither leave it half done nor be turned into a
        failed ROLLBACK after a COMMIT that ran anyway; ``drain`` waits for it before the connection closes."""
        task = asyncio.get_running_loop().create_task(self._attempt_and_cursor(
            endpoint_id, first_seq, last_seq, events, attempt, time, status, error, outcome))
        self._inflight.add(task)
        task.add_done_callback(self._inflight.discard)
        await asyncio.shield(task)

    async def _attempt_and_cursor(self, endpoint_id: str, first_seq: int, last_seq: int, events: int, attempt: int,
                                  time: float, status: int | None, error: str, outcome: str) -> None:
        async with self._lock:
            await self.conn.execute("BEGIN IMMEDIATE")
            try:
                await self._attempt(endpoint_id, first_seq, last_seq, events, attempt, time, status, error, outcome)
                await self._set_cursor(endpoint_id, last_seq)
            except BaseException:
                await self.conn.execute("ROLLBACK")
                raise
            await self.conn.execute("COMMIT")

    async def drain(self) -> None:
        """Wait for shielded transactions still running (before the connection closes)."""
        await asyncio.gather(*self._inflight, return_exceptions=True)

    async def pending_since(self, endpoint_id: str, first_seq: int) -> tuple[float | None, int]:
        """(time of the first failed attempt, failed attempts) of the batch starting at ``first_seq``: a batch
        retried across a restart keeps its window."""
        async with self.conn.execute(
            "SELECT min(time), count(*) FROM webhook_deliveries WHERE endpoint_id = ? AND first_seq = ? "
            "AND outcome = 'failed'", (endpoint_id, first_seq)) as cur:
            row = await cur.fetchone()
        if row is None or row[0] is None:
            return None, 0
        return float(row[0]), int(row[1])

    async def deliveries(self, endpoint_id: str | None, limit: int) -> list[dict[str, Any]]:
        where, args = ("WHERE endpoint_id = ?", [endpoint_id]) if endpoint_id else ("", [])
        async with self.conn.execute(
            "SELECT id, endpoint_id, first_seq, last_seq, events, attempt, time, status, error, outcome "
            f"FROM webhook_deliveries {where} ORDER BY id DESC LIMIT ?", [*args, limit]) as cur:
            rows = await cur.fetchall()
        keys = ("id", "endpoint", "first_seq", "last_seq", "events", "attempt", "time", "status", "error", "outcome")
        return [dict(zip(keys, tuple(r), strict=True)) for r in reversed(list(rows))]

    async def last_outcomes(self) -> dict[str, dict[str, Any]]:
        async with self.conn.execute(
            "SELECT endpoint_id, outcome, status, time, error FROM webhook_deliveries WHERE id IN "
            "(SELECT max(id) FROM webhook_deliveries GROUP BY endpoint_id)") as cur:
            rows = await cur.fetchall()
        return {str(r[0]): {"outcome": r[1], "status": r[2], "time": r[3], "error": r[4]} for r in rows}
