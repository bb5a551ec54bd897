"""STUN binding requests and responses (RFC 5389, with RFC 3489 compatibility), sans-IO.

Message layout (RFC 5389 section 6; integers big-endian)::

    0                   1                   2                   3
    +-+-+---------------------------+-------------------------------+
    |0 0|     message type (14)     |        message length         |   length excludes this 20-byte header
    +-+-+---------------------------+-------------------------------+
    |                  magic cookie 0x2112A442                      |   RFC 3489: the first 4 bytes of a
    +---------------------------------------------------------------+   16-byte transaction ID instead
    |                  transaction ID (96 bits)                     |
    +---------------------------------------------------------------+
    | attributes: type (2) + length (2) + value, padded to 4 bytes  |

Types: 0x0001 binding request, 0x0101 binding success response. Attributes we write or read:

    0x0001 MAPPED-ADDRESS      0x00, family (1 = IPv4, 2 = IPv6), port, address
    0x0020 XOR-MAPPED-ADDRESS  same, port XOR the cookie's top 16 bits, address XOR cookie (+ transaction ID for v6)
    0x8020 XOR-MAPPED-ADDRESS  the same attribute under a pre-RFC number that some servers still send
    0x8022 SOFTWARE            UTF-8 text
    0x8028 FINGERPRINT         CRC-32 of the message before it, XOR 0x5354554e

Reading, as Tailscale's net/stun reads: a response's address is XOR-MAPPED-ADDRESS (0x0020), else 0x8020, else
MAPPED-ADDRESS; an IPv4-mapped IPv6 address (``::ffff:a.b.c.d``) comes back as the IPv4 address; bytes after the
message (past the header's length) are ignored, not refused; unknown attributes are skipped.

The server answers every binding request (unlike Tailscale's, which wants SOFTWARE "tailnode" and a FINGERPRINT):
XOR-MAPPED-ADDRESS always, and MAPPED-ADDRESS too when the request has no magic cookie (an RFC 3489 client, RFC 5389
section 12). For such a request the XOR key is the cookie followed by the last 12 bytes of its 16-byte transaction
ID. The client side builds requests in Tailscale's form (SOFTWARE "tailnode" + FINGERPRINT) so that any DERP
server answers them.
"""

from __future__ import annotations

import ipaddress
import struct
import zlib
from dataclasses import dataclass

from derp.errors import LocalError, RemoteError

MAGIC_COOKIE = 0x2112A442
COOKIE = struct.pack(">I", MAGIC_COOKIE)
HEADER_LEN = 20
BINDING_REQUEST = 0x0001
BINDING_RESPONSE = 0x0101
ATTR_MAPPED_ADDRESS = 0x0001
ATTR_XOR_MAPPED_ADDRESS = 0x0020
ATTR_XOR_MAPPED_ADDRESS_ALT = 0x8020
ATTR_SOFTWARE = 0x8022
ATTR_FINGERPRINT = 0x8028
FINGERPRINT_XOR = 0x5354554E
#: Requests longer than this are not binding requests worth answering.
MAX_MESSAGE = 1500

_HDR = struct.Struct(">HH")
_ATTR = struct.Struct(">HH")


class StunError(RemoteError, ValueError):
    """The datagram is not a STUN message we handle; ``str()`` says why."""


@dataclass(frozen=True, slots=True)
class BindingRequest:
    txid: bytes  # 12 bytes (RFC 5389) or 16 bytes (RFC 3489, no cookie)

    @property
    def classic(self) -> bool:
        return len(self.txid) == 16


@dataclass(frozen=True, slots=True)
class BindingResponse:
    txid: bytes
    host: str
    port: int


def _attrs(data: bytes, length: int) -> list[tuple[int, bytes]]:
    out: list[tuple[int, bytes]] = []
    pos, end = HEADER_LEN, HEADER_LEN + length
    while pos < end:
        if end - pos < 4:
            raise StunError("truncated attribute header")
        atype, alen = _ATTR.unpack_from(data, pos)
        pos += 4
        if pos + alen > end:
            raise StunError(f"attribute 0x{atype:04x} runs past the message")
        out.append((atype, data[pos : pos + alen]))
        pos += (alen + 3) & ~3
    return out


def _header(data: bytes) -> tuple[int, int, bytes]:
    if len(data) < HEADER_LEN:
        raise StunError(f"{len(data)} bytes is shorter than a STUN header")
    if len(data) > MAX_MESSAGE:
        raise StunError(f"{len(data)} bytes is longer than {MAX_MESSAGE}")
    mtype, length = _HDR.unpack_from(data)
    if mtype & 0xC000:
        raise StunError("top two bits are not zero")
    if length % 4 or HEADER_LEN + length > len(data):
        raise StunError(f"length field {length} does not match a {len(data)}-byte datagram")
    txid = data[8:20] if data[4:8] == COOKIE else data[4:20]
    return mtype, length, bytes(txid)


def parse_request(data: bytes) -> BindingRequest:
    """Parse a binding request. A FINGERPRINT, when present, must be right; other attributes are ignored."""
    data = bytes(data)
    mtype, length, txid = _header(data)
    data = data[: HEADER_LEN + length]  # what follows the message is not part of it
    if mtype != BINDING_REQUEST:
        raise StunError(f"message type 0x{mtype:04x} is not a binding request")
    attrs = _attrs(data, length)
    if attrs and attrs[-1][0] == ATTR_FINGERPRINT:
        fp = attrs[-1][1]
        if len(fp) != 4 or struct.unpack(">I", fp)[0] != _fingerprint(data[: len(data) - 8]):
            raise StunError("bad FINGERPRINT")
    return BindingRequest(txid)


def _fingerprint(msg: bytes) -> int:
    return (zlib.crc32(msg) ^ FINGERPRINT_XOR) & 0xFFFFFFFF


def _address(host: str, port: int, xor_key: bytes | None) -> bytes:
    ip = ipaddress.ip_address(host)
    if isinstance(ip, ipaddress.IPv6Address) and ip.ipv4_mapped is not None:
        ip = ip.ipv4_mapped
    family = 1 if ip.version == 4 else 2
    raw = ip.packed
    if xor_key is not None:
        port ^= MAGIC_COOKIE >> 16
        raw = bytes(a ^ b for a, b in zip(raw, xor_key, strict=False))
    return struct.pack(">BBH", 0, family, port) + raw


def _attr(atype: int, value: bytes) -> bytes:
    pad = (-len(value)) % 4
    return _ATTR.pack(atype, len(value)) + value + bytes(pad)


def build_response(req: BindingRequest, host: str, port: int) -> bytes:
    """The success response telling the requester it came from ``host:port``."""
    xor_key = COOKIE + req.txid[-12:]
    body = _attr(ATTR_XOR_MAPPED_ADDRESS, _address(host, port, xor_key))
    if req.classic:
        body = _attr(ATTR_MAPPED_ADDRESS, _address(host, port, None)) + body
        head = _HDR.pack(BINDING_RESPONSE, len(body)) + req.txid
    else:
        head = _HDR.pack(BINDING_RESPONSE, len(body)) + COOKIE + req.txid
    return head + body


def build_request(txid: bytes, software: bytes = b"tailnode", fingerprint: bool = True) -> bytes:
    """A binding request in Tailscale's form (SOFTWARE + FINGERPRINT), which every STUN server answers.
    ``txid``: 12 random bytes from the caller (sans-IO: no randomness here)."""
    if len(txid) != 12:
        raise LocalError("transaction ID must be 12 bytes")
    body = _attr(ATTR_SOFTWARE, software) if software else b""
    if not fingerprint:
        return _HDR.pack(BINDING_REQUEST, len(body)) + COOKIE + txid + body
    msg = _HDR.pack(BINDING_REQUEST, len(body) + 8) + COOKIE + txid + body
    return msg + _ATTR.pack(ATTR_FINGERPRINT, 4) + struct.pack(">I", _fingerprint(msg))


def _read_address(value: bytes, xor_key: bytes | None) -> tuple[str, int]:
    if len(value) < 4:
        raise StunError("address attribute is too short")
    family, port = value[1], struct.unpack_from(">H", value, 2)[0]
    want = {1: 4, 2: 16}.get(family)
    if want is None or len(value) != 4 + want:
        raise StunError(f"address family {family} with {len(value) - 4} address bytes")
    raw = value[4:]
    if xor_key is not None:
        port ^= MAGIC_COOKIE >> 16
        raw = bytes(a ^ b for a, b in zip(raw, xor_key, strict=False))
    ip = ipaddress.ip_address(raw)
    if isinstance(ip, ipaddress.IPv6Address) and ip.ipv4_mapped is not None:
        ip = ip.ipv4_mapped
    return str(ip), port


def parse_response(data: bytes) -> BindingResponse:
    """Parse a binding success response: XOR-MAPPED-ADDRESS, else its 0x8020 twin, else MAPPED-ADDRESS."""
    data = bytes(data)
    mtype, length, txid = _header(data)
    if mtype != BINDING_RESPONSE:
        raise StunError(f"message type 0x{mtype:04x} is not a binding success response")
    xor_key = COOKIE + txid[-12:]
    mapped = xored = alt = None
    for atype, value in _attrs(data, length):
        if atype == ATTR_XOR_MAPPED_ADDRESS and xored is None:
            xored = _read_address(value, xor_key)
        elif atype == ATTR_XOR_MAPPED_ADDRESS_ALT and alt is None:
            alt = _read_address(value, xor_key)
        elif atype == ATTR_MAPPED_ADDRESS and mapped is None:
            mapped = _read_address(value, None)
    addr = xored or alt or mapped
    if addr is None:
        raise StunError("response has no mapped address")
    return BindingResponse(txid, addr[0], addr[1])


def looks_like_stun(data: bytes) -> bool:
    """Cheap test for a STUN message with the RFC 5389 cookie (as a shared-port receiver would filter)."""
    return len(data) >= HEADER_LEN and data[0] & 0xC0 == 0 and data[4:8] == COOKIE
