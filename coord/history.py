"""The tailnet at any seq: start-up from the latest snapshot plus the tail, snapshots every N events, time travel.

``History`` reads the log through a ``read(after_seq, until_seq)`` function (the store's) and keeps the snapshot
series in ``<data>/snapshots`` (coord/logfiles.py; format and retention in coord/snapshot.py). A snapshot is only a
cache of the fold: before one is used, its (seq, hash) must be the log's event at that seq, so a snapshot from
another log, a torn file or one written by another version of the code is skipped and an older one (or the whole
log) is folded instead. ``events verify`` and ``events replay`` never use snapshots: they walk the whole log.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass

from coord import events as ev
from coord import snapshot as snap
from coord.logfiles import SnapshotDir
from coord.state import State, apply

log = logging.getLogger("shoal.history")

# read(after_seq, until_seq): the records after ``after_seq`` up to ``until_seq`` (None: the end), in order.
Read = Callable[[int, int | None], AsyncIterator[ev.Record]]


async def fold_into(state: State, records: AsyncIterator[ev.Record]) -> State:
    async for r in records:
        apply(state, r.event, r.ts)
        state.last_seq, state.last_hash, state.last_time = r.seq, r.hash, r.time
    return state


@dataclass
class Loaded:
    state: State
    snapshot_seq: int  # 0: no snapshot was used
    folded: int  # events folded on top of it


class History:
    def __init__(self, snapshots: SnapshotDir, read: Read, every: int = 10_000) -> None:
        self.snapshots = snapshots
        self.read = read
        self.every = every
        self.last_snapshot = 0
        self._writing: asyncio.Task[None] | None = None
        self.written = 0
        self.failures = 0

    async def _event(self, seq: int) -> ev.Record | None:
        async for r in self.read(seq - 1, seq):
            return r if r.seq == seq else None
        return None

    async def _usable(self, seq: int) -> State | None:
        try:
            st = await asyncio.to_thread(self.snapshots.read, seq)
        except (OSError, snap.SnapshotError) as e:
            log.warning("snapshot %d skipped: %s", seq, e)
            return None
        r = await self._event(seq)
        if r is None or r.hash != st.last_hash:
            log.warning("snapshot %d skipped: it is not of this log (event %d differs or is missing)", seq, seq)
            return None
        st.last_time = r.time
        return st

    async def load(self, until: int | None = None) -> Loaded:
        """The fold of events 1..until (None: all), from the nearest usable snapshot at or before it."""
        for seq in reversed(self.snapshots.seqs()):
            if until is not None and seq > until:
                continue
            st = await self._usable(seq)
            if st is None:
                continue
            before = st.last_seq
            await fold_into(st, self.read(seq, until))
            return Loaded(st, seq, st.last_seq - before)
        st = await fold_into(State(), self.read(0, until))
        return Loaded(st, 0, st.last_seq)

    async def state_at(self, seq: int) -> State:
        """The tailnet as it was right after event ``seq`` (a prefix of the log: seq 0 is the empty tailnet)."""
        if seq <= 0:
            return State()
        return (await self.load(seq)).state

    async def startup(self) -> State:
        self.snapshots.clean_temporaries()
        loaded = await self.load()
        self.last_snapshot = loaded.snapshot_seq
        log.debug("state loaded: snapshot at seq %d plus %d events", loaded.snapshot_seq, loaded.folded)
        return loaded.state

    # --- writing ----------------------------------------------------------------------------------------

    def due(self, state: State) -> bool:
        return self.every > 0 and state.last_seq - self.last_snapshot >= self.every

    def maybe_snapshot(self, state: State) -> asyncio.Task[None] | None:
        """After an append: every ``every`` events, snapshot ``state`` (its body now, the file in a thread)."""
        if not self.due(state) or (self._writing is not None and not self._writing.done()):
            return None
        # The fold mutates the state in place: its encoding must be taken now, before the next append.
        body = snap.body_bytes(state)
        seq, hash_, time = state.last_seq, state.last_hash, state.last_time
        self.last_snapshot = seq
        self._writing = asyncio.get_running_loop().create_task(self._write(seq, hash_, time, body))
        return self._writing

    async def _write(self, seq: int, hash_: str, time: str, body: bytes) -> None:
        try:
            await asyncio.to_thread(self._write_blocking, seq, hash_, time, body)
            self.written += 1
        except Exception:
            self.failures += 1
            log.exception("snapshot at seq %d not written (start-up folds more of the log until the next one)", seq)

    def _write_blocking(self, seq: int, hash_: str, time: str, body: bytes) -> None:
        self.snapshots.write(snap.seal(seq, hash_, time, body))
        self.snapshots.prune(ev.parse_time(time))

    async def flush(self) -> None:
        if self._writing is not None:
            await asyncio.gather(self._writing, return_exceptions=True)
