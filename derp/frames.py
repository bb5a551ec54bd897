"""DERP v2 framing: constants, frame codecs and a bounded frame buffer (sans-IO).

This is Tailscale's DERP protocol, version 2, byte for byte. Integers are big-endian.

Frame
-----
Every frame is a 5-byte header, then the payload::

    +------+-------------------+------------------------+
    | type | length (uint32)   | payload (length bytes) |
    +------+-------------------+------------------------+
      1 B         4 B

The header is not counted in ``length``. Unknown frame types are skipped, not fatal: newer peers may send them.

Frames (S = server, C = client, M = a meshed relay acting as a client)
-----------------------------------------------------------------------
::

    0x01 ServerKey      S->C  magic "DERP🔑" (8 B: 44 45 52 50 f0 9f 94 91) + server public key (32 B)
                              (+ future bytes, ignored)
    0x02 ClientInfo     C->S  client public key (32) + nonce (24) + box(JSON)   at most 256 KiB
    0x03 ServerInfo     S->C  nonce (24) + box(JSON)
    0x04 SendPacket     C->S  destination key (32) + packet (at most 64 KiB)
    0x05 RecvPacket     S->C  source key (32) + packet
    0x06 KeepAlive      S->C  empty
    0x07 NotePreferred  C->S  1 byte: 0x01 "this relay is my home", 0x00 not
    0x08 PeerGone       S->C  key (32) + reason (1): 0x00 disconnected, 0x01 not here
    0x09 PeerPresent    S->M  key (32) + IP (16, v4-mapped) + port (2) + flags (1); older servers send only the key
    0x0a ForwardPacket  M->S  source key (32) + destination key (32) + packet
    0x10 WatchConns     M->S  empty; needs the mesh key
    0x11 ClosePeer      M->S  key (32); needs the mesh key
    0x12 Ping           both  8 bytes of data
    0x13 Pong           both  the 8 bytes of the Ping, echoed
    0x14 Health         S->C  UTF-8 problem text; empty means healthy again
    0x15 Restarting     S->C  reconnect-in (uint32 ms) + try-for (uint32 ms)

The boxes are NaCl crypto_box (Curve25519, XSalsa20-Poly1305) between the client's and the server's keys. ClientInfo
JSON is ``{"version": 2, "meshKey": "<64 hex>"?, "CanAckPings": bool, "IsProber": bool?}``; opening it proves the
client holds the private half of the key it claims. ServerInfo JSON is ``{"version": 2}``.

Protocol flow
-------------
Client connects (after an HTTP ``GET /derp`` upgrade), server sends ServerKey, client sends ClientInfo, server checks
it (and admission) and replies ServerInfo. From then on the client sends SendPacket/NotePreferred/Ping and gets
RecvPacket/PeerGone/KeepAlive/Pong/Health. A meshed relay also sends WatchConns and ForwardPacket and gets
PeerPresent/PeerGone.
"""

from __future__ import annotations

import struct
from collections.abc import Iterator
from dataclasses import dataclass
from enum import IntEnum

from derp.errors import DerpError, LocalError, RemoteError

MAGIC = b"DERP\xf0\x9f\x94\x91"
KEY_LEN = 32
NONCE_LEN = 24
HEADER_LEN = 5
PROTOCOL_VERSION = 2
MAX_PACKET_SIZE = 64 << 10
MAX_INFO_LEN = 1 << 20
MAX_CLIENT_INFO_LEN = 256 << 10
#: Largest frame a relay accepts after the handshake: a ForwardPacket carrying the largest packet.
MAX_FRAME_LEN = 2 * KEY_LEN + MAX_PACKET_SIZE
MAX_PING_LEN = 1000
KEEPALIVE_INTERVAL = 60.0
HANDSHAKE_TIMEOUT = 10.0

HEADER = struct.Struct(">BI")
PORT = struct.Struct(">H")
RESTART = struct.Struct(">II")


class FrameType(IntEnum):
    SERVER_KEY = 0x01
    CLIENT_INFO = 0x02
    SERVER_INFO = 0x03
    SEND_PACKET = 0x04
    RECV_PACKET = 0x05
    KEEP_ALIVE = 0x06
    NOTE_PREFERRED = 0x07
    PEER_GONE = 0x08
    PEER_PRESENT = 0x09
    FORWARD_PACKET = 0x0A
    WATCH_CONNS = 0x10
    CLOSE_PEER = 0x11
    PING = 0x12
    PONG = 0x13
    HEALTH = 0x14
    RESTARTING = 0x15


class PeerGoneReason(IntEnum):
    DISCONNECTED = 0x00
    NOT_HERE = 0x01


class PeerPresentFlags(IntEnum):
    REGULAR = 1
    MESH_PEER = 2
    PROBER = 4
    NOT_IDEAL = 8


class FrameError(DerpError):
    """Bad input: ``RemoteFrameError`` when it came off the wire, ``LocalFrameError`` when we were misused."""


class RemoteFrameError(FrameError, RemoteError):
    pass


class LocalFrameError(FrameError, LocalError):
    pass


def header(ftype: int, length: int) -> bytes:
    return HEADER.pack(ftype, length)


def frame(ftype: int, payload: bytes = b"") -> bytes:
    if len(payload) > MAX_INFO_LEN:
        raise LocalFrameError(f"frame payload of {len(payload)} bytes is over {MAX_INFO_LEN}")
    return HEADER.pack(ftype, len(payload)) + payload


def _key(key: bytes, what: str = "key") -> bytes:
    if len(key) != KEY_LEN:
        raise LocalFrameError(f"{what} must be {KEY_LEN} bytes, got {len(key)}")
    return bytes(key)


def _packet(packet: bytes) -> bytes:
    if len(packet) > MAX_PACKET_SIZE:
        raise LocalFrameError(f"packet of {len(packet)} bytes is over {MAX_PACKET_SIZE}")
    return bytes(packet)


# Encoders. Each returns a complete frame, header included.


def encode_server_key(key: bytes) -> bytes:
    return frame(FrameType.SERVER_KEY, MAGIC + _key(key))


def encode_client_info(key: bytes, nonce: bytes, box: bytes) -> bytes:
    if len(nonce) != NONCE_LEN:
        raise LocalFrameError(f"nonce must be {NONCE_LEN} bytes, got {len(nonce)}")
    if KEY_LEN + NONCE_LEN + len(box) > MAX_CLIENT_INFO_LEN:
        raise LocalFrameError("client info is over 256 KiB")
    return frame(FrameType.CLIENT_INFO, _key(key) + nonce + box)


def encode_server_info(nonce: bytes, box: bytes) -> bytes:
    if len(nonce) != NONCE_LEN:
        raise LocalFrameError(f"nonce must be {NONCE_LEN} bytes, got {len(nonce)}")
    return frame(FrameType.SERVER_INFO, nonce + box)


def encode_send_packet(dst: bytes, packet: bytes) -> bytes:
    return frame(FrameType.SEND_PACKET, _key(dst, "destination key") + _packet(packet))


def encode_recv_packet(src: bytes, packet: bytes) -> bytes:
    return frame(FrameType.RECV_PACKET, _key(src, "source key") + _packet(packet))


def encode_forward_packet(src: bytes, dst: bytes, packet: bytes) -> bytes:
    return frame(FrameType.FORWARD_PACKET, _key(src, "source key") + _key(dst, "destination key") + _packet(packet))


def encode_keep_alive() -> bytes:
    return frame(FrameType.KEEP_ALIVE)


def encode_note_preferred(preferred: bool) -> bytes:
    return frame(FrameType.NOTE_PREFERRED, b"\x01" if preferred else b"\x00")


def encode_peer_gone(key: bytes, reason: int = PeerGoneReason.DISCONNECTED) -> bytes:
    return frame(FrameType.PEER_GONE, _key(key) + bytes([reason]))


def encode_peer_present(
    key: bytes, ip: bytes = bytes(16), port: int = 0, flags: int = PeerPresentFlags.REGULAR
) -> bytes:
    if len(ip) != 16:
        raise LocalFrameError("peer present IP must be 16 bytes (IPv4 as v4-mapped IPv6)")
    return frame(FrameType.PEER_PRESENT, _key(key) + ip + PORT.pack(port) + bytes([flags]))


def encode_watch_conns() -> bytes:
    return frame(FrameType.WATCH_CONNS)


def encode_close_peer(key: bytes) -> bytes:
    return frame(FrameType.CLOSE_PEER, _key(key))


def encode_ping(data: bytes) -> bytes:
    if len(data) != 8:
        raise LocalFrameError(f"ping data must be 8 bytes, got {len(data)}")
    return frame(FrameType.PING, data)


def encode_pong(data: bytes) -> bytes:
    if len(data) != 8:
        raise LocalFrameError(f"pong data must be 8 bytes, got {len(data)}")
    return frame(FrameType.PONG, data)


def encode_health(problem: str) -> bytes:
    return frame(FrameType.HEALTH, problem.encode())


def encode_restarting(reconnect_in_ms: int, try_for_ms: int) -> bytes:
    return frame(FrameType.RESTARTING, RESTART.pack(reconnect_in_ms, try_for_ms))


# Decoded frames. Frozen and slotted so decoding makes one small object per frame.


@dataclass(frozen=True, slots=True)
class ServerKey:
    key: bytes


@dataclass(frozen=True, slots=True)
class ClientInfo:
    key: bytes
    nonce: bytes
    box: bytes


@dataclass(frozen=True, slots=True)
class ServerInfo:
    nonce: bytes
    box: bytes


@dataclass(frozen=True, slots=True)
class SendPacket:
    dst: bytes
    packet: bytes


@dataclass(frozen=True, slots=True)
class RecvPacket:
    src: bytes
    packet: bytes


@dataclass(frozen=True, slots=True)
class ForwardPacket:
    src: bytes
    dst: bytes
    packet: bytes


@dataclass(frozen=True, slots=True)
class KeepAlive:
    pass


@dataclass(frozen=True, slots=True)
class NotePreferred:
    preferred: bool


@dataclass(frozen=True, slots=True)
class PeerGone:
    key: bytes
    reason: int


@dataclass(frozen=True, slots=True)
class PeerPresent:
    key: bytes
    ip: bytes
    port: int
    flags: int


@dataclass(frozen=True, slots=True)
class WatchConns:
    pass


@dataclass(frozen=True, slots=True)
class ClosePeer:
    key: bytes


@dataclass(frozen=True, slots=True)
class Ping:
    data: bytes


@dataclass(frozen=True, slots=True)
class Pong:
    data: bytes


@dataclass(frozen=True, slots=True)
class Health:
    problem: str


@dataclass(frozen=True, slots=True)
class Restarting:
    reconnect_in_ms: int
    try_for_ms: int


@dataclass(frozen=True, slots=True)
class Unknown:
    ftype: int
    payload: bytes


Frame = (
    ServerKey
    | ClientInfo
    | ServerInfo
    | SendPacket
    | RecvPacket
    | ForwardPacket
    | KeepAlive
    | NotePreferred
    | PeerGone
    | PeerPresent
    | WatchConns
    | ClosePeer
    | Ping
    | Pong
    | Health
    | Restarting
    | Unknown
)


def _need(p: bytes, n: int, name: str, exact: bool = False) -> None:
    if len(p) < n or (exact and len(p) != n):
        want = f"exactly {n}" if exact else f"at least {n}"
        raise RemoteFrameError(f"{name} frame has {len(p)} payload bytes, want {want}")


def decode(ftype: int, payload: bytes) -> Frame:
    """Decode one frame's payload. Raises ``RemoteFrameError`` with the reason for a malformed one."""
    p = bytes(payload)
    if ftype == FrameType.SEND_PACKET:
        _need(p, KEY_LEN, "SendPacket")
        if len(p) - KEY_LEN > MAX_PACKET_SIZE:
            raise RemoteFrameError(f"SendPacket packet of {len(p) - KEY_LEN} bytes is over {MAX_PACKET_SIZE}")
        return SendPacket(p[:KEY_LEN], p[KEY_LEN:])
    if ftype == FrameType.RECV_PACKET:
        _need(p, KEY_LEN, "RecvPacket")
        if len(p) - KEY_LEN > MAX_PACKET_SIZE:
            raise RemoteFrameError(f"RecvPacket packet of {len(p) - KEY_LEN} bytes is over {MAX_PACKET_SIZE}")
        return RecvPacket(p[:KEY_LEN], p[KEY_LEN:])
    if ftype == FrameType.FORWARD_PACKET:
        _need(p, 2 * KEY_LEN, "ForwardPacket")
        if len(p) - 2 * KEY_LEN > MAX_PACKET_SIZE:
            raise RemoteFrameError(f"ForwardPacket packet of {len(p) - 2 * KEY_LEN} bytes is over {MAX_PACKET_SIZE}")
        return ForwardPacket(p[:KEY_LEN], p[KEY_LEN : 2 * KEY_LEN], p[2 * KEY_LEN :])
    if ftype == FrameType.SERVER_KEY:
        _need(p, len(MAGIC) + KEY_LEN, "ServerKey")
        if p[: len(MAGIC)] != MAGIC:
            raise RemoteFrameError("ServerKey frame has a bad magic")
        return ServerKey(p[len(MAGIC) : len(MAGIC) + KEY_LEN])
    if ftype == FrameType.CLIENT_INFO:
        if len(p) > MAX_CLIENT_INFO_LEN:
            raise RemoteFrameError(f"ClientInfo of {len(p)} bytes is over {MAX_CLIENT_INFO_LEN}")
        _need(p, KEY_LEN + NONCE_LEN, "ClientInfo")
        return ClientInfo(p[:KEY_LEN], p[KEY_LEN : KEY_LEN + NONCE_LEN], p[KEY_LEN + NONCE_LEN :])
    if ftype == FrameType.SERVER_INFO:
        if len(p) > MAX_INFO_LEN:
            raise RemoteFrameError(f"ServerInfo of {len(p)} bytes is over {MAX_INFO_LEN}")
        _need(p, NONCE_LEN, "ServerInfo")
        return ServerInfo(p[:NONCE_LEN], p[NONCE_LEN:])
    if ftype == FrameType.KEEP_ALIVE:
        return KeepAlive()
    if ftype == FrameType.NOTE_PREFERRED:
        _need(p, 1, "NotePreferred", exact=True)
        return NotePreferred(p[0] != 0)
    if ftype == FrameType.PEER_GONE:
        _need(p, KEY_LEN, "PeerGone")
        # Old servers send only the key: treat it as "disconnected".
        return PeerGone(p[:KEY_LEN], p[KEY_LEN] if len(p) > KEY_LEN else PeerGoneReason.DISCONNECTED)
    if ftype == FrameType.PEER_PRESENT:
        _need(p, KEY_LEN, "PeerPresent")
        if len(p) >= KEY_LEN + 19:
            return PeerPresent(p[:KEY_LEN], p[32:48], PORT.unpack_from(p, 48)[0], p[50])
        if len(p) >= KEY_LEN + 18:
            return PeerPresent(p[:KEY_LEN], p[32:48], PORT.unpack_from(p, 48)[0], PeerPresentFlags.REGULAR)
        return PeerPresent(p[:KEY_LEN], bytes(16), 0, PeerPresentFlags.REGULAR)
    if ftype == FrameType.WATCH_CONNS:
        return WatchConns()
    if ftype == FrameType.CLOSE_PEER:
        _need(p, KEY_LEN, "ClosePeer", exact=True)
        return ClosePeer(p)
    if ftype == FrameType.PING:
        if len(p) > MAX_PING_LEN:
            raise RemoteFrameError(f"Ping frame of {len(p)} bytes is over {MAX_PING_LEN}")
        _need(p, 8, "Ping")
        return Ping(p[:8])
    if ftype == FrameType.PONG:
        _need(p, 8, "Pong")
        return Pong(p[:8])
    if ftype == FrameType.HEALTH:
        return Health(p.decode("utf-8", "replace"))
    if ftype == FrameType.RESTARTING:
        _need(p, RESTART.size, "Restarting")
        ms_in, ms_for = RESTART.unpack_from(p)
        return Restarting(ms_in, ms_for)
    return Unknown(ftype, p)


class FrameBuffer:
    """Accumulates stream bytes and yields whole frames; never holds more than one frame plus one read.

    ``max_frame`` bounds the declared payload length: a larger frame is refused as soon as its header arrives,
    before any of its payload is buffered.
    """

    __slots__ = ("_buf", "max_frame")

    def __init__(self, max_frame: int = MAX_INFO_LEN) -> None:
        self._buf = bytearray()
        self.max_frame = max_frame

    def __len__(self) -> int:
        return len(self._buf)

    def feed(self, data: bytes) -> None:
        self._buf += data
        if len(self._buf) >= HEADER_LEN:
            self._check(self._buf)

    def _check(self, buf: bytearray) -> None:
        ftype, length = HEADER.unpack_from(buf)
        limit = MAX_CLIENT_INFO_LEN if ftype == FrameType.CLIENT_INFO else self.max_frame
        if length > limit:
            raise RemoteFrameError(f"frame type 0x{ftype:02x} declares {length} bytes, over the limit of {limit}")

    def next_frame(self) -> tuple[int, bytes] | None:
        """The next complete ``(type, payload)``, or None until more bytes arrive."""
        buf = self._buf
        if len(buf) < HEADER_LEN:
            return None
        ftype, length = HEADER.unpack_from(buf)
        end = HEADER_LEN + length
        if len(buf) < end:
            return None
        payload = bytes(buf[HEADER_LEN:end])
        del buf[:end]
        if len(buf) >= HEADER_LEN:
            self._check(buf)
        return ftype, payload

    def frames(self) -> Iterator[tuple[int, bytes]]:
        while (f := self.next_frame()) is not None:
            yield f

    def take(self) -> bytes:
        """Hand over whatever is buffered, emptying the buffer (used when switching to the fast path)."""
        out = bytes(self._buf)
        self._buf.clear()
        return out
