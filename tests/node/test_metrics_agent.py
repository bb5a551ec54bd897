"""The agent's metric families (node/metrics.py, sans-IO): a status document in, series out, promtool-clean."""

from __future__ import annotations

import json
import subprocess

from prometheus_client import CollectorRegistry, generate_latest
from prometheus_client.metrics_core import Metric
from prometheus_client.registry import Collector

from node.metrics import FilterCounts, families, parse_nft_counters

NOW = 1_800_000_000.0
STATUS = {
    "BackendState": "Running",
    "Peers": [
        {"Path": "direct", "InEngine": True, "LastHandshake": NOW - 3, "Key": "nodekey:" + "ab" * 32},
        {"Path": "derp", "InEngine": True, "LastHandshake": NOW - 200},
        {"Path": "connecting", "InEngine": True, "LastHandshake": None},
        {"Path": "none", "InEngine": False},
    ],
}


class _Fixed(Collector):
    def __init__(self, ms: list[Metric]) -> None:
        self.ms = ms

    def collect(self) -> list[Metric]:
        return self.ms


def render(ms: list[Metric]) -> str:
    reg = CollectorRegistry()
    reg.register(_Fixed(ms))
    return generate_latest(reg).decode()


def test_metrics_agent_families_from_status() -> None:
    text = render(families(STATUS, 7, FilterCounts({"policy": 5, "spoofed": 1}, {"policy": 420, "spoofed": 84}), NOW))
    lines = set(text.splitlines())
    for want in (
        'shoal_agent_state{state="Running"} 1.0', 'shoal_agent_state{state="Stopped"} 0.0',
        'shoal_agent_peers{path="direct"} 1.0', 'shoal_agent_peers{path="derp"} 1.0',
        'shoal_agent_peers{path="connecting"} 1.0', 'shoal_agent_peers{path="stale"} 0.0',
        'shoal_agent_handshake_age_seconds_bucket{le="5"} 1.0',
        'shoal_agent_handshake_age_seconds_bucket{le="180"} 1.0',
        'shoal_agent_handshake_age_seconds_bucket{le="300"} 2.0',
        'shoal_agent_handshake_age_seconds_bucket{le="+Inf"} 2.0',
        "shoal_agent_handshake_age_seconds_gcount 2.0", "shoal_agent_handshake_age_seconds_gsum 203.0",
        "shoal_agent_peers_without_handshake 1.0", "shoal_agent_dns_queries_total 7.0",
        'shoal_agent_filter_dropped_packets_total{reason="policy"} 5.0',
        'shoal_agent_filter_dropped_bytes_total{reason="spoofed"} 84.0',
    ):
        assert want in lines, want
    assert "nodekey" not in text and "ab" * 32 not in text  # no keys as labels
    checked = subprocess.run(["promtool", "check", "metrics"], input=text, capture_output=True, text=True, timeout=30)
    assert checked.returncode == 0 and checked.stdout == "" and checked.stderr == "", checked
    # No filter reading (the table could not be listed): no filter series, rather than zeros that were not seen.
    assert "filter" not in render(families({"BackendState": "Stopped"}, 0, None, NOW))


def test_metrics_agent_parses_nft_counters() -> None:
    doc = {"nftables": [
        {"metainfo": {"version": "1.0.6"}},
        {"counter": {"family": "inet", "name": "dropped", "table": "shoal_filter", "handle": 1, "packets": 9,
                     "bytes": 756}},
        {"counter": {"family": "inet", "name": "spoofed", "table": "shoal_filter", "packets": 2, "bytes": 168}},
        {"counter": {"family": "inet", "name": "dropped", "table": "other", "packets": 99, "bytes": 1}},
        {"counter": {"family": "inet", "name": "mystery", "table": "shoal_filter", "packets": 3, "bytes": 3}},
    ]}
    got = parse_nft_counters(json.dumps(doc), "shoal_filter")
    assert got.packets == {"policy": 9, "spoofed": 2} and got.bytes == {"policy": 756, "spoofed": 168}
    assert parse_nft_counters("not json", "shoal_filter") == FilterCounts()
    assert parse_nft_counters('{"nftables": 3}', "shoal_filter") == FilterCounts()
