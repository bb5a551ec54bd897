"""The BPF programs as bytes and as behaviour (through the interpreter), and the raw packet codecs."""

from __future__ import annotations

import struct

import pytest
from hypothesis import given
from hypothesis import strategies as st

from node import bpf, disco, rawsock

PORT = 41641
STUN = bytes.fromhex("0101000c2112a442") + bytes(12) + bytes(12)  # a binding response, cookie at 4
DISCO = disco.MAGIC + bytes(32 + 24 + 16 + 14)
WG_DATA = bytes.fromhex("04000000") + bytes.fromhex("deadbeef") + bytes(8) + bytes(48)
WG_INIT = bytes.fromhex("01000000") + bytes(144)


def ipv4(payload: bytes, dport: int = PORT, sport: int = 5555, options: bytes = b"") -> bytes:
    assert len(options) % 4 == 0
    ihl = 5 + len(options) // 4
    udp = struct.pack("!HHHH", sport, dport, 8 + len(payload), 0) + payload
    total = ihl * 4 + len(udp)
    hdr = struct.pack(
        "!BBHHHBBH4s4s", 0x40 | ihl, 0, total, 1, 0, 64, 17, 0, bytes([198, 51, 100, 7]), bytes([203, 0, 113, 1])
    )
    return hdr + options + udp


def udp6(payload: bytes, dport: int = PORT, sport: int = 5555) -> bytes:
    return struct.pack("!HHHH", sport, dport, 8 + len(payload), 0) + payload


def test_v4_program_bytes() -> None:
    # The 9-instruction program of ARCHITECTURE.md, as the kernel reads it (little-endian host).
    want = (
        "b1 00 00 00 00 00 00 00"  # ldxb 4*([0]&0xf)
        " 48 00 00 00 02 00 00 00"  # ldh [x+2]
        " 15 00 00 04 a9 a2 00 00"  # jeq #41641, else ret #0
        " 40 00 00 00 08 00 00 00"  # ld [x+8]
        " 15 00 03 00 9f f0 53 54"  # jeq #"TS\xf0\x9f" -> accept
        " 40 00 00 00 0c 00 00 00"  # ld [x+12]
        " 15 00 01 00 42 a4 12 21"  # jeq #0x2112a442 -> accept
        " 06 00 00 00 00 00 00 00"  # ret #0
        " 06 00 00 00 ff ff ff ff"  # ret #-1
    )
    if struct.pack("=H", 1) == b"\x01\x00":
        assert bpf.pack(bpf.program_v4(PORT)) == bytes.fromhex(want)
    assert len(bpf.program_v4(PORT)) == 9
    assert len(bpf.pack(bpf.program_v4(PORT))) == 72


def test_v6_program_bytes() -> None:
    prog = bpf.program_v6(PORT)
    assert prog[0] == bpf.Insn(0x28, 0, 0, 2)  # ldh [2]
    assert prog[2] == bpf.Insn(0x20, 0, 0, 8)  # ld [8]
    assert len(bpf.pack(prog)) == 8 * len(prog)


@pytest.mark.parametrize(
    ("packet", "keep"),
    [
        (ipv4(DISCO), True),
        (ipv4(STUN), True),
        (ipv4(DISCO, options=b"\x01\x01\x01\x00"), True),  # IP options move UDP: X follows them
        (ipv4(STUN, options=bytes(8)), True),
        (ipv4(WG_DATA), False),
        (ipv4(WG_INIT), False),
        (ipv4(DISCO, dport=PORT + 1), False),
        (ipv4(STUN, dport=3478), False),
        (ipv4(b"TS"), False),  # too short to load 4 bytes: dropped
        (ipv4(b""), False),
        (ipv4(b"TS\xf0\x9fxx"), True),  # 4 magic bytes are enough for the filter; the codec checks the rest
        (b"", False),
        (b"\x45", False),
    ],
)
def test_v4_filter(packet: bytes, keep: bool) -> None:
    assert bool(bpf.run(bpf.program_v4(PORT), packet)) is keep


@pytest.mark.parametrize(
    ("datagram", "keep"),
    [
        (udp6(DISCO), True),
        (udp6(STUN), True),
        (udp6(WG_DATA), False),
        (udp6(DISCO, dport=1), False),
        (udp6(b"abc"), False),
    ],
)
def test_v6_filter(datagram: bytes, keep: bool) -> None:
    assert bool(bpf.run(bpf.program_v6(PORT), datagram)) is keep


def reference_v4(packet: bytes) -> bool:
    if len(packet) < 1:
        return False
    x = 4 * (packet[0] & 0xF)
    if len(packet) < x + 4 or int.from_bytes(packet[x + 2 : x + 4], "big") != PORT:
        return False
    if len(packet) >= x + 12 and packet[x + 8 : x + 12] == disco.MAGIC[:4]:
        return True
    return len(packet) >= x + 16 and packet[x + 12 : x + 16] == bytes.fromhex("2112a442")


@given(
    st.one_of(
        st.binary(max_size=80),
        st.builds(
            ipv4,
            st.one_of(st.binary(max_size=30), st.sampled_from([DISCO, STUN, WG_DATA])),
            st.sampled_from([PORT, PORT + 1, 3478]),
        ),
    )
)
def test_filter_matches_reference(packet: bytes) -> None:
    assert bool(bpf.run(bpf.program_v4(PORT), packet)) is reference_v4(packet)


def test_bad_port() -> None:
    with pytest.raises(ValueError, match="port out of range"):
        bpf.program_v4(0)
    with pytest.raises(ValueError, match="port out of range"):
        bpf.program_v6(70000)


def test_interpreter_rejects_unknown_opcode() -> None:
    with pytest.raises(bpf.BpfError, match="unsupported opcode 0x04"):
        bpf.run([bpf.Insn(0x04, 0, 0, 1)], b"x")
    with pytest.raises(bpf.BpfError, match="fell off"):
        bpf.run([bpf.Insn(bpf.LD | bpf.W | bpf.ABS, 0, 0, 0)], b"abcd")


# --- packet codecs -----------------------------------------------------------------------------------------


def test_udp_header() -> None:
    assert rawsock.udp_header(41641, 3478, 20) == bytes.fromhex("a2a9 0d96 001c 0000")
    with pytest.raises(ValueError, match="too big"):
        rawsock.udp_header(1, 2, 65530)


def test_parse_v4() -> None:
    assert rawsock.parse_v4(ipv4(b"hello", sport=999), PORT) == (b"hello", ("198.51.100.7", 999))
    assert rawsock.parse_v4(ipv4(b"hi", options=bytes(4)), PORT) == (b"hi", ("198.51.100.7", 5555))
    # The UDP length field bounds the payload (Ethernet padding may follow it).
    assert rawsock.parse_v4(ipv4(b"hi") + b"\x00\x00", PORT)[0] == b"hi"


@pytest.mark.parametrize(
    ("packet", "match"),
    [
        (b"", "not an IPv4"),
        (b"\x60" + bytes(40), "not an IPv4"),
        (b"\x44" + bytes(30), "header length 16"),
        (ipv4(b"x", dport=80), "port 80"),
        (ipv4(b"x")[:26], "26 bytes with header length 20"),
    ],
)
def test_parse_v4_errors(packet: bytes, match: str) -> None:
    with pytest.raises(rawsock.RawPacketError, match=match):
        rawsock.parse_v4(packet, PORT)


def test_parse_v6() -> None:
    assert rawsock.parse_v6(udp6(b"abc", sport=7), "fe80::1%eth0", PORT) == (b"abc", ("fe80::1", 7))
    bad = bytearray(udp6(b"abc"))
    bad[5] = 99  # length beyond the datagram
    with pytest.raises(rawsock.RawPacketError, match="length field 99"):
        rawsock.parse_v6(bytes(bad), "::1", PORT)


@given(st.binary(max_size=100), st.booleans())
def test_fuzz_parse(data: bytes, v6: bool) -> None:
    try:
        payload, (_, port) = rawsock.parse_v6(data, "::1", PORT) if v6 else rawsock.parse_v4(data, PORT)
    except rawsock.RawPacketError:
        return
    assert len(payload) <= len(data)
    assert port <= 0xFFFF
