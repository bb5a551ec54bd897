"""Fan-out, sans-IO: merges Changes per tick and decides what each map session sends next.

Time is passed in. ``submit(change, now)`` merges a change into the tick; ``next_timer()`` says when the tick is due
and ``flush(now)`` ends it, pushing the merged change to exactly the sessions it touches (it returns them, so the
shell can wake their streams). ``next_frame(session, now)`` gives the next message body of a stream: its full map
first, then a delta for what was pushed since, or a keep-alive once it has been idle ``keepalive`` seconds
(``session_timer(session)`` says when); None when there is nothing to send yet, and the stream ends once ``ended``.

Each session keeps what it last sent (peer id -> version) and a bounded list of pending Changes. When the list
overflows (a slow reader, a burst of changes) the session drops it and sends a full map instead, so memory per
session stays bounded whatever the client does. The asyncio shell (coord/poll.py) owns timers, wake-ups and sealing.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Protocol

from coord.change import Change
from coord.netmap import Builder, Visibility

MAX_PENDING = 64
KEEPALIVE = b'{"KeepAlive":true}'
ROUTER_KEEPALIVE = 1.0


class Netmaps(Protocol):
    """Where the fan-out reads netmaps from: the service's current builder and visibility."""

    @property
    def builder(self) -> Builder: ...

    @property
    def visibility(self) -> Visibility: ...


@dataclass(eq=False)
class Session:
    node_id: int
    sent: dict[int, int] = field(default_factory=dict)
    pending: list[Change] = field(default_factory=list)
    full_needed: bool = True
    closed: bool = False
    # When the stream last found nothing to send (None while it is sending): keep-alives count from here.
    idle_since: float | None = None

    def push(self, change: Change) -> bool:
        """Queue a change; False if the session needs no wake-up for it (a full map is due anyway)."""
        if self.full_needed:
            return False
        if len(self.pending) >= MAX_PENDING:
            self.pending.clear()
            self.full_needed = True
        else:
            self.pending.append(change)
        return True


@dataclass
class Fanout:
    netmaps: Netmaps
    batch_delay: float
    keepalive: float
    # Subnet routers get keep-alives this often, so a router whose link is cut stops acknowledging within seconds and
    # the server's TCP user timeout (coord/serve.py) ends its stream: the failover then follows (docs/routes.md).
    router_keepalive: float = ROUTER_KEEPALIVE
    sessions: dict[int, Session] = field(default_factory=dict)
    _pending: Change = field(default_factory=Change)
    _flush_at: float | None = None

    def open(self, node_id: int) -> tuple[Session, Session | None]:
        """A new session for the node, and the one it replaces (now closed), if any."""
        old = self.sessions.get(node_id)
        if old is not None:
            old.closed = True
        s = Session(node_id)
        self.sessions[node_id] = s
        return s, old

    def release(self, s: Session) -> bool:
        """Forget a finished session; True if it was still the node's current one."""
        if self.sessions.get(s.node_id) is s:
            del self.sessions[s.node_id]
            return True
        return False

    def close_all(self) -> list[Session]:
        for s in self.sessions.values():
            s.closed = True
        return list(self.sessions.values())

    # --- the tick ---------------------------------------------------------------------------------------

    def submit(self, change: Change, now: float) -> None:
        if not change:
            return
        self._pending.merge(change)
        if self._flush_at is None:
            self._flush_at = now + self.batch_delay

    def next_timer(self) -> float | None:
        """When the current tick is due (``flush``), or None when nothing is waiting."""
        return self._flush_at

    def flush(self, now: float) -> list[Session]:
        """End the tick: close, forget and push; returns the sessions to wake."""
        self._flush_at = None
        c, self._pending = self._pending, Change()
        if not c:
            return []
        woken: list[Session] = []
        for nid in c.close:
            s = self.sessions.get(nid)
            if s is not None:
                s.closed = True
                woken.append(s)
        builder = self.netmaps.builder
        for nid in c.removed:
            builder.forget(nid)
        woken.extend(s for s in self._targets(c) if s.push(c))
        return woken

    def _targets(self, c: Change) -> list[Session]:
        if not self.sessions:
            return []  # the peers of every changed node would be computed for no one
        if c.policy or c.removed or c.dns:
            return list(self.sessions.values())
        vis = self.netmaps.visibility
        ids: set[int] = set(c.self_nodes) | c.visibility
        for pid in c.peers | c.patches:
            ids.update(vis.peers(pid))
        return [s for nid in ids if (s := self.sessions.get(nid)) is not None]

    # --- one stream -------------------------------------------------------------------------------------

    def ended(self, s: Session) -> bool:
        return s.closed or s.node_id not in self.netmaps.builder.state.nodes

    def next_frame(self, s: Session, now: float) -> bytes | None:
        """The next message body for the stream, or None: nothing before a wake-up or ``session_timer``."""
        if self.ended(s):
            return None
        if s.full_needed:
            s.full_needed = False
            s.pending.clear()
            s.idle_since = None
            body, s.sent = self.netmaps.builder.full(self.netmaps.visibility, s.node_id, now)
            return body
        if s.pending:
            change = Change()
            for c in s.pending:
                change.merge(c)
            s.pending.clear()
            s.idle_since = None
            body_or_none = self.netmaps.builder.delta(self.netmaps.visibility, s.node_id, change, s.sent, now)
            if body_or_none is not None:
                return body_or_none
        if s.idle_since is None:
            s.idle_since = now
        elif now >= s.idle_since + self._keepalive(s):
            s.idle_since = None
            return KEEPALIVE
        return None

    def _keepalive(self, s: Session) -> float:
        n = self.netmaps.builder.state.nodes.get(s.node_id)
        return min(self.keepalive, self.router_keepalive) if n is not None and n.served_routes else self.keepalive

    def session_timer(self, s: Session) -> float | None:
        """When the stream's keep-alive is due (it must call ``next_frame`` then), or None while it is sending."""
        return None if s.idle_since is None else s.idle_since + self._keepalive(s)
