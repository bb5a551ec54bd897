"""The control protocol between a node and shoal-server: sealing, framing and message schema.

This is the only module of coord/ that node/ may import. It is sans-IO: callers pass time and randomness in.

Keys
----
Every key is Curve25519 (NaCl). On the wire a public key is written as ``<kind>:<64 hex>``:
``mkey:`` (machine key: long-lived, one per device), ``nodekey:`` (the WireGuard key, rotatable, also the node's
DERP address) and ``discokey:`` (per agent process, authenticates disco). The server has one long-term key, served
as ``mkey:`` by ``GET /key``; a node pins it on first contact (or from its config) and refuses any other.

HTTP endpoints
--------------
``GET /key`` -> ``{"publicKey": "mkey:<hex>", "capabilityVersion": N}`` (plain JSON: it is what gets pinned).
``POST /machine/<machine key hex>/register`` and ``POST /machine/<machine key hex>/map``: the body is one sealed
request; ``register`` answers with one sealed response, ``map`` with a sealed response or a stream of frames.

Sealed request (node -> server)::

    nonce[24] || crypto_box(machine_priv -> server_pub, JSON)
    JSON = {"ts": <unix seconds, float>, "id": "<32 hex, random>", "body": {...}}

The server refuses a request whose ``ts`` is more than ``MAX_SKEW`` (300 s) from its clock, or whose ``id`` it has
already seen inside that window, so a captured body cannot be replayed. Request bodies are capped at
``MAX_REQUEST`` (1 MiB).

Sealed response (server -> node), for register and non-streaming map::

    nonce[24] || crypto_box(server_priv -> machine_pub, JSON)
    JSON = {"req": "<request id>", "body": {...}}

Map stream (``Stream: true``): the HTTP body is a sequence of frames::

    len[4, little-endian uint32] || nonce[24] || crypto_box(server_priv -> machine_pub, flags[1] || payload)
    flags bit 0: payload is zstd-compressed
    payload = JSON {"req": "<request id>", "seq": n, "msg": MapResponse}

``seq`` starts at 0 and rises by one per frame; the node drops the stream on a gap, a repeat, or a ``req`` that is
not the id of the request it sent, so frames cannot be replayed into another stream or reordered. The first frame
carries a full map, later ones deltas or keep-alives. Frames are capped at ``MAX_FRAME`` (64 MiB).

Messages (JSON objects; field names follow Tailscale's tailcfg where the meaning is the same)
------------------------------------------------------------------------------------------------
RegisterRequest: ``NodeKey, OldNodeKey?, DiscoKey?, Auth?{AuthKey}, Hostinfo?, Followup?, Expiry?, Ephemeral?``.
``Expiry`` in the past means log out. RegisterResponse: ``MachineAuthorized, AuthURL, NodeKeyExpired, User?,
Login?, Error?``.

MapRequest: ``NodeKey, DiscoKey?, Stream, OmitPeers?, Endpoints?, EndpointTypes?, HomeDERP?, Hostinfo?``.

MapResponse: ``Node`` (self), ``Peers`` (full list, sorted by ID), ``PeersChanged``, ``PeersRemoved`` (IDs),
``PeersChangedPatch`` (``[{NodeID, Endpoints?, HomeDERP?, Online?, LastSeen?, DiscoKey?, Key?, KeyExpiry?}]``),
``DERPMap``, ``DNSConfig``, ``PacketFilter``, ``Domain``, ``KeepAlive``, ``ControlTime``. A missing field means
"unchanged"; a present ``Peers`` replaces the whole peer list. ``PacketFilter`` present and empty blocks all.

Node object: ``ID, StableID, Name (FQDN with trailing dot), User, Key, KeyExpiry, Machine, DiscoKey, Addresses,
AllowedIPs, Endpoints, HomeDERP, Online, LastSeen, Tags, Hostinfo, Created, Expired, PrimaryRoutes``.
FilterRule: ``{SrcIPs: [cidr|"*"], DstPorts: [{IP: cidr|"*", Ports: {First, Last}}], IPProto?: [int]}``.
"""

from __future__ import annotations

import ipaddress
import json
import struct
from collections.abc import Iterator, MutableMapping
from dataclasses import dataclass, field
from typing import Any

import zstandard
from nacl.exceptions import CryptoError
from nacl.public import Box, PrivateKey, PublicKey

CAPABILITY_VERSION = 1
MAX_SKEW = 300.0
MAX_REQUEST = 1 << 20
MAX_FRAME = 64 << 20
NONCE_LEN = 24
KEY_LEN = 32
FLAG_ZSTD = 0x01
# Below this size compression costs more than it saves on a loopback or LAN link.
COMPRESS_MIN = 4096

KINDS = ("mkey", "nodekey", "discokey")


class WireError(ValueError):
    """A malformed, unauthentic or replayed message from the other side."""


# --- keys -------------------------------------------------------------------------------------------------


def key_text(kind: str, raw: bytes) -> str:
    if len(raw) != KEY_LEN:
        raise ValueError(f"{kind} must be {KEY_LEN} bytes, got {len(raw)}")
    return f"{kind}:{raw.hex()}"


def parse_key(text: object, kind: str, where: str = "key") -> bytes:
    """Parse ``kind:<64 hex>``; raises WireError naming ``where``."""
    if not isinstance(text, str):
        raise WireError(f"{where}: expected a string {kind}:<64 hex>")
    prefix, sep, hexpart = text.partition(":")
    if not sep or prefix != kind:
        raise WireError(f"{where}: expected prefix {kind}:")
    return parse_hex_key(hexpart, where)


def parse_hex_key(hexpart: str, where: str = "key") -> bytes:
    if len(hexpart) != 2 * KEY_LEN:
        raise WireError(f"{where}: expected {2 * KEY_LEN} hex digits")
    try:
        raw = bytes.fromhex(hexpart)
    except ValueError:
        raise WireError(f"{where}: not hex") from None
    if len(raw) != KEY_LEN:  # fromhex skips spaces
        raise WireError(f"{where}: not hex")
    return raw


# --- sealing ----------------------------------------------------------------------------------------------


def _dumps(obj: Any) -> bytes:
    return json.dumps(obj, separators=(",", ":"), ensure_ascii=False).encode()


def _loads_object(data: bytes, what: str) -> dict[str, Any]:
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
    return seal(box, _dumps({"ts": now, "id": request_id, "body": body}), nonce)


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
    obj = _loads_object(unseal(box, data, "request"), "request")
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
    return seal(box, _dumps({"req": request_id, "body": body}), nonce)


def open_response(box: Box, data: bytes, request_id: str) -> dict[str, Any]:
    obj = _loads_object(unseal(box, data, "response"), "response")
    if obj.get("req") != request_id:
        raise WireError("response: answers another request (replay?)")
    body = obj.get("body")
    if not isinstance(body, dict):
        raise WireError("response: body must be an object")
    return body


# --- map stream frames ------------------------------------------------------------------------------------


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
        obj = _loads_object(payload, "map frame")
        if obj.get("req") != self.request_id:
            raise WireError("map frame belongs to another request (replay?)")
        if obj.get("seq") != self.next_seq:
            raise WireError(f"map frame out of sequence: got {obj.get('seq')}, expected {self.next_seq}")
        self.next_seq += 1
        msg = obj.get("msg")
        if not isinstance(msg, dict):
            raise WireError("map frame: msg must be an object")
        return msg


# --- request schema ---------------------------------------------------------------------------------------

MAX_ENDPOINTS = 64
MAX_TAGS = 64
MAX_ROUTES = 1024
MAX_HOSTNAME = 256


def _opt_str(d: dict[str, Any], key: str, limit: int = 4096) -> str:
    v = d.get(key, "")
    if v is None:
        return ""
    if not isinstance(v, str):
        raise WireError(f"{key}: expected a string")
    if len(v) > limit:
        raise WireError(f"{key}: longer than {limit} characters")
    return v


def _str_list(d: dict[str, Any], key: str, limit: int) -> tuple[str, ...]:
    v = d.get(key)
    if v is None:
        return ()
    if not isinstance(v, list) or not all(isinstance(x, str) and len(x) <= 256 for x in v):
        raise WireError(f"{key}: expected a list of strings")
    if len(v) > limit:
        raise WireError(f"{key}: more than {limit} entries")
    return tuple(v)


@dataclass(frozen=True)
class Hostinfo:
    hostname: str = ""
    os: str = ""
    request_tags: tuple[str, ...] = ()
    routable_ips: tuple[str, ...] = ()

    @classmethod
    def from_json(cls, v: object) -> Hostinfo:
        if v is None:
            return cls()
        if not isinstance(v, dict):
            raise WireError("Hostinfo: expected an object")
        return cls(
            hostname=_opt_str(v, "Hostname", MAX_HOSTNAME),
            os=_opt_str(v, "OS", 64),
            request_tags=_str_list(v, "RequestTags", MAX_TAGS),
            routable_ips=_str_list(v, "RoutableIPs", MAX_ROUTES),
        )

    def to_json(self) -> dict[str, Any]:
        out: dict[str, Any] = {"Hostname": self.hostname, "OS": self.os}
        if self.request_tags:
            out["RequestTags"] = list(self.request_tags)
        if self.routable_ips:
            out["RoutableIPs"] = list(self.routable_ips)
        return out


@dataclass(frozen=True)
class RegisterRequest:
    node_key: bytes
    old_node_key: bytes | None = None
    disco_key: bytes | None = None
    auth_key: str = ""
    hostinfo: Hostinfo = Hostinfo()
    followup: str = ""
    expiry: float | None = None
    ephemeral: bool = False

    @classmethod
    def from_json(cls, d: dict[str, Any]) -> RegisterRequest:
        auth = d.get("Auth") or {}
        if not isinstance(auth, dict):
            raise WireError("Auth: expected an object")
        expiry = d.get("Expiry")
        if expiry is not None and (not isinstance(expiry, (int, float)) or isinstance(expiry, bool)):
            raise WireError("Expiry: expected unix seconds")
        eph = d.get("Ephemeral", False)
        if not isinstance(eph, bool):
            raise WireError("Ephemeral: expected a boolean")
        old = d.get("OldNodeKey")
        disco = d.get("DiscoKey")
        return cls(
            node_key=parse_key(d.get("NodeKey"), "nodekey", "NodeKey"),
            old_node_key=parse_key(old, "nodekey", "OldNodeKey") if old else None,
            disco_key=parse_key(disco, "discokey", "DiscoKey") if disco else None,
            auth_key=_opt_str(auth, "AuthKey", 256),
            hostinfo=Hostinfo.from_json(d.get("Hostinfo")),
            followup=_opt_str(d, "Followup", 1024),
            expiry=None if expiry is None else float(expiry),
            ephemeral=eph,
        )

    def to_json(self) -> dict[str, Any]:
        out: dict[str, Any] = {"NodeKey": key_text("nodekey", self.node_key), "Hostinfo": self.hostinfo.to_json()}
        if self.old_node_key:
            out["OldNodeKey"] = key_text("nodekey", self.old_node_key)
        if self.disco_key:
            out["DiscoKey"] = key_text("discokey", self.disco_key)
        if self.auth_key:
            out["Auth"] = {"AuthKey": self.auth_key}
        if self.followup:
            out["Followup"] = self.followup
        if self.expiry is not None:
            out["Expiry"] = self.expiry
        if self.ephemeral:
            out["Ephemeral"] = True
        return out


@dataclass(frozen=True)
class MapRequest:
    node_key: bytes
    disco_key: bytes | None = None
    stream: bool = False
    omit_peers: bool = False
    endpoints: tuple[str, ...] | None = None
    endpoint_types: tuple[int, ...] = ()
    home_derp: int | None = None
    hostinfo: Hostinfo | None = None

    @classmethod
    def from_json(cls, d: dict[str, Any]) -> MapRequest:
        for k in ("Stream", "OmitPeers"):
            if not isinstance(d.get(k, False), bool):
                raise WireError(f"{k}: expected a boolean")
        eps = d.get("Endpoints")
        endpoints = None if eps is None else _str_list(d, "Endpoints", MAX_ENDPOINTS)
        for ep in endpoints or ():
            check_endpoint(ep)
        types = d.get("EndpointTypes") or []
        if not isinstance(types, list) or not all(isinstance(t, int) and not isinstance(t, bool) for t in types):
            raise WireError("EndpointTypes: expected a list of integers")
        if endpoints is not None and types and len(types) != len(endpoints):
            raise WireError("EndpointTypes: must be as long as Endpoints")
        home = d.get("HomeDERP")
        if home is not None and (not isinstance(home, int) or isinstance(home, bool) or not 0 <= home < 1 << 16):
            raise WireError("HomeDERP: expected a region id")
        disco = d.get("DiscoKey")
        hi = d.get("Hostinfo")
        return cls(
            node_key=parse_key(d.get("NodeKey"), "nodekey", "NodeKey"),
            disco_key=parse_key(disco, "discokey", "DiscoKey") if disco else None,
            stream=bool(d.get("Stream", False)),
            omit_peers=bool(d.get("OmitPeers", False)),
            endpoints=endpoints,
            endpoint_types=tuple(types),
            home_derp=home,
            hostinfo=None if hi is None else Hostinfo.from_json(hi),
        )

    def to_json(self) -> dict[str, Any]:
        out: dict[str, Any] = {"NodeKey": key_text("nodekey", self.node_key), "Stream": self.stream}
        if self.disco_key:
            out["DiscoKey"] = key_text("discokey", self.disco_key)
        if self.omit_peers:
            out["OmitPeers"] = True
        if self.endpoints is not None:
            out["Endpoints"] = list(self.endpoints)
            if self.endpoint_types:
                out["EndpointTypes"] = list(self.endpoint_types)
        if self.home_derp is not None:
            out["HomeDERP"] = self.home_derp
        if self.hostinfo is not None:
            out["Hostinfo"] = self.hostinfo.to_json()
        return out


def check_endpoint(ep: str) -> tuple[str, int]:
    """``1.2.3.4:5`` or ``[::1]:5`` -> (host, port); WireError otherwise."""
    host, sep, port_s = ep.rpartition(":")
    if not sep or not port_s.isdigit():
        raise WireError(f"endpoint {ep!r}: expected ip:port")
    if host.startswith("[") and host.endswith("]"):
        host = host[1:-1]
    try:
        ipaddress.ip_address(host)
    except ValueError:
        raise WireError(f"endpoint {ep!r}: bad IP address") from None
    port = int(port_s)
    if not 0 < port < 65536:
        raise WireError(f"endpoint {ep!r}: bad port")
    return host, port


# --- netmap application (shared by the node and the tests) ------------------------------------------------

PATCH_FIELDS = ("Endpoints", "HomeDERP", "Online", "LastSeen", "DiscoKey", "Key", "KeyExpiry")


@dataclass
class NetMap:
    """The node's view, rebuilt from a full MapResponse and the deltas after it."""

    node: dict[str, Any] | None = None
    peers: dict[int, dict[str, Any]] = field(default_factory=dict)
    derp_map: dict[str, Any] | None = None
    dns: dict[str, Any] | None = None
    packet_filter: list[dict[str, Any]] | None = None
    domain: str = ""

    def apply(self, msg: dict[str, Any]) -> None:
        if "Node" in msg and msg["Node"] is not None:
            self.node = msg["Node"]
        if msg.get("Peers") is not None:
            self.peers = {p["ID"]: p for p in msg["Peers"]}
        else:
            for p in msg.get("PeersChanged") or ():
                self.peers[p["ID"]] = p
            for pid in msg.get("PeersRemoved") or ():
                self.peers.pop(pid, None)
            for patch in msg.get("PeersChangedPatch") or ():
                peer = self.peers.get(patch["NodeID"])
                if peer is None:
                    continue
                peer = dict(peer)
                for k in PATCH_FIELDS:
                    if k in patch:
                        peer[k] = patch[k]
                self.peers[patch["NodeID"]] = peer
        for attr, key in (("derp_map", "DERPMap"), ("dns", "DNSConfig"), ("packet_filter", "PacketFilter")):
            if msg.get(key) is not None:
                setattr(self, attr, msg[key])
        if msg.get("Domain"):
            self.domain = msg["Domain"]

    def as_json(self) -> dict[str, Any]:
        return {
            "Node": self.node,
            "Peers": [self.peers[k] for k in sorted(self.peers)],
            "DERPMap": self.derp_map,
            "DNSConfig": self.dns,
            "PacketFilter": self.packet_filter,
            "Domain": self.domain,
        }

