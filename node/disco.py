"""Disco: the small sealed messages that find a direct path between two nodes (Tailscale's format).

Wire format (all integers big-endian; the layout of ts:disco/disco.go)::

    packet := magic[6] sender_disco_pub[32] nonce[24] box
    magic  := "TS💬" = 54 53 f0 9f 92 ac
    box    := NaCl box (Curve25519 + XSalsa20-Poly1305) of `inner`, sealed with the sender's disco private key
              to the receiver's disco public key; 16 bytes of Poly1305 tag precede the ciphertext
    inner  := type[1] version[1]=0 body

    type 0x01 Ping        body := txid[12] [node_key[32]] padding...  (key omitted or zero = none)
    type 0x02 Pong        body := txid[12] ip[16] port[2]     (observed source; IPv4 as ::ffff:a.b.c.d)
    type 0x03 CallMeMaybe body := N x (ip[16] port[2])        (sender's endpoints; only sent over DERP)

A Ping's node key is the sender's WireGuard key; it is a hint, never proof of anything. Padding is zeros,
used to probe path MTU. Receivers ignore trailing bytes: a Ping or Pong may grow fields, and a CallMeMaybe
whose body is not a multiple of 18 keeps only its whole entries. Types 0x04-0x09 (peer relays) are
recognised by number but not supported: they decode to `UnknownMessage` errors like any other type.

The codec holds no state and does no I/O. `seal` needs the 24-byte nonce from the caller or draws a random
one; `open_packet` returns the sender key with the message so the caller can find the peer.
"""

from __future__ import annotations

import ipaddress
from dataclasses import dataclass
from typing import Final

import nacl.exceptions
import nacl.utils
from nacl.public import Box, PrivateKey, PublicKey

from node.errors import RemoteError

MAGIC: Final = b"TS\xf0\x9f\x92\xac"
KEY_LEN: Final = 32
NONCE_LEN: Final = 24
TAG_LEN: Final = 16
HEADER_LEN: Final = len(MAGIC) + KEY_LEN + NONCE_LEN  # 62
TXID_LEN: Final = 12
EP_LEN: Final = 18
# A CallMeMaybe from a peer is attacker-sized input; Tailscale nodes send a handful of endpoints.
MAX_CALL_ME_MAYBE: Final = 32
# Far above any real message (a padded ping is at most a path MTU), so a relay cannot make us buffer more.
MAX_PACKET: Final = 65535

TYPE_PING: Final = 0x01
TYPE_PONG: Final = 0x02
TYPE_CALL_ME_MAYBE: Final = 0x03

AddrPort = tuple[str, int]


class DiscoError(RemoteError, ValueError):
    """A packet that is not a usable disco message. `reason` is a short stable name for drop counters."""

    reason = "invalid"


class NotDisco(DiscoError):
    reason = "not_disco"


class Truncated(DiscoError):
    reason = "truncated"


class OpenFailed(DiscoError):
    reason = "bad_box"


class UnknownMessage(DiscoError):
    reason = "unknown_type"


class BadMessage(DiscoError):
    reason = "bad_message"


@dataclass(frozen=True, slots=True)
class Ping:
    txid: bytes
    node_key: bytes | None = None
    padding: int = 0

    def __post_init__(self) -> None:
        _check_len("txid", self.txid, TXID_LEN)
        if self.node_key is not None:
            _check_len("node_key", self.node_key, KEY_LEN)
            if not any(self.node_key):
                raise ValueError("node_key is all zeros; use None")
        if self.padding < 0 or self.padding > MAX_PACKET:
            raise ValueError(f"padding out of range: {self.padding}")


@dataclass(frozen=True, slots=True)
class Pong:
    txid: bytes
    src: AddrPort

    def __post_init__(self) -> None:
        _check_len("txid", self.txid, TXID_LEN)
        object.__setattr__(self, "src", normalize(self.src))


@dataclass(frozen=True, slots=True)
class CallMeMaybe:
    endpoints: tuple[AddrPort, ...]

    def __post_init__(self) -> None:
        if len(self.endpoints) > MAX_CALL_ME_MAYBE:
            raise ValueError(f"too many endpoints: {len(self.endpoints)} > {MAX_CALL_ME_MAYBE}")
        object.__setattr__(self, "endpoints", tuple(normalize(ep) for ep in self.endpoints))


Message = Ping | Pong | CallMeMaybe


def _check_len(name: str, value: bytes, n: int) -> None:
    if len(value) != n:
        raise ValueError(f"{name} must be {n} bytes, got {len(value)}")


def normalize(addr: AddrPort) -> AddrPort:
    """Canonical (ip, port): compressed text, IPv4-mapped IPv6 shown as IPv4. Raises ValueError."""
    ip, port = addr
    parsed = ipaddress.ip_address(ip)
    if isinstance(parsed, ipaddress.IPv6Address) and parsed.ipv4_mapped is not None:
        parsed = parsed.ipv4_mapped
    if not 0 <= port <= 0xFFFF:
        raise ValueError(f"port out of range: {port}")
    return (str(parsed), int(port))


def _pack_addr(addr: AddrPort) -> bytes:
    ip, port = addr
    parsed = ipaddress.ip_address(ip)
    v4_mapped = b"\x00" * 10 + b"\xff\xff" + parsed.packed
    return (v4_mapped if parsed.version == 4 else parsed.packed) + port.to_bytes(2, "big")


def _unpack_addr(raw: bytes) -> AddrPort:
    v6 = ipaddress.IPv6Address(raw[:16])
    ip: ipaddress.IPv4Address | ipaddress.IPv6Address = v6.ipv4_mapped or v6
    return (str(ip), int.from_bytes(raw[16:18], "big"))


def encode_message(msg: Message) -> bytes:
    """The plaintext that goes inside the box."""
    if isinstance(msg, Ping):
        return bytes([TYPE_PING, 0]) + msg.txid + (msg.node_key or b"") + b"\x00" * msg.padding
    if isinstance(msg, Pong):
        return bytes([TYPE_PONG, 0]) + msg.txid + _pack_addr(msg.src)
    return bytes([TYPE_CALL_ME_MAYBE, 0]) + b"".join(_pack_addr(ep) for ep in msg.endpoints)


def decode_message(plain: bytes) -> Message:
    if len(plain) < 2:
        raise Truncated(f"disco message of {len(plain)} bytes has no type and version")
    kind, body = plain[0], plain[2:]
    # Version is not checked: Tailscale bumps it only to add fields, which trailing-byte tolerance absorbs.
    if kind == TYPE_PING:
        if len(body) < TXID_LEN:
            raise BadMessage(f"ping body of {len(body)} bytes, need {TXID_LEN}")
        key = body[TXID_LEN : TXID_LEN + KEY_LEN]
        # An all-zero key is Tailscale's "no key": then everything after the txid is padding.
        node_key = key if len(key) == KEY_LEN and any(key) else None
        padding = len(body) - TXID_LEN - (KEY_LEN if node_key else 0)
        if padding > MAX_PACKET:
            raise BadMessage(f"ping padding of {padding} bytes exceeds {MAX_PACKET}")
        return Ping(body[:TXID_LEN], node_key, padding)
    if kind == TYPE_PONG:
        if len(body) < TXID_LEN + EP_LEN:
            raise BadMessage(f"pong body of {len(body)} bytes, need {TXID_LEN + EP_LEN}")
        return Pong(body[:TXID_LEN], _unpack_addr(body[TXID_LEN : TXID_LEN + EP_LEN]))
    if kind == TYPE_CALL_ME_MAYBE:
        n = len(body) // EP_LEN
        if n > MAX_CALL_ME_MAYBE:
            raise BadMessage(f"call-me-maybe with {n} endpoints, at most {MAX_CALL_ME_MAYBE}")
        return CallMeMaybe(tuple(_unpack_addr(body[i * EP_LEN : (i + 1) * EP_LEN]) for i in range(n)))
    raise UnknownMessage(f"unknown disco message type 0x{kind:02x}")


def looks_like_disco(packet: bytes) -> bool:
    """Cheap first-bytes test (the same one the BPF filter and the DERP relay's disco queue use)."""
    return len(packet) >= HEADER_LEN + TAG_LEN and packet.startswith(MAGIC)


def sender_key(packet: bytes) -> bytes:
    """The claimed sender disco key, before opening the box (which is what proves it)."""
    if packet[: len(MAGIC)] != MAGIC:
        if len(packet) < len(MAGIC) and MAGIC.startswith(packet):
            raise Truncated(f"disco packet of {len(packet)} bytes")
        raise NotDisco("packet does not start with the disco magic")
    if len(packet) < HEADER_LEN + TAG_LEN:
        raise Truncated(f"disco packet of {len(packet)} bytes, need at least {HEADER_LEN + TAG_LEN}")
    if len(packet) > MAX_PACKET:
        raise BadMessage(f"disco packet of {len(packet)} bytes exceeds {MAX_PACKET}")
    return packet[len(MAGIC) : len(MAGIC) + KEY_LEN]


def seal(msg: Message, sender_pub: bytes, box: Box, nonce: bytes | None = None) -> bytes:
    """A full disco packet. `box` is Box(our private key, the receiver's public key); build it once per peer
    (the constructor does the Curve25519 work)."""
    _check_len("sender_pub", sender_pub, KEY_LEN)
    if nonce is None:
        nonce = nacl.utils.random(NONCE_LEN)
    _check_len("nonce", nonce, NONCE_LEN)
    return MAGIC + sender_pub + bytes(box.encrypt(encode_message(msg), nonce))


def open_packet(packet: bytes, box: Box) -> Message:
    """Open a packet from the peer `box` was built for. Call `sender_key` first to pick the box."""
    sender_key(packet)
    try:
        plain = box.decrypt(packet[HEADER_LEN:], packet[len(MAGIC) + KEY_LEN : HEADER_LEN])
    except nacl.exceptions.CryptoError:
        raise OpenFailed("disco box did not open (wrong key or corrupted)") from None
    return decode_message(plain)


def box_for(private: bytes, peer_public: bytes) -> Box:
    """Box between our disco private key and a peer's disco public key (both raw 32 bytes)."""
    _check_len("private", private, KEY_LEN)
    _check_len("peer_public", peer_public, KEY_LEN)
    return Box(PrivateKey(private), PublicKey(peer_public))


def public_key(private: bytes) -> bytes:
    _check_len("private", private, KEY_LEN)
    return bytes(PrivateKey(private).public_key)
