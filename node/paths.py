"""Path discovery: which of a peer's candidate endpoints to send its WireGuard packets to (sans-IO).

This is Tailscale's magicsock endpoint logic (ts:wgengine/magicsock/endpoint.go) without sockets or clock.
Every input takes `now` (seconds, any monotonic origin); `next_timer()` says when to call `handle_timer`;
outputs are actions drained with `next_action()`, as in aioquic.

`Peer` is one peer's state machine. `Magic` holds every peer keyed by disco key, opens incoming disco packets,
routes them to the right peer, answers pings, seals outgoing messages and counts drops by reason.

How a path is found:
- The candidates are the peer's netmap endpoints, the endpoints of its last CallMeMaybe, and sources we got a
  ping from (learned at run time; forgotten 45 s after their last ping).
- A *full ping* pings every candidate not pinged in the last 5 s and, if it sent any, queues a CallMeMaybe
  over DERP carrying our own endpoints, so the peer pings us back at once and both NATs open.
- A pong proves a path. Its latency scores the path with `better_addr`, which only switches for a real gain
  (hysteresis), so two similar paths do not flap. Each pong from the best path trusts it 6.5 s more.
- While the best path is trusted it is the WireGuard endpoint (`SetEndpoint(addr)`); once trust lapses the
  endpoint goes back to DERP (`SetEndpoint(None)`) until a pong renews it. While a session is active (traffic
  seen in the last 45 s) a heartbeat every 3 s pings the best path and re-runs the full ping when wanted: no
  trusted path, or 1 min since the last one with latency above 5 ms.

One deviation from Tailscale, to punch faster: a ping from a direct source while we trust no path is answered
with a pong *and* a ping back (at most once a second per source), so the side whose first pings were dropped
by the other NAT does not wait for its next 5 s ping slot.
"""

from __future__ import annotations

import enum
import ipaddress
from collections import Counter, deque
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from typing import Final

from nacl.public import Box

from node import disco
from node.disco import AddrPort

HEARTBEAT: Final = 3.0
TRUST_UDP: Final = 6.5
SESSION_ACTIVE_TIMEOUT: Final = 45.0
UPGRADE_INTERVAL: Final = 60.0
GOOD_ENOUGH_LATENCY: Final = 0.005
DISCO_PING_INTERVAL: Final = 5.0
PING_TIMEOUT: Final = 5.0
PUNCH_BACK_INTERVAL: Final = 1.0
# Pong source reported for a ping that came over DERP (Tailscale's legacy DERP magic address; port = region).
DERP_MAGIC_IP: Final = "127.3.3.40"


class PathKind(enum.StrEnum):
    """What a peer's traffic rides on, as `shoal status` reports it (the rule: node/status.py)."""

    DIRECT = "direct"
    DERP = "derp"
    UNCONFIRMED = "unconfirmed"
    CONNECTING = "connecting"
    STALE = "stale"
    NONE = "none"


# Bounds on attacker-grown state: a peer can make us learn endpoints by pinging from many sources.
MAX_ENDPOINTS: Final = 64
MAX_INFLIGHT: Final = 256

Rand = Callable[[int], bytes]


# --- Peer actions -----------------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class SendPing:
    addr: AddrPort
    txid: bytes


@dataclass(frozen=True, slots=True)
class SendPong:
    """Answer to a ping. `via_derp`: it came over DERP, so answer over DERP."""

    addr: AddrPort
    txid: bytes
    via_derp: bool


@dataclass(frozen=True, slots=True)
class SendCallMeMaybe:
    """Send our endpoints to the peer over DERP."""


@dataclass(frozen=True, slots=True)
class SetEndpoint:
    """The peer's WireGuard endpoint should now be `addr`; None means its DERP (loopback) endpoint."""

    addr: AddrPort | None


PeerAction = SendPing | SendPong | SendCallMeMaybe | SetEndpoint


# --- Path scoring ------------------------------------------------------------------------------------------

_GO_PRIVATE = [ipaddress.ip_network(n) for n in ("10.0.0.0/8", "172.16.0.0/12", "192.168.0.0/16", "fc00::/7")]


def _points_for(ip: str) -> int:
    # Go's netip IsPrivate (RFC 1918 + ULA), not Python's is_private, which also counts documentation ranges.
    a = ipaddress.ip_address(ip)
    if a.is_loopback:
        bonus = 50
    elif a.is_link_local:
        bonus = 30
    elif any(a in n for n in _GO_PRIVATE):
        bonus = 20
    else:
        bonus = 0
    return bonus + (10 if a.version == 6 else 0)


def better_addr(a: AddrPort | None, a_latency: float, b: AddrPort | None, b_latency: float) -> bool:
    """Whether path a beats path b (ts betterAddr). Points are the % latency gain over the slower one, plus
    +50 loopback, +30 link-local, +20 private, +10 IPv6; a gain of 1 point or less does not switch."""
    if a == b:
        return False
    if b is None:
        return True
    if a is None:
        return False
    # Integer nanoseconds, as Go's Duration arithmetic, so scores match Tailscale's exactly.
    la, lb = round(a_latency * 1e9), round(b_latency * 1e9)
    a_pts = b_pts = 0
    if la > lb and la > 0:
        b_pts = 100 - (lb * 100) // la
    elif lb > 0:
        a_pts = 100 - (la * 100) // lb
    a_pts += _points_for(a[0])
    b_pts += _points_for(b[0])
    if a_pts <= 1 and b_pts == 0:
        return False
    return a_pts > b_pts


# --- One peer ----------------------------------------------------------------------------------------------


@dataclass(slots=True)
class EndpointState:
    from_netmap: bool = False
    call_me_maybe_at: float | None = None
    last_got_ping: float | None = None
    last_ping: float | None = None
    last_punch: float | None = None
    last_pong: float | None = None
    latency: float | None = None

    def stale(self, now: float) -> bool:
        if self.from_netmap or self.call_me_maybe_at is not None:
            return False
        # Same expression as the timer's, so float rounding cannot leave a timer that never fires.
        return self.last_got_ping is None or now >= self.last_got_ping + SESSION_ACTIVE_TIMEOUT


@dataclass(frozen=True, slots=True)
class SentPing:
    addr: AddrPort
    at: float


class Peer:
    """Path state for one peer. Inputs: `set_endpoints`, `note_activity`, `handle_ping`, `handle_pong`,
    `handle_call_me_maybe`, `handle_timer`. Outputs: `next_action()`, `next_timer()`, `endpoint`."""

    def __init__(self, endpoints: Iterable[AddrPort] = (), *, rand: Rand) -> None:
        self._rand = rand
        self.endpoints: dict[AddrPort, EndpointState] = {}
        self.sent: dict[bytes, SentPing] = {}
        self.best: AddrPort | None = None
        self.best_latency = 0.0
        self.trust_until = float("-inf")
        self.last_full_ping: float | None = None
        self.last_active: float | None = None
        self.last_heartbeat: float | None = None
        self.endpoint: AddrPort | None = None
        self._actions: deque[PeerAction] = deque()
        self.set_endpoints(endpoints)

    # -- inputs

    def set_endpoints(self, endpoints: Iterable[AddrPort], now: float = 0.0) -> None:
        """The peer's endpoints from the netmap (replaces the previous netmap list)."""
        new = {disco.normalize(ep) for ep in endpoints}
        for addr, st in list(self.endpoints.items()):
            st.from_netmap = addr in new
            if not st.from_netmap and st.stale(now):
                self._forget(addr)
        for addr in new:
            self.endpoints.setdefault(addr, EndpointState()).from_netmap = True
        self._update_endpoint(now)

    def note_activity(self, now: float) -> None:
        """WireGuard traffic to or from this peer was seen: keep the session active (heartbeats on). Cheap to
        call often: pings are rate-limited per endpoint."""
        if not self.active(now):
            self.last_heartbeat = now
        self.last_active = now
        if self.want_full_ping(now):
            self._send_pings(now, call_me_maybe=True)

    def handle_ping(self, txid: bytes, src: AddrPort, via_derp: bool, now: float) -> None:
        self._actions.append(SendPong(src, txid, via_derp))
        if via_derp:
            return
        st = self.endpoints.get(src)
        if st is None:
            if len(self.endpoints) >= MAX_ENDPOINTS:
                return
            st = self.endpoints[src] = EndpointState()
        st.last_got_ping = now
        # Our earlier pings to src may have died at the peer's NAT, which its ping has just opened: ping back,
        # whatever the 5 s interval, but at most once a second so two punching sides cannot storm.
        if not self.trusted(now) and (st.last_punch is None or now - st.last_punch >= PUNCH_BACK_INTERVAL):
            st.last_punch = now
            self._ping(src, now)

    def handle_pong(self, txid: bytes, src: AddrPort, via_derp: bool, now: float) -> str | None:
        """None if the pong answered one of our pings, else the drop reason."""
        sp = self.sent.get(txid)
        if sp is None:
            return "unsolicited_pong"
        if via_derp or src != sp.addr:
            # A pong proves only the path it came back on, and ours went to sp.addr.
            return "pong_src_mismatch"
        del self.sent[txid]
        latency = max(0.0, now - sp.at)
        st = self.endpoints.get(sp.addr)
        if st is not None:
            st.last_pong, st.latency = now, latency
        # A best path that lost its trust has no standing: any answering path replaces it.
        if not self.trusted(now) or better_addr(sp.addr, latency, self.best, self.best_latency):
            self.best = sp.addr
        if self.best == sp.addr:
            self.best_latency = latency
            self.trust_until = now + TRUST_UDP
        self._update_endpoint(now)
        return None

    def handle_call_me_maybe(self, endpoints: Iterable[AddrPort], now: float) -> None:
        new = {disco.normalize(ep) for ep in endpoints}
        for addr, st in list(self.endpoints.items()):
            if st.call_me_maybe_at is not None and addr not in new:
                st.call_me_maybe_at = None
                if st.stale(now):
                    self._forget(addr)
        for addr in new:
            if addr not in self.endpoints and len(self.endpoints) >= MAX_ENDPOINTS:
                continue
            st = self.endpoints.setdefault(addr, EndpointState())
            st.call_me_maybe_at = now
            st.last_ping = None  # the peer is punching now: ping at once, whatever the interval
        self._send_pings(now, call_me_maybe=False)
        self._update_endpoint(now)

    def handle_timer(self, now: float) -> None:
        for txid, sp in list(self.sent.items()):
            if now >= sp.at + PING_TIMEOUT:
                del self.sent[txid]
        for addr, st in list(self.endpoints.items()):
            if st.stale(now):
                self._forget(addr)
        due = self._heartbeat_due()
        if self.active(now) and due is not None and now >= due:
            self.last_heartbeat = now
            if self.best is not None:
                self._ping(self.best, now)
            if self.want_full_ping(now):
                self._send_pings(now, call_me_maybe=True)
        self._update_endpoint(now)

    # -- outputs and queries

    def next_action(self) -> PeerAction | None:
        return self._actions.popleft() if self._actions else None

    def next_timer(self) -> float | None:
        times = [sp.at + PING_TIMEOUT for sp in self.sent.values()]
        if self.endpoint is not None:
            times.append(self.trust_until)
        hb = self._heartbeat_due()
        if hb is not None and self.last_active is not None and hb < self.last_active + SESSION_ACTIVE_TIMEOUT:
            times.append(hb)
        times += [
            st.last_got_ping + SESSION_ACTIVE_TIMEOUT
            for st in self.endpoints.values()
            if not st.from_netmap and st.call_me_maybe_at is None and st.last_got_ping is not None
        ]
        return min(times) if times else None

    def active(self, now: float) -> bool:
        return self.last_active is not None and now < self.last_active + SESSION_ACTIVE_TIMEOUT

    def trusted(self, now: float) -> bool:
        return self.best is not None and now < self.trust_until

    def want_full_ping(self, now: float) -> bool:
        if not self.endpoints:
            return False
        if self.best is None or self.last_full_ping is None or not self.trusted(now):
            return True
        if self.best_latency <= GOOD_ENOUGH_LATENCY:
            return False
        return now - self.last_full_ping >= UPGRADE_INTERVAL

    def addr_for_send(self, now: float) -> tuple[AddrPort | None, bool]:
        """(UDP address, also via DERP?): the trusted best path alone, else DERP plus the stale best path."""
        if self.trusted(now):
            return self.best, False
        return self.best, True

    # -- internals

    def _heartbeat_due(self) -> float | None:
        return None if self.last_heartbeat is None else self.last_heartbeat + HEARTBEAT

    def _ping(self, addr: AddrPort, now: float) -> None:
        if len(self.sent) >= MAX_INFLIGHT:
            return
        txid = self._rand(disco.TXID_LEN)
        self.sent[txid] = SentPing(addr, now)
        st = self.endpoints.get(addr)
        if st is not None:
            st.last_ping = now
        self._actions.append(SendPing(addr, txid))

    def _send_pings(self, now: float, *, call_me_maybe: bool) -> None:
        self.last_full_ping = now
        sent_any = False
        for addr, st in self.endpoints.items():
            if st.last_ping is not None and now - st.last_ping < DISCO_PING_INTERVAL:
                continue
            self._ping(addr, now)
            sent_any = True
        if sent_any and call_me_maybe:
            self._actions.append(SendCallMeMaybe())

    def _forget(self, addr: AddrPort) -> None:
        del self.endpoints[addr]
        if self.best == addr:
            self.best, self.trust_until = None, float("-inf")

    def _update_endpoint(self, now: float) -> None:
        want = self.best if self.trusted(now) else None
        if want != self.endpoint:
            self.endpoint = want
            self._actions.append(SetEndpoint(want))


# --- All peers ---------------------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class Transmit:
    """Send `data` (a sealed disco packet) to `addr` from the WireGuard port, or over DERP to the peer's
    node key when `addr` is None."""

    node_key: bytes
    addr: AddrPort | None
    data: bytes


@dataclass(frozen=True, slots=True)
class EndpointChanged:
    """Set this peer's WireGuard endpoint to `addr`, or to its DERP loopback socket when None."""

    node_key: bytes
    addr: AddrPort | None


MagicAction = Transmit | EndpointChanged


@dataclass(slots=True)
class _Remote:
    node_key: bytes
    box: Box
    peer: Peer


@dataclass(slots=True)
class Stats:
    received: Counter[str] = field(default_factory=Counter)
    drops: Counter[str] = field(default_factory=Counter)


class Magic:
    """Every peer's path state, keyed by disco public key. Feed `receive()` every disco packet that arrives
    (on the raw socket or over DERP); drain `next_action()` after every input; call `handle_timer(now)` at
    `next_timer()`."""

    def __init__(self, private: bytes, node_key: bytes, *, derp_region: int = 0, rand: Rand) -> None:
        self._private = private
        self.public = disco.public_key(private)
        self.node_key = node_key
        self.derp_region = derp_region
        self._rand = rand
        self._peers: dict[bytes, _Remote] = {}
        self._by_node: dict[bytes, bytes] = {}
        self.self_endpoints: tuple[AddrPort, ...] = ()
        self.stats = Stats()
        self._actions: deque[MagicAction] = deque()

    # -- netmap inputs

    def set_self_endpoints(self, endpoints: Iterable[AddrPort]) -> None:
        """Our own endpoints (STUN-reflexive and local), sent in CallMeMaybe."""
        self.self_endpoints = tuple(disco.normalize(ep) for ep in endpoints)[: disco.MAX_CALL_ME_MAYBE]

    def upsert_peer(self, disco_key: bytes, node_key: bytes, endpoints: Iterable[AddrPort], now: float) -> None:
        old = self._by_node.get(node_key)
        if old is not None and old != disco_key:
            # The peer restarted with a new disco key: its old path state proves nothing now.
            self.remove_peer(old)
        remote = self._peers.get(disco_key)
        if remote is None or remote.node_key != node_key:
            if remote is not None:
                self._by_node.pop(remote.node_key, None)
            remote = _Remote(node_key, disco.box_for(self._private, disco_key), Peer(rand=self._rand))
            self._peers[disco_key] = remote
            self._by_node[node_key] = disco_key
        remote.peer.set_endpoints(endpoints, now)
        self._collect(remote)

    def remove_peer(self, disco_key: bytes) -> None:
        remote = self._peers.pop(disco_key, None)
        if remote is not None:
            self._by_node.pop(remote.node_key, None)

    def peer(self, disco_key: bytes) -> Peer:
        return self._peers[disco_key].peer

    def peer_by_node(self, node_key: bytes) -> Peer | None:
        dk = self._by_node.get(node_key)
        return None if dk is None else self._peers[dk].peer

    def peers(self) -> dict[bytes, Peer]:
        """node key -> Peer."""
        return {r.node_key: r.peer for r in self._peers.values()}

    # -- traffic inputs

    def note_activity(self, node_key: bytes, now: float) -> None:
        dk = self._by_node.get(node_key)
        if dk is not None:
            remote = self._peers[dk]
            remote.peer.note_activity(now)
            self._collect(remote)

    def receive(
        self, data: bytes, src: AddrPort | None, now: float, *, derp_src: bytes | None = None
    ) -> disco.Message | None:
        """A disco packet from `src` (an UDP address), or over DERP (src None) from node key `derp_src`.
        Returns the message it carried, or None when it was dropped (see `stats.drops`)."""
        try:
            sender = disco.sender_key(data)
        except disco.DiscoError as e:
            self.stats.drops[e.reason] += 1
            return None
        remote = self._peers.get(sender)
        if remote is None:
            self.stats.drops["unknown_key"] += 1
            return None
        try:
            msg = disco.open_packet(data, remote.box)
        except disco.DiscoError as e:
            self.stats.drops[e.reason] += 1
            return None
        via_derp = src is None
        if via_derp and derp_src is not None and derp_src != remote.node_key:
            self.stats.drops["derp_key_mismatch"] += 1
            return None
        peer = remote.peer
        addr = src if src is not None else (DERP_MAGIC_IP, self.derp_region)
        try:
            addr = disco.normalize(addr)
        except ValueError:
            self.stats.drops["bad_source"] += 1
            return None
        if isinstance(msg, disco.Ping):
            peer.handle_ping(msg.txid, addr, via_derp, now)
        elif isinstance(msg, disco.Pong):
            reason = peer.handle_pong(msg.txid, addr, via_derp, now)
            if reason is not None:
                self.stats.drops[reason] += 1
                return None
        else:
            if not via_derp:
                # CallMeMaybe over UDP would let anyone on path make us spray pings.
                self.stats.drops["call_me_maybe_not_via_derp"] += 1
                return None
            peer.handle_call_me_maybe(msg.endpoints, now)
        self.stats.received[type(msg).__name__] += 1
        self._collect(remote)
        return msg

    def handle_timer(self, now: float) -> None:
        for remote in self._peers.values():
            t = remote.peer.next_timer()
            if t is not None and t <= now:
                remote.peer.handle_timer(now)
                self._collect(remote)

    # -- outputs

    def next_timer(self) -> float | None:
        times = [t for r in self._peers.values() if (t := r.peer.next_timer()) is not None]
        return min(times) if times else None

    def next_action(self) -> MagicAction | None:
        return self._actions.popleft() if self._actions else None

    def _collect(self, remote: _Remote) -> None:
        while (a := remote.peer.next_action()) is not None:
            if isinstance(a, SetEndpoint):
                self._actions.append(EndpointChanged(remote.node_key, a.addr))
                continue
            msg: disco.Message
            to: AddrPort | None
            if isinstance(a, SendPing):
                msg, to = disco.Ping(a.txid, self.node_key if any(self.node_key) else None), a.addr
            elif isinstance(a, SendPong):
                msg, to = disco.Pong(a.txid, a.addr), None if a.via_derp else a.addr
            else:
                msg, to = disco.CallMeMaybe(self.self_endpoints), None
            self._actions.append(Transmit(remote.node_key, to, disco.seal(msg, self.public, remote.box)))
