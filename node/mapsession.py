"""The node's view of the tailnet, built from a map stream: one full MapResponse, then deltas (pure).

`apply(netmap, msg)` returns the netmap after one typed MapResponse (coord/wire/schema.py), by the protocol's
rules ("zero = unchanged", as Tailscale's controlclient mapSession): a self ``Node`` replaces ours; ``Peers``
replaces every peer, else ``PeersChanged`` replaces the records it names, then ``PeersRemoved`` drops peers, then
``PeersChangedPatch`` changes the fields it carries on peers we have (a patch for an unknown peer is dropped);
``DERPMap``, ``DNSConfig``, ``PacketFilter``, ``SSHPolicy`` and ``CapGrants`` replace what we had when
present, ``Domain`` when not empty.

The saved form (node/state.py ``netmap.json``) is a full MapResponse: ``{"Node", "Peers" (sorted by ID),
"DERPMap", "DNSConfig", "PacketFilter", "Domain", "SSHPolicy", "CapGrants"}``, read back with the same parser as
the stream.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

from coord import wire


@dataclass(frozen=True)
class NetMap:
    node: wire.Node | None = None
    peers: Mapping[int, wire.Node] = field(default_factory=dict)  # by ID; never changed in place
    derp_map: wire.DERPMap | None = None
    dns: wire.DNSConfig | None = None
    packet_filter: tuple[wire.FilterRule, ...] | None = None  # None: none received yet (blocks all)
    domain: str = ""
    ssh_policy: wire.SSHPolicy | None = None  # None: none received yet (no SSH)
    cap_grants: tuple[wire.CapGrant, ...] = ()
    keep_established: bool = False  # the server's keep_established_on_policy_change

    def sorted_peers(self) -> list[wire.Node]:
        return [self.peers[k] for k in sorted(self.peers)]

    def to_json(self) -> dict[str, Any]:
        return {
            "Node": None if self.node is None else self.node.to_json(),
            "Peers": [p.to_json() for p in self.sorted_peers()],
            "DERPMap": None if self.derp_map is None else self.derp_map.to_json(),
            "DNSConfig": None if self.dns is None else self.dns.to_json(),
            "PacketFilter": None if self.packet_filter is None else [r.to_json() for r in self.packet_filter],
            "Domain": self.domain,
            "SSHPolicy": None if self.ssh_policy is None else self.ssh_policy.to_json(),
            "CapGrants": [g.to_json() for g in self.cap_grants],
            "KeepEstablished": self.keep_established,
        }

    @classmethod
    def from_json(cls, data: object) -> NetMap:
        """A saved netmap; raises WireError when it is not one."""
        if not isinstance(data, dict) or not isinstance(data.get("Node"), dict) or not isinstance(
                data.get("Peers"), list):
            raise wire.WireError("expected Node and Peers")
        return apply(cls(), wire.MapResponse.from_json(data))


def apply(nm: NetMap, msg: wire.MapResponse) -> NetMap:
    peers = nm.peers
    if msg.peers is not None:
        peers = {p.id: p for p in msg.peers}
    elif msg.peers_changed or msg.peers_removed or msg.peers_patch:
        changed = dict(peers)
        for p in msg.peers_changed:
            changed[p.id] = p
        for pid in msg.peers_removed:
            changed.pop(pid, None)
        for patch in msg.peers_patch:
            old = changed.get(patch.node_id)
            if old is not None:
                changed[patch.node_id] = patch.apply(old)
        peers = changed
    return NetMap(
        node=nm.node if msg.node is None else msg.node,
        peers=peers,
        derp_map=nm.derp_map if msg.derp_map is None else msg.derp_map,
        dns=nm.dns if msg.dns is None else msg.dns,
        packet_filter=nm.packet_filter if msg.packet_filter is None else msg.packet_filter,
        domain=msg.domain or nm.domain,
        ssh_policy=nm.ssh_policy if msg.ssh_policy is None else msg.ssh_policy,
        cap_grants=nm.cap_grants if msg.cap_grants is None else msg.cap_grants,
        keep_established=nm.keep_established if msg.keep_established is None else msg.keep_established,
    )
