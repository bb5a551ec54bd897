"""The relay's fast path (derp.scan) against a plain frame-by-frame reference: golden cases and hypothesis fuzzing."""

from __future__ import annotations

import os

from hypothesis import given, settings
from hypothesis import strategies as st

from derp import frames as f
from derp.scan import DISCO_MAGIC, Scanner, split_disco

SRC = bytes(range(32))
KEYS = [bytes([i]) * 32 for i in (0xA1, 0xB2, 0xC3)]


def reference(wire: bytes, src: bytes) -> tuple[list[tuple[bytes, bytes]], list[tuple[int, bytes]], bool, int]:
    """Frame by frame: (dst, RecvPacket frame) in order, control frames, whether a bad frame stopped it, end."""
    pos = 0
    packets: list[tuple[bytes, bytes]] = []
    controls: list[tuple[int, bytes]] = []
    while len(wire) - pos >= 5:
        ftype, length = f.HEADER.unpack_from(wire, pos)
        bad_send = ftype == f.FrameType.SEND_PACKET and not 32 <= length <= 32 + f.MAX_PACKET_SIZE
        if bad_send or length > f.MAX_FRAME_LEN:
            return packets, controls, True, pos
        if pos + 5 + length > len(wire):
            break
        payload = wire[pos + 5 : pos + 5 + length]
        if ftype == f.FrameType.SEND_PACKET:
            packets.append((payload[:32], f.encode_recv_packet(src, payload[32:])))
        else:
            controls.append((ftype, payload))
        pos += 5 + length
    return packets, controls, False, pos


def run_scan(wire: bytes, src: bytes = SRC, lead: int = 0) -> tuple[list[tuple[bytes, bytes]], object]:
    buf = bytearray(os.urandom(lead)) + bytearray(wire) + bytearray(os.urandom(7))
    res = Scanner().scan(buf, lead + len(wire), src, start=lead)
    got: list[tuple[bytes, bytes]] = []
    for i, (dst, start, stop, n) in enumerate(res.runs):
        if i and res.runs[i - 1][2] == start:
            assert dst != res.runs[i - 1][0], "contiguous runs share a destination"
        pos, count = start, 0
        while pos < stop:
            _, length = f.HEADER.unpack_from(buf, pos)
            got.append((dst, bytes(buf[pos : pos + 5 + length])))
            pos += 5 + length
            count += 1
        assert pos == stop and count == n
    return got, res


def check(wire: bytes, lead: int = 0) -> None:
    packets, controls, bad, end = reference(wire, SRC)
    got, res = run_scan(wire, lead=lead)
    assert got == packets
    assert res.controls == controls  # type: ignore[attr-defined]
    assert bool(res.error) == bad  # type: ignore[attr-defined]
    assert res.pos == lead + end  # type: ignore[attr-defined]


def send(dst: bytes, size: int, fill: int = 0x55) -> bytes:
    return f.encode_send_packet(dst, bytes([fill]) * size)


def test_rewrites_in_place_and_groups_runs() -> None:
    wire = send(KEYS[0], 10) + send(KEYS[0], 20) + f.encode_ping(b"12345678") + send(KEYS[1], 10)
    buf = bytearray(wire)
    res = Scanner().scan(buf, len(buf), SRC)
    one, two = f.encode_recv_packet(SRC, b"\x55" * 10), f.encode_recv_packet(SRC, b"\x55" * 20)
    assert bytes(buf[: len(one) + len(two)]) == one + two
    assert res.runs == [(KEYS[0], 0, len(one) + len(two), 2), (KEYS[1], len(wire) - len(one), len(wire), 1)]
    assert res.controls == [(f.FrameType.PING, b"12345678")]
    assert res.pos == len(wire) and res.error == ""


def test_long_runs_with_a_stranger_at_every_chunk_boundary() -> None:
    # 1,000 equal frames exercise the chunked Struct check and the strided rewrite; one frame to another peer
    # (or of another size, or a control frame) at positions around the chunk edges must end the run exactly there.
    for odd in (send(KEYS[1], 100), send(KEYS[0], 101), f.encode_ping(b"abcdefgh")):
        for at in (1, 2, 3, 9, 10, 11, 25, 26, 27, 57, 58, 59, 121, 122, 123, 249, 250, 251, 505, 506, 507, 999):
            frames_ = [send(KEYS[0], 100, fill=i % 251) for i in range(1000)]
            frames_[at] = odd
            check(b"".join(frames_))


def test_partial_frame_and_bad_frame_stop_the_scan() -> None:
    whole = send(KEYS[0], 50) * 40
    check(whole + send(KEYS[0], 50)[:-1])  # incomplete last frame: left for the next read
    check(whole + f.header(f.FrameType.SEND_PACKET, 31) + bytes(31) + whole)  # too short for a key
    check(whole + f.header(f.FrameType.PING, f.MAX_FRAME_LEN + 1))  # declares too much
    check(whole, lead=1000)


def test_a_run_never_reaches_past_end() -> None:
    wire = send(KEYS[0], 64) * 100
    buf = bytearray(wire)
    res = Scanner().scan(buf, len(wire) - 1, SRC)
    assert res.runs == [(KEYS[0], 0, len(send(KEYS[0], 64)) * 99, 99)]
    assert bytes(buf[-len(send(KEYS[0], 64)) :]) == send(KEYS[0], 64)  # the incomplete frame is untouched


frame_st = st.one_of(
    st.tuples(st.sampled_from(KEYS), st.sampled_from([0, 1, 60, 61, 1200]), st.integers(1, 80)).map(
        lambda t: send(t[0], t[1], fill=t[2]) * t[2]
    ),
    st.binary(min_size=8, max_size=8).map(f.encode_ping),
    st.booleans().map(f.encode_note_preferred),
    st.tuples(st.integers(0x16, 0xFF), st.binary(max_size=40)).map(lambda t: f.frame(t[0], t[1])),
    st.binary(min_size=32, max_size=40).map(lambda b: f.frame(f.FrameType.SEND_PACKET, b)),
)


@settings(max_examples=150, deadline=None)
@given(st.lists(frame_st, max_size=12), st.integers(0, 50), st.binary(max_size=8), st.integers(0, 3))
def test_fuzz_scan_matches_reference(parts: list[bytes], cut: int, junk: bytes, lead: int) -> None:
    wire = b"".join(parts)
    wire = wire[: max(0, len(wire) - cut)] + (junk if cut == 0 else b"")
    check(wire, lead=lead)


@settings(max_examples=200, deadline=None)
@given(st.binary(max_size=300))
def test_fuzz_arbitrary_bytes_never_crash(data: bytes) -> None:
    check(data)


def test_split_disco() -> None:
    disco = f.encode_recv_packet(SRC, DISCO_MAGIC + b"ping")
    data = [f.encode_recv_packet(SRC, b"wg %d" % i) for i in range(3)]
    got_disco, rest, n = split_disco(data[0] + disco + data[1] + disco + data[2])
    assert got_disco == [disco, disco]
    assert rest == b"".join(data) and n == 3
    # The magic inside a packet, not at its start, is not disco.
    not_disco = f.encode_recv_packet(SRC, b"x" + DISCO_MAGIC)
    assert split_disco(not_disco) == ([], not_disco, 1)
