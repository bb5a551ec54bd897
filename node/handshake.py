"""Who sends the first WireGuard handshake to a peer (sans-IO: time is passed in).

Two engines that each get the other as a new peer at the same moment both initiate: each one's initiation voids
the handshake state the other's response refers to ("invalid response" on both sides), and both wait
wireguard-go's 5 s retry. Any packet for the peer makes wireguard-go initiate (persistent keepalive being set, a
ping through the tunnel), so delaying only the keepalive does not prevent it.

The tie-break is deterministic and needs no message: for a peer new to this node, the side with the lower node
key initiates at once; the higher side puts the peer into its engine *without an endpoint and without keepalive*
(wireguard-go cannot send anything to it, so it cannot initiate), until a handshake has completed (the lower
side's initiation arrived, and wireguard-go answered from the packet's source) or `HOLD` passed (the lower side
never initiated: then we do). Packets sent meanwhile wait in wireguard-go's queue and leave with the session.

A peer this node had in its engine before the engine was (re)started is re-keyed at once whatever the keys:
it still holds a session with our old engine, which only our initiation replaces. Two such nodes restarting
at the same instant can still collide (docs/nat.md, not done).
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass, field, replace

from node.wg.config import DeviceState, WgConfig

# The higher key's wait for the lower key's first initiation: above the time a fresh peer needs from its first
# netmap to its first initiation over DERP (the first relay dial included), well under the 5 s retry.
HOLD = 2.0


@dataclass
class Initiator:
    own: bytes  # our node key (raw)
    known: set[bytes] = field(default_factory=set)  # peers we have had in an engine, ever
    _stale: set[bytes] = field(default_factory=set)  # known before this engine started: re-key at once
    _in_engine: set[bytes] = field(default_factory=set)
    _held: dict[bytes, float] = field(default_factory=dict)  # peer -> when we initiate anyway

    def remember(self, keys: Iterable[bytes]) -> None:
        """Peers of a netmap saved before a restart: our old engine had sessions with them."""
        self.known.update(keys)

    def engine_started(self) -> None:
        self._stale = set(self.known)
        self._in_engine.clear()
        self._held.clear()

    def shape(self, cfg: WgConfig, now: float) -> WgConfig:
        """`cfg` with the held peers' endpoint and keepalive taken out."""
        keys = {p.public_key.raw for p in cfg.peers}
        for gone in self._in_engine - keys:
            self._in_engine.discard(gone)
            self._held.pop(gone, None)
            self._stale.discard(gone)  # back later: new to both sides
        peers = []
        for p in cfg.peers:
            k = p.public_key.raw
            if k not in self._in_engine:
                self._in_engine.add(k)
                self.known.add(k)
                if k not in self._stale and self.own > k:
                    self._held[k] = now + HOLD
            peers.append(replace(p, endpoint=None, persistent_keepalive=0) if k in self._held else p)
        return replace(cfg, peers=tuple(peers))

    def held(self, key: bytes) -> bool:
        return key in self._held

    def observe(self, dev: DeviceState) -> bool:
        """An engine read: a held peer with a completed handshake is released. True when one was."""
        done = [st.public_key.raw for st in dev.peers if st.public_key.raw in self._held and st.last_handshake]
        for k in done:
            del self._held[k]
        return bool(done)

    def next_timer(self) -> float | None:
        return min(self._held.values(), default=None)

    def handle_timer(self, now: float) -> bool:
        due = [k for k, t in self._held.items() if t <= now]
        for k in due:
            del self._held[k]
        return bool(due)
