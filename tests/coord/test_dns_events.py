"""MagicDNS settings as events: decided with precise refusals, folded, seeded from the config, replayed; every
change (and a rename) reaches every node as a delta; the records file is watched."""

from __future__ import annotations

import asyncio
import json
import logging
from pathlib import Path
from typing import Any

import pytest

from coord import admin, decide, dns
from coord import events as ev
from coord.app import create_app
from coord.config import load
from coord.errors import ConfigError, Conflict, DomainError, NotFound
from coord.state import State, apply
from tests.coord.harness import running_server, sim_node
from tests.coord.logscript import DNS_OPS
from tests.coord.test_log_replay import run_script
from tests.coord.test_server import make_key, next_map, until

BASE = "shoal.internal"


def run(state: State, events: list[ev.Event]) -> list[ev.Event]:
    for e in events:
        apply(state, e, 1_800_000_000.0)
    return events


def test_dns_config_seed_changes_only_the_fields_the_config_changed() -> None:
    s = State()
    first = dns.settings(nameservers=["1.1.1.1"], search_domains=["corp.example"])
    assert [e.type for e in run(s, decide.seed_dns(s, first))] == ["DNSConfigSeeded"]
    assert s.dns == first
    run(s, decide.set_dns(s, BASE, nameservers=["9.9.9.9"]))
    assert s.dns.nameservers == ("9.9.9.9",)
    # a restart with the same config: nothing to log, the admin's change stays
    assert decide.seed_dns(s, first) == []
    # the config's search domains change: those follow the config, the admin's nameservers stay
    second = dns.settings(nameservers=["1.1.1.1"], search_domains=["lab.example"])
    run(s, decide.seed_dns(s, second))
    assert s.dns.nameservers == ("9.9.9.9",) and s.dns.search_domains == ("lab.example",)
    # now the config's nameservers change too: the config wins for that field
    run(s, decide.seed_dns(s, dns.settings(nameservers=["8.8.8.8"], search_domains=["lab.example"])))
    assert s.dns.nameservers == ("8.8.8.8",)
    # a log that never saw a [dns] table seeds nothing for the defaults
    assert decide.seed_dns(State(), dns.DEFAULT) == []


def test_dns_set_and_records_decide_and_fold() -> None:
    s = State()
    run(s, decide.set_dns(s, BASE, magic_dns=False, split={"Corp.Example.": ["192.0.2.53", "192.0.2.54:5353"]},
                          override_local_dns=False))
    assert s.dns.magic_dns is False and s.dns.override_local_dns is False
    assert s.dns.split == (("corp.example", ("192.0.2.53", "192.0.2.54:5353")),)
    assert decide.set_dns(s, BASE, magic_dns=False) == []  # no change, no event
    run(s, decide.set_dns(s, BASE, split={"lab.example": ["198.51.100.53"]}))
    assert [x for x, _ in s.dns.split] == ["corp.example", "lab.example"]
    run(s, decide.set_dns(s, BASE, split={"corp.example": []}))
    assert [x for x, _ in s.dns.split] == ["lab.example"]
    run(s, decide.set_dns(s, BASE, clear_split=True))
    assert s.dns.split == ()
    run(s, decide.add_dns_record(s, "Grafana.Example.com", "a", "100.64.0.9"))
    run(s, decide.add_dns_record(s, "grafana.example.com", "AAAA", "fd7a:115c:a1e0::9"))
    assert s.dns.extra_records == (("grafana.example.com", "A", "100.64.0.9"),
                                   ("grafana.example.com", "AAAA", "fd7a:115c:a1e0::9"))
    run(s, decide.remove_dns_record(s, "grafana.example.com", "A", "100.64.0.9"))
    assert s.dns.extra_records == (("grafana.example.com", "AAAA", "fd7a:115c:a1e0::9"),)
    assert len(run(s, decide.remove_dns_record(s, "grafana.example.com"))) == 1
    assert s.dns.extra_records == ()
    assert s.dns_version == 8


@pytest.mark.parametrize(("fn", "error", "message"), [
    (lambda s: decide.set_dns(s, BASE, nameservers=["999.1.1.1"]), DomainError,
     "nameservers: '999.1.1.1' is not an IP address"),
    (lambda s: decide.set_dns(s, BASE, split={"ts.shoal.internal": ["192.0.2.1"]}), DomainError,
     "split suffix: ts.shoal.internal is inside the base domain shoal.internal"),
    (lambda s: decide.set_dns(s, BASE, split={"corp.example": ["x"]}), DomainError,
     "split corp.example: 'x' is not an IP address"),
    (lambda s: decide.set_dns(s, BASE, split={"nope.example": []}), NotFound,
     "no split DNS route for nope.example to remove"),
    (lambda s: decide.set_dns(s, BASE, search_domains=["a..b"]), DomainError, "search domain: 'a..b' is not a DNS"),
    (lambda s: decide.add_dns_record(s, "a.example", "TXT", "hi"), DomainError, "type 'TXT' is not A or AAAA"),
    (lambda s: decide.add_dns_record(s, "a.example", "AAAA", "192.0.2.1"), DomainError,
     "type AAAA needs an IPv6 address"),
    (lambda s: decide.add_dns_record(s, "a_b!.example", "A", "192.0.2.1"), DomainError, "is not a DNS name"),
    (lambda s: decide.add_dns_record(s, "dup.example", "A", "192.0.2.1"), Conflict, "exists already"),
    (lambda s: decide.remove_dns_record(s, "none.example"), NotFound, "no extra record none.example"),
    (lambda s: decide.remove_dns_record(s, "file.example.com"), Conflict,
     "comes from the extra records file; edit the file"),
    (lambda s: decide.load_dns_file(s, "/r.json", "[1]"), DomainError, "/r.json: records[0]: expected {Name"),
])
def test_dns_commands_refuse_bad_input_precisely(fn: Any, error: type[Exception], message: str) -> None:
    s = State()
    run(s, decide.add_dns_record(s, "dup.example", "A", "192.0.2.1"))
    run(s, decide.load_dns_file(s, "/r.json", '[{"Name": "file.example.com", "Value": "100.64.0.50"}]'))
    before = s.dns
    with pytest.raises(error) as e:
        fn(s)
    assert message in str(e.value)
    assert s.dns == before


def test_dns_events_replay_and_restart_agree_with_live(tmp_path: Path) -> None:
    """Every DNS op through the real server on SQLite: the projection rows of a replay equal the live ones, every
    --at view is a prefix, a restart (snapshot + tail) is the same state (tests/coord/test_log_replay.py)."""
    script: list[tuple[Any, ...]] = [*DNS_OPS, ("clock", -30.0), *reversed(DNS_OPS), ("dns_record_add", 0)]
    asyncio.run(run_script(tmp_path / "data", script))


# --- end to end: a real server, simulated nodes streaming their maps ---------------------------------------------


async def streams(r: Any, names: tuple[str, ...]) -> tuple[list[Any], list[Any], list[dict[str, Any]]]:
    """Nodes joined, then streaming: each stream's full map already has every peer."""
    key = await make_key(r)
    nodes = [sim_node(r.url, name) for name in names]
    for n in nodes:
        await n.join(key)
    its = [n.client.stream(n.map_request()) for n in nodes]
    fulls = [await next_map(it) for it in its]
    assert all(len(f["Peers"]) == len(names) - 1 for f in fulls)
    # A registration or connect still batched when a stream opened is pushed after its full map; let it go out so
    # that the change under test is a frame of its own and not merged with it.
    core = r.app.fanout.core
    for _ in range(200):
        if core.next_timer() is None and not any(s.pending for s in core.sessions.values()):
            break
        await asyncio.sleep(0.01)
    return nodes, its, fulls


async def close(nodes: list[Any], its: list[Any]) -> None:
    for it in its:
        await it.aclose()
    for n in nodes:
        await n.client.close()


async def dns_change_reaches_every_node(tmp_path: Path) -> None:
    async with running_server(tmp_path) as r:
        nodes, its, fulls = await streams(r, ("alpha", "beta", "gamma"))
        assert fulls[0]["DNSConfig"] == dns.render(dns.DEFAULT, (), BASE, dns.reverse_zones("100.64.0.0/10",
                                                                                             "fd7a:115c:a1e0::/48"))
        assert fulls[0]["DNSConfig"]["Domains"] == [BASE] and fulls[0]["DNSConfig"]["Proxied"] is True
        result = await admin.run(r.app.admin, "dns.set", {
            "nameservers": ["192.0.2.1"], "split": {"corp.example": ["192.0.2.53"]},
            "search_domains": ["corp.example"],
        })
        assert result["changed"] is True
        for it in its:
            d = await until(it, "DNSConfig")
            assert not {"Peers", "PeersChanged", "Node"} & set(d)  # a delta: no full map, no peer resent
            c = d["DNSConfig"]
            assert c["Resolvers"] == [{"Addr": "192.0.2.1"}]
            assert c["Routes"]["corp.example."] == [{"Addr": "192.0.2.53"}] and c["Routes"][f"{BASE}."] == []
            assert c["Domains"] == [BASE, "corp.example"]
        await admin.run(r.app.admin, "dns.records.add", {"name": "grafana.example.com", "type": "A",
                                                         "value": "100.64.0.9"})
        for it in its:
            d = await until(it, "DNSConfig")
            assert d["DNSConfig"]["ExtraRecords"] == [{"Name": "grafana.example.com", "Type": "A",
                                                       "Value": "100.64.0.9"}]
        # an unchanged setting is no event and no frame
        seq = r.svc.state.last_seq
        assert (await admin.run(r.app.admin, "dns.set", {"nameservers": ["192.0.2.1"]}))["changed"] is False
        assert r.svc.state.last_seq == seq
        await close(nodes, its)


def test_dns_change_reaches_every_node_as_a_delta(tmp_path: Path) -> None:
    asyncio.run(dns_change_reaches_every_node(tmp_path))


async def rename_reaches_every_viewer(tmp_path: Path) -> None:
    async with running_server(tmp_path) as r:
        nodes, its, _ = await streams(r, ("alpha", "beta", "gamma"))
        await r.svc.rename_node("gamma", "db")
        for it in its[:2]:
            while True:
                d = await until(it, "PeersChanged")
                assert "Peers" not in d
                names = [p["Name"] for p in d["PeersChanged"]]
                if names == [f"db.{BASE}."]:
                    break
                assert names == [f"gamma.{BASE}."]  # a push of gamma's joining, sent before the rename
        d = await until(its[2], "Node")
        assert d["Node"]["Name"] == f"db.{BASE}." and "Peers" not in d
        await close(nodes, its)


def test_dns_rename_reaches_every_viewer_as_a_delta(tmp_path: Path) -> None:
    asyncio.run(rename_reaches_every_viewer(tmp_path))


# --- the watched records file --------------------------------------------------------------------------------

RECORDS_1 = [{"Name": "grafana.example.com", "Type": "A", "Value": "100.64.0.9"}]
RECORDS_2 = [*RECORDS_1, {"Name": "db.example.com", "Type": "AAAA", "Value": "fd7a:115c:a1e0::a"}]


async def records_file_watched(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    path = tmp_path / "records.json"
    path.write_text(json.dumps(RECORDS_1))

    async def loaded() -> list[ev.Event]:
        return [x.event async for x in r.svc.store.read() if x.event.type == "DNSRecordsFileLoaded"]

    async with running_server(tmp_path / "data", app_kw={"dns_poll": 0.05},
                              dns_extra_records_file=str(path)) as r:
        assert len(await loaded()) == 1
        key = await make_key(r)
        n = sim_node(r.url, "alpha")
        await n.join(key)
        it = n.client.stream(n.map_request())
        full = await next_map(it)
        assert full["DNSConfig"]["ExtraRecords"] == RECORDS_1
        path.write_text(json.dumps(RECORDS_2))
        d = await until(it, "DNSConfig", timeout=5)
        assert d["DNSConfig"]["ExtraRecords"] == RECORDS_2
        assert len(await loaded()) == 2
        # a half-written file: logged, the last good records stay, nothing logged in the event log
        with caplog.at_level(logging.ERROR, "shoal.dns"):
            path.write_text('[{"Name": "db.example.com", ')
            await asyncio.sleep(0.3)
        assert "not JSON" in caplog.text and "the last good records stay" in caplog.text
        assert len(await loaded()) == 2
        assert [x[0] for x in r.svc.state.dns_file_records] == ["grafana.example.com", "db.example.com"]
        # a rewrite to the same records is no event
        path.write_text(json.dumps(RECORDS_2, indent=2))
        await asyncio.sleep(0.3)
        assert len(await loaded()) == 2
        path.write_text("[]")
        d = await until(it, "DNSConfig", timeout=5)
        assert "ExtraRecords" not in d["DNSConfig"]
        await it.aclose()
        await n.client.close()
    # a restart with an unchanged file logs nothing; a bad file at start refuses to start, precisely
    async with running_server(tmp_path / "data", dns_extra_records_file=str(path)) as r:
        assert len(await loaded()) == 3
    path.write_text('[{"Name": "x.example", "Type": "A", "Value": "fd7a::1"}]')
    cfg = load(None, env={}, overrides={"data_dir": str(tmp_path / "data"), "derp": False, "stun_listen": "",
                                        "dns_extra_records_file": str(path)})
    app = await create_app(cfg)
    try:
        with pytest.raises(ConfigError) as e:
            await app.start()
        assert f"dns.extra_records_file {path}: records[0] x.example: type A needs an IPv4 address" in str(e.value)
    finally:
        await app.close()


def test_dns_records_file_is_watched_and_each_change_is_an_event(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    asyncio.run(records_file_watched(tmp_path, caplog))


POLICY = """{"acls": [{"action": "accept", "src": ["alice@example.com"], "dst": ["alice@example.com:*"]}]}"""


async def hidden_peers_get_no_names(tmp_path: Path) -> None:
    async with running_server(tmp_path) as r:
        for u in ("alice@example.com", "bob@example.com"):
            await r.svc.create_user(u)
        keys = {u: (await r.svc.create_key(u, reusable=True, ephemeral=False, expiration=3600.0, tags=()))["key"]
                for u in ("alice@example.com", "bob@example.com")}
        await r.svc.set_policy(POLICY)
        a1, a2, b = sim_node(r.url, "a1"), sim_node(r.url, "a2"), sim_node(r.url, "b")
        for n, u in ((a1, "alice@example.com"), (a2, "alice@example.com"), (b, "bob@example.com")):
            await n.join(keys[u])
        its = [n.client.stream(n.map_request()) for n in (a1, a2, b)]
        fulls = [await next_map(it) for it in its]
        assert [p["Name"] for p in fulls[0]["Peers"]] == [f"a2.{BASE}."]
        assert fulls[2]["Peers"] == []  # bob's node is told no name of alice's
        await r.svc.rename_node("a2", "db")
        d = await until(its[0], "PeersChanged")
        assert [p["Name"] for p in d["PeersChanged"]] == [f"db.{BASE}."]
        # the hidden viewer gets no frame for it: the next thing it sees is the DNS change everyone gets
        await admin.run(r.app.admin, "dns.records.add", {"name": "x.example.com", "type": "A", "value": "100.64.0.7"})
        while "DNSConfig" not in (d := await next_map(its[2])):
            assert not d.get("PeersChanged") and not d.get("Peers"), d
        assert not d.get("PeersChanged") and not d.get("Peers")
        for it in its:
            await it.aclose()
        for n in (a1, a2, b):
            await n.client.close()


def test_dns_names_reach_only_the_peers_the_policy_lets_see(tmp_path: Path) -> None:
    asyncio.run(hidden_peers_get_no_names(tmp_path))
