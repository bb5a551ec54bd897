"""Policy in -> compiled filters and visibility out, compared to JSON files; and incremental == full."""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

import pytest

from coord.policy import PolicyEngine, PolicyNode, parse

from .golden_cases import CASES

GOLDEN = Path(__file__).resolve().parent / "golden"


def node(d: dict[str, Any]) -> PolicyNode:
    return PolicyNode(
        id=d["id"],
        user=d.get("user"),
        tags=frozenset(d.get("tags", [])),
        addresses=tuple(d["addresses"]),
        approved_routes=tuple(d.get("approved_routes", [])),
        exit_node=d.get("exit_node", False),
    )


def compile_case(case: dict[str, Any]) -> dict[str, Any]:
    policy = parse(case["policy"]) if case["policy"] is not None else None
    eng = PolicyEngine(policy, [node(n) for n in case["nodes"]], case.get("roles"))
    return {
        "filters": {str(i): eng.filter(i) for i in eng.node_ids()},
        "peers": {str(i): sorted(eng.peers(i)) for i in eng.node_ids()},
    }


@pytest.mark.parametrize("name", sorted(CASES))
def test_golden(name: str) -> None:
    got = compile_case(CASES[name])
    path = GOLDEN / f"{name}.json"
    if os.environ.get("SHOAL_UPDATE_GOLDEN"):
        path.write_text(json.dumps(got, indent=1, sort_keys=True) + "\n")
    assert got == json.loads(path.read_text())


@pytest.mark.parametrize("name", sorted(CASES))
def test_incremental_matches_full(name: str) -> None:
    case = CASES[name]
    policy = parse(case["policy"]) if case["policy"] is not None else None
    nodes = [node(n) for n in case["nodes"]]
    full = PolicyEngine(policy, nodes, case.get("roles"))
    inc = PolicyEngine(policy, [], case.get("roles"))
    for n in reversed(nodes):
        changed = inc.upsert(n)
        assert n.id in changed
    for i in full.node_ids():
        assert inc.filter(i) == full.filter(i) and inc.peers(i) == full.peers(i)
    # Removal reports exactly the former peers and leaves the same state as never having joined.
    gone = nodes[0]
    before = inc.peers(gone.id)
    assert inc.remove(gone.id) == set(before)
    fewer = PolicyEngine(policy, nodes[1:], case.get("roles"))
    for i in fewer.node_ids():
        assert inc.filter(i) == fewer.filter(i) and inc.peers(i) == fewer.peers(i)


def test_join_reports_only_affected_nodes() -> None:
    case = CASES["ssh_only"]
    eng = PolicyEngine(parse(case["policy"]), [node(n) for n in case["nodes"]])
    changed = eng.upsert(PolicyNode(9, "carol@example.com", frozenset(), ("100.64.0.9",)))
    assert changed == {9}
    changed = eng.upsert(PolicyNode(10, "alice@example.com", frozenset(), ("100.64.0.10",)))
    assert changed == {10, 3}
    assert "100.64.0.10/32" in eng.filter(3)[0]["SrcIPs"]
