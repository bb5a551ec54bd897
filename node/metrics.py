"""The agent's Prometheus metrics (sans-IO): ``families(...)`` turns one status snapshot into metric families.

``GET /metrics`` on the local API socket (node/api.py) renders them with ``prometheus_client`` from a registry
``node/daemon.py`` builds (one per agent; never the library's default registry)::

    shoal_agent_state{state=NeedsLogin|Starting|Running|Stopped}    1 for the current backend state, else 0
    shoal_agent_peers{path=direct|derp|unconfirmed|connecting|stale|none}   peers by the path their traffic rides
    shoal_agent_handshake_age_seconds       gauge histogram: peers by age of their last WireGuard handshake
    shoal_agent_peers_without_handshake     peers the engine has never completed a handshake with
    shoal_agent_filter_dropped_packets_total{reason=policy|spoofed}   packets the nftables filter dropped
    shoal_agent_filter_dropped_bytes_total{reason=policy|spoofed}
    shoal_agent_dns_queries_total           queries the MagicDNS resolver answered

Labels take only enum values. The filter's counters come from ``nft -j list counters`` of the agent's table
(``parse_nft_counters``); they restart at 0 when the table is replaced, which Prometheus' ``rate`` treats as a
counter reset.
"""

from __future__ import annotations

import json
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

from prometheus_client.core import CounterMetricFamily, GaugeHistogramMetricFamily, GaugeMetricFamily
from prometheus_client.metrics_core import Metric

from node.paths import PathKind

STATES = ("NeedsLogin", "Starting", "Running", "Stopped")
HANDSHAKE_BUCKETS = (5.0, 30.0, 120.0, 180.0, 300.0, 600.0, 3600.0)
# nft counter name in our table -> the reason label
FILTER_COUNTERS = {"dropped": "policy", "spoofed": "spoofed"}


@dataclass(frozen=True)
class FilterCounts:
    packets: Mapping[str, int] = field(default_factory=dict)
    bytes: Mapping[str, int] = field(default_factory=dict)


def parse_nft_counters(text: str, table: str) -> FilterCounts:
    """``nft -j list counters table inet TABLE`` output -> counts by reason (unknown counters are ignored)."""
    packets: dict[str, int] = {}
    octets: dict[str, int] = {}
    try:
        doc = json.loads(text)
    except ValueError:
        return FilterCounts()
    items = doc.get("nftables", []) if isinstance(doc, dict) else []
    for item in items if isinstance(items, list) else []:
        c = item.get("counter") if isinstance(item, dict) else None
        if not isinstance(c, dict) or c.get("table") != table or c.get("name") not in FILTER_COUNTERS:
            continue
        reason = FILTER_COUNTERS[c["name"]]
        p, b = c.get("packets"), c.get("bytes")
        if isinstance(p, int) and isinstance(b, int):
            packets[reason], octets[reason] = p, b
    return FilterCounts(packets, octets)


def parse_rule_counters(text: str, table: str) -> dict[str, dict[Any, tuple[int, int]]]:
    """``nft -j list counters`` output -> {"rules": {index: (packets, bytes)} from the `rule_N` counters,
    "drops": {"dropped"|"spoofed": (packets, bytes)}}; anything else is ignored."""
    out: dict[str, dict[Any, tuple[int, int]]] = {"rules": {}, "drops": {}}
    try:
        doc = json.loads(text)
    except ValueError:
        return out
    items = doc.get("nftables", []) if isinstance(doc, dict) else []
    for item in items if isinstance(items, list) else []:
        c = item.get("counter") if isinstance(item, dict) else None
        if not isinstance(c, dict) or c.get("table") != table:
            continue
        name, p, b = c.get("name"), c.get("packets"), c.get("bytes")
        if not isinstance(name, str) or not isinstance(p, int) or not isinstance(b, int):
            continue
        if name in FILTER_COUNTERS:
            out["drops"][name] = (p, b)
        elif name.startswith("rule_") and name[5:].isdigit():
            out["rules"][int(name[5:])] = (p, b)
    return out


def _handshake_ages(peers: Sequence[Mapping[str, Any]], now: float) -> tuple[list[float], int]:
    ages, never = [], 0
    for p in peers:
        if not p.get("InEngine"):
            continue
        hs = p.get("LastHandshake")
        if isinstance(hs, int | float) and hs > 0:
            ages.append(max(0.0, now - float(hs)))
        else:
            never += 1
    return ages, never


def families(status: Mapping[str, Any], dns_queries: int, filt: FilterCounts | None, now: float) -> list[Metric]:
    """The agent's metric families for one snapshot: its status document (node/api.py), the resolver's query
    count, and the filter's counters (None when the table could not be read: no series then)."""
    state = GaugeMetricFamily("shoal_agent_state", "The agent's backend state (1 for the current one).",
                              labels=["state"])
    for s in STATES:
        state.add_metric([s], 1 if status.get("BackendState") == s else 0)
    raw_peers = status.get("Peers") or []
    peers: list[Mapping[str, Any]] = [p for p in raw_peers if isinstance(p, Mapping)]
    by_path = GaugeMetricFamily("shoal_agent_peers", "Peers by the path their traffic rides.", labels=["path"])
    for kind in PathKind:
        by_path.add_metric([kind.value], sum(1 for p in peers if p.get("Path") == kind.value))
    ages, never = _handshake_ages(peers, now)
    buckets = [(f"{le:g}", sum(1 for a in ages if a <= le)) for le in HANDSHAKE_BUCKETS]
    buckets.append(("+Inf", len(ages)))
    hist = GaugeHistogramMetricFamily("shoal_agent_handshake_age_seconds",
                                      "Peers by the age of their last WireGuard handshake.",
                                      buckets=buckets, gsum_value=sum(ages))
    out: list[Metric] = [
        state, by_path, hist,
        GaugeMetricFamily("shoal_agent_peers_without_handshake",
                          "Peers in the engine that never completed a WireGuard handshake.", value=never),
        CounterMetricFamily("shoal_agent_dns_queries", "Queries the MagicDNS resolver answered.", value=dns_queries),
    ]
    if filt is not None:
        pk = CounterMetricFamily("shoal_agent_filter_dropped_packets", "Packets the nftables filter dropped.",
                                 labels=["reason"])
        by = CounterMetricFamily("shoal_agent_filter_dropped_bytes", "Bytes the nftables filter dropped.",
                                 labels=["reason"])
        for reason in FILTER_COUNTERS.values():
            pk.add_metric([reason], filt.packets.get(reason, 0))
            by.add_metric([reason], filt.bytes.get(reason, 0))
        out += [pk, by]
    return out

