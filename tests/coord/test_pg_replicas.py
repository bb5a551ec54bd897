"""Several replicas on one PostgreSQL: writes on any of them make one chain, every replica folds what the others
appended (LISTEN/NOTIFY, polling as the fall-back) and fans it out to its own streams, and all of them converge
to the same state, equal to the fold of the log and to the stored projections. Real servers on loopback, real
sealed requests from simulated nodes, Debian's postgresql (tests/pgcluster.py)."""

from __future__ import annotations

import asyncio
import contextlib
import shutil
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

from coord.state import State, fold
from coord.store import load_state
from coord.store import sqlite as db
from tests.coord.harness import Running, running_server, sim_node
from tests.coord.test_server import next_map, until

SHARED_KEYS = ("server.key", "checkpoint.key", "derp.key")


def comparable(s: State) -> dict[str, Any]:
    d = dict(s.__dict__)
    d["users"] = {k: (u.id, u.name, u.created) for k, u in s.users.items()}
    return d


@contextlib.asynccontextmanager
async def replicas(tmp_path: Path, dsn: str, n: int) -> AsyncIterator[list[Running]]:
    """``n`` replicas; the first creates the shared keys, which the admin copies (0600) into the others' dirs."""
    async with contextlib.AsyncExitStack() as stack:
        first = await stack.enter_async_context(running_server(tmp_path / "r0", postgres=dsn, replica_name="r0"))
        out = [first]
        for i in range(1, n):
            d = tmp_path / f"r{i}"
            d.mkdir(mode=0o700)
            for k in SHARED_KEYS:
                if (tmp_path / "r0" / k).exists():
                    shutil.copy2(tmp_path / "r0" / k, d / k)
            out.append(await stack.enter_async_context(running_server(d, postgres=dsn, replica_name=f"r{i}")))
        yield out


async def converged(rs: list[Running], timeout: float = 10.0) -> int:
    """Wait until every replica folded the log's head; the head."""
    store = rs[0].svc.store
    loop = asyncio.get_running_loop()
    end = loop.time() + timeout
    while True:
        head, _ = await store.last()
        if all(r.svc.committed[0] == head and r.svc.state.last_seq == head for r in rs):
            return head
        assert loop.time() < end, f"not converged: head {head}, replicas at {[r.svc.committed for r in rs]}"
        await asyncio.sleep(0.05)


def test_pg_replicas_converge_to_identical_projections(tmp_path: Path, pg_dsn: str) -> None:
    async def main() -> None:
        async with replicas(tmp_path, pg_dsn, 2) as (a, b):
            # the same key to pin on both: nodes may talk to either
            assert a.app.info()["ServerKey"] == b.app.info()["ServerKey"]
            await a.svc.create_user("alice")
            await converged([a, b])
            key = (await b.svc.create_key("alice", reusable=True, ephemeral=False, expiration=3600, tags=()))["key"]
            # a node streams from replica b; another joins through replica a: b's stream hears of it
            x, y = sim_node(b.url, "xray"), sim_node(a.url, "yank")
            await x.join(key)
            sx = x.client.stream(x.map_request(endpoints=("192.0.2.1:41641",)))
            full = await next_map(sx)
            assert full["Peers"] == []
            await y.join(key)
            delta = await until(sx, "PeersChanged", timeout=5)
            assert [p["Name"] for p in delta["PeersChanged"]] == ["yank.shoal.internal."]

            # concurrent writes on both replicas: every command lands once, in one chain
            async def users(r: Running, prefix: str) -> list[int]:
                out = []
                for i in range(15):
                    u = await r.svc.create_user(f"{prefix}{i}")
                    out.append(u["id"])
                return out

            ua, ub = await asyncio.gather(users(a, "a"), users(b, "b"))
            assert len(set(ua) | set(ub)) == 30
            await a.svc.rename_node("yank", "yankee")
            await b.svc.delete_user("a3")
            head = await converged([a, b])
            store = a.svc.store
            assert await store.verify() == head
            folded = await load_state(store)
            assert comparable(a.svc.state) == comparable(b.svc.state) == comparable(folded)
            names = sorted(u.name for u in a.svc.state.users.values())
            assert names == sorted(["alice", *(f"a{i}" for i in range(15) if i != 3), *(f"b{i}" for i in range(15))])
            # the stored rows are the projections of the log, whoever wrote them
            conn = await db.connect(":memory:")
            await db.write_all_projections(conn, fold([r async for r in store.read()]))
            want = await db.dump_projections(conn)
            await conn.close()
            assert await store.dump_projections() == want  # type: ignore[attr-defined]
            await sx.aclose()
            for node in (x, y):
                await node.client.close()

    asyncio.run(main())


def test_pg_replicas_share_api_tokens(tmp_path: Path, pg_dsn: str) -> None:
    """A token made on one replica works on the others at once: its hash is in the shared database before its event,
    and a replica folding that event reads the hashes again."""
    import httpx

    async def main() -> None:
        async with replicas(tmp_path, pg_dsn, 2) as (a, b):
            await a.svc.create_user("alice@example.com")
            await a.svc.set_role("alice@example.com", "admin")
            cid, secret = await a.svc.create_credential("api", 1, expires=a.svc.clock() + 3600)
            await converged([a, b])
            headers = {"Authorization": f"Bearer tskey-api-{cid}-{secret}"}
            async with httpx.AsyncClient() as http:
                for r in (a, b):
                    got = await http.get(f"{r.url}/api/v2/tailnet/-/users", headers=headers)
                    assert got.status_code == 200, got.text
                    assert [u["loginName"] for u in got.json()["users"]] == ["alice@example.com"]
                bad = await http.get(f"{b.url}/api/v2/tailnet/-/users",
                                     headers={"Authorization": f"Bearer tskey-api-{cid}-{'0' * 64}"})
                assert bad.status_code == 401

    asyncio.run(main())
