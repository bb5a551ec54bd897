"""The one error root of ``derp`` and the reasons the relay closes a connection (sans-IO).

::

    DerpError                           anything raised by derp: ``except DerpError`` catches all of it
    ├── LocalError (ValueError)         we were misused: a bad argument, a call in the wrong state
    │   ├── ConfigError                 a bad relay or client configuration (key sizes, URLs, meshing without a key)
    │   │   └── cli.CliError            a bad shoal-derp flag or file
    │   └── frames.LocalFrameError      (= protocol.LocalProtocolError)
    └── RemoteError                     the peer sent bad input; ``reason``: the CloseReason the relay counts
        ├── frames.RemoteFrameError     (= protocol.RemoteProtocolError)        protocol_error
        │   └── protocol.HandshakeError                                         handshake_error
        │       ├── protocol.ForgedClientInfo                                   forged_client_info
        │       └── protocol.HandshakeTimeout                                   handshake_timeout
        ├── conn.NotMesh                a mesh-only frame without the mesh key  not_mesh
        ├── http.HttpError (ValueError) a request head we refuse                bad_http
        ├── stun.StunError (ValueError) a datagram that is not a STUN message we handle
        └── client.RelayRefused (ConnectionError)  a relay that does not answer as a DERP relay

``frames.FrameError`` is the common parent of the two frame errors, as before. Classes that were ValueErrors stay
ValueErrors, so existing ``except ValueError`` clauses still catch them.

The relay decides why it closes a connection from the class of the error (``e.reason``), never from its text.
"""

from __future__ import annotations

from enum import StrEnum
from typing import ClassVar


class CloseReason(StrEnum):
    """Why the relay closed a connection: the ``reason`` label of ``derp_closes_total``."""

    BAD_HTTP = "bad_http"
    HANDSHAKE_TIMEOUT = "handshake_timeout"
    HANDSHAKE_ERROR = "handshake_error"
    FORGED_CLIENT_INFO = "forged_client_info"
    ADMISSION_DENIED = "admission_denied"
    ADMISSION_ERROR = "admission_error"
    PROTOCOL_ERROR = "protocol_error"
    NOT_MESH = "not_mesh"
    CLIENT_CLOSED = "client_closed"


class DerpError(Exception):
    """Root of every error derp raises."""


class LocalError(DerpError, ValueError):
    """We were misused (a programming or configuration error on this side)."""


class ConfigError(LocalError):
    """The relay's configuration is wrong; the message says which setting and why."""


class RemoteError(DerpError):
    """The peer sent something we refuse. ``reason``: what the relay records when it closes over it."""

    reason: ClassVar[CloseReason] = CloseReason.PROTOCOL_ERROR
