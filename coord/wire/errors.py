"""The one error of the control protocol."""

from __future__ import annotations


class WireError(ValueError):
    """A malformed, unauthentic or replayed message from the other side."""
