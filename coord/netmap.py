"""Netmaps: what each node is sent, as a full map or as a delta against what it was last sent.

Pure: ``(state, visibility, node_id) -> MapResponse`` bytes. Peer records are encoded once per node version and
reused for every viewer, so a change to one node costs one encoding plus one small frame per viewer, not a rebuild
of every map.
"""

from __future__ import annotations

import json
from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import Any, Protocol

from coord import dns
from coord.change import Change
from coord.events import rfc3339
from coord.state import EXIT_ROUTES, Node, State, devices_of
from coord.wire import FILTER_ALLOW_ALL


class Visibility(Protocol):
    """Who may see whom, and the packet filter each node enforces on traffic arriving to it."""

    def peers(self, node_id: int) -> Iterable[int]: ...

    def sees(self, viewer: int, peer: int) -> bool: ...

    def filter(self, node_id: int) -> list[dict[str, Any]]: ...

    def ssh_policy(self, node_id: int) -> dict[str, Any] | None: ...

    def cap_grants(self, node_id: int) -> list[dict[str, Any]]: ...

    def exit_allowed(self, viewer: int, exit_id: int) -> bool: ...


@dataclass
class AllowAll:
    """No policy: everyone sees everyone, all traffic is allowed (Tailscale's default)."""

    state: State

    def peers(self, node_id: int) -> Iterable[int]:
        return self.state.nodes.keys()

    def sees(self, viewer: int, peer: int) -> bool:
        return viewer != peer

    def filter(self, node_id: int) -> list[dict[str, Any]]:
        return FILTER_ALLOW_ALL

    def ssh_policy(self, node_id: int) -> dict[str, Any] | None:
        return None

    def cap_grants(self, node_id: int) -> list[dict[str, Any]]:
        return []

    def exit_allowed(self, viewer: int, exit_id: int) -> bool:
        return True


def _dumps(obj: Any) -> bytes:
    return json.dumps(obj, separators=(",", ":")).encode()


@dataclass
class Settings:
    domain: str
    derp_map: dict[str, Any]
    # The reverse zones MagicDNS answers (``dns.reverse_zones`` of the tailnet prefixes).
    reverse_zones: tuple[str, ...] = dns.reverse_zones("100.64.0.0/10", "fd7a:115c:a1e0::/48")
    # The server URL's host: a base domain set at run time must not contain it (dns.base_domain).
    server_host: str = ""
    # Sent as KeepEstablished: whether nodes keep the flows a narrowed filter no longer allows.
    keep_established: bool = False


def node_record(n: Node, domain: str, devices: Iterable[Node] = (), exit_routes: bool = True) -> dict[str, Any]:
    """``exit_routes=False``: the record as a viewer the policy does not let use this exit node sees it (no
    0.0.0.0/0 or ::/0 in AllowedIPs; Hostinfo still says what the node offers)."""
    addrs = [f"{n.ipv4}/32", f"{n.ipv6}/128"]
    # A subnet route reaches peers only from its elected primary; approved exit routes from every exit node (a
    # client picks one). Either way only approved, advertised routes (see State). A hub carries the addresses of
    # its plain-WireGuard devices (coord/devices.py).
    allowed = addrs + [a for d in devices for a in (f"{d.ipv4}/32", f"{d.ipv6}/128")] + list(n.primary_routes)
    if n.exit_node and exit_routes:
        allowed += list(EXIT_ROUTES)
    return {
        "ID": n.id,
        "StableID": f"n{n.id}",
        "Name": f"{n.given_name}.{domain}.",
        "User": n.user_id,
        "Key": n.node_key,
        "KeyExpiry": None if n.key_expiry is None else rfc3339(n.key_expiry),
        "Machine": n.machine_key,
        "DiscoKey": n.disco_key,
        "Addresses": addrs,
        "AllowedIPs": allowed,
        "PrimaryRoutes": list(n.primary_routes),
        "Endpoints": list(n.endpoints),
        "HomeDERP": n.home_derp,
        "Online": n.online,
        "LastSeen": None if n.last_seen is None else rfc3339(n.last_seen),
        "Tags": list(n.tags),
        "Hostinfo": {"Hostname": n.hostname, "OS": n.os, "RoutableIPs": list(n.routes)},
        "Created": rfc3339(n.created),
        "Expired": n.expired,
    }


def patch_record(n: Node) -> dict[str, Any]:
    return {
        "NodeID": n.id,
        "Endpoints": list(n.endpoints),
        "HomeDERP": n.home_derp,
        "Online": n.online,
        "LastSeen": None if n.last_seen is None else rfc3339(n.last_seen),
        "DiscoKey": n.disco_key,
    }


@dataclass
class Builder:
    state: State
    settings: Settings
    _peer_cache: dict[int, tuple[int, bytes]] = field(default_factory=dict)
    # An exit node's record without the exit routes, for viewers the policy does not let use it (encoded once too).
    _peer_cache_noexit: dict[int, tuple[int, bytes]] = field(default_factory=dict)
    # Patches and the ControlTime text are the same for every viewer of a change: encode them once, not per viewer.
    _patch_cache: dict[int, tuple[int, bytes]] = field(default_factory=dict)
    _time_cache: tuple[float, bytes] = (0.0, b"")
    _settings_json: bytes | None = None
    # (state.dns_version, the encoded DNSConfig): the same for every node, encoded once per DNS change.
    _dns_json: tuple[int, bytes] = (-1, b"")

    @property
    def domain(self) -> str:
        """The MagicDNS base domain: an admin's (``dns set --base-domain``), else the config's."""
        return self.state.base_domain or self.settings.domain

    def invalidate_settings(self) -> None:
        self._settings_json = None
        self._dns_json = (-1, b"")

    def peer_json(self, n: Node, exit_routes: bool = True) -> bytes:
        cache = self._peer_cache if exit_routes or not n.exit_node else self._peer_cache_noexit
        hit = cache.get(n.id)
        if hit is not None and hit[0] == n.version:
            return hit[1]
        data = _dumps(node_record(n, self.domain, devices_of(self.state, n.id), exit_routes))
        cache[n.id] = (n.version, data)
        return data

    @staticmethod
    def _tag(vis: Visibility, viewer: int, p: Node) -> tuple[bool, int]:
        """(exit routes shown, what ``sent`` records for p): its version, doubled, plus one for the record without
        exit routes; so a policy change that grants or takes the exit node resends the record."""
        shown = not p.exit_node or vis.exit_allowed(viewer, p.id)
        return shown, p.version * 2 + (0 if shown else 1)

    def forget(self, node_id: int) -> None:
        self._peer_cache.pop(node_id, None)
        self._peer_cache_noexit.pop(node_id, None)
        self._patch_cache.pop(node_id, None)

    def patch_json(self, n: Node) -> bytes:
        hit = self._patch_cache.get(n.id)
        if hit is not None and hit[0] == n.version:
            return hit[1]
        data = _dumps(patch_record(n))
        self._patch_cache[n.id] = (n.version, data)
        return data

    def control_time(self, now: float) -> bytes:
        if self._time_cache[0] != now or not self._time_cache[1]:
            self._time_cache = (now, _dumps(rfc3339(now)))
        return self._time_cache[1]

    def self_record(self, n: Node) -> dict[str, Any]:
        rec = node_record(n, self.domain, devices_of(self.state, n.id))
        rec["MachineAuthorized"] = True
        return rec

    def _settings(self) -> tuple[bytes, bytes]:
        if self._settings_json is None:
            self._settings_json = _dumps(self.settings.derp_map)
        return self._settings_json, self.dns_json()

    def dns_config(self) -> dict[str, Any]:
        st = self.state
        return dns.render(st.dns, st.dns_file_records, self.domain, self.settings.reverse_zones)

    def dns_json(self) -> bytes:
        version = self.state.dns_version
        if self._dns_json[0] != version:
            self._dns_json = (version, _dumps(self.dns_config()))
        return self._dns_json[1]

    def ssh_json(self, vis: Visibility, me: Node) -> dict[str, Any]:
        """The node's SSHPolicy (coord/policy/ssh.py); ``{"Rules": []}`` (no SSH) rather than null, which means
        "unchanged" on the wire."""
        return (vis.ssh_policy(me.id) if me.active else None) or {"Rules": []}

    def visible(self, vis: Visibility, node_id: int) -> dict[int, Node]:
        me = self.state.nodes.get(node_id)
        if me is None or not me.active:
            return {}
        nodes = self.state.nodes
        out = {}
        for pid in vis.peers(node_id):
            p = nodes.get(pid)
            if p is not None and pid != node_id and p.active:
                out[pid] = p
        return out

    def full(self, vis: Visibility, node_id: int, now: float) -> tuple[bytes, dict[int, int]]:
        """The full MapResponse for a node, and the peer versions it contains."""
        me = self.state.nodes[node_id]
        peers = self.visible(vis, node_id)
        ids = sorted(peers)
        derp, dns = self._settings()
        filt = vis.filter(node_id) if me.active else []
        tags = {i: self._tag(vis, node_id, peers[i]) for i in ids}
        body = b"".join(
            [
                b'{"Node":', _dumps(self.self_record(me)),
                b',"Peers":[', b",".join(self.peer_json(peers[i], tags[i][0]) for i in ids), b"]",
                b',"DERPMap":', derp,
                b',"DNSConfig":', dns,
                b',"PacketFilter":', _dumps(filt),
                b',"SSHPolicy":', _dumps(self.ssh_json(vis, me)),
                b',"CapGrants":', _dumps(vis.cap_grants(node_id) if me.active else []),
                b',"Domain":', _dumps(self.domain),
                b',"KeepEstablished":', _dumps(self.settings.keep_established),
                b',"ControlTime":', self.control_time(now),
                b"}",
            ]
        )
        return body, {i: tags[i][1] for i in ids}

    def delta(
        self, vis: Visibility, node_id: int, change: Change, sent: dict[int, int], now: float
    ) -> bytes | None:
        """A delta MapResponse against ``sent`` (peer id -> ``_tag``), which is updated in place.

        Returns None when nothing this node sees has changed.
        """
        me = self.state.nodes.get(node_id)
        if me is None:
            return None
        nodes = self.state.nodes
        changed: list[bytes] = []
        patches: list[bytes] = []
        removed: list[int] = []
        parts: list[bytes] = []
        if node_id in change.visibility or change.policy or not me.active:
            current = self.visible(vis, node_id)
            candidates: Iterable[int] = set(current) | set(sent)
        else:
            current = None
            candidates = (change.peers | change.patches | change.removed) - {node_id}
        for pid in sorted(candidates):
            p = nodes.get(pid)
            if current is not None:
                show = pid in current
            else:
                show = p is not None and p.active and me.active and vis.sees(node_id, pid)
            if not show or p is None:
                if pid in sent:
                    del sent[pid]
                    removed.append(pid)
                continue
            had = sent.get(pid)
            shown, tag = self._tag(vis, node_id, p)
            if had == tag:
                continue
            # A patch carries only the patch fields, but p.version may already count a change that is folded and
            # not yet flushed. So a patched copy is recorded as ~version (never a real version), and only a
            # change naming the peer in ``peers`` replaces it with the whole record.
            if had == ~tag and pid not in change.peers:
                continue
            # After a policy or visibility change the viewer may not have seen this peer for a while (a record
            # change made while it was hidden was never pushed to it): only the whole record is safe then.
            if had is not None and pid in change.patches and pid not in change.peers and current is None:
                patches.append(self.patch_json(p))
                sent[pid] = ~tag
            else:
                changed.append(self.peer_json(p, shown))
                sent[pid] = tag
        if node_id in change.self_nodes:
            parts.append(b'"Node":' + _dumps(self.self_record(me)))
        if changed:
            parts.append(b'"PeersChanged":[' + b",".join(changed) + b"]")
        if removed:
            parts.append(b'"PeersRemoved":' + _dumps(removed))
        if patches:
            parts.append(b'"PeersChangedPatch":[' + b",".join(patches) + b"]")
        if change.policy or node_id in change.visibility:
            parts.append(b'"PacketFilter":' + _dumps(vis.filter(node_id) if me.active else []))
            parts.append(b'"SSHPolicy":' + _dumps(self.ssh_json(vis, me)))
            parts.append(b'"CapGrants":' + _dumps(vis.cap_grants(node_id) if me.active else []))
        if change.dns:
            # The base domain is a DNS setting too (dns set --base-domain); resent with every DNS change.
            parts.append(b'"DNSConfig":' + self.dns_json())
            parts.append(b'"Domain":' + _dumps(self.domain))
        if not parts:
            return None
        parts.append(b'"ControlTime":' + self.control_time(now))
        return b"{" + b",".join(parts) + b"}"


def default_dns(domain: str, zones: tuple[str, ...] = ()) -> dict[str, Any]:
    """The DNSConfig of a tailnet whose log has no DNS event: MagicDNS on, no upstreams."""
    return dns.render(dns.DEFAULT, (), domain, zones)
