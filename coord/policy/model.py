"""The typed policy: every section of a Tailscale policy file, validated (see parse.py).

Sections we enforce (acls, grants, groups, tagOwners, hosts, ipsets, autoApprovers, tests, postures as far
as posture attributes are known) are compiled; the others (ssh, sshTests, nodeAttrs, attrConfig, derpMap,
network-wide options, grant `app`) are validated and kept so `policy get` returns them and a later
version can enforce them.

`Rule` is the normal form of both an `acls` entry and a `grants` entry: sources, destinations with their
port ranges, and the IP protocols (empty = Tailscale's default TCP, UDP, ICMPv4, ICMPv6).
"""

from __future__ import annotations

import ipaddress
import re
from dataclasses import dataclass, field
from typing import Any

IPNet = ipaddress.IPv4Network | ipaddress.IPv6Network
PortRange = tuple[int, int]
ALL_PORTS: tuple[PortRange, ...] = ((0, 65535),)

TCP, UDP, ICMP4, ICMP6 = 6, 17, 1, 58
DEFAULT_PROTOS = (TCP, UDP, ICMP4, ICMP6)

# IANA names Tailscale accepts for `proto` (ts:tailcfg, hs:hscontrol/policy/v2/types.go).
PROTOCOLS = {
    "icmp": 1,
    "igmp": 2,
    "ipv4": 4,
    "ip-in-ip": 4,
    "tcp": 6,
    "egp": 8,
    "igp": 9,
    "udp": 17,
    "gre": 47,
    "esp": 50,
    "ah": 51,
    "ipv6-icmp": 58,
    "icmpv6": 58,
    "sctp": 132,
    "fc": 133,
}

CGNAT_V4 = ipaddress.ip_network("100.64.0.0/10")
TAILNET_V6 = ipaddress.ip_network("fd7a:115c:a1e0::/48")
TAILNET_RANGES: tuple[IPNet, ...] = (CGNAT_V4, TAILNET_V6)

ROLE_AUTOGROUPS = frozenset({"admin", "owner", "network-admin", "it-admin", "billing-admin", "auditor"})
AUTOGROUPS = frozenset({"member", "tagged", "self", "shared", "internet", "danger-all", "nonroot"}) | ROLE_AUTOGROUPS
SRC_ONLY = frozenset({"danger-all"})
DST_ONLY = frozenset({"self", "internet"})
SSH_ONLY = frozenset({"nonroot"})
# A local user name for ssh `users` and `sshTests` as useradd accepts it (Debian's NAME_REGEX, relaxed to upper case
# and dots): never a leading '-' (an option to every program it reaches), at most 32 characters.
LOCAL_USER = re.compile(r"[A-Za-z_][A-Za-z0-9_.-]{0,30}\$?")


def _internet() -> tuple[IPNet, ...]:
    """0.0.0.0/0 and 2000::/3 minus private, CGNAT, tailnet and link-local space (hs util/net.go)."""
    v4: list[IPNet] = [ipaddress.ip_network("0.0.0.0/0")]
    v6: list[IPNet] = [ipaddress.ip_network("2000::/3")]
    for cut in ("10.0.0.0/8", "172.16.0.0/12", "192.168.0.0/16", "100.64.0.0/10", "169.254.0.0/16"):
        v4 = _exclude(v4, ipaddress.ip_network(cut))
    for cut in ("fc00::/7", "fd7a:115c:a1e0::/48", "fe80::/10"):
        v6 = _exclude(v6, ipaddress.ip_network(cut))
    return tuple(sorted(v4, key=lambda n: int(n.network_address)) + sorted(v6, key=lambda n: int(n.network_address)))


def _exclude(nets: list[IPNet], cut: IPNet) -> list[IPNet]:
    out: list[IPNet] = []
    for n in nets:
        if n.version != cut.version or not n.overlaps(cut):
            out.append(n)
        elif cut.subnet_of(n):  # type: ignore[arg-type]
            out.extend(n.address_exclude(cut))  # type: ignore[arg-type]
    return out


INTERNET = _internet()


@dataclass(frozen=True)
class Sel:
    """One selector. kind: all, user, group, tag, host, prefix, ipset, svc, autogroup.

    `name` is the selector as written without its prefix (login, group name with `group:`, ...);
    `nets` holds the resolved addresses of host, prefix and ipset selectors.
    """

    kind: str
    name: str
    nets: tuple[IPNet, ...] = ()

    def __str__(self) -> str:
        return self.name


@dataclass(frozen=True)
class Dst:
    sel: Sel
    ports: tuple[PortRange, ...]


@dataclass(frozen=True)
class Rule:
    """A normalised access rule; `origin` is its JSON path (e.g. ("grants", 2))."""

    origin: tuple[str | int, ...]
    src: tuple[Sel, ...]
    dst: tuple[Dst, ...]
    protos: tuple[int, ...]
    via: tuple[str, ...] = ()
    posture: tuple[str, ...] | None = None  # srcPosture names; None = use defaultSrcPosture


@dataclass(frozen=True)
class AclEntry:
    action: str
    src: tuple[str, ...]
    dst: tuple[str, ...]
    proto: str | None
    src_posture: tuple[str, ...] | None


@dataclass(frozen=True)
class Grant:
    src: tuple[str, ...]
    dst: tuple[str, ...]
    ip: tuple[str, ...]
    via: tuple[str, ...]
    app: dict[str, Any] | None
    src_posture: tuple[str, ...] | None
    src_sels: tuple[Sel, ...] = ()
    dst_sels: tuple[Sel, ...] = ()


@dataclass(frozen=True)
class Test:
    """A `tests` entry; `allow` is the legacy spelling of `accept` and lands there."""

    src: str
    proto: str | None
    accept: tuple[str, ...]
    deny: tuple[str, ...]
    posture_attrs: dict[str, Any] | None


@dataclass(frozen=True)
class SshRule:
    action: str
    src: tuple[str, ...]
    dst: tuple[str, ...]
    users: tuple[str, ...]
    check_period: str | None
    recorder: tuple[str, ...]
    enforce_recorder: bool
    accept_env: tuple[str, ...]
    src_sels: tuple[Sel, ...] = ()
    dst_sels: tuple[Sel, ...] = ()


@dataclass(frozen=True)
class SshTest:
    src: str
    dst: tuple[str, ...]
    accept: tuple[str, ...]
    deny: tuple[str, ...]
    check: tuple[str, ...]


@dataclass(frozen=True)
class NodeAttr:
    target: tuple[str, ...]
    attr: tuple[str, ...]
    ip_pool: tuple[str, ...]
    app: dict[str, Any] | None


@dataclass(frozen=True)
class AutoApprovers:
    routes: dict[IPNet, tuple[Sel, ...]] = field(default_factory=dict)
    exit_node: tuple[Sel, ...] = ()
    services: dict[str, tuple[Sel, ...]] = field(default_factory=dict)


@dataclass(frozen=True)
class Policy:
    raw: dict[str, Any]
    filename: str
    groups: dict[str, tuple[str, ...]]
    tag_owners: dict[str, tuple[Sel, ...]]
    hosts: dict[str, IPNet]
    ipsets: dict[str, tuple[IPNet, ...]]
    acls: tuple[AclEntry, ...]
    grants: tuple[Grant, ...]
    rules: tuple[Rule, ...]
    has_rules: bool  # False when neither `acls` nor `grants` is present: allow-all
    tests: tuple[Test, ...]
    ssh: tuple[SshRule, ...]
    ssh_tests: tuple[SshTest, ...]
    node_attrs: tuple[NodeAttr, ...]
    postures: dict[str, tuple[str, ...]]
    default_src_posture: tuple[str, ...]
    auto_approvers: AutoApprovers
    options: dict[str, Any]  # derpMap, disableIPv4, randomizeClientPort, OneCGNATRoute, attrConfig

    def group_members(self, group: str) -> tuple[str, ...]:
        return self.groups.get(group, ())
