"""Credentials of the API, sans-IO: texts, hashes, and who a request's Authorization header is.

Texts (each secret is 32 random bytes, hex; shown once, only its SHA-256 is stored, in credential_secrets)::

    tskey-api-<id>-<secret>       an API access token of a user; <id> is "tk" and 12 hex digits
    tskey-client-<id>-<secret>    an OAuth client's secret; <id> (the client_id) is "oc" and 12 hex digits
    tskey-oauth-<secret>          an access token from /api/v2/oauth/token, held in memory for its lifetime

The header is ``Authorization: Bearer <text>`` or ``Basic base64(<text>:)``. The event log names a credential by
its id only (events CredentialCreated/CredentialRevoked); the log's actor for a write made with one is
``api:<id>``.
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import hmac
from dataclasses import dataclass
from typing import Any

from coord.state import State

API_PREFIX = "tskey-api-"
CLIENT_PREFIX = "tskey-client-"
OAUTH_PREFIX = "tskey-oauth-"
# OAuth access tokens live this long (the PyPI client refuses <= 60 s and renews a minute before the end).
OAUTH_TOKEN_LIFETIME = 3600.0


class Unauthorized(Exception):
    """No credential, or one that is not (or no longer) good: a 401."""


def hash_secret(secret: str) -> str:
    return hashlib.sha256(secret.encode()).hexdigest()


def api_token_text(cred_id: str, secret: str) -> str:
    return f"{API_PREFIX}{cred_id}-{secret}"


def client_secret_text(cred_id: str, secret: str) -> str:
    return f"{CLIENT_PREFIX}{cred_id}-{secret}"


@dataclass(frozen=True)
class Principal:
    """Who calls: a user (with a role) through an API token, or an OAuth client (with scopes, no role)."""

    credential_id: str
    user_id: int
    role: str | None  # None for an OAuth client
    scopes: frozenset[str] = frozenset()
    tags: tuple[str, ...] = ()

    @property
    def actor(self) -> str:
        return f"api:{self.credential_id}"

    @property
    def is_client(self) -> bool:
        return self.role is None


@dataclass(frozen=True)
class OAuthToken:
    client_id: str
    expires: float


def bearer(header: str | None) -> str:
    """The credential text in an Authorization header (Bearer, or Basic with the text as user name)."""
    if not header:
        raise Unauthorized("no Authorization header: send Bearer <API access token>")
    kind, _, rest = header.strip().partition(" ")
    rest = rest.strip()
    if kind.lower() == "bearer" and rest:
        return rest
    if kind.lower() == "basic" and rest:
        try:
            user = base64.b64decode(rest, validate=True).decode().partition(":")[0]
        except (binascii.Error, UnicodeDecodeError):
            raise Unauthorized("Authorization: Basic is not base64 of <token>:") from None
        if user:
            return user
    raise Unauthorized("Authorization: expected Bearer <token> or Basic")


def split_text(text: str, prefix: str) -> tuple[str, str] | None:
    """(id, secret) of ``<prefix><id>-<secret>``, or None."""
    if not text.startswith(prefix):
        return None
    cred_id, sep, secret = text[len(prefix):].partition("-")
    if not sep or not cred_id or not secret:
        return None
    return cred_id, secret


def usable(cred: dict[str, Any], now: float) -> bool:
    return cred["revoked"] is None and (cred["expires"] is None or now < cred["expires"])


def check_secret(state: State, hashes: dict[str, str], cred_id: str, secret: str, kind: str,
                 now: float) -> dict[str, Any]:
    """The credential ``cred_id`` of ``kind`` if ``secret`` is its secret and it is usable now."""
    cred = state.credentials.get(cred_id)
    stored = hashes.get(cred_id)
    # The hash is compared even when the id is unknown, so timing does not tell ids apart.
    good = hmac.compare_digest(stored or "0" * 64, hash_secret(secret))
    if cred is None or stored is None or not good or cred["kind"] != kind:
        raise Unauthorized("API token invalid")
    if cred["revoked"] is not None:
        raise Unauthorized("API token revoked")
    if not usable(cred, now):
        raise Unauthorized("API token expired")
    return cred


def principal_of(cred_id: str, cred: dict[str, Any], state: State) -> Principal:
    if cred["kind"] == "client":
        return Principal(cred_id, cred["user_id"], None, frozenset(cred["scopes"]), tuple(cred["tags"]))
    u = state.users.get(cred["user_id"])
    if u is None:
        raise Unauthorized("API token invalid: its user was deleted")
    return Principal(cred_id, u.id, u.role)


def authenticate(header: str | None, state: State, hashes: dict[str, str], oauth: dict[str, OAuthToken],
                 now: float) -> Principal:
    text = bearer(header)
    parts = split_text(text, API_PREFIX)
    if parts is not None:
        cred = check_secret(state, hashes, parts[0], parts[1], "api", now)
        return principal_of(parts[0], cred, state)
    if text.startswith(OAUTH_PREFIX):
        tok = oauth.get(hash_secret(text))
        if tok is None or now >= tok.expires:
            raise Unauthorized("OAuth access token invalid or expired")
        client = state.credentials.get(tok.client_id)
        if client is None or not usable(client, now):
            raise Unauthorized("OAuth client revoked")
        return principal_of(tok.client_id, client, state)
    raise Unauthorized("API token invalid")
