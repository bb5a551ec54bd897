"""The map long-poll's asyncio shell around the sans-IO fan-out (coord/fanout.py).

It arms one loop timer per tick (``Fanout.next_timer``), wakes the streams a flush pushed to, waits each stream
until its wake-up or keep-alive (``Fanout.session_timer``), and seals each message body into a frame.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import time
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass, field

import zstandard
from nacl.public import Box

from coord import wire
from coord.change import Change
from coord.fanout import Fanout, Session


@dataclass(eq=False)
class Stream:
    """One open map stream: its fan-out session, and how its frames are sealed."""

    session: Session
    box: Box
    request_id: str
    compressor: zstandard.ZstdCompressor
    seq: int = 0
    wake: asyncio.Event = field(default_factory=asyncio.Event)

    @property
    def node_id(self) -> int:
        return self.session.node_id

    def seal(self, msg: bytes) -> bytes:
        out = wire.seal_frame(self.box, self.request_id, self.seq, msg, os.urandom(24), self.compressor)
        self.seq += 1
        return out


@dataclass
class Poll:
    core: Fanout
    clock: Callable[[], float]
    streams: dict[Session, Stream] = field(default_factory=dict)
    _handle: asyncio.TimerHandle | None = None
    # Called after each flush with (sessions woken, seconds since the tick's first submit): the metrics.
    on_flush: Callable[[int, float], None] | None = None
    _first_submit: float | None = None
    # One compression context for all streams: each holds MBs once it has compressed a full map, and every
    # frame is compressed in one call on this one thread, so nothing carries over between streams.
    compressor: zstandard.ZstdCompressor = field(default_factory=lambda: zstandard.ZstdCompressor(level=3))

    @property
    def sessions(self) -> dict[int, Session]:
        return self.core.sessions

    def has_session(self, node_id: int) -> bool:
        return node_id in self.core.sessions

    def submit(self, change: Change) -> None:
        if self._first_submit is None:
            self._first_submit = time.perf_counter()
        self.core.submit(change, self.clock())
        if self._handle is None and self.core.next_timer() is not None:
            self._handle = asyncio.get_running_loop().call_later(self.core.batch_delay, self.flush)

    def flush(self) -> None:
        self._handle = None
        woken = self.core.flush(self.clock())
        self._wake(woken)
        started, self._first_submit = self._first_submit, None
        if self.on_flush is not None and started is not None:
            self.on_flush(len(woken), time.perf_counter() - started)

    def _wake(self, sessions: list[Session]) -> None:
        for s in sessions:
            st = self.streams.get(s)
            if st is not None:
                st.wake.set()

    def open(self, node_id: int, box: Box, request_id: str) -> Stream:
        s, old = self.core.open(node_id)
        if old is not None:
            self._wake([old])
        st = Stream(s, box, request_id, self.compressor)
        self.streams[s] = st
        return st

    def release(self, st: Stream) -> bool:
        """Forget a finished stream; True if it was still the node's current one."""
        self.streams.pop(st.session, None)
        return self.core.release(st.session)

    def close_all(self) -> None:
        self._wake(self.core.close_all())

    def _sealed(self, st: Stream) -> bytes | None:
        # The body lives only here: a local in frames() would keep each stream's uncompressed full map alive
        # for as long as the stream idles (N streams x N peers of JSON).
        body = self.core.next_frame(st.session, self.clock())
        return None if body is None else st.seal(body)

    async def frames(self, st: Stream) -> AsyncIterator[bytes]:
        """The sealed frames of one stream: a full map, then deltas and keep-alives until it is closed."""
        core, s = self.core, st.session
        while True:
            frame = self._sealed(st)
            if frame is not None:
                yield frame
                del frame
                continue
            if core.ended(s):
                return
            due = core.session_timer(s)
            st.wake.clear()
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(st.wake.wait(), None if due is None else max(0.0, due - self.clock()))
