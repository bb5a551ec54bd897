"""The one writer: command -> decide -> events -> fold -> store -> change -> fan-out.

Every write goes through ``execute``: the decision runs on the current state under one lock, its events are sealed
into the hash chain, folded, and stored (with their projection rows) in one transaction; the ``Change`` they make is
then published to the fan-out. Admin commands and the policy live here; node registration is coord/logins.py, node
timers coord/lifecycle.py, JSON shapes coord/views.py. All of them write through ``execute``.
"""

from __future__ import annotations

import asyncio
import dataclasses
import hashlib
import itertools
import logging
import random
import secrets
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from enum import StrEnum
from typing import Any

from coord import access, decide, dns, policy, views, wire
from coord import events as ev
from coord.authkey import hash_secret, key_text
from coord.change import Change
from coord.devices import DeviceVisibility
from coord.errors import CoordError, DomainError
from coord.netmap import AllowAll, Builder, Settings, Visibility
from coord.state import EXIT_ROUTES, Node, State, User, apply
from coord.store import DatabaseDown, Filter, StaleHead, Store, load_state
from coord.wire.schema import parse_time

log = logging.getLogger("shoal.service")

# Attempts of a command overtaken by another replica's append (StaleHead) before its caller sees the error.
STALE_RETRIES = 20


class Actor(StrEnum):
    """Who caused an event (the log's ``actor``), when it is not a node (``node_actor``) or a machine registering."""

    ADMIN = "admin"
    SYSTEM = "system"


def node_actor(node_id: int) -> str:
    return f"node:{node_id}"


def machine_actor(machine_key_text: str) -> str:
    """``machine:`` and the first 12 hex digits of an ``mkey:...`` text."""
    return f"machine:{machine_key_text[5:17]}"


def _discard(change: Change) -> None:
    pass


@dataclass
class _Pending:
    """A command folded and waiting for its transaction: ``done`` resolves once it committed."""

    records: list[ev.Record]
    change: Change
    done: asyncio.Future[None]


@dataclass
class Service:
    store: Store
    state: State
    rules: decide.Rules
    settings: Settings
    clock: Callable[[], float]
    # Where each committed Change goes: the fan-out (create_app connects it).
    publish: Callable[[Change], None] = _discard
    lock: asyncio.Lock = field(default_factory=asyncio.Lock)
    # Called with the state each transaction commits, as it is handed to the store (snapshots, checkpoints); they
    # must not block. A snapshot may so be written of a batch that then fails: start-up checks it against the log.
    appended: list[Callable[[State], object]] = field(default_factory=list)
    # The fold of the log, when an append failed (create_app gives the snapshot series; default: the whole log).
    reload: Callable[[], Awaitable[State]] | None = None
    # Called after each committed transaction with (events, seconds the store took): the metrics.
    on_commit: Callable[[int, float], None] | None = None
    # Hashes of API token and OAuth client secrets by credential id (the store's credential_secrets, never the log).
    credential_hashes: dict[str, str] = field(default_factory=dict)

    def __post_init__(self) -> None:
        self.builder = Builder(self.state, self.settings)
        self.rules = dataclasses.replace(self.rules, tag_allowed=self._tag_allowed)
        self._policy: policy.Policy | None = None
        self._visibility: Visibility = AllowAll(self.state)
        self.policy_changed()
        self._queue: list[_Pending] = []
        self._committer: asyncio.Task[None] | None = None
        # (seq, hash) of the last committed event; state.last_seq may be ahead while a transaction is in flight.
        self.committed: tuple[int, str] = (self.state.last_seq, self.state.last_hash)
        if self.reload is None:
            self.reload = lambda: load_state(self.store)

    @property
    def visibility(self) -> Visibility:
        return self._visibility

    # --- the write path -----------------------------------------------------------------------------------

    async def execute(self, decide_fn: Callable[[State], list[ev.Event]], actor: str) -> list[ev.Record]:
        """Decide on the current state, seal and fold the events, and return once they are committed.

        Group commit: the commands decided while a transaction is in flight are committed together in the next one
        (``_commit``), each still decided on the fold of every command before it. A command returns (is
        acknowledged) only after its transaction committed; if that transaction fails, it and every command decided
        after it fail with the same error and the state is reloaded from the log.
        """
        for attempt in itertools.count(1):
            async with self.lock:
                if self.shared:
                    # Several replicas append to this log: fold what they appended before deciding (when no
                    # transaction of ours is in flight; one that is fails with StaleHead if it was overtaken).
                    await self._catch_up_locked()
                events = decide_fn(self.state)
                if not events:
                    return []
                pending = self._fold(events, actor)
            # A caller that goes away cancels only its wait: the committer skips a future that is done already.
            try:
                await pending.done
            except StaleHead:
                # Another replica appended first: nothing of ours was stored; decide again on the new head.
                if attempt >= STALE_RETRIES:
                    raise
                await asyncio.sleep(random.uniform(0, 0.005 * attempt))
                continue
            return pending.records
        raise AssertionError("unreachable")

    @property
    def shared(self) -> bool:
        return bool(getattr(self.store, "shared", False))

    def idle(self) -> bool:
        return not self._queue and (self._committer is None or self._committer.done())

    async def catch_up(self) -> int:
        """Fold the events other replicas appended (coord/store/postgres.py); the number folded."""
        async with self.lock:
            return await self._catch_up_locked()

    async def _catch_up_locked(self) -> int:
        if not self.idle():
            return 0
        try:
            if self.committed != (self.state.last_seq, self.state.last_hash):
                # A failed append whose reload failed too (the database was down): the state still holds its
                # events. Start over from the log before anything is decided on it.
                await self._reload_and_publish()
                return 0
            records = [r async for r in self.store.read(Filter(since_seq=self.state.last_seq))]
        except CoordError:
            raise
        except Exception as e:
            raise DatabaseDown(f"the shared log cannot be read, write refused (nothing stored): {e}") from e
        if not records:
            return 0
        if records[0].prev_hash != self.state.last_hash:
            # Not the chain this replica folded (cannot happen while appends check the head): start over.
            log.error("event %d does not follow this replica's state; reloading from the log", records[0].seq)
            await self._reload_and_publish()
            return len(records)
        change = Change()
        for r in records:
            change.merge(apply(self.state, r.event, r.ts))
            self.state.last_seq, self.state.last_hash, self.state.last_time = r.seq, r.hash, r.time
        if change.policy or any(isinstance(r.event, ev.PolicySet) for r in records):
            self.policy_changed()
        else:
            hook = getattr(self._visibility, "observe", None)
            if hook is not None:
                change.merge(hook(records))
        self.committed = (self.state.last_seq, self.state.last_hash)
        if any(isinstance(r.event, ev.CredentialCreated) for r in records):
            # Another replica made a credential: its hash was committed before its event, so it is there now.
            self.credential_hashes.update(await self.store.secrets())
        self.publish(change)
        return len(records)

    async def _reload_and_publish(self) -> None:
        """Replace the state with the fold of the log and tell the fan-out that anything may have changed."""
        before = set(self.state.nodes)
        assert self.reload is not None
        self._replace_state(await self.reload())
        self.committed = (self.state.last_seq, self.state.last_hash)
        ids = set(self.state.nodes)
        self.publish(Change(peers=set(ids), self_nodes=set(ids), removed=before - ids, visibility=set(ids),
                            policy=True, dns=True))

    def _fold(self, events: list[ev.Event], actor: str) -> _Pending:
        # Never earlier than the event before (the clock may step back): the log is ordered by time as by seq, so
        # a point in time is a prefix of the log (`--at`).
        time_text = max(ev.rfc3339(self.clock()), self.state.last_time)
        seq, prev = self.state.last_seq, self.state.last_hash
        ts = parse_time(time_text)  # the stored time, to the microsecond: a replay must fold the same values
        records: list[ev.Record] = []
        change = Change()
        batch, who = events, str(actor)
        while batch:
            sealed = []
            for e in batch:
                seq += 1
                r = ev.seal_record(prev, seq, time_text, who, e)
                sealed.append(r)
                prev = r.hash
            for r in sealed:
                change.merge(apply(self.state, r.event, ts))
                if isinstance(r.event, ev.PolicySet):
                    self._parse_policy()
            records += sealed
            # autoApprovers follow at once, in the same transaction, as the system's decision on the new state.
            batch, who = self._auto_approvals(sealed), str(Actor.SYSTEM)
        self.state.last_seq, self.state.last_hash, self.state.last_time = seq, prev, time_text
        # The policy and the visibility engine follow the fold at once: the next command decides on them.
        if change.policy:
            self.policy_changed()
        else:
            hook = getattr(self._visibility, "observe", None)
            if hook is not None:
                change.merge(hook(records))
        pending = _Pending(records, change, asyncio.get_running_loop().create_future())
        self._queue.append(pending)
        if self._committer is None or self._committer.done():
            self._committer = asyncio.get_running_loop().create_task(self._commit())
        return pending

    async def _commit(self) -> None:
        """The one committer: everything folded since the last transaction goes into the next one."""
        while self._queue:
            batch, self._queue = self._queue, []
            records = [r for p in batch for r in p.records]
            policy_changed = any(p.change.policy for p in batch)
            # The state is now exactly the fold of the log plus this batch (every fold queues itself at once):
            # the store reads the projection rows from it before its first await; snapshots are taken of it.
            for hook in self.appended:
                try:
                    hook(self.state)
                except Exception:
                    log.exception("after-append hook %r failed", hook)
            started = time.perf_counter()
            try:
                await self.store.append(records, self.state, policy_changed)
            except BaseException as e:
                await self._failed(batch, e)
                if not isinstance(e, Exception):
                    raise
                continue
            self.committed = (records[-1].seq, records[-1].hash)
            if self.on_commit is not None:
                self.on_commit(len(records), time.perf_counter() - started)
            for p in batch:
                self.publish(p.change)
                if not p.done.done():
                    p.done.set_result(None)

    async def _failed(self, batch: list[_Pending], error: BaseException) -> None:
        """A transaction failed: none of its events is stored, and every command decided since was decided on
        them. Fail them all with ``error`` and rebuild the state from the log (what was acknowledged stays)."""
        async with self.lock:
            failed, self._queue = batch + self._queue, []
            log.error("append of %d command(s) failed (%r); reloading state from the event log",
                      len(failed), error)
            try:
                if self.shared:
                    try:
                        await self._reload_and_publish()
                    except Exception as e:
                        # The database is gone too: the next command reloads first (``_catch_up_locked``).
                        log.error("reloading from the shared log failed (%s); retried before the next command", e)
                else:
                    assert self.reload is not None
                    self._replace_state(await self.reload())
            finally:
                for p in failed:
                    if not p.done.done():
                        p.done.set_exception(error)
                        # A caller that went away must not leave "exception never retrieved" behind.
                        p.done.exception()

    async def drain(self) -> None:
        """Wait until every folded command is committed (or failed): before the store closes."""
        while self._committer is not None and not self._committer.done():
            await asyncio.gather(self._committer, return_exceptions=True)

    def _replace_state(self, fresh: State) -> None:
        self.state.__dict__.update(fresh.__dict__)
        self.builder = Builder(self.state, self.settings)
        self.policy_changed()

    def _parse_policy(self) -> None:
        text = self.state.policy_text
        # Only a policy that passed `policy set` is in the log, so it parses; a failure here is a bug, not input.
        self._policy = policy.parse(text, "current policy") if text is not None else None

    def policy_changed(self) -> None:
        self._parse_policy()
        inner: Visibility = (
            AllowAll(self.state) if self._policy is None else access.PolicyVisibility(self.state, self._policy)
        )
        self._visibility = DeviceVisibility(self.state, inner)

    def _auto_approvals(self, records: list[ev.Record]) -> list[ev.Event]:
        """autoApprovers, evaluated for the nodes these events may give new approvals: registration, a new
        advertisement, tags or owner changed, or a new policy (every router)."""
        if self._policy is None:
            return []
        nodes: set[int] = set()
        for r in records:
            e = r.event
            if isinstance(e, (ev.NodeRegistered, ev.NodeReauthenticated, ev.NodeHostinfoChanged, ev.NodeTagged)):
                nodes.add(e.node_id)
            elif isinstance(e, ev.PolicySet):
                nodes |= {n.id for n in self.state.nodes.values() if n.routes}
            elif isinstance(e, (ev.UserRenamed, ev.UserRoleSet)):
                nodes |= {n.id for n in self.state.nodes.values() if n.routes and n.user_id == e.user_id}
        return decide.auto_approve(self.state, nodes, self._route_allowed) if nodes else []

    def _route_allowed(self, n: Node, route: str) -> bool:
        if self._policy is None:
            return False
        u = self.state.users.get(n.user_id) if n.user_id is not None and not n.tags else None
        name = u.name if u else None
        roles = (u.role,) if u is not None and u.role != "member" else ()
        if route in EXIT_ROUTES:
            return policy.exit_node_approved(self._policy, name, tags=n.tags, roles=roles)
        return policy.route_approved(self._policy, route, name, tags=n.tags, roles=roles)

    def _tag_allowed(self, user: User | None, tag: str) -> bool:
        if self._policy is None or user is None:
            return False
        roles = (user.role,) if user.role != "member" else ()
        return policy.tag_allowed(self._policy, user.name, tag, roles=roles)

    # --- admin commands -----------------------------------------------------------------------------------

    async def create_user(self, name: str, *, actor: str = Actor.ADMIN) -> dict[str, Any]:
        (r,) = await self.execute(lambda s: decide.create_user(s, name), actor)
        assert isinstance(r.event, ev.UserCreated)
        return views.user(self.state.users[r.event.user_id])

    async def rename_user(self, ref: str, name: str, *, actor: str = Actor.ADMIN) -> dict[str, Any]:
        await self.execute(lambda s: decide.rename_user(s, ref, name), actor)
        return views.user(decide.find_user(self.state, name))

    async def delete_user(self, ref: str, *, actor: str = Actor.ADMIN) -> dict[str, Any]:
        u = decide.find_user(self.state, ref)
        await self.execute(lambda s: decide.delete_user(s, ref), actor)
        return {"deleted": u.id, "name": u.name}

    async def create_key(
        self, user: str, *, reusable: bool, ephemeral: bool, expiration: float | None, tags: tuple[str, ...],
        actor: str = Actor.ADMIN,
    ) -> dict[str, Any]:
        prefix, secret = secrets.token_hex(6), secrets.token_hex(24)
        expires = None if expiration is None else self.clock() + expiration
        (r,) = await self.execute(
            lambda s: decide.create_key(
                s, user, prefix=prefix, secret_hash=hash_secret(secret), reusable=reusable,
                ephemeral=ephemeral, expiration=expires, tags=tags,
            ),
            actor,
        )
        assert isinstance(r.event, ev.AuthKeyCreated)
        out = views.key(self.state, r.event.key_id, self.clock())
        out["key"] = key_text(prefix, secret)
        return out

    async def revoke_key(self, ref: str, *, actor: str = Actor.ADMIN) -> dict[str, Any]:
        k = decide.find_key(self.state, ref)
        await self.execute(lambda s: decide.revoke_key(s, ref), actor)
        return views.key(self.state, k.id, self.clock())

    async def rename_node(self, ref: str, name: str, *, actor: str = Actor.ADMIN) -> dict[str, Any]:
        n = decide.find_node(self.state, ref)
        await self.execute(lambda s: decide.rename_node(s, ref, name), actor)
        return views.node(n)

    async def tag_node(self, ref: str, tags: tuple[str, ...], *, actor: str = Actor.ADMIN) -> dict[str, Any]:
        n = decide.find_node(self.state, ref)
        await self.execute(lambda s: decide.tag_node(s, ref, tags), actor)
        return views.node(n)

    async def expire_node(self, ref: str, *, actor: str = Actor.ADMIN) -> dict[str, Any]:
        n = decide.find_node(self.state, ref)
        await self.execute(lambda s: decide.expire_node(s, ref, self.clock()), actor)
        return views.node(n)

    async def set_node_expiry(
        self, ref: str, expiry: float | None, *, actor: str = Actor.ADMIN
    ) -> dict[str, Any]:
        n = decide.find_node(self.state, ref)
        await self.execute(lambda s: decide.set_key_expiry(s, ref, expiry), actor)
        return views.node(n)

    def list_routes(self) -> list[dict[str, Any]]:
        return [views.routes(n) for n in sorted(self.state.nodes.values(), key=lambda n: n.id)
                if n.routes or n.approved_routes]

    async def approve_routes(
        self, ref: str, routes: tuple[str, ...], *, actor: str = Actor.ADMIN
    ) -> dict[str, Any]:
        n = decide.find_node(self.state, ref)
        await self.execute(lambda s: decide.approve_routes(s, ref, routes), actor)
        return views.routes(n)

    async def unapprove_routes(
        self, ref: str, routes: tuple[str, ...], *, actor: str = Actor.ADMIN
    ) -> dict[str, Any]:
        n = decide.find_node(self.state, ref)
        await self.execute(lambda s: decide.unapprove_routes(s, ref, routes), actor)
        return views.routes(n)

    async def add_wg_device(self, name: str, user: str, via: str, public_key: bytes) -> dict[str, Any]:
        """A plain-WireGuard device; returns it with what its wg-quick config needs of the hub."""
        records = await self.execute(
            lambda s: decide.add_wg_device(s, name, user, via, public_key, self.rules), Actor.ADMIN
        )
        e = records[0].event
        assert isinstance(e, ev.NodeRegistered) and e.via is not None
        hub = self.state.nodes[e.via]
        return {**views.node(self.state.nodes[e.node_id]), "via": hub.id, "hub_name": hub.given_name,
                "hub_node_key": hub.node_key, "hub_endpoints": list(hub.endpoints),
                "tailnet": [str(self.rules.pool.v4), str(self.rules.pool.v6)]}

    async def set_role(self, ref: str, role: str, *, actor: str = Actor.ADMIN) -> dict[str, Any]:
        await self.execute(lambda s: decide.set_role(s, ref, role), actor)
        return views.user(decide.find_user(self.state, ref))

    async def create_credential(
        self, kind: str, user_id: int, *, description: str = "", expires: float | None = None,
        scopes: tuple[str, ...] = (), tags: tuple[str, ...] = (), actor: str = Actor.ADMIN,
    ) -> tuple[str, str]:
        """A new API access token ("api") or OAuth client ("client"): (id, secret). The secret is shown once; its
        hash goes to the store (before the event, which names the credential by id only)."""
        cred_id = ("tk" if kind == "api" else "oc") + secrets.token_hex(6)
        secret = secrets.token_hex(32)
        h = hashlib.sha256(secret.encode()).hexdigest()
        await self.store.put_secret(cred_id, h)
        self.credential_hashes[cred_id] = h
        await self.execute(
            lambda s: decide.create_credential(s, credential_id=cred_id, kind=kind, user_id=user_id,
                                               description=description, expires=expires, scopes=scopes, tags=tags),
            actor,
        )
        return cred_id, secret

    async def revoke_credential(self, cred_id: str, *, actor: str = Actor.ADMIN) -> None:
        await self.execute(lambda s: decide.revoke_credential(s, cred_id), actor)

    async def delete_node(self, ref: str, *, actor: str = Actor.ADMIN) -> dict[str, Any]:
        n = decide.find_node(self.state, ref)
        await self.execute(lambda s: decide.delete_node(s, ref), actor)
        return {"deleted": n.id, "name": n.given_name}

    # --- policy -------------------------------------------------------------------------------------------

    def check_policy(self, text: str, filename: str) -> dict[str, Any]:
        return policy.check(text, access.tailnet(self.state), filename=filename)

    async def set_policy(
        self, text: str, filename: str = "policy.hujson", *, actor: str = Actor.ADMIN
    ) -> dict[str, Any]:
        try:
            policy.parse(text, filename)
        except policy.PolicyError as e:
            raise DomainError(f"policy refused, the current one stays: {e}") from None
        result = self.check_policy(text, filename)
        if not result["ok"]:
            n = len(result["failed"]) + len(result.get("ssh_failed", []))
            lines = [f"policy refused, the current one stays: {n} test assertion(s) failed"]
            lines += [
                f"  tests[{f['test']}]: {f['src']} -> {f['dst']} expected {f['expected']}" for f in result["failed"]
            ]
            lines += [
                f"  sshTests[{f['ssh_test']}]: {f['src']} -> {','.join(f['dst'])} as {f['user']} expected "
                f"{f['expected']}, got {f['got']}"
                for f in result.get("ssh_failed", [])
            ]
            lines += [f"  {e}" for e in result["errors"]]
            raise DomainError("\n".join(lines))
        sha = hashlib.sha256(text.encode()).hexdigest()
        if sha == self.state.policy_sha256:
            return {"changed": False, "sha256": sha, "tests": result}
        await self.execute(lambda s: [ev.PolicySet(text, sha)], actor)
        return {"changed": True, "sha256": sha, "tests": result}

    async def clear_policy(self, *, actor: str = Actor.ADMIN) -> dict[str, Any]:
        await self.execute(lambda s: [ev.PolicySet("", "")] if s.policy_text is not None else [], actor)
        return {"changed": True, "policy": None}

    def get_policy(self) -> dict[str, Any]:
        return {"policy": self.state.policy_text, "sha256": self.state.policy_sha256}

    async def policy_history(self) -> list[dict[str, Any]]:
        out = []
        async for r in self.store.read(Filter(types=("PolicySet",))):
            assert isinstance(r.event, ev.PolicySet)
            out.append({"seq": r.seq, "time": r.time, "actor": r.actor, "sha256": r.event.sha256 or None,
                        "bytes": len(r.event.text)})
        return out

    def diff_policy(self, text: str, filename: str = "policy.hujson") -> dict[str, Any]:
        try:
            d = policy.diff(self.state.policy_text, text, access.policy_nodes(self.state), access.roles(self.state),
                            filename=filename)
        except policy.PolicyError as e:
            raise DomainError(str(e)) from None
        names = {n.id: n.given_name for n in self.state.nodes.values()}
        return {"diff": d, "text": policy.render_diff(d, names)}

    # --- DNS ----------------------------------------------------------------------------------------------

    def get_dns(self) -> dict[str, Any]:
        st = self.state
        out = dns.as_json(st.dns)
        out["base_domain"] = self.builder.domain
        out["base_domain_source"] = "admin" if st.base_domain else "config"
        out["file_records"] = [{"name": n, "type": t, "value": v} for n, t, v in st.dns_file_records]
        out["netmap"] = self.builder.dns_config()
        return out

    async def set_dns(self, *, actor: str = Actor.ADMIN, **changes: Any) -> dict[str, Any]:
        records = await self.execute(
            lambda s: decide.set_dns(s, self.builder.domain, config_domain=self.settings.domain,
                                     server_host=self.settings.server_host, **changes),
            actor,
        )
        return {"changed": bool(records), **self.get_dns()}

    async def add_dns_record(self, name: str, kind: str, value: str, *, actor: str = Actor.ADMIN) -> dict[str, Any]:
        await self.execute(lambda s: decide.add_dns_record(s, name, kind, value), actor)
        return self.dns_records()

    async def remove_dns_record(
        self, name: str, kind: str | None, value: str | None, *, actor: str = Actor.ADMIN
    ) -> dict[str, Any]:
        await self.execute(lambda s: decide.remove_dns_record(s, name, kind, value), actor)
        return self.dns_records()

    def dns_records(self) -> dict[str, Any]:
        st = self.state
        rows = [{"name": n, "type": t, "value": v, "source": "config/admin"} for n, t, v in st.dns.extra_records]
        rows += [{"name": n, "type": t, "value": v, "source": "file"} for n, t, v in st.dns_file_records]
        return {"records": rows}

    async def seed_dns(self, configured: dns.DnsSettings) -> bool:
        """The config's [dns] table at start; True when it changed the log's settings."""
        return bool(await self.execute(lambda s: decide.seed_dns(s, configured), Actor.SYSTEM))

    async def load_dns_file(self, path: str, text: str) -> bool:
        """The watched records file's content; True when its records changed. DomainError when it is bad."""
        return bool(await self.execute(lambda s: decide.load_dns_file(s, path, text), Actor.SYSTEM))

    # --- what a node's map request reports ----------------------------------------------------------------

    async def map_update(self, nid: int, req: wire.MapRequest) -> None:
        n = self.state.nodes[nid]
        hi = req.hostinfo
        await self.execute(
            lambda s: decide.map_update(
                s, n, disco_key=req.disco_key, endpoints=req.endpoints, endpoint_types=req.endpoint_types,
                home_derp=req.home_derp, hostname=hi.hostname if hi else None, os=hi.os if hi else None,
                routes=hi.routable_ips if hi else None,
            ),
            node_actor(nid),
        )

