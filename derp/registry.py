"""Who is connected to this relay: a pure key -> connection table (sans-IO).

The relay forwards by node public key. Several connections may claim one key (a node restarted, or two machines
share a key by mistake); the most recent one is active and the others are told via a Health frame. When the last
connection of a key leaves, every key that has sent to it learns PeerGone, and mesh watchers learn it too.

Connections are opaque values of type ``C`` (the server's per-connection object); the registry never calls them.
Every mutation returns a list of actions for the glue to carry out, so the policy is tested without sockets.

``active`` and ``forwarders`` are plain dicts that the server's hot path reads directly.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Generic, TypeVar

C = TypeVar("C")
F = TypeVar("F")

DUPLICATE_PROBLEM = "another connection with this node key is active on this relay"


@dataclass(frozen=True, slots=True)
class SendHealth(Generic[C]):
    conn: C
    problem: str


@dataclass(frozen=True, slots=True)
class SendPeerGone:
    to: bytes
    key: bytes


@dataclass(frozen=True, slots=True)
class Announce:
    """Tell mesh watchers that ``key`` is now present (or gone)."""

    key: bytes
    present: bool


Action = SendHealth[C] | SendPeerGone | Announce


class Registry(Generic[C, F]):
    def __init__(self) -> None:
        self.active: dict[bytes, C] = {}
        self.forwarders: dict[bytes, F] = {}
        # key -> every connection with that key, oldest first; the last one is active.
        self._conns: dict[bytes, list[C]] = {}
        # destination key -> keys that have sent to it, so they learn when it leaves.
        self.senders: dict[bytes, set[bytes]] = {}

    def __len__(self) -> int:
        return len(self.active)

    def connections(self, key: bytes) -> list[C]:
        return list(self._conns.get(key, ()))

    def add(self, key: bytes, conn: C) -> list[Action[C]]:
        conns = self._conns.setdefault(key, [])
        actions: list[Action[C]] = []
        if conns:
            # The newest connection wins; the others stay open but receive nothing.
            actions.extend(SendHealth(c, DUPLICATE_PROBLEM) for c in conns)
        else:
            actions.append(Announce(key, True))
        conns.append(conn)
        self.active[key] = conn
        return actions

    def remove(self, key: bytes, conn: C) -> list[Action[C]]:
        conns = self._conns.get(key)
        if not conns or conn not in conns:
            return []
        was_active = conns[-1] is conn
        conns.remove(conn)
        actions: list[Action[C]] = []
        if conns:
            if was_active:
                self.active[key] = conns[-1]
                if len(conns) == 1:
                    actions.append(SendHealth(conns[-1], ""))
            return actions
        del self._conns[key]
        del self.active[key]
        for sender in sorted(self.senders.pop(key, ())):
            if sender in self.active:
                actions.append(SendPeerGone(sender, key))
        actions.append(Announce(key, False))
        return actions

    def note_sent(self, src: bytes, dst: bytes) -> None:
        s = self.senders.get(dst)
        if s is None:
            self.senders[dst] = {src}
        else:
            s.add(src)

    def add_forwarder(self, key: bytes, fwd: F) -> None:
        self.forwarders[key] = fwd

    def remove_forwarder(self, key: bytes, fwd: F) -> bool:
        """Drop the forwarder for ``key`` if it is ``fwd``. True if the key is then unreachable from here."""
        if self.forwarders.get(key) is fwd:
            del self.forwarders[key]
            return key not in self.active
        return False

    def remove_forwarders_of(self, fwd: F) -> list[bytes]:
        gone = [k for k, f in self.forwarders.items() if f is fwd]
        for k in gone:
            del self.forwarders[k]
        return gone
