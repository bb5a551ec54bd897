"""Admin commands as data: ``(command name, JSON args) -> JSON result``.

The CLI sends these to a running server over its admin socket, or runs them in-process against the database when
no server holds it. Both paths get their ``Admin`` from ``create_app`` and call the same ``Service`` methods, so
there is one implementation of each command.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from coord import access, decide, views
from coord import events as ev
from coord.errors import DomainError
from coord.history import History
from coord.logins import Logins
from coord.service import Service
from coord.state import State

if TYPE_CHECKING:  # the CLI's socket path imports this module: it need not load the delivery engine
    from coord.delivery import Webhooks


@dataclass(frozen=True)
class Admin:
    """What admin commands act on."""

    service: Service
    logins: Logins
    has_session: Callable[[int], bool]
    info: Callable[[], dict[str, Any]]
    history: History | None = None
    webhooks: Webhooks | None = None
    replicas: Callable[[], Awaitable[dict[str, Any]]] | None = None


async def _replicas(x: Admin) -> dict[str, Any]:
    if x.replicas is None:
        raise DomainError("replicas: not available here")
    return await x.replicas()


Handler = Callable[[Admin, dict[str, Any]], Awaitable[Any]]


def _str(args: dict[str, Any], key: str) -> str:
    v = args.get(key)
    if not isinstance(v, str) or not v:
        raise DomainError(f"{key}: required")
    return v


def _key(args: dict[str, Any], key: str) -> bytes:
    raw = _str(args, key)
    try:
        b = bytes.fromhex(raw)
    except ValueError:
        b = b""
    if len(b) != 32:
        raise DomainError(f"{key}: expected 64 hex digits")
    return b


def _opt_float(args: dict[str, Any], key: str) -> float | None:
    v = args.get(key)
    if v is None:
        return None
    if isinstance(v, bool) or not isinstance(v, (int, float)):
        raise DomainError(f"{key}: expected a number of seconds")
    return float(v)


def _tags(args: dict[str, Any]) -> tuple[str, ...]:
    v = args.get("tags") or []
    if not isinstance(v, list) or not all(isinstance(t, str) for t in v):
        raise DomainError("tags: expected a list of tag:<name>")
    return tuple(v)


def _routes(args: dict[str, Any]) -> tuple[str, ...]:
    v = args.get("routes") or []
    if not isinstance(v, list) or not all(isinstance(r, str) for r in v):
        raise DomainError("routes: expected a list of CIDR prefixes")
    return tuple(v)


async def resolve_at(svc: Service, args: dict[str, Any]) -> int | None:
    """The seq a view of the past ends at: ``at_seq``, or the last event at or before the time ``at``; None: now."""
    at, at_seq = args.get("at"), args.get("at_seq")
    if at and at_seq is not None:
        raise DomainError("--at and --at-seq: give one of them")
    last = svc.state.last_seq
    if at_seq is not None:
        if isinstance(at_seq, bool) or not isinstance(at_seq, int) or at_seq < 0:
            raise DomainError(f"--at-seq: {at_seq!r} is not a sequence number (0 or more)")
        if at_seq > last:
            raise DomainError(f"--at-seq: no event {at_seq}: the log has {last}")
        return at_seq
    if not at:
        return None
    try:
        until = ev.rfc3339(ev.parse_time(str(at)))
    except ValueError:
        raise DomainError(f"--at: {at!r} is not a time (use RFC 3339, e.g. 2026-11-25T12:00:00Z)") from None
    # Event times never go back, so "everything up to this time" is a prefix of the log: up to this seq.
    return await svc.store.last_at(until)


async def _state_at(a: Admin, args: dict[str, Any]) -> State:
    seq = await resolve_at(a.service, args)
    if seq is None:
        return a.service.state
    if a.history is None:
        raise DomainError("views of the past need the server's snapshot history")
    return await a.history.state_at(seq)


async def users_list(a: Admin, args: dict[str, Any]) -> Any:
    st = await _state_at(a, args)
    return [views.user(u) for u in sorted(st.users.values(), key=lambda u: u.id)]


async def nodes_list(a: Admin, args: dict[str, Any]) -> Any:
    st = await _state_at(a, args)
    return [views.node_with_user(st, n) for n in sorted(st.nodes.values(), key=lambda n: n.id)]


async def nodes_show(a: Admin, args: dict[str, Any]) -> Any:
    st = a.service.state
    n = decide.find_node(st, _str(args, "node"))
    d = views.node_with_user(st, n)
    d["online_session"] = a.has_session(n.id)
    return d


async def keys_list(a: Admin, args: dict[str, Any]) -> Any:
    svc = a.service
    now = svc.clock()
    return [views.key(svc.state, k, now) for k in sorted(svc.state.keys)]


def _opt_bool(args: dict[str, Any], key: str) -> bool | None:
    v = args.get(key)
    if v is not None and not isinstance(v, bool):
        raise DomainError(f"{key}: expected true or false")
    return v


def _opt_strs(args: dict[str, Any], key: str) -> list[str] | None:
    v = args.get(key)
    if v is None:
        return None
    if not isinstance(v, list) or not all(isinstance(x, str) for x in v):
        raise DomainError(f"{key}: expected a list of strings")
    return [x for x in v if x]


def _opt_split(args: dict[str, Any]) -> dict[str, list[str]] | None:
    v = args.get("split")
    if v is None:
        return None
    if not isinstance(v, dict) or not all(
        isinstance(k, str) and isinstance(rs, list) and all(isinstance(r, str) for r in rs) for k, rs in v.items()
    ):
        raise DomainError("split: expected {suffix: [resolver, ...]}")
    return v


async def dns_set(a: Admin, args: dict[str, Any]) -> Any:
    return await a.service.set_dns(
        magic_dns=_opt_bool(args, "magic_dns"), nameservers=_opt_strs(args, "nameservers"),
        split=_opt_split(args), clear_split=bool(args.get("clear_split")),
        search_domains=_opt_strs(args, "search_domains"), override_local_dns=_opt_bool(args, "override_local_dns"),
        domain=_opt_str(args, "base_domain"),
    )


def _opt_str(args: dict[str, Any], key: str) -> str | None:
    v = args.get(key)
    if v is not None and not isinstance(v, str):
        raise DomainError(f"{key}: expected a string")
    return v or None


async def tokens_create(a: Admin, args: dict[str, Any]) -> Any:
    svc = a.service
    u = decide.find_user(svc.state, _str(args, "user"))
    lifetime = _opt_float(args, "expiry") or 90 * 86400.0
    cid, secret = await svc.create_credential("api", u.id, description=str(args.get("description") or ""),
                                              expires=svc.clock() + lifetime)
    return {"id": cid, "token": f"tskey-api-{cid}-{secret}", "user": u.name,
            "expires": ev.rfc3339(svc.clock() + lifetime)}


async def tokens_client(a: Admin, args: dict[str, Any]) -> Any:
    svc = a.service
    u = decide.find_user(svc.state, _str(args, "user"))
    scopes = tuple(_opt_strs(args, "scopes") or [])
    if not scopes:
        raise DomainError("scopes: an OAuth client needs at least one scope")
    cid, secret = await svc.create_credential("client", u.id, description=str(args.get("description") or ""),
                                              scopes=scopes, tags=_tags(args))
    return {"client_id": cid, "client_secret": f"tskey-client-{cid}-{secret}", "scopes": ",".join(scopes)}


async def tokens_list(a: Admin, args: dict[str, Any]) -> Any:
    svc = a.service
    return [views.credential(i, c, svc.clock()) for i, c in sorted(svc.state.credentials.items())]


def _hooks(a: Admin) -> Webhooks:
    if a.webhooks is None:
        raise DomainError("webhooks are not available on PostgreSQL yet (they keep their cursors and secrets in the "
                          "SQLite database; see docs/ha.md)")
    return a.webhooks


def _limit(args: dict[str, Any]) -> int:
    v = args.get("limit", 50)
    if isinstance(v, bool) or not isinstance(v, int) or v < 1:
        raise DomainError("limit: expected a positive number")
    return v


COMMANDS: dict[str, Handler] = {
    "users.create": lambda x, a: x.service.create_user(_str(a, "name")),
    "users.list": users_list,
    "users.rename": lambda x, a: x.service.rename_user(_str(a, "user"), _str(a, "name")),
    "users.delete": lambda x, a: x.service.delete_user(_str(a, "user")),
    "users.role": lambda x, a: x.service.set_role(_str(a, "user"), _str(a, "role")),
    "tokens.create": tokens_create,
    "tokens.client": tokens_client,
    "tokens.list": tokens_list,
    "tokens.revoke": lambda x, a: _revoked(x, _str(a, "id")),
    "keys.create": lambda x, a: x.service.create_key(
        _str(a, "user"), reusable=bool(a.get("reusable")), ephemeral=bool(a.get("ephemeral")),
        expiration=_opt_float(a, "expiration"), tags=_tags(a),
    ),
    "keys.list": keys_list,
    "keys.revoke": lambda x, a: x.service.revoke_key(_str(a, "key")),
    "nodes.list": nodes_list,
    "nodes.show": nodes_show,
    "nodes.rename": lambda x, a: x.service.rename_node(_str(a, "node"), _str(a, "name")),
    "nodes.tag": lambda x, a: x.service.tag_node(_str(a, "node"), _tags(a)),
    "nodes.expire": lambda x, a: x.service.expire_node(_str(a, "node")),
    "nodes.expiry": lambda x, a: x.service.set_node_expiry(_str(a, "node"), _opt_float(a, "expiry")),
    "nodes.delete": lambda x, a: x.service.delete_node(_str(a, "node")),
    "devices.add-wg": lambda x, a: x.service.add_wg_device(
        _str(a, "name"), _str(a, "user"), _str(a, "via"), _key(a, "public_key")
    ),
    "routes.list": lambda x, a: _value(x.service.list_routes()),
    "routes.approve": lambda x, a: x.service.approve_routes(_str(a, "node"), _routes(a)),
    "routes.unapprove": lambda x, a: x.service.unapprove_routes(_str(a, "node"), _routes(a)),
    "nodes.approve": lambda x, a: x.logins.approve(_str(a, "id"), _str(a, "user")),
    "nodes.pending": lambda x, a: _value(x.logins.pending_json()),
    "policy.set": lambda x, a: x.service.set_policy(_str(a, "text"), str(a.get("filename") or "policy.hujson")),
    "policy.clear": lambda x, a: x.service.clear_policy(),
    "policy.get": lambda x, a: _value(x.service.get_policy()),
    "policy.history": lambda x, a: x.service.policy_history(),
    "policy.diff": lambda x, a: _value(
        x.service.diff_policy(_str(a, "text"), str(a.get("filename") or "policy.hujson"))
    ),
    "policy.tailnet": lambda x, a: _value(access.tailnet(x.service.state)),
    "dns.get": lambda x, a: _value(x.service.get_dns()),
    "dns.set": dns_set,
    "dns.records.list": lambda x, a: _value(x.service.dns_records()),
    "dns.records.add": lambda x, a: x.service.add_dns_record(_str(a, "name"), _str(a, "type"), _str(a, "value")),
    "dns.records.remove": lambda x, a: x.service.remove_dns_record(
        _str(a, "name"), _opt_str(a, "type"), _opt_str(a, "value")
    ),
    "webhooks.list": lambda x, a: _hooks(x).endpoints(),
    "webhooks.add": lambda x, a: _hooks(x).add(_str(a, "url"), _opt_strs(a, "events") or []),
    "webhooks.remove": lambda x, a: _hooks(x).remove(_str(a, "endpoint")),
    "webhooks.test": lambda x, a: _hooks(x).test(_str(a, "endpoint")),
    "webhooks.rotate": lambda x, a: _hooks(x).rotate(_str(a, "endpoint")),
    "webhooks.update": lambda x, a: _hooks(x).update(_str(a, "endpoint"), _opt_strs(a, "events") or []),
    "webhooks.deliveries": lambda x, a: _hooks(x).deliveries(_opt_str(a, "endpoint"), _limit(a)),
    "info": lambda x, a: _value(x.info()),
    "replicas": lambda x, a: _replicas(x),
}

# Commands that only a running server can answer (its memory holds what they act on).
NEEDS_SERVER = {"nodes.approve", "nodes.pending"}


async def _revoked(a: Admin, cid: str) -> Any:
    await a.service.revoke_credential(cid)
    return views.credential(cid, a.service.state.credentials[cid], a.service.clock())


async def _value(v: Any) -> Any:
    return v


async def run(admin: Admin, command: str, args: dict[str, Any]) -> Any:
    handler = COMMANDS.get(command)
    if handler is None:
        raise DomainError(f"unknown admin command {command!r}")
    return await handler(admin, args)
