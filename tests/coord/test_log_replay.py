"""Replay agrees with the live server, and every ``--at`` view is a prefix of the log, on random histories.

Random command scripts (tests/coord/logscript.py: users renamed and deleted, several policies set and cleared,
advertised routes, endpoint types, a clock that steps back...) run through the real server (``create_app`` on a
SQLite data dir, with an injected clock), then: the chain verifies; event times never go back; a replay of the
log writes exactly the live projection rows; the state at every seq (from the nearest snapshot) is the fold of
that prefix; ``--at`` any event's time is the prefix up to the last event at or before it; and a restart (from
the latest snapshot plus the tail) gives exactly the live state.
"""

from __future__ import annotations

import asyncio
import contextlib
import tempfile
from pathlib import Path
from typing import Any

from hypothesis import HealthCheck, given, settings

from coord import admin as admin_mod
from coord import decide, wire
from coord import snapshot as snap
from coord.app import App, create_app
from coord.config import load
from coord.errors import DomainError
from coord.state import State, fold
from coord.store import sqlite as db
from tests.coord.logscript import (
    DNS_FILES,
    DNS_RECORDS,
    DNS_SEEDS,
    ENDPOINT_TYPES,
    ENDPOINTS,
    POLICIES,
    USERS,
    dns_args,
    scripts,
)

T = "2000-01-01T00:00:00.000000Z"


class Clock:
    def __init__(self) -> None:
        self.now = 1_800_000_000.0

    def __call__(self) -> float:
        return self.now


def same(a: State, b: State) -> bool:
    return snap.encode(a, T) == snap.encode(b, T)


class Driver:
    def __init__(self, app: App, clock: Clock) -> None:
        self.app, self.clock = app, clock
        self.svc = app.service
        self.keys: dict[str, str] = {}
        self.machines: dict[int, bytes] = {}
        self.node_keys: dict[int, bytes] = {}

    async def key_for(self, user: str) -> str | None:
        if user not in self.keys or decide.find_key(self.svc.state, self.keys[user].split("-")[1]).revoked:
            try:
                k = await self.svc.create_key(user, reusable=True, ephemeral=False, expiration=None, tags=())
            except DomainError:
                return None
            self.keys[user] = k["key"]
        return self.keys[user]

    async def step(self, op: tuple[Any, ...]) -> None:
        with contextlib.suppress(DomainError):
            await self._step(op)

    async def _step(self, op: tuple[Any, ...]) -> None:
        svc, s = self.svc, self.svc.state
        kind = op[0]
        ids = sorted(s.nodes)
        nid = ids[op[1] % len(ids)] if ids and len(op) > 1 and isinstance(op[1], int) else None
        if kind == "user_create":
            await svc.create_user(USERS[op[1]])
        elif kind == "user_rename":
            await svc.rename_user(USERS[op[1]], USERS[op[2]])
        elif kind == "user_delete":
            await svc.delete_user(USERS[op[1]])
        elif kind == "register":
            key = await self.key_for(USERS[op[1]]) if s.user_by_name(USERS[op[1]]) else None
            if key is None:
                return
            req = wire.RegisterRequest(node_key=op[6], disco_key=op[7], auth_key=key, ephemeral=op[8],
                                       hostinfo=wire.Hostinfo(hostname=op[3], routable_ips=op[4]))
            await self.app.logins.register(op[5], req)
            n = s.by_machine.get(wire.key_text("mkey", op[5]))
            if n is not None:
                self.machines[n], self.node_keys[n] = op[5], op[6]
        elif kind == "policy":
            if op[1] < 0:
                await svc.clear_policy()
            else:
                await svc.set_policy(POLICIES[op[1]])
        elif kind == "clock":
            self.clock.now += op[1]
        elif kind == "sweep":
            self.clock.now += 2
            await svc.execute(lambda st: decide.expire_due(st, self.clock()), "system")
        elif kind == "dns_set":
            await svc.set_dns(**dns_args(op))
        elif kind == "dns_record_add":
            await svc.add_dns_record(*DNS_RECORDS[op[1]])
        elif kind == "dns_record_remove":
            name, t, v = DNS_RECORDS[op[1]]
            await (svc.remove_dns_record(name, t, v) if op[2] else svc.remove_dns_record(name, None, None))
        elif kind == "dns_seed":
            await svc.seed_dns(DNS_SEEDS[op[1]])
        elif kind == "dns_file":
            await svc.load_dns_file("/etc/shoal/records.json", DNS_FILES[op[1]])
        elif nid is None:
            return
        elif kind == "reauth":
            key = await self.key_for(USERS[op[2]]) if s.user_by_name(USERS[op[2]]) else None
            if key is None:
                return
            await self.app.logins.register(self.machines[nid], wire.RegisterRequest(
                node_key=op[4], auth_key=key, hostinfo=wire.Hostinfo(hostname="re")))
            self.node_keys[nid] = op[4]
        elif kind == "update":
            host = op[5]
            hi = None if host is None else wire.Hostinfo(hostname=host, os="linux", routable_ips=op[6])
            await svc.map_update(nid, wire.MapRequest(
                node_key=self.node_keys[nid], disco_key=op[7], endpoints=ENDPOINTS[op[2]],
                endpoint_types=ENDPOINT_TYPES[op[3]], home_derp=op[4], hostinfo=hi))
        elif kind == "rename":
            await svc.rename_node(str(nid), op[2])
        elif kind == "tag":
            await svc.tag_node(str(nid), op[2])
        elif kind == "approve":
            await svc.approve_routes(str(nid), op[2])
        elif kind == "unapprove":
            await svc.unapprove_routes(str(nid), op[2])
        elif kind == "connect":
            if not s.nodes[nid].logged_out:
                await self.app.lifecycle.connected(nid)
        elif kind == "disconnect":
            await self.app.lifecycle.disconnected(nid)
        elif kind == "expire":
            await svc.expire_node(str(nid))
        elif kind == "expiry":
            await svc.set_node_expiry(str(nid), None if op[2] is None else self.clock() + op[2])
        elif kind == "logout":
            await self.app.logins.register(self.machines[nid], wire.RegisterRequest(
                node_key=self.node_keys[nid], expiry=1.0))
        elif kind == "delete":
            await svc.delete_node(str(nid))


async def run_script(data: Path, script: list[tuple[Any, ...]]) -> None:
    clock = Clock()
    cfg = load(None, env={}, overrides={"data_dir": str(data), "derp": False, "stun_listen": "",
                                        "snapshot_every": "9"})
    app = await create_app(cfg, serve=False, clock=clock)
    try:
        d = Driver(app, clock)
        for name in USERS[:2]:
            await d.step(("user_create", USERS.index(name)))
        for op in script:
            await d.step(op)
        await app.history.flush()
        store = app.service.store
        n = await store.verify()
        records = [r async for r in store.read()]
        assert n == len(records) == app.service.state.last_seq
        times = [r.time for r in records]
        assert times == sorted(times), "an event's time is earlier than the one before it"
        # replay: a fresh database from the log alone has exactly the live projection rows
        state = fold(records)
        assert same(state, app.service.state)
        fresh = await db.connect(":memory:")
        try:
            await fresh.execute("BEGIN")
            await db.write_all_projections(fresh, state)
            await fresh.execute("COMMIT")
            assert await db.dump_projections(fresh) == await db.dump_projections(store.conn)
        finally:
            await fresh.close()
        # every view of the past is a prefix of the log
        for seq in range(0, len(records) + 1):
            assert same(await app.history.state_at(seq), fold(records[:seq])), f"state at seq {seq}"
        for r in records[:: max(1, len(records) // 12)]:
            want = max(x.seq for x in records if x.time <= r.time)
            assert await admin_mod.resolve_at(app.service, {"at": r.time}) == want
            users = await admin_mod.run(app.admin, "users.list", {"at": r.time})
            assert [u["id"] for u in users] == sorted(fold(records[:want]).users)
    finally:
        await app.close()
    # a restart starts from the latest snapshot plus the tail, and is the same tailnet
    app2 = await create_app(cfg, serve=False, clock=clock)
    try:
        assert same(app2.service.state, state)
    finally:
        await app2.close()


@settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])
@given(scripts(min_size=5, max_size=50))
def test_log_replay_equals_live_on_random_histories(script: list[tuple[Any, ...]]) -> None:
    with tempfile.TemporaryDirectory() as tmp:
        asyncio.run(run_script(Path(tmp) / "data", script))


def test_log_replay_after_policy_clear(tmp_path: Path) -> None:
    """Regression: the live projection kept a NULL policy row after `policy clear`, a replay wrote none."""
    asyncio.run(run_script(tmp_path / "data", [("policy", 2), ("policy", -1)]))
    asyncio.run(run_script(tmp_path / "data2", [("policy", 0), ("policy", 1), ("policy", -1), ("policy", 2)]))
