"""Golden vectors for every DERP frame, used both ways, and fuzzing of the decoder and the frame buffer."""

from __future__ import annotations

import contextlib

import pytest
from hypothesis import given
from hypothesis import strategies as st

from derp import frames as f

K = "000102030405060708090a0b0c0d0e0f101112131415161718191a1b1c1d1e1f"  # a 32-byte key, hex
K2 = "202122232425262728292a2b2c2d2e2f303132333435363738393a3b3c3d3e3f"
N = "000102030405060708090a0b0c0d0e0f1011121314151617"  # a 24-byte nonce
KB, K2B, NB = bytes.fromhex(K), bytes.fromhex(K2), bytes.fromhex(N)

# (frame hex, decoded frame, encoder call)
VECTORS = [
    ("0100000028" + "44455250f09f9491" + K, f.ServerKey(KB), lambda: f.encode_server_key(KB)),
    ("020000003b" + K + N + "626f78", f.ClientInfo(KB, NB, b"box"), lambda: f.encode_client_info(KB, NB, b"box")),
    ("030000001a" + N + "6278", f.ServerInfo(NB, b"bx"), lambda: f.encode_server_info(NB, b"bx")),
    ("0400000022" + K + "6869", f.SendPacket(KB, b"hi"), lambda: f.encode_send_packet(KB, b"hi")),
    ("0500000022" + K + "6869", f.RecvPacket(KB, b"hi"), lambda: f.encode_recv_packet(KB, b"hi")),
    ("0600000000", f.KeepAlive(), f.encode_keep_alive),
    ("070000000101", f.NotePreferred(True), lambda: f.encode_note_preferred(True)),
    ("070000000100", f.NotePreferred(False), lambda: f.encode_note_preferred(False)),
    ("0800000021" + K + "01", f.PeerGone(KB, 1), lambda: f.encode_peer_gone(KB, f.PeerGoneReason.NOT_HERE)),
    (
        "0900000033" + K + "00000000000000000000ffffc0000201" + "a2a9" + "01",
        f.PeerPresent(KB, bytes.fromhex("00000000000000000000ffffc0000201"), 41641, 1),
        lambda: f.encode_peer_present(KB, bytes.fromhex("00000000000000000000ffffc0000201"), 41641, 1),
    ),
    ("0a00000041" + K + K2 + "78", f.ForwardPacket(KB, K2B, b"x"), lambda: f.encode_forward_packet(KB, K2B, b"x")),
    ("1000000000", f.WatchConns(), f.encode_watch_conns),
    ("1100000020" + K, f.ClosePeer(KB), lambda: f.encode_close_peer(KB)),
    ("12000000083132333435363738", f.Ping(b"12345678"), lambda: f.encode_ping(b"12345678")),
    ("13000000083132333435363738", f.Pong(b"12345678"), lambda: f.encode_pong(b"12345678")),
    ("1400000003647570", f.Health("dup"), lambda: f.encode_health("dup")),
    ("1500000008000003e800001388", f.Restarting(1000, 5000), lambda: f.encode_restarting(1000, 5000)),
]


@pytest.mark.parametrize("hexframe,decoded,encode", VECTORS, ids=[type(v[1]).__name__ for v in VECTORS])
def test_golden(hexframe: str, decoded: f.Frame, encode: object) -> None:
    wire = bytes.fromhex(hexframe)
    assert callable(encode)
    assert encode() == wire
    buf = f.FrameBuffer()
    buf.feed(wire)
    got = buf.next_frame()
    assert got is not None
    assert f.decode(*got) == decoded
    assert buf.next_frame() is None and len(buf) == 0


def test_all_frame_types_have_a_vector() -> None:
    covered = {bytes.fromhex(h)[0] for h, _, _ in VECTORS}
    assert covered == {int(t) for t in f.FrameType}


def test_old_server_peer_gone_and_peer_present_short_forms() -> None:
    assert f.decode(f.FrameType.PEER_GONE, KB) == f.PeerGone(KB, 0)
    assert f.decode(f.FrameType.PEER_PRESENT, KB) == f.PeerPresent(KB, bytes(16), 0, 1)


def test_unknown_frame_is_kept_not_fatal() -> None:
    assert f.decode(0x7F, b"future") == f.Unknown(0x7F, b"future")


@pytest.mark.parametrize(
    "ftype,payload,message",
    [
        (f.FrameType.SEND_PACKET, b"short", "SendPacket frame has 5 payload bytes, want at least 32"),
        (f.FrameType.SEND_PACKET, bytes(32 + 65537), "SendPacket packet of 65537 bytes is over 65536"),
        (f.FrameType.SERVER_KEY, b"DERPxxxx" + KB, "ServerKey frame has a bad magic"),
        (f.FrameType.NOTE_PREFERRED, b"\x01\x01", "NotePreferred frame has 2 payload bytes, want exactly 1"),
        (f.FrameType.PING, bytes(1001), "Ping frame of 1001 bytes is over 1000"),
        (f.FrameType.PING, bytes(7), "Ping frame has 7 payload bytes, want at least 8"),
        (f.FrameType.CLOSE_PEER, bytes(33), "ClosePeer frame has 33 payload bytes, want exactly 32"),
        (f.FrameType.CLIENT_INFO, bytes(300 << 10), f"ClientInfo of {300 << 10} bytes is over 262144"),
    ],
)
def test_bad_frames_have_precise_errors(ftype: int, payload: bytes, message: str) -> None:
    with pytest.raises(f.RemoteFrameError) as e:
        f.decode(ftype, payload)
    assert str(e.value) == message


def test_oversized_frame_refused_at_header() -> None:
    buf = f.FrameBuffer(max_frame=f.MAX_FRAME_LEN)
    with pytest.raises(f.RemoteFrameError, match="declares 10485760 bytes, over the limit of 65600"):
        buf.feed(f.header(f.FrameType.SEND_PACKET, 10 << 20))


def test_client_info_limit_is_256k() -> None:
    buf = f.FrameBuffer(max_frame=100)
    buf.feed(f.header(f.FrameType.CLIENT_INFO, 256 << 10))  # allowed
    with pytest.raises(f.RemoteFrameError):
        f.FrameBuffer(max_frame=100).feed(f.header(f.FrameType.CLIENT_INFO, (256 << 10) + 1))


def test_encoder_misuse() -> None:
    with pytest.raises(f.LocalFrameError, match="destination key must be 32 bytes, got 3"):
        f.encode_send_packet(b"abc", b"")
    with pytest.raises(f.LocalFrameError, match="packet of 65537 bytes is over 65536"):
        f.encode_send_packet(KB, bytes(65537))


def test_frames_split_across_reads() -> None:
    wire = f.encode_send_packet(KB, b"one") + f.encode_ping(b"abcdefgh") + f.encode_recv_packet(K2B, b"two")
    buf = f.FrameBuffer()
    out: list[f.Frame] = []
    for i in range(len(wire)):
        buf.feed(wire[i : i + 1])
        out.extend(f.decode(t, p) for t, p in buf.frames())
    assert out == [f.SendPacket(KB, b"one"), f.Ping(b"abcdefgh"), f.RecvPacket(K2B, b"two")]


@given(st.integers(0, 255), st.binary(max_size=2048))
def test_fuzz_decode(ftype: int, payload: bytes) -> None:
    with contextlib.suppress(f.RemoteFrameError):
        f.decode(ftype, payload)


@given(st.lists(st.binary(max_size=300), max_size=20))
def test_fuzz_frame_buffer_is_bounded(chunks: list[bytes]) -> None:
    buf = f.FrameBuffer(max_frame=1024)
    try:
        for c in chunks:
            buf.feed(c)
            for t, p in buf.frames():
                assert len(p) <= (256 << 10 if t == f.FrameType.CLIENT_INFO else 1024)
                with contextlib.suppress(f.RemoteFrameError):
                    f.decode(t, p)
            # Never more than one incomplete frame plus the last read.
            assert len(buf) <= (256 << 10) + 5 + 300
    except f.RemoteFrameError:
        pass
