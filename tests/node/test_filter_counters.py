"""Per-rule counters of the packet filter: `rule_N` counters read back by `shoal status --filter`."""

from __future__ import annotations

import json

from node.cli import render_filter
from node.metrics import parse_rule_counters

NFT = json.dumps({"nftables": [
    {"metainfo": {"version": "1.0.6"}},
    {"counter": {"family": "inet", "name": "dropped", "table": "shoal_filter", "packets": 3, "bytes": 180}},
    {"counter": {"family": "inet", "name": "spoofed", "table": "shoal_filter", "packets": 0, "bytes": 0}},
    {"counter": {"family": "inet", "name": "rule_1", "table": "shoal_filter", "packets": 2, "bytes": 120}},
    {"counter": {"family": "inet", "name": "rule_0", "table": "shoal_filter", "packets": 7, "bytes": 420}},
    {"counter": {"family": "inet", "name": "rule_x", "table": "shoal_filter", "packets": 1, "bytes": 1}},
    {"counter": {"family": "inet", "name": "rule_2", "table": "other", "packets": 1, "bytes": 1}},
    {"counter": {"family": "inet", "name": "rule_3", "table": "shoal_filter", "packets": "1", "bytes": 1}},
]})


def test_policy_rule_counters_parse_by_index_and_ignore_the_rest() -> None:
    assert parse_rule_counters(NFT, "shoal_filter") == {
        "rules": {1: (2, 120), 0: (7, 420)}, "drops": {"dropped": (3, 180), "spoofed": (0, 0)}}
    assert parse_rule_counters("not json", "shoal_filter") == {"rules": {}, "drops": {}}
    assert parse_rule_counters("[]", "shoal_filter") == {"rules": {}, "drops": {}}


def test_policy_rule_counters_rendered_one_line_per_rule() -> None:
    f = {"InPlace": True, "AllowAll": False, "Rules": [{"Rule": 0, "Packets": 7, "Bytes": 420}],
         "Drops": {"Dropped": {"Packets": 3, "Bytes": 180}}}
    assert render_filter(f).splitlines() == [
        "rule         packets         bytes",
        "0                  7           420",
        "dropped            3           180",
    ]
    assert render_filter({"InPlace": False}) == "no packet filter of ours in place"
