"""``shoal-server events ...`` and ``shoal-server info``: commands that read the log and the data dir directly.

They never need the running server (SQLite's WAL lets them read beside it) and never write an event.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

from nacl.public import PrivateKey

from coord import checkpoint as ckpt
from coord import events as ev
from coord import logfiles, nodehistory, wire
from coord.config import Config
from coord.errors import LocalError
from coord.state import State, fold
from coord.store import ChainBroken, Filter, Store
from coord.store import sqlite as db
from coord.store.sqlite import SqliteStore

EXIT_ERROR = 1

Out = Callable[[Any, str], None]


class LogCmdError(LocalError):
    pass


def add_parsers(sub: Any, common: argparse.ArgumentParser, parser_class: type[argparse.ArgumentParser]) -> None:
    sub.add_parser("info", parents=[common],
                   help="the server key nodes pin (shoal up --server-key), the checkpoint key, limits, refusals")
    events = sub.add_parser("events", parents=[common], help="read the event log").add_subparsers(
        dest="cmd", required=True, parser_class=parser_class
    )
    e = events.add_parser("tail", parents=[common])
    e.add_argument("--follow", "-f", action="store_true")
    e.add_argument("--type", action="append", default=[], help="only this event type (repeatable)")
    e.add_argument("--node", type=int, help="only events about this node id")
    e.add_argument("--since", help="only events at or after this time (RFC 3339)")
    e.add_argument("-n", type=int, default=20, help="without --since: the last N events (default 20)")
    e = events.add_parser("show", parents=[common])
    e.add_argument("seq", type=int)
    e = events.add_parser("verify", parents=[common], help="check the hash chain (and that it extends a checkpoint)")
    e.add_argument("--checkpoint", metavar="FILE", help="a file holding one checkpoint line the log must extend")
    e.add_argument("--key", help="the checkpoint public key (ckptkey:...; default: this data dir's)")
    events.add_parser("checkpoint", parents=[common], help="print a signed checkpoint of the log (appends nothing)")
    e = events.add_parser("replay", parents=[common], help="rebuild projections from the log into a new database")
    e.add_argument("--into", required=True, help="path of the new database (must not exist)")


def _record_line(r: ev.Record) -> str:
    data = ev.canonical_json(r.event.data())
    if len(data) > 160:
        data = data[:157] + "..."
    return f"{r.seq:>6}  {r.time}  {r.actor:<16} {r.event.type:<22} {data}"


async def open_store(config: Config) -> SqliteStore:
    path = config.data_path / "shoal.db"
    if not path.exists():
        raise LogCmdError(f"no database at {path}")
    return await SqliteStore.open(path)


def info(config: Config, out: Out) -> int:
    data = config.data_path
    result: dict[str, Any] = {"data_dir": str(data)}
    key_file = data / "server.key"
    if key_file.exists():
        from coord.app import load_or_create_key

        result["server_key"] = wire.key_text("mkey", bytes(PrivateKey(load_or_create_key(key_file)).public_key))
    else:
        result["server_key"] = None
    result["checkpoint_key"] = ckpt.public_text(logfiles.load_or_create_signing_key(data / "checkpoint.key"))
    snaps = logfiles.SnapshotDir(data / "snapshots").seqs()
    result["snapshots"] = len(snaps)
    result["latest_snapshot_seq"] = snaps[-1] if snaps else None
    text = "\n".join(f"{k}: {'-' if v is None else v}" for k, v in result.items())
    out(result, text)
    return 0


async def events_cmd(config: Config, args: argparse.Namespace, out: Out) -> int:
    store = await open_store(config)
    try:
        if args.cmd == "verify":
            return await verify(config, store, args, out)
        if args.cmd == "checkpoint":
            key = logfiles.load_or_create_signing_key(config.data_path / "checkpoint.key")
            import time

            cp = ckpt.sign_head(key, await store.last(), time.time())
            out({"checkpoint": cp.line(), "seq": cp.seq, "head": cp.head, "time": cp.time,
                 "key": ckpt.public_text(key)}, cp.line())
            return 0
        if args.cmd == "show":
            r = await event_at(store, args.seq)
            if r is None:
                raise LogCmdError(f"no event {args.seq}")
            out(r.as_json(), json.dumps(r.as_json(), indent=2))
            return 0
        if args.cmd == "replay":
            return await replay(store, Path(args.into), out)
        return await tail(store, args, out)
    finally:
        await store.close()


async def event_at(store: Store, seq: int) -> ev.Record | None:
    if seq < 1:
        return None
    async for r in store.read(Filter(since_seq=seq - 1, until_seq=seq)):
        return r if r.seq == seq else None
    return None


async def verify(config: Config, store: Store, args: argparse.Namespace, out: Out) -> int:
    cp: ckpt.Checkpoint | None = None
    if args.checkpoint:
        try:
            cp = logfiles.read_checkpoint_file(Path(args.checkpoint))
            if args.key:
                vk = ckpt.parse_public(args.key, "--key")
            else:
                key_file = config.data_path / "checkpoint.key"
                if not key_file.exists():
                    raise ckpt.CheckpointError(f"no {key_file}: give the checkpoint public key with --key")
                vk = logfiles.load_or_create_signing_key(key_file).verify_key
            ckpt.verify_signature(cp, vk)
        except ckpt.CheckpointError as e:
            out({"ok": False, "checkpoint_error": str(e)}, f"checkpoint refused: {e}")
            return EXIT_ERROR
    try:
        n = await store.verify()
    except ChainBroken as e:
        out({"ok": False, "first_bad_seq": e.seq, "reason": e.reason}, f"chain broken at event {e.seq}: {e.reason}")
        return EXIT_ERROR
    if cp is None:
        out({"ok": True, "events": n}, f"ok: {n} events, hash chain intact")
        return 0
    verdict = ckpt.extends(cp, await event_at(store, cp.seq), n)
    result = {"ok": verdict.ok, "events": n, "checkpoint_seq": cp.seq, "checkpoint_time": cp.time}
    if not verdict.ok:
        result["reason"] = verdict.reason
    text = (f"ok: {n} events, hash chain intact\n" if verdict.ok else f"hash chain intact ({n} events), but\n")
    out(result, text + verdict.text())
    return 0 if verdict.ok else EXIT_ERROR


async def tail(store: Store, args: argparse.Namespace, out: Out) -> int:
    try:
        since_time = ev.rfc3339(ev.parse_time(args.since)) if args.since else None
    except ValueError:
        raise LogCmdError(
            f"--since: {args.since!r} is not a time (use RFC 3339, e.g. 2026-11-25T12:00:00Z)"
        ) from None
    start = 0
    if since_time is None:
        last, _ = await store.last()
        start = max(0, last - args.n)
    f = Filter(since_seq=start, since_time=since_time, types=tuple(args.type), node_id=args.node)
    while True:
        async for r in store.read(f):
            out(r.as_json(), _record_line(r))
            f = Filter(since_seq=r.seq, types=f.types, node_id=f.node_id)
        sys.stdout.flush()
        if not args.follow:
            return 0
        await asyncio.sleep(0.5)


async def replay(store: SqliteStore, into: Path, out: Out) -> int:
    if into.exists():
        raise LogCmdError(f"{into} exists; replay writes a new database")
    # Streamed: the rows are copied as stored and folded as they go by, so memory stays that of the state.
    state = State()
    n = 0
    new = await db.connect(into)
    try:
        await new.execute("BEGIN IMMEDIATE")
        async for rows in db.read_rows(store.conn, batch=20_000):
            await new.executemany(db.INSERT_EVENTS, rows)
            fold([db.decode_row(row) for row in rows], state)
            n += len(rows)
        await db.write_all_projections(new, state)
        await new.execute("COMMIT")
        same = await db.dump_projections(new) == await db.dump_projections(store.conn)
    finally:
        await new.close()
    out({"events": n, "into": str(into), "projections_equal_live": same},
        f"replayed {n} events into {into}; projections "
        + ("equal the live ones" if same else "DIFFER from the live ones"))
    return 0 if same else EXIT_ERROR


def _time_arg(text: str | None, flag: str) -> str | None:
    if not text:
        return None
    try:
        return ev.rfc3339(ev.parse_time(text))
    except ValueError:
        raise LogCmdError(f"{flag}: {text!r} is not a time (use RFC 3339, e.g. 2026-11-25T12:00:00Z)") from None


async def resolve_node(store: Store, ref: str) -> int:
    """A node id, or the node a name belongs to: its current name first, else the last node that had it."""
    if ref.isdigit():
        return int(ref)
    current: dict[int, str] = {}
    had: list[int] = []
    async for r in store.read(Filter(types=("NodeRegistered", "NodeRenamed", "NodeDeleted"))):
        e = r.event
        if isinstance(e, ev.NodeDeleted):
            current.pop(e.node_id, None)
            continue
        name = e.data().get("given_name")
        if isinstance(name, str):
            current[e.data()["node_id"]] = name
            if name == ref:
                had.append(e.data()["node_id"])
    now = [nid for nid, name in current.items() if name == ref]
    if now:
        return now[0]
    if had:
        return had[-1]
    raise LogCmdError(f"no node {ref!r} in the log (give its id or a name it had)")


async def node_history(config: Config, args: argparse.Namespace, out: Out) -> int:
    import time

    since, until = _time_arg(args.since, "--since"), _time_arg(args.until, "--until")
    if since and until and since > until:
        raise LogCmdError("--since is after --until")
    store = await open_store(config)
    try:
        nid = await resolve_node(store, args.node)
        records = [r async for r in store.read(Filter(node_id=nid, until_time=until))]
    finally:
        await store.close()
    if not any(isinstance(r.event, ev.NodeRegistered) for r in records):
        raise LogCmdError(f"no node {nid} in the log")
    h = nodehistory.fold(nid, records, now=ev.rfc3339(time.time()), since=since, until=until)
    out(h.as_json(), h.text())
    return 0
