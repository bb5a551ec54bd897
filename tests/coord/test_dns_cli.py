"""``shoal-server dns get|set|records`` against a real running server (a ``serve`` subprocess with a config file),
then ``events replay`` and restarts: the config seeds, the CLI overrides, each change is one event."""

from __future__ import annotations

import asyncio
import json
import os
import signal
import subprocess
import sys
import time
import urllib.request
from pathlib import Path
from typing import Any

from tests.coord.harness import free_port, sim_node
from tests.coord.test_server import next_map, until
from tests.coord.util import cli, cli_json

CONFIG = """
[dns]
nameservers = ["192.0.2.1"]
search_domains = ["corp.example"]
extra_records = [{{name = "seed.example.com", type = "A", value = "100.64.0.42"}}]
extra_records_file = "{records}"
[dns.split]
"corp.example" = ["192.0.2.53"]
"""


def start(data: Path, port: int, config: Path) -> subprocess.Popen[bytes]:
    proc = subprocess.Popen(
        [sys.executable, "-m", "coord.cli", "serve", "--config", str(config), "--data", str(data),
         "--listen", f"127.0.0.1:{port}", "--server-url", f"http://127.0.0.1:{port}", "--no-derp",
         "--stun-listen", "", "--log-level", "warning"],
        stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, env={**os.environ, "SHOAL_CONFIG": ""},
    )
    deadline = time.monotonic() + 20
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise AssertionError(f"server exited {proc.returncode}: {proc.stderr.read() if proc.stderr else ''!r}")
        try:
            with urllib.request.urlopen(f"http://127.0.0.1:{port}/health", timeout=1) as r:
                if r.status == 200 and (data / "admin.sock").exists():
                    return proc
        except OSError:
            pass
        time.sleep(0.05)
    proc.kill()
    raise AssertionError("server did not start")


def stop(proc: subprocess.Popen[bytes]) -> None:
    proc.send_signal(signal.SIGTERM)
    proc.wait(20)


def dns_events(data: Path) -> list[dict[str, Any]]:
    lines = cli(data, "events", "tail", "-n", "1000", "--json").stdout.splitlines()
    return [e for e in map(json.loads, lines) if e["type"].startswith("DNS")]


def test_dns_cli_against_a_running_server(tmp_path: Path) -> None:
    data, port = tmp_path / "data", free_port()
    records = tmp_path / "records.json"
    records.write_text('[{"Name": "file.example.com", "Type": "A", "Value": "100.64.0.50"}]')
    config = tmp_path / "shoal.toml"
    config.write_text(CONFIG.format(records=records))
    server = start(data, port, config)
    try:
        got = cli_json(data, "dns", "get")
        assert got["nameservers"] == ["192.0.2.1"] and got["split"] == {"corp.example": ["192.0.2.53"]}
        assert got["search_domains"] == ["corp.example"] and got["magic_dns"] is True
        assert got["extra_records"] == [{"name": "seed.example.com", "type": "A", "value": "100.64.0.42"}]
        assert got["file_records"] == [{"name": "file.example.com", "type": "A", "value": "100.64.0.50"}]
        assert got["netmap"]["Domains"] == ["shoal.internal", "corp.example"]
        assert [e["type"] for e in dns_events(data)] == ["DNSConfigSeeded", "DNSRecordsFileLoaded"]
        text = cli(data, "dns", "get").stdout
        assert "MagicDNS:           on" in text and "corp.example -> 192.0.2.53" in text

        out = cli_json(data, "dns", "set", "--magic-dns", "off", "--nameserver", "9.9.9.9", "--nameserver",
                       "[2620:fe::fe]:53", "--split", "lab.example=198.51.100.53,198.51.100.54", "--search", "",
                       "--override-local-dns", "off")
        assert out["changed"] is True and out["magic_dns"] is False
        assert out["nameservers"] == ["9.9.9.9", "[2620:fe::fe]:53"] and out["search_domains"] == []
        assert out["split"] == {"corp.example": ["192.0.2.53"], "lab.example": ["198.51.100.53", "198.51.100.54"]}
        assert out["netmap"]["Resolvers"] == [] and out["netmap"]["Proxied"] is False
        assert out["netmap"]["FallbackResolvers"] == [{"Addr": "9.9.9.9"}, {"Addr": "[2620:fe::fe]:53"}]
        assert cli(data, "dns", "set", "--magic-dns", "off").stdout.startswith("DNS settings unchanged")
        cli(data, "dns", "set", "--magic-dns", "on", "--split", "corp.example=")
        assert cli_json(data, "dns", "get")["split"] == {"lab.example": ["198.51.100.53", "198.51.100.54"]}

        cli(data, "dns", "records", "add", "grafana.example.com", "A", "100.64.0.9")
        cli(data, "dns", "records", "add", "grafana.example.com", "AAAA", "fd7a:115c:a1e0::9")
        listed = cli(data, "dns", "records", "list").stdout
        assert "grafana.example.com  AAAA  fd7a:115c:a1e0::9  config/admin" in listed
        assert "file.example.com     A     100.64.0.50        file" in listed
        cli(data, "dns", "records", "remove", "grafana.example.com", "A", "100.64.0.9")
        rows = cli_json(data, "dns", "records", "list")["records"]
        assert [(r["name"], r["type"], r["source"]) for r in rows] == [
            ("seed.example.com", "A", "config/admin"), ("grafana.example.com", "AAAA", "config/admin"),
            ("file.example.com", "A", "file")]

        # bad input: one precise line, exit 1, nothing logged, the server keeps serving
        before = len(dns_events(data))
        for args, message in (
            (("dns", "set", "--nameserver", "dns.google"), "nameservers: 'dns.google' is not an IP address"),
            (("dns", "set", "--split", "x.shoal.internal=192.0.2.1"),
             "split suffix: x.shoal.internal is inside the base domain shoal.internal"),
            (("dns", "set", "--split", "192.0.2.1"), "--split: '192.0.2.1' is not SUFFIX=ADDR[,ADDR]"),
            (("dns", "set"), "dns set: nothing to change"),
            (("dns", "records", "add", "x.example", "MX", "192.0.2.1"), "type 'MX' is not A or AAAA"),
            (("dns", "records", "add", "grafana.example.com", "AAAA", "fd7a:115c:a1e0::9"), "exists already"),
            (("dns", "records", "remove", "nothing.example"), "no extra record nothing.example"),
            (("dns", "records", "remove", "file.example.com"), "comes from the extra records file"),
            (("dns", "records", "remove", "x.example", "A"), "give NAME, or NAME TYPE VALUE"),
        ):
            p = cli(data, *args, check=False)
            assert p.returncode == 1, args
            # (``python -m coord.cli`` logs httpx at INFO; the installed shoal-server does not)
            lines = [x for x in p.stderr.splitlines() if not x.startswith("INFO:httpx:")]
            assert len(lines) == 1 and lines[0].startswith("shoal-server: ") and message in lines[0], p.stderr
        assert len(dns_events(data)) == before
        assert server.poll() is None
        admin_changes = [e for e in dns_events(data) if e["actor"] == "admin"]
        assert [e["type"] for e in admin_changes] == ["DNSSettingsSet", "DNSSettingsSet", "DNSRecordAdded",
                                                      "DNSRecordAdded", "DNSRecordRemoved"]
    finally:
        stop(server)

    # the log alone rebuilds exactly these projection rows
    replay = cli_json(data, "events", "replay", "--into", str(tmp_path / "replay.db"))
    assert replay["projections_equal_live"] is True

    # a restart with the same config: no new event, the CLI's changes stay
    n = len(dns_events(data))
    server = start(data, port, config)
    try:
        assert len(dns_events(data)) == n
        assert cli_json(data, "dns", "get")["nameservers"] == ["9.9.9.9", "[2620:fe::fe]:53"]
    finally:
        stop(server)
    # the config's nameservers change: that field follows the config, the CLI's other changes stay
    config.write_text(CONFIG.format(records=records).replace('["192.0.2.1"]', '["192.0.2.2"]'))
    server = start(data, port, config)
    try:
        got = cli_json(data, "dns", "get")
        assert got["nameservers"] == ["192.0.2.2"]
        assert got["override_local_dns"] is False and "lab.example" in got["split"]
        assert dns_events(data)[-1]["type"] == "DNSConfigSeeded" and dns_events(data)[-1]["actor"] == "system"
    finally:
        stop(server)
    # without a server, the same commands run in-process on the data dir (and seed nothing)
    cli(data, "dns", "set", "--search", "a.example")
    assert cli_json(data, "dns", "get")["search_domains"] == ["a.example"]
    assert cli_json(data, "events", "replay", "--into", str(tmp_path / "replay2.db"))["projections_equal_live"]


async def node_sees_cli_change(data: Path, port: int) -> None:
    key = (await asyncio.to_thread(cli, data, "keys", "create", "--user", "alice")).stdout.split()[0]
    n = sim_node(f"http://127.0.0.1:{port}", "alpha")
    await n.join(key)
    it = n.client.stream(n.map_request())
    full = await next_map(it)
    assert full["DNSConfig"]["Resolvers"] == [{"Addr": "192.0.2.1"}]
    await asyncio.to_thread(cli, data, "dns", "set", "--nameserver", "192.0.2.99")
    d = await until(it, "DNSConfig")
    assert d["DNSConfig"]["Resolvers"] == [{"Addr": "192.0.2.99"}] and "Peers" not in d
    await asyncio.to_thread(cli, data, "dns", "records", "add", "grafana.example.com", "A", "100.64.0.9")
    d = await until(it, "DNSConfig")
    assert {"Name": "grafana.example.com", "Type": "A", "Value": "100.64.0.9"} in d["DNSConfig"]["ExtraRecords"]
    await it.aclose()
    await n.client.close()


def with_alice(tmp_path: Path) -> tuple[Path, int, Path, subprocess.Popen[bytes]]:
    """A server with the CONFIG above (an empty records file) and user alice: (data, port, config, process)."""
    data, port = tmp_path / "data", free_port()
    records = tmp_path / "records.json"
    records.write_text("[]")
    config = tmp_path / "shoal.toml"
    config.write_text(CONFIG.format(records=records))
    server = start(data, port, config)
    try:
        cli(data, "users", "create", "alice")
    except BaseException:
        stop(server)
        raise
    return data, port, config, server


def test_dns_cli_change_reaches_a_streaming_node(tmp_path: Path) -> None:
    data, port, _, server = with_alice(tmp_path)
    try:
        asyncio.run(node_sees_cli_change(data, port))
    finally:
        stop(server)


async def base_domain_reaches_nodes(data: Path, port: int) -> None:
    key = (await asyncio.to_thread(cli, data, "keys", "create", "--user", "alice", "--reusable")).stdout.split()[0]
    a, b = sim_node(f"http://127.0.0.1:{port}", "alpha"), sim_node(f"http://127.0.0.1:{port}", "beta")
    await a.join(key)
    await b.join(key)
    ia, ib = a.client.stream(a.map_request()), b.client.stream(b.map_request())
    fa, fb = await next_map(ia), await next_map(ib)
    assert fa["Node"]["Name"] == "alpha.shoal.internal." and fb["Domain"] == "shoal.internal"
    p = await asyncio.to_thread(cli, data, "dns", "set", "--base-domain", "Corp.Internal.")
    assert "base domain:        corp.internal (set by an admin)" in p.stdout
    for it, me, peer in ((ia, "alpha", "beta"), (ib, "beta", "alpha")):
        d = await until(it, "Domain")
        assert "Peers" not in d and d["Domain"] == "corp.internal"
        assert d["Node"]["Name"] == f"{me}.corp.internal."
        assert [p["Name"] for p in d["PeersChanged"]] == [f"{peer}.corp.internal."]
        assert d["DNSConfig"]["Domains"][0] == "corp.internal" and d["DNSConfig"]["Routes"]["corp.internal."] == []
        assert "shoal.internal." not in d["DNSConfig"]["Routes"]
    # The server's own host and a domain holding a split suffix are refused, and nothing is logged.
    before = len(dns_events(data))
    bad = await asyncio.to_thread(cli, data, "dns", "set", "--base-domain", "0.0.1", check=False)
    assert bad.returncode != 0 and "'0.0.1' is a suffix of the server URL's host 127.0.0.1" in bad.stderr
    bad = await asyncio.to_thread(cli, data, "dns", "set", "--base-domain", "a..b", check=False)
    assert bad.returncode != 0 and "'a..b' is not a lowercase DNS name" in bad.stderr
    bad = await asyncio.to_thread(cli, data, "dns", "set", "--base-domain", "corp.example", check=False)
    assert bad.returncode != 0 and "split suffix: corp.example is inside the base domain corp.example" in bad.stderr
    assert len(dns_events(data)) == before
    for it in (ia, ib):
        await it.aclose()
    await a.client.close()
    await b.client.close()


def test_dns_cli_base_domain_changes_at_run_time(tmp_path: Path) -> None:
    data, port, config, server = with_alice(tmp_path)
    try:
        asyncio.run(base_domain_reaches_nodes(data, port))
        assert [e["data"] for e in dns_events(data) if e["type"] == "DNSBaseDomainSet"] == [{"domain": "corp.internal"}]
    finally:
        stop(server)
    # Kept across a restart (from the log), and going back to the config's is an event naming no domain.
    server = start(data, port, config)
    try:
        assert cli_json(data, "dns", "get")["base_domain"] == "corp.internal"
        cli(data, "dns", "set", "--base-domain", "shoal.internal")
        got = cli_json(data, "dns", "get")
        assert (got["base_domain"], got["base_domain_source"]) == ("shoal.internal", "config")
        assert dns_events(data)[-1]["data"] == {"domain": ""}
        assert cli_json(data, "events", "replay", "--into", str(tmp_path / "replay.db"))["projections_equal_live"]
    finally:
        stop(server)
