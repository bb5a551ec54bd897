"""One node's history, folded from its events (sans-IO): ``shoal-server nodes history N``.

``fold(node_id, records, since=None, until=None, now=...)`` takes the node's records in log order (every record
whose data names ``node_id``; others are ignored) and returns a ``NodeHistory``:

- ``intervals``: online and offline spans, from its registration on. Online starts at ``NodeConnected`` and ends
  at ``NodeDisconnected`` or ``NodeLoggedOut``; ``NodeDeleted`` ends the last span. The open span ends at
  ``until`` or ``now`` and is marked ``open``.
- ``changes``: what else happened to it, each with seq, time, actor and a short text: registered, key rotated
  (a re-registration with a new node key), re-authenticated, renamed, hostinfo, tags, routes approved, key expiry
  set, expired, logged out, deleted, disco key rotated, endpoints changed, home relay (DERP region) changed.

Paths between peers are chosen by the agents and are not in the log; what the log holds of them is the node's
reported endpoints and its home relay, which are here. With ``since``/``until`` (RFC 3339 text, compared as the
log's times are), intervals are clipped to the window and only changes inside it are kept; the fold still reads
everything before ``since`` to know the state at its start. Times are the log's RFC 3339 text; durations are
seconds. ``as_json()`` is the ``--json`` shape; ``text()`` the table.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import Any

from coord import events as ev


@dataclass(frozen=True)
class Interval:
    state: str  # "online" | "offline"
    start: str
    end: str
    open: bool  # still so at the end of the window (or now)

    def seconds(self) -> float:
        return max(0.0, ev.parse_time(self.end) - ev.parse_time(self.start))


@dataclass(frozen=True)
class ChangeEntry:
    seq: int
    time: str
    actor: str
    kind: str
    text: str
    data: dict[str, Any]


@dataclass
class NodeHistory:
    node_id: int
    name: str = ""
    registered: str | None = None
    deleted: str | None = None
    intervals: list[Interval] = field(default_factory=list)
    changes: list[ChangeEntry] = field(default_factory=list)

    def online_seconds(self) -> float:
        return sum(i.seconds() for i in self.intervals if i.state == "online")

    def as_json(self) -> dict[str, Any]:
        return {
            "node_id": self.node_id, "name": self.name, "registered": self.registered, "deleted": self.deleted,
            "online_seconds": round(self.online_seconds(), 3),
            "intervals": [{"state": i.state, "start": i.start, "end": i.end, "open": i.open,
                           "seconds": round(i.seconds(), 3)} for i in self.intervals],
            "changes": [{"seq": c.seq, "time": c.time, "actor": c.actor, "kind": c.kind, "text": c.text,
                         "data": c.data} for c in self.changes],
        }

    def text(self) -> str:
        head = f"node {self.node_id} {self.name or '?'}"
        head += f", registered {self.registered}" if self.registered else ""
        head += f", deleted {self.deleted}" if self.deleted else ""
        lines = [head, f"online {_dur(self.online_seconds())} in this window", "", "intervals:"]
        lines += [f"  {i.state:<8} {i.start}  {i.end if not i.open else '(now)':<27} {_dur(i.seconds())}"
                  for i in self.intervals] or ["  (none)"]
        lines += ["", "changes:"]
        lines += [f"  {c.seq:>6}  {c.time}  {c.kind:<18} {c.text}" for c in self.changes] or ["  (none)"]
        return "\n".join(lines)


def _dur(s: float) -> str:
    s = int(s)
    d, rem = divmod(s, 86400)
    h, rem = divmod(rem, 3600)
    m, sec = divmod(rem, 60)
    return (f"{d}d" if d else "") + (f"{h}h" if h or d else "") + f"{m}m{sec:02d}s"


def _short(key: str) -> str:
    kind, _, hexpart = key.partition(":")
    return f"{kind}:{hexpart[:8]}…" if hexpart else key


def _change(r: ev.Record, state: _Fold) -> tuple[str, str] | None:
    """(kind, text) for a record that is a change worth listing (None for online/offline and no-op records)."""
    match r.event:
        case ev.NodeRegistered(given_name=name, node_key=key, ipv4=v4, ipv6=v6, hostname=host):
            return "registered", f"as {name} (host {host}), key {_short(key)}, {v4} {v6}"
        case ev.NodeReauthenticated(node_key=key):
            if key != state.node_key:
                return "key_rotated", f"{_short(state.node_key)} -> {_short(key)}"
            return "reauthenticated", f"same key {_short(key)}"
        case ev.NodeRenamed(given_name=name, by_admin=by_admin):
            return "renamed", f"{state.name} -> {name}" + (" (by admin)" if by_admin else "")
        case ev.NodeHostinfoChanged(hostname=host, os=os_name, routes=routes):
            return "hostinfo", f"host {host} ({os_name})" + (f", advertises {', '.join(routes)}" if routes else "")
        case ev.NodeTagged(tags=tags):
            return "tagged", ", ".join(tags) or "(no tags)"
        case ev.NodeRoutesApproved(routes=routes):
            return "routes_approved", ", ".join(routes) or "(none)"
        case ev.NodeKeyExpirySet(key_expiry=exp):
            return "key_expiry", "never" if exp is None else ev.rfc3339(exp)
        case ev.NodeExpired():
            return "expired", "key expired"
        case ev.NodeLoggedOut():
            return "logged_out", "logged out"
        case ev.NodeDeleted(reason=reason):
            return "deleted", reason
        case ev.NodeDiscoKeyChanged(disco_key=key):
            return "disco_key", _short(key)
        case ev.NodeEndpointsChanged(endpoints=eps, home_derp=home):
            text = ", ".join(eps) or "(none)"
            if home != state.home_derp:
                text += f"; home relay {state.home_derp or '-'} -> {home or '-'}"
            return ("home_relay" if home != state.home_derp and eps == state.endpoints else "endpoints"), text
    return None


@dataclass
class _Fold:
    name: str = ""
    node_key: str = ""
    home_derp: int = 0
    endpoints: tuple[str, ...] = ()
    online: bool = False
    since: str | None = None  # start of the current span


def _apply(r: ev.Record, s: _Fold) -> None:
    match r.event:
        case ev.NodeRegistered(given_name=name, node_key=key):
            s.name, s.node_key = name, key
        case ev.NodeReauthenticated(node_key=key):
            s.node_key = key
        case ev.NodeRenamed(given_name=name):
            s.name = name
        case ev.NodeEndpointsChanged(endpoints=eps, home_derp=home):
            s.endpoints, s.home_derp = eps, home


def fold(node_id: int, records: Iterable[ev.Record], *, now: str, since: str | None = None,
         until: str | None = None) -> NodeHistory:
    h = NodeHistory(node_id)
    s = _Fold()
    spans: list[Interval] = []

    def close_span(at: str, is_open: bool = False) -> None:
        if s.since is not None:
            spans.append(Interval("online" if s.online else "offline", s.since, at, is_open))

    end_time = until or now
    for r in records:
        if r.event.data().get("node_id") != node_id:
            continue
        if until is not None and r.time > until:
            break
        e = r.event
        if isinstance(e, ev.NodeRegistered):
            h.registered, s.since, s.online = r.time, r.time, False
        elif isinstance(e, ev.NodeConnected) and not s.online:
            close_span(r.time)
            s.since, s.online = r.time, True
        elif isinstance(e, ev.NodeDisconnected | ev.NodeLoggedOut) and s.online:
            close_span(r.time)
            s.since, s.online = r.time, False
        elif isinstance(e, ev.NodeDeleted):
            close_span(r.time)
            s.since, h.deleted = None, r.time
        if since is None or r.time >= since:
            c = _change(r, s)
            if c is not None:
                h.changes.append(ChangeEntry(r.seq, r.time, r.actor, c[0], c[1], r.event.data()))
        _apply(r, s)
    if s.since is not None:
        close_span(end_time, is_open=True)
    h.name = s.name
    h.intervals = _clip(spans, since, until)
    return h


def _clip(spans: list[Interval], since: str | None, until: str | None) -> list[Interval]:
    out = []
    for i in spans:
        if (since is not None and i.end < since) or (until is not None and i.start > until):
            continue
        start = max(i.start, since) if since is not None else i.start
        end = min(i.end, until) if until is not None else i.end
        out.append(Interval(i.state, start, end, i.open))
    return out
