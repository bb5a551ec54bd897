"""The policy as netmaps see it: visibility and packet filters from the incremental policy engine.

Node events that change what a policy matches (owner, tags, addresses) are fed to the engine one node at a time,
so a join recompiles only the rules and nodes it touches; the nodes whose peers or filter changed come back as a
``Change`` for the fan-out.
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

from coord import events as ev
from coord import policy
from coord.change import Change
from coord.state import Node, State

# Events after which a node's policy identity may differ.
_IDENTITY = (ev.NodeRegistered, ev.NodeReauthenticated, ev.NodeTagged, ev.NodeDeleted, ev.NodeRoutesApproved)


def policy_node(state: State, n: Node) -> policy.PolicyNode:
    user = state.users.get(n.user_id) if n.user_id is not None and not n.tags else None
    return policy.PolicyNode(
        id=n.id,
        user=user.name if user else None,
        tags=frozenset(n.tags),
        addresses=(n.ipv4, n.ipv6),
        # Every approved router of a prefix, primary or standby: a standby must accept traffic after a failover.
        approved_routes=n.subnet_routes,
        exit_node=n.exit_node,
    )


def policy_nodes(state: State) -> list[policy.PolicyNode]:
    return [policy_node(state, n) for n in state.nodes.values()]


def roles(state: State) -> dict[str, tuple[str, ...]]:
    """user name -> role autogroups (``autogroup:admin`` is role "admin"); members have none."""
    return {u.name: (u.role,) for u in state.users.values() if u.role != "member"}


def idp_groups(state: State) -> dict[str, tuple[str, ...]]:
    """user name -> policy groups from the identity provider (filled at sign-in, see coord.auth)."""
    return {u.name: u.groups for u in state.users.values() if u.groups}


class PolicyVisibility:
    """Visibility backed by a parsed policy; rebuilt whole only when the policy itself changes."""

    def __init__(self, state: State, parsed: policy.Policy) -> None:
        self.state = state
        self.engine = policy.PolicyEngine(parsed, policy_nodes(state), roles(state), idp_groups=idp_groups(state))
        # Under which name each user's IdP groups were given to the engine, so a rename moves them.
        self._group_names: dict[int, str] = {u.id: u.name for u in state.users.values() if u.groups}

    def peers(self, node_id: int) -> Iterable[int]:
        return self.engine.peers(node_id)

    def sees(self, viewer: int, peer: int) -> bool:
        return peer in self.engine.peers(viewer)

    def filter(self, node_id: int) -> list[dict[str, Any]]:
        return self.engine.filter(node_id)

    def ssh_policy(self, node_id: int) -> dict[str, Any] | None:
        return self.engine.ssh_policy(node_id)

    def cap_grants(self, node_id: int) -> list[dict[str, Any]]:
        return self.engine.cap_grants(node_id)

    def exit_allowed(self, viewer: int, exit_id: int) -> bool:
        return self.engine.exit_allowed(viewer, exit_id)

    def observe(self, records: list[ev.Record]) -> Change:
        affected: set[int] = set()
        for r in records:
            e = r.event
            if isinstance(e, _IDENTITY):
                nid = e.node_id
                n = self.state.nodes.get(nid)
                affected |= self.engine.remove(nid) if n is None else self.engine.upsert(policy_node(self.state, n))
            elif isinstance(e, ev.NodeHostinfoChanged):
                # Advertising or withdrawing an approved route changes what the node serves.
                n = self.state.nodes.get(e.node_id)
                if n is not None:
                    pn = policy_node(self.state, n)
                    if self.engine.node(n.id) != pn:
                        affected |= self.engine.upsert(pn)
            elif isinstance(e, ev.UserRenamed):
                affected |= self._regroup(e.user_id)
                for n in self.state.nodes.values():
                    if n.user_id == e.user_id:
                        affected |= self.engine.upsert(policy_node(self.state, n))
            elif isinstance(e, (ev.UserClaimsUpdated, ev.UserDeleted)):
                affected |= self._regroup(e.user_id)
        return Change(visibility=affected)

    def _regroup(self, user_id: int) -> set[int]:
        """A sign-in changed a user's groups, or the user's name changed: tell the engine."""
        affected: set[int] = set()
        old = self._group_names.pop(user_id, None)
        u = self.state.users.get(user_id)
        if old is not None and (u is None or u.name != old):
            affected |= self.engine.set_idp_groups(old, ())
        if u is not None:
            affected |= self.engine.set_idp_groups(u.name, u.groups)
            if u.groups:
                self._group_names[user_id] = u.name
        return affected


def tailnet(state: State) -> dict[str, Any]:
    """The live tailnet in the shape ``policy check`` takes."""
    return policy.tailnet_state(policy_nodes(state), roles(state), idp_groups(state))
