"""Failover: replicas are real ``shoal-server serve`` processes on one PostgreSQL (tests/pgcluster.py); the node is
the real agent (node/agent.py: its control loop, pinning and back-off) with a fake OS runner and engine, given
every replica's URL. ``kill -9`` of the replica holding its stream: the node is streaming from another replica
within 10 s, with the pinned key, its peers kept throughout; a node that joins meanwhile is seen by it; the dead
replica shows as down in ``shoal-server replicas`` and the nodes it held are marked offline by the lease holder.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import shutil
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx

from coord.app import create_app
from coord.config import load
from node.agent import Agent, AgentConfig
from node.run import FakeRunner
from tests.coord.harness import free_port, sim_node
from tests.node.fakes import FakeEngine
from tests.node.test_agent import ADDRS, LINK

SHARED_KEYS = ("server.key", "checkpoint.key", "derp.key")
SERVER = str(Path(sys.executable).with_name("shoal-server"))


class Replica:
    def __init__(self, root: Path, name: str, dsn: str) -> None:
        self.name, self.dsn = name, dsn
        self.data = root / name
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.proc: subprocess.Popen[bytes] | None = None
        self.log = root / f"{name}.log"

    def env(self) -> dict[str, str]:
        return {**os.environ, "SHOAL_POSTGRES": self.dsn, "SHOAL_REPLICA_NAME": self.name,
                "SHOAL_DATA_DIR": str(self.data), "SHOAL_LISTEN": f"127.0.0.1:{self.port}",
                "SHOAL_SERVER_URL": self.url, "SHOAL_DERP": "false", "SHOAL_STUN_LISTEN": "",
                "SHOAL_BATCH_DELAY": "10ms"}

    def start(self) -> None:
        with open(self.log, "ab") as log:
            self.proc = subprocess.Popen([SERVER, "serve"], env=self.env(), stdout=log, stderr=log)
        end = time.monotonic() + 20
        while time.monotonic() < end:
            assert self.proc.poll() is None, self.log.read_text()
            try:
                if httpx.get(f"{self.url}/key?v=1", timeout=1).status_code < 500:
                    return
            except httpx.HTTPError:
                pass
            time.sleep(0.1)
        raise AssertionError(f"{self.name} did not start: {self.log.read_text()}")

    def kill(self) -> None:
        assert self.proc is not None
        self.proc.send_signal(signal.SIGKILL)
        self.proc.wait(10)

    def cli(self, *args: str) -> Any:
        out = subprocess.run([SERVER, *args, "--json"], env=self.env(), capture_output=True, text=True, timeout=30)
        assert out.returncode == 0, out.stderr
        return json.loads(out.stdout)


@contextlib.contextmanager
def replicas(root: Path, dsn: str, n: int) -> Iterator[list[Replica]]:
    rs = [Replica(root, f"r{i}", dsn) for i in range(n)]
    try:
        rs[0].start()
        for r in rs[1:]:
            # the admin gives every replica the same keys: files, 0600, never through the database
            r.data.mkdir(mode=0o700)
            for k in SHARED_KEYS:
                if (rs[0].data / k).exists():
                    shutil.copy2(rs[0].data / k, r.data / k)
                    assert (r.data / k).stat().st_mode & 0o777 == 0o600
            r.start()
        yield rs
    finally:
        for r in rs:
            if r.proc is not None and r.proc.poll() is None:
                r.proc.send_signal(signal.SIGKILL)
                r.proc.wait(10)


async def make_key(root: Path, dsn: str) -> str:
    """An admin command against the shared database, in-process (any replica's CLI does the same)."""
    cfg = load(None, env={}, overrides={"data_dir": str(root / "admin"), "postgres": dsn, "derp": False,
                                        "stun_listen": ""})
    app = await create_app(cfg, serve=False)
    try:
        await app.service.create_user("alice")
        return str((await app.service.create_key("alice", reusable=True, ephemeral=False, expiration=3600,
                                                 tags=()))["key"])
    finally:
        await app.close()


def agent_for(tmp: Path, name: str) -> Agent:
    runner = FakeRunner()
    runner.respond("ip -j addr show", ADDRS)
    runner.respond("ip -j addr show dev shoal0", LINK)
    cfg = AgentConfig(state_dir=tmp / name, endpoint_poll=3600, nat_traversal=False, backoff_max=2.0)
    return Agent(cfg, runner, lambda iface, on_restart: FakeEngine(runner, iface))


async def wait_for(pred: Any, timeout: float, what: str) -> float:
    t0 = time.monotonic()
    while not pred():
        assert time.monotonic() - t0 < timeout, f"{what}: not within {timeout} s"
        await asyncio.sleep(0.05)
    return time.monotonic() - t0


def peer_names(a: Agent) -> set[str]:
    return {p.name.split(".")[0] for p in a.netmap.peers.values()}


def test_pg_failover_node_moves_when_its_replica_is_killed(tmp_path: Path, pg_dsn: str) -> None:
    async def main() -> None:
        with replicas(tmp_path, pg_dsn, 3) as rs:
            key = await make_key(tmp_path, pg_dsn)
            urls = [r.url for r in rs]
            # node "one" prefers r0, "two" r1; both know every replica
            one, two = agent_for(tmp_path, "one"), agent_for(tmp_path, "two")
            for a in (one, two):
                await a.start()
            await one.up(login_server=urls[0], control_urls=urls[1:], auth_key=key, hostname="one", wait=10)
            await two.up(login_server=urls[1], control_urls=[urls[0], urls[2]], auth_key=key, hostname="two",
                         wait=10)
            await wait_for(lambda: one.connected and two.connected and "two" in peer_names(one), 10, "streams")
            assert one._control_url() == urls[0]
            pinned = one.prefs.server_key
            # one's peers, seen every 20 ms while its replica dies: never empty
            seen: list[set[str]] = []
            watching = True

            async def watch() -> None:
                while watching:
                    seen.append(peer_names(one))
                    await asyncio.sleep(0.02)

            watcher = asyncio.create_task(watch())
            rs[0].kill()
            took = await wait_for(lambda: one.connected and one._control_url() != urls[0], 10, "failover")
            print(f"\nfailover: node 'one' on {one._control_url()} {took:.2f} s after kill -9 of r0")
            # a node that joins meanwhile, through the third replica, is seen by both
            three = sim_node(urls[2], "three")
            await three.client.pin()
            await three.client.register(three.register_request(key))
            await wait_for(lambda: "three" in peer_names(one) and "three" in peer_names(two), 10, "new node")
            watching = False
            await watcher
            assert all("two" in s for s in seen), "a peer dropped during the failover"
            assert one.prefs.server_key == pinned  # the same pinned key on the new replica
            # r0 shows as down; the live ones have (nearly) no lag
            await asyncio.sleep(5.5)
            out = rs[1].cli("replicas")
            by = {r["name"]: r for r in out["replicas"]}
            assert by["r0"]["up"] is False and by["r1"]["up"] and by["r2"]["up"], out
            assert by["r1"]["lag"] <= 1 and by["r2"]["lag"] <= 1, out
            assert sum(by[n]["streams"] for n in ("r1", "r2")) == 2, out
            for a in (one, two):
                await a.stop()
            await three.client.close()

    asyncio.run(main())


def test_pg_failover_postgres_restart_keeps_streams_and_recovers(tmp_path: Path, pg_dsn: str,
                                                                   pg_cluster: Any) -> None:
    async def main() -> None:
        with replicas(tmp_path, pg_dsn, 2) as rs:
            key = await make_key(tmp_path, pg_dsn)
            one, two = agent_for(tmp_path, "one"), agent_for(tmp_path, "two")
            for a in (one, two):
                await a.start()
            await one.up(login_server=rs[0].url, control_urls=[rs[1].url], auth_key=key, hostname="one", wait=10)
            await two.up(login_server=rs[1].url, control_urls=[rs[0].url], auth_key=key, hostname="two", wait=10)
            await wait_for(lambda: one.connected and two.connected and "two" in peer_names(one), 10, "streams")
            pg_cluster.stop("fast")
            try:
                t0 = time.monotonic()
                # writes are refused with a clear error, and nothing is stored
                for r in rs:
                    out = subprocess.run([SERVER, "users", "create", f"down-{r.name}"], env=r.env(),
                                         capture_output=True, text=True, timeout=60)
                    assert out.returncode != 0
                    assert "PostgreSQL unreachable" in out.stderr or "cannot be read" in out.stderr, out.stderr
                # the streams stay up meanwhile, on the same replicas
                while time.monotonic() - t0 < 3:
                    assert one.connected and two.connected
                    assert one._control_url() == rs[0].url and two._control_url() == rs[1].url
                    await asyncio.sleep(0.1)
            finally:
                pg_cluster.start()
            # recovered by themselves: a write on one replica is seen by the other
            end = time.monotonic() + 15
            while True:
                out = subprocess.run([SERVER, "users", "create", "after"], env=rs[1].env(), capture_output=True,
                                     text=True, timeout=60)
                if out.returncode == 0:
                    break
                assert time.monotonic() < end, out.stderr
                await asyncio.sleep(0.5)
            for _ in range(100):
                names = [{u["name"] for u in r.cli("users", "list")} for r in rs]
                if all("after" in n for n in names):
                    break
                await asyncio.sleep(0.1)
            assert names[0] == names[1] == {"alice", "after"}
            assert one.connected and two.connected
            for a in (one, two):
                await a.stop()

    asyncio.run(main())


def test_pg_failover_registrations_survive_replicas_killed_at_random(tmp_path: Path, pg_dsn: str) -> None:
    """A retrying client registers nodes while replicas are killed (-9) and restarted at random: every
    acknowledged registration is stored, the chain verifies, and every replica serves the fold of the log."""
    import random

    from coord.state import fold
    from coord.store import sqlite as db
    from coord.store.postgres import PgStore
    from coord.wire import key_text

    rng = random.Random(20)

    async def main() -> None:
        with replicas(tmp_path, pg_dsn, 3) as rs:
            key = await make_key(tmp_path, pg_dsn)
            acked: dict[str, str] = {}  # machine key -> hostname, once a replica answered "authorized"
            stop = asyncio.Event()
            kills = 0

            async def chaos() -> None:
                nonlocal kills
                while not stop.is_set():
                    await asyncio.sleep(rng.uniform(0.4, 1.0))
                    r = rng.choice(rs)
                    r.kill()
                    kills += 1
                    await asyncio.sleep(rng.uniform(0.1, 0.6))
                    await asyncio.to_thread(r.start)

            async def register(i: int) -> None:
                for attempt in range(60):
                    node = sim_node(rs[(i + attempt) % 3].url, f"n{i}")
                    try:
                        await node.client.pin()
                        resp = await node.client.register(node.register_request(key))
                        if resp.get("MachineAuthorized"):
                            acked[key_text("mkey", bytes(node.machine.public_key))] = f"n{i}"
                            return
                    except Exception:
                        pass
                    finally:
                        await node.client.close()
                    await asyncio.sleep(rng.uniform(0.05, 0.3))
                raise AssertionError(f"n{i} never registered")

            task = asyncio.create_task(chaos())
            counter = iter(range(10_000))

            async def worker() -> None:
                # registrations go on until the replicas were killed 4 times (and at least 40 were made)
                while kills < 4 or len(acked) < 40:
                    await register(next(counter))

            await asyncio.gather(*(worker() for _ in range(4)))
            stop.set()
            await task
            assert kills >= 3
            for r in rs:
                if r.proc is None or r.proc.poll() is not None:
                    r.start()
            store = await PgStore.open(pg_dsn)
            try:
                head = await store.verify()
                rs_log = [r async for r in store.read()]
                assert len(rs_log) == head
                folded = fold(rs_log)
                stored = {n.machine_key: n.hostname for n in folded.nodes.values()}
                for mk, host in acked.items():
                    assert stored.get(mk) == host, f"acknowledged {host} lost"
                conn = await db.connect(":memory:")
                await db.write_all_projections(conn, folded)
                want = await db.dump_projections(conn)
                await conn.close()
                assert await store.dump_projections() == want
                expect = sorted((n.id, n.given_name, n.machine_key) for n in folded.nodes.values())
                for r in rs:
                    for _ in range(100):
                        got = sorted((n["id"], n["name"], n["machine_key"]) for n in r.cli("nodes", "list"))
                        if got == expect:
                            break
                        await asyncio.sleep(0.1)
                    assert got == expect, r.name
                print(f"\nchaos: {kills} kill -9, {len(acked)} registrations acknowledged, {head} events, all kept")
            finally:
                await store.close()

    asyncio.run(main())


def test_pg_failover_nodes_of_a_dead_replica_are_marked_offline_by_the_lease_holder(tmp_path: Path,
                                                                                      pg_dsn: str) -> None:
    async def main() -> None:
        with replicas(tmp_path, pg_dsn, 2) as rs:
            key = await make_key(tmp_path, pg_dsn)
            kept, lost = sim_node(rs[1].url, "kept"), sim_node(rs[0].url, "lost")
            streams = []
            for n in (kept, lost):
                await n.client.pin()
                await n.client.register(n.register_request(key))
                s = n.client.stream(n.map_request(endpoints=("192.0.2.1:41641",)))
                await asyncio.wait_for(s.__anext__(), 5)
                streams.append(s)

            def online() -> dict[str, bool]:
                return {n["name"]: n["online"] for n in rs[1].cli("nodes", "list")}

            await wait_for(lambda: online() == {"kept": True, "lost": True}, 10, "both online")
            await asyncio.sleep(1.5)  # both replicas' heartbeats list their streams
            assert online() == {"kept": True, "lost": True}  # no replica marks another's nodes offline
            rs[0].kill()
            # "lost" never comes back: the lease holder (r1, once r0's lease lapsed) marks it offline
            took = await wait_for(lambda: online() == {"kept": True, "lost": False}, 20, "lost marked offline")
            print(f"\norphan sweep: 'lost' offline {took:.1f} s after kill -9 of its replica; 'kept' online")
            await streams[0].aclose()
            for n in (kept, lost):
                await n.client.close()

    asyncio.run(main())
