"""Fan-out: merges Changes per tick and wakes the map sessions of exactly the nodes they touch.

Each session keeps what it last sent (peer id -> version) and a bounded list of pending Changes. When the list
overflows (a slow reader, a burst of changes) the session drops it and sends a full map instead, so memory per
session stays bounded whatever the client does.
"""

from __future__ import annotations

import asyncio
import logging
import os
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass, field

import zstandard
from nacl.public import Box

from coord import wire
from coord.change import Change
from coord.netmap import Builder, Visibility

log = logging.getLogger("shoal.fanout")

MAX_PENDING = 64
KEEPALIVE = b'{"KeepAlive":true}'


@dataclass(eq=False)
class Session:
    node_id: int
    box: Box
    request_id: str
    seq: int = 0
    sent: dict[int, int] = field(default_factory=dict)
    pending: list[Change] = field(default_factory=list)
    full_needed: bool = True
    closed: bool = False
    wake: asyncio.Event = field(default_factory=asyncio.Event)
    compressor: zstandard.ZstdCompressor = field(default_factory=lambda: zstandard.ZstdCompressor(level=3))

    def push(self, change: Change) -> None:
        if self.full_needed:
            return
        if len(self.pending) >= MAX_PENDING:
            self.pending.clear()
            self.full_needed = True
        else:
            self.pending.append(change)
        self.wake.set()

    def close(self) -> None:
        self.closed = True
        self.wake.set()

    def seal(self, msg: bytes) -> bytes:
        out = wire.seal_frame(self.box, self.request_id, self.seq, msg, os.urandom(24), self.compressor)
        self.seq += 1
        return out


@dataclass
class Fanout:
    builder: Builder
    visibility: Callable[[], Visibility]
    clock: Callable[[], float]
    batch_delay: float
    keepalive: float
    sessions: dict[int, Session] = field(default_factory=dict)
    _pending: Change = field(default_factory=Change)
    _flush_handle: asyncio.TimerHandle | None = None
    # One compression context for all sessions: each holds MBs once it has compressed a full map, and every
    # frame is compressed in one call on this one thread, so nothing carries over between sessions.
    compressor: zstandard.ZstdCompressor = field(default_factory=lambda: zstandard.ZstdCompressor(level=3))

    def open(self, node_id: int, box: Box, request_id: str) -> Session:
        old = self.sessions.get(node_id)
        if old is not None:
            old.close()
        s = Session(node_id, box, request_id, compressor=self.compressor)
        self.sessions[node_id] = s
        return s

    def release(self, s: Session) -> bool:
        """Forget a finished session; True if it was still the node's current one."""
        if self.sessions.get(s.node_id) is s:
            del self.sessions[s.node_id]
            return True
        return False

    def submit(self, change: Change) -> None:
        if not change:
            return
        self._pending.merge(change)
        if self._flush_handle is None:
            loop = asyncio.get_running_loop()
            self._flush_handle = loop.call_later(self.batch_delay, self.flush)

    def flush(self) -> None:
        self._flush_handle = None
        c, self._pending = self._pending, Change()
        if not c:
            return
        for nid in c.close:
            s = self.sessions.get(nid)
            if s is not None:
                s.close()
        for nid in c.removed:
            self.builder.forget(nid)
        for s in self._targets(c):
            s.push(c)

    def _targets(self, c: Change) -> list[Session]:
        if c.policy or c.removed:
            return list(self.sessions.values())
        vis = self.visibility()
        ids: set[int] = set(c.self_nodes) | c.visibility
        for pid in c.peers | c.patches:
            ids.update(vis.peers(pid))
        return [s for nid in ids if (s := self.sessions.get(nid)) is not None]

    def _full_frame(self, s: Session) -> bytes:
        # Built here, not in frames(): a local there would keep each session's uncompressed full map alive for
        # as long as the stream idles (N sessions x N peers of JSON).
        body, s.sent = self.builder.full(self.visibility(), s.node_id, self.clock())
        return s.seal(body)

    async def frames(self, s: Session) -> AsyncIterator[bytes]:
        """The map stream of one session: a full map, then deltas and keep-alives until it is closed."""
        while not s.closed and s.node_id in self.builder.state.nodes:
            if s.full_needed:
                s.full_needed = False
                s.pending.clear()
                yield self._full_frame(s)
                continue
            if s.pending:
                change = Change()
                for c in s.pending:
                    change.merge(c)
                s.pending.clear()
                body_or_none = self.builder.delta(self.visibility(), s.node_id, change, s.sent, self.clock())
                if body_or_none is not None:
                    yield s.seal(body_or_none)
                continue
            s.wake.clear()
            try:
                await asyncio.wait_for(s.wake.wait(), self.keepalive)
            except TimeoutError:
                yield s.seal(KEEPALIVE)
