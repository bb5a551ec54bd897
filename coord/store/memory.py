"""An in-memory Store: the log in a list, no projections. For tests that drive the real write path."""

from __future__ import annotations

from collections.abc import AsyncIterator
from dataclasses import dataclass, field

from coord import events as ev
from coord.state import State
from coord.store import ChainBroken, Filter


@dataclass
class MemoryStore:
    records: list[ev.Record] = field(default_factory=list)
    secret_hashes: dict[str, str] = field(default_factory=dict)

    async def read(self, f: Filter = Filter()) -> AsyncIterator[ev.Record]:
        for r in list(self.records):
            if f.matches(r):
                yield r

    async def last(self) -> tuple[int, str]:
        return (self.records[-1].seq, self.records[-1].hash) if self.records else (0, ev.GENESIS)

    async def last_at(self, time: str) -> int:
        return max((r.seq for r in self.records if r.time <= time), default=0)

    async def append(self, records: list[ev.Record], state: State, policy: bool) -> None:
        seq = self.records[-1].seq if self.records else 0
        if records and records[0].seq != seq + 1:
            raise ChainBroken(records[0].seq, f"does not follow the last stored event {seq}")
        self.records.extend(records)

    async def verify(self) -> int:
        prev = ev.GENESIS
        for i, r in enumerate(self.records, 1):
            if r.seq != i:
                raise ChainBroken(i, f"missing (next stored event is {r.seq})")
            if r.prev_hash != prev:
                raise ChainBroken(r.seq, "prev_hash does not match the hash of the event before it")
            e = r.event
            if ev.chain_hash(prev, r.seq, r.time, r.actor, e.type, e.SCHEMA, e.data()) != r.hash:
                raise ChainBroken(r.seq, "hash does not match the event's contents")
            prev = r.hash
        return len(self.records)

    async def put_secret(self, credential_id: str, secret_hash: str) -> None:
        self.secret_hashes[credential_id] = secret_hash

    async def secrets(self) -> dict[str, str]:
        return dict(self.secret_hashes)

    async def close(self) -> None:
        pass
