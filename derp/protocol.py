"""Sans-IO DERP connection: the handshake and frame events for either end (h11-style push/pull).

The wire format is in ``derp.frames``. This module adds the handshake state machine::

    server: SEND ServerKey -> AWAIT_CLIENT_INFO -> (ClientAuthenticated event; app decides) -> accept(): ServerInfo
            -> OPEN
    client: AWAIT_SERVER_KEY -> (ServerKey: ClientInfo queued) -> AWAIT_SERVER_INFO -> (Connected event) -> OPEN

Usage: ``receive_data(bytes)``, then drain ``next_event()`` until it returns ``NEED_DATA``; send what
``data_to_send()`` returns (the ServerKey and ClientInfo the machine produces itself); build frames with ``send(...)``.
Time is passed in: ``next_timer()`` is the handshake deadline (10 s), ``handle_timer(now)`` expires it.

Errors: a bad peer raises ``RemoteProtocolError`` (the connection is then in ``State.ERROR`` and must be closed);
misuse raises ``LocalProtocolError``. Before the connection is open every remote error is a ``HandshakeError``
(``ForgedClientInfo`` when the ClientInfo box does not open, ``HandshakeTimeout`` past the deadline), so the glue
reads the close reason off the error's class (``e.reason``, see derp.errors).

ClientInfo JSON is read as Go's encoding/json reads Tailscale's ``ClientInfo`` struct: keys match field names
case-insensitively (``version``, ``Version``, ``VERSION``, and Go's folding of ``K``/``ſ``/``ı``/``İ``), the last
occurrence of a field wins, ``null`` leaves a field unset, a value of the wrong type is refused, and ``meshKey``, when
present, must be a 64-digit hex string (a 32-byte ``key.DERPMesh``).
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from enum import Enum
from typing import Any

from nacl.exceptions import CryptoError
from nacl.public import Box, PrivateKey, PublicKey
from nacl.utils import random as nacl_random

from derp import frames
from derp.errors import CloseReason
from derp.frames import FrameType, LocalFrameError, RemoteFrameError

RemoteProtocolError = RemoteFrameError
LocalProtocolError = LocalFrameError


class HandshakeError(RemoteProtocolError):
    """The peer broke the handshake (any remote error before the connection is open)."""

    reason = CloseReason.HANDSHAKE_ERROR


class ForgedClientInfo(HandshakeError):
    """The ClientInfo box does not open: the client does not hold the key it claims."""

    reason = CloseReason.FORGED_CLIENT_INFO


class HandshakeTimeout(HandshakeError):
    reason = CloseReason.HANDSHAKE_TIMEOUT


class Role(Enum):
    CLIENT = "client"
    SERVER = "server"


class State(Enum):
    AWAIT_SERVER_KEY = "await-server-key"
    AWAIT_CLIENT_INFO = "await-client-info"
    AWAIT_ACCEPT = "await-accept"
    AWAIT_SERVER_INFO = "await-server-info"
    OPEN = "open"
    ERROR = "error"


class _NeedData:
    def __repr__(self) -> str:
        return "NEED_DATA"


NEED_DATA = _NeedData()


@dataclass(frozen=True, slots=True)
class ClientInfoJSON:
    """What a client says about itself, once its box has opened."""

    version: int = frames.PROTOCOL_VERSION
    mesh_key: str = ""
    can_ack_pings: bool = True
    is_prober: bool = False
    extra: dict[str, Any] = field(default_factory=dict)

    def to_json(self) -> bytes:
        d: dict[str, Any] = {"version": self.version, "CanAckPings": self.can_ack_pings}
        if self.mesh_key:
            d["meshKey"] = self.mesh_key
        if self.is_prober:
            d["IsProber"] = True
        d.update(self.extra)
        return json.dumps(d, separators=(",", ":")).encode()

    @classmethod
    def from_json(cls, raw: bytes) -> ClientInfoJSON:
        objects: list[list[tuple[str, Any]]] = []

        def keep_pairs(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
            objects.append(pairs)  # the outermost object is completed, so appended, last
            return dict(pairs)

        try:
            d = json.loads(raw, object_pairs_hook=keep_pairs, parse_constant=_no_constant)
        except (ValueError, UnicodeDecodeError) as e:
            raise HandshakeError(f"ClientInfo is not JSON: {e}") from None
        if not isinstance(d, dict):
            raise HandshakeError("ClientInfo JSON is not an object")
        got: dict[str, Any] = {}
        extra: dict[str, Any] = {}
        for key, value in objects[-1]:
            name = _CLIENT_INFO_FIELDS.get(_go_fold(key))
            if name is None:
                extra[key] = value
            elif value is not None or name == "meshKey":
                got[name] = _check_field(name, value)
        return cls(
            version=got.get("version", 0),
            mesh_key=got.get("meshKey", ""),
            can_ack_pings=got.get("CanAckPings", False),
            is_prober=got.get("IsProber", False),
            extra=extra,
        )


# ClientInfo's fields by their folded names. Go's encoding/json matches a key to a field through foldName:
# ASCII letters upper-cased, any other rune r as ToUpper(ToLower(r)). The field names are ASCII, and the only
# non-ASCII runes that fold to an ASCII letter are these four; every other one can never match.
_CLIENT_INFO_FIELDS = {"VERSION": "version", "MESHKEY": "meshKey", "CANACKPINGS": "CanAckPings", "ISPROBER": "IsProber"}
_FOLD_TO_ASCII = {"\u212a": "K", "\u017f": "S", "\u0131": "I", "\u0130": "I"}
_HEX = frozenset("0123456789abcdefABCDEF")
_INT64 = 1 << 63


def _go_fold(key: str) -> str:
    return "".join(c.upper() if c < "\x80" else _FOLD_TO_ASCII.get(c, c) for c in key)


def _no_constant(name: str) -> Any:
    raise ValueError(f"{name} is not JSON")


def _check_field(name: str, value: Any) -> Any:
    if name == "version":
        if type(value) is not int or not -_INT64 <= value < _INT64:
            raise HandshakeError(f"ClientInfo version must be an integer, got {_json_type(value)}")
    elif name == "meshKey":
        if type(value) is not str:
            raise HandshakeError(f"ClientInfo meshKey must be a string of 64 hex digits, got {_json_type(value)}")
        if len(value) != 64 or not _HEX.issuperset(value):
            what = f"{len(value)} characters" if len(value) != 64 else "non-hex characters"
            raise HandshakeError(f"ClientInfo meshKey must be 64 hex digits (a 32-byte key), got {what}")
    elif type(value) is not bool:
        raise HandshakeError(f"ClientInfo {name} must be true or false, got {_json_type(value)}")
    return value


def _json_type(value: Any) -> str:
    if value is None:
        return "null"
    if isinstance(value, bool):
        return "a boolean"
    if isinstance(value, int):
        return "an integer out of range"
    return {float: "a non-integer number", str: "a string", list: "an array", dict: "an object"}[type(value)]


@dataclass(frozen=True, slots=True)
class ClientAuthenticated:
    """Server side: the client proved it holds ``key``. Call ``accept()`` or close."""

    key: bytes
    info: ClientInfoJSON


@dataclass(frozen=True, slots=True)
class Connected:
    """Client side: the server accepted us."""

    server_key: bytes
    info: dict[str, Any]


Event = ClientAuthenticated | Connected | frames.Frame


class DerpConnection:
    """One end of one DERP connection. ``private_key`` is the 32-byte Curve25519 key of this end."""

    def __init__(
        self,
        role: Role,
        private_key: bytes,
        *,
        now: float = 0.0,
        client_info: ClientInfoJSON | None = None,
        handshake_timeout: float = frames.HANDSHAKE_TIMEOUT,
        max_frame: int = frames.MAX_FRAME_LEN,
    ) -> None:
        if len(private_key) != frames.KEY_LEN:
            raise LocalProtocolError(f"private key must be {frames.KEY_LEN} bytes")
        self.role = role
        self._priv = PrivateKey(private_key)
        self.public_key = bytes(self._priv.public_key)
        self.peer_key: bytes | None = None
        self.client_info = client_info or ClientInfoJSON()
        self._box: Box | None = None
        self._buf = frames.FrameBuffer(max_frame=max(max_frame, frames.MAX_INFO_LEN))
        self._out = bytearray()
        self._deadline: float | None = now + handshake_timeout
        self._max_frame = max_frame
        if role is Role.SERVER:
            self.state = State.AWAIT_CLIENT_INFO
            self._out += frames.encode_server_key(self.public_key)
        else:
            self.state = State.AWAIT_SERVER_KEY

    # Inputs

    def receive_data(self, data: bytes) -> None:
        if self.state is State.ERROR:
            raise LocalProtocolError("connection is in the ERROR state")
        try:
            self._buf.feed(data)
        except RemoteProtocolError as e:
            self._fail(e)
            raise

    def next_event(self) -> Event | _NeedData:
        if self.state is State.ERROR:
            raise LocalProtocolError("connection is in the ERROR state")
        if self.state is State.AWAIT_ACCEPT:
            # Frames after ClientInfo wait until the app has decided on admission.
            return NEED_DATA
        try:
            got = self._buf.next_frame()
            if got is None:
                return NEED_DATA
            return self._handle(*got)
        except RemoteProtocolError as e:
            self._fail(e)
            raise

    def next_timer(self) -> float | None:
        return self._deadline

    def handle_timer(self, now: float) -> None:
        if self._deadline is not None and now >= self._deadline:
            self.state = State.ERROR
            self._deadline = None
            raise HandshakeTimeout("handshake did not finish within the deadline")

    def _fail(self, e: RemoteProtocolError) -> None:
        """Enter ERROR. Before the connection opened, a plain remote error is re-raised as a HandshakeError."""
        was_open, self.state = self.state is State.OPEN, State.ERROR
        if not was_open and not isinstance(e, HandshakeError):
            raise HandshakeError(str(e)) from e

    # Outputs

    def data_to_send(self) -> bytes:
        out = bytes(self._out)
        self._out.clear()
        return out

    def accept(self, server_info: dict[str, Any] | None = None, nonce: bytes | None = None) -> bytes:
        """Server side, after ClientAuthenticated and admission: the ServerInfo frame to send."""
        if self.role is not Role.SERVER or self.state is not State.AWAIT_ACCEPT or self._box is None:
            raise LocalProtocolError(f"accept() needs a server awaiting accept, state is {self.state.value}")
        body = json.dumps(server_info or {"version": frames.PROTOCOL_VERSION}).encode()
        nonce = nonce if nonce is not None else nacl_random(frames.NONCE_LEN)
        sealed = self._box.encrypt(body, nonce).ciphertext
        self.state = State.OPEN
        self._deadline = None
        return frames.encode_server_info(nonce, sealed)

    def take_buffered(self) -> bytes:
        """Bytes received past the handshake, for a caller that parses the open stream itself."""
        return self._buf.take()

    def send(self, frame: frames.Frame) -> bytes:
        """Encode a frame for the open connection."""
        if self.state is not State.OPEN:
            raise LocalProtocolError(f"cannot send {type(frame).__name__} in state {self.state.value}")
        match frame:
            case frames.SendPacket(dst, packet):
                return frames.encode_send_packet(dst, packet)
            case frames.RecvPacket(src, packet):
                return frames.encode_recv_packet(src, packet)
            case frames.ForwardPacket(src, dst, packet):
                return frames.encode_forward_packet(src, dst, packet)
            case frames.KeepAlive():
                return frames.encode_keep_alive()
            case frames.NotePreferred(preferred):
                return frames.encode_note_preferred(preferred)
            case frames.PeerGone(key, reason):
                return frames.encode_peer_gone(key, reason)
            case frames.PeerPresent(key, ip, port, flags):
                return frames.encode_peer_present(key, ip, port, flags)
            case frames.WatchConns():
                return frames.encode_watch_conns()
            case frames.ClosePeer(key):
                return frames.encode_close_peer(key)
            case frames.Ping(data):
                return frames.encode_ping(data)
            case frames.Pong(data):
                return frames.encode_pong(data)
            case frames.Health(problem):
                return frames.encode_health(problem)
            case frames.Restarting(a, b):
                return frames.encode_restarting(a, b)
        raise LocalProtocolError(f"{type(frame).__name__} is not sent on an open connection")

    # Internals

    def _handle(self, ftype: int, payload: bytes) -> Event | _NeedData:
        if self.state is State.OPEN:
            if len(payload) > self._max_frame:
                raise RemoteProtocolError(f"frame of {len(payload)} bytes is over {self._max_frame}")
            if ftype in (FrameType.SERVER_KEY, FrameType.CLIENT_INFO, FrameType.SERVER_INFO):
                raise RemoteProtocolError(f"handshake frame 0x{ftype:02x} on an open connection")
            return frames.decode(ftype, payload)
        if self.state is State.AWAIT_CLIENT_INFO:
            if ftype != FrameType.CLIENT_INFO:
                raise RemoteProtocolError(f"expected ClientInfo, got frame type 0x{ftype:02x}")
            ci = frames.decode(ftype, payload)
            assert isinstance(ci, frames.ClientInfo)
            box = Box(self._priv, PublicKey(ci.key))
            try:
                raw = box.decrypt(ci.box, ci.nonce)
            except CryptoError:
                raise ForgedClientInfo("ClientInfo box does not open: the client does not hold its key") from None
            info = ClientInfoJSON.from_json(raw)
            self.peer_key, self._box = ci.key, box
            self.state = State.AWAIT_ACCEPT
            return ClientAuthenticated(ci.key, info)
        if self.state is State.AWAIT_SERVER_KEY:
            if ftype != FrameType.SERVER_KEY:
                raise RemoteProtocolError(f"expected ServerKey, got frame type 0x{ftype:02x}")
            sk = frames.decode(ftype, payload)
            assert isinstance(sk, frames.ServerKey)
            self.peer_key = sk.key
            self._box = Box(self._priv, PublicKey(sk.key))
            nonce = nacl_random(frames.NONCE_LEN)
            sealed = self._box.encrypt(self.client_info.to_json(), nonce).ciphertext
            self._out += frames.encode_client_info(self.public_key, nonce, sealed)
            self.state = State.AWAIT_SERVER_INFO
            return sk
        if self.state is State.AWAIT_SERVER_INFO:
            if ftype != FrameType.SERVER_INFO:
                raise RemoteProtocolError(f"expected ServerInfo, got frame type 0x{ftype:02x}")
            si = frames.decode(ftype, payload)
            assert isinstance(si, frames.ServerInfo) and self._box is not None and self.peer_key is not None
            try:
                raw = self._box.decrypt(si.box, si.nonce)
                info = json.loads(raw)
            except (CryptoError, ValueError, UnicodeDecodeError):
                raise RemoteProtocolError("ServerInfo box does not open or is not JSON") from None
            if not isinstance(info, dict):
                raise RemoteProtocolError("ServerInfo JSON is not an object")
            self.state = State.OPEN
            self._deadline = None
            return Connected(self.peer_key, info)
        raise LocalProtocolError(f"no frames expected in state {self.state.value}")
