"""The one error of the control protocol."""

from __future__ import annotations

from coord.errors import RemoteError


class WireError(RemoteError, ValueError):
    """A malformed, unauthentic or replayed message from the other side."""
