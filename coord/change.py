"""What an event means for the netmaps: a mergeable value the fan-out reads without inspecting state."""

from __future__ import annotations

from dataclasses import dataclass, field


@dataclass
class Change:
    # Peers whose record changed for everyone who can see them (sent as PeersChanged).
    peers: set[int] = field(default_factory=set)
    # Peers of which only patchable fields changed (Endpoints, HomeDERP, Online, LastSeen, DiscoKey).
    patches: set[int] = field(default_factory=set)
    # Nodes whose own record (Node in their map) changed.
    self_nodes: set[int] = field(default_factory=set)
    # Nodes that disappeared for everyone (deleted, logged out, expired).
    removed: set[int] = field(default_factory=set)
    # Nodes whose set of visible peers or packet filter may have changed.
    visibility: set[int] = field(default_factory=set)
    # Every node's visibility and filter may have changed (policy set).
    policy: bool = False
    # The DNS settings changed: every node gets the new DNSConfig.
    dns: bool = False
    # Sessions of these nodes must end (logout, delete, key rotation).
    close: set[int] = field(default_factory=set)

    def merge(self, other: Change) -> Change:
        self.peers |= other.peers
        self.patches |= other.patches
        self.self_nodes |= other.self_nodes
        self.removed |= other.removed
        self.visibility |= other.visibility
        self.policy = self.policy or other.policy
        self.dns = self.dns or other.dns
        self.close |= other.close
        return self

    def __bool__(self) -> bool:
        sets = (self.peers, self.patches, self.self_nodes, self.removed, self.visibility, self.close)
        return self.policy or self.dns or any(sets)
