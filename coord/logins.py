"""Node registration: auth keys, key rotation, logout, and interactive logins waiting for approval.

A node without an auth key gets a login URL and waits on a follow-up request until it is approved. Without
sign-in configured the URL is ``/register/<id>`` and an admin runs ``nodes approve <id>``; with OIDC (coord.auth)
it is a single-use ``/login/<token>`` from `links`, and the person approves in the browser after signing in at the
identity provider (the `coord.auth.web.Host` methods below). Pending logins live in memory only, forgotten after
``PENDING_TTL`` and gone with a restart (the node asks again).

Anyone can ask, so they are bounded: ``PENDING_PER_SOURCE`` per source (an IPv4 address or an IPv6 /64,
coord/limits.py) and ``MAX_PENDING`` in all; each is at most what the wire schema's field limits allow (a 17 KB
request, about 40 KB in memory). A source over its share cannot push out anyone else's; logins with an auth key
hold nothing and are never refused for want of room. Registrations without a good auth key are rate-limited per
source (``REGISTER_BURST``, then ``REGISTER_RATE`` per second).
"""

from __future__ import annotations

import asyncio
import secrets
from collections import Counter
from dataclasses import dataclass, field
from enum import StrEnum
from typing import Any, Protocol

from coord import decide, views, wire
from coord import events as ev
from coord.auth import pages
from coord.auth.claims import Identity, Profile
from coord.auth.refusals import Refusals
from coord.auth.web import Approved
from coord.authkey import hash_secret, split_auth_key
from coord.errors import DomainError, NotFound, Unauthorized
from coord.lifecycle import Lifecycle
from coord.limits import RateLimit, source_key
from coord.limits import Refusals as Limited
from coord.service import Actor, Service, machine_actor, node_actor
from coord.state import State


class TooMany(DomainError):
    status = 429


class Busy(DomainError):
    status = 503


PENDING_TTL = 1800.0
MAX_PENDING = 4096
PENDING_PER_SOURCE = 8
# Registrations without a good auth key, per source: a node asks at `up`, then follows up once a minute.
REGISTER_BURST = 20
REGISTER_RATE = 0.5  # per second
FOLLOWUP_WAIT = 60.0


class LoginLinks(Protocol):
    """Where login URLs come from when sign-in is on (coord.auth.web.SignIn)."""

    def login_url(self, pending_id: str) -> str: ...

    def resolve(self, token: str) -> str | None: ...

    def forget(self, pending_id: str) -> None: ...


class LoginState(StrEnum):
    WAITING = "waiting"
    APPROVED = "approved"
    EXPIRED = "expired"


@dataclass
class Pending:
    auth_id: str
    machine_key: bytes
    request: wire.RegisterRequest
    created: float
    done: asyncio.Future[int]
    state: LoginState = LoginState.WAITING
    source: str = ""  # the address the registration came from (shown on the sign-in confirm page)


def authorized(state: State, nid: int) -> dict[str, Any]:
    """The RegisterResponse of an authorized node."""
    n = state.nodes[nid]
    u = state.users.get(n.user_id) if n.user_id is not None else None
    return {
        "MachineAuthorized": True,
        "NodeKeyExpired": False,
        "AuthURL": "",
        "User": {"ID": n.user_id, "LoginName": u.name if u else ""},
        "Login": {"Tags": list(n.tags)},
    }


def node_for_map(state: State, machine_key: bytes, req: wire.MapRequest, now: float) -> int:
    """The node a map request speaks for, or Unauthorized (also once its key expired, before the sweep records it)."""
    nid = state.by_machine.get(wire.key_text("mkey", machine_key))
    if nid is None:
        raise Unauthorized("unknown machine; register first")
    n = state.nodes[nid]
    if n.node_key != wire.key_text("nodekey", req.node_key):
        raise Unauthorized("node key is not current; register again")
    if n.logged_out:
        raise Unauthorized("node is logged out; register again")
    if n.expired or (n.key_expiry is not None and now >= n.key_expiry):
        raise Unauthorized("node key has expired; register again")
    return nid


def active_node_key(state: State, node_key_text: str) -> bool:
    """Whether a node key belongs to a node its peers see (neither expired nor logged out): relays admit those."""
    nid = state.by_node_key.get(node_key_text)
    return nid is not None and state.nodes[nid].active


def now_expired(p: Pending, now: float) -> bool:
    return now - p.created > PENDING_TTL


@dataclass
class Logins:
    service: Service
    lifecycle: Lifecycle
    server_url: str
    pending: dict[str, Pending] = field(default_factory=dict)
    links: LoginLinks | None = None
    refusals: Refusals = field(default_factory=Refusals)
    limited: Limited = field(default_factory=Limited)  # what the bounds on unauthenticated input refused
    per_source: Counter[str] = field(default_factory=Counter)
    max_pending: int = MAX_PENDING
    pending_per_source: int = PENDING_PER_SOURCE
    rate: RateLimit = field(default_factory=lambda: RateLimit(REGISTER_RATE, REGISTER_BURST))

    async def register(self, machine_key: bytes, req: wire.RegisterRequest, source: str = "") -> dict[str, Any]:
        svc = self.service
        now = svc.clock()
        mkey = wire.key_text("mkey", machine_key)
        actor = machine_actor(mkey)
        if req.expiry is not None and req.expiry < now:
            await svc.execute(lambda s: decide.logout(s, machine_key), actor)
            return {"MachineAuthorized": False, "NodeKeyExpired": False, "AuthURL": "", "LoggedOut": True}
        node = decide.already_authorized(svc.state, machine_key, req, now)
        if node is not None:
            await svc.execute(lambda s: decide.rotate_key(s, node, req, svc.rules, now), node_actor(node.id))
            return authorized(svc.state, node.id)
        nid = svc.state.by_machine.get(mkey)
        if nid is not None and not req.auth_key and not req.followup:
            n = svc.state.nodes[nid]
            expired = n.expired or (n.key_expiry is not None and now >= n.key_expiry)
            if expired and n.node_key == wire.key_text("nodekey", req.node_key):
                return {"MachineAuthorized": False, "NodeKeyExpired": True, "AuthURL": ""}
        if req.auth_key:
            try:
                prefix, secret = split_auth_key(req.auth_key)
                key = decide.check_auth_key(svc.state, prefix, hash_secret(secret), now)
            except DomainError:
                self._charge(source, now)
                raise
            owner = decide.owner_from_key(svc.state, key)
            recs = await svc.execute(lambda s: decide.register(s, machine_key, req, owner, svc.rules, now), actor)
            self.lifecycle.registered(recs)
            return authorized(svc.state, svc.state.by_machine[mkey])
        return await self._interactive(machine_key, req, now, source)

    def _charge(self, source: str, now: float) -> None:
        if not self.rate.allow(source_key(source), now):
            self.limited.note("rate")
            raise TooMany(f"too many registrations from {source_key(source)}; slow down")

    async def _interactive(
        self, machine_key: bytes, req: wire.RegisterRequest, now: float, source: str
    ) -> dict[str, Any]:
        self._charge(source, now)
        self._expire(now)
        if req.followup:
            auth_id = req.followup.rstrip("/").rsplit("/", 1)[-1]
            if self.links is not None:
                auth_id = self.links.resolve(auth_id) or ""
            p = self.pending.get(auth_id)
            if p is None or p.machine_key != machine_key:
                raise Unauthorized("unknown or expired login; start again")
            p.request = req
            try:
                nid = await asyncio.wait_for(asyncio.shield(p.done), FOLLOWUP_WAIT)
            except TimeoutError:
                return {"MachineAuthorized": False, "NodeKeyExpired": False, "AuthURL": req.followup}
            return authorized(self.service.state, nid)
        for p in self.pending.values():
            if p.machine_key == machine_key:
                p.request = req
                if source and source_key(source) != source_key(p.source):
                    self._uncount(p.source)
                    self.per_source[source_key(source)] += 1
                p.source = source or p.source
                return {"MachineAuthorized": False, "NodeKeyExpired": False, "AuthURL": self._auth_url(p.auth_id)}
        key = source_key(source)
        if self.per_source[key] >= self.pending_per_source:
            self.limited.note("pending_source")
            raise TooMany(f"{self.pending_per_source} registrations from {key} are already waiting for approval; "
                          "approve them or wait until they expire")
        if len(self.pending) >= self.max_pending:
            self.limited.note("pending_total")
            raise Busy("too many registrations are waiting for approval; try again later (or use an auth key)")
        auth_id = secrets.token_urlsafe(12)
        self.pending[auth_id] = Pending(auth_id, machine_key, req, now, asyncio.get_running_loop().create_future(),
                                        source=source)
        self.per_source[key] += 1
        return {"MachineAuthorized": False, "NodeKeyExpired": False, "AuthURL": self._auth_url(auth_id)}

    def _auth_url(self, auth_id: str) -> str:
        if self.links is not None:
            return self.links.login_url(auth_id)
        return f"{self.server_url.rstrip('/')}/register/{auth_id}"

    def _expire(self, now: float) -> None:
        # Insertion order is creation order on the server's own clock: the oldest come first.
        while self.pending:
            auth_id, p = next(iter(self.pending.items()))
            if now - p.created <= PENDING_TTL:
                break
            self._forget(auth_id)
            p.state = LoginState.EXPIRED
            if not p.done.done():
                p.done.cancel()

    def _forget(self, auth_id: str) -> None:
        p = self.pending.pop(auth_id, None)
        if self.links is not None:
            self.links.forget(auth_id)
        if p is not None:
            self._uncount(p.source)

    def _uncount(self, source: str) -> None:
        key = source_key(source)
        self.per_source[key] -= 1
        if self.per_source[key] <= 0:
            del self.per_source[key]

    # --- admin side ---------------------------------------------------------------------------------------

    def waiting(self, auth_id: str) -> Pending | None:
        p = self.pending.get(auth_id)
        return p if p is not None and p.state is LoginState.WAITING else None

    async def approve(self, auth_id: str, user_ref: str) -> dict[str, Any]:
        svc = self.service
        p = self.waiting(auth_id)
        if p is None:
            raise NotFound(f"no pending registration {auth_id!r}")
        user = decide.find_user(svc.state, user_ref)
        owner = decide.Owner(user, (), False, None)
        recs = await svc.execute(
            lambda s: decide.register(s, p.machine_key, p.request, owner, svc.rules, svc.clock()), Actor.ADMIN
        )
        return views.node(svc.state.nodes[self._approved(p, recs)])

    def _approved(self, p: Pending, recs: list[ev.Record]) -> int:
        nid = self.service.state.by_machine[wire.key_text("mkey", p.machine_key)]
        self._forget(p.auth_id)
        p.state = LoginState.APPROVED
        if not p.done.done():
            p.done.set_result(nid)
        self.lifecycle.registered(recs)
        return nid

    # --- sign-in side (coord.auth.web.Host) ----------------------------------------------------------------

    def machine(self, pending_id: str) -> pages.Machine | None:
        p = self.waiting(pending_id)
        if p is None or now_expired(p, self.service.clock()):
            return None
        hi = p.request.hostinfo
        return pages.Machine(hi.hostname, hi.os, p.source, self.service.clock() - p.created)

    def check(self, profile: Profile) -> None:
        decide.sign_in_user(self.service.state, profile)

    async def approve_signed_in(self, pending_id: str, profile: Profile) -> Approved:
        svc = self.service
        p = self.waiting(pending_id)
        if p is None:
            raise NotFound("the machine is no longer waiting (approved, expired or removed); run `shoal up` again")
        recs = await svc.execute(
            lambda s: decide.approve_sign_in(s, p.machine_key, p.request, profile, svc.rules, svc.clock()),
            machine_actor(wire.key_text("mkey", p.machine_key)),
        )
        n = svc.state.nodes[self._approved(p, recs)]
        return Approved(n.given_name, profile.name, n.ipv4)

    async def refused(self, code: str, identity: Identity | None, pending_id: str | None) -> None:
        """Counted always; an audit event only for a known person, at most once per person per minute, so an
        IdP account cannot grow the log at will (and an anonymous caller cannot at all)."""
        now = self.service.clock()
        key = identity.key if identity is not None else "-"
        if self.refusals.count(key, code, now) and identity is not None:
            await self.service.execute(
                lambda s: [ev.SignInRefused(identity.issuer, identity.subject, code)], Actor.SYSTEM
            )

    def pending_json(self) -> list[dict[str, Any]]:
        return [
            views.pending(p.auth_id, p.machine_key, p.request.hostinfo.hostname, p.created)
            for p in self.pending.values()
        ]
