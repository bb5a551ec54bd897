"""Admin commands as data: ``(command name, JSON args) -> JSON result``.

The CLI sends these to a running server over its admin socket, or runs them in-process against the database when
no server holds it. Both paths call the same ``Service`` methods, so there is one implementation of each command.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from typing import Any

from coord import access, decide, eventlog
from coord import events as ev
from coord.errors import DomainError
from coord.service import Service
from coord.state import State, fold

Handler = Callable[[Service, dict[str, Any]], Awaitable[Any]]


def _str(args: dict[str, Any], key: str) -> str:
    v = args.get(key)
    if not isinstance(v, str) or not v:
        raise DomainError(f"{key}: required")
    return v


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


async def _state_at(svc: Service, args: dict[str, Any]) -> State:
    at = args.get("at")
    if not at:
        return svc.state
    try:
        until = ev.rfc3339(ev.parse_time(str(at)))
    except ValueError:
        raise DomainError(f"--at: {at!r} is not a time (use RFC 3339, e.g. 2026-11-25T12:00:00Z)") from None
    records = [r async for r in eventlog.read(svc.conn, eventlog.Filter(until_time=until))]
    return fold(records)


async def users_list(svc: Service, args: dict[str, Any]) -> Any:
    st = await _state_at(svc, args)
    return [svc.user_json(u) for u in sorted(st.users.values(), key=lambda u: u.id)]


async def nodes_list(svc: Service, args: dict[str, Any]) -> Any:
    st = await _state_at(svc, args)
    users = {u.id: u.name for u in st.users.values()}
    out = []
    for n in sorted(st.nodes.values(), key=lambda n: n.id):
        d = n.summary()
        d["user"] = users.get(n.user_id) if n.user_id is not None else None
        out.append(d)
    return out


async def nodes_show(svc: Service, args: dict[str, Any]) -> Any:
    n = decide.find_node(svc.state, _str(args, "node"))
    d = n.summary()
    d["user"] = svc.state.users[n.user_id].name if n.user_id in svc.state.users else None
    d["online_session"] = n.id in svc.fanout.sessions
    return d


async def keys_list(svc: Service, args: dict[str, Any]) -> Any:
    return [svc.key_json(k) for k in sorted(svc.state.keys)]


COMMANDS: dict[str, Handler] = {
    "users.create": lambda s, a: s.create_user(_str(a, "name")),
    "users.list": users_list,
    "users.rename": lambda s, a: s.rename_user(_str(a, "user"), _str(a, "name")),
    "users.delete": lambda s, a: s.delete_user(_str(a, "user")),
    "keys.create": lambda s, a: s.create_key(
        _str(a, "user"), reusable=bool(a.get("reusable")), ephemeral=bool(a.get("ephemeral")),
        expiration=_opt_float(a, "expiration"), tags=_tags(a),
    ),
    "keys.list": keys_list,
    "keys.revoke": lambda s, a: s.revoke_key(_str(a, "key")),
    "nodes.list": nodes_list,
    "nodes.show": nodes_show,
    "nodes.rename": lambda s, a: s.rename_node(_str(a, "node"), _str(a, "name")),
    "nodes.tag": lambda s, a: s.tag_node(_str(a, "node"), _tags(a)),
    "nodes.expire": lambda s, a: s.expire_node(_str(a, "node")),
    "nodes.expiry": lambda s, a: s.set_node_expiry(_str(a, "node"), _opt_float(a, "expiry")),
    "nodes.delete": lambda s, a: s.delete_node(_str(a, "node")),
    "nodes.approve": lambda s, a: s.approve(_str(a, "id"), _str(a, "user")),
    "nodes.pending": lambda s, a: _pending(s),
    "policy.set": lambda s, a: s.set_policy(_str(a, "text"), str(a.get("filename") or "policy.hujson")),
    "policy.clear": lambda s, a: s.clear_policy(),
    "policy.get": lambda s, a: _value(s.get_policy()),
    "policy.history": lambda s, a: s.policy_history(),
    "policy.diff": lambda s, a: _value(s.diff_policy(_str(a, "text"), str(a.get("filename") or "policy.hujson"))),
    "policy.tailnet": lambda s, a: _value(access.tailnet(s.state)),
}

# Commands that only a running server can answer (its memory holds what they act on).
NEEDS_SERVER = {"nodes.approve", "nodes.pending"}


async def _value(v: Any) -> Any:
    return v


async def _pending(s: Service) -> Any:
    return s.pending_json()


async def run(svc: Service, command: str, args: dict[str, Any]) -> Any:
    handler = COMMANDS.get(command)
    if handler is None:
        raise DomainError(f"unknown admin command {command!r}")
    return await handler(svc, args)
