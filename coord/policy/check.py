"""`policy check`: validate a policy and run its `tests` against its acls and grants.

A file checked on its own has no tailnet behind it, so a test's `src` and `dst` stand for devices we
describe from what the file and an optional tailnet state say (see match.Subject):

- a user (`alice@example.com`) is a device owned by that login; its groups come from `groups`; its roles
  (autogroup:admin, ...), addresses and whether it is a member at all (not shared in, not an outsider) only from
  the tailnet state: without one, a verdict that hinges on membership is a skip with that reason;
- `group:x` is a member of that group as such: rules naming the group, `*` or autogroup:member apply,
  not the rules its individual users get through other groups or roles (Tailscale agrees: real files
  deny a group what one of its admins may reach, and test empty groups);
- `tag:x` is a device with exactly that tag; `autogroup:member` a member in no group and with no role;
  `autogroup:tagged` a device with a tag named nowhere else;
- an IP or host is the tailnet device with that address when the state lists it; an address outside the
  tailnet ranges is no device at all; a tailnet address nobody described has an unknown owner;
- `svc:x` is the service, reached only by rules naming it (or `*`... never: see match_sel).

Whatever a verdict needs that nobody provided makes the assertion SKIPPED with the reason; it is never
guessed. Tailnet state (the `--tailnet` file, or built from the live tailnet with `tailnet_state`) is:

    {"users": {"alice@example.com": {"roles": ["admin"], "groups": ["group:admins"]}, "bob@other.org": {"shared": true},
               "eve@example.org": {"member": false}},
     "nodes": [{"user": "alice@example.com", "tags": [], "addresses": ["100.64.0.1"],
                "routes": [], "exit_node": false, "posture": {"node:os": "linux"}}]}

A user's `groups` there are the ones the identity provider adds (sign-in with OIDC); they count only for groups
the policy declares. Given state is taken as complete: users not listed have no role, addresses not listed are no
device.
Result shape (exactly): {"ok", "tests", "assertions", "passed", "failed": [{"test", "src", "dst",
"expected"}], "skipped": [{"test", "src", "dst", "reason"}], "errors": [str], "ssh_tests", "ssh_assertions",
"ssh_passed", "ssh_failed": [{"ssh_test", "src", "dst": [str], "user", "expected", "got"}], "ssh_skipped":
[{"ssh_test", "src", "dst", "user", "expected", "reason"}], "node_attrs": [{"node_attr", "attr", "applied",
"reason"}]}; `test` and `ssh_test` are 0-based indexes into
`tests` and `sshTests`. An sshTests assertion asks the first matching ssh rule (see ssh.py) whether `user` gets
"accept", "check" or nothing ("deny"); a stand-in whose verdict depends on unknown facts skips it.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from dataclasses import replace
from typing import Any

from . import ssh
from .compile import PolicyNode, node_nets, parse_net
from .hujson import PolicyError
from .match import Subject, Verdict, all_of, any_of, match_sel, proto_ok, rule_allows, same_owner
from .model import INTERNET, TAILNET_RANGES, IPNet, Policy, Rule, Test
from .parse import ip_net, parse, parse_proto, split_alias_ports

ANY_TAG = "tag:<a tag named nowhere>"


class TailnetError(ValueError):
    pass


def tailnet_state(
    nodes: Iterable[PolicyNode],
    roles: Mapping[str, Iterable[str]] | None = None,
    idp_groups: Mapping[str, Iterable[str]] | None = None,
) -> dict[str, Any]:
    """The live tailnet in the shape `check` takes, for `policy set`/`check` on a running server.
    ``idp_groups``: user -> policy groups from the identity provider (see PolicyEngine)."""
    users: dict[str, Any] = {}
    for u, rs in (roles or {}).items():
        rs = sorted(rs)
        users[u] = {"roles": [r for r in rs if r != "shared"], "shared": "shared" in rs}
    for u, gs in (idp_groups or {}).items():
        if gs:
            users.setdefault(u, {})["groups"] = sorted(gs)
    return {
        "users": users,
        "nodes": [
            {
                "user": n.user,
                "tags": sorted(n.tags),
                "addresses": list(n.addresses),
                "routes": list(n.approved_routes),
                "exit_node": n.exit_node,
                "posture": dict(n.posture),
            }
            for n in nodes
        ],
    }


class _Tailnet:
    def __init__(self, state: Mapping[str, Any] | None) -> None:
        self.known = state is not None
        self.roles: dict[str, frozenset[str]] = {}
        self.groups: dict[str, frozenset[str]] = {}  # from the identity provider, on top of the policy's
        self.shared: set[str] = set()
        self.outsiders: set[str] = set()  # logins that are not in the tailnet at all
        self.nodes: list[dict[str, Any]] = []
        if state is None:
            return
        if not isinstance(state, Mapping):
            raise TailnetError("tailnet state must be an object with 'users' and 'nodes'")
        unknown = set(state) - {"users", "nodes", "comment"}
        if unknown:
            raise TailnetError(f"tailnet state: unknown keys {sorted(unknown)}")
        for u, info in dict(state.get("users", {})).items():
            if not isinstance(info, Mapping):
                raise TailnetError(f"tailnet users[{u!r}]: expected an object")
            self.roles[u] = frozenset(info.get("roles", []))
            groups = info.get("groups", [])
            if not isinstance(groups, list) or not all(isinstance(g, str) for g in groups):
                raise TailnetError(f"tailnet users[{u!r}].groups: expected a list of group names")
            self.groups[u] = frozenset(groups)
            if info.get("shared"):
                self.shared.add(u)
            if info.get("member") is False:
                self.outsiders.add(u)
        for i, n in enumerate(state.get("nodes", [])):
            if not isinstance(n, Mapping):
                raise TailnetError(f"tailnet nodes[{i}]: expected an object")
            try:
                nets = node_nets(n.get("addresses", []))
                routes = tuple(parse_net(r, False) for r in n.get("routes", []))
            except (ValueError, AttributeError, TypeError) as e:
                raise TailnetError(f"tailnet nodes[{i}]: {e}") from None
            self.nodes.append({**n, "_nets": nets, "_routes": routes, "tags": frozenset(n.get("tags", []))})

    def node_subject(self, policy: Policy, n: Mapping[str, Any], label: str) -> Subject:
        user = None if n["tags"] else n.get("user")
        return Subject(
            label=label,
            user=user,
            tags=n["tags"],
            groups=_groups(policy, user, self) if user else frozenset(),
            roles=self.roles.get(user, frozenset()) if user else frozenset(),
            member=bool(user) and user not in self.shared,
            nets=n["_nets"],
            routes=n["_routes"],
            exit_node=bool(n.get("exit_node")),
            posture=dict(n.get("posture", {})),
        )

    def by_address(self, net: IPNet) -> Mapping[str, Any] | None:
        for n in self.nodes:
            if any(a.version == net.version and a.subnet_of(net) and net.num_addresses == 1 for a in n["_nets"]):
                return n
        return None


def _groups(policy: Policy, user: str, tn: _Tailnet) -> frozenset[str]:
    """The policy's members of each group, plus the members the identity provider adds to declared groups."""
    idp = tn.groups.get(user, frozenset())
    return frozenset(g for g, members in policy.groups.items() if user in members or g in idp)


def _in_tailnet(net: IPNet) -> bool:
    return any(net.version == r.version and net.subnet_of(r) for r in TAILNET_RANGES)  # type: ignore[arg-type]


def subjects(policy: Policy, text: str, tn: _Tailnet, *, src: Subject | None = None) -> list[Subject]:
    """The stand-ins for a test's src (src=None) or for a destination alias (src given)."""
    t = text.strip()
    net = ip_net(t) or (policy.hosts.get(t))
    if net is not None:
        node = tn.by_address(net) if net.num_addresses == 1 else None
        if node is not None:
            return [tn.node_subject(policy, node, t)]
        if tn.known or not _in_tailnet(net):
            return [Subject(label=t, user=None, member=False, nets=(net,))]
        return [Subject(label=t, tags=None, groups=None, roles=None, member=None, nets=(net,))]
    if t.startswith("svc:"):
        return [Subject(label=t, svc=t)]
    if t.startswith("tag:"):
        nets = tuple(a for n in tn.nodes if t in n["tags"] for a in n["_nets"])
        return [Subject(label=t, tags=frozenset({t}), member=False, nets=nets or None)]
    if "@" in t:
        return [_user(policy, t, tn)]
    if t.startswith("group:"):
        return [Subject(label=t, user=None, groups=frozenset({t}), roles=frozenset())]
    if t.startswith("autogroup:"):
        ag = t.split(":", 1)[1]
        if ag in ("member", "members"):
            return [Subject(label=t, user=None)]
        if ag == "tagged":
            return [Subject(label=t, tags=frozenset({ANY_TAG}), member=False)]
        if ag == "internet":
            return [Subject(label=t, user=None, member=False, nets=INTERNET)]
        if ag == "self" and src is not None:
            return [replace(src, label=f"{t} of {src.label}")]
        if ag == "shared":
            return [Subject(label=t, user=None, member=False)]
        return [Subject(label=t, user=None, roles=frozenset({ag}))]
    if t == "*":
        return [Subject(label=t, tags=None, groups=None, roles=None, member=None)]
    raise ValueError(f"unsupported test alias {t!r}")


def _user(policy: Policy, login: str, tn: _Tailnet) -> Subject:
    nets = tuple(a for n in tn.nodes if not n["tags"] and n.get("user") == login for a in n["_nets"])
    return Subject(
        label=login,
        user=login,
        groups=_groups(policy, login, tn),
        roles=tn.roles.get(login, frozenset()) if tn.known else None,
        # Without tailnet state nothing says whether the login is one of ours, shared in, or an outsider: rules
        # that hinge on membership (autogroup:member, autogroup:shared) skip with that reason, never guess.
        member=(login not in tn.shared and login not in tn.outsiders) if tn.known else None,
        nets=nets or None,
    )


def rules_to(policy: Policy, address: str, port: int, tailnet: Mapping[str, Any] | None = None) -> list[Rule]:
    """The rules that let some source reach ``address:port`` (API v2 ``acl/preview?type=ipport``), with the
    matcher `tests` use: the address is the node that has it in ``tailnet`` (its user, tags, groups, roles), or
    a bare address. ``autogroup:self`` counts for a user's (untagged) device. Raises ValueError on a bad address."""
    net = ip_net(address.strip())
    if net is None or net.num_addresses != 1:
        raise ValueError(f"{address!r} is not an IP address")
    dst = subjects(policy, address.strip(), _Tailnet(tailnet if tailnet is not None else {}))[0]
    out = []
    for rule in policy.rules:
        if not proto_ok(rule, None):
            continue
        for d in rule.dst:
            if not any(a <= port <= b for a, b in d.ports):
                continue
            if d.sel.kind == "autogroup" and d.sel.name == "self":
                hit = same_owner(dst, dst).value is True and dst.user is not None
            else:
                hit = match_sel(d.sel, dst, dst=True).value is True
            if hit:
                out.append(rule)
                break
    return out


def evaluate(policy: Policy, src: Subject, dst: Subject, port: int, proto: int | None) -> Verdict:
    if not policy.has_rules:
        return Verdict(True, [])
    return any_of(rule_allows(policy, r, src, dst, port, proto) for r in policy.rules)


def run_tests(policy: Policy, tailnet: Mapping[str, Any] | None = None) -> dict[str, Any]:
    tn = _Tailnet(tailnet)
    result: dict[str, Any] = {
        "ok": True,
        "tests": len(policy.tests),
        "assertions": 0,
        "passed": 0,
        "failed": [],
        "skipped": [],
        "errors": [],
    }
    for i, test in enumerate(policy.tests):
        for expected, dsts in (("accept", test.accept), ("deny", test.deny)):
            for dst in dsts:
                result["assertions"] += 1
                v = _assertion(policy, test, dst, expected, tn)
                if v.value is True:
                    result["passed"] += 1
                elif v.value is False:
                    result["failed"].append({"test": i, "src": test.src, "dst": dst, "expected": expected})
                else:
                    reason = "; ".join(v.reasons) or "needs tailnet state"
                    result["skipped"].append({"test": i, "src": test.src, "dst": dst, "reason": reason})
    _run_ssh_tests(policy, tn, result)
    result["node_attrs"] = node_attrs_report(policy)
    result["ok"] = not result["failed"] and not result["ssh_failed"]
    return result


# nodeAttrs Shoal knows of and does not apply yet, by attribute (or its prefix before ':' or '?'), with why.
NOT_APPLIED = {
    "funnel": "Shoal has no Funnel (public ingress)",
    "tailscale.com/cap/funnel": "Shoal has no Funnel (public ingress)",
    "mullvad": "Shoal has no Mullvad exit nodes",
    "drive": "Shoal has no Taildrive",
    "tailscale.com/cap/file-sharing": "Shoal has no Taildrop",
    "nextdns": "Shoal's MagicDNS has no NextDNS resolver",
    "exit-node": "exit nodes are chosen by the client (shoal up), not by attribute",
    "disable-split-dns-when-no-custom-resolvers": "not applied by Shoal's MagicDNS",
    "traffic-steering": "Shoal has no traffic steering",
    "randomize-client-port": "not applied: the agent keeps its WireGuard port",
}


def node_attrs_report(policy: Policy) -> list[dict[str, Any]]:
    """Every `nodeAttrs` attribute, and whether Shoal applies it. None is applied yet: each says why, known ones
    with the missing feature, the rest as unknown (kept in the policy, never an error)."""
    out: list[dict[str, Any]] = []
    for i, na in enumerate(policy.node_attrs):
        for attr in na.attr:
            base = attr.split("?", 1)[0]
            reason = NOT_APPLIED.get(base) or NOT_APPLIED.get(base.split(":", 1)[0]) or "not known to Shoal"
            out.append({"node_attr": i, "attr": attr, "applied": False, "reason": reason})
    return out


def _run_ssh_tests(policy: Policy, tn: _Tailnet, result: dict[str, Any]) -> None:
    """`sshTests`: for each login user listed, the first matching ssh rule's action must be the expected one."""
    result.update(ssh_tests=len(policy.ssh_tests), ssh_assertions=0, ssh_passed=0, ssh_failed=[], ssh_skipped=[])
    for i, t in enumerate(policy.ssh_tests):
        for expected, logins in (("accept", t.accept), ("check", t.check), ("deny", t.deny)):
            for login in logins:
                result["ssh_assertions"] += 1
                got, reasons = _ssh_assertion(policy, t.src, t.dst, login, tn)
                entry = {"ssh_test": i, "src": t.src, "dst": list(t.dst), "user": login, "expected": expected}
                if got is None:
                    result["ssh_skipped"].append({**entry, "reason": "; ".join(reasons) or "needs tailnet state"})
                elif got == expected:
                    result["ssh_passed"] += 1
                else:
                    result["ssh_failed"].append({**entry, "got": got})


def _ssh_assertion(
    policy: Policy, src: str, dsts: tuple[str, ...], login: str, tn: _Tailnet
) -> tuple[str | None, list[str]]:
    """One verdict over every stand-in of src and every dst: all must agree, or it is not known."""
    seen: set[str] = set()
    reasons: list[str] = []
    unknown = False
    for s in subjects(policy, src, tn):
        for alias in dsts:
            for d in subjects(policy, alias, tn, src=s):
                got, why = ssh.login_verdict(policy, s, d, login)
                if got is None:
                    unknown = True
                    reasons.extend(r for r in why if r not in reasons)
                else:
                    seen.add(got)
    if len(seen) > 1:
        return min(seen, key=lambda a: {"deny": 0, "check": 1, "accept": 2}[a]), []
    if unknown or not seen:
        return None, reasons
    return seen.pop(), []


def _assertion(policy: Policy, test: Test, dst: str, expected: str, tn: _Tailnet) -> Verdict:
    split = split_alias_ports(dst.strip())
    assert split is not None  # validated by parse
    alias, port_text = split
    port = 0 if port_text == "*" else int(port_text)
    proto = parse_proto(test.proto) if test.proto else None
    verdicts: list[Verdict] = []
    for s in subjects(policy, test.src, tn):
        if test.posture_attrs is not None:
            s = replace(s, posture={**(s.posture or {}), **test.posture_attrs}, posture_complete=False)
        elif s.posture is None or not tn.known:
            s = replace(s, posture=s.posture or {}, posture_complete=tn.known)
        reach = any_of(evaluate(policy, s, d, port, proto) for d in subjects(policy, alias, tn, src=s))
        if expected == "deny":
            reach = Verdict(None if reach.value is None else not reach.value, reach.reasons)
        verdicts.append(reach)
    return all_of(verdicts)


def check(
    text: str | bytes, tailnet: Mapping[str, Any] | None = None, filename: str = "policy.hujson"
) -> dict[str, Any]:
    """Validate and run the tests; never raises for bad input (errors land in "errors")."""
    try:
        policy = parse(text, filename)
    except PolicyError as e:
        return _error(str(e))
    try:
        return run_tests(policy, tailnet)
    except TailnetError as e:
        return _error(str(e))


def _error(msg: str) -> dict[str, Any]:
    return {"ok": False, "tests": 0, "assertions": 0, "passed": 0, "failed": [], "skipped": [], "errors": [msg],
            "ssh_tests": 0, "ssh_assertions": 0, "ssh_passed": 0, "ssh_failed": [], "ssh_skipped": [],
            "node_attrs": []}


def render_check(result: Mapping[str, Any]) -> str:
    lines: list[str] = []
    for e in result["errors"]:
        lines.append(f"error: {e}")
    for f in result["failed"]:
        want = "accepted" if f["expected"] == "accept" else "denied"
        lines.append(f"FAIL tests[{f['test']}]: {f['src']} -> {f['dst']} should be {want}")
    for s in result["skipped"]:
        lines.append(f"skip tests[{s['test']}]: {s['src']} -> {s['dst']}: {s['reason']}")
    for f in result.get("ssh_failed", []):
        lines.append(f"FAIL sshTests[{f['ssh_test']}]: {f['src']} -> {','.join(f['dst'])} as {f['user']}: "
                     f"expected {f['expected']}, got {f['got']}")
    for s in result.get("ssh_skipped", []):
        where = f"{s['src']} -> {','.join(s['dst'])} as {s['user']}"
        lines.append(f"skip sshTests[{s['ssh_test']}]: {where}: {s['reason']}")
    for a in result.get("node_attrs", []):
        if not a["applied"]:
            lines.append(f"note nodeAttrs[{a['node_attr']}]: {a['attr']} not applied: {a['reason']}")
    verdict = "ok" if result["ok"] else "FAILED"
    lines.append(
        f"{verdict}: {result['tests']} tests, {result['assertions']} assertions: {result['passed']} passed, "
        f"{len(result['failed'])} failed, {len(result['skipped'])} skipped"
    )
    if result.get("ssh_tests"):
        lines.append(
            f"{verdict}: {result['ssh_tests']} sshTests, {result['ssh_assertions']} ssh assertions: "
            f"{result['ssh_passed']} passed, {len(result['ssh_failed'])} failed, {len(result['ssh_skipped'])} skipped"
        )
    return "\n".join(lines)
