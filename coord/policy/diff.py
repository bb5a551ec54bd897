"""`policy diff`: what a new policy would change on the current tailnet.

Both policies are compiled against the same nodes; only nodes whose filter or peers differ are expanded
into (source node, destination node) reachability, so a small edit on a large tailnet stays cheap.

JSON shape:
    {"added":   [{"src": 1, "dst": 2, "proto": "tcp", "ports": "22"}, ...],
     "removed": [...same...],
     "peers_gained": {"2": [1, 5]}, "peers_lost": {"3": [4]},
     "changed_nodes": [2, 3]}
`proto` is "tcp", "udp", "icmp", "ipv6-icmp", "sctp" or the IANA number; `ports` is "*", "22" or "1000-2000"
(for ICMP and other port-less protocols, "*").
"""

from __future__ import annotations

import ipaddress
from collections.abc import Iterable, Mapping
from typing import Any

from .compile import PolicyEngine, PolicyNode
from .model import DEFAULT_PROTOS, Policy

NAMES = {6: "tcp", 17: "udp", 1: "icmp", 58: "ipv6-icmp", 132: "sctp"}
PORTED = {6, 17, 132}
Reach = set[tuple[int, int, int]]  # (proto, first, last)


def _reach_into(engine: PolicyEngine, dst_id: int) -> dict[int, Reach]:
    """For every source node: what it may send to dst_id, from dst_id's filter."""
    nodes = [engine.node(i) for i in engine.node_ids()]
    nets = {n.id: [ipaddress.ip_network(a.split("/")[0]) for a in n.addresses] for n in nodes if n}
    out: dict[int, Reach] = {}
    for rule in engine.filter(dst_id):
        protos = rule.get("IPProto") or DEFAULT_PROTOS
        srcs = rule["SrcIPs"]
        if "*" in srcs:
            who = set(nets)
        else:
            snets = [ipaddress.ip_network(s, strict=False) for s in srcs if "-" not in s]
            who = {i for i, addrs in nets.items() if any(a.version == s.version and a.subnet_of(s)  # type: ignore[arg-type]
                                                           for a in addrs for s in snets)}
        who.discard(dst_id)
        for d in rule["DstPorts"]:
            first, last = d["Ports"]["First"], d["Ports"]["Last"]
            for p in protos:
                item = (p, first, last) if p in PORTED else (p, 0, 65535)
                for s in who:
                    out.setdefault(s, set()).add(item)
    return out


def _fmt(item: tuple[int, int, int]) -> tuple[str, str]:
    p, first, last = item
    proto = NAMES.get(p, str(p))
    if p not in PORTED or (first, last) == (0, 65535):
        return proto, "*"
    return proto, str(first) if first == last else f"{first}-{last}"


def diff_engines(old: PolicyEngine, new: PolicyEngine) -> dict[str, Any]:
    added: list[dict[str, Any]] = []
    removed: list[dict[str, Any]] = []
    gained: dict[str, list[int]] = {}
    lost: dict[str, list[int]] = {}
    changed: list[int] = []
    for nid in new.node_ids():
        of, nf = old.filter(nid), new.filter(nid)
        op, np_ = old.peers(nid), new.peers(nid)
        if of == nf and op == np_:
            continue
        changed.append(nid)
        if np_ - op:
            gained[str(nid)] = sorted(np_ - op)
        if op - np_:
            lost[str(nid)] = sorted(op - np_)
        if of == nf:
            continue
        before, after = _reach_into(old, nid), _reach_into(new, nid)
        for src in sorted(set(before) | set(after)):
            b, a = before.get(src, set()), after.get(src, set())
            for item in sorted(_minus(a, b)):
                proto, ports = _fmt(item)
                added.append({"src": src, "dst": nid, "proto": proto, "ports": ports})
            for item in sorted(_minus(b, a)):
                proto, ports = _fmt(item)
                removed.append({"src": src, "dst": nid, "proto": proto, "ports": ports})
    return {"added": added, "removed": removed, "peers_gained": gained, "peers_lost": lost, "changed_nodes": changed}


def _minus(a: Reach, b: Reach) -> Reach:
    """Ranges of a not covered by b (per protocol), split where b cuts them."""
    out: Reach = set()
    for p, first, last in a:
        pieces = [(first, last)]
        for q, bf, bl in b:
            if q != p:
                continue
            nxt = []
            for f, la in pieces:
                if bl < f or bf > la:
                    nxt.append((f, la))
                    continue
                if f < bf:
                    nxt.append((f, bf - 1))
                if la > bl:
                    nxt.append((bl + 1, la))
            pieces = nxt
        out.update((p, f, la) for f, la in pieces)
    return out


def diff_policies(
    old: Policy | None, new: Policy, nodes: Iterable[PolicyNode], roles: Mapping[str, Iterable[str]] | None = None
) -> dict[str, Any]:
    nodes = list(nodes)
    return diff_engines(PolicyEngine(old, nodes, roles), PolicyEngine(new, nodes, roles))


def render_diff(d: Mapping[str, Any], names: Mapping[int, str] | None = None) -> str:
    def n(i: int) -> str:
        return names.get(i, f"node {i}") if names else f"node {i}"

    lines: list[str] = []
    for sign, key in (("+", "added"), ("-", "removed")):
        for e in d[key]:
            lines.append(f"{sign} {n(e['src'])} -> {n(e['dst'])} {e['proto']}/{e['ports']}")
    for key, verb in (("peers_gained", "now sees"), ("peers_lost", "no longer sees")):
        for nid, peers in d[key].items():
            lines.append(f"  {n(int(nid))} {verb} {', '.join(n(p) for p in peers)}")
    if not lines:
        return "no change in reachability or visibility"
    summary = (
        f"{len(d['added'])} reachabilities added, {len(d['removed'])} removed, "
        f"{len(d['changed_nodes'])} nodes affected"
    )
    return "\n".join([*lines, summary])
