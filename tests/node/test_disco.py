from __future__ import annotations

import pytest
from hypothesis import given
from hypothesis import strategies as st

from node import disco

TXID = bytes(range(1, 13))
KEY = bytes([0, 1, 2] + [0] * 27 + [30, 31])

# Inner plaintexts: one table for encode and decode. The layouts are Tailscale's disco/disco_test.go cases.
INNER = [
    ("ping", disco.Ping(TXID), "01 00 01 02 03 04 05 06 07 08 09 0a 0b 0c"),
    (
        "ping_with_nodekey",
        disco.Ping(TXID, KEY),
        "01 00 01 02 03 04 05 06 07 08 09 0a 0b 0c 00 01 02" + " 00" * 27 + " 1e 1f",
    ),
    ("ping_with_padding", disco.Ping(TXID, None, 3), "01 00 01 02 03 04 05 06 07 08 09 0a 0b 0c 00 00 00"),
    (
        "ping_with_padding_and_nodekey",
        disco.Ping(TXID, KEY, 3),
        "01 00 01 02 03 04 05 06 07 08 09 0a 0b 0c 00 01 02" + " 00" * 27 + " 1e 1f 00 00 00",
    ),
    (
        "pong",
        disco.Pong(TXID, ("2.3.4.5", 1234)),
        "02 00 01 02 03 04 05 06 07 08 09 0a 0b 0c 00 00 00 00 00 00 00 00 00 00 ff ff 02 03 04 05 04 d2",
    ),
    (
        "pong_v6",
        disco.Pong(TXID, ("fed0::12", 6666)),
        "02 00 01 02 03 04 05 06 07 08 09 0a 0b 0c fe d0 00 00 00 00 00 00 00 00 00 00 00 00 00 12 1a 0a",
    ),
    ("call_me_maybe_empty", disco.CallMeMaybe(()), "03 00"),
    (
        "call_me_maybe",
        disco.CallMeMaybe((("1.2.3.4", 567), ("2001::3456", 789))),
        "03 00 00 00 00 00 00 00 00 00 00 00 ff ff 01 02 03 04 02 37"
        " 20 01 00 00 00 00 00 00 00 00 00 00 00 00 34 56 03 15",
    ),
]


@pytest.mark.parametrize(("name", "msg", "wire"), INNER, ids=[r[0] for r in INNER])
def test_inner_vectors(name: str, msg: disco.Message, wire: str) -> None:
    raw = bytes.fromhex(wire)
    assert disco.encode_message(msg) == raw
    assert disco.decode_message(raw) == msg


# Sealed packets, built once with these fixed keys and nonce.
SENDER_PRIV = b"\x01" * 32
RECEIVER_PRIV = b"\x02" * 32
SENDER_PUB = bytes.fromhex("a4e09292b651c278b9772c569f5fa9bb13d906b46ab68c9df9dc2b4409f8a209")
RECEIVER_PUB = bytes.fromhex("ce8d3ad1ccb633ec7b70c17814a5c76ecd029685050d344745ba05870e587d59")
NONCE = bytes(range(24))
HEAD = "5453f09f92ac" + SENDER_PUB.hex() + NONCE.hex()
SEALED = [
    (
        disco.Ping(TXID, bytes(range(1, 33))),
        HEAD + "0c58df134486e18e2e5ce7fe6c8dead9e3cf82c19935e330be5e71cdc79006fad8d779e0a4bfc2780a4c562c2f00fd"
        "aed579d09e4f8c0fcba09ac056cb88",
    ),
    (
        disco.Pong(TXID, ("2.3.4.5", 1234)),
        HEAD + "2a6470b5ea76d49d91839f5f1feacdace0cf82c19935e330be5e71cdc79007f8dbd37ce6a3b7cb72febf59212415e86e",
    ),
    (
        disco.CallMeMaybe((("1.2.3.4", 567), ("2001::3456", 789))),
        HEAD + "a8c53d7edff0bb26902187f214cd4091e1cf83c39a31e636b95678c7336306fad8d77ed183b6cb7201405b222010ec"
        "bcc66df1de5b81",
    ),
]


def test_keys() -> None:
    assert disco.public_key(SENDER_PRIV) == SENDER_PUB
    assert disco.public_key(RECEIVER_PRIV) == RECEIVER_PUB


@pytest.mark.parametrize(("msg", "wire"), SEALED)
def test_sealed_vectors(msg: disco.Message, wire: str) -> None:
    raw = bytes.fromhex(wire)
    assert disco.seal(msg, SENDER_PUB, disco.box_for(SENDER_PRIV, RECEIVER_PUB), NONCE) == raw
    assert disco.looks_like_disco(raw)
    assert disco.sender_key(raw) == SENDER_PUB
    assert disco.open_packet(raw, disco.box_for(RECEIVER_PRIV, SENDER_PUB)) == msg


def test_random_nonce_differs() -> None:
    box = disco.box_for(SENDER_PRIV, RECEIVER_PUB)
    a = disco.seal(disco.Ping(TXID), SENDER_PUB, box)
    b = disco.seal(disco.Ping(TXID), SENDER_PUB, box)
    assert a != b
    assert disco.open_packet(a, disco.box_for(RECEIVER_PRIV, SENDER_PUB)) == disco.Ping(TXID)


def test_wrong_key_fails_to_open() -> None:
    raw = bytes.fromhex(SEALED[0][1])
    third = disco.box_for(b"\x03" * 32, SENDER_PUB)
    with pytest.raises(disco.OpenFailed, match="did not open"):
        disco.open_packet(raw, third)


def test_flipped_bit_fails_to_open() -> None:
    raw = bytearray(bytes.fromhex(SEALED[1][1]))
    raw[-1] ^= 1
    with pytest.raises(disco.OpenFailed):
        disco.open_packet(bytes(raw), disco.box_for(RECEIVER_PRIV, SENDER_PUB))


@pytest.mark.parametrize(
    ("data", "err", "reason"),
    [
        (b"", disco.Truncated, "truncated"),
        (b"TS\xf0", disco.Truncated, "truncated"),
        (b"TS\xf0\x9f\x92\xac" + b"\x00" * 40, disco.Truncated, "truncated"),
        (b"\x01\x00\x00\x01" + b"\x00" * 100, disco.NotDisco, "not_disco"),
        (b"XS\xf0\x9f\x92\xac" + b"\x00" * 100, disco.NotDisco, "not_disco"),
    ],
)
def test_header_errors(data: bytes, err: type[disco.DiscoError], reason: str) -> None:
    with pytest.raises(err) as info:
        disco.sender_key(data)
    assert info.value.reason == reason


@pytest.mark.parametrize(
    ("plain", "err", "match"),
    [
        (b"", disco.Truncated, "no type"),
        (b"\x01", disco.Truncated, "no type"),
        (b"\x01\x00" + b"\x00" * 11, disco.BadMessage, "ping body of 11 bytes"),
        (b"\x02\x00" + b"\x00" * 29, disco.BadMessage, "pong body of 29 bytes"),
        (b"\x04\x00", disco.UnknownMessage, "0x04"),
        (b"\xff\x00abc", disco.UnknownMessage, "0xff"),
        (b"\x03\x00" + b"\x00" * 18 * 33, disco.BadMessage, "33 endpoints"),
    ],
)
def test_message_errors(plain: bytes, err: type[disco.DiscoError], match: str) -> None:
    with pytest.raises(err, match=match):
        disco.decode_message(plain)


def test_trailing_bytes_ignored() -> None:
    pong = bytes.fromhex(INNER[4][2])
    assert disco.decode_message(pong + b"future") == INNER[4][1]
    cmm = bytes.fromhex(INNER[7][2])
    assert disco.decode_message(cmm + b"\x00" * 17) == INNER[7][1]


def test_zero_node_key_means_none() -> None:
    plain = b"\x01\x00" + TXID + b"\x00" * 40
    assert disco.decode_message(plain) == disco.Ping(TXID, None, 40)
    assert disco.encode_message(disco.Ping(TXID, None, 40)) == plain
    with pytest.raises(ValueError, match="all zeros"):
        disco.Ping(TXID, b"\x00" * 32)


def test_constructor_checks() -> None:
    with pytest.raises(ValueError, match="txid must be 12 bytes"):
        disco.Ping(b"short")
    with pytest.raises(ValueError, match="too many endpoints"):
        disco.CallMeMaybe(tuple(("10.0.0.1", i) for i in range(33)))
    with pytest.raises(ValueError, match="port out of range"):
        disco.Pong(TXID, ("1.2.3.4", 70000))
    assert disco.Pong(TXID, ("::ffff:1.2.3.4", 1)).src == ("1.2.3.4", 1)


addrs = st.one_of(st.ip_addresses(v=4).map(str), st.ip_addresses(v=6).map(str)).flatmap(
    lambda ip: st.integers(0, 65535).map(lambda p: (ip, p))
)
messages = st.one_of(
    st.builds(
        disco.Ping,
        st.binary(min_size=12, max_size=12),
        st.one_of(st.none(), st.binary(min_size=32, max_size=32).filter(any)),
        st.integers(0, 1500),
    ),
    st.builds(disco.Pong, st.binary(min_size=12, max_size=12), addrs),
    st.builds(disco.CallMeMaybe, st.lists(addrs, max_size=disco.MAX_CALL_ME_MAYBE).map(tuple)),
)


@given(messages)
def test_roundtrip(msg: disco.Message) -> None:
    assert disco.decode_message(disco.encode_message(msg)) == msg
    box = disco.box_for(SENDER_PRIV, RECEIVER_PUB)
    opener = disco.box_for(RECEIVER_PRIV, SENDER_PUB)
    assert disco.open_packet(disco.seal(msg, SENDER_PUB, box), opener) == msg


@given(st.binary(max_size=400))
def test_fuzz_inner(data: bytes) -> None:
    try:
        msg = disco.decode_message(data)
    except disco.DiscoError:
        return
    # Whatever decodes re-encodes to a prefix-compatible message that decodes the same.
    assert disco.decode_message(disco.encode_message(msg)) == msg


@given(st.binary(max_size=300), st.booleans())
def test_fuzz_packet(data: bytes, with_magic: bool) -> None:
    packet = disco.MAGIC + data if with_magic else data
    try:
        disco.sender_key(packet)
        disco.open_packet(packet, disco.box_for(RECEIVER_PRIV, SENDER_PUB))
    except disco.DiscoError:
        pass


@given(st.binary(min_size=2, max_size=200))
def test_fuzz_sealed_garbage(plain: bytes) -> None:
    # Arbitrary plaintext inside a valid box: only the codec's own errors may come out.
    box = disco.box_for(SENDER_PRIV, RECEIVER_PUB)
    packet = disco.MAGIC + SENDER_PUB + NONCE + bytes(box.encrypt(plain, NONCE).ciphertext)
    try:
        disco.open_packet(packet, disco.box_for(RECEIVER_PRIV, SENDER_PUB))
    except disco.DiscoError as e:
        assert e.reason in {"truncated", "unknown_type", "bad_message"}
