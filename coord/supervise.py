"""Supervised background loops: a failure is logged, counted and retried after a back-off, never the loop's end.

A bare ``while True: await step()`` task dies at the first exception nobody caught (a locked database, a bug in
one sweep), and nothing notices: key expiry is then never enforced again. ``Supervisor.periodic`` runs a step
every ``interval`` seconds; ``Supervisor.restarting`` restarts a long-running coroutine whenever it raises (a
coroutine that returns is done).

Back-off after the k-th consecutive failure (k = 1, 2, ...)::

    delay = min(cap, base * 2 ** (k - 1)) * (1 + jitter * (2u - 1)),   u drawn uniformly from [0, 1)

with ``jitter`` = 0.2 by default, so a delay is within +-20% of the exponential curve, and never more than
``cap * (1 + jitter)`` (by default 60 s * 1.2 = 72 s). Jitter spreads retries of loops that failed together (one
locked database) so they do not retry in lock-step. A success resets k. Cancellation (server shutdown) is not a
failure: it ends the loop.

Time and randomness are injected (``sleep``, ``rand``), so tests run failures and back-offs without waiting.
"""

from __future__ import annotations

import asyncio
import logging
import random
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from typing import Any

log = logging.getLogger("shoal.supervise")

Sleep = Callable[[float], Awaitable[None]]


def backoff(failures: int, u: float, base: float = 1.0, cap: float = 60.0, jitter: float = 0.2) -> float:
    """The delay after ``failures`` consecutive failures (>= 1), for a uniform draw ``u`` in [0, 1)."""
    if failures < 1:
        return 0.0
    raw = min(cap, base * 2.0 ** min(failures - 1, 62))
    return raw * (1.0 + jitter * (2.0 * u - 1.0))


@dataclass
class LoopStats:
    runs: int = 0
    failures: int = 0
    consecutive: int = 0
    last_error: str = ""

    def as_json(self) -> dict[str, Any]:
        return {"runs": self.runs, "failures": self.failures, "consecutive": self.consecutive,
                "last_error": self.last_error}


@dataclass
class Supervisor:
    sleep: Sleep = asyncio.sleep
    rand: Callable[[], float] = field(default_factory=lambda: random.Random().random)
    base: float = 1.0
    cap: float = 60.0
    jitter: float = 0.2
    stats: dict[str, LoopStats] = field(default_factory=dict)

    def _failed(self, name: str, st: LoopStats, e: BaseException) -> float:
        st.failures += 1
        st.consecutive += 1
        st.last_error = f"{type(e).__name__}: {e}"
        delay = backoff(st.consecutive, self.rand(), self.base, self.cap, self.jitter)
        log.error("background loop %s failed (%d in a row, %d in all); retrying in %.1fs",
                  name, st.consecutive, st.failures, delay, exc_info=e)
        return delay

    async def periodic(self, name: str, interval: float, step: Callable[[], Awaitable[Any]]) -> None:
        """``step()`` every ``interval`` seconds, for ever; a failing step backs off, then the loop goes on."""
        st = self.stats.setdefault(name, LoopStats())
        delay = interval
        while True:
            await self.sleep(delay)
            st.runs += 1
            try:
                await step()
            except asyncio.CancelledError:
                raise
            except Exception as e:
                delay = max(interval, self._failed(name, st, e))
            else:
                st.consecutive = 0
                delay = interval

    async def restarting(self, name: str, run: Callable[[], Awaitable[Any]]) -> None:
        """``run()``, and again after a back-off whenever it raises; returns when ``run()`` returns."""
        st = self.stats.setdefault(name, LoopStats())
        while True:
            st.runs += 1
            try:
                await run()
            except asyncio.CancelledError:
                raise
            except Exception as e:
                await self.sleep(self._failed(name, st, e))
            else:
                st.consecutive = 0
                return

    def snapshot(self) -> dict[str, dict[str, Any]]:
        return {name: st.as_json() for name, st in sorted(self.stats.items())}
