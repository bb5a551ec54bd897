"""The map stream: sealed, numbered frames carrying MapResponses (coord/wire/schema.py).

Map stream (``Stream: true``): the HTTP body is a sequence of frames::

    len[4, little-endian uint32] || nonce[24] || crypto_box(server_priv -> machine_pub, flags[1] || payload)
    flags bit 0: payload is zstd-compressed
    payload = JSON {"req": "<request id>", "seq": n, "msg": MapResponse}

``seq`` starts at 0 and rises by one per frame; the node drops the stream on a gap, a repeat, or a ``req`` that is
not the id of the request it sent, so frames cannot be replayed into another stream or reordered. The first frame
carries a full map, later ones deltas or keep-alives. Frames are capped at ``MAX_FRAME`` (64 MiB).

`FrameReader` checks the seal, the binding and the order, and yields each ``msg`` as a JSON object; the node
parses it into a typed `MapResponse` right there (node/control.py), so nothing past the read sees raw JSON.
"""

from __future__ import annotations

import struct
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any

import zstandard
from nacl.public import Box

from coord.wire.errors import WireError
from coord.wire.seal import loads_object, seal, unseal

MAX_FRAME = 64 << 20
FLAG_ZSTD = 0x01
# Below this size compression costs more than it saves on a loopback or LAN link.
COMPRESS_MIN = 4096


def encode_frame_payload(request_id: str, seq: int, msg_json: bytes, compressor: zstandard.ZstdCompressor) -> bytes:
    """``flags || payload`` before sealing. ``msg_json`` is the already-encoded MapResponse."""
    payload = b'{"req":"' + request_id.encode() + b'","seq":' + str(seq).encode() + b',"msg":' + msg_json + b"}"
    if len(payload) >= COMPRESS_MIN:
        return bytes([FLAG_ZSTD]) + compressor.compress(payload)
    return b"\x00" + payload


def frame(sealed: bytes) -> bytes:
    return struct.pack("<I", len(sealed)) + sealed


def seal_frame(
    box: Box, request_id: str, seq: int, msg_json: bytes, nonce: bytes, compressor: zstandard.ZstdCompressor
) -> bytes:
    return frame(seal(box, encode_frame_payload(request_id, seq, msg_json, compressor), nonce))


@dataclass
class FrameReader:
    """Splits a map stream into MapResponses, checking the seal, request binding and sequence."""

    box: Box
    request_id: str
    buf: bytearray = field(default_factory=bytearray)
    next_seq: int = 0
    decompressor: zstandard.ZstdDecompressor = field(default_factory=zstandard.ZstdDecompressor)

    def feed(self, data: bytes) -> Iterator[dict[str, Any]]:
        self.buf += data
        while len(self.buf) >= 4:
            (n,) = struct.unpack_from("<I", self.buf)
            if n > MAX_FRAME:
                raise WireError(f"map frame of {n} bytes exceeds {MAX_FRAME}")
            if len(self.buf) < 4 + n:
                return
            sealed = bytes(self.buf[4 : 4 + n])
            del self.buf[: 4 + n]
            yield self._open(sealed)

    def _open(self, sealed: bytes) -> dict[str, Any]:
        plain = unseal(self.box, sealed, "map frame")
        flags, payload = plain[0], plain[1:]
        if flags & FLAG_ZSTD:
            try:
                payload = self.decompressor.decompress(payload, max_output_size=MAX_FRAME)
            except zstandard.ZstdError as e:
                raise WireError(f"map frame: bad zstd data ({e})") from None
        obj = loads_object(payload, "map frame")
        if obj.get("req") != self.request_id:
            raise WireError("map frame belongs to another request (replay?)")
        if obj.get("seq") != self.next_seq:
            raise WireError(f"map frame out of sequence: got {obj.get('seq')}, expected {self.next_seq}")
        self.next_seq += 1
        msg = obj.get("msg")
        if not isinstance(msg, dict):
            raise WireError("map frame: msg must be an object")
        return msg
