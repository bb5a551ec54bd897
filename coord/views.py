"""JSON shapes of the tailnet for the admin API and the CLI: pure functions of the state (and ``now``)."""

from __future__ import annotations

from typing import Any

from coord import decide, wire
from coord import events as ev
from coord.state import Node, NodeStatus, State, User


def user(u: User) -> dict[str, Any]:
    """``provider`` and ``subject`` are the user's identity at the IdP (empty for users an admin created);
    ``groups`` are policy groups from the IdP, ``idp_groups`` the IdP's own names for them."""
    return {
        "id": u.id, "name": u.name, "created": ev.rfc3339(u.created),
        "provider": u.issuer, "subject": u.subject, "email": u.email, "email_verified": u.email_verified,
        "display_name": u.display_name, "groups": list(u.groups), "idp_groups": list(u.idp_groups),
        "last_sign_in": None if u.last_sign_in is None else ev.rfc3339(u.last_sign_in),
        "role": u.role,
    }


def key(state: State, key_id: int, now: float) -> dict[str, Any]:
    k = state.keys[key_id]
    u = state.users.get(k.user_id)
    return {
        "id": k.id,
        "prefix": k.prefix,
        "user": u.name if u else k.user_id,
        "reusable": k.reusable,
        "ephemeral": k.ephemeral,
        "tags": list(k.tags),
        "created": ev.rfc3339(k.created),
        "expiration": None if k.expiration is None else ev.rfc3339(k.expiration),
        "revoked": k.revoked,
        "used_by": list(k.used_by),
        "usable": decide.key_usable(k, now),
    }


def credential(cred_id: str, c: dict[str, Any], now: float) -> dict[str, Any]:
    """An API access token or OAuth client as API v2 shows a key (never its secret nor a hash of it)."""
    expires, revoked = c["expires"], c["revoked"]
    return {
        "id": cred_id,
        "keyType": c["kind"],
        "description": c["description"],
        "created": ev.rfc3339(c["created"]),
        "expires": None if expires is None else ev.rfc3339(expires),
        "revoked": None if revoked is None else ev.rfc3339(revoked),
        "invalid": revoked is not None or (expires is not None and now >= expires),
        "userId": str(c["user_id"]),
        "scopes": list(c["scopes"]),
        "tags": list(c["tags"]),
    }


def node(n: Node) -> dict[str, Any]:
    return {
        "id": n.id,
        "name": n.given_name,
        "hostname": n.hostname,
        "user_id": n.user_id,
        "tags": list(n.tags),
        "ipv4": n.ipv4,
        "ipv6": n.ipv6,
        "machine_key": n.machine_key,
        "node_key": n.node_key,
        "ephemeral": n.ephemeral,
        "key_expiry": n.key_expiry,
        "expired": n.expired,
        "logged_out": n.logged_out,
        "online": n.online,
        "last_seen": n.last_seen,
        "endpoints": list(n.endpoints),
        "home_derp": n.home_derp,
        "created": n.created,
        "via": n.via,  # a plain-WireGuard device: the hub that carries it (docs/wg-devices.md)
    }


def routes(n: Node) -> dict[str, Any]:
    """A router's routes: advertised (offered), approved, served (both) and those it is primary for."""
    return {
        "id": n.id,
        "name": n.given_name,
        "online": n.online,
        "advertised": list(n.routes),
        "approved": list(n.approved_routes),
        "served": list(n.served_routes),
        "primary": list(n.primary_routes),
        "exit_node": n.exit_node,
    }


def node_with_user(state: State, n: Node) -> dict[str, Any]:
    d = node(n)
    u = state.users.get(n.user_id) if n.user_id is not None else None
    d["user"] = u.name if u is not None else None
    return d


def node_status(row: dict[str, Any]) -> NodeStatus:
    """The STATE column of ``nodes list``, from a node's JSON (as it comes back over the admin socket)."""
    if row["expired"]:
        return NodeStatus.EXPIRED
    return NodeStatus.LOGGED_OUT if row["logged_out"] else NodeStatus.ACTIVE


def pending(auth_id: str, machine_key: bytes, hostname: str, created: float) -> dict[str, Any]:
    return {
        "id": auth_id,
        "hostname": hostname,
        "machine_key": wire.key_text("mkey", machine_key),
        "requested": ev.rfc3339(created),
    }

