"""Storage: the one interface the service writes and reads through.

The event log is the source of truth; projection rows (users, auth_keys, nodes, policy) are written beside each
batch of events in the same transaction so that SQL readers see current rows. ``sqlite.SqliteStore`` is the
server's store (aiosqlite); ``memory.MemoryStore`` keeps the log in a list, for tests of the write path. A second
durable implementation (PostgreSQL) implements this same ``Store``; commands never see which one they run on.
"""

from __future__ import annotations

from collections.abc import AsyncIterator
from dataclasses import dataclass
from typing import Protocol

from coord import events as ev
from coord.errors import CoordError
from coord.state import State, fold


@dataclass(frozen=True)
class Filter:
    since_seq: int = 0
    until_seq: int | None = None  # inclusive
    until_time: str | None = None  # inclusive, RFC 3339
    since_time: str | None = None
    types: tuple[str, ...] = ()
    node_id: int | None = None

    def matches(self, r: ev.Record) -> bool:
        """The same selection a SQL store makes with WHERE clauses, for stores that filter in Python."""
        if r.seq <= self.since_seq or (self.until_seq is not None and r.seq > self.until_seq):
            return False
        if self.until_time and r.time > self.until_time:
            return False
        if self.since_time and r.time < self.since_time:
            return False
        if self.types and r.event.type not in self.types:
            return False
        return self.node_id is None or r.event.data().get("node_id") == self.node_id


class ChainBroken(CoordError):
    """The stored log does not verify: an event is missing, altered or reordered at ``seq``."""

    def __init__(self, seq: int, reason: str) -> None:
        super().__init__(f"event {seq}: {reason}")
        self.seq = seq
        self.reason = reason


class StaleHead(CoordError):
    """Another replica appended since this one folded the log (a shared store, coord/store/postgres.py): the
    batch was decided on a stale state, and nothing of it was stored. The service decides again."""

    def __init__(self, expected: int, head: int) -> None:
        super().__init__(f"the log's head is event {head}, this replica decided after event {expected}; retry")
        self.expected = expected
        self.head = head


class DatabaseDown(CoordError):
    """The shared database cannot be reached: the write is refused (nothing was stored); reads keep being served
    from the replica's state."""


class Store(Protocol):
    def read(self, f: Filter = Filter()) -> AsyncIterator[ev.Record]:
        """Records in ``seq`` order, decoded but not verified (``verify`` checks the chain)."""
        ...

    async def last(self) -> tuple[int, str]:
        """(seq, hash) of the last stored event; (0, GENESIS) for an empty log."""
        ...

    async def last_at(self, time: str) -> int:
        """The seq of the last event whose time is at or before ``time`` (0: none)."""
        ...

    async def append(self, records: list[ev.Record], state: State, policy: bool) -> None:
        """Store ``records`` and the projection rows they touch (read from ``state``, already folded) in one
        transaction: all of it or none; return once it is durable at the configured level. ``policy``: the policy
        row changed too.

        Group commit (coord/service.py): ``records`` are those of one or more commands, and the service calls
        ``append`` from one committer, never twice at once. ``state`` is the fold through ``records[-1]`` at the
        moment of the call, but the service folds further commands while the transaction runs: read every
        projection row from it before the first ``await``. ``Record.data_text``, when set, is the canonical JSON
        of the event's data (the ``data`` column), already encoded."""
        ...

    async def verify(self) -> int:
        """Walk the whole chain; the number of events, or ChainBroken at the first bad one."""
        ...

    async def put_secret(self, credential_id: str, secret_hash: str) -> None:
        """The hash of an API token's or OAuth client's secret (never in the log)."""
        ...

    async def secrets(self) -> dict[str, str]:
        """Every credential id -> its secret's hash."""
        ...

    async def close(self) -> None: ...


async def load_state(store: Store, f: Filter = Filter()) -> State:
    """The tailnet as the fold of the stored log (up to ``f``'s bounds)."""
    return fold([r async for r in store.read(f)])
