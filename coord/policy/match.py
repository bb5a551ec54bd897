"""What a selector means: one matcher for real nodes and for the symbolic sources of `tests`.

A `Subject` is something traffic comes from or goes to: a real node (everything known), or a stand-in
for a test's `src`/`dst` where some facts may be unknown (None). Matching is three-valued: True, False,
or None with a reason ("role of alice@example.com is not known"), so `policy check` can skip an
assertion rather than guess. For real nodes every answer is True or False.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass
from typing import Any

from .model import DEFAULT_PROTOS, INTERNET, TAILNET_RANGES, IPNet, Policy, Rule, Sel
from .parse import eval_posture_expr, parse_posture_expr

Tri = bool | None


@dataclass(frozen=True)
class Subject:
    label: str
    user: str | None = None  # owner login for an untagged device
    tags: frozenset[str] | None = frozenset()  # None: identity unknown
    groups: frozenset[str] | None = frozenset()
    roles: frozenset[str] | None = frozenset()
    member: bool | None = True  # a tailnet member (not a shared-in user)
    nets: tuple[IPNet, ...] | None = None  # its own addresses; None: unknown
    routes: tuple[IPNet, ...] = ()  # approved subnet routes (destinations only)
    svc: str | None = None
    exit_node: bool = False
    posture: dict[str, Any] | None = None  # None: unknown attributes
    posture_complete: bool = True  # False: attributes not listed are unknown, not absent

    @property
    def tagged(self) -> bool | None:
        return None if self.tags is None else bool(self.tags)


@dataclass
class Verdict:
    value: Tri
    reasons: list[str]

    @staticmethod
    def of(value: Tri, reason: str = "") -> Verdict:
        return Verdict(value, [reason] if value is None and reason else [])


def _fold(items: Iterable[Verdict], decisive: bool) -> Verdict:
    """Three-valued or (``decisive=True``) / and (``decisive=False``): unknowns carry their reasons."""
    unknown: list[str] = []
    saw_unknown = False
    for v in items:
        if v.value is decisive:
            return Verdict(decisive, [])
        if v.value is None:
            saw_unknown = True
            unknown.extend(r for r in v.reasons if r not in unknown)
    return Verdict(None, unknown) if saw_unknown else Verdict(not decisive, [])


def any_of(items: Iterable[Verdict]) -> Verdict:
    return _fold(items, True)


def all_of(items: Iterable[Verdict]) -> Verdict:
    return _fold(items, False)


def _overlaps(a: Iterable[IPNet], b: Iterable[IPNet]) -> bool:
    bl = list(b)
    return any(x.version == y.version and x.overlaps(y) for x in a for y in bl)


def _covers_tailnet(nets: Iterable[IPNet]) -> bool:
    """True if the nets contain a whole tailnet range, so any node address of that family is inside."""
    return any(
        n.version == r.version and r.subnet_of(n)  # type: ignore[arg-type]
        for n in nets
        for r in TAILNET_RANGES
    )


def match_sel(sel: Sel, s: Subject, *, dst: bool) -> Verdict:
    """Does `sel` select `s`? For destinations, approved routes and exit-node status count too."""
    k = sel.kind
    if k == "all":
        return Verdict.of(s.svc is None)
    if s.svc is not None:
        return Verdict.of(k == "svc" and sel.name == s.svc)
    if k == "svc":
        return Verdict.of(False)
    if k in ("prefix", "host", "ipset"):
        if dst and s.routes and _overlaps(sel.nets, s.routes):
            return Verdict.of(True)
        if s.nets is None:
            if s.tags is not None and _covers_tailnet(sel.nets):
                return Verdict.of(True)
            return Verdict.of(None, f"the addresses of {s.label} are not known")
        return Verdict.of(_overlaps(sel.nets, s.nets))
    if k == "autogroup" and sel.name == "danger-all":
        return Verdict.of(True)
    if k == "autogroup" and sel.name == "internet":
        if s.exit_node:
            return Verdict.of(True)
        if s.nets is None:
            return Verdict.of(False) if s.tags is not None else Verdict.of(None, f"{s.label} is not known")
        return Verdict.of(_overlaps(INTERNET, s.nets))
    # Identity selectors from here on.
    if s.tags is None:
        return Verdict.of(None, f"which device owns {s.label} is not known")
    if k == "tag":
        return Verdict.of(sel.name in s.tags)
    if k == "autogroup" and sel.name == "tagged":
        return Verdict.of(bool(s.tags))
    if s.tags:
        return Verdict.of(False)  # tagged devices are not owned by users
    if k == "user":
        return Verdict.of(s.user == sel.name)
    if k == "group":
        if s.groups is None:
            return Verdict.of(None, f"the groups of {s.label} are not known")
        return Verdict.of(sel.name in s.groups)
    if k == "autogroup":
        if sel.name == "member":
            return Verdict.of(s.member, f"whether {s.label} is a member of the tailnet is not known")
        if sel.name == "shared":
            return Verdict.of(None if s.member is None else not s.member, f"whether {s.label} is shared is not known")
        if sel.name == "self":
            return Verdict.of(False)  # only meaningful against a source; see rule_allows
        if s.roles is None:
            return Verdict.of(None, f"the roles of {s.label} ({sel.name}?) are not known")
        return Verdict.of(sel.name in s.roles)
    return Verdict.of(False)


def same_owner(src: Subject, dst: Subject) -> Verdict:
    """autogroup:self: the destination is an untagged device of the source's user."""
    if src.tags is None or dst.tags is None:
        return Verdict.of(None, f"which devices own {src.label} and {dst.label} is not known")
    if src.tags or dst.tags or src.user is None or dst.user is None:
        return Verdict.of(False)
    return Verdict.of(src.user == dst.user)


def posture_ok(policy: Policy, rule: Rule, s: Subject) -> Verdict:
    names = rule.posture if rule.posture is not None else policy.default_src_posture
    if not names:
        return Verdict.of(True)
    attrs = s.posture or {}
    out: list[Verdict] = []
    for name in names:
        conds: list[Verdict] = []
        for text in policy.postures.get(name, ()):
            expr = parse_posture_expr(text)
            if expr is None:
                conds.append(Verdict.of(False))
            elif expr[0] not in attrs and not s.posture_complete:
                conds.append(Verdict.of(None, f"posture attribute {expr[0]} of {s.label} is not known"))
            else:
                conds.append(Verdict.of(eval_posture_expr(expr, attrs)))
        out.append(all_of(conds))
    return any_of(out)


def proto_ok(rule: Rule, proto: int | None) -> bool:
    """A test without proto means the default set; a rule without proto allows the default set."""
    want = (proto,) if proto is not None else DEFAULT_PROTOS
    have = rule.protos or DEFAULT_PROTOS
    return any(p in have for p in want)


def rule_allows(policy: Policy, rule: Rule, src: Subject, dst: Subject, port: int, proto: int | None) -> Verdict:
    if not proto_ok(rule, proto):
        return Verdict.of(False)
    dsts: list[Verdict] = []
    for d in rule.dst:
        if not any(a <= port <= b for a, b in d.ports):
            continue
        if d.sel.kind == "autogroup" and d.sel.name == "self":
            dsts.append(same_owner(src, dst))
        else:
            dsts.append(match_sel(d.sel, dst, dst=True))
    to = any_of(dsts)
    if to.value is False:
        return to
    frm = any_of(match_sel(s, src, dst=False) for s in rule.src)
    if frm.value is False:
        return frm
    return all_of([frm, to, posture_ok(policy, rule, src)])
