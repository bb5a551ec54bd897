"""The coordination server's errors: one root, so a caller can catch anything coord raises on purpose.

- ``LocalError``: misuse on this side (a bad configuration, a command run where it cannot run); the operator fixes it.
- ``RemoteError``: bad input from the network; the glue answers 4xx, logs it and keeps serving.
- ``DomainError``: a command refused on the current state, whoever sent it; ``status`` is the HTTP status a node or
  the admin API sees.

Malformed control-protocol messages raise ``coord.wire.WireError``, a ``RemoteError`` (and a ``ValueError``).
"""

from __future__ import annotations


class CoordError(Exception):
    """Anything coord raises on purpose."""


class LocalError(CoordError):
    """Misuse on this side: fix the setup or the call, not the input."""


class RemoteError(CoordError):
    """Bad input from the network."""


class ConfigError(LocalError):
    """A bad configuration file, flag, environment variable or data-dir file; the message names the key or file."""


class DomainError(CoordError):
    """A command refused on the current state. ``status`` is the HTTP status a node or the admin API sees."""

    status = 400

    def __init__(self, message: str) -> None:
        super().__init__(message)
        self.message = message


class NotFound(DomainError):
    status = 404


class Conflict(DomainError):
    status = 409


class Unauthorized(DomainError):
    status = 401
