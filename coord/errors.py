"""Errors the coordination server reports to admins and nodes."""

from __future__ import annotations


class DomainError(Exception):
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


class ConfigError(Exception):
    """A bad configuration file, flag or environment variable; the message names the key."""
