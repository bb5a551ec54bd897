"""Compile a policy against the tailnet's nodes: peer visibility and per-node packet filters.

Output per node, in Tailscale's wire shape (ts:tailcfg.FilterRule), for traffic ARRIVING at the node:

    {"SrcIPs": ["100.64.0.1/32", "fd7a:115c:a1e0::1/128", "*", "10.0.0.0/8"],
     "DstPorts": [{"IP": "100.64.0.2/32" | "*" | "<cidr>", "Ports": {"First": 22, "Last": 22}}],
     "IPProto": [6]}                     # omitted: TCP, UDP, ICMPv4, ICMPv6

No policy (or one with neither `acls` nor `grants`) is allow-all: `FILTER_ALLOW_ALL`, and every node
sees every other node. A and B are peers if a rule lets either reach the other; a subnet router is a
destination when a rule's destination overlaps its approved routes (only routers named by a grant's
`via`, when it has one), and an exit node when a rule allows `autogroup:internet`.

The engine is edge-centric: for every rule it keeps the set of nodes its sources select and the set its
destinations select. A node joining or leaving is matched only against the rules indexed under its
user, groups, tags and autogroups (plus rules written with addresses), and the nodes it reports as
changed are those that were or become its peers: their filters and peer lists are the only ones that
can change. Filters and peer sets are computed lazily and cached until a change touches them.
Posture-gated rules match only nodes whose reported attributes satisfy the posture (fail closed).
"""

from __future__ import annotations

import functools
import ipaddress
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from typing import Any

from coord.wire.schema import FILTER_ALLOW_ALL as FILTER_ALLOW_ALL

from . import capgrant, ssh
from .match import Subject, match_sel, posture_ok
from .model import INTERNET, IPNet, Policy, Rule, Sel


@dataclass(frozen=True)
class PolicyNode:
    """A node as the policy sees it. `user` is None for tagged nodes; `posture` holds reported attributes."""

    id: int
    user: str | None
    tags: frozenset[str] = frozenset()
    addresses: tuple[str, ...] = ()
    approved_routes: tuple[str, ...] = ()
    exit_node: bool = False
    posture: tuple[tuple[str, str], ...] = ()


@functools.lru_cache(maxsize=1 << 16)
def parse_net(text: str, strict: bool = True) -> IPNet:
    """``ipaddress.ip_network``, remembered: a policy rebuilt over 10,000 nodes parsed 20,000 addresses each time
    (the objects are immutable, so sharing them is safe). A plain address takes a short path (most of a start-up
    at 10,000 nodes was ``ipaddress`` parsing node addresses); anything else goes to ``ipaddress``."""
    n = _plain_v4(text)
    if n is not None:
        return ipaddress.IPv4Network((n, 32))
    n = _plain_v6(text)
    if n is not None:
        return ipaddress.IPv6Network((n, 128))
    return ipaddress.ip_network(text, strict=strict)


_HEX = frozenset("0123456789abcdefABCDEF")


def _plain_v4(text: str) -> int | None:
    parts = text.split(".")
    if len(parts) != 4:
        return None
    n = 0
    for p in parts:
        if not (p.isascii() and p.isdigit()) or len(p) > 3 or (len(p) > 1 and p[0] == "0") or int(p) > 255:
            return None
        n = n << 8 | int(p)
    return n


def _plain_v6(text: str) -> int | None:
    """Hex groups with at most one ``::``; no embedded IPv4, no zone (those go to ``ipaddress``)."""
    if ":" not in text or text.count("::") > 1:
        return None
    head, sep, tail = text.partition("::")
    hs = head.split(":") if head else []
    ts = tail.split(":") if tail else []
    if (sep and len(hs) + len(ts) > 7) or (not sep and len(hs) != 8):
        return None
    n = 0
    for g in hs + ["0"] * (8 - len(hs) - len(ts)) + ts:
        if not 1 <= len(g) <= 4 or not _HEX.issuperset(g):
            return None
        n = n << 16 | int(g, 16)
    return n


def node_nets(addresses: Iterable[str]) -> tuple[IPNet, ...]:
    return tuple(parse_net(a.split("/")[0]) for a in addresses)


def net_str(n: IPNet) -> str:
    return str(n)


def _sort_key(s: str) -> tuple[int, int, int, str]:
    if s == "*":
        return (0, 0, 0, s)
    try:
        n = ipaddress.ip_network(s, strict=False)
    except ValueError:
        return (9, 0, 0, s)
    return (n.version, int(n.network_address), n.prefixlen, s)


def _keys(sel: Sel) -> list[tuple[str, ...]]:
    """Index keys under which a selector can select a node."""
    k = sel.kind
    if k == "all" or (k == "autogroup" and sel.name == "danger-all"):
        return [("all",)]
    if k in ("user", "group", "tag"):
        return [(k, sel.name)]
    if k == "autogroup" and sel.name == "internet":
        return [("exit",)]
    if k == "autogroup":
        return [("ag", sel.name)]
    if k in ("prefix", "host", "ipset"):
        return [("addr",)]
    return []  # svc: not a node


@dataclass
class _Node:
    node: PolicyNode
    subject: Subject
    nets: tuple[IPNet, ...]
    routes: tuple[IPNet, ...]
    keys: list[tuple[str, ...]]
    src_rules: set[int] = field(default_factory=set)
    dst_rules: set[int] = field(default_factory=set)  # rules with a non-self destination selecting it
    self_rules: set[int] = field(default_factory=set)  # rules with autogroup:self, for untagged nodes


class PolicyEngine:
    """Incremental compiler. `policy=None` (or no acls/grants) means allow-all."""

    def __init__(
        self,
        policy: Policy | None,
        nodes: Iterable[PolicyNode] = (),
        roles: Mapping[str, Iterable[str]] | None = None,
        idp_groups: Mapping[str, Iterable[str]] | None = None,
    ) -> None:
        """``idp_groups``: user -> policy groups the identity provider puts the user in (already mapped to
        ``group:`` names by the server config). Only groups the policy declares count: the policy still names
        every group, the IdP only adds members."""
        self.policy = policy
        self.allow_all = policy is None or not policy.has_rules
        self.rules: tuple[Rule, ...] = () if policy is None else policy.rules
        self.roles: dict[str, frozenset[str]] = {u: frozenset(r) for u, r in (roles or {}).items()}
        self.user_groups: dict[str, frozenset[str]] = {}
        self._declared: frozenset[str] = frozenset()
        self._policy_groups: dict[str, frozenset[str]] = {}
        self._idp_groups: dict[str, frozenset[str]] = {u: frozenset(g) for u, g in (idp_groups or {}).items()}
        if policy is not None:
            acc: dict[str, set[str]] = {}
            for g, members in policy.groups.items():
                for u in members:
                    acc.setdefault(u, set()).add(g)
            self._declared = frozenset(policy.groups)
            self._policy_groups = {u: frozenset(gs) for u, gs in acc.items()}
        for u in set(self._policy_groups) | set(self._idp_groups):
            gs = self._groups_of(u)
            if gs:
                self.user_groups[u] = gs
        self.nodes: dict[int, _Node] = {}
        n = len(self.rules)
        self.src_all: list[set[int]] = [set() for _ in range(n)]
        self.src_ident: list[set[int]] = [set() for _ in range(n)]
        self.dst_nodes: list[set[int]] = [set() for _ in range(n)]
        # autogroup:self: per rule, per user, the user's untagged source nodes and all untagged nodes.
        self.self_src: list[dict[str, set[int]]] = [{} for _ in range(n)]
        self.self_nodes: list[dict[str, set[int]]] = [{} for _ in range(n)]
        self.has_self = [any(d.sel.kind == "autogroup" and d.sel.name == "self" for d in r.dst) for r in self.rules]
        self.src_index: dict[tuple[str, ...], set[int]] = {}
        self.dst_index: dict[tuple[str, ...], set[int]] = {}
        for i, r in enumerate(self.rules):
            for s in r.src:
                for key in _keys(s):
                    self.src_index.setdefault(key, set()).add(i)
            for d in r.dst:
                for key in _keys(d.sel):
                    self.dst_index.setdefault(key, set()).add(i)
                if d.sel.kind in ("prefix", "host", "ipset"):
                    self.dst_index.setdefault(("routes",), set()).add(i)
            if self.has_self[i]:
                self.dst_index.setdefault(("ag", "self"), set()).add(i)
        self.all_ids: set[int] = set()
        self._filters: dict[int, list[dict[str, Any]]] = {}
        self._ssh: dict[int, dict[str, Any] | None] = {}
        self._caps: dict[int, list[dict[str, Any]]] = {}
        self._peers: dict[int, frozenset[int]] = {}
        self._srcips: dict[int, list[str]] = {}
        self._self_srcips: dict[tuple[int, str], list[str]] = {}
        for node in nodes:
            self._add(node)

    # -- public API -------------------------------------------------------------------------------------

    def upsert(self, node: PolicyNode) -> set[int]:
        """Add or replace a node; returns the IDs whose peers or filter may have changed."""
        before = self.peers(node.id) if node.id in self.nodes else frozenset()
        if node.id in self.nodes:
            self._drop(node.id)
        self._add(node)
        after = self._compute_peers(node.id)
        changed = {node.id} | set(before) | set(after)
        self._invalidate(changed)
        return changed

    def remove(self, node_id: int) -> set[int]:
        if node_id not in self.nodes:
            return set()
        before = self.peers(node_id)
        self._drop(node_id)
        changed = set(before)
        self._invalidate(changed | {node_id})
        return changed

    def set_roles(self, user: str, roles: Iterable[str]) -> set[int]:
        """A user's role autogroups (admin, owner, ..., and `shared` for shared-in users) changed."""
        self.roles[user] = frozenset(roles)
        changed: set[int] = set()
        for n in [x.node for x in self.nodes.values() if x.node.user == user]:
            changed |= self.upsert(n)
        return changed

    def set_idp_groups(self, user: str, groups: Iterable[str]) -> set[int]:
        """The groups the identity provider gives ``user`` changed (a sign-in); returns the IDs whose peers or
        filter may have changed."""
        self._idp_groups[user] = frozenset(groups)
        new = self._groups_of(user)
        if new == self.user_groups.get(user, frozenset()):
            return set()
        if new:
            self.user_groups[user] = new
        else:
            self.user_groups.pop(user, None)
        changed: set[int] = set()
        for n in [x.node for x in self.nodes.values() if x.node.user == user]:
            changed |= self.upsert(n)
        return changed

    def _groups_of(self, user: str) -> frozenset[str]:
        return self._policy_groups.get(user, frozenset()) | (self._idp_groups.get(user, frozenset()) & self._declared)

    def peers(self, node_id: int) -> frozenset[int]:
        if node_id not in self.nodes:
            return frozenset()
        cached = self._peers.get(node_id)
        if cached is None:
            cached = self._peers[node_id] = self._compute_peers(node_id)
        return cached

    def filter(self, node_id: int) -> list[dict[str, Any]]:
        """Packet filter for traffic arriving at the node; shared lists inside must not be mutated."""
        if node_id not in self.nodes:
            return []
        cached = self._filters.get(node_id)
        if cached is None:
            cached = self._filters[node_id] = self._compute_filter(node_id)
        return cached

    def exit_allowed(self, viewer: int, exit_id: int) -> bool:
        """May ``viewer`` send internet traffic through exit node ``exit_id``? Allow-all: yes. Else a rule whose
        sources select the viewer must have ``autogroup:internet`` (through this node, if it names ``via``) or
        ``*`` as a destination: the same rules that put the internet in the exit node's packet filter."""
        if self.allow_all:
            return True
        v = self.nodes.get(viewer)
        e = self.nodes.get(exit_id)
        if v is None or e is None or not e.node.exit_node:
            return False
        for i in v.src_rules:
            if exit_id not in self.dst_nodes[i]:
                continue
            rule = self.rules[i]
            via_ok = not rule.via or any(self._via_match(x, e) for x in rule.via)
            for d in rule.dst:
                if d.sel.kind == "all" or (d.sel.kind == "autogroup" and d.sel.name == "internet" and via_ok):
                    return True
        return False

    def ssh_policy(self, node_id: int) -> dict[str, Any] | None:
        """The node's SSHPolicy (coord/policy/ssh.py), or None when no ssh rule concerns it. Computed on demand:
        it depends on every node a rule's sources select, so any node change drops every cached one."""
        if node_id not in self.nodes or self.policy is None or not self.policy.ssh:
            return None
        if node_id not in self._ssh:
            subjects = [(i, n.subject) for i, n in sorted(self.nodes.items())]
            self._ssh[node_id] = ssh.compile_node(self.policy, self.nodes[node_id].subject, node_id, subjects)
        return self._ssh[node_id]

    def cap_grants(self, node_id: int) -> list[dict[str, Any]]:
        """The app capabilities other nodes hold on this one (coord/policy/capgrant.py); cached like ssh_policy."""
        if node_id not in self.nodes or self.policy is None or not any(g.app for g in self.policy.grants):
            return []
        if node_id not in self._caps:
            subjects = [(i, n.subject) for i, n in sorted(self.nodes.items())]
            self._caps[node_id] = capgrant.compile_node(self.policy, self.nodes[node_id].subject, node_id, subjects)
        return self._caps[node_id]

    def node(self, node_id: int) -> PolicyNode | None:
        n = self.nodes.get(node_id)
        return n.node if n else None

    def node_ids(self) -> list[int]:
        return sorted(self.nodes)

    # -- internals ----------------------------------------------------------------------------------

    def subject(self, node: PolicyNode) -> Subject:
        tagged = bool(node.tags)
        user = None if tagged else node.user
        roles = self.roles.get(user or "", frozenset())
        return Subject(
            label=f"node {node.id}",
            user=user,
            tags=frozenset(node.tags),
            groups=self.user_groups.get(user or "", frozenset()) if user else frozenset(),
            roles=roles if user else frozenset(),
            member=user is not None and "shared" not in roles,
            nets=node_nets(node.addresses),
            routes=tuple(parse_net(r, False) for r in node.approved_routes),
            exit_node=node.exit_node,
            posture=dict(node.posture),
        )

    def _node_keys(self, node: PolicyNode, subj: Subject) -> list[tuple[str, ...]]:
        keys: list[tuple[str, ...]] = [("all",), ("addr",)]
        keys += [("tag", t) for t in node.tags]
        if node.tags:
            keys.append(("ag", "tagged"))
        elif subj.user:
            keys.append(("user", subj.user))
            keys += [("group", g) for g in subj.groups or ()]
            keys += [("ag", r) for r in subj.roles or ()]
            keys.append(("ag", "member" if subj.member else "shared"))
            keys.append(("ag", "self"))
        if node.exit_node:
            keys.append(("exit",))
        if node.approved_routes:
            keys.append(("routes",))
        return keys

    def _add(self, node: PolicyNode) -> None:
        subj = self.subject(node)
        n = _Node(node, subj, subj.nets or (), subj.routes, self._node_keys(node, subj))
        self.nodes[node.id] = n
        self.all_ids.add(node.id)
        if self.allow_all:
            return
        src_c: set[int] = set()
        dst_c: set[int] = set()
        for key in n.keys:
            src_c |= self.src_index.get(key, set())
            dst_c |= self.dst_index.get(key, set())
        for i in src_c:
            self._match_src(i, n)
        for i in dst_c:
            if self._dst_entries(i, n):
                self.dst_nodes[i].add(node.id)
                n.dst_rules.add(i)
            if self.has_self[i] and subj.user:
                self.self_nodes[i].setdefault(subj.user, set()).add(node.id)
                n.self_rules.add(i)

    def _match_src(self, i: int, n: _Node) -> None:
        assert self.policy is not None
        rule = self.rules[i]
        ident = False
        hit = False
        for s in rule.src:
            if s.kind in ("prefix", "host", "ipset"):
                if any(a.version == b.version and a.overlaps(b) for a in s.nets for b in n.nets + n.routes):
                    hit = True
            elif match_sel(s, n.subject, dst=False).value:
                hit = ident = True
        if not hit or not posture_ok(self.policy, rule, n.subject).value:
            return
        self.src_all[i].add(n.node.id)
        if ident:
            self.src_ident[i].add(n.node.id)
        if self.has_self[i] and not n.node.tags and n.subject.user:
            self.self_src[i].setdefault(n.subject.user, set()).add(n.node.id)
        n.src_rules.add(i)
        self._srcips.pop(i, None)
        if n.subject.user:
            self._self_srcips.pop((i, n.subject.user), None)

    def _drop(self, node_id: int) -> None:
        n = self.nodes.pop(node_id)
        self.all_ids.discard(node_id)
        for i in n.src_rules:
            self.src_all[i].discard(node_id)
            self.src_ident[i].discard(node_id)
            self._srcips.pop(i, None)
            if n.subject.user and n.subject.user in self.self_src[i]:
                self.self_src[i][n.subject.user].discard(node_id)
                self._self_srcips.pop((i, n.subject.user), None)
        for i in n.dst_rules:
            self.dst_nodes[i].discard(node_id)
        for i in n.self_rules:
            self.self_nodes[i].get(n.subject.user or "", set()).discard(node_id)

    def _invalidate(self, ids: Iterable[int]) -> None:
        self._ssh.clear()
        self._caps.clear()
        for x in ids:
            self._filters.pop(x, None)
            self._peers.pop(x, None)

    def _compute_peers(self, node_id: int) -> frozenset[int]:
        if self.allow_all:
            return frozenset(self.all_ids - {node_id})
        n = self.nodes[node_id]
        out: set[int] = set()
        user = n.subject.user
        for i in n.src_rules:
            out |= self.dst_nodes[i]
            if self.has_self[i] and user and node_id in self.self_src[i].get(user, ()):
                out |= self.self_nodes[i].get(user, set())
        for i in n.dst_rules:
            out |= self.src_all[i]
        for i in n.self_rules:
            out |= self.self_src[i].get(user or "", set())
        out.discard(node_id)
        return frozenset(out)

    def _dst_entries(self, i: int, n: _Node) -> list[dict[str, Any]]:
        """DstPorts entries of rule i that concern node n (its addresses, routes or the internet)."""
        rule = self.rules[i]
        subj = n.subject
        via_ok = not rule.via or any(self._via_match(v, n) for v in rule.via)
        out: list[dict[str, Any]] = []
        for d in rule.dst:
            s = d.sel
            ips: list[str] = []
            if s.kind == "all":
                ips = ["*"]
            elif s.kind == "autogroup" and s.name == "self":
                pass  # per source user; see _compute_filter
            elif s.kind == "autogroup" and s.name == "internet":
                if n.node.exit_node and via_ok:
                    ips = [net_str(x) for x in INTERNET]
            elif s.kind in ("prefix", "host", "ipset"):
                for net in s.nets:
                    own = any(net.version == a.version and net.overlaps(a) for a in n.nets)
                    routed = via_ok and any(net.version == r.version and net.overlaps(r) for r in n.routes)
                    if own or routed:
                        ips.append(net_str(net))
            elif s.kind != "svc" and match_sel(s, subj, dst=True).value:
                ips = [net_str(a) for a in n.nets]
            for ip in ips:
                for first, last in d.ports:
                    out.append({"IP": ip, "Ports": {"First": first, "Last": last}})
        return out

    def _via_match(self, name: str, n: _Node) -> bool:
        if name.startswith("tag:"):
            return name in n.node.tags
        assert self.policy is not None
        net = self.policy.hosts.get(name)
        return net is not None and any(net.version == a.version and net.overlaps(a) for a in n.nets)

    def _rule_srcips(self, i: int) -> list[str]:
        cached = self._srcips.get(i)
        if cached is not None:
            return cached
        assert self.policy is not None
        rule = self.rules[i]
        gated = bool(rule.posture if rule.posture is not None else self.policy.default_src_posture)
        ips: set[str] = set()
        if gated:
            members = self.src_all[i]
        else:
            members = self.src_ident[i]
            for s in rule.src:
                if s.kind == "all" or (s.kind == "autogroup" and s.name == "danger-all"):
                    ips.add("*")
                elif s.kind in ("prefix", "host", "ipset"):
                    ips.update(net_str(x) for x in s.nets)
        for x in members:
            ips.update(net_str(a) for a in self.nodes[x].nets)
        out = sorted(ips, key=_sort_key)
        self._srcips[i] = out
        return out

    def _self_rule_srcips(self, i: int, user: str) -> list[str]:
        key = (i, user)
        cached = self._self_srcips.get(key)
        if cached is None:
            ips = {net_str(a) for x in self.self_src[i].get(user, ()) for a in self.nodes[x].nets}
            cached = self._self_srcips[key] = sorted(ips, key=_sort_key)
        return cached

    def _compute_filter(self, node_id: int) -> list[dict[str, Any]]:
        if self.allow_all:
            return FILTER_ALLOW_ALL
        n = self.nodes[node_id]
        out: list[dict[str, Any]] = []
        for i in sorted(n.dst_rules | n.self_rules):
            rule = self.rules[i]
            entries = self._dst_entries(i, n) if i in n.dst_rules else []
            if entries:
                src = self._rule_srcips(i)
                if src:
                    out.append(_filter_rule(src, entries, rule.protos))
            if i in n.self_rules and n.subject.user:
                src = self._self_rule_srcips(i, n.subject.user)
                if src:
                    ports = [
                        {"IP": net_str(a), "Ports": {"First": f, "Last": la}}
                        for d in rule.dst
                        if d.sel.kind == "autogroup" and d.sel.name == "self"
                        for a in n.nets
                        for f, la in d.ports
                    ]
                    out.append(_filter_rule(src, ports, rule.protos))
        return out


def _filter_rule(src: list[str], dst: list[dict[str, Any]], protos: tuple[int, ...]) -> dict[str, Any]:
    rule: dict[str, Any] = {"SrcIPs": src, "DstPorts": dst}
    if protos:
        rule["IPProto"] = list(protos)
    return rule
