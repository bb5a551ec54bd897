"""The one writer: decide -> append (events and projection rows in one transaction) -> fold -> fan out."""

from __future__ import annotations

import asyncio
import dataclasses
import hashlib
import logging
import secrets
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import aiosqlite

from coord import access, db, decide, eventlog, policy, wire
from coord import events as ev
from coord.change import Change
from coord.errors import Conflict, DomainError, NotFound, Unauthorized
from coord.fanout import Fanout
from coord.netmap import AllowAll, Builder, Settings, Visibility
from coord.state import State, User, apply, fold

log = logging.getLogger("shoal.service")

AUTH_KEY_PREFIX = "skey"
PENDING_TTL = 1800.0
MAX_PENDING = 10_000
FOLLOWUP_WAIT = 60.0


def hash_secret(secret: str) -> str:
    # Secrets carry 192 random bits, so a fast hash is as strong as a slow one here: nothing to brute-force.
    return hashlib.sha256(secret.encode()).hexdigest()


def split_auth_key(text: str) -> tuple[str, str]:
    """``skey-<prefix>-<secret>`` -> (prefix, secret); Unauthorized if it does not look like one."""
    parts = text.strip().split("-")
    if len(parts) != 3 or parts[0] != AUTH_KEY_PREFIX or not parts[1] or not parts[2]:
        raise Unauthorized("invalid auth key")
    return parts[1], parts[2]


@dataclass
class Pending:
    auth_id: str
    machine_key: bytes
    request: wire.RegisterRequest
    created: float
    done: asyncio.Future[int]


@dataclass
class Service:
    conn: aiosqlite.Connection
    state: State
    rules: decide.Rules
    settings: Settings
    clock: Callable[[], float]
    server_url: str
    ephemeral_timeout: float
    batch_delay: float = 0.05
    keepalive: float = 50.0
    lock: asyncio.Lock = field(default_factory=asyncio.Lock)
    pending: dict[str, Pending] = field(default_factory=dict)
    _tasks: set[asyncio.Task[Any]] = field(default_factory=set)
    _timers: dict[int, asyncio.TimerHandle] = field(default_factory=dict)

    def __post_init__(self) -> None:
        self.builder = Builder(self.state, self.settings)
        self.rules = dataclasses.replace(self.rules, tag_allowed=self._tag_allowed)
        self._policy: policy.Policy | None = None
        self._visibility: Visibility = AllowAll(self.state)
        self.policy_changed()
        self.fanout = Fanout(self.builder, lambda: self._visibility, self.clock, self.batch_delay, self.keepalive)

    # --- construction -------------------------------------------------------------------------------------

    @classmethod
    async def load_state(cls, conn: aiosqlite.Connection) -> State:
        records = [r async for r in eventlog.read(conn)]
        return fold(records)

    # --- the write path -----------------------------------------------------------------------------------

    async def execute(self, decide_fn: Callable[[State], list[ev.Event]], actor: str) -> list[ev.Record]:
        async with self.lock:
            events = decide_fn(self.state)
            if not events:
                return []
            return await self._append(events, actor)

    async def _append(self, events: list[ev.Event], actor: str) -> list[ev.Record]:
        now = self.clock()
        time_text = ev.rfc3339(now)
        seq, prev = self.state.last_seq, self.state.last_hash
        records = []
        for e in events:
            seq += 1
            r = ev.seal_record(prev, seq, time_text, actor, e)
            records.append(r)
            prev = r.hash
        change = Change()
        for r in records:
            # r.ts (the stored time, to the microsecond), not now: a replay of the log must fold the same values.
            change.merge(apply(self.state, r.event, r.ts))
        self.state.last_seq, self.state.last_hash = seq, prev
        users, keys, nodes = db.touched(events)
        try:
            await self.conn.execute("BEGIN IMMEDIATE")
            try:
                await eventlog.insert(self.conn, records)
                await db.write_projections(self.conn, self.state, users, keys, nodes, change.policy)
                await self.conn.execute("COMMIT")
            except BaseException:
                await self.conn.execute("ROLLBACK")
                raise
        except BaseException:
            # The in-memory fold ran ahead of a transaction that did not commit: rebuild it from the log.
            log.exception("append failed; reloading state from the event log")
            fresh = await self.load_state(self.conn)
            self._replace_state(fresh)
            raise
        self._after(change, records)
        return records

    def _replace_state(self, fresh: State) -> None:
        self.state.__dict__.update(fresh.__dict__)
        self.builder = Builder(self.state, self.settings)
        self.fanout.builder = self.builder
        self.policy_changed()

    def policy_changed(self) -> None:
        text = self.state.policy_text
        # Only a policy that passed `policy set` is in the log, so it parses; a failure here is a bug, not input.
        self._policy = policy.parse(text, "current policy") if text is not None else None
        self._visibility = (
            AllowAll(self.state) if self._policy is None else access.PolicyVisibility(self.state, self._policy)
        )

    def _tag_allowed(self, user: User | None, tag: str) -> bool:
        if self._policy is None or user is None:
            return False
        return policy.tag_allowed(self._policy, user.name, tag)

    def _after(self, change: Change, records: list[ev.Record]) -> None:
        if change.policy:
            self.policy_changed()
        else:
            hook = getattr(self._visibility, "observe", None)
            if hook is not None:
                change.merge(hook(records))
        self.fanout.submit(change)

    # --- admin commands -----------------------------------------------------------------------------------

    async def create_user(self, name: str) -> dict[str, Any]:
        (r,) = await self.execute(lambda s: decide.create_user(s, name), "admin")
        assert isinstance(r.event, ev.UserCreated)
        return self.user_json(self.state.users[r.event.user_id])

    async def rename_user(self, ref: str, name: str) -> dict[str, Any]:
        await self.execute(lambda s: decide.rename_user(s, ref, name), "admin")
        return self.user_json(decide.find_user(self.state, name))

    async def delete_user(self, ref: str) -> dict[str, Any]:
        u = decide.find_user(self.state, ref)
        await self.execute(lambda s: decide.delete_user(s, ref), "admin")
        return {"deleted": u.id, "name": u.name}

    @staticmethod
    def user_json(u: User) -> dict[str, Any]:
        return {"id": u.id, "name": u.name, "created": ev.rfc3339(u.created)}

    async def create_key(
        self, user: str, *, reusable: bool, ephemeral: bool, expiration: float | None, tags: tuple[str, ...]
    ) -> dict[str, Any]:
        prefix, secret = secrets.token_hex(6), secrets.token_hex(24)
        expires = None if expiration is None else self.clock() + expiration
        (r,) = await self.execute(
            lambda s: decide.create_key(
                s, user, prefix=prefix, secret_hash=hash_secret(secret), reusable=reusable,
                ephemeral=ephemeral, expiration=expires, tags=tags,
            ),
            "admin",
        )
        assert isinstance(r.event, ev.AuthKeyCreated)
        out = self.key_json(r.event.key_id)
        out["key"] = f"{AUTH_KEY_PREFIX}-{prefix}-{secret}"
        return out

    def key_json(self, key_id: int) -> dict[str, Any]:
        k = self.state.keys[key_id]
        u = self.state.users.get(k.user_id)
        return {
            "id": k.id,
            "prefix": k.prefix,
            "user": u.name if u else k.user_id,
            "reusable": k.reusable,
            "ephemeral": k.ephemeral,
            "tags": list(k.tags),
            "created": ev.rfc3339(k.created),
            "expiration": None if k.expiration is None else ev.rfc3339(k.expiration),
            "revoked": k.revoked,
            "used_by": list(k.used_by),
            "usable": decide.key_usable(k, self.clock()),
        }

    async def revoke_key(self, ref: str) -> dict[str, Any]:
        k = decide.find_key(self.state, ref)
        await self.execute(lambda s: decide.revoke_key(s, ref), "admin")
        return self.key_json(k.id)

    async def rename_node(self, ref: str, name: str) -> dict[str, Any]:
        n = decide.find_node(self.state, ref)
        await self.execute(lambda s: decide.rename_node(s, ref, name), "admin")
        return n.summary()

    async def tag_node(self, ref: str, tags: tuple[str, ...]) -> dict[str, Any]:
        n = decide.find_node(self.state, ref)
        await self.execute(lambda s: decide.tag_node(s, ref, tags), "admin")
        return n.summary()

    async def expire_node(self, ref: str) -> dict[str, Any]:
        n = decide.find_node(self.state, ref)
        await self.execute(lambda s: decide.expire_node(s, ref, self.clock()), "admin")
        return n.summary()

    async def set_node_expiry(self, ref: str, expiry: float | None) -> dict[str, Any]:
        n = decide.find_node(self.state, ref)
        await self.execute(lambda s: decide.set_key_expiry(s, ref, expiry), "admin")
        return n.summary()

    async def delete_node(self, ref: str) -> dict[str, Any]:
        n = decide.find_node(self.state, ref)
        await self.execute(lambda s: decide.delete_node(s, ref), "admin")
        return {"deleted": n.id, "name": n.given_name}

    def pending_json(self) -> list[dict[str, Any]]:
        return [
            {
                "id": p.auth_id,
                "hostname": p.request.hostinfo.hostname,
                "machine_key": wire.key_text("mkey", p.machine_key),
                "requested": ev.rfc3339(p.created),
            }
            for p in self.pending.values()
        ]

    async def approve(self, auth_id: str, user_ref: str) -> dict[str, Any]:
        p = self.pending.get(auth_id)
        if p is None or p.done.done():
            raise NotFound(f"no pending registration {auth_id!r}")
        user = decide.find_user(self.state, user_ref)
        owner = decide.Owner(user, (), False, None)
        recs = await self.execute(
            lambda s: decide.register(s, p.machine_key, p.request, owner, self.rules, self.clock()), "admin"
        )
        nid = self.state.by_machine[wire.key_text("mkey", p.machine_key)]
        del self.pending[auth_id]
        if not p.done.done():
            p.done.set_result(nid)
        self._watch_ephemeral(recs)
        return self.state.nodes[nid].summary()

    # --- policy -------------------------------------------------------------------------------------------

    def check_policy(self, text: str, filename: str) -> dict[str, Any]:
        return policy.check(text, access.tailnet(self.state), filename=filename)

    async def set_policy(self, text: str, filename: str = "policy.hujson") -> dict[str, Any]:
        try:
            policy.parse(text, filename)
        except policy.PolicyError as e:
            raise DomainError(f"policy refused, the current one stays: {e}") from None
        result = self.check_policy(text, filename)
        if not result["ok"]:
            lines = [f"policy refused, the current one stays: {len(result['failed'])} test assertion(s) failed"]
            lines += [
                f"  tests[{f['test']}]: {f['src']} -> {f['dst']} expected {f['expected']}" for f in result["failed"]
            ]
            lines += [f"  {e}" for e in result["errors"]]
            raise DomainError("\n".join(lines))
        sha = hashlib.sha256(text.encode()).hexdigest()
        if sha == self.state.policy_sha256:
            return {"changed": False, "sha256": sha, "tests": result}
        await self.execute(lambda s: [ev.PolicySet(text, sha)], "admin")
        return {"changed": True, "sha256": sha, "tests": result}

    async def clear_policy(self) -> dict[str, Any]:
        await self.execute(lambda s: [ev.PolicySet("", "")] if s.policy_text is not None else [], "admin")
        return {"changed": True, "policy": None}

    def get_policy(self) -> dict[str, Any]:
        return {"policy": self.state.policy_text, "sha256": self.state.policy_sha256}

    async def policy_history(self) -> list[dict[str, Any]]:
        out = []
        async for r in eventlog.read(self.conn, eventlog.Filter(types=("PolicySet",))):
            assert isinstance(r.event, ev.PolicySet)
            out.append({"seq": r.seq, "time": r.time, "actor": r.actor, "sha256": r.event.sha256 or None,
                        "bytes": len(r.event.text)})
        return out

    def diff_policy(self, text: str, filename: str = "policy.hujson") -> dict[str, Any]:
        try:
            d = policy.diff(self.state.policy_text, text, access.policy_nodes(self.state), {}, filename=filename)
        except policy.PolicyError as e:
            raise DomainError(str(e)) from None
        names = {n.id: n.given_name for n in self.state.nodes.values()}
        return {"diff": d, "text": policy.render_diff(d, names)}

    # --- node requests ------------------------------------------------------------------------------------

    def _authorized(self, nid: int) -> dict[str, Any]:
        n = self.state.nodes[nid]
        u = self.state.users.get(n.user_id) if n.user_id is not None else None
        return {
            "MachineAuthorized": True,
            "NodeKeyExpired": False,
            "AuthURL": "",
            "User": {"ID": n.user_id, "LoginName": u.name if u else ""},
            "Login": {"Tags": list(n.tags)},
        }

    async def register(self, machine_key: bytes, req: wire.RegisterRequest) -> dict[str, Any]:
        now = self.clock()
        mkey = wire.key_text("mkey", machine_key)
        actor = f"machine:{mkey[5:17]}"
        if req.expiry is not None and req.expiry < now:
            await self.execute(lambda s: decide.logout(s, machine_key), actor)
            return {"MachineAuthorized": False, "NodeKeyExpired": False, "AuthURL": "", "LoggedOut": True}
        node = decide.already_authorized(self.state, machine_key, req, now)
        if node is not None:
            await self.execute(lambda s: decide.rotate_key(s, node, req, self.rules, now), f"node:{node.id}")
            return self._authorized(node.id)
        nid = self.state.by_machine.get(mkey)
        if nid is not None and not req.auth_key and not req.followup:
            n = self.state.nodes[nid]
            expired = n.expired or (n.key_expiry is not None and now >= n.key_expiry)
            if expired and n.node_key == wire.key_text("nodekey", req.node_key):
                return {"MachineAuthorized": False, "NodeKeyExpired": True, "AuthURL": ""}
        if req.auth_key:
            prefix, secret = split_auth_key(req.auth_key)
            key = decide.check_auth_key(self.state, prefix, hash_secret(secret), now)
            owner = decide.owner_from_key(self.state, key)
            recs = await self.execute(
                lambda s: decide.register(s, machine_key, req, owner, self.rules, now), actor
            )
            self._watch_ephemeral(recs)
            return self._authorized(self.state.by_machine[mkey])
        return await self._interactive(machine_key, req, now)

    async def _interactive(self, machine_key: bytes, req: wire.RegisterRequest, now: float) -> dict[str, Any]:
        self._expire_pending(now)
        if req.followup:
            auth_id = req.followup.rstrip("/").rsplit("/", 1)[-1]
            p = self.pending.get(auth_id)
            if p is None or p.machine_key != machine_key:
                raise Unauthorized("unknown or expired login; start again")
            p.request = req
            try:
                nid = await asyncio.wait_for(asyncio.shield(p.done), FOLLOWUP_WAIT)
            except TimeoutError:
                return {"MachineAuthorized": False, "NodeKeyExpired": False, "AuthURL": req.followup}
            return self._authorized(nid)
        for p in self.pending.values():
            if p.machine_key == machine_key:
                p.request = req
                return {"MachineAuthorized": False, "NodeKeyExpired": False, "AuthURL": self._auth_url(p.auth_id)}
        if len(self.pending) >= MAX_PENDING:
            raise DomainError("too many pending registrations; try again later")
        auth_id = secrets.token_urlsafe(12)
        self.pending[auth_id] = Pending(auth_id, machine_key, req, now, asyncio.get_running_loop().create_future())
        return {"MachineAuthorized": False, "NodeKeyExpired": False, "AuthURL": self._auth_url(auth_id)}

    def _auth_url(self, auth_id: str) -> str:
        return f"{self.server_url.rstrip('/')}/register/{auth_id}"

    def _expire_pending(self, now: float) -> None:
        for auth_id, p in list(self.pending.items()):
            if now - p.created > PENDING_TTL:
                del self.pending[auth_id]
                if not p.done.done():
                    p.done.cancel()

    def node_for_map(self, machine_key: bytes, req: wire.MapRequest) -> int:
        nid = self.state.by_machine.get(wire.key_text("mkey", machine_key))
        if nid is None:
            raise Unauthorized("unknown machine; register first")
        n = self.state.nodes[nid]
        if n.node_key != wire.key_text("nodekey", req.node_key):
            raise Unauthorized("node key is not current; register again")
        if n.logged_out:
            raise Unauthorized("node is logged out; register again")
        return nid

    async def map_update(self, nid: int, req: wire.MapRequest) -> None:
        n = self.state.nodes[nid]
        hi = req.hostinfo
        await self.execute(
            lambda s: decide.map_update(
                s, n, disco_key=req.disco_key, endpoints=req.endpoints, endpoint_types=req.endpoint_types,
                home_derp=req.home_derp, hostname=hi.hostname if hi else None, os=hi.os if hi else None,
                routes=hi.routable_ips if hi else None,
            ),
            f"node:{nid}",
        )

    async def connected(self, nid: int) -> None:
        t = self._timers.pop(nid, None)
        if t is not None:
            t.cancel()
        await self.execute(
            lambda s: [ev.NodeConnected(nid)] if nid in s.nodes and not s.nodes[nid].online else [], f"node:{nid}"
        )

    async def disconnected(self, nid: int) -> None:
        await self.execute(
            lambda s: [ev.NodeDisconnected(nid)] if nid in s.nodes and s.nodes[nid].online else [], f"node:{nid}"
        )
        n = self.state.nodes.get(nid)
        if n is not None and n.ephemeral:
            self._schedule_ephemeral(nid)

    def _schedule_ephemeral(self, nid: int) -> None:
        loop = asyncio.get_running_loop()
        old = self._timers.pop(nid, None)
        if old is not None:
            old.cancel()
        self._timers[nid] = loop.call_later(self.ephemeral_timeout, lambda: self.spawn(self._ephemeral_gc(nid)))

    def _watch_ephemeral(self, recs: list[ev.Record]) -> None:
        # An ephemeral node that registers but never opens a stream must not linger either.
        for r in recs:
            if isinstance(r.event, ev.NodeRegistered) and r.event.ephemeral:
                self._schedule_ephemeral(r.event.node_id)

    async def _ephemeral_gc(self, nid: int) -> None:
        self._timers.pop(nid, None)

        def gc(s: State) -> list[ev.Event]:
            n = s.nodes.get(nid)
            if n is None or not n.ephemeral or n.online or nid in self.fanout.sessions:
                return []
            return [ev.NodeDeleted(nid, "ephemeral node inactive")]

        await self.execute(gc, "system")

    def spawn(self, coro: Any) -> None:
        task = asyncio.get_running_loop().create_task(coro)
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    async def startup(self) -> None:
        """Streams do not survive a restart: mark online nodes offline, restart ephemeral timers."""
        await self.execute(
            lambda s: [ev.NodeDisconnected(n.id) for n in s.nodes.values() if n.online], "system"
        )
        for n in self.state.nodes.values():
            if n.ephemeral:
                self._schedule_ephemeral(n.id)

    async def expiry_loop(self, interval: float = 1.0) -> None:
        while True:
            await asyncio.sleep(interval)
            try:
                await self.execute(lambda s: decide.expire_due(s, self.clock()), "system")
            except DomainError:
                log.exception("expiry sweep failed")

    async def shutdown(self) -> None:
        for t in self._timers.values():
            t.cancel()
        for s in list(self.fanout.sessions.values()):
            s.close()
        for task in list(self._tasks):
            task.cancel()


__all__ = ["Conflict", "DomainError", "NotFound", "Service", "Unauthorized"]
