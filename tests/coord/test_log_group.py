"""Group commit: concurrent commands share a transaction, each acknowledged only once it committed; a failed
transaction acknowledges none of its commands (nor any decided on them), loses no acknowledged event, and the
state is rebuilt from the log.

The real server (``create_app``) on SQLite and on PostgreSQL; the store's ``append`` is wrapped to see each
transaction and, for the failure case, to fail one of them after it started (while more commands fold on top of
it).
"""

from __future__ import annotations

import asyncio
import sqlite3
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

from coord import events as ev
from coord.app import create_app
from coord.config import load
from coord.state import State
from coord.store import load_state


@pytest.fixture(params=["sqlite", "pg"])
def config(request: pytest.FixtureRequest) -> Callable[[Path], Any]:
    """Both stores: SQLite in the data dir, and PostgreSQL (a fresh database on the session's cluster)."""
    extra = {"postgres": request.getfixturevalue("pg_dsn")} if request.param == "pg" else {}

    def make(data: Path) -> Any:
        return load(None, env={}, overrides={"data_dir": str(data), "derp": False, "stun_listen": "", **extra})

    return make


async def stored(app: Any) -> dict[int, str]:
    return {r.seq: r.hash async for r in app.service.store.read()}


def comparable(s: State) -> dict[str, Any]:
    d = dict(s.__dict__)
    d["users"] = {k: (u.id, u.name) for k, u in s.users.items()}
    return d


def test_log_group_commit_acks_each_command_only_after_its_transaction(tmp_path: Path, config: Any) -> None:
    async def main() -> None:
        app = await create_app(config(tmp_path / "data"), serve=False)
        svc = app.service
        real = svc.store.append
        transactions: list[list[int]] = []
        committed: set[int] = set()

        async def watched(records: list[ev.Record], state: State, policy: bool) -> None:
            transactions.append([r.seq for r in records])
            await real(records, state, policy)
            committed.update(r.seq for r in records)

        svc.store.append = watched  # type: ignore[method-assign]
        async def create(i: int) -> int:
            (r,) = await svc.execute(lambda s: [ev.UserCreated(s.next_user_id, f"user{i}")], "admin")
            # acknowledged only now: its transaction committed (the wrapper records that after the real commit)
            assert r.seq in committed
            assert (await stored(app))[r.seq] == r.hash
            assert isinstance(r.event, ev.UserCreated)
            return r.event.user_id

        ids = await asyncio.gather(*(create(i) for i in range(40)))
        assert sorted(ids) == list(range(1, 41))
        # 40 concurrent commands, far fewer transactions; every event in exactly one of them, in seq order
        assert 1 <= len(transactions) < 40
        assert [s for t in transactions for s in t] == list(range(1, 41))
        assert sorted(committed) == list(range(1, 41))
        assert svc.committed == (40, svc.state.last_hash)
        assert await svc.store.verify() == 40
        await app.close()

    asyncio.run(main())


def test_log_group_commit_failed_batch_acks_none_and_loses_nothing(tmp_path: Path, config: Any) -> None:
    async def main() -> None:
        app = await create_app(config(tmp_path / "data"), serve=False)
        svc = app.service
        acked: dict[int, str] = {}
        for i in range(5):
            (r,) = await svc.execute(lambda s, i=i: [ev.UserCreated(s.next_user_id, f"before{i}")], "admin")
            acked[r.seq] = r.hash
        real = svc.store.append
        started = asyncio.Event()
        release = asyncio.Event()
        calls = {"n": 0}

        async def failing_once(records: list[ev.Record], state: State, policy: bool) -> None:
            calls["n"] += 1
            if calls["n"] == 1:
                started.set()
                await release.wait()  # more commands fold on this batch's state meanwhile
                raise sqlite3.OperationalError("disk I/O error")
            await real(records, state, policy)

        svc.store.append = failing_once  # type: ignore[method-assign]

        async def create(name: str) -> ev.Record:
            (r,) = await svc.execute(lambda s: [ev.UserCreated(s.next_user_id, name)], "admin")
            return r

        first = [asyncio.ensure_future(create(f"a{i}")) for i in range(10)]
        await started.wait()
        # decided on the failing batch's state (their seqs follow its events), while it is in flight
        second = [asyncio.ensure_future(create(f"b{i}")) for i in range(10)]
        # (on PostgreSQL a command's catch-up with the shared log yields to the loop first: let them all fold)
        for _ in range(1000):
            if svc.state.last_seq == 25:
                break
            await asyncio.sleep(0)
        assert svc.state.last_seq == 25
        release.set()
        results = await asyncio.gather(*first, *second, return_exceptions=True)
        assert all(isinstance(x, sqlite3.OperationalError) and "disk I/O" in str(x) for x in results)
        # nothing of either batch is stored; every acknowledged event is, with its hash
        assert await stored(app) == acked
        assert await svc.store.verify() == 5
        # the state was rebuilt from the log: the fold of exactly the acknowledged events
        assert svc.state.last_seq == 5 and svc.committed == (5, acked[5])
        assert comparable(svc.state) == comparable(await load_state(svc.store))
        assert sorted(u.name for u in svc.state.users.values()) == [f"before{i}" for i in range(5)]
        # and the next commands commit, continuing the chain
        later = await asyncio.gather(*(create(f"c{i}") for i in range(5)))
        assert [r.seq for r in later] == [6, 7, 8, 9, 10] and later[0].prev_hash == acked[5]
        assert await svc.store.verify() == 10
        await app.close()

    asyncio.run(main())
