"""Incremental netmaps equal fresh ones.

Random command sequences (users created, renamed and deleted; register with advertised routes, re-auth, rename,
hostinfo with routes, tag, endpoints with their types, disco key, connect, disconnect, expire, key expiry, logout,
delete, routes approved and unapproved, four policies set and cleared, one with autoApprovers, DNS settings,
records and records files) are decided with
``decide.*`` and run through the real write path (``Service.execute`` on an in-memory store, so the real fold,
visibility hook and publish), into the real sans-IO fan-out core (``coord.fanout.Fanout``). Time is stepped by hand:
ticks (``flush``) and stream drains (``next_frame``) interleave with later events, as they do on the event loop.
Streams open and end through the real ``node_for_map`` check and ``Lifecycle.connected``/``disconnected``. At the
end every live session's first full map with all its deltas applied through ``wire.NetMap`` must equal a full map
computed fresh (ControlTime aside). Every key a command uses is drawn by hypothesis (or the seeded generator), so a
failure replays exactly.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import json
import random
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from hypothesis import given, settings
from hypothesis import strategies as st

from coord import decide, wire
from coord import events as ev
from coord.change import Change
from coord.errors import DomainError
from coord.fanout import KEEPALIVE, Fanout, Session
from coord.lifecycle import Lifecycle
from coord.logins import node_for_map
from coord.netmap import Settings
from coord.service import Service
from coord.state import State
from coord.store.memory import MemoryStore
from tests.coord.logscript import DNS_OPS, dns_events
from tests.coord.util import DAY, POOL

USERS = ("alice@example.com", "bob@example.com", "carol@example.com")
POLICIES = (
    # user devices reach servers, servers reach databases, bob's devices reach each other
    """{"tagOwners": {"tag:srv": ["alice@example.com"], "tag:db": ["alice@example.com"]},
        "acls": [{"action": "accept", "src": ["alice@example.com"], "dst": ["tag:srv:22"]},
                 {"action": "accept", "src": ["tag:srv"], "dst": ["tag:db:5432"]},
                 {"action": "accept", "src": ["bob@example.com"], "dst": ["bob@example.com:*"]}]}""",
    # everyone reaches servers only
    """{"tagOwners": {"tag:srv": ["alice@example.com"], "tag:db": ["alice@example.com"]},
        "acls": [{"action": "accept", "src": ["*"], "dst": ["tag:srv:*"]}]}""",
    # carol (while she exists) reaches everything, databases reach each other
    """{"tagOwners": {"tag:db": ["carol@example.com", "bob@example.com"]},
        "acls": [{"action": "accept", "src": ["carol@example.com"], "dst": ["*:*"]},
                 {"action": "accept", "src": ["tag:db"], "dst": ["tag:db:*"]}]}""",
    # subnet routes and exit nodes, approved by the policy: alice reaches 10.1/16 and the internet, bob one port
    """{"tagOwners": {"tag:srv": ["alice@example.com"]},
        "autoApprovers": {"routes": {"10.0.0.0/8": ["tag:srv"], "192.168.0.0/16": ["bob@example.com"]},
                          "exitNode": ["alice@example.com"]},
        "acls": [{"action": "accept", "src": ["alice@example.com"], "dst": ["10.1.0.0/16:*", "autogroup:internet:*"]},
                 {"action": "accept", "src": ["bob@example.com"], "dst": ["192.168.7.0/24:443"]}]}""",
)
TAG_SETS = ((), ("tag:srv",), ("tag:db",), ("tag:db", "tag:srv"))
HOSTS = ("laptop", "Laptop.local", "db", "srv", "")
ENDPOINTS = ((), ("192.0.2.1:41641",), ("192.0.2.2:41641", "[2001:db8::1]:41641"))
# Tailscale's endpoint types: 1 local, 2 STUN, 3 port-mapped, 4 STUN4LocalPort
ENDPOINT_TYPES = ((), (1,), (2, 1), (3, 4))
ROUTES = ((), ("10.1.0.0/16",), ("10.1.0.0/16", "192.168.7.0/24"), ("0.0.0.0/0", "::/0"))
KEY = st.binary(min_size=32, max_size=32)


def strip(msg: dict[str, Any]) -> dict[str, Any]:
    return {k: v for k, v in msg.items() if k != "ControlTime"}


@dataclass
class Viewer:
    session: Session
    netmap: wire.NetMap = field(default_factory=wire.NetMap)
    frames: int = 0


@dataclass
class Sim:
    """The service's write path and the fan-out core, with the event loop's timers replaced by explicit steps."""

    now: float = 1_800_000_000.0
    key_expiry: float | None = 30 * DAY
    viewers: dict[int, Viewer] = field(default_factory=dict)
    machines: dict[int, bytes] = field(default_factory=dict)

    def __post_init__(self) -> None:
        self.store = MemoryStore()
        cfg = Settings("shoal.internal", {"Regions": {}})
        self.svc = Service(self.store, State(), decide.Rules(POOL, self.key_expiry), cfg, lambda: self.now,
                           publish=self.publish)
        self.fanout = Fanout(self.svc, 0.05, 50.0)
        self.lifecycle = Lifecycle(self.svc, lambda nid: nid in self.fanout.sessions, 120.0)

    @property
    def state(self) -> State:
        return self.svc.state

    def publish(self, change: Change) -> None:
        self.fanout.submit(change, self.now)

    async def decide(self, fn: Callable[[State], list[ev.Event]]) -> None:
        self.now += 1
        with contextlib.suppress(DomainError):
            await self.svc.execute(fn, "test")

    # --- fan-out: the timer firing, and streams reading ---------------------------------------------------

    async def flush(self) -> None:
        self.fanout.flush(self.now)
        assert self.fanout.next_timer() is None
        # A closed stream ends when it next runs: as the stream's finally does it.
        for nid in [nid for nid, v in self.viewers.items() if v.session.closed]:
            await self.end_stream(nid)

    def drain(self, nid: int) -> None:
        v = self.viewers.get(nid)
        if v is None:
            return
        body = self.fanout.next_frame(v.session, self.now)
        if body is not None and body != KEEPALIVE:
            v.netmap.apply(json.loads(body))
            v.frames += 1

    # --- streams, as app.map and the stream's finally do it ---------------------------------------------

    async def connect(self, nid: int) -> None:
        n = self.state.nodes.get(nid)
        if n is None:
            return
        req = wire.MapRequest(node_key=bytes.fromhex(n.node_key.removeprefix("nodekey:")), stream=True)
        try:
            node_for_map(self.state, self.machines[nid], req, self.now)
        except DomainError:
            return
        s, _old = self.fanout.open(nid)
        self.viewers[nid] = Viewer(s)
        self.now += 1
        await self.lifecycle.connected(nid)

    async def end_stream(self, nid: int) -> None:
        v = self.viewers.pop(nid)
        if self.fanout.release(v.session):
            self.now += 1
            await self.lifecycle.disconnected(nid)

    # --- commands ---------------------------------------------------------------------------------------

    async def register(self, user: int, tags: tuple[str, ...], host: str, requested: tuple[str, ...],
                       keys: bytes, routes: tuple[str, ...] = ()) -> None:
        """``keys``: 96 bytes drawn by the test (machine, node and disco key), so an example replays exactly."""
        name = USERS[user]
        u = self.state.user_by_name(name)
        if u is None:
            return
        owner = decide.Owner(u, tags, False, None)
        machine = keys[:32]
        req = wire.RegisterRequest(
            node_key=keys[32:64], disco_key=keys[64:96],
            hostinfo=wire.Hostinfo(hostname=host, request_tags=requested, routable_ips=routes),
        )
        before = set(self.state.nodes)
        await self.decide(lambda s: decide.register(s, machine, req, owner, self.svc.rules, self.now))
        for nid in set(self.state.nodes) - before:
            self.machines[nid] = machine

    async def reauth(self, nid: int, user: int, tags: tuple[str, ...], node_key: bytes) -> None:
        u = self.state.user_by_name(USERS[user])
        if u is None:
            return
        req = wire.RegisterRequest(node_key=node_key, hostinfo=wire.Hostinfo(hostname="re"))
        owner = decide.Owner(u, tags, False, None)
        await self.decide(lambda s: decide.register(s, self.machines[nid], req, owner, self.svc.rules, self.now))

    async def map_update(self, nid: int, endpoints: int, home: int, host: str | None, disco: bytes | None,
                         types: int = 0, routes: tuple[str, ...] | None = None) -> None:
        n = self.state.nodes[nid]
        eps = ENDPOINTS[endpoints]
        await self.decide(lambda s: decide.map_update(
            s, n, disco_key=disco, endpoints=eps, endpoint_types=ENDPOINT_TYPES[types][: len(eps)], home_derp=home,
            hostname=host, os="linux" if host is not None else None, routes=routes if host is not None else None,
        ))


def ops() -> st.SearchStrategy[tuple[Any, ...]]:
    # Small indexes (taken modulo the node count) make commands hit the same few nodes, as races need.
    node = st.integers(0, 5)
    sched = st.lists(st.booleans(), min_size=1, max_size=8)
    return st.one_of(
        st.tuples(st.just("register"), st.integers(0, len(USERS) - 1), st.sampled_from(TAG_SETS),
                  st.sampled_from(HOSTS), st.sampled_from(((), ("tag:srv",))), st.binary(min_size=96, max_size=96),
                  st.sampled_from(ROUTES)),
        st.tuples(st.just("reauth"), node, st.integers(0, len(USERS) - 1), st.sampled_from(TAG_SETS), KEY),
        st.tuples(st.just("update"), node, st.integers(0, len(ENDPOINTS) - 1), st.integers(0, 3),
                  st.one_of(st.none(), st.sampled_from(HOSTS)), st.one_of(st.none(), KEY),
                  st.integers(0, len(ENDPOINT_TYPES) - 1), st.sampled_from(ROUTES)),
        st.tuples(st.just("user_create"), st.integers(0, len(USERS) - 1)),
        st.tuples(st.just("user_rename"), st.integers(0, len(USERS) - 1), st.integers(0, len(USERS) - 1)),
        st.tuples(st.just("user_delete"), st.integers(0, len(USERS) - 1)),
        st.tuples(st.just("rename"), node, st.sampled_from(("web", "db", "laptop", "x-1"))),
        st.tuples(st.just("tag"), node, st.sampled_from(TAG_SETS)),
        st.tuples(st.just("approve"), node, st.sampled_from(ROUTES[1:])),
        st.tuples(st.just("unapprove"), node, st.sampled_from(ROUTES[1:])),
        st.tuples(st.just("connect"), node),
        st.tuples(st.just("disconnect"), node),
        st.tuples(st.just("expire"), node),
        st.tuples(st.just("expiry"), node, st.one_of(st.none(), st.just(1.0), st.just(400 * DAY))),
        st.tuples(st.just("sweep"),),
        st.tuples(st.just("logout"), node),
        st.tuples(st.just("delete"), node),
        st.tuples(st.just("policy"), st.integers(-1, len(POLICIES) - 1)),
        st.tuples(st.just("tick"), sched),
        st.tuples(st.just("tick"), sched),
        # a session wakes for an earlier flush while newer events are folded but not yet flushed
        st.tuples(st.just("drain"), sched),
        st.tuples(st.just("drain"), sched),
        st.tuples(st.just("burst"), node, st.integers(60, 80)),
        # DNS settings and records: a DNSConfig delta to every session
        st.tuples(st.just("dns"), st.sampled_from(DNS_OPS)),
        # a plain-WireGuard device carried by a hub (coord/devices.py): the hub's record and filter change
        st.tuples(st.just("wgdev"), node, st.integers(0, len(USERS) - 1), KEY),
    )


async def step(sim: Sim, op: tuple[Any, ...]) -> None:
    kind = op[0]
    ids = sorted(sim.state.nodes)
    pick: Any
    global_ops = ("register", "policy", "tick", "drain", "sweep", "user_create", "user_rename", "user_delete", "dns")
    pick = ids[op[1] % len(ids)] if ids and kind not in global_ops else None
    if kind == "register":
        await sim.register(*op[1:])
    elif kind == "user_create":
        await sim.decide(lambda s: decide.create_user(s, USERS[op[1]]))
    elif kind == "user_rename":
        # a rename away and back: policies name users, so the name is what matters to visibility
        await sim.decide(lambda s: decide.rename_user(s, USERS[op[1]], USERS[op[2]]))
    elif kind == "user_delete":
        await sim.decide(lambda s: decide.delete_user(s, USERS[op[1]]))
    elif pick is None and kind not in global_ops:
        return
    elif kind == "reauth":
        await sim.reauth(pick, op[2], op[3], op[4])
    elif kind == "update":
        await sim.map_update(pick, *op[2:])
    elif kind == "rename":
        await sim.decide(lambda s: decide.rename_node(s, str(pick), op[2]))
    elif kind == "tag":
        await sim.decide(lambda s: decide.tag_node(s, str(pick), op[2]))
    elif kind == "approve":
        await sim.decide(lambda s: decide.approve_routes(s, str(pick), op[2]))
    elif kind == "unapprove":
        await sim.decide(lambda s: decide.unapprove_routes(s, str(pick), op[2]))
    elif kind == "connect":
        await sim.connect(pick)
    elif kind == "disconnect":
        if pick in sim.viewers:
            await sim.end_stream(pick)
    elif kind == "expire":
        await sim.decide(lambda s: decide.expire_node(s, str(pick), sim.now))
    elif kind == "expiry":
        exp = None if op[2] is None else sim.now + op[2]
        await sim.decide(lambda s: decide.set_key_expiry(s, str(pick), exp))
    elif kind == "sweep":
        sim.now += 1
        await sim.decide(lambda s: decide.expire_due(s, sim.now))
    elif kind == "logout":
        await sim.decide(lambda s: decide.logout(s, sim.machines[pick]))
    elif kind == "delete":
        await sim.decide(lambda s: decide.delete_node(s, str(pick)))
    elif kind == "policy":
        text = "" if op[1] < 0 else POLICIES[op[1]]
        if (text or None) != sim.state.policy_text:
            sha = hashlib.sha256(text.encode()).hexdigest() if text else ""
            await sim.decide(lambda s: [ev.PolicySet(text, sha)])
    elif kind == "dns":
        await sim.decide(lambda s: dns_events(s, op[1]))
    elif kind == "wgdev":
        await sim.decide(lambda s: decide.add_wg_device(s, f"dev-{op[3][:3].hex()}", USERS[op[2]], str(pick), op[3],
                                                        sim.svc.rules))
    elif kind in ("tick", "drain"):
        if kind == "tick":
            await sim.flush()
        for nid, drain in zip(sorted(sim.viewers), op[1], strict=False):
            if drain:
                sim.drain(nid)
    elif kind == "burst":
        # many flushed changes with no drain in between: the session's pending list overflows
        for i in range(op[2]):
            await sim.map_update(pick, i % len(ENDPOINTS), i % 4, None, None)
            await sim.flush()


async def check_converged(sim: Sim) -> None:
    await sim.flush()
    for nid in sorted(sim.viewers):
        sim.drain(nid)
    for nid, v in sim.viewers.items():
        body, _ = sim.svc.builder.full(sim.svc.visibility, nid, sim.now)
        fresh = wire.NetMap()
        fresh.apply(json.loads(body))
        assert strip(v.netmap.as_json()) == strip(fresh.as_json()), f"node {nid} after {v.frames} frames"
    # the same log, stored and folded again, is the same tailnet
    assert await sim.store.verify() == sim.state.last_seq


async def seeded() -> Sim:
    sim = Sim()
    for name in USERS:
        await sim.decide(lambda s, n=name: decide.create_user(s, n))
    return sim


async def play(script: list[tuple[Any, ...]]) -> None:
    sim = await seeded()
    for i in range(3):
        await sim.register(i % 2, (), "seed", (), bytes([i + 1]) * 96)
        await sim.connect(i + 1)
    for op in script:
        await step(sim, op)
    await check_converged(sim)


@settings(max_examples=300, deadline=None)
@given(st.lists(ops(), min_size=5, max_size=80))
def test_deltas_converge_to_the_fresh_full_map(script: list[tuple[Any, ...]]) -> None:
    asyncio.run(play(script))


async def random_history(seed: int) -> None:
    rnd = random.Random(seed)
    sim = await seeded()
    for _ in range(300):
        await step(sim, _random_op(rnd))
    try:
        await check_converged(sim)
    except AssertionError as e:
        raise AssertionError(f"seed {seed}: {e}") from None


def test_long_random_histories() -> None:
    """Denser runs than list shrinking favours (dozens of nodes and streams, 300 commands each), from fixed seeds.

    Hypothesis's op lists stay short; races between a flush and a session's wake-up need many nodes and streams.
    These weights catch the regression below in about one history in ten, so 60 seeds miss it with p < 0.002.
    """
    for seed in range(60):
        asyncio.run(random_history(seed))


async def patch_before_unflushed_change() -> None:
    sim = await seeded()
    for i in range(3):
        await sim.register(0, (), "seed", (), bytes([i + 1]) * 96)
    await sim.connect(1)
    await sim.flush()
    sim.drain(1)
    await sim.map_update(2, 1, 1, None, None)
    await sim.flush()
    await sim.decide(lambda s: decide.rename_node(s, "2", "renamed"))
    sim.drain(1)
    assert sim.viewers[1].netmap.peers[2]["Endpoints"] == list(ENDPOINTS[1])
    await check_converged(sim)
    assert sim.viewers[1].netmap.peers[2]["Name"] == "renamed.shoal.internal."


def test_patch_sent_before_an_unflushed_change_is_not_mistaken_for_the_whole_record() -> None:
    """Regression: a session woken for an endpoint patch while a rename was folded but not yet flushed."""
    asyncio.run(patch_before_unflushed_change())


OPS = ["register", "reauth", "update", "rename", "tag", "connect", "disconnect", "expire", "expiry", "sweep", "logout",
       "delete", "policy", "tick", "drain", "user_create", "user_rename", "user_delete", "approve", "unapprove", "dns"]
WEIGHTS = [12, 1, 8, 3, 1, 12, 1, 1, 1, 1, 1, 1, 1, 6, 8, 1, 1, 1, 2, 1, 1]


def _random_op(rnd: random.Random, weights: list[int] = WEIGHTS) -> tuple[Any, ...]:
    k = rnd.choices(OPS, weights=weights)[0]
    n = rnd.randrange(1000)
    if k == "register":
        return (k, rnd.randrange(len(USERS)), rnd.choice(TAG_SETS), rnd.choice(HOSTS), rnd.choice(((), ("tag:srv",))),
                rnd.randbytes(96), rnd.choice(ROUTES))
    if k == "reauth":
        return (k, n, rnd.randrange(len(USERS)), rnd.choice(TAG_SETS), rnd.randbytes(32))
    if k == "update":
        return (k, n, rnd.randrange(len(ENDPOINTS)), rnd.randrange(4), rnd.choice((None, *HOSTS)),
                rnd.randbytes(32) if rnd.random() < 0.2 else None, rnd.randrange(len(ENDPOINT_TYPES)),
                rnd.choice(ROUTES))
    if k == "user_create":
        return (k, rnd.randrange(len(USERS)))
    if k == "user_rename":
        return (k, rnd.randrange(len(USERS)), rnd.randrange(len(USERS)))
    if k == "user_delete":
        return (k, rnd.randrange(len(USERS)))
    if k == "rename":
        return (k, n, rnd.choice(("web", "db", "laptop", "x-1")))
    if k in ("tag",):
        return (k, n, rnd.choice(TAG_SETS))
    if k in ("approve", "unapprove"):
        return (k, n, rnd.choice(ROUTES[1:]))
    if k == "expiry":
        return (k, n, rnd.choice((None, 1.0, 400 * DAY)))
    if k == "sweep":
        return (k,)
    if k == "policy":
        return (k, rnd.randrange(-1, len(POLICIES)))
    if k in ("tick", "drain"):
        return (k, [rnd.random() < 0.6 for _ in range(8)])
    if k == "dns":
        return (k, rnd.choice(DNS_OPS))
    return (k, n)
