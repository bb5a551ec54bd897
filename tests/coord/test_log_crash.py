"""The crash matrix: a real server process SIGKILLed at each point of the write path, many times over.

Each run is a child process running the whole server (``create_app``, started: lifecycle timers, snapshots,
checkpoints) on one data dir, doing a mix of commands (users with several keys, whose deletion is a multi-event
batch; registrations; streams opening and closing; endpoint changes). It writes ``seq hash`` after every command
that returned (acknowledged) and is SIGKILLed at the n-th time it reaches one of these points:

    insert    the events are inserted, the projection rows not yet written (inside the transaction)
    batch     a batch of several events is inserted and half of its projection rows written
    snapshot  a snapshot file half written
    checkpoint  the checkpoint file half written

After every kill, before and after a restart on the same data dir: the chain verifies, a replay of the log gives
exactly the live projection rows, every acknowledged event is in the log with its hash, start-up (snapshot plus
tail) gives exactly the fold of the whole log, and the last checkpoint the server wrote is extended by the log.

A test of the test: the same checks against a store that commits the events and their projection rows in two
transactions, killed between them, must fail.
"""

from __future__ import annotations

import asyncio
import os
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import pytest

from coord import checkpoint as ckpt
from coord import logfiles, snapshot
from coord.history import History
from coord.logfiles import SnapshotDir
from coord.state import fold
from coord.store import Filter
from coord.store import sqlite as db
from coord.store.sqlite import SqliteStore

ROOT = Path(__file__).resolve().parents[2]

CHILD = r"""
import asyncio, os, signal, sys
from pathlib import Path

data, point, n, ack, mode = Path(sys.argv[1]), sys.argv[2], int(sys.argv[3]), sys.argv[4], sys.argv[5]

from coord import logfiles, wire
from coord.app import create_app
from coord.config import load
from coord.store import sqlite

hits = 0

def hit(where):
    global hits
    if where != point:
        return
    hits += 1
    if hits >= n:
        os.kill(os.getpid(), signal.SIGKILL)

real_write = logfiles.write_private

def write_private(path, payload, *, durable=True):
    kind = "snapshot" if path.name.endswith(".snap") else "checkpoint" if path.name.endswith(".line") else ""
    if kind == point and hits + 1 >= n:
        tmp = path.with_name(path.name + ".tmp")
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
        os.write(fd, payload[: len(payload) // 2])
        hit(kind)
    real_write(path, payload, durable=durable)
    if kind:
        hit(kind)

logfiles.write_private = write_private

async def main():
    cfg = load(None, env={}, overrides={
        "data_dir": str(data), "derp": False, "stun_listen": "", "batch_delay": "5ms",
        "snapshot_every": "7", "checkpoint_every": "5", "checkpoint_interval": "1h",
        "checkpoint_file": str(data.parent / "checkpoint.line"),
    })
    app = await create_app(cfg)
    store = app.service.store
    store.failpoint = hit
    if mode == "split":
        store.split_commit = True
    await app.start()
    svc, logins, life = app.service, app.logins, app.lifecycle
    out = open(ack, "a")

    def acked():
        out.write(f"{svc.state.last_seq} {svc.state.last_hash}\n")
        out.flush()

    run = len(list(data.parent.glob("run-*")))
    nodes = []
    for i in range(200):
        tag = f"r{run}i{i}"
        u = f"{tag}@example.com"
        await svc.create_user(u)
        acked()
        keys = []
        for _ in range(3):
            keys.append((await svc.create_key(u, reusable=True, ephemeral=False, expiration=3600, tags=()))["key"])
            acked()
        for j in range(2):
            m, nk = os.urandom(32), os.urandom(32)
            await logins.register(m, wire.RegisterRequest(node_key=nk, disco_key=os.urandom(32), auth_key=keys[j],
                                                          hostinfo=wire.Hostinfo(hostname=f"{tag}-{j}")))
            acked()
            nid = svc.state.by_machine[wire.key_text("mkey", m)]
            nodes.append((nid, nk))
            await life.connected(nid)
            acked()
            await svc.map_update(nid, wire.MapRequest(node_key=nk, endpoints=(f"192.0.2.{i % 250 + 1}:{j + 1000}",),
                                                      endpoint_types=(1,)))
            acked()
        if i % 2:
            for nid, _ in nodes[-2:]:
                await svc.delete_node(str(nid))
                acked()
            await svc.delete_user(u)  # three keys revoked and the user deleted: one batch of four events
            acked()
        else:
            await life.disconnected(nodes[-1][0])
            acked()
    await app.close()

asyncio.run(main())
"""


def run_child(data: Path, point: str, n: int, ack: Path, mode: str = "atomic") -> int:
    (data.parent / f"run-{time.monotonic_ns()}").touch()
    p = subprocess.run([sys.executable, "-c", CHILD, str(data), point, str(n), str(ack), mode],
                       cwd=ROOT, capture_output=True, text=True, timeout=60,
                       env={**os.environ, "SHOAL_CONFIG": "", "PYTHONPATH": str(ROOT)})
    if p.returncode != -signal.SIGKILL:
        raise AssertionError(f"child was not killed at {point} #{n} (exit {p.returncode}): {p.stderr[-2000:]}")
    return p.returncode


async def check(data: Path, ack: Path) -> list[str]:
    """Every property a crash must keep; the list of those that failed (empty: all hold)."""
    bad: list[str] = []
    store = await SqliteStore.open(data / "shoal.db")
    try:
        try:
            n = await store.verify()
        except Exception as e:
            return [f"chain does not verify: {e}"]
        records = [r async for r in store.read()]
        assert len(records) == n
        by_seq = {r.seq: r.hash for r in records}
        for line in ack.read_text().splitlines() if ack.exists() else []:
            seq, h = line.split()
            if by_seq.get(int(seq)) != h:
                bad.append(f"acknowledged event {seq} lost")
                break
        state = fold(records)
        replayed = await db.connect(":memory:")
        try:
            await replayed.execute("BEGIN")
            await db.write_all_projections(replayed, state)
            await replayed.execute("COMMIT")
            if await db.dump_projections(replayed) != await db.dump_projections(store.conn):
                bad.append("replay differs from the live projections")
        finally:
            await replayed.close()

        async def read(after: int, until: int | None) -> Any:
            async for r in store.read(Filter(since_seq=after, until_seq=until)):
                yield r

        started = await History(SnapshotDir(data / "snapshots"), read).startup()
        if snapshot.encode(started, "2000-01-01T00:00:00.000000Z") != snapshot.encode(
            state, "2000-01-01T00:00:00.000000Z"
        ):
            bad.append("start-up from the snapshot differs from the fold of the whole log")
        cp_file = data.parent / "checkpoint.line"
        if cp_file.exists():
            cp = logfiles.read_checkpoint_file(cp_file)
            key = logfiles.load_or_create_signing_key(data / "checkpoint.key")
            ckpt.verify_signature(cp, key.verify_key)
            at = records[cp.seq - 1] if 0 < cp.seq <= len(records) else None
            verdict = ckpt.extends(cp, at, n)
            if not verdict.ok:
                bad.append(verdict.text())
    finally:
        await store.close()
    return bad


POINTS = ("insert", "batch", "snapshot", "checkpoint")
HITS = (1, 2, 3, 5, 8, 13, 21, 29)


def test_log_crash_matrix(tmp_path: Path) -> None:
    t0 = time.monotonic()
    runs: list[str] = []
    for point in POINTS:
        data = tmp_path / point / "data"
        data.mkdir(parents=True)
        ack = tmp_path / point / "acked.txt"
        for n in HITS:
            run_child(data, point, n, ack)
            bad = asyncio.run(check(data, ack))
            assert not bad, f"after a kill at {point} #{n}: {bad}"
            runs.append(f"{point}#{n}")
        assert not list((data / "snapshots").glob("*.tmp")) or point == "snapshot"
    took = time.monotonic() - t0
    print(f"crash matrix: {len(runs)} kills in {took:.0f} s, all checks held: {' '.join(runs)}")
    assert len(runs) >= 30


def test_log_crash_check_catches_a_split_transaction(tmp_path: Path) -> None:
    """The test of the test: events committed without their projection rows, killed in between, is caught."""
    data = tmp_path / "data"
    data.mkdir()
    ack = tmp_path / "acked.txt"
    run_child(data, "split", 4, ack, mode="split")
    bad = asyncio.run(check(data, ack))
    assert bad == ["replay differs from the live projections"]
    # and a kill at the same step (the events inserted, their rows not yet) of the real store is fine
    data2 = tmp_path / "atomic" / "data"
    data2.mkdir(parents=True)
    run_child(data2, "insert", 4, tmp_path / "atomic" / "acked.txt")
    assert asyncio.run(check(data2, tmp_path / "atomic" / "acked.txt")) == []


@pytest.mark.parametrize("level, pragma", [("normal", 1), ("full", 2)])
def test_log_durability_levels(tmp_path: Path, level: str, pragma: int) -> None:
    async def main() -> int:
        conn = await db.connect(tmp_path / "x.db", durability=level)
        try:
            async with conn.execute("PRAGMA synchronous") as cur:
                row = await cur.fetchone()
            assert row is not None
            return int(row[0])
        finally:
            await conn.close()

    assert asyncio.run(main()) == pragma
