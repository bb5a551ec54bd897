"""The server's own checkpoints: every N events or M seconds, a signed line (coord/checkpoint.py) goes to a file
and/or a command (coord/logfiles.py ``CheckpointSink``), so an admin keeps them where the server cannot rewrite
them. ``tick`` is one step of a supervised loop (coord/supervise.py): a sink that fails is retried with back-off
and the next checkpoint covers everything the failed one would have.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import Callable
from dataclasses import dataclass, field

from nacl.signing import SigningKey

from coord import checkpoint as ckpt
from coord.logfiles import CheckpointSink

log = logging.getLogger("shoal.checkpoints")


@dataclass
class Checkpointer:
    key: SigningKey
    sink: CheckpointSink
    head: Callable[[], tuple[int, str]]  # (seq, hash) of the last committed event
    clock: Callable[[], float]
    every: int = 1000
    interval: float = 600.0
    last_seq: int = -1
    last_time: float = 0.0
    written: int = 0
    poll: float = 1.0
    wake: asyncio.Event = field(default_factory=asyncio.Event)

    def due(self) -> bool:
        seq, _ = self.head()
        if seq == self.last_seq:
            return False
        return (
            self.last_seq < 0
            or (self.every > 0 and seq - self.last_seq >= self.every)
            or self.clock() - self.last_time >= self.interval
        )

    def appended(self, state: object) -> None:
        """After each append (Service.appended): wake the loop when a checkpoint is due by count."""
        if self.sink.enabled and self.due():
            self.wake.set()

    async def wait_and_tick(self) -> None:
        """One step of the server's checkpoint loop: wait for an append (or ``poll`` seconds), then ``tick``."""
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(self.wake.wait(), self.poll)
        self.wake.clear()
        await self.tick()

    async def tick(self) -> None:
        if not self.sink.enabled or not self.due():
            return
        cp = ckpt.sign_head(self.key, self.head(), self.clock())
        await self.sink.put(cp)
        self.last_seq, self.last_time = cp.seq, self.clock()
        self.written += 1
        log.debug("checkpoint at seq %d written", cp.seq)
