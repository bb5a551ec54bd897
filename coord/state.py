"""The tailnet as the fold of its event log.

``apply(state, event, ts)`` folds one event into the state and returns the ``Change`` it makes to netmaps. It does
no I/O and reads no clock (the event's time is passed in), so folding the same log always yields the same state:
that is how projections are rebuilt, how ``--at TIME`` views are made, and how a replay is checked. For speed with
thousands of nodes the fold updates the state in place rather than copying it.
"""

from __future__ import annotations

from dataclasses import dataclass, field, replace
from enum import StrEnum
from typing import Any

from coord import dns as dnsmod
from coord import events as ev
from coord.change import Change


class NodeStatus(StrEnum):
    """What a node is to its peers (the STATE column of ``nodes list``)."""

    ACTIVE = "active"
    EXPIRED = "expired"
    LOGGED_OUT = "logged-out"


class KeyStatus(StrEnum):
    """Whether an auth key admits a node now, and if not, why."""

    USABLE = "usable"
    REVOKED = "revoked"
    EXPIRED = "expired"
    USED = "used"


@dataclass
class User:
    id: int
    name: str
    created: float
    # From the identity provider (empty for users an admin created): identity, claims, last sign-in.
    issuer: str = ""
    subject: str = ""
    email: str = ""
    email_verified: bool = False
    display_name: str = ""
    idp_groups: tuple[str, ...] = ()
    groups: tuple[str, ...] = ()
    last_sign_in: float | None = None
    role: str = "member"


@dataclass
class AuthKey:
    id: int
    prefix: str
    hash: str
    user_id: int
    reusable: bool
    ephemeral: bool
    expiration: float | None
    tags: tuple[str, ...]
    created: float
    revoked: bool = False
    used_by: list[int] = field(default_factory=list)

    def status(self, now: float) -> KeyStatus:
        if self.revoked:
            return KeyStatus.REVOKED
        if self.expiration is not None and now >= self.expiration:
            return KeyStatus.EXPIRED
        if not self.reusable and self.used_by:
            return KeyStatus.USED
        return KeyStatus.USABLE


@dataclass
class Node:
    id: int
    machine_key: str
    node_key: str
    disco_key: str
    user_id: int | None
    tags: tuple[str, ...]
    hostname: str
    given_name: str
    ipv4: str
    ipv6: str
    ephemeral: bool
    key_expiry: float | None
    created: float
    auth_key_id: int | None = None
    os: str = ""
    name_by_admin: bool = False
    routes: tuple[str, ...] = ()  # advertised (Hostinfo.RoutableIPs)
    approved_routes: tuple[str, ...] = ()  # approved, advertised or not (NodeRoutesApproved)
    # The subnet routes this node is the elected primary router for (derived in the fold, see _elect).
    primary_routes: tuple[str, ...] = ()
    endpoints: tuple[str, ...] = ()
    endpoint_types: tuple[int, ...] = ()
    home_derp: int = 0
    online: bool = False
    last_seen: float | None = None
    expired: bool = False
    logged_out: bool = False
    # The key expiry a NodeKeyExpiringSoon was logged for (None: none yet for this expiry).
    warned_expiry: float | None = None
    # A plain-WireGuard device: the hub node whose agent is its only peer (docs/wg-devices.md).
    via: int | None = None
    # Bumped whenever anything a peer sees of this node changes; keys the netmap encoding cache.
    version: int = 0

    @property
    def active(self) -> bool:
        """Shown to peers: neither expired nor logged out."""
        return not (self.expired or self.logged_out)

    @property
    def served_routes(self) -> tuple[str, ...]:
        """Routes that count: advertised and approved (a double opt-in), exit routes included."""
        if not self.routes or not self.approved_routes:
            return ()
        approved = set(self.approved_routes)
        return tuple(r for r in self.routes if r in approved)

    @property
    def subnet_routes(self) -> tuple[str, ...]:
        return tuple(r for r in self.served_routes if r not in EXIT_ROUTES)

    @property
    def exit_node(self) -> bool:
        """Advertises and is approved for both default routes."""
        served = self.served_routes
        return all(r in served for r in EXIT_ROUTES)


EXIT_ROUTES = ("0.0.0.0/0", "::/0")


@dataclass
class State:
    users: dict[int, User] = field(default_factory=dict)
    keys: dict[int, AuthKey] = field(default_factory=dict)
    nodes: dict[int, Node] = field(default_factory=dict)
    by_machine: dict[str, int] = field(default_factory=dict)
    by_node_key: dict[str, int] = field(default_factory=dict)
    by_given_name: dict[str, int] = field(default_factory=dict)
    by_identity: dict[tuple[str, str], int] = field(default_factory=dict)  # (issuer, subject) -> user id
    keys_by_prefix: dict[str, int] = field(default_factory=dict)
    used_ipv4: set[str] = field(default_factory=set)
    next_user_id: int = 1
    next_key_id: int = 1
    next_node_id: int = 1
    # Where IP allocation resumes its search, so joins stay O(1) as the tailnet grows.
    last_ipv4: str = ""
    policy_text: str | None = None
    policy_sha256: str | None = None
    # MagicDNS (coord/dns.py): the settings in force, the config's [dns] table last seeded, the watched file's
    # records, and how many DNS events were folded (0: none, the defaults; keys the netmap's DNSConfig cache).
    dns: dnsmod.DnsSettings = dnsmod.DEFAULT
    dns_seed: dnsmod.DnsSettings = dnsmod.DEFAULT
    dns_file_records: tuple[tuple[str, str, str], ...] = ()
    dns_version: int = 0
    # hub node id -> the ids of the plain-WireGuard devices it carries (Node.via), sorted; kept by the fold.
    hubs: dict[int, tuple[int, ...]] = field(default_factory=dict)
    # The base domain an admin set at run time (DNSBaseDomainSet); "" = the server config's base_domain.
    base_domain: str = ""
    # API access tokens and OAuth clients (coord/apiv2/creds.py), by id: plain JSON values (kind, prefix,
    # user_id, description, created, expires, scopes, tags, revoked). Never a secret nor a hash of one.
    credentials: dict[str, dict[str, Any]] = field(default_factory=dict)
    # Webhook endpoints (coord/webhooks.py): id -> (url, Tailscale event types). Their secrets are not here.
    webhooks: dict[str, tuple[str, tuple[str, ...]]] = field(default_factory=dict)
    last_seq: int = 0
    last_hash: str = ev.GENESIS
    # The time of event last_seq: the next event's time is never earlier (see Service._append).
    last_time: str = ""

    def user_by_name(self, name: str) -> User | None:
        for u in self.users.values():
            if u.name == name:
                return u
        return None


def _touch(node: Node) -> None:
    node.version += 1


def _elect(state: State, prefixes: set[str]) -> set[int]:
    """One primary router per subnet prefix among the online, active nodes serving it. Stable: the current primary
    keeps the prefix while it can serve it; otherwise the lowest node id takes it; with none online, nobody has it.
    Returns the nodes whose ``primary_routes`` changed (their peer record changed). Only the event's node can add
    or remove a candidate, so callers pass the prefixes that node serves or is primary for."""
    changed: set[int] = set()
    for p in sorted(prefixes):
        if p in EXIT_ROUTES:
            continue
        holders = [n for n in state.nodes.values() if p in n.primary_routes]
        ok = [n for n in state.nodes.values() if n.online and n.active and p in n.subnet_routes]
        ok_ids = {n.id for n in ok}
        keep = next((n for n in holders if n.id in ok_ids), None)
        new = keep or min(ok, key=lambda n: n.id, default=None)
        for n in holders:
            if new is None or n.id != new.id:
                n.primary_routes = tuple(r for r in n.primary_routes if r != p)
                _touch(n)
                changed.add(n.id)
        if new is not None and p not in new.primary_routes:
            new.primary_routes = tuple(sorted((*new.primary_routes, p)))
            _touch(new)
            changed.add(new.id)
    return changed


def _routing(state: State, n: Node, change: Change) -> Change:
    """Re-run the election for the prefixes ``n`` serves or holds; routers whose primaries moved are re-sent."""
    if n.primary_routes or (n.routes and n.approved_routes):
        moved = _elect(state, set(n.subnet_routes) | set(n.primary_routes))
        change.peers |= moved
        change.self_nodes |= moved
    return change


def devices_of(state: State, hub_id: int) -> list[Node]:
    """The plain-WireGuard devices a hub carries, by id."""
    return [state.nodes[d] for d in state.hubs.get(hub_id, ()) if d in state.nodes]


def _hub_changed(state: State, n: Node, change: Change) -> Change:
    """A device came or went: its hub's record (AllowedIPs), peers and filter change with it."""
    if n.via is None:
        return change
    ids = set(state.hubs.get(n.via, ()))
    ids = ids | {n.id} if n.id in state.nodes else ids - {n.id}
    if ids:
        state.hubs[n.via] = tuple(sorted(ids))
    else:
        state.hubs.pop(n.via, None)
    hub = state.nodes.get(n.via)
    if hub is not None:
        _touch(hub)
        change.peers.add(hub.id)
        change.self_nodes.add(hub.id)
        change.visibility.add(hub.id)
    return change


def apply(state: State, event: ev.Event, ts: float) -> Change:
    match event:
        case ev.UserCreated(user_id=uid, name=name):
            state.users[uid] = User(uid, name, ts)
            state.next_user_id = max(state.next_user_id, uid + 1)
            return Change()
        case ev.UserRenamed(user_id=uid, name=name):
            state.users[uid].name = name
            return Change()
        case ev.UserDeleted(user_id=uid):
            u = state.users.pop(uid)
            state.by_identity.pop((u.issuer, u.subject), None)
            return Change()
        case ev.UserClaimsUpdated(user_id=uid):
            u = state.users[uid]
            state.by_identity.pop((u.issuer, u.subject), None)
            u.issuer, u.subject, u.email = event.issuer, event.subject, event.email
            u.email_verified, u.display_name = event.email_verified, event.display_name
            u.idp_groups, u.groups = tuple(event.idp_groups), tuple(event.groups)
            state.by_identity[(u.issuer, u.subject)] = uid
            # Group membership reaches netmaps through the policy engine (coord.access observes this event).
            return Change()
        case ev.UserSignedIn(user_id=uid):
            state.users[uid].last_sign_in = ts
            return Change()
        case ev.SignInRefused():
            return Change()
        case ev.UserRoleSet(user_id=uid, role=role):
            state.users[uid].role = role
            return Change(policy=True)
        case ev.CredentialCreated():
            state.credentials[event.credential_id] = {
                "kind": event.kind, "prefix": event.prefix, "user_id": event.user_id,
                "description": event.description, "created": ts, "expires": event.expires,
                "scopes": list(event.scopes), "tags": list(event.tags), "revoked": None,
            }
            return Change()
        case ev.CredentialRevoked(credential_id=cid):
            state.credentials[cid]["revoked"] = ts
            return Change()
        case ev.AuthKeyCreated():
            k = AuthKey(
                event.key_id, event.prefix, event.hash, event.user_id, event.reusable, event.ephemeral,
                event.expiration, tuple(event.tags), ts,
            )
            state.keys[k.id] = k
            state.keys_by_prefix[k.prefix] = k.id
            state.next_key_id = max(state.next_key_id, k.id + 1)
            return Change()
        case ev.AuthKeyRevoked(key_id=kid):
            state.keys[kid].revoked = True
            return Change()
        case ev.NodeRegistered():
            n = Node(
                id=event.node_id, machine_key=event.machine_key, node_key=event.node_key,
                disco_key=event.disco_key, user_id=event.user_id, tags=tuple(event.tags),
                hostname=event.hostname, given_name=event.given_name, ipv4=event.ipv4, ipv6=event.ipv6,
                ephemeral=event.ephemeral, key_expiry=event.key_expiry, created=ts,
                auth_key_id=event.auth_key_id, routes=tuple(event.routes), via=event.via,
            )
            state.nodes[n.id] = n
            state.by_machine[n.machine_key] = n.id
            state.by_node_key[n.node_key] = n.id
            state.by_given_name[n.given_name] = n.id
            state.used_ipv4.add(n.ipv4)
            state.last_ipv4 = n.ipv4
            state.next_node_id = max(state.next_node_id, n.id + 1)
            if event.auth_key_id is not None:
                state.keys[event.auth_key_id].used_by.append(n.id)
            out = Change(peers={n.id}, self_nodes={n.id}, visibility={n.id})
            return _hub_changed(state, n, out)
        case ev.NodeReauthenticated():
            n = state.nodes[event.node_id]
            state.by_node_key.pop(n.node_key, None)
            n.node_key = event.node_key
            state.by_node_key[n.node_key] = n.id
            n.user_id, n.tags, n.key_expiry = event.user_id, tuple(event.tags), event.key_expiry
            n.expired = n.logged_out = False
            if event.auth_key_id is not None:
                n.auth_key_id = event.auth_key_id
                state.keys[event.auth_key_id].used_by.append(n.id)
            _touch(n)
            return _routing(state, n, Change(peers={n.id}, self_nodes={n.id}, visibility={n.id}, close={n.id}))
        case ev.NodeRenamed(node_id=nid, given_name=name, by_admin=by_admin):
            n = state.nodes[nid]
            state.by_given_name.pop(n.given_name, None)
            n.given_name = name
            n.name_by_admin = n.name_by_admin or by_admin
            state.by_given_name[name] = nid
            _touch(n)
            return Change(peers={nid}, self_nodes={nid})
        case ev.NodeHostinfoChanged(node_id=nid):
            n = state.nodes[nid]
            old = n.served_routes
            n.hostname, n.os, n.routes = event.hostname, event.os, tuple(event.routes)
            _touch(n)
            out = Change(peers={nid}, self_nodes={nid})
            # Served routes reach filters and peer sets (the policy engine); re-elect for the old ones too.
            if old != n.served_routes:
                out.visibility.add(nid)
            return _routing(state, n, out)
        case ev.NodeRoutesApproved(node_id=nid, routes=routes):
            n = state.nodes[nid]
            n.approved_routes = tuple(routes)
            _touch(n)
            return _routing(state, n, Change(peers={nid}, self_nodes={nid}, visibility={nid}))
        case ev.NodeTagged(node_id=nid, tags=tags):
            n = state.nodes[nid]
            n.tags = tuple(tags)
            if n.tags:
                n.key_expiry = None
            _touch(n)
            return Change(peers={nid}, self_nodes={nid}, visibility={nid})
        case ev.NodeKeyExpirySet(node_id=nid, key_expiry=exp):
            n = state.nodes[nid]
            n.key_expiry = exp
            _touch(n)
            return Change(peers={nid}, self_nodes={nid})
        case ev.NodeExpired(node_id=nid):
            n = state.nodes[nid]
            n.expired = True
            _touch(n)
            return _routing(state, n, Change(removed={nid}, self_nodes={nid}, visibility={nid}))
        case ev.NodeKeyExpiringSoon(node_id=nid, key_expiry=expiry):
            state.nodes[nid].warned_expiry = expiry
            return Change()
        case ev.NodeLoggedOut(node_id=nid):
            n = state.nodes[nid]
            n.logged_out = True
            n.online = False
            _touch(n)
            return _routing(state, n, Change(removed={nid}, close={nid}))
        case ev.NodeDeleted(node_id=nid):
            n = state.nodes.pop(nid)
            state.by_machine.pop(n.machine_key, None)
            state.by_node_key.pop(n.node_key, None)
            if state.by_given_name.get(n.given_name) == nid:
                del state.by_given_name[n.given_name]
            state.used_ipv4.discard(n.ipv4)
            out = _hub_changed(state, n, Change(removed={nid}, close={nid}))
            if n.primary_routes:
                moved = _elect(state, set(n.primary_routes))
                out.peers |= moved
                out.self_nodes |= moved
            return out
        case ev.NodeEndpointsChanged(node_id=nid):
            n = state.nodes[nid]
            n.endpoints, n.endpoint_types = tuple(event.endpoints), tuple(event.endpoint_types)
            n.home_derp = event.home_derp
            _touch(n)
            return Change(patches={nid}, self_nodes={nid})
        case ev.NodeDiscoKeyChanged(node_id=nid, disco_key=dk):
            n = state.nodes[nid]
            n.disco_key = dk
            _touch(n)
            return Change(patches={nid}, self_nodes={nid})
        case ev.NodeConnected(node_id=nid):
            n = state.nodes[nid]
            n.online, n.last_seen = True, ts
            _touch(n)
            return _routing(state, n, Change(patches={nid}))
        case ev.NodeDisconnected(node_id=nid):
            n = state.nodes[nid]
            n.online, n.last_seen = False, ts
            _touch(n)
            return _routing(state, n, Change(patches={nid}))
        case ev.PolicySet(text=text, sha256=sha):
            state.policy_text, state.policy_sha256 = (text or None), (sha or None)
            return Change(policy=True)
        case ev.DNSConfigSeeded():
            seed = dnsmod.DnsSettings(
                event.magic_dns, tuple(event.nameservers), dnsmod.split_from(event.split), tuple(event.search_domains),
                event.override_local_dns, dnsmod.records_from(event.extra_records),
            )
            state.dns = dnsmod.seeded(state.dns, state.dns_seed, seed)
            state.dns_seed = seed
            return _dns_changed(state)
        case ev.DNSSettingsSet():
            state.dns = replace(
                state.dns, magic_dns=event.magic_dns, nameservers=tuple(event.nameservers),
                split=dnsmod.split_from(event.split), search_domains=tuple(event.search_domains),
                override_local_dns=event.override_local_dns,
            )
            return _dns_changed(state)
        case ev.DNSBaseDomainSet(domain=domain):
            state.base_domain = domain
            # Every name changes: each node's own record and every record it holds of its peers.
            for n in state.nodes.values():
                _touch(n)
            everyone = set(state.nodes)
            state.dns_version += 1
            return Change(peers=everyone, self_nodes=everyone, dns=True)
        case ev.DNSRecordAdded(name=name, record_type=kind, value=value):
            if (name, kind, value) not in state.dns.extra_records:
                state.dns = replace(state.dns, extra_records=(*state.dns.extra_records, (name, kind, value)))
            return _dns_changed(state)
        case ev.DNSRecordRemoved(name=name, record_type=kind, value=value):
            kept = tuple(r for r in state.dns.extra_records if r != (name, kind, value))
            state.dns = replace(state.dns, extra_records=kept)
            return _dns_changed(state)
        case ev.DNSRecordsFileLoaded(records=recs):
            state.dns_file_records = dnsmod.records_from(recs)
            return _dns_changed(state)
        case ev.WebhookEndpointAdded(endpoint_id=eid, url=url, event_types=types):
            state.webhooks[eid] = (url, tuple(types))
            return Change()
        case ev.WebhookEndpointRemoved(endpoint_id=eid):
            state.webhooks.pop(eid, None)
            return Change()
        case ev.WebhookEndpointUpdated(endpoint_id=eid, event_types=types):
            if eid in state.webhooks:
                state.webhooks[eid] = (state.webhooks[eid][0], tuple(types))
            return Change()
    raise ev.BadEvent(f"no fold for {type(event).__name__}")


def _dns_changed(state: State) -> Change:
    state.dns_version += 1
    return Change(dns=True)


def fold(records: list[ev.Record], state: State | None = None) -> State:
    st = state or State()
    for r in records:
        apply(st, r.event, r.ts)
        st.last_seq, st.last_hash, st.last_time = r.seq, r.hash, r.time
    return st
