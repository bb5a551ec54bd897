"""The `ssh` section: compiled per destination node for Shoal SSH, and `sshTests` evaluated (sans-IO).

A destination node gets, in its netmap, the rules that concern it (`SSHPolicy`, null when none does):

    {"Rules": [{"Principals": [{"Node": 3, "User": "alice@example.com", "Tags": [],
                                "IPs": ["100.64.0.3", "fd7a:115c:a1e0::3"]}],
                "SSHUsers": {"*": "=", "root": "", "git": "git"},
                "Action": "accept" | "check",
                "CheckPeriod": "12h" | null,
                "Origin": 0}]}

Rules are in policy order and the node takes the first whose principals hold the connection's source address
and whose `SSHUsers` maps the requested login. `SSHUsers` is Tailscale's map: key the login asked for (`*`: any),
value the local user (`=`: the same name, `""`: refused); an exact key wins over `*`. `Origin` is the index into
`ssh`, for audit lines. Compilation (the Tailscale/Headscale semantics):

- `autogroup:nonroot` is `{"*": "=", "root": ""}`; a named user `u` is `{"u": "u"}` (root only when named);
- `localpart:*@domain` maps a source user `name@domain` to `{"name": "name"}`, one rule per such principal, and
  never to root unless `root` is named in the same rule; tagged sources have no localpart;
- `check` needs a user to sign in again: tagged sources are left out of `check` rules (refused, as Headscale);
- `autogroup:self` as a destination keeps only the principals owned by the destination's user (untagged);
- a node is never its own principal.

`sshTests` entries `{src, dst, accept, deny, check}` ask, for each login user listed, what the first matching
rule says: `accept`, `check` or nothing (deny). Unknown facts (a group's members, a user's role) give `None` with
a reason, so `policy check` skips the assertion rather than guessing.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from typing import Any

from .match import Subject, Verdict, any_of, match_sel, same_owner
from .model import LOCAL_USER, Policy, Sel, SshRule

NONROOT = "autogroup:nonroot"


def valid_local_user(name: str) -> bool:
    return bool(LOCAL_USER.fullmatch(name))


def localpart(rule_user: str, login: str | None) -> str | None:
    """The local user `localpart:*@domain` gives `login`, or None (other domain, invalid name, no user)."""
    if login is None or not rule_user.startswith("localpart:*@"):
        return None
    domain = rule_user[len("localpart:*@"):]
    name, at, dom = login.rpartition("@")
    if not at or dom.lower() != domain.lower() or not valid_local_user(name):
        return None
    return name


def users_map(rule: SshRule, login: str | None) -> dict[str, str]:
    """The SSHUsers map of `rule` for a source owned by `login` (None: tagged)."""
    out: dict[str, str] = {}
    named = {u for u in rule.users if not u.startswith(("autogroup:", "localpart:"))}
    if NONROOT in rule.users:
        out["*"] = "="
        out["root"] = ""
    for u in rule.users:
        lp = localpart(u, login)
        if lp is not None and (lp != "root" or "root" in named):
            out[lp] = lp
    for u in sorted(named):
        out[u] = u
    return out


def _dst_matches(sels: Iterable[Sel], src: Subject, dst: Subject) -> Verdict:
    out: list[Verdict] = []
    for s in sels:
        if s.kind == "autogroup" and s.name == "self":
            out.append(same_owner(src, dst))
        else:
            out.append(match_sel(s, dst, dst=False))
    return any_of(out)


def _src_matches(sels: Iterable[Sel], src: Subject) -> Verdict:
    return any_of(match_sel(s, src, dst=False) for s in sels)


def compile_node(
    policy: Policy | None, dst: Subject, dst_id: int, nodes: Iterable[tuple[int, Subject]]
) -> dict[str, Any] | None:
    """The SSHPolicy of node `dst_id` (its Subject `dst`) given every node of the tailnet."""
    if policy is None or not policy.ssh:
        return None
    others = [(i, s) for i, s in nodes if i != dst_id]
    rules: list[dict[str, Any]] = []
    for k, r in enumerate(policy.ssh):
        if not r.src_sels or not r.dst_sels:
            continue
        shared: list[dict[str, Any]] = []
        per_user: list[tuple[dict[str, Any], dict[str, str]]] = []
        has_localpart = any(u.startswith("localpart:") for u in r.users)
        for i, s in others:
            if _dst_matches(r.dst_sels, s, dst).value is not True or _src_matches(r.src_sels, s).value is not True:
                continue
            if r.action == "check" and s.tags:
                continue  # no user to sign in again: refused
            p = {"Node": i, "User": s.user, "Tags": sorted(s.tags or ()), "IPs": [str(n.network_address)
                                                                                   for n in s.nets or ()]}
            if has_localpart and s.user is not None:
                per_user.append((p, users_map(r, s.user)))
            else:
                shared.append(p)
        base = users_map(r, None)

        period = r.check_period if r.action == "check" else None
        out: list[tuple[list[dict[str, Any]], dict[str, str]]] = []
        # Principals whose map is the base one share one rule; order within a policy rule does not matter.
        for p, users in per_user:
            if users == base:
                shared.append(p)
        out.append((sorted(shared, key=lambda p: p["Node"]), base))
        out += [([p], users) for p, users in per_user if users != base]
        rules += [{"Principals": ps, "SSHUsers": us, "Action": r.action, "CheckPeriod": period, "Origin": k}
                  for ps, us in out if ps and us]
    return {"Rules": rules} if rules else None


def login_verdict(policy: Policy, src: Subject, dst: Subject, login: str) -> tuple[str | None, list[str]]:
    """What the first matching ssh rule says for `src` logging in to `dst` as `login`: "accept", "check",
    "deny", or None (not decidable from what is known) with the reasons."""
    for r in policy.ssh:
        to = _dst_matches(r.dst_sels, src, dst)
        if to.value is False:
            continue
        frm = _src_matches(r.src_sels, src)
        if frm.value is False:
            continue
        user = _user_matches(r, src, login)
        if user.value is False:
            continue
        if to.value is None or frm.value is None or user.value is None:
            return None, to.reasons + frm.reasons + user.reasons
        if r.action == "check" and src.tags:
            continue  # tagged sources cannot use check
        if r.action == "check" and src.tags is None:
            return None, [f"whether {src.label} is tagged (check needs a user) is not known"]
        return r.action, []
    return "deny", []


def _user_matches(r: SshRule, src: Subject, login: str) -> Verdict:
    if src.tags:
        return Verdict.of(_maps(users_map(r, None), login))
    if src.user is None and any(u.startswith("localpart:") for u in r.users):
        if _maps(users_map(r, None), login):
            return Verdict.of(True)
        return Verdict.of(None, f"which user {src.label} is (for localpart) is not known")
    return Verdict.of(_maps(users_map(r, src.user), login))


def _maps(m: Mapping[str, str], login: str) -> bool:
    if login in m:
        return m[login] != ""
    return m.get("*", "") != ""
