"""What each role and each OAuth scope may do, sans-IO.

Every endpoint names an *area* and whether it writes. A user's role gates it (Tailscale's roles: owner, admin,
network-admin, it-admin, billing-admin, auditor, member); an OAuth client's scopes do (``<scope>`` writes and reads,
``<scope>:read`` reads, ``all`` and ``all:read`` everything). A refusal names the roles or the scope needed.
"""

from __future__ import annotations

from coord.apiv2.creds import Principal

READERS = ("owner", "admin", "network-admin", "it-admin", "billing-admin", "auditor")
WRITERS: dict[str, tuple[str, ...]] = {
    "devices": ("owner", "admin", "it-admin"),
    "routes": ("owner", "admin", "it-admin", "network-admin"),
    "keys": ("owner", "admin", "it-admin"),
    "policy": ("owner", "admin", "network-admin"),
    "dns": ("owner", "admin", "network-admin"),
    "users": ("owner", "admin", "it-admin"),
    "roles": ("owner", "admin"),
    "settings": ("owner", "admin"),
    "logs": (),
    "webhooks": ("owner", "admin", "network-admin", "it-admin"),
}
# Areas whose readers are fewer than READERS: Tailscale lets only these roles see webhook endpoints at all.
READERS_OF: dict[str, tuple[str, ...]] = {
    "webhooks": ("owner", "admin", "network-admin", "it-admin"),
}
SCOPES: dict[str, str] = {
    "devices": "devices:core",
    "routes": "devices:routes",
    "keys": "auth_keys",
    "policy": "policy_file",
    "dns": "dns",
    "users": "users",
    "roles": "users",
    "settings": "feature_settings",
    "logs": "logs:configuration",
    "webhooks": "webhooks",
}
ALL_SCOPES = frozenset(
    {"all", "all:read"} | {s for s in SCOPES.values()} | {f"{s}:read" for s in SCOPES.values()}
)


class Forbidden(Exception):
    """The caller is known but may not do this: a 403 whose message names what is needed."""


def check(p: Principal, area: str, write: bool) -> None:
    if p.role is not None:
        allowed = WRITERS[area] if write else READERS_OF.get(area, READERS)
        if p.role not in allowed:
            what = "change" if write else "read"
            raise Forbidden(f"to {what} {area} you need the role {' or '.join(allowed)} (you are {p.role})")
        return
    scope = SCOPES[area]
    ok = {"all", scope} if write else {"all", "all:read", scope, f"{scope}:read"}
    if write and area == "logs":
        ok = set()
    if not (p.scopes & ok):
        raise Forbidden(f"this OAuth client needs the scope {scope}{'' if write else ' or ' + scope + ':read'}")
