"""Commands decided on the current state: pure ``(state, command args, now) -> list[Event]`` or a DomainError.

Nothing here writes; the service appends what these return and folds it. Randomness (auth key secrets) and the
clock are passed in by the caller.
"""

from __future__ import annotations

import hashlib
import hmac
import ipaddress
from collections.abc import Callable, Iterable
from dataclasses import dataclass, replace
from typing import Any

from coord import dns, names
from coord import events as ev
from coord.auth.claims import Profile, Refused
from coord.errors import Conflict, DomainError, NotFound, Unauthorized
from coord.ipam import Pool, PoolExhausted
from coord.state import EXIT_ROUTES, AuthKey, KeyStatus, Node, State, User
from coord.wire import RegisterRequest, key_text

# A policy decides who may apply which tag; without one, only admin-made keys and commands can tag.
TagCheck = Callable[[User | None, str], bool]


def no_tag_owners(user: User | None, tag: str) -> bool:
    return False


@dataclass(frozen=True)
class Rules:
    pool: Pool
    key_expiry: float | None  # seconds; None = node keys never expire
    tag_allowed: TagCheck = no_tag_owners


# --- users ------------------------------------------------------------------------------------------------


def find_user(state: State, ref: str) -> User:
    if ref.isdigit() and int(ref) in state.users:
        return state.users[int(ref)]
    u = state.user_by_name(ref)
    if u is None:
        raise NotFound(f"no user {ref!r}")
    return u


def create_user(state: State, name: str) -> list[ev.Event]:
    if not names.valid_user_name(name):
        raise DomainError(
            f"user name {name!r} is not valid: 1-64 characters from letters, digits and . _ @ + -, "
            "starting with a letter or digit"
        )
    if state.user_by_name(name):
        raise Conflict(f"user {name!r} already exists")
    return [ev.UserCreated(state.next_user_id, name)]


def rename_user(state: State, ref: str, new_name: str) -> list[ev.Event]:
    u = find_user(state, ref)
    if not names.valid_user_name(new_name):
        raise DomainError(f"user name {new_name!r} is not valid")
    if state.user_by_name(new_name):
        raise Conflict(f"user {new_name!r} already exists")
    return [ev.UserRenamed(u.id, new_name)]


def delete_user(state: State, ref: str) -> list[ev.Event]:
    u = find_user(state, ref)
    owned = [n.id for n in state.nodes.values() if n.user_id == u.id and not n.tags]
    if owned:
        raise Conflict(f"user {u.name!r} still owns nodes {owned}; delete them first")
    out: list[ev.Event] = [
        ev.AuthKeyRevoked(k.id) for k in state.keys.values() if k.user_id == u.id and not k.revoked
    ]
    out.append(ev.UserDeleted(u.id))
    return out


ROLES = ("owner", "admin", "network-admin", "it-admin", "billing-admin", "auditor", "member")


def set_role(state: State, ref: str, role: str) -> list[ev.Event]:
    u = find_user(state, ref)
    if role not in ROLES:
        raise DomainError(f"role {role!r} is not one of {', '.join(ROLES)}")
    return [] if u.role == role else [ev.UserRoleSet(u.id, role)]


def create_credential(
    state: State, *, credential_id: str, kind: str, user_id: int, description: str, expires: float | None,
    scopes: tuple[str, ...], tags: tuple[str, ...],
) -> list[ev.Event]:
    if user_id not in state.users:
        raise NotFound(f"no user {user_id}")
    if credential_id in state.credentials:
        raise Conflict("credential id collision; try again")
    for t in tags:
        if not names.valid_tag(t):
            raise DomainError(f"tags: {t!r} is not valid: expected tag:<name>")
    return [ev.CredentialCreated(credential_id, kind, credential_id, user_id, description, expires, scopes, tags)]


def revoke_credential(state: State, credential_id: str) -> list[ev.Event]:
    c = state.credentials.get(credential_id)
    if c is None:
        raise NotFound(f"no key {credential_id!r}")
    return [] if c["revoked"] is not None else [ev.CredentialRevoked(credential_id)]


# --- auth keys --------------------------------------------------------------------------------------------


def create_key(
    state: State,
    user_ref: str,
    *,
    prefix: str,
    secret_hash: str,
    reusable: bool,
    ephemeral: bool,
    expiration: float | None,
    tags: tuple[str, ...],
) -> list[ev.Event]:
    u = find_user(state, user_ref)
    for t in tags:
        if not names.valid_tag(t):
            raise DomainError(f"tag {t!r} is not valid: expected tag:<name>")
    if prefix in state.keys_by_prefix:
        raise Conflict("auth key prefix collision; try again")
    return [
        ev.AuthKeyCreated(state.next_key_id, prefix, secret_hash, u.id, reusable, ephemeral, expiration, tags)
    ]


def find_key(state: State, ref: str) -> AuthKey:
    kid = state.keys_by_prefix.get(ref)
    if kid is None and ref.isdigit():
        kid = int(ref)
    if kid is None or kid not in state.keys:
        raise NotFound(f"no auth key {ref!r}")
    return state.keys[kid]


def revoke_key(state: State, ref: str) -> list[ev.Event]:
    k = find_key(state, ref)
    if k.revoked:
        raise Conflict(f"auth key {k.prefix} is already revoked")
    return [ev.AuthKeyRevoked(k.id)]


def check_auth_key(state: State, prefix: str, secret_hash: str, now: float) -> AuthKey:
    """The key a node presented, if it may be used now. The reason is given only to holders of the secret."""
    kid = state.keys_by_prefix.get(prefix)
    k = state.keys.get(kid) if kid is not None else None
    if k is None or not hmac.compare_digest(k.hash, secret_hash):
        raise Unauthorized("invalid auth key")
    status = k.status(now)
    if status is not KeyStatus.USABLE:
        raise Unauthorized(_KEY_REFUSED[status])
    return k


_KEY_REFUSED = {
    KeyStatus.REVOKED: "auth key has been revoked",
    KeyStatus.EXPIRED: "auth key has expired",
    KeyStatus.USED: "auth key has already been used",
}


def key_usable(k: AuthKey, now: float) -> bool:
    return k.status(now) is KeyStatus.USABLE


# --- nodes ------------------------------------------------------------------------------------------------


def find_node(state: State, ref: str) -> Node:
    if ref.isdigit() and int(ref) in state.nodes:
        return state.nodes[int(ref)]
    nid = state.by_given_name.get(ref)
    if nid is None:
        raise NotFound(f"no node {ref!r}")
    return state.nodes[nid]


@dataclass(frozen=True)
class Owner:
    user: User
    tags: tuple[str, ...]
    ephemeral: bool
    key_id: int | None


def owner_from_key(state: State, k: AuthKey) -> Owner:
    return Owner(state.users[k.user_id], k.tags, k.ephemeral, k.id)


def _requested_tags(req: RegisterRequest, owner: Owner, rules: Rules) -> tuple[str, ...]:
    if owner.tags:
        return owner.tags
    tags = tuple(sorted(set(req.hostinfo.request_tags)))
    for t in tags:
        if not names.valid_tag(t):
            raise DomainError(f"requested tag {t!r} is not valid: expected tag:<name>")
        if not rules.tag_allowed(owner.user, t):
            raise Unauthorized(f"user {owner.user.name!r} may not apply {t} (see tagOwners in the policy)")
    return tags


def _expiry(tags: tuple[str, ...], rules: Rules, now: float) -> float | None:
    if tags or rules.key_expiry is None:
        return None
    return now + rules.key_expiry


def register(
    state: State, machine_key: bytes, req: RegisterRequest, owner: Owner, rules: Rules, now: float
) -> list[ev.Event]:
    """Admit a node whose owner is known (from an auth key or an admin's approval)."""
    mkey = key_text("mkey", machine_key)
    nkey = key_text("nodekey", req.node_key)
    tags = _requested_tags(req, owner, rules)
    expiry = _expiry(tags, rules, now)
    other = state.by_node_key.get(nkey)
    existing_id = state.by_machine.get(mkey)
    if other is not None and other != existing_id:
        raise Conflict("node key is in use by another machine")
    if existing_id is not None:
        return [ev.NodeReauthenticated(existing_id, nkey, owner.user.id, tags, expiry, owner.key_id)]
    hint = rules.pool.index_of(state.last_ipv4) + 1 if state.last_ipv4 else 1
    try:
        _, v4, v6 = rules.pool.allocate(state.used_ipv4, hint)
    except PoolExhausted as e:
        raise DomainError(str(e)) from None
    label = names.unique_label(names.sanitize_hostname(req.hostinfo.hostname), state.by_given_name)
    disco = key_text("discokey", req.disco_key) if req.disco_key else ""
    return [
        ev.NodeRegistered(
            node_id=state.next_node_id, machine_key=mkey, node_key=nkey, disco_key=disco, user_id=owner.user.id,
            tags=tags, hostname=req.hostinfo.hostname[:256], given_name=label, ipv4=v4, ipv6=v6,
            ephemeral=owner.ephemeral or req.ephemeral, key_expiry=expiry, auth_key_id=owner.key_id,
            routes=req.hostinfo.routable_ips,
        )
    ]


def already_authorized(state: State, machine_key: bytes, req: RegisterRequest, now: float) -> Node | None:
    """The node, when this request needs no new authorisation (same key, or a rotation from the current key)."""
    nid = state.by_machine.get(key_text("mkey", machine_key))
    if nid is None:
        return None
    n = state.nodes[nid]
    if n.logged_out or n.expired or (n.key_expiry is not None and now >= n.key_expiry):
        return None
    nkey = key_text("nodekey", req.node_key)
    if n.node_key == nkey:
        return n
    if req.old_node_key and key_text("nodekey", req.old_node_key) == n.node_key:
        return n
    return None


def rotate_key(state: State, node: Node, req: RegisterRequest, rules: Rules, now: float) -> list[ev.Event]:
    nkey = key_text("nodekey", req.node_key)
    if nkey == node.node_key:
        return []
    if nkey in state.by_node_key:
        raise Conflict("node key is in use by another machine")
    return [ev.NodeReauthenticated(node.id, nkey, node.user_id, node.tags, _expiry(node.tags, rules, now), None)]


def logout(state: State, machine_key: bytes) -> list[ev.Event]:
    nid = state.by_machine.get(key_text("mkey", machine_key))
    if nid is None:
        raise Unauthorized("unknown machine")
    n = state.nodes[nid]
    if n.ephemeral:
        return deleted(state, nid, "ephemeral node logged out")
    if n.logged_out:
        return []
    return [ev.NodeLoggedOut(nid)]


def rename_node(state: State, ref: str, new_name: str) -> list[ev.Event]:
    n = find_node(state, ref)
    if not names.valid_label(new_name):
        raise DomainError(f"{new_name!r} is not a valid DNS label: a-z, 0-9 and -, at most 63 characters")
    holder = state.by_given_name.get(new_name)
    if holder is not None and holder != n.id:
        raise Conflict(f"name {new_name!r} is taken by node {holder}")
    return [ev.NodeRenamed(n.id, new_name, True)]


def tag_node(state: State, ref: str, tags: tuple[str, ...]) -> list[ev.Event]:
    n = find_node(state, ref)
    for t in tags:
        if not names.valid_tag(t):
            raise DomainError(f"tag {t!r} is not valid: expected tag:<name>")
    if not tags and n.user_id is None:
        raise DomainError("a node without a user cannot drop all its tags; re-register it to a user")
    return [ev.NodeTagged(n.id, tuple(sorted(set(tags))))]


# --- routes -----------------------------------------------------------------------------------------------

# May this node's advertised route be approved automatically (the policy's autoApprovers)?
RouteCheck = Callable[[Node, str], bool]


def _prefixes(routes: tuple[str, ...]) -> list[str]:
    out = []
    for r in routes:
        try:
            net = ipaddress.ip_network(r, strict=True)
        except ValueError:
            raise DomainError(f"{r!r} is not a masked CIDR prefix (e.g. 198.51.100.0/24)") from None
        out.append(str(net))
    # The two default routes go together (an exit node), as when advertised.
    if any(r in EXIT_ROUTES for r in out):
        out += [r for r in EXIT_ROUTES if r not in out]
    return out


def approve_routes(state: State, ref: str, routes: tuple[str, ...]) -> list[ev.Event]:
    n = find_node(state, ref)
    if not routes:
        raise DomainError("name at least one route to approve")
    want = tuple(sorted(set(n.approved_routes) | set(_prefixes(routes))))
    return [] if want == tuple(sorted(n.approved_routes)) else [ev.NodeRoutesApproved(n.id, want)]


def unapprove_routes(state: State, ref: str, routes: tuple[str, ...]) -> list[ev.Event]:
    n = find_node(state, ref)
    if not routes:
        raise DomainError("name at least one route to unapprove")
    drop = set(_prefixes(routes))
    want = tuple(sorted(r for r in n.approved_routes if r not in drop))
    return [] if want == tuple(sorted(n.approved_routes)) else [ev.NodeRoutesApproved(n.id, want)]


def auto_approve(state: State, node_ids: Iterable[int], allowed: RouteCheck) -> list[ev.Event]:
    """Approvals the policy grants to advertised routes not yet approved. autoApprovers only ever add: an approval
    stays until an admin takes it back (as in Tailscale), and a route an admin unapproves is approved again the next
    time it is evaluated (advertisement, tags, policy) while the policy still grants it."""
    out: list[ev.Event] = []
    for nid in sorted(set(node_ids)):
        n = state.nodes.get(nid)
        if n is None or not n.routes:
            continue
        have = set(n.approved_routes)
        add = {r for r in n.routes if r not in have and allowed(n, r)}
        if add:
            out.append(ev.NodeRoutesApproved(nid, tuple(sorted(have | add))))
    return out


def expire_node(state: State, ref: str, now: float) -> list[ev.Event]:
    n = find_node(state, ref)
    if n.expired:
        raise Conflict(f"node {n.id} is already expired")
    return [ev.NodeExpired(n.id, now)]


def set_key_expiry(state: State, ref: str, expiry: float | None) -> list[ev.Event]:
    n = find_node(state, ref)
    return [ev.NodeKeyExpirySet(n.id, expiry)]


def add_wg_device(
    state: State, name: str, user_ref: str, via_ref: str, public_key: bytes, rules: Rules
) -> list[ev.Event]:
    """A plain-WireGuard device (a phone, a router) carried by the hub node ``via_ref``.

    Only the device's public key reaches the server (the CLI generated the pair and keeps the private half); it is
    also the device's machine key, so a device is found by either. The hub must be a live agent (not a device, not
    expired) that reports an endpoint the device can dial."""
    user = find_user(state, user_ref)
    hub = find_node(state, via_ref)
    if hub.via is not None:
        raise DomainError(f"node {hub.id} is a WireGuard device itself; a hub must run the agent")
    if not hub.active:
        raise Conflict(f"node {hub.id} is expired or logged out")
    if not hub.endpoints:
        raise Conflict(f"node {hub.id} has reported no endpoint yet: it must be online once to be a hub")
    nkey = key_text("nodekey", public_key)
    if nkey in state.by_node_key:
        raise Conflict("that public key is in use")
    if not names.valid_label(name):
        raise DomainError(f"device name {name!r} is not valid: a DNS label (letters, digits, -), 1-63 characters")
    if name in state.by_given_name:
        raise Conflict(f"a node is already named {name!r}")
    hint = rules.pool.index_of(state.last_ipv4) + 1 if state.last_ipv4 else 1
    try:
        _, v4, v6 = rules.pool.allocate(state.used_ipv4, hint)
    except PoolExhausted as e:
        raise DomainError(str(e)) from None
    return [
        ev.NodeRegistered(
            node_id=state.next_node_id, machine_key=key_text("mkey", public_key), node_key=nkey, disco_key="",
            user_id=user.id, tags=(), hostname=name, given_name=name, ipv4=v4, ipv6=v6, ephemeral=False,
            key_expiry=None, auth_key_id=None, via=hub.id,
        )
    ]


def delete_node(state: State, ref: str, reason: str = "deleted by admin") -> list[ev.Event]:
    n = find_node(state, ref)
    return deleted(state, n.id, reason)


def deleted(state: State, nid: int, reason: str) -> list[ev.Event]:
    """A node goes, and with it the plain-WireGuard devices it carries (nothing else could carry them)."""
    devices = [d.id for d in state.nodes.values() if d.via == nid]
    out: list[ev.Event] = [ev.NodeDeleted(nid, reason)]
    return out + [ev.NodeDeleted(d, f"its hub (node {nid}) was deleted") for d in devices]


def map_update(
    state: State,
    node: Node,
    *,
    disco_key: bytes | None,
    endpoints: tuple[str, ...] | None,
    endpoint_types: tuple[int, ...],
    home_derp: int | None,
    hostname: str | None,
    os: str | None,
    routes: tuple[str, ...] | None,
) -> list[ev.Event]:
    """What a map request reports that differs from what we have; heartbeats produce nothing."""
    out: list[ev.Event] = []
    if disco_key is not None:
        dk = key_text("discokey", disco_key)
        if dk != node.disco_key:
            out.append(ev.NodeDiscoKeyChanged(node.id, dk))
    eps = node.endpoints if endpoints is None else endpoints
    types = node.endpoint_types if endpoints is None else endpoint_types
    home = node.home_derp if home_derp is None else home_derp
    if (eps, types, home) != (node.endpoints, node.endpoint_types, node.home_derp):
        out.append(ev.NodeEndpointsChanged(node.id, eps, types, home))
    if hostname is not None:
        new = (hostname[:256], os or "", routes if routes is not None else node.routes)
        if new != (node.hostname, node.os, node.routes):
            out.append(ev.NodeHostinfoChanged(node.id, *new))
            if not node.name_by_admin and hostname:
                label = names.sanitize_hostname(hostname)
                if label != names.sanitize_hostname(node.hostname) and label != node.given_name:
                    out.append(ev.NodeRenamed(node.id, names.unique_label(label, _TakenByOthers(state, node.id)),
                                              False))
    return out


class _TakenByOthers:
    """The names held by nodes other than ``node_id``: a view, not a copy (a copy of 10,000 names per hostinfo
    change was most of the cost of one)."""

    def __init__(self, state: State, node_id: int) -> None:
        self.names, self.node_id = state.by_given_name, node_id

    def __contains__(self, name: object) -> bool:
        holder = self.names.get(name)  # type: ignore[call-overload]
        return holder is not None and holder != self.node_id


def expire_due(state: State, now: float) -> list[ev.Event]:
    return [
        ev.NodeExpired(n.id, now)
        for n in state.nodes.values()
        if not n.expired and n.key_expiry is not None and n.key_expiry <= now
    ]


EXPIRY_WARNING = 86400.0  # nodeKeyExpiringInOneDay


def expiring_soon(state: State, now: float, within: float = EXPIRY_WARNING) -> list[ev.Event]:
    """A NodeKeyExpiringSoon for each node key due within ``within`` seconds and not yet warned of (a new expiry,
    set by an admin or a re-authentication, is warned of again)."""
    return [
        ev.NodeKeyExpiringSoon(n.id, n.key_expiry)
        for n in state.nodes.values()
        if not n.expired and n.key_expiry is not None and now < n.key_expiry <= now + within
        and n.warned_expiry != n.key_expiry
    ]


# --- sign-in (OIDC) ---------------------------------------------------------------------------------------


def _claims_event(user_id: int, p: Profile) -> ev.UserClaimsUpdated:
    return ev.UserClaimsUpdated(
        user_id, p.identity.issuer, p.identity.subject, p.email, p.email_verified, p.display_name,
        tuple(p.idp_groups), tuple(p.groups),
    )


def sign_in_user(state: State, p: Profile) -> tuple[User, list[ev.Event]]:
    """The user a sign-in is for (found by issuer + subject, never by e-mail) and the events that create it or
    bring it up to date. Refused("name_taken") when the derived name belongs to another user."""
    ident = (p.identity.issuer, p.identity.subject)
    uid = state.by_identity.get(ident)
    named = state.user_by_name(p.name)
    taken = Refused(
        "name_taken",
        f"the user name {p.name} already belongs to another account on this server; ask an admin",
        p.identity,
    )
    out: list[ev.Event] = []
    if uid is None:
        if named is not None:
            raise taken
        user = User(state.next_user_id, p.name, 0.0)
        out.append(ev.UserCreated(user.id, p.name))
        out.append(_claims_event(user.id, p))
        return user, out
    user = state.users[uid]
    if user.name != p.name:
        if named is not None:
            raise taken
        out.append(ev.UserRenamed(uid, p.name))
    claims = _claims_event(uid, p)
    if claims != _claims_event(uid, _profile_of(user, p)):
        out.append(claims)
    return user, out


def _profile_of(u: User, like: Profile) -> Profile:
    return replace(like, email=u.email, email_verified=u.email_verified, display_name=u.display_name,
                   idp_groups=u.idp_groups, groups=u.groups)


def approve_sign_in(
    state: State, machine_key: bytes, req: RegisterRequest, p: Profile, rules: Rules, now: float
) -> list[ev.Event]:
    """A confirmed sign-in: the user created or updated from the claims, the machine registered (or
    re-authenticated) as that user, the key expiry taken from the ID token if configured, UserSignedIn."""
    user, out = sign_in_user(state, p)
    reg = register(state, machine_key, req, Owner(user, (), False, None), rules, now)
    out += reg
    e = reg[0]
    assert isinstance(e, (ev.NodeRegistered, ev.NodeReauthenticated))
    if p.expiry is not None and not e.tags:
        out.append(ev.NodeKeyExpirySet(e.node_id, p.expiry))
    out.append(ev.UserSignedIn(user.id, p.identity.issuer, p.identity.subject, e.node_id))
    return out


# --- DNS (coord/dns.py) -----------------------------------------------------------------------------------


def _dns_error(e: dns.DnsError) -> DomainError:
    return DomainError(str(e))


def _split_json(split: dns.Split) -> tuple[list[Any], ...]:
    return tuple([s, list(rs)] for s, rs in split)


def seed_dns(state: State, configured: dns.DnsSettings) -> list[ev.Event]:
    """The config's [dns] table at start: an event when it differs from the one the log last saw."""
    if configured == state.dns_seed:
        return []
    c = configured
    return [ev.DNSConfigSeeded(c.magic_dns, c.nameservers, _split_json(c.split), c.search_domains,
                               c.override_local_dns, tuple(list(r) for r in c.extra_records))]


def set_dns(
    state: State, base_domain: str, *, magic_dns: bool | None = None, nameservers: list[str] | None = None,
    split: dict[str, list[str]] | None = None, clear_split: bool = False, search_domains: list[str] | None = None,
    override_local_dns: bool | None = None, domain: str | None = None, config_domain: str = "", server_host: str = "",
) -> list[ev.Event]:
    """``dns set``: given fields replace the current ones; ``split`` sets each suffix's resolvers (an empty list
    removes the suffix), after ``clear_split`` dropped them all. ``domain`` replaces the base domain (now
    ``base_domain``; the config's is ``config_domain``), and the other settings are checked against the new one. No
    event when nothing changes."""
    cur = state.dns
    routes = {} if clear_split else dict(cur.split)
    out: list[ev.Event] = []
    try:
        if domain is not None:
            new_domain = dns.base_domain(domain.strip().lower().removesuffix("."), server_host, "base domain")
            if new_domain != base_domain:
                out.append(ev.DNSBaseDomainSet("" if new_domain == config_domain else new_domain))
                base_domain = new_domain
        for suffix, addrs in (split or {}).items():
            name = dns.dns_name(suffix, "split suffix")
            if addrs:
                routes[name] = tuple(addrs)
            elif name in routes:
                del routes[name]
            else:
                raise NotFound(f"split: no split DNS route for {name} to remove")
        new = dns.settings(
            magic_dns=cur.magic_dns if magic_dns is None else magic_dns,
            nameservers=cur.nameservers if nameservers is None else nameservers,
            split=routes,
            search_domains=cur.search_domains if search_domains is None else search_domains,
            override_local_dns=cur.override_local_dns if override_local_dns is None else override_local_dns,
            extra_records=cur.extra_records, base_domain=base_domain,
        )
    except dns.DnsError as e:
        raise _dns_error(e) from None
    if new != cur:
        out.append(ev.DNSSettingsSet(new.magic_dns, new.nameservers, _split_json(new.split), new.search_domains,
                                     new.override_local_dns))
    return out


def add_dns_record(state: State, name: str, kind: str, value: str) -> list[ev.Event]:
    try:
        rec = dns.record(name, kind, value)
    except dns.DnsError as e:
        raise _dns_error(e) from None
    if rec in state.dns.extra_records:
        raise Conflict(f"record {' '.join(rec)} exists already")
    if len(state.dns.extra_records) >= dns.MAX_RECORDS:
        raise DomainError(f"at most {dns.MAX_RECORDS} extra records")
    return [ev.DNSRecordAdded(*rec)]


def remove_dns_record(state: State, name: str, kind: str | None = None, value: str | None = None) -> list[ev.Event]:
    """Remove the records of ``name`` (of ``kind``, with ``value``, when given) an admin or the config added."""
    try:
        n = dns.dns_name(name, "record name")
        if value is not None:
            match: tuple[str, ...] = dns.record(n, kind, value)
        elif kind is not None:
            t = kind.strip().upper()
            if t not in dns.RECORD_TYPES:
                raise dns.DnsError(f"record {n}: type {kind!r} is not A or AAAA")
            match = (n, t)
        else:
            match = (n,)
    except dns.DnsError as e:
        raise _dns_error(e) from None
    gone = [r for r in state.dns.extra_records if r[: len(match)] == match]
    if not gone:
        in_file = [r for r in state.dns_file_records if r[: len(match)] == match]
        if in_file:
            raise Conflict(f"{' '.join(match)} comes from the extra records file; edit the file to remove it")
        raise NotFound(f"no extra record {' '.join(match)}")
    return [ev.DNSRecordRemoved(*r) for r in gone]


def load_dns_file(state: State, path: str, text: str) -> list[ev.Event]:
    """The watched records file's content: an event when its records differ from those the log holds."""
    try:
        recs = dns.parse_records_file(text, path)
    except dns.DnsError as e:
        raise _dns_error(e) from None
    if recs == state.dns_file_records:
        return []
    sha = hashlib.sha256(text.encode()).hexdigest()
    return [ev.DNSRecordsFileLoaded(path, sha, tuple(list(r) for r in recs))]
