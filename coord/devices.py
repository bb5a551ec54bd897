"""Plain-WireGuard devices in netmaps: a wrapper around the policy's visibility (docs/wg-devices.md).

A device (`shoal-server devices add-wg NAME --via HUB`) is a node to the policy like any other: it has an owner,
tailnet addresses and rules that name it. But it runs no agent, so only its hub talks WireGuard to it:

- the hub sees every device it carries as a peer (the device's key, AllowedIPs = its /32 and /128, no endpoint:
  WireGuard learns it from the device's first handshake);
- every other node sees, in place of a device the policy lets it see, the device's hub, whose AllowedIPs carry the
  device's addresses (coord/netmap.py), so its traffic to the device goes through the hub;
- the hub's packet filter gets the rules of each device (traffic forwarded TO the device, which filters nothing),
  and the rules of the device's peers restricted to the device's addresses as sources (traffic forwarded FROM the
  device): both directions are enforced on the hub, and receivers enforce their own rules as for any node.
"""

from __future__ import annotations

import ipaddress
from collections.abc import Iterable
from typing import Any

from coord.change import Change
from coord.netmap import Visibility
from coord.state import State, devices_of
from coord.wire import FILTER_ALLOW_ALL


def _covers(src: str, ip: str) -> bool:
    if src == "*":
        return True
    try:
        if "-" in src:
            lo, hi = (ipaddress.ip_address(x) for x in src.split("-", 1))
            a = ipaddress.ip_address(ip)
            return a.version == lo.version and lo <= a <= hi  # type: ignore[operator]
        return ipaddress.ip_address(ip) in ipaddress.ip_network(src, strict=False)
    except ValueError:
        return False


class DeviceVisibility:
    """`inner`'s peers and filters with each device folded into its hub."""

    def __init__(self, state: State, inner: Visibility) -> None:
        self.state = state
        self.inner = inner

    def _via(self, node_id: int) -> int | None:
        n = self.state.nodes.get(node_id)
        return None if n is None else n.via

    def peers(self, node_id: int) -> Iterable[int]:
        if self._via(node_id) is not None:
            return ()  # a device never asks for a map; it has no peers but its hub (its wg-quick config)
        out: set[int] = set()
        for pid in self.inner.peers(node_id):
            via = self._via(pid)
            if via is None:
                out.add(pid)
            elif via != node_id:
                out.add(via)
        out |= {d.id for d in devices_of(self.state, node_id)}
        out.discard(node_id)
        return out

    def sees(self, viewer: int, peer: int) -> bool:
        """As ``peer in peers(viewer)``, without building the set: the fan-out asks this per viewer and change."""
        if viewer == peer or self._via(viewer) is not None:
            return False
        via = self._via(peer)
        if via is not None:
            return via == viewer  # a device is seen by its hub only; others see the hub in its place
        if self.inner.sees(viewer, peer):
            return True
        return any(self.inner.sees(viewer, d.id) for d in devices_of(self.state, peer))

    def filter(self, node_id: int) -> list[dict[str, Any]]:
        base = self.inner.filter(node_id)
        devices = devices_of(self.state, node_id)
        if not devices or base == FILTER_ALLOW_ALL:
            return base
        out = list(base)
        for d in devices:
            out += self.inner.filter(d.id)  # to the device
            mine = [f"{d.ipv4}/32", f"{d.ipv6}/128"]
            for pid in sorted(self.inner.peers(d.id)):  # from the device: what its peers let it reach
                for rule in self.inner.filter(pid):
                    src = [m for m in mine if any(_covers(s, m.split("/")[0]) for s in rule.get("SrcIPs", []))]
                    if src:
                        out.append({**rule, "SrcIPs": src})
        return out

    def ssh_policy(self, node_id: int) -> dict[str, Any] | None:
        # A device runs no agent, so no Shoal SSH; as a source it is a node like any other in its peers' rules.
        return None if self._via(node_id) is not None else self.inner.ssh_policy(node_id)

    def cap_grants(self, node_id: int) -> list[dict[str, Any]]:
        return [] if self._via(node_id) is not None else self.inner.cap_grants(node_id)

    def exit_allowed(self, viewer: int, exit_id: int) -> bool:
        # A hub's devices send through the hub, whose own permission is what its netmap reflects.
        return self.inner.exit_allowed(viewer, exit_id)

    def widen(self, change: Change) -> Change:
        """A device whose peers or filter may have changed changes its hub's filter."""
        for nid in list(change.visibility):
            via = self._via(nid)
            if via is not None:
                change.visibility.add(via)
        return change

    def observe(self, records: list[Any]) -> Change:
        hook = getattr(self.inner, "observe", None)
        return self.widen(hook(records) if hook is not None else Change())
