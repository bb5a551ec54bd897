"""The shape of coord/: sans-IO fan-out with explicit time, one Store interface, no import cycles, one error root."""

from __future__ import annotations

import ast
import asyncio
import json
from collections.abc import AsyncIterator, Callable
from pathlib import Path
from typing import Any

import pytest

from coord import decide, views
from coord import events as ev
from coord.app import create_app, derp_map, load_or_create_key
from coord.change import Change
from coord.config import ConfigError, load
from coord.errors import CoordError, DomainError, LocalError, NotFound, RemoteError
from coord.fanout import KEEPALIVE, MAX_PENDING, Fanout
from coord.netmap import AllowAll, Builder, Settings, Visibility
from coord.state import KeyStatus, NodeStatus, State
from coord.store import ChainBroken, Filter, Store, load_state
from coord.store.memory import MemoryStore
from coord.store.sqlite import SqliteStore
from tests.coord.util import Tailnet

ROOT = Path(__file__).resolve().parents[2]


# --- the fan-out core, time passed in ---------------------------------------------------------------------


class Netmaps:
    def __init__(self, state: State) -> None:
        self.builder = Builder(state, Settings("shoal.internal", {"Regions": {}}))
        self.visibility: Visibility = AllowAll(state)


def two_nodes() -> tuple[Tailnet, Netmaps]:
    t = Tailnet()
    t.user("alice")
    key = t.key("alice")
    t.register(b"\x01" * 32, "a", key)
    t.register(b"\x02" * 32, "b", key)
    return t, Netmaps(t.state)


def test_shape_fanout_tick_is_due_batch_delay_after_the_first_change() -> None:
    t, nm = two_nodes()
    f = Fanout(nm, batch_delay=0.05, keepalive=50.0)
    s, old = f.open(1)
    assert old is None and f.next_timer() is None
    f.submit(Change(), 10.0)
    assert f.next_timer() is None, "an empty change arms nothing"
    f.submit(Change(patches={2}), 10.0)
    f.submit(Change(peers={2}), 10.03)
    assert f.next_timer() == pytest.approx(10.05), "later changes join the tick, they do not push it back"
    # before its first frame a session needs no wake-up: the full map it is due covers everything
    assert f.flush(10.05) == [] and f.next_timer() is None
    assert f.next_frame(s, 10.06) is not None and not s.pending
    f.submit(t.run(lambda st: [ev.NodeConnected(2)]), 11.0)
    assert f.flush(11.05) == [s]
    delta = json.loads(f.next_frame(s, 11.06) or b"")
    assert [p["NodeID"] for p in delta["PeersChangedPatch"]] == [2]


def test_shape_fanout_keepalive_counts_from_when_the_stream_went_idle() -> None:
    _, nm = two_nodes()
    f = Fanout(nm, batch_delay=0.05, keepalive=50.0)
    s, _ = f.open(1)
    assert json.loads(f.next_frame(s, 100.0) or b"")["Peers"]
    assert f.session_timer(s) is None, "sending: no keep-alive is due"
    assert f.next_frame(s, 101.0) is None
    assert f.session_timer(s) == 151.0
    assert f.next_frame(s, 150.9) is None
    assert f.next_frame(s, 151.0) == KEEPALIVE
    assert f.session_timer(s) is None
    assert f.next_frame(s, 152.0) is None and f.session_timer(s) == 202.0
    # a change for others wakes nothing; one that wakes the stream but sends nothing (the versions it was sent
    # are current) restarts the idle time, as a frame does
    f.submit(Change(self_nodes={2}), 160.0)
    assert f.flush(160.05) == []
    f.submit(Change(patches={2}), 170.0)
    assert f.flush(170.05) == [s]
    assert f.next_frame(s, 171.0) is None and f.session_timer(s) == 221.0


def test_shape_fanout_overflow_sends_one_full_map_and_close_ends_the_stream() -> None:
    _, nm = two_nodes()
    f = Fanout(nm, batch_delay=0.05, keepalive=50.0)
    s, _ = f.open(1)
    f.next_frame(s, 1.0)
    for i in range(MAX_PENDING + 1):
        f.submit(Change(patches={2}), 2.0 + i)
        f.flush(2.0 + i)
    assert s.full_needed and not s.pending
    assert "Peers" in json.loads(f.next_frame(s, 100.0) or b"")
    s2, old = f.open(1)
    assert old is s and s.closed and f.ended(s) and f.next_frame(s, 101.0) is None
    assert not f.release(s) and f.release(s2) and not f.sessions
    s3, _ = f.open(2)
    f.submit(Change(close={2}), 200.0)
    assert f.flush(200.05) == [s3] and f.ended(s3)


# --- one Store interface, two implementations ---------------------------------------------------------------


def sealed(events: list[ev.Event], start: int = 0, prev: str = ev.GENESIS) -> list[ev.Record]:
    out = []
    for i, e in enumerate(events, start + 1):
        r = ev.seal_record(prev, i, ev.rfc3339(1_800_000_000.0 + i), "admin", e)
        out.append(r)
        prev = r.hash
    return out


async def sqlite_store(tmp: Path) -> Store:
    return await SqliteStore.open(tmp / "s.db")


async def memory_store(tmp: Path) -> Store:
    return MemoryStore()


@pytest.mark.anyio
@pytest.mark.parametrize("make", [memory_store, sqlite_store], ids=["memory", "sqlite"])
async def test_shape_stores_agree(tmp_path: Path, make: Callable[[Path], Any]) -> None:
    store: Store = await make(tmp_path)
    try:
        assert await store.last() == (0, ev.GENESIS) and await store.verify() == 0
        t = Tailnet()
        t.user("alice")
        t.register(b"\x01" * 32, "a", t.key("alice"))
        records = sealed(t.log)
        await store.append(records[:2], t.state, False)
        await store.append(records[2:], t.state, False)
        assert await store.last() == (records[-1].seq, records[-1].hash)
        assert await store.verify() == len(records)

        async def seqs(f: Filter) -> list[int]:
            it: AsyncIterator[ev.Record] = store.read(f)
            return [r.seq async for r in it]

        assert await seqs(Filter()) == [1, 2, 3]
        assert await seqs(Filter(since_seq=1)) == [2, 3]
        assert await seqs(Filter(types=("NodeRegistered",))) == [3]
        assert await seqs(Filter(node_id=1)) == [3]
        assert await seqs(Filter(until_time=records[1].time)) == [1, 2]
        assert await seqs(Filter(since_time=records[1].time)) == [2, 3]
        folded = await load_state(store)
        assert folded.last_hash == records[-1].hash and set(folded.nodes) == {1}
    finally:
        await store.close()


@pytest.mark.anyio
async def test_shape_memory_store_refuses_a_gap_and_verify_finds_a_forgery() -> None:
    store = MemoryStore()
    records = sealed([ev.UserCreated(1, "alice"), ev.UserCreated(2, "bob")])
    with pytest.raises(ChainBroken):
        await store.append(records[1:], State(), False)
    await store.append(records, State(), False)
    store.records[1] = ev.Record(2, records[1].time, "admin", ev.UserCreated(2, "eve"), records[1].prev_hash,
                                 records[1].hash)
    with pytest.raises(ChainBroken) as e:
        await store.verify()
    assert e.value.seq == 2


# --- the composition root -----------------------------------------------------------------------------------


@pytest.mark.anyio
async def test_shape_create_app_builds_everything_and_runs_admin_commands_without_starting(tmp_path: Path) -> None:
    config = load(None, env={}, overrides={"data_dir": str(tmp_path), "stun_listen": ""})
    app = await create_app(config, serve=False)
    try:
        assert app.relay is None and not app.started
        await app.service.create_user("alice")
        assert app.admin.service is app.service and app.admin.logins is app.logins
        assert not app.admin.has_session(1)
    finally:
        await app.close()
    app = await create_app(config)
    try:
        assert app.relay is not None, "the embedded relay is built with the server"
        assert app.service.state.user_by_name("alice") is not None
        assert app.fanout.core.netmaps is app.service
    finally:
        await app.close()
    assert not (tmp_path / "admin.sock").exists()


def coord_imports() -> dict[str, set[str]]:
    """coord module -> the coord modules it imports (anywhere in the file, lazily or not)."""
    mods: dict[str, Path] = {}
    for path in (ROOT / "coord").rglob("*.py"):
        parts = path.relative_to(ROOT).with_suffix("").parts
        name = ".".join(parts[:-1] if parts[-1] == "__init__" else parts)
        mods[name] = path
    graph: dict[str, set[str]] = {}
    for name, path in mods.items():
        deps: set[str] = set()
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.Import):
                deps.update(a.name for a in node.names if a.name in mods)
            elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
                for a in node.names:
                    full = f"{node.module}.{a.name}"
                    deps.add(full if full in mods else node.module)
        graph[name] = {d for d in deps if d in mods and d != name}
    return graph


def find_cycle(graph: dict[str, set[str]]) -> list[str] | None:
    done: set[str] = set()

    def visit(n: str, path: list[str]) -> list[str] | None:
        if n in path:
            return [*path[path.index(n):], n]
        if n in done:
            return None
        for d in sorted(graph[n]):
            found = visit(d, [*path, n])
            if found:
                return found
        done.add(n)
        return None

    for n in sorted(graph):
        found = visit(n, [])
        if found:
            return found
    return None


def test_shape_no_import_cycle() -> None:
    graph = coord_imports()
    assert "coord.serve" in graph["coord.cli"] and "coord.lock" in graph["coord.serve"]
    cycle = find_cycle(graph)
    assert cycle is None, "import cycle: " + " -> ".join(cycle or [])
    graph["coord.lock"].add("coord.cli")
    assert find_cycle(graph) == ["coord.cli", "coord.lock", "coord.cli"]


# --- names and errors ---------------------------------------------------------------------------------------


def test_shape_one_error_root() -> None:
    for cls in (DomainError, NotFound, ConfigError, ChainBroken, LocalError, RemoteError):
        assert issubclass(cls, CoordError)
    assert issubclass(ConfigError, LocalError) and not issubclass(ConfigError, DomainError)


def test_shape_config_problems_raise_config_error(tmp_path: Path) -> None:
    (tmp_path / "server.key").write_text("not a key\n")
    with pytest.raises(ConfigError, match="not a server private key"):
        load_or_create_key(tmp_path / "server.key")
    (tmp_path / "map.json").write_text("[]")
    config = load(None, env={}, overrides={"data_dir": str(tmp_path), "derp_map_file": str(tmp_path / "map.json")})
    with pytest.raises(ConfigError, match="derp_map_file"):
        derp_map(config)
    with pytest.raises(ConfigError):
        asyncio.run(create_app(config))


def test_shape_states_are_str_enums_with_the_old_text() -> None:
    assert [str(s) for s in NodeStatus] == ["active", "expired", "logged-out"]
    assert json.dumps({"s": NodeStatus.LOGGED_OUT}) == '{"s": "logged-out"}'
    row = {"expired": False, "logged_out": True}
    assert f"{views.node_status(row):<12}|" == "logged-out  |"
    t = Tailnet()
    t.user("alice")
    prefix, h = t.key("alice", reusable=False)
    k = t.state.keys[t.state.keys_by_prefix[prefix]]
    assert k.status(t.now) is KeyStatus.USABLE and decide.key_usable(k, t.now)
    t.register(b"\x01" * 32, "a", (prefix, h))
    assert k.status(t.now) is KeyStatus.USED
    with pytest.raises(DomainError, match="already been used"):
        decide.check_auth_key(t.state, prefix, h, t.now)
