"""Supervised background loops (coord/supervise.py): failures are logged, counted, backed off, and survived."""

from __future__ import annotations

import asyncio
import logging

import pytest

from coord.supervise import Supervisor, backoff


class Clock:
    """An injected sleep: records each delay and returns at once."""

    def __init__(self) -> None:
        self.delays: list[float] = []

    async def sleep(self, d: float) -> None:
        self.delays.append(d)
        await asyncio.sleep(0)


def test_log_backoff_is_bounded_and_documented() -> None:
    assert backoff(0, 0.5) == 0.0
    assert [backoff(k, 0.5) for k in range(1, 9)] == [1, 2, 4, 8, 16, 32, 60, 60]
    for k in range(1, 200):
        for u in (0.0, 0.25, 0.999999):
            d = backoff(k, u)
            raw = min(60.0, 2.0 ** (k - 1))
            assert raw * 0.8 <= d <= raw * 1.2 <= 72.0


async def _run_until(sup_task: asyncio.Task[None], cond: object, steps: int = 2000) -> None:
    for _ in range(steps):
        if callable(cond) and cond():
            return
        await asyncio.sleep(0)
    raise AssertionError("condition not reached")


def test_log_periodic_survives_failures_and_resets(caplog: pytest.LogCaptureFixture) -> None:
    async def main() -> None:
        clock = Clock()
        sup = Supervisor(sleep=clock.sleep, rand=lambda: 0.5)
        calls: list[int] = []

        async def step() -> None:
            calls.append(len(calls))
            n = len(calls)
            if n in (2, 3, 4):
                raise RuntimeError(f"database is locked ({n})")
            if n == 6:
                raise KeyError("a bug")

        task = asyncio.create_task(sup.periodic("expiry", 1.0, step))
        await _run_until(task, lambda: len(calls) >= 9)
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task
        st = sup.stats["expiry"]
        assert st.failures == 4 and st.consecutive == 0 and st.runs >= 9
        assert "KeyError" in st.last_error
        # interval, then back-off 1, 2, 4 after three failures in a row, interval again after success
        assert clock.delays[:8] == [1.0, 1.0, 1.0, 2.0, 4.0, 1.0, 1.0, 1.0]

    with caplog.at_level(logging.ERROR, "shoal.supervise"):
        asyncio.run(main())
    msgs = [r.getMessage() for r in caplog.records]
    assert any("background loop expiry failed (3 in a row, 3 in all); retrying in 4.0s" in m for m in msgs)
    assert all(r.exc_info for r in caplog.records)


def test_log_restarting_restarts_after_a_crash_and_ends_on_return() -> None:
    async def main() -> None:
        clock = Clock()
        sup = Supervisor(sleep=clock.sleep, rand=lambda: 0.0)
        runs: list[int] = []

        async def run() -> None:
            runs.append(1)
            if len(runs) < 3:
                raise OSError("gone")

        await asyncio.wait_for(sup.restarting("sink", run), 5)
        assert len(runs) == 3
        assert clock.delays == [0.8, 1.6]
        assert sup.snapshot()["sink"] == {"runs": 3, "failures": 2, "consecutive": 0, "last_error": "OSError: gone"}

    asyncio.run(main())


def test_log_cancel_is_not_a_failure() -> None:
    async def main() -> None:
        sup = Supervisor()
        started = asyncio.Event()

        async def run() -> None:
            started.set()
            await asyncio.sleep(3600)

        task = asyncio.create_task(sup.restarting("x", run))
        await started.wait()
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task
        assert sup.stats["x"].failures == 0

    asyncio.run(main())
