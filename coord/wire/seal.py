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

The server refuses a request whose ``ts`` is more than ``MAX_SKEW`` (300 s) from its clock, or whose ``id`` it has
already seen inside that window, so a captured body cannot be replayed. Request bodies are capped at
``MAX_REQUEST`` (1 MiB).

Sealed response (server -> node), for register and non-streaming map::

    nonce[24] || crypto_box(server_priv -> machine_pub, JSON)
    JSON = {"req": "<request id>", "body": {...}}
"""

from __future__ import annotations

import json
from collections.abc import MutableMapping
from dataclasses import dataclass, field
from typing import Any

from nacl.exceptions import CryptoError
from nacl.public import Box, PrivateKey, PublicKey

from coord.wire.errors import WireError

MAX_SKEW = 300.0
MAX_REQUEST = 1 << 20
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


@dataclass
class ReplayGuard:
    """Request ids seen within the skew window. Callers pass ``now``; old ids are forgotten lazily."""

    window: float = MAX_SKEW
    seen: MutableMapping[str, float] = field(default_factory=dict)

    def check(self, request_id: str, ts: float, now: float) -> None:
        if abs(now - ts) > self.window:
            raise WireError(f"request time is {now - ts:+.0f}s off the server clock (limit {self.window:.0f}s)")
        self._expire(now)
        if request_id in self.seen:
            raise WireError("request id already seen (replay)")
        self.seen[request_id] = ts

    def _expire(self, now: float) -> None:
        # dicts keep insertion order; ids arrive roughly in time order, so stop at the first fresh one.
        horizon = now - 2 * self.window
        stale = []
        for rid, ts in self.seen.items():
            if ts >= horizon:
                break
            stale.append(rid)
        for rid in stale:
            del self.seen[rid]


@dataclass(frozen=True)
class OpenedRequest:
    request_id: str
    ts: float
    body: dict[str, Any]


def open_request(box: Box, data: bytes, *, now: float, guard: ReplayGuard) -> OpenedRequest:
    if len(data) > MAX_REQUEST:
        raise WireError(f"request body is {len(data)} bytes; the limit is {MAX_REQUEST}")
    obj = loads_object(unseal(box, data, "request"), "request")
    rid, ts, body = obj.get("id"), obj.get("ts"), obj.get("body")
    if not isinstance(rid, str) or not 16 <= len(rid) <= 64:
        raise WireError("request: id must be a string of 16-64 characters")
    if not isinstance(ts, (int, float)) or isinstance(ts, bool):
        raise WireError("request: ts must be a number")
    if not isinstance(body, dict):
        raise WireError("request: body must be an object")
    guard.check(rid, float(ts), now)
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
