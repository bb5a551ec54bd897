"""Pre-auth key text: ``skey-<prefix>-<secret>``. Only the prefix and a hash of the secret are stored."""

from __future__ import annotations

import hashlib

from coord.errors import Unauthorized

AUTH_KEY_PREFIX = "skey"


def hash_secret(secret: str) -> str:
    # Secrets carry 192 random bits, so a fast hash is as strong as a slow one here: nothing to brute-force.
    return hashlib.sha256(secret.encode()).hexdigest()


def key_text(prefix: str, secret: str) -> str:
    return f"{AUTH_KEY_PREFIX}-{prefix}-{secret}"


def split_auth_key(text: str) -> tuple[str, str]:
    """``skey-<prefix>-<secret>`` -> (prefix, secret); Unauthorized if it does not look like one."""
    parts = text.strip().split("-")
    if len(parts) != 3 or parts[0] != AUTH_KEY_PREFIX or not parts[1] or not parts[2]:
        raise Unauthorized("invalid auth key")
    return parts[1], parts[2]
