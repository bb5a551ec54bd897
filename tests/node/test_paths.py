"""Path state machines wired together over a fake network with a fake clock (aioquic's transfer style)."""

from __future__ import annotations

import heapq
import itertools
from dataclasses import dataclass, field

import pytest
from hypothesis import given
from hypothesis import strategies as st

from node import disco, paths
from node.disco import AddrPort

A_PRIV, B_PRIV, C_PRIV = b"\x0a" * 32, b"\x0b" * 32, b"\x0c" * 32
A_NODE, B_NODE, C_NODE = b"\xaa" * 32, b"\xbb" * 32, b"\xcc" * 32
A_ADDR: AddrPort = ("198.51.100.1", 41641)
B_ADDR: AddrPort = ("203.0.113.2", 41641)
DIRECT_DELAY = 0.010
DERP_DELAY = 0.040


def counter_rand() -> paths.Rand:
    c = itertools.count(1)
    return lambda n: next(c).to_bytes(n, "big")


@dataclass
class Node:
    name: str
    magic: paths.Magic
    addr: AddrPort
    endpoint_log: list[tuple[float, AddrPort | None]] = field(default_factory=list)
    sent_direct: list[tuple[float, AddrPort, disco.Message]] = field(default_factory=list)
    # Stateful firewall (like a NAT's filter): inbound direct only from addresses we sent to.
    firewall: bool = False
    opened: set[AddrPort] = field(default_factory=set)


class Net:
    """Delivers Transmit actions between nodes with fixed delays; the direct link can be cut."""

    def __init__(self, *nodes: Node) -> None:
        self.nodes = {n.magic.node_key: n for n in nodes}
        self.by_addr = {n.addr: n for n in nodes}
        self.now = 0.0
        self.queue: list[tuple[float, int, Node, bytes, AddrPort | None, bytes]] = []
        self.seq = itertools.count()
        self.direct_up = True
        self.activity: dict[bytes, tuple[float, float]] = {}  # node key -> (every, until)
        self.next_activity: dict[bytes, float] = {}

    def keep_active(self, node: Node, every: float = 1.0, until: float = 1e9) -> None:
        self.activity[node.magic.node_key] = (every, until)
        self.next_activity[node.magic.node_key] = self.now

    def drain(self, node: Node) -> None:
        while (a := node.magic.next_action()) is not None:
            if isinstance(a, paths.EndpointChanged):
                node.endpoint_log.append((self.now, a.addr))
                continue
            dst = self.nodes[a.node_key]
            if a.addr is None:
                heapq.heappush(
                    self.queue, (self.now + DERP_DELAY, next(self.seq), dst, a.data, None, node.magic.node_key)
                )
                continue
            box = disco.box_for(dst_priv(dst), node.magic.public)
            node.sent_direct.append((self.now, a.addr, disco.open_packet(a.data, box)))
            node.opened.add(a.addr)
            target = self.by_addr.get(a.addr)
            if target is not None and self.direct_up:
                heapq.heappush(self.queue, (self.now + DIRECT_DELAY, next(self.seq), target, a.data, node.addr, b""))

    def step(self) -> bool:
        candidates: list[float] = []
        if self.queue:
            candidates.append(self.queue[0][0])
        for n in self.nodes.values():
            t = n.magic.next_timer()
            if t is not None:
                candidates.append(t)
        for key, t in self.next_activity.items():
            if t <= self.activity[key][1]:
                candidates.append(t)
        if not candidates:
            return False
        self.now = max(self.now, min(candidates))
        while self.queue and self.queue[0][0] <= self.now:
            _, _, dst, data, src, derp_src = heapq.heappop(self.queue)
            if src is not None and dst.firewall and src not in dst.opened:
                continue
            dst.magic.receive(data, src, self.now, derp_src=derp_src or None)
            self.drain(dst)
        for key, t in list(self.next_activity.items()):
            every, until = self.activity[key]
            if t <= self.now and t <= until:
                self.nodes[key].magic.note_activity(self.peer_of(key), self.now)
                self.next_activity[key] = t + every
                self.drain(self.nodes[key])
        for n in self.nodes.values():
            n.magic.handle_timer(self.now)
            self.drain(n)
        return True

    def peer_of(self, key: bytes) -> bytes:
        return next(k for k in self.nodes if k != key)

    def run_until(self, t: float) -> None:
        for _ in range(100_000):
            if self.now >= t or not self.step():
                break
        else:
            raise AssertionError(f"timers stuck at {self.now}")
        self.now = max(self.now, t)


def dst_priv(node: Node) -> bytes:
    return {A_NODE: A_PRIV, B_NODE: B_PRIV, C_NODE: C_PRIV}[node.magic.node_key]


def pair(*, firewall: bool = False, a_knows_b: bool = True, b_knows_a: bool = True) -> tuple[Net, Node, Node]:
    a = Node("a", paths.Magic(A_PRIV, A_NODE, rand=counter_rand()), A_ADDR, firewall=firewall)
    b = Node("b", paths.Magic(B_PRIV, B_NODE, rand=counter_rand()), B_ADDR, firewall=firewall)
    a.magic.set_self_endpoints([A_ADDR])
    b.magic.set_self_endpoints([B_ADDR])
    a.magic.upsert_peer(b.magic.public, B_NODE, [B_ADDR] if a_knows_b else [], 0.0)
    b.magic.upsert_peer(a.magic.public, A_NODE, [A_ADDR] if b_knows_a else [], 0.0)
    net = Net(a, b)
    net.drain(a)
    net.drain(b)
    return net, a, b


def endpoint_at(node: Node, t: float) -> AddrPort | None:
    current = None
    for at, addr in node.endpoint_log:
        if at <= t:
            current = addr
    return current


def test_finds_direct_path() -> None:
    net, a, b = pair()
    net.keep_active(a)
    net.run_until(1.0)
    assert a.endpoint_log and a.endpoint_log[0][1] == B_ADDR
    assert a.endpoint_log[0][0] == pytest.approx(2 * DIRECT_DELAY)
    # B got A's ping, pinged back (it trusted nothing yet) and so confirmed the path too.
    assert b.endpoint_log and b.endpoint_log[0][1] == A_ADDR
    peer = a.magic.peer(b.magic.public)
    assert peer.best == B_ADDR
    assert peer.best_latency == pytest.approx(2 * DIRECT_DELAY)
    assert peer.addr_for_send(net.now) == (B_ADDR, False)
    assert a.magic.stats.drops == {}
    assert b.magic.stats.drops == {}


def test_call_me_maybe_punches_through_both_firewalls() -> None:
    # Each side drops direct packets from addresses it has not sent to: A's first ping dies at B's firewall,
    # but the CallMeMaybe over DERP makes B ping A, which opens B's side; A answers and pings back.
    net, a, b = pair(firewall=True)
    net.keep_active(a)
    net.run_until(1.0)
    assert endpoint_at(a, 1.0) == B_ADDR
    assert endpoint_at(b, 1.0) == A_ADDR
    first = a.endpoint_log[0][0]
    assert first < 2 * DERP_DELAY + 4 * DIRECT_DELAY + 1e-9
    cmm = [m for m in b.magic.stats.received if m == "CallMeMaybe"]
    assert cmm


def test_heartbeats_keep_trust_then_fall_back_and_upgrade_again() -> None:
    net, a, b = pair()
    net.keep_active(a, every=1.0)
    net.keep_active(b, every=1.0)
    net.run_until(10.0)
    assert endpoint_at(a, 10.0) == B_ADDR
    assert len(a.endpoint_log) == 1  # no flapping while heartbeats are answered
    # Heartbeats every 3 s to the best path.
    pings = [t for t, addr, m in a.sent_direct if isinstance(m, disco.Ping) and 3.0 < t <= 10.0]
    assert 2 <= len(pings) <= 4

    net.direct_up = False
    last_pong = max(t for t, addr, m in b.sent_direct if isinstance(m, disco.Pong))
    net.run_until(25.0)
    fell = [t for t, addr in a.endpoint_log if addr is None]
    assert fell, "never fell back to DERP"
    # Not before the trust window ran out, and right when it did.
    assert fell[0] == pytest.approx(last_pong + DIRECT_DELAY + paths.TRUST_UDP)
    peer = a.magic.peer(b.magic.public)
    assert peer.addr_for_send(net.now) == (B_ADDR, True)  # DERP plus the stale address

    net.direct_up = True
    net.run_until(40.0)
    back = [t for t, addr in a.endpoint_log if addr == B_ADDR and t > 25.0]
    assert back and back[0] <= 25.0 + paths.DISCO_PING_INTERVAL + paths.HEARTBEAT
    assert endpoint_at(a, 40.0) == B_ADDR


def test_idle_session_stops_heartbeats() -> None:
    net, a, _ = pair()
    net.keep_active(a, every=1.0, until=5.0)
    net.run_until(200.0)
    last_ping = max(t for t, addr, m in a.sent_direct if isinstance(m, disco.Ping))
    assert last_ping < 5.0 + paths.SESSION_ACTIVE_TIMEOUT
    # With the session idle the direct path's trust lapses and the endpoint goes back to DERP.
    assert endpoint_at(a, 200.0) is None
    assert a.magic.next_timer() is None


DEAD: AddrPort = ("10.9.9.9", 41641)  # a LAN address of B that A cannot reach


def rediscovery_run() -> tuple[Node, Node]:
    net, a, b = pair()
    a.magic.upsert_peer(b.magic.public, B_NODE, [B_ADDR, DEAD], 0.0)
    net.keep_active(a, every=1.0, until=200.0)
    net.run_until(200.0)
    return a, b


def test_full_ping_every_minute_unless_fast() -> None:
    # Latency 20 ms (> 5 ms): besides the 3 s heartbeats to the best path, a full discovery re-runs every
    # 60 s, pinging the other candidates and sending a CallMeMaybe.
    a, b = rediscovery_run()
    dead = [t for t, addr, m in a.sent_direct if addr == DEAD]
    assert dead == pytest.approx([0.0, 60.0, 120.0, 180.0], abs=3.1)
    assert b.magic.stats.received["CallMeMaybe"] == 4
    assert endpoint_at(a, 200.0) == B_ADDR


def test_good_enough_latency_skips_rediscovery(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(__name__ + ".DIRECT_DELAY", 0.001)
    a, b = rediscovery_run()
    assert [t for t, addr, m in a.sent_direct if addr == DEAD] == [0.0]
    assert b.magic.stats.received["CallMeMaybe"] == 1


def test_learns_unknown_source() -> None:
    # A has no endpoints for B in its netmap; B knows A. B's ping teaches A a path.
    net, a, b = pair(a_knows_b=False)
    b.magic.set_self_endpoints([])  # so B's CallMeMaybe does not tell A either
    net.keep_active(b)
    net.run_until(1.0)
    peer_a_side = a.magic.peer(b.magic.public)
    assert B_ADDR in peer_a_side.endpoints
    assert not peer_a_side.endpoints[B_ADDR].from_netmap
    assert endpoint_at(a, 1.0) == B_ADDR  # A pinged back and got a pong
    assert endpoint_at(b, 1.0) == A_ADDR
    # Learned endpoints are forgotten 45 s after the last ping from them.
    net.activity.clear()
    net.next_activity.clear()
    net.run_until(120.0)
    assert B_ADDR not in peer_a_side.endpoints


def test_endpoint_updates_from_netmap() -> None:
    net, a, b = pair()
    net.keep_active(a)
    net.run_until(1.0)
    a.magic.upsert_peer(b.magic.public, B_NODE, [], net.now)
    net.drain(a)
    # B's address is still learned from its pings, so it stays a candidate.
    assert B_ADDR in a.magic.peer(b.magic.public).endpoints


# --- betterAddr -----------------------------------------------------------------------------------------------

PUB4, PUB4B = ("198.51.100.7", 1), ("203.0.113.9", 1)
PRIV4 = ("192.168.1.2", 1)
PUB6 = ("2001:db8::1", 1)
LOOP = ("127.0.0.1", 1)
LL6 = ("fe80::1", 1)
ms = 0.001


@pytest.mark.parametrize(
    ("a", "la", "b", "lb", "want"),
    [
        (PUB4, 10 * ms, None, 0.0, True),
        (None, 0.0, PUB4, 10 * ms, False),
        (PUB4, 10 * ms, PUB4, 5 * ms, False),  # same address
        (PUB4B, 9 * ms, PUB4, 10 * ms, True),  # 10% faster
        (PUB4B, 9.95 * ms, PUB4, 10 * ms, False),  # 0.5% faster: hysteresis
        (PUB4B, 9.9 * ms, PUB4, 10 * ms, False),  # 1 point: still not enough
        (PUB4B, 9.8 * ms, PUB4, 10 * ms, True),  # 2 points
        (PUB4, 10 * ms, PUB4B, 10 * ms, False),  # equal
        (PRIV4, 10 * ms, PUB4, 10 * ms, True),  # private +20
        (PRIV4, 12 * ms, PUB4, 10 * ms, True),  # 17% slower but private
        (PRIV4, 13 * ms, PUB4, 10 * ms, False),  # 23% slower
        (PUB6, 10 * ms, PUB4, 10 * ms, True),  # IPv6 +10
        (PUB4, 10 * ms, PUB6, 10 * ms, False),
        (LOOP, 10 * ms, PRIV4, 10 * ms, True),  # loopback +50
        (LL6, 10 * ms, PRIV4, 10 * ms, True),  # link-local 30 + v6 10 > private 20
        (("192.0.2.1", 1), 10 * ms, PUB4, 10 * ms, False),  # documentation range is not "private" in Go
    ],
)
def test_better_addr(a: AddrPort | None, la: float, b: AddrPort | None, lb: float, want: bool) -> None:
    assert paths.better_addr(a, la, b, lb) is want


def test_hysteresis_between_two_paths() -> None:
    peer = paths.Peer([PUB4, PUB4B], rand=counter_rand())
    peer.note_activity(0.0)
    pings = {a.addr: a.txid for a in iter(peer.next_action, None) if isinstance(a, paths.SendPing)}
    assert set(pings) == {PUB4, PUB4B}
    assert peer.handle_pong(pings[PUB4], PUB4, False, 0.0100) is None
    assert peer.best == PUB4
    assert peer.handle_pong(pings[PUB4B], PUB4B, False, 0.0099) is None
    assert peer.best == PUB4  # 1% better is not better
    assert peer.endpoint == PUB4
    # Keep the session busy; PUB4 answers in 10 ms, PUB4B in 5 ms. Heartbeats ping only the best path, so
    # PUB4B's gain shows up at the one-minute re-discovery, and then it wins (50 points).
    switched_at = None
    t = 1.0
    while t < 70.0:
        peer.note_activity(t)
        due = peer.next_timer()
        if due is not None and due <= t:
            peer.handle_timer(t)
        for a in list(iter(peer.next_action, None)):
            if isinstance(a, paths.SendPing):
                peer.handle_pong(a.txid, a.addr, False, t + (0.010 if a.addr == PUB4 else 0.005))
        if switched_at is None and peer.best == PUB4B:
            switched_at = t
        t += 0.5
    assert switched_at is not None and 60.0 <= switched_at <= 61.0
    assert peer.endpoint == PUB4B


# --- Magic: routing and drops -----------------------------------------------------------------------------------


def test_drops_are_counted_not_raised() -> None:
    _, a, b = pair()
    m = a.magic
    stranger = paths.Magic(C_PRIV, C_NODE, rand=counter_rand())
    stranger.upsert_peer(m.public, A_NODE, [A_ADDR], 0.0)
    stranger.note_activity(A_NODE, 0.0)
    from_stranger = next(x for x in iter(stranger.next_action, None) if isinstance(x, paths.Transmit))
    assert m.receive(from_stranger.data, ("192.0.2.9", 1), 0.0) is None

    box_b = disco.box_for(B_PRIV, m.public)
    forged = bytearray(disco.seal(disco.Ping(bytes(12)), b.magic.public, box_b))
    forged[-1] ^= 0xFF
    assert m.receive(bytes(forged), B_ADDR, 0.0) is None
    assert m.receive(b"\x01\x00\x00\x00junk", B_ADDR, 0.0) is None
    assert m.receive(disco.MAGIC + b"\x00" * 10, B_ADDR, 0.0) is None
    pong = disco.seal(disco.Pong(b"\x99" * 12, A_ADDR), b.magic.public, box_b)
    assert m.receive(pong, B_ADDR, 0.0) is None
    cmm = disco.seal(disco.CallMeMaybe((("192.0.2.50", 9),)), b.magic.public, box_b)
    assert m.receive(cmm, B_ADDR, 0.0) is None
    ping = disco.seal(disco.Ping(b"\x01" * 12), b.magic.public, box_b)
    assert m.receive(ping, None, 0.0, derp_src=C_NODE) is None
    assert m.stats.drops == {
        "unknown_key": 1,
        "bad_box": 1,
        "not_disco": 1,
        "truncated": 1,
        "unsolicited_pong": 1,
        "call_me_maybe_not_via_derp": 1,
        "derp_key_mismatch": 1,
    }
    assert ("192.0.2.50", 9) not in m.peer(b.magic.public).endpoints


def test_ping_over_derp_is_answered_over_derp() -> None:
    _, a, b = pair()
    box_b = disco.box_for(B_PRIV, a.magic.public)
    ping = disco.seal(disco.Ping(b"\x07" * 12, B_NODE), b.magic.public, box_b)
    assert a.magic.receive(ping, None, 1.0, derp_src=B_NODE) == disco.Ping(b"\x07" * 12, B_NODE)
    out = a.magic.next_action()
    assert isinstance(out, paths.Transmit) and out.addr is None and out.node_key == B_NODE
    pong = disco.open_packet(out.data, box_b)
    assert pong == disco.Pong(b"\x07" * 12, (paths.DERP_MAGIC_IP, 0))
    assert a.magic.next_action() is None  # nothing learned from a DERP ping


def test_call_me_maybe_over_derp_pings_each_endpoint() -> None:
    _, a, b = pair(a_knows_b=False)
    eps = tuple((f"203.0.113.{i}", 1000 + i) for i in range(1, 33))
    box_b = disco.box_for(B_PRIV, a.magic.public)
    cmm = disco.seal(disco.CallMeMaybe(eps), b.magic.public, box_b)
    assert a.magic.receive(cmm, None, 1.0, derp_src=B_NODE) is not None
    sent = [x for x in iter(a.magic.next_action, None) if isinstance(x, paths.Transmit)]
    assert {x.addr for x in sent} == set(eps)
    assert all(isinstance(disco.open_packet(x.data, box_b), disco.Ping) for x in sent)
    # A second CallMeMaybe right away pings again: it resets the 5 s interval.
    a.magic.receive(disco.seal(disco.CallMeMaybe(eps[:2]), b.magic.public, box_b), None, 1.5, derp_src=B_NODE)
    again = [x for x in iter(a.magic.next_action, None) if isinstance(x, paths.Transmit)]
    assert {x.addr for x in again} == set(eps[:2])
    assert set(a.magic.peer(b.magic.public).endpoints) == set(eps[:2])


def test_pong_from_other_address_is_not_proof() -> None:
    peer = paths.Peer([PUB4], rand=counter_rand())
    peer.note_activity(0.0)
    ping = next(x for x in iter(peer.next_action, None) if isinstance(x, paths.SendPing))
    assert peer.handle_pong(ping.txid, PUB4B, False, 0.01) == "pong_src_mismatch"
    assert peer.best is None
    # The txid stays pending; the real pong still counts, once.
    assert peer.handle_pong(ping.txid, PUB4, False, 0.02) is None
    assert peer.handle_pong(ping.txid, PUB4, False, 0.03) == "unsolicited_pong"


def test_ping_timeout_forgets_txid() -> None:
    peer = paths.Peer([PUB4], rand=counter_rand())
    peer.note_activity(0.0)
    ping = next(x for x in iter(peer.next_action, None) if isinstance(x, paths.SendPing))
    assert peer.next_timer() == paths.HEARTBEAT  # before the ping timeout
    peer.handle_timer(paths.PING_TIMEOUT)
    assert ping.txid not in peer.sent
    assert peer.handle_pong(ping.txid, PUB4, False, 5.1) == "unsolicited_pong"


def test_learned_endpoints_are_capped() -> None:
    peer = paths.Peer(rand=counter_rand())
    for i in range(500):
        peer.handle_ping(bytes(12), (f"198.51.100.{i % 250}", 1000 + i), False, 0.0)
    assert len(peer.endpoints) == paths.MAX_ENDPOINTS
    assert len(peer.sent) <= paths.MAX_INFLIGHT


@given(st.lists(st.binary(max_size=200), max_size=20))
def test_fuzz_receive(packets: list[bytes]) -> None:
    m = paths.Magic(A_PRIV, A_NODE, rand=counter_rand())
    m.upsert_peer(disco.public_key(B_PRIV), B_NODE, [B_ADDR], 0.0)
    box_b = disco.box_for(B_PRIV, m.public)
    for i, p in enumerate(packets):
        # Half raw garbage, half garbage sealed correctly by a known peer.
        if i % 2:
            p = disco.MAGIC + disco.public_key(B_PRIV) + bytes(24) + bytes(box_b.encrypt(p, bytes(24)).ciphertext)
        m.receive(p, B_ADDR if i % 3 else None, float(i), derp_src=B_NODE)
        while m.next_action() is not None:
            pass
    assert sum(m.stats.drops.values()) + sum(m.stats.received.values()) == len(packets)


def test_new_disco_key_replaces_old_state() -> None:
    net, a, b = pair()
    net.keep_active(a)
    net.run_until(1.0)
    old = b.magic.public
    assert a.magic.peer(old).best == B_ADDR
    new = disco.public_key(b"\x0d" * 32)
    a.magic.upsert_peer(new, B_NODE, [B_ADDR], net.now)
    with pytest.raises(KeyError):
        a.magic.peer(old)
    fresh = a.magic.peer_by_node(B_NODE)
    assert fresh is a.magic.peer(new) and fresh.best is None
    assert set(a.magic.peers()) == {B_NODE}
    # Packets sealed with the old key are now from an unknown key.
    stale = disco.seal(disco.Ping(bytes(12)), old, disco.box_for(B_PRIV, a.magic.public))
    assert a.magic.receive(stale, B_ADDR, net.now) is None
    assert a.magic.stats.drops["unknown_key"] == 1
