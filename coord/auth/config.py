"""The ``[oidc]`` table of the server config: which identity provider signs people in, and who may.

Every key, with its default::

    [oidc]
    issuer              = ""                  # required: the IdP's issuer URL (discovery is <issuer>/.well-known/...)
    client_id           = ""                  # required
    client_secret_file  = ""                  # one of these two: a file holding the secret (mode 0600 advised) ...
    client_secret_env   = ""                  # ... or the name of an environment variable holding it
    scopes              = ["openid", "email", "profile"]
    allowed_domains     = []                  # verified e-mail domains (empty: any)
    allowed_users       = []                  # verified e-mail addresses (empty: any)
    allowed_groups      = []                  # IdP groups, one of which the user must be in (empty: any)
    groups_claim        = "groups"            # dotted path into the claims, e.g. "realm_access.roles"
    user_name           = "email"             # email | preferred_username | sub: the Shoal user name
    expiry_from_token   = false               # node key expiry = the ID token's expiry instead of key_expiry
    allow_http          = false               # an http:// server URL off loopback (labs only: cookies lose Secure)
    [oidc.group_map]                          # IdP group -> policy group; only these groups are ever used
    "shoal-admins"      = "group:admins"

The client secret is never accepted inline, never logged and never put in an event: `Secret` hides it from
``repr`` and ``str``. PKCE (S256) is always on and cannot be turned off. Allow-lists are combined with AND: each
list that is set must admit the user; domain and user lists count only a verified e-mail.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any
from urllib.parse import urlsplit

from coord.errors import ConfigError

USER_NAME_STRATEGIES = ("email", "preferred_username", "sub")
DEFAULT_SCOPES = ("openid", "email", "profile")
KEYS = (
    "issuer", "client_id", "client_secret_file", "client_secret_env", "scopes", "allowed_domains", "allowed_users",
    "allowed_groups", "groups_claim", "user_name", "expiry_from_token", "allow_http", "group_map", "pkce",
)
_SCOPE = re.compile(r"^[\x21\x23-\x5b\x5d-\x7e]+$")  # RFC 6749 scope-token
_POLICY_GROUP = re.compile(r"^group:[A-Za-z0-9][A-Za-z0-9._-]{0,62}$")
_DOMAIN = re.compile(r"^[a-z0-9]([a-z0-9-]*[a-z0-9])?(\.[a-z0-9]([a-z0-9-]*[a-z0-9])?)+$")
_ENV_NAME = re.compile(r"^[A-Za-z_][A-Za-z0-9_]*$")


class Secret:
    """A value that must not leak: ``repr`` and ``str`` show stars; ``reveal()`` is the one way in."""

    __slots__ = ("_value",)

    def __init__(self, value: str) -> None:
        self._value = value

    def reveal(self) -> str:
        return self._value

    def __repr__(self) -> str:
        return "Secret('***')"

    __str__ = __repr__

    def __eq__(self, other: object) -> bool:
        return isinstance(other, Secret) and other._value == self._value

    def __hash__(self) -> int:
        return hash(("Secret", self._value))


@dataclass(frozen=True)
class OidcConfig:
    issuer: str
    client_id: str
    client_secret: Secret = field(repr=False)
    scopes: tuple[str, ...] = DEFAULT_SCOPES
    allowed_domains: tuple[str, ...] = ()
    allowed_users: tuple[str, ...] = ()
    allowed_groups: tuple[str, ...] = ()
    groups_claim: tuple[str, ...] = ("groups",)
    user_name: str = "email"
    expiry_from_token: bool = False
    allow_http: bool = False
    group_map: tuple[tuple[str, str], ...] = ()

    @property
    def policy_groups(self) -> dict[str, str]:
        return dict(self.group_map)


def _str(data: Mapping[str, Any], key: str, where: str, default: str = "") -> str:
    v = data.get(key, default)
    if not isinstance(v, str):
        raise ConfigError(f"{where}.{key}: expected a string, got {type(v).__name__}")
    return v.strip()


def _bool(data: Mapping[str, Any], key: str, where: str) -> bool:
    v = data.get(key, False)
    if isinstance(v, bool):
        return v
    if isinstance(v, str) and v.lower() in ("1", "true", "yes", "on", "0", "false", "no", "off"):
        return v.lower() in ("1", "true", "yes", "on")
    raise ConfigError(f"{where}.{key}: expected true or false, got {v!r}")


def _list(data: Mapping[str, Any], key: str, where: str, default: tuple[str, ...] = ()) -> tuple[str, ...]:
    v = data.get(key, list(default))
    if isinstance(v, str):
        # Flags and environment variables give comma-separated lists.
        v = [s for s in (p.strip() for p in v.split(",")) if s]
    if not isinstance(v, (list, tuple)):
        raise ConfigError(f"{where}.{key}: expected a list of strings, got {type(v).__name__}")
    out = []
    for i, item in enumerate(v):
        if not isinstance(item, str) or not item.strip():
            raise ConfigError(f"{where}.{key}[{i}]: expected a non-empty string, got {item!r}")
        out.append(item.strip())
    if len(set(out)) != len(out):
        dup = next(x for x in out if out.count(x) > 1)
        raise ConfigError(f"{where}.{key}: {dup!r} is listed twice")
    return tuple(out)


def _url(text: str, key: str, where: str) -> str:
    u = urlsplit(text)
    if u.scheme not in ("http", "https") or not u.hostname or u.query or u.fragment:
        raise ConfigError(f"{where}.{key}: {text!r} must be an http:// or https:// URL without query or fragment")
    return text.rstrip("/")


def read_secret_file(path: str) -> str:
    with open(path, encoding="utf-8") as f:
        return f.read()


def parse(
    data: Mapping[str, Any],
    *,
    env: Mapping[str, str],
    read_file: Callable[[str], str] = read_secret_file,
    where: str = "oidc",
) -> OidcConfig:
    """The ``[oidc]`` table -> OidcConfig; ConfigError names the key (``oidc.allowed_users[2]: ...``)."""
    for key in data:
        if key == "client_secret":
            raise ConfigError(
                f"{where}.client_secret: the secret is not accepted inline; put it in a file (client_secret_file) "
                "or an environment variable (client_secret_env)"
            )
        if key not in KEYS:
            raise ConfigError(f"{where}: unknown key {key!r}")
    issuer = _str(data, "issuer", where)
    if not issuer:
        raise ConfigError(f"{where}.issuer: required (the identity provider's issuer URL)")
    issuer = _url(issuer, "issuer", where)
    allow_http = _bool(data, "allow_http", where)
    if issuer.startswith("http://") and not allow_http and not is_loopback(urlsplit(issuer).hostname or ""):
        raise ConfigError(f"{where}.issuer: {issuer!r} is http:// off loopback; identity providers speak https "
                          "(set oidc.allow_http = true only in a lab)")
    client_id = _str(data, "client_id", where)
    if not client_id:
        raise ConfigError(f"{where}.client_id: required")
    secret = _secret(data, env, read_file, where)
    pkce = data.get("pkce", "S256")
    if pkce != "S256":
        raise ConfigError(f"{where}.pkce: PKCE S256 is always on; {pkce!r} is not an option")

    scopes = _list(data, "scopes", where, DEFAULT_SCOPES)
    if "openid" not in scopes:
        raise ConfigError(f"{where}.scopes: must include 'openid'")
    for i, s in enumerate(scopes):
        if not _SCOPE.match(s):
            raise ConfigError(f"{where}.scopes[{i}]: {s!r} is not a scope token")

    domains = tuple(d.lower().lstrip("@") for d in _list(data, "allowed_domains", where))
    for i, d in enumerate(domains):
        if not _DOMAIN.match(d):
            raise ConfigError(f"{where}.allowed_domains[{i}]: {d!r} is not a DNS domain")
    users = tuple(u.lower() for u in _list(data, "allowed_users", where))
    for i, u in enumerate(users):
        local, at, domain = u.rpartition("@")
        if not at or not local or not _DOMAIN.match(domain):
            raise ConfigError(f"{where}.allowed_users[{i}]: {u!r} is not an e-mail address")
    groups = _list(data, "allowed_groups", where)

    claim = _str(data, "groups_claim", where, "groups")
    path = tuple(claim.split("."))
    if not claim or any(not p for p in path):
        raise ConfigError(f"{where}.groups_claim: {claim!r} is not a dotted claim path (example: realm_access.roles)")

    strategy = _str(data, "user_name", where, "email")
    if strategy not in USER_NAME_STRATEGIES:
        raise ConfigError(f"{where}.user_name: expected one of {', '.join(USER_NAME_STRATEGIES)}, got {strategy!r}")

    raw_map = data.get("group_map", {})
    if not isinstance(raw_map, Mapping):
        raise ConfigError(f"{where}.group_map: expected a table of IdP group = \"group:name\"")
    pairs = []
    for idp_group, policy_group in raw_map.items():
        if not isinstance(idp_group, str) or not idp_group:
            raise ConfigError(f"{where}.group_map: IdP group names must be non-empty strings")
        if not isinstance(policy_group, str) or not _POLICY_GROUP.match(policy_group):
            raise ConfigError(
                f"{where}.group_map.{idp_group}: {policy_group!r} is not a policy group (example: \"group:admins\")"
            )
        pairs.append((idp_group, policy_group))
    return OidcConfig(
        issuer=issuer, client_id=client_id, client_secret=secret, scopes=scopes, allowed_domains=domains,
        allowed_users=users, allowed_groups=groups, groups_claim=path, user_name=strategy,
        expiry_from_token=_bool(data, "expiry_from_token", where), allow_http=allow_http,
        group_map=tuple(sorted(pairs)),
    )


def _secret(data: Mapping[str, Any], env: Mapping[str, str], read_file: Callable[[str], str], where: str) -> Secret:
    path = _str(data, "client_secret_file", where)
    var = _str(data, "client_secret_env", where)
    if bool(path) == bool(var):
        raise ConfigError(f"{where}: set exactly one of client_secret_file and client_secret_env")
    if path:
        try:
            value = read_file(path)
        except OSError as e:
            raise ConfigError(f"{where}.client_secret_file: {path}: {e.strerror}") from None
        except UnicodeDecodeError:
            raise ConfigError(f"{where}.client_secret_file: {path}: not UTF-8 text") from None
        origin = f"file {path}"
    else:
        if not _ENV_NAME.match(var):
            raise ConfigError(f"{where}.client_secret_env: {var!r} is not an environment variable name")
        if var not in env:
            raise ConfigError(f"{where}.client_secret_env: environment variable {var} is not set")
        value = env[var]
        origin = f"environment variable {var}"
    # One trailing newline is what `echo secret > file` leaves; anything else is part of the secret.
    value = value.removesuffix("\n").removesuffix("\r")
    if not value:
        raise ConfigError(f"{where}: the client secret ({origin}) is empty")
    if "\n" in value:
        raise ConfigError(f"{where}: the client secret ({origin}) has more than one line")
    return Secret(value)


def check_server_url(cfg: OidcConfig, server_url: str) -> None:
    """Session cookies are Secure on https. Browsers drop Secure cookies from http origins, so an http server
    URL works only on loopback or when the operator says this is a lab (``allow_http``)."""
    u = urlsplit(server_url)
    if u.scheme == "https" or cfg.allow_http or is_loopback(u.hostname or ""):
        return
    raise ConfigError(
        f"oidc: server_url {server_url!r} is http:// off loopback; sign-in cookies need https "
        "(set oidc.allow_http = true only in a lab)"
    )


def is_loopback(host: str) -> bool:
    h = host.strip("[]").lower()
    return h == "localhost" or h == "::1" or h.startswith("127.")
