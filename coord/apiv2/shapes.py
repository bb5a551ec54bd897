"""Tailscale API v2 JSON shapes, sans-IO: request bodies in (``BadField`` names the field), state out.

Ids: a device's ``id`` is the node id as a string, its ``nodeId`` ``n<id>``; either is accepted in a path. An
auth key's id is its prefix; an API token's and an OAuth client's id is theirs (creds.py). A user's id is the user
id as a string. Times are RFC 3339 UTC.
"""

from __future__ import annotations

import json
from typing import Any

from coord import events as ev
from coord import views
from coord.state import AuthKey, Node, State, User

# Event types that are not configuration: node churn stays out of the configuration audit log.
NOT_CONFIG = frozenset({"NodeEndpointsChanged", "NodeDiscoKeyChanged", "NodeConnected", "NodeDisconnected",
                        "NodeHostinfoChanged"})
# Fields of events that never leave the server through the audit log (anything a secret is checked against).
REDACTED = frozenset({"hash"})


class BadField(ValueError):
    """A request body (or query) that is not what the endpoint takes; ``field`` names the culprit."""

    def __init__(self, field: str, message: str) -> None:
        super().__init__(f"{field}: {message}")
        self.field = field


def parse_json(body: bytes) -> dict[str, Any]:
    if not body.strip():
        return {}
    try:
        obj = json.loads(body)
    except (ValueError, UnicodeDecodeError) as e:
        raise BadField("body", f"not JSON ({e})") from None
    if not isinstance(obj, dict):
        raise BadField("body", "expected a JSON object")
    return obj


def get_bool(obj: dict[str, Any], key: str, *, required: bool = True) -> bool | None:
    v = obj.get(key)
    if v is None and not required:
        return None
    if not isinstance(v, bool):
        raise BadField(key, "expected true or false")
    return v


def get_str(obj: dict[str, Any], key: str, *, default: str | None = None, limit: int = 1024) -> str:
    v = obj.get(key, default)
    if not isinstance(v, str):
        raise BadField(key, "expected a string")
    if len(v) > limit:
        raise BadField(key, f"longer than {limit} characters")
    return v


def get_strs(obj: Any, key: str, *, default: list[str] | None = None, limit: int = 1000) -> list[str]:
    v = obj.get(key, default) if isinstance(obj, dict) else obj
    if not isinstance(v, list) or not all(isinstance(x, str) for x in v):
        raise BadField(key, "expected a list of strings")
    if len(v) > limit:
        raise BadField(key, f"more than {limit} entries")
    return v


def get_int(obj: dict[str, Any], key: str, *, default: int, low: int, high: int) -> int:
    v = obj.get(key, default)
    if isinstance(v, bool) or not isinstance(v, int):
        raise BadField(key, "expected an integer")
    if not low <= v <= high:
        raise BadField(key, f"expected {low} to {high}")
    return v


def get_obj(obj: dict[str, Any], key: str) -> dict[str, Any]:
    v = obj.get(key) or {}
    if not isinstance(v, dict):
        raise BadField(key, "expected an object")
    return v


def _t(ts: float | None) -> str | None:
    return None if ts is None else ev.rfc3339(ts)


# --- devices ----------------------------------------------------------------------------------------------


def device_ref(ref: str) -> str:
    """A path's device id (``123`` or ``n123``) as the node reference the commands take."""
    if ref.startswith("n") and ref[1:].isdigit():
        return ref[1:]
    if ref.isdigit():
        return ref
    raise BadField("deviceId", f"{ref!r} is not a device id")


def device(state: State, n: Node, domain: str, *, all_fields: bool) -> dict[str, Any]:
    u = state.users.get(n.user_id) if n.user_id is not None else None
    d: dict[str, Any] = {
        "addresses": [n.ipv4, n.ipv6],
        "id": str(n.id),
        "nodeId": f"n{n.id}",
        "user": u.name if u else "",
        "name": f"{n.given_name}.{domain}",
        "hostname": n.hostname,
        "clientVersion": "",
        "updateAvailable": False,
        "os": n.os,
        "created": _t(n.created),
        "lastSeen": _t(n.last_seen),
        "keyExpiryDisabled": n.key_expiry is None,
        "expires": _t(n.key_expiry),
        "authorized": True,
        "isExternal": False,
        "machineKey": n.machine_key,
        "nodeKey": n.node_key,
        "blocksIncomingConnections": False,
        "tags": list(n.tags),
        "isEphemeral": n.ephemeral,
        "connectedToControl": n.online,
    }
    if all_fields:
        d["advertisedRoutes"] = list(n.routes)
        d["enabledRoutes"] = list(n.approved_routes)
        d["clientConnectivity"] = {
            "endpoints": list(n.endpoints),
            "latency": {},
            "mappingVariesByDestIP": False,
            "clientSupports": {"hairPinning": None, "ipv6": False, "pcp": False, "pmp": False, "udp": True,
                               "upnp": False},
        }
    return d


def device_routes(n: Node) -> dict[str, Any]:
    return {"advertisedRoutes": list(n.routes), "enabledRoutes": list(n.approved_routes)}


# --- keys -------------------------------------------------------------------------------------------------


def auth_key(state: State, k: AuthKey, now: float) -> dict[str, Any]:
    return {
        "id": k.prefix,
        "keyType": "auth",
        "description": "",
        "created": _t(k.created),
        "expires": _t(k.expiration),
        "revoked": _t(k.created) if k.revoked else None,
        "invalid": k.status(now) != "usable",
        "userId": str(k.user_id),
        "capabilities": {"devices": {"create": {
            "reusable": k.reusable, "ephemeral": k.ephemeral, "preauthorized": True, "tags": list(k.tags),
        }}},
    }


credential = views.credential


# --- users ------------------------------------------------------------------------------------------------


def user(state: State, u: User) -> dict[str, Any]:
    nodes = [n for n in state.nodes.values() if n.user_id == u.id and not n.tags]
    seen = [n.last_seen for n in nodes if n.last_seen is not None]
    return {
        "id": str(u.id),
        "displayName": u.display_name or u.name,
        "loginName": u.name,
        "profilePicUrl": "",
        "tailnetId": "-",
        "created": _t(u.created),
        "type": "member",
        "role": u.role,
        "status": "active",
        "deviceCount": len(nodes),
        "lastSeen": _t(max(seen)) if seen else None,
        "currentlyConnected": any(n.online for n in nodes),
    }


# --- the configuration audit log --------------------------------------------------------------------------


def _action(type_name: str) -> str:
    for suffix, action in (("Created", "CREATE"), ("Registered", "CREATE"), ("Deleted", "DELETE"),
                           ("Revoked", "DELETE"), ("Removed", "DELETE")):
        if type_name.endswith(suffix):
            return action
    return "UPDATE"


def _target(type_name: str, data: dict[str, Any]) -> dict[str, Any]:
    for key, kind in (("node_id", "NODE"), ("user_id", "USER"), ("key_id", "AUTH_KEY"),
                      ("credential_id", "API_KEY")):
        if key in data:
            return {"id": str(data[key]), "type": kind, "property": type_name}
    if type_name.startswith("DNS"):
        return {"id": "-", "type": "TAILNET", "property": "DNS"}
    if type_name == "PolicySet":
        return {"id": "-", "type": "TAILNET", "property": "ACL"}
    return {"id": "-", "type": "TAILNET", "property": type_name}


def _actor(actor: str) -> dict[str, Any]:
    kind, _, ident = actor.partition(":")
    return {"id": actor, "type": {"api": "API_KEY", "node": "NODE", "machine": "MACHINE"}.get(kind, "USER"),
            "loginName": ident or actor, "displayName": actor}


def audit_entry(r: ev.Record) -> dict[str, Any]:
    data = {k: v for k, v in r.event.data().items() if k not in REDACTED}
    return {
        "eventGroupID": str(r.seq),
        "origin": "ADMIN_API" if r.actor.startswith("api:") else "SHOAL",
        "actor": _actor(r.actor),
        "type": "CONFIG",
        "target": _target(r.event.type, data),
        "action": _action(r.event.type),
        "new": data,
        "eventTime": r.time,
        "shoal": {"seq": r.seq, "type": r.event.type, "hash": r.hash},
    }


def webhook(view: dict[str, Any], created: tuple[str, str, str] | None) -> dict[str, Any]:
    """Tailscale's webhook object, from ``Webhooks``'s view of an endpoint; the secret is added only by the two
    calls that make one (create, rotate)."""
    at, by, changed = created or ("", "", "")
    return {"endpointId": view["id"], "endpointUrl": view["url"], "providerType": "",
            "creatorLoginName": by, "created": at, "lastModified": changed, "subscriptions": list(view["events"])}
