"""From validated OIDC claims to a Shoal identity, or a refusal (pure: no I/O, no clock).

A user is the pair (issuer, subject), never an e-mail address: e-mails change hands and IdPs let users edit
them. The Shoal user *name* (what policies and ``users list`` show) is derived by the configured strategy and
must be a valid user name; whether that name already belongs to another (issuer, subject) is the write path's
check (coord.decide), since only the state knows it.

Rules, in order:
- the ID token carries ``sub``; /userinfo, when read, must carry the same ``sub`` (OIDC Core 5.3.2);
- claims are the ID token's, overlaid by /userinfo's (that is where oidc-provider and others put groups);
- ``email_verified`` is true only when the claim is the JSON ``true`` (or the string "true", as some IdPs send);
- allow-lists (AND): ``allowed_users`` and ``allowed_domains`` look only at a verified e-mail, ``allowed_groups``
  at the IdP groups;
- groups come from the dotted ``groups_claim`` (a list of strings, or one string), bounded in number and length,
  and become policy groups only through ``group_map``: an IdP group that is not mapped gives no access;
- the ``email`` name strategy needs a verified e-mail (an unverified one could claim someone else's name).
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from coord.auth.config import OidcConfig
from coord.names import valid_user_name

MAX_GROUPS = 256
MAX_GROUP_LEN = 256
MAX_CLAIM_LEN = 512


@dataclass(frozen=True)
class Identity:
    issuer: str
    subject: str

    @property
    def key(self) -> str:
        """One string for rate limits and logs (issuer URLs hold no space)."""
        return f"{self.issuer} {self.subject}"


@dataclass(frozen=True)
class Profile:
    """What one successful sign-in says about its user."""

    identity: Identity
    name: str
    email: str
    email_verified: bool
    display_name: str
    idp_groups: tuple[str, ...]  # only the IdP groups the config mentions (mapped or allow-listed)
    groups: tuple[str, ...]  # policy groups, e.g. ("group:admins",)
    expiry: float | None  # the ID token's exp when expiry_from_token is on


class Refused(Exception):
    """A sign-in the rules do not admit. ``code`` is stable (tests, counters); ``message`` is for the person."""

    def __init__(self, code: str, message: str, identity: Identity | None = None) -> None:
        super().__init__(f"{code}: {message}")
        self.code = code
        self.message = message
        self.identity = identity


def dotted(claims: Mapping[str, Any], path: tuple[str, ...]) -> Any:
    """``("realm_access", "roles")`` -> claims["realm_access"]["roles"]; None where the path stops."""
    cur: Any = claims
    for part in path:
        if not isinstance(cur, Mapping) or part not in cur:
            return None
        cur = cur[part]
    return cur


def _text(claims: Mapping[str, Any], key: str) -> str:
    v = claims.get(key)
    return v.strip()[:MAX_CLAIM_LEN] if isinstance(v, str) else ""


def idp_groups(cfg: OidcConfig, claims: Mapping[str, Any], identity: Identity) -> tuple[str, ...]:
    raw = dotted(claims, cfg.groups_claim)
    if raw is None:
        return ()
    if isinstance(raw, str):
        raw = [raw]
    where = ".".join(cfg.groups_claim)
    if not isinstance(raw, list) or not all(isinstance(g, str) for g in raw):
        raise Refused("bad_groups", f"the identity provider's {where!r} claim is not a list of strings", identity)
    if len(raw) > MAX_GROUPS or any(len(g) > MAX_GROUP_LEN for g in raw):
        raise Refused("bad_groups", f"the identity provider's {where!r} claim is too large", identity)
    return tuple(sorted(set(raw)))


def email_verified(claims: Mapping[str, Any]) -> bool:
    v = claims.get("email_verified")
    return v is True or (isinstance(v, str) and v.lower() == "true")


def map_claims(
    cfg: OidcConfig, id_claims: Mapping[str, Any], userinfo: Mapping[str, Any] | None = None
) -> Profile:
    """Validated ID token claims (and /userinfo) -> Profile; Refused says why not."""
    sub = id_claims.get("sub")
    iss = id_claims.get("iss")
    if not isinstance(sub, str) or not sub or len(sub) > 255 or not isinstance(iss, str) or not iss:
        raise Refused("bad_token", "the ID token has no usable issuer and subject")
    identity = Identity(iss, sub)
    merged: dict[str, Any] = dict(id_claims)
    if userinfo is not None:
        if userinfo.get("sub") != sub:
            raise Refused("userinfo_mismatch", "the identity provider's userinfo is for another subject", identity)
        merged.update({k: v for k, v in userinfo.items() if k not in ("iss", "aud", "exp", "iat", "nonce")})

    email = _text(merged, "email").lower()
    verified = bool(email) and email_verified(merged)
    groups = idp_groups(cfg, merged, identity)

    if cfg.allowed_users or cfg.allowed_domains:
        if not email:
            raise Refused("no_email", "the identity provider sent no e-mail address, and this server admits "
                          "people by e-mail", identity)
        if not verified:
            raise Refused("unverified_email", f"the e-mail address {email} is not verified at the identity "
                          "provider; verify it there, then sign in again", identity)
    if cfg.allowed_users and email not in cfg.allowed_users:
        raise Refused("user_not_allowed", f"{email} is not on this server's list of allowed users", identity)
    if cfg.allowed_domains and email.rpartition("@")[2] not in cfg.allowed_domains:
        raise Refused("domain_not_allowed", f"the domain of {email} is not allowed on this server", identity)
    if cfg.allowed_groups and not set(groups) & set(cfg.allowed_groups):
        raise Refused("group_not_allowed", "you are in none of the identity provider groups this server admits",
                      identity)

    name = _derive_name(cfg, merged, email, verified, identity)
    mapping = cfg.policy_groups
    known = set(mapping) | set(cfg.allowed_groups)
    exp = id_claims.get("exp")
    expiry = float(exp) if cfg.expiry_from_token and isinstance(exp, (int, float)) else None
    return Profile(
        identity=identity,
        name=name,
        email=email,
        email_verified=verified,
        display_name=_text(merged, "name"),
        idp_groups=tuple(g for g in groups if g in known),
        groups=tuple(sorted({mapping[g] for g in groups if g in mapping})),
        expiry=expiry,
    )


def _derive_name(cfg: OidcConfig, claims: Mapping[str, Any], email: str, verified: bool, identity: Identity) -> str:
    if cfg.user_name == "email":
        if not email:
            raise Refused("no_name", "the identity provider sent no e-mail address to name you by", identity)
        if not verified:
            raise Refused("unverified_email", f"the e-mail address {email} is not verified at the identity "
                          "provider, so it cannot be your user name; verify it there, then sign in again", identity)
        name = email
    elif cfg.user_name == "preferred_username":
        name = _text(claims, "preferred_username")
        if not name:
            raise Refused("no_name", "the identity provider sent no preferred_username to name you by", identity)
    else:
        name = identity.subject
    if not valid_user_name(name):
        raise Refused("bad_name", f"{name[:80]!r} is not a valid Shoal user name (letters, digits and ._@+-, "
                      "at most 64)", identity)
    return name
