"""Events: the facts the tailnet's history is made of, named in the past tense.

Stored form (one row of the ``events`` table, see migrations/)::

    seq        INTEGER  1, 2, 3, ... with no gaps
    time       TEXT     RFC 3339 UTC with microseconds, e.g. 2026-11-25T12:00:00.000001Z
    actor      TEXT     "admin", "system", "node:<id>" or "machine:<12 hex digits of its machine key>"
    type       TEXT     the class name below, e.g. "NodeRegistered"
    schema     INTEGER  the version of that type's data layout
    data       TEXT     canonical JSON of the fields (sorted keys, no spaces)
    prev_hash  TEXT     hex SHA-256 of the previous event ("0"*64 for seq 1)
    hash       TEXT     hex SHA-256 over prev_hash and the canonical encoding of this event

The canonical encoding is ``canonical_json([seq, time, actor, type, schema, data])`` where ``data`` is the parsed
object, so the hash does not depend on how SQLite stores text. Changing any row, removing one or reordering them
breaks the chain at that row.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
from dataclasses import dataclass
from typing import Any, ClassVar

# Event times are written as the control protocol writes times.
from coord.wire.schema import parse_time as parse_time
from coord.wire.schema import rfc3339 as rfc3339

GENESIS = "0" * 64


_CANONICAL = json.JSONEncoder(sort_keys=True, separators=(",", ":"), ensure_ascii=False)


def canonical_json(obj: Any) -> str:
    return _CANONICAL.encode(obj)


def _json_str(s: str) -> str:
    """``canonical_json(s)`` for a string, without the encoder for the plain ones (times, types, actors)."""
    if s.isascii() and s.isprintable() and '"' not in s and "\\" not in s:
        return f'"{s}"'
    return _CANONICAL.encode(s)




@dataclass(frozen=True)
class Event:
    SCHEMA: ClassVar[int] = 1

    @property
    def type(self) -> str:
        return type(self).__name__

    def data(self) -> dict[str, Any]:
        """The fields as JSON values (a fresh dict each call). Fields are flat values and tuples of them, so this
        skips ``dataclasses.asdict``'s deep copy, which was a quarter of the cost of an append."""
        names = _FIELD_NAMES.get(type(self)) or _field_names(type(self))
        return {name: _jsonable(getattr(self, name)) for name in names}


_FIELD_NAMES: dict[type[Event], tuple[str, ...]] = {}


def _field_names(cls: type[Event]) -> tuple[str, ...]:
    # Class metadata, the same for every instance: ``dataclasses.fields`` per call was a tenth of an append.
    names = _FIELD_NAMES[cls] = tuple(f.name for f in dataclasses.fields(cls))
    return names


def _jsonable(v: Any) -> Any:
    if isinstance(v, (tuple, list)):
        return [_jsonable(x) for x in v]
    return v


# --- users ------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class UserCreated(Event):
    user_id: int
    name: str


@dataclass(frozen=True)
class UserRenamed(Event):
    user_id: int
    name: str


@dataclass(frozen=True)
class UserDeleted(Event):
    user_id: int


# --- sign-in (OIDC) ---------------------------------------------------------------------------------------


@dataclass(frozen=True)
class UserClaimsUpdated(Event):
    """What the identity provider says about a user, when it differs from what the log holds (the first sign-in
    included). (issuer, subject) is the user's identity and never changes; ``groups`` are policy groups (the
    server's group_map applied), ``idp_groups`` only the IdP groups the config names. No secrets, no tokens."""

    user_id: int
    issuer: str
    subject: str
    email: str
    email_verified: bool
    display_name: str
    idp_groups: tuple[str, ...]
    groups: tuple[str, ...]


@dataclass(frozen=True)
class UserSignedIn(Event):
    """A user signed in at the identity provider and approved a machine on the confirm page."""

    user_id: int
    issuer: str
    subject: str
    node_id: int | None


@dataclass(frozen=True)
class SignInRefused(Event):
    """An audit record of refused sign-ins: at most one per (issuer, subject) per minute; changes no state."""

    issuer: str
    subject: str
    reason: str


# --- auth keys --------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class AuthKeyCreated(Event):
    key_id: int
    prefix: str
    hash: str
    user_id: int
    reusable: bool
    ephemeral: bool
    expiration: float | None
    tags: tuple[str, ...]


@dataclass(frozen=True)
class UserRoleSet(Event):
    """A user's role (Tailscale's: owner, admin, network-admin, it-admin, billing-admin, auditor, member)."""

    user_id: int
    role: str


@dataclass(frozen=True)
class CredentialCreated(Event):
    """An API access token (``kind`` "api", for ``user_id``) or an OAuth client ("client", with ``scopes`` and
    ``tags``). Only the id and prefix: the secret's hash is kept outside the log (table credential_secrets), so
    the audit log never holds anything a secret can be checked against."""

    credential_id: str
    kind: str
    prefix: str
    user_id: int
    description: str
    expires: float | None
    scopes: tuple[str, ...]
    tags: tuple[str, ...]


@dataclass(frozen=True)
class CredentialRevoked(Event):
    credential_id: str


@dataclass(frozen=True)
class AuthKeyRevoked(Event):
    key_id: int


# --- nodes ------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class NodeRegistered(Event):
    node_id: int
    machine_key: str
    node_key: str
    disco_key: str
    user_id: int | None
    tags: tuple[str, ...]
    hostname: str
    given_name: str
    ipv4: str
    ipv6: str
    ephemeral: bool
    key_expiry: float | None
    auth_key_id: int | None
    routes: tuple[str, ...] = ()
    # A plain-WireGuard device (`devices add-wg`): the hub node that carries its traffic. Such a node has no
    # agent: its machine key is its node key, it has no disco key, and its private key is never on the server.
    via: int | None = None


@dataclass(frozen=True)
class NodeReauthenticated(Event):
    """A known machine registered again: new node key, possibly new owner and tags, expiry reset."""

    node_id: int
    node_key: str
    user_id: int | None
    tags: tuple[str, ...]
    key_expiry: float | None
    auth_key_id: int | None


@dataclass(frozen=True)
class NodeRenamed(Event):
    node_id: int
    given_name: str
    by_admin: bool


@dataclass(frozen=True)
class NodeHostinfoChanged(Event):
    node_id: int
    hostname: str
    os: str
    routes: tuple[str, ...]


@dataclass(frozen=True)
class NodeRoutesApproved(Event):
    """The routes approved for a node (by an admin, or by the policy's autoApprovers: see the actor), as the whole
    set after the change. A route counts (filters, peers, primary election) only while it is also advertised in
    the node's Hostinfo.RoutableIPs."""

    node_id: int
    routes: tuple[str, ...]


@dataclass(frozen=True)
class NodeTagged(Event):
    node_id: int
    tags: tuple[str, ...]


@dataclass(frozen=True)
class NodeKeyExpirySet(Event):
    node_id: int
    key_expiry: float | None


@dataclass(frozen=True)
class NodeExpired(Event):
    node_id: int
    at: float


@dataclass(frozen=True)
class NodeKeyExpiringSoon(Event):
    """The expiry loop saw a node key due within a day (``key_expiry``, the expiry it warns of): the fact behind
    the nodeKeyExpiringInOneDay webhook, which no cursor on the log could see without an event of its own."""

    node_id: int
    key_expiry: float


@dataclass(frozen=True)
class NodeLoggedOut(Event):
    node_id: int


@dataclass(frozen=True)
class NodeDeleted(Event):
    node_id: int
    reason: str


@dataclass(frozen=True)
class NodeEndpointsChanged(Event):
    node_id: int
    endpoints: tuple[str, ...]
    endpoint_types: tuple[int, ...]
    home_derp: int


@dataclass(frozen=True)
class NodeDiscoKeyChanged(Event):
    node_id: int
    disco_key: str


@dataclass(frozen=True)
class NodeConnected(Event):
    node_id: int


@dataclass(frozen=True)
class NodeDisconnected(Event):
    node_id: int


# --- policy -----------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class PolicySet(Event):
    text: str
    sha256: str


# --- DNS (coord/dns.py) ---------------------------------------------------------------------------------
# ``split`` is a list of [suffix, [resolvers]], records are [name, type, value]; all already validated.


@dataclass(frozen=True)
class DNSConfigSeeded(Event):
    """The server config's [dns] table at start, when it differs from the one the log last saw: each field it
    changed replaces the current setting, the others keep what an admin set."""

    magic_dns: bool
    nameservers: tuple[str, ...]
    split: tuple[Any, ...]
    search_domains: tuple[str, ...]
    override_local_dns: bool
    extra_records: tuple[Any, ...]


@dataclass(frozen=True)
class DNSSettingsSet(Event):
    """``shoal-server dns set``: the settings after the change (extra records have their own events)."""

    magic_dns: bool
    nameservers: tuple[str, ...]
    split: tuple[Any, ...]
    search_domains: tuple[str, ...]
    override_local_dns: bool


@dataclass(frozen=True)
class DNSBaseDomainSet(Event):
    """``shoal-server dns set --base-domain``: the MagicDNS suffix of every node's name, replacing the config's
    ``base_domain`` from then on ("" goes back to the config's)."""

    domain: str


@dataclass(frozen=True)
class DNSRecordAdded(Event):
    name: str
    record_type: str  # A or AAAA (not ``type``: that is the event's type)
    value: str


@dataclass(frozen=True)
class DNSRecordRemoved(Event):
    name: str
    record_type: str  # A or AAAA (not ``type``: that is the event's type)
    value: str


@dataclass(frozen=True)
class DNSRecordsFileLoaded(Event):
    """The watched extra_records_file's records (they replace the file's previous ones)."""

    path: str
    sha256: str
    records: tuple[Any, ...]


# --- webhooks (coord/webhooks.py) ------------------------------------------------------------------------
# An endpoint is named by its id only: its signing secret lives outside the log (the ``webhook_secrets`` table,
# migrations/0006_webhooks.sql), because the audit API serves the log and an HMAC key has to be kept in clear.


@dataclass(frozen=True)
class WebhookEndpointAdded(Event):
    endpoint_id: str
    url: str
    event_types: tuple[str, ...]  # Tailscale's names (nodeCreated, ...), see coord/webhooks.py TYPES


@dataclass(frozen=True)
class WebhookEndpointRemoved(Event):
    endpoint_id: str


@dataclass(frozen=True)
class WebhookEndpointUpdated(Event):
    """An endpoint's subscriptions replaced (API v2 PATCH /webhooks/{id}); its URL and secret are unchanged."""

    endpoint_id: str
    event_types: tuple[str, ...]


EVENT_TYPES: dict[str, type[Event]] = {
    cls.__name__: cls
    for cls in (
        UserCreated,
        UserRenamed,
        UserDeleted,
        UserClaimsUpdated,
        UserSignedIn,
        SignInRefused,
        AuthKeyCreated,
        AuthKeyRevoked,
        UserRoleSet,
        CredentialCreated,
        CredentialRevoked,
        NodeRegistered,
        NodeReauthenticated,
        NodeRenamed,
        NodeHostinfoChanged,
        NodeTagged,
        NodeRoutesApproved,
        NodeKeyExpirySet,
        NodeExpired,
        NodeKeyExpiringSoon,
        NodeLoggedOut,
        NodeDeleted,
        NodeEndpointsChanged,
        NodeDiscoKeyChanged,
        NodeConnected,
        NodeDisconnected,
        PolicySet,
        DNSConfigSeeded,
        DNSSettingsSet,
        DNSBaseDomainSet,
        DNSRecordAdded,
        DNSRecordRemoved,
        DNSRecordsFileLoaded,
        WebhookEndpointAdded,
        WebhookEndpointRemoved,
        WebhookEndpointUpdated,
    )
}


class BadEvent(ValueError):
    pass


def from_data(type_name: str, schema: int, data: dict[str, Any]) -> Event:
    cls = EVENT_TYPES.get(type_name)
    if cls is None:
        raise BadEvent(f"unknown event type {type_name!r}")
    if schema != cls.SCHEMA:
        raise BadEvent(f"{type_name}: schema {schema} is not {cls.SCHEMA}")
    kwargs: dict[str, Any] = {}
    for f in dataclasses.fields(cls):
        if f.name in data:
            v = data[f.name]
            kwargs[f.name] = tuple(v) if isinstance(v, list) else v
    try:
        return cls(**kwargs)
    except TypeError as e:
        raise BadEvent(f"{type_name}: {e}") from None


@dataclass(frozen=True)
class Record:
    """An event as stored: its place in the log and its chain hashes."""

    seq: int
    time: str
    actor: str
    event: Event
    prev_hash: str
    hash: str
    # canonical_json(event.data()) when known (sealed here or read from a row): the stored ``data``, encoded once.
    data_text: str = dataclasses.field(default="", compare=False, repr=False)

    @property
    def ts(self) -> float:
        return parse_time(self.time)

    def as_json(self) -> dict[str, Any]:
        return {
            "seq": self.seq,
            "time": self.time,
            "actor": self.actor,
            "type": self.event.type,
            "schema": self.event.SCHEMA,
            "data": self.event.data(),
            "prev_hash": self.prev_hash,
            "hash": self.hash,
        }


def chain_hash(prev_hash: str, seq: int, time: str, actor: str, type_name: str, schema: int, data: Any) -> str:
    return chain_hash_text(prev_hash, seq, time, actor, type_name, schema, canonical_json(data))


def chain_hash_text(prev_hash: str, seq: int, time: str, actor: str, type_name: str, schema: int,
                    data_text: str) -> str:
    """``chain_hash`` with the data already canonical JSON: the same bytes, ``canonical_json`` of the list."""
    body = f"[{seq},{_json_str(time)},{_json_str(actor)},{_json_str(type_name)},{schema},{data_text}]"
    return hashlib.sha256(bytes.fromhex(prev_hash) + body.encode()).hexdigest()


def seal_record(prev_hash: str, seq: int, time: str, actor: str, event: Event) -> Record:
    text = canonical_json(event.data())
    h = chain_hash_text(prev_hash, seq, time, actor, event.type, event.SCHEMA, text)
    return Record(seq, time, actor, event, prev_hash, h, text)
