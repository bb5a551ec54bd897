"""Sealed requests and responses of the control protocol.

HTTP endpoints
--------------
``GET /key`` -> ``{"publicKey": "mkey:<hex>", "capabilityVersion": N}`` (plain JSON: it is what gets pinned).
``POST /machine/<machine key hex>/register`` and ``POST /machine/<machine key hex>/map``: the body is one sealed
request; ``register`` answers with one sealed response, ``map`` with a sealed response or a stream of frames
(coord/wire/frames.py).

Sealed request (node -> server)::

    nonce[24] || crypto_box(machine_priv -> server_pub, JSON)
    JSON = {"ts": <unix seconds, float>, "id": "<32 hex, random>", "body": {...}}

The server refuses a request whose ``ts`` is more than ``MAX_SKEW`` (300 s) from its clock, or from before the
server started, or whose ``id`` it has already seen inside that window, so a captured body cannot be replayed,
not even after a restart. Register and map bodies are capped at ``MAX_CONTROL`` (64 KiB: the biggest request the
schema's field limits allow is about 17 KB of JSON), other sealed bodies at ``MAX_REQUEST`` (1 MiB).

Sealed response (server -> node), for register and non-streaming map::

    nonce[24] || crypto_box(server_priv -> machine_pub, JSON)
    JSON = {"req": "<request id>", "body": {...}}
"""

from __future__ import annotations

import heapq
import json
from collections import Counter
from dataclasses import dataclass, field
from typing import Any

from nacl.exceptions import CryptoError
from nacl.public import Box, PrivateKey, PublicKey

from coord.wire.errors import WireError

MAX_SKEW = 300.0
MAX_REQUEST = 1 << 20
MAX_CONTROL = 64 << 10
NONCE_LEN = 24


def dumps(obj: Any) -> bytes:
    return json.dumps(obj, separators=(",", ":"), ensure_ascii=False).encode()


def loads_object(data: bytes, what: str) -> dict[str, Any]:
    try:
        obj = json.loads(data)
    except (ValueError, UnicodeDecodeError) as e:
        raise WireError(f"{what}: not JSON ({e})") from None
    if not isinstance(obj, dict):
        raise WireError(f"{what}: expected a JSON object")
    return obj


def seal(box: Box, plaintext: bytes, nonce: bytes) -> bytes:
    return bytes(box.encrypt(plaintext, nonce))


def unseal(box: Box, data: bytes, what: str) -> bytes:
    if len(data) < NONCE_LEN + 16:
        raise WireError(f"{what}: too short to be sealed ({len(data)} bytes)")
    try:
        return bytes(box.decrypt(data))
    except CryptoError:
        raise WireError(f"{what}: cannot be opened with this key pair") from None


def make_box(private: bytes, peer_public: bytes) -> Box:
    return Box(PrivateKey(private), PublicKey(peer_public))


def seal_request(box: Box, body: dict[str, Any], *, now: float, request_id: str, nonce: bytes) -> bytes:
    return seal(box, dumps({"ts": now, "id": request_id, "body": body}), nonce)


class Busy(WireError):
    """The server holds as much of something as it will for one source, or in all: try again later."""


@dataclass
class ReplayGuard:
    """Request ids seen within the skew window, bounded. Callers pass ``now`` and the request's source.

    An id is remembered while a request carrying it could still pass the time check (until ``ts + window``),
    then forgotten, in order of ``ts`` whatever order the requests came in. Ids from machine keys the server does
    not know yet (anyone can mint one) are bounded, ``max_per_source`` per source and ``max_ids`` in all; past a
    bound such a request is refused (``Busy``), never let through unchecked. Ids of known machines
    (``bounded=False``) are neither capped nor crowded out by the others. ``not_before`` is when the server
    started: the ids it saw before are gone, so a request sealed before then is refused rather than replayable.
    """

    window: float = MAX_SKEW
    not_before: float = 0.0
    max_ids: int = 200_000
    max_per_source: int = 8_192
    seen: dict[str, str | None] = field(default_factory=dict)  # request id -> source (None: a known machine)
    expiry: list[tuple[float, str]] = field(default_factory=list)  # heap of (ts, request id)
    per_source: Counter[str] = field(default_factory=Counter)
    bounded: int = 0  # ids that count against the bounds

    def __len__(self) -> int:
        return len(self.seen)

    def check(self, request_id: str, ts: float, now: float, source: str = "", bounded: bool = True) -> None:
        if abs(now - ts) > self.window:
            raise WireError(f"request time is {now - ts:+.0f}s off the server clock (limit {self.window:.0f}s)")
        if ts < self.not_before:
            raise WireError(f"request was sealed {self.not_before - ts:.1f}s before the server started: a replay, "
                            "or a node clock behind the server's (seal a new one)")
        self._expire(now)
        if request_id in self.seen:
            raise WireError("request id already seen (replay)")
        if bounded:
            if self.per_source[source] >= self.max_per_source:
                raise Busy(f"too many requests from {source or 'this source'} within {self.window:.0f}s; "
                           "try again later")
            if self.bounded >= self.max_ids:
                raise Busy(f"too many requests in total within {self.window:.0f}s; try again later")
            self.per_source[source] += 1
            self.bounded += 1
        self.seen[request_id] = source if bounded else None
        heapq.heappush(self.expiry, (ts, request_id))

    def _expire(self, now: float) -> None:
        horizon = now - self.window
        while self.expiry and self.expiry[0][0] < horizon:
            _, rid = heapq.heappop(self.expiry)
            source = self.seen.pop(rid)
            if source is None:
                continue
            self.bounded -= 1
            self.per_source[source] -= 1
            if not self.per_source[source]:
                del self.per_source[source]


@dataclass(frozen=True)
class OpenedRequest:
    request_id: str
    ts: float
    body: dict[str, Any]


def open_request(box: Box, data: bytes, *, now: float, guard: ReplayGuard, source: str = "",
                 known: bool = False, limit: int = MAX_REQUEST) -> OpenedRequest:
    """Open a sealed request; ``known``: the machine key is one the server knows (its ids are not capped)."""
    if len(data) > limit:
        raise WireError(f"request body is {len(data)} bytes; the limit is {limit}")
    obj = loads_object(unseal(box, data, "request"), "request")
    rid, ts, body = obj.get("id"), obj.get("ts"), obj.get("body")
    if not isinstance(rid, str) or not 16 <= len(rid) <= 64:
        raise WireError("request: id must be a string of 16-64 characters")
    if not isinstance(ts, (int, float)) or isinstance(ts, bool):
        raise WireError("request: ts must be a number")
    if not isinstance(body, dict):
        raise WireError("request: body must be an object")
    guard.check(rid, float(ts), now, source, bounded=not known)
    return OpenedRequest(rid, float(ts), body)


def seal_response(box: Box, request_id: str, body: dict[str, Any], nonce: bytes) -> bytes:
    return seal(box, dumps({"req": request_id, "body": body}), nonce)


def open_response(box: Box, data: bytes, request_id: str) -> dict[str, Any]:
    obj = loads_object(unseal(box, data, "response"), "response")
    if obj.get("req") != request_id:
        raise WireError("response: answers another request (replay?)")
    body = obj.get("body")
    if not isinstance(body, dict):
        raise WireError("response: body must be an object")
    return body
