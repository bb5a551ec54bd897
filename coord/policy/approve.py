"""tagOwners and autoApprovers: who may apply a tag, and whose routes and exit nodes are approved.

An owner/approver is a user, `group:`, `tag:` (a node carrying it, e.g. a Kubernetes operator, may
apply the tag), `autogroup:member`, `autogroup:tagged`, or a role autogroup (`autogroup:admin`, ...).
Without a policy nobody may apply tags and nothing is auto-approved: an admin does it by hand.
A requested route is approved if an `autoApprovers.routes` prefix contains it.
"""

from __future__ import annotations

import ipaddress
from collections.abc import Iterable

from .model import Policy, Sel


def _owner(policy: Policy, sel: Sel, user: str | None, tags: frozenset[str], roles: frozenset[str]) -> bool:
    if sel.kind == "user":
        return user is not None and not tags and user == sel.name
    if sel.kind == "group":
        return user is not None and not tags and user in policy.groups.get(sel.name, ())
    if sel.kind == "tag":
        return sel.name in tags
    if sel.kind == "autogroup":
        if sel.name == "member":
            return user is not None and not tags and "shared" not in roles
        if sel.name == "tagged":
            return bool(tags)
        return user is not None and not tags and sel.name in roles
    return False


def tag_allowed(
    policy: Policy | None,
    user: str | None,
    tag: str,
    *,
    node_tags: Iterable[str] = (),
    roles: Iterable[str] = (),
) -> bool:
    """May `user` (or a node already carrying `node_tags`) apply `tag` at registration?"""
    if policy is None or tag not in policy.tag_owners:
        return False
    t, r = frozenset(node_tags), frozenset(roles)
    return any(_owner(policy, s, user, t, r) for s in policy.tag_owners[tag])


def route_approved(
    policy: Policy | None, route: str, user: str | None, *, tags: Iterable[str] = (), roles: Iterable[str] = ()
) -> bool:
    if policy is None:
        return False
    try:
        want = ipaddress.ip_network(route, strict=False)
    except ValueError:
        return False
    t, r = frozenset(tags), frozenset(roles)
    for prefix, approvers in policy.auto_approvers.routes.items():
        covers = prefix.version == want.version and want.subnet_of(prefix)  # type: ignore[arg-type]
        if covers and any(_owner(policy, s, user if not t else None, t, r) for s in approvers):
            return True
    return False


def exit_node_approved(
    policy: Policy | None, user: str | None, *, tags: Iterable[str] = (), roles: Iterable[str] = ()
) -> bool:
    if policy is None:
        return False
    t, r = frozenset(tags), frozenset(roles)
    return any(_owner(policy, s, user if not t else None, t, r) for s in policy.auto_approvers.exit_node)
