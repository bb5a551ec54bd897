"""The hash-chained event log: the only SQL that touches ``events``. Row layout in coord/events.py."""

from __future__ import annotations

import json
from collections.abc import AsyncIterator
from dataclasses import dataclass

import aiosqlite

from coord import events as ev


class ChainBroken(Exception):
    def __init__(self, seq: int, reason: str) -> None:
        super().__init__(f"event {seq}: {reason}")
        self.seq = seq
        self.reason = reason


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


@dataclass(frozen=True)
class Filter:
    since_seq: int = 0
    until_time: str | None = None  # inclusive, RFC 3339
    since_time: str | None = None
    types: tuple[str, ...] = ()
    node_id: int | None = None


def _where(f: Filter) -> tuple[str, list[object]]:
    clauses: list[str] = ["seq > ?"]
    args: list[object] = [f.since_seq]
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
    where, args = _where(f)
    seq = f.since_seq
    while True:
        async with conn.execute(
            f"SELECT seq, time, actor, type, schema, data, prev_hash, hash FROM events WHERE {where} "
            "ORDER BY seq LIMIT ?",
            [seq, *args[1:], batch],
        ) as cur:
            rows = list(await cur.fetchall())
        for row in rows:
            yield decode_row(tuple(row))
        if len(rows) < batch:
            return
        seq = int(rows[-1][0])


def decode_row(row: tuple[object, ...]) -> ev.Record:
    seq, time, actor, type_name, schema, data, prev_hash, hash_ = row
    obj = json.loads(str(data))
    event = ev.from_data(str(type_name), int(str(schema)), obj)
    return ev.Record(int(str(seq)), str(time), str(actor), event, str(prev_hash), str(hash_))


async def verify(conn: aiosqlite.Connection) -> int:
    """Walks the whole chain; returns the number of events, or raises ChainBroken at the first bad one."""
    prev, expect_seq = ev.GENESIS, 1
    async with conn.execute(
        "SELECT seq, time, actor, type, schema, data, prev_hash, hash FROM events ORDER BY seq"
    ) as cur:
        async for row in cur:
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
            want = ev.chain_hash(prev, seq, str(time), str(actor), str(type_name), int(schema), obj)
            if want != hash_:
                raise ChainBroken(seq, "hash does not match the event's contents")
            prev, expect_seq = str(hash_), seq + 1
    return expect_seq - 1
