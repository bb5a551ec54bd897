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
_IDENTITY = (ev.NodeRegistered, ev.NodeReauthenticated, ev.NodeTagged, ev.NodeDeleted)


def policy_node(state: State, n: Node) -> policy.PolicyNode:
    user = state.users.get(n.user_id) if n.user_id is not None and not n.tags else None
    return policy.PolicyNode(
        id=n.id,
        user=user.name if user else None,
        tags=frozenset(n.tags),
        addresses=(n.ipv4, n.ipv6),
    )


def policy_nodes(state: State) -> list[policy.PolicyNode]:
    return [policy_node(state, n) for n in state.nodes.values()]


class PolicyVisibility:
    """Visibility backed by a parsed policy; rebuilt whole only when the policy itself changes."""

    def __init__(self, state: State, parsed: policy.Policy) -> None:
        self.state = state
        self.engine = policy.PolicyEngine(parsed, policy_nodes(state))

    def peers(self, node_id: int) -> Iterable[int]:
        return self.engine.peers(node_id)

    def sees(self, viewer: int, peer: int) -> bool:
        return peer in self.engine.peers(viewer)

    def filter(self, node_id: int) -> list[dict[str, Any]]:
        return self.engine.filter(node_id)

    def observe(self, records: list[ev.Record]) -> Change:
        affected: set[int] = set()
        for r in records:
            e = r.event
            if isinstance(e, _IDENTITY):
                nid = e.node_id
                n = self.state.nodes.get(nid)
                affected |= self.engine.remove(nid) if n is None else self.engine.upsert(policy_node(self.state, n))
            elif isinstance(e, ev.UserRenamed):
                for n in self.state.nodes.values():
                    if n.user_id == e.user_id:
                        affected |= self.engine.upsert(policy_node(self.state, n))
        return Change(visibility=affected)


def tailnet(state: State) -> dict[str, Any]:
    """The live tailnet in the shape ``policy check`` takes."""
    return policy.tailnet_state(policy_nodes(state), {})
