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
from .model import DEFAULT_PROTOS, IPNet, Policy

NAMES = {6: "tcp", 17: "udp", 1: "icmp", 58: "ipv6-icmp", 132: "sctp"}
PORTED = {6, 17, 132}
Reach = set[tuple[int, int, int]]  # (proto, first, last)


class _Who:
    """Maps SrcIPs lists to node IDs: host addresses by lookup, wider prefixes by scan (cached per list)."""

    def __init__(self, engine: PolicyEngine) -> None:
        self.by_addr: dict[str, int] = {}
        self.nets: dict[int, list[IPNet]] = {}
        for i in engine.node_ids():
            n = engine.node(i)
            assert n is not None
            self.nets[i] = [ipaddress.ip_network(a.split("/")[0]) for a in n.addresses]
            for net in self.nets[i]:
                self.by_addr[str(net)] = i
        self.cache: dict[tuple[str, ...], frozenset[int]] = {}

    def __call__(self, srcs: list[str]) -> frozenset[int]:
        key = tuple(srcs)
        hit = self.cache.get(key)
        if hit is not None:
            return hit
        if "*" in srcs:
            out = set(self.nets)
        else:
            out = {self.by_addr[x] for x in srcs if x in self.by_addr}
            wide = [ipaddress.ip_network(x, strict=False) for x in srcs if x not in self.by_addr and "-" not in x]
            wide = [w for w in wide if w.num_addresses > 1]
            if wide:
                out |= {
                    i
                    for i, addrs in self.nets.items()
                    if any(a.version == w.version and a.subnet_of(w) for a in addrs for w in wide)  # type: ignore[arg-type]
                }
        self.cache[key] = frozenset(out)
        return self.cache[key]


def _reach_into(engine: PolicyEngine, who_of: _Who, dst_id: int) -> dict[int, Reach]:
    """For every source node: what it may send to dst_id, from dst_id's filter."""
    out: dict[int, Reach] = {}
    for rule in engine.filter(dst_id):
        protos = rule.get("IPProto") or DEFAULT_PROTOS
        who = who_of(rule["SrcIPs"]) - {dst_id}
        for d in rule["DstPorts"]:
            first, last = d["Ports"]["First"], d["Ports"]["Last"]
            items = {(p, first, last) if p in PORTED else (p, 0, 65535) for p in protos}
            for src in who:
                out.setdefault(src, set()).update(items)
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
    who_old, who_new = _Who(old), _Who(new)
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
        before, after = _reach_into(old, who_old, nid), _reach_into(new, who_new, nid)
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
        f"{len(d['added'])} reachabilities added, {len(d['removed'])} removed, {len(d['changed_nodes'])} nodes affected"
    )
    return "\n".join([*lines, summary])
