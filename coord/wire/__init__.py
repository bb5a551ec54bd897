"""The control protocol between a node and shoal-server. The only part of coord/ that node/ may import.

Sans-IO: callers pass time and randomness in. Each format is documented where it is defined:

- ``keys``: how keys are written (``mkey:``, ``nodekey:``, ``discokey:`` + 64 hex);
- ``seal``: the HTTP endpoints, sealed requests and responses, replay protection;
- ``frames``: the map stream's sealed, numbered frames;
- ``schema``: the messages (RegisterRequest/Response, MapRequest/Response, Node, FilterRule, DERPMap, DNSConfig)
  as typed frozen values, validated once where they are read.

Everything is re-exported here, so ``from coord import wire; wire.X`` is the way to use it.
"""

from __future__ import annotations

from coord.wire.errors import WireError
from coord.wire.frames import (
    COMPRESS_MIN,
    FLAG_ZSTD,
    MAX_FRAME,
    FrameReader,
    encode_frame_payload,
    frame,
    seal_frame,
)
from coord.wire.keys import KEY_LEN, KINDS, key_text, parse_hex_key, parse_key, parse_opt_key
from coord.wire.schema import (
    ALL_PORTS,
    ALLOW_ALL_RULE,
    EP_LOCAL,
    EP_STUN,
    FILTER_ALLOW_ALL,
    KEEP,
    MAX_ENDPOINTS,
    MAX_HOSTNAME,
    MAX_ROUTES,
    MAX_TAGS,
    PATCH_FIELDS,
    DERPMap,
    DERPMapError,
    DERPNode,
    DERPRegion,
    DNSConfig,
    Endpoint,
    FilterRule,
    Hostinfo,
    Keep,
    MapRequest,
    MapResponse,
    NetMap,
    NetPortRange,
    Node,
    PeerChange,
    PortRange,
    RegisterRequest,
    RegisterResponse,
    check_endpoint,
    parse_datetime,
    parse_filter,
    parse_time,
    rfc3339,
    time_text,
)
from coord.wire.seal import (
    MAX_REQUEST,
    MAX_SKEW,
    NONCE_LEN,
    OpenedRequest,
    ReplayGuard,
    make_box,
    open_request,
    open_response,
    seal,
    seal_request,
    seal_response,
    unseal,
)

CAPABILITY_VERSION = 1

__all__ = [
    "ALLOW_ALL_RULE",
    "ALL_PORTS",
    "CAPABILITY_VERSION",
    "COMPRESS_MIN",
    "EP_LOCAL",
    "EP_STUN",
    "FILTER_ALLOW_ALL",
    "FLAG_ZSTD",
    "KEEP",
    "KEY_LEN",
    "KINDS",
    "MAX_ENDPOINTS",
    "MAX_FRAME",
    "MAX_HOSTNAME",
    "MAX_REQUEST",
    "MAX_ROUTES",
    "MAX_SKEW",
    "MAX_TAGS",
    "NONCE_LEN",
    "PATCH_FIELDS",
    "DERPMap",
    "DERPMapError",
    "DERPNode",
    "DERPRegion",
    "DNSConfig",
    "Endpoint",
    "FilterRule",
    "FrameReader",
    "Hostinfo",
    "Keep",
    "MapRequest",
    "MapResponse",
    "NetMap",
    "NetPortRange",
    "Node",
    "OpenedRequest",
    "PeerChange",
    "PortRange",
    "RegisterRequest",
    "RegisterResponse",
    "ReplayGuard",
    "WireError",
    "check_endpoint",
    "encode_frame_payload",
    "frame",
    "key_text",
    "make_box",
    "open_request",
    "open_response",
    "parse_datetime",
    "parse_filter",
    "parse_hex_key",
    "parse_key",
    "parse_opt_key",
    "parse_time",
    "rfc3339",
    "seal",
    "seal_frame",
    "seal_request",
    "seal_response",
    "time_text",
    "unseal",
]
