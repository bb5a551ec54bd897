"""The composition root: ``create_app(config)`` builds the whole server; nothing here is a module global.

It opens the store, folds the log and wires the parts: the service (the one writer), the fan-out core and its
long-poll shell, logins, node lifecycle timers, the embedded DERP relay, and the two HTTP apps (endpoints in
coord/api.py). ``App.start()`` starts what runs in the background; ``App.close()`` stops it all.
``shoal-server serve`` and the CLI's in-process admin path both build their server here.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import time
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import httpx
from nacl.public import PrivateKey
from prometheus_client import CollectorRegistry
from starlette.applications import Starlette

from coord import admin, api, decide, dns, logfiles, private, wire
from coord import events as ev
from coord.api import Api
from coord.apiv2.routes import ApiV2
from coord.auth.oidc import Provider
from coord.auth.web import SignIn
from coord.checkpoints import Checkpointer
from coord.config import Config, parse_hostport
from coord.delivery import Webhooks
from coord.dnswatch import RecordsWatch
from coord.errors import ConfigError, DomainError
from coord.fanout import Fanout
from coord.history import History
from coord.ipam import Pool
from coord.lifecycle import Lifecycle
from coord.logins import Logins, active_node_key
from coord.metrics import Readings, ServerMetrics
from coord.netmap import Settings
from coord.poll import Poll
from coord.service import Service
from coord.state import State
from coord.store import DatabaseDown, Filter, Store
from coord.store.sqlite import SqliteStore, WebhookTables
from coord.supervise import Supervisor
from derp.metrics import RelayCollector
from derp.server import DerpServer
from derp.stunserver import StunServer, start_stun_server

EMBEDDED_REGION = 900
# Replicas on PostgreSQL: seconds between polls of the log when no NOTIFY came, and between heartbeats.
FOLLOW_POLL_S = 1.0
HEARTBEAT_S = 1.0
# A replica whose heartbeat is older than this is down; the orphan-sweep lease lasts LEASE_S (renewed each beat).
REPLICA_STALE_S = 5.0
LEASE_S = 5.0
ORPHAN_GRACE_S = 3.0

log = logging.getLogger("shoal.app")


def load_or_create_key(path: Path) -> bytes:
    """The server's long-term private key, created 0600 on first start (an older, wider file is narrowed)."""
    if path.exists():
        private.narrow(path)
        data = path.read_text().strip()
        try:
            raw = bytes.fromhex(data.removeprefix("privkey:"))
        except ValueError:
            raw = b""
        if len(raw) != 32:
            raise ConfigError(f"{path}: not a server private key; move it away to create a new one")
        return raw
    raw = bytes(PrivateKey.generate())
    private.write_file(path, ("privkey:" + raw.hex() + "\n").encode())
    return raw


def derp_map(config: Config) -> dict[str, Any]:
    regions: dict[str, Any] = {}
    if config.derp:
        u = urlsplit(config.server_url)
        port = u.port or (443 if u.scheme == "https" else 80)
        stun_port = config.stun_listen.rpartition(":")[2] if config.stun_listen else "-1"
        regions[str(EMBEDDED_REGION)] = {
            "RegionID": EMBEDDED_REGION,
            "RegionCode": "shoal",
            "RegionName": "Shoal embedded relay",
            "Nodes": [
                {
                    "Name": f"{EMBEDDED_REGION}a",
                    "RegionID": EMBEDDED_REGION,
                    "HostName": u.hostname,
                    "DERPPort": port,
                    "STUNPort": int(stun_port),
                    "URL": f"{config.server_url.rstrip('/')}/derp",
                    "InsecureForTests": u.scheme == "http",
                }
            ],
        }
    if config.derp_map_file:
        try:
            extra = json.loads(Path(config.derp_map_file).read_text())
        except (OSError, ValueError) as e:
            raise ConfigError(f"derp_map_file {config.derp_map_file}: {e}") from None
        if not isinstance(extra, dict) or not isinstance(extra.get("Regions"), dict):
            raise ConfigError(f"derp_map_file {config.derp_map_file}: expected {{\"Regions\": {{...}}}}")
        regions.update(extra["Regions"])
    return {"Regions": regions}


@dataclass
class App:
    """Everything one server is made of, built by ``create_app``."""

    config: Config
    private_key: bytes
    clock: Callable[[], float]
    service: Service
    fanout: Poll
    lifecycle: Lifecycle
    logins: Logins
    history: History
    checkpointer: Checkpointer
    supervisor: Supervisor
    metrics: ServerMetrics
    webhooks: Webhooks | None  # None on PostgreSQL (create_app says why)
    relay: DerpServer | None = None
    stun: StunServer | None = None
    signin: SignIn | None = None
    started: bool = False
    tasks: list[asyncio.Task[None]] = field(default_factory=list)
    # How often the extra records file is polled (seconds).
    dns_poll: float = 1.0

    def __post_init__(self) -> None:
        self.started_at = self.clock()
        self._orphans: dict[int, float] = {}
        self.admin = admin.Admin(self.service, self.logins, self.fanout.has_session, self.info, self.history,
                                 self.webhooks, self.replicas)
        # Ids seen before a restart are not kept: requests sealed before this start are refused instead.
        guard = wire.ReplayGuard(not_before=self.clock())
        self.api = Api(self.service, self.fanout, self.logins, self.lifecycle, self.admin, self.private_key,
                       self.clock, guard, self.logins.limited, self.config.proxies)
        self.apiv2 = ApiV2(self.service, self.clock, self.config.key_expiry_s, self.webhooks)
        self.http = self._public_app()
        self.admin_http = Starlette(
            routes=self.api.admin_routes(),
            exception_handlers={DomainError: api.domain_error, DatabaseDown: api.database_down},
        )

    def readings(self) -> Readings:
        """The scrape-time gauges: nodes by state (the fold's view), open streams, refusals by reason."""
        online = sum(1 for n in self.service.state.nodes.values() if n.online)
        return Readings(online, len(self.service.state.nodes) - online, len(self.fanout.streams),
                        dict(self.logins.limited.counts))

    def info(self) -> dict[str, Any]:
        """``shoal-server info``: the key nodes pin, and what the limits refused (counters of this process)."""
        return {
            "ServerKey": wire.key_text("mkey", bytes(PrivateKey(self.private_key).public_key)),
            "ServerURL": self.config.server_url,
            "Running": self.started,
            "Pending": len(self.logins.pending),
            "Refused": self.logins.limited.as_json(),
            "Limits": {
                "PendingPerSource": self.logins.pending_per_source, "PendingTotal": self.logins.max_pending,
                "RegisterBurst": self.logins.rate.burst, "RegisterPerSecond": self.logins.rate.rate,
                "ReplayIdsPerSource": self.api.guard.max_per_source, "ReplayIdsTotal": self.api.guard.max_ids,
            },
        }

    async def start(self) -> None:
        """Start the background: node timers (after marking every node offline) and the embedded relay."""
        self.started = True
        await self.seed_dns()
        await self.lifecycle.start()
        self.tasks.append(asyncio.create_task(
            self.supervisor.periodic("checkpoints", 0.0, self.checkpointer.wait_and_tick)
        ))
        if self.webhooks is not None:
            await self.webhooks.start()
        if self.service.shared:
            self.tasks.append(asyncio.create_task(self.follow()))
            self.tasks.append(asyncio.create_task(self.supervisor.periodic("heartbeat", HEARTBEAT_S,
                                                                           self.heartbeat)))
        if self.relay is not None:
            await self.relay.start()
            if self.config.stun_listen:
                host, port = parse_hostport(self.config.stun_listen, "stun_listen")
                self.stun = await start_stun_server(host, port)
                self.relay.stun = self.stun

    @property
    def replica_name(self) -> str:
        return self.config.replica_name or self.config.server_url

    async def follow(self) -> None:
        """Tail the shared log: on each NOTIFY (or poll) fold what other replicas appended and fan it out to
        this replica's streams."""
        wake = asyncio.Event()
        stop = asyncio.Event()
        store: Any = self.service.store
        watcher = asyncio.create_task(store.watch(lambda seq: wake.set(), stop, FOLLOW_POLL_S))
        try:
            while True:
                await wake.wait()
                wake.clear()
                try:
                    await self.service.catch_up()
                except Exception as e:
                    log.warning("catching up with the shared log failed: %s", e)
        finally:
            stop.set()
            watcher.cancel()
            await asyncio.gather(watcher, return_exceptions=True)

    async def heartbeat(self) -> None:
        store: Any = self.service.store
        try:
            await store.heartbeat(self.replica_name, self.config.server_url, self.service.committed[0],
                                  list(self.fanout.sessions), self.started_at, self.clock())
        except Exception as e:
            log.warning("replica heartbeat failed: %s", e)
            return
        await self.orphan_sweep()

    async def orphan_sweep(self) -> None:
        """Run once, by the holder of the "orphans" lease: nodes the log says are online but whose stream no live
        replica holds (their replica died) are marked offline, after ``ORPHAN_GRACE_S`` (a node that just
        connected is in its replica's next heartbeat)."""
        store: Any = self.service.store
        now = self.clock()
        if not await store.acquire("orphans", self.replica_name, now, LEASE_S):
            self._orphans.clear()
            return
        _, rows = await store.replicas()
        held = set(self.fanout.sessions)
        for r in rows:
            if now - float(r["seen"]) < REPLICA_STALE_S:
                held.update(int(n) for n in r["nodes"])
        candidates = {n.id for n in self.service.state.nodes.values() if n.online} - held
        due = {nid for nid in candidates if now - self._orphans.get(nid, now) >= ORPHAN_GRACE_S}
        self._orphans = {nid: self._orphans.get(nid, now) for nid in candidates}
        if due:
            log.info("marking %d node(s) offline: no live replica holds their stream", len(due))
            await self.service.execute(
                lambda s: [ev.NodeDisconnected(i) for i in sorted(due)
                           if i in s.nodes and s.nodes[i].online and i not in self.fanout.sessions],
                "system",
            )
            for nid in due:
                n = self.service.state.nodes.get(nid)
                if n is not None and n.ephemeral:
                    self.lifecycle._schedule_ephemeral(nid)

    async def replicas(self) -> dict[str, Any]:
        """``shoal-server replicas``: each replica's lag behind the head, its streams, whether it is up."""
        store: Any = self.service.store
        if not self.service.shared:
            return {"head": self.service.committed[0], "replicas": [{
                "name": self.replica_name, "url": self.config.server_url, "up": True, "lag": 0,
                "streams": len(self.fanout.sessions), "seen_ago_s": 0.0}]}
        head, rows = await store.replicas()
        now = self.clock()
        return {"head": head, "replicas": [{
            "name": r["name"], "url": r["url"], "up": now - float(r["seen"]) < REPLICA_STALE_S,
            "lag": head - int(r["seq"]), "streams": int(r["streams"]), "seen_ago_s": round(now - float(r["seen"]), 1),
        } for r in rows]}

    async def seed_dns(self) -> None:
        """The config's [dns] table and records file into the log (each an event only when it changed), then the
        file's watch. Only a serving server seeds: an admin command run in-process may not have the config."""
        await self.service.seed_dns(self.config.dns_settings())
        path = self.config.dns_records_file
        if path:
            watch = RecordsWatch(Path(path), self.service)
            await watch.start()
            self.tasks.append(asyncio.create_task(self.supervisor.periodic("dns-records-file", self.dns_poll,
                                                                           watch.poll)))

    async def close(self) -> None:
        if self.stun is not None:
            self.stun.close()
        if self.relay is not None:
            await self.relay.close()
        if self.signin is not None:
            await self.signin.provider.http.aclose()
        self.fanout.close_all()
        await self.lifecycle.stop()
        if self.webhooks is not None:
            await self.webhooks.close()
        for t in self.tasks:
            t.cancel()
        await asyncio.gather(*self.tasks, return_exceptions=True)
        await self.service.drain()
        await self.history.flush()
        await self.service.store.close()

    def _public_app(self) -> Starlette:
        @contextlib.asynccontextmanager
        async def lifespan(app: Starlette) -> AsyncIterator[None]:
            # Only for an ASGI server run with lifespan on; ours start and close the App themselves.
            if not self.started:
                await self.start()
            try:
                yield
            finally:
                await self.close()

        return Starlette(
            routes=[*self.api.routes(), *self.apiv2.routes(),
                    *(self.signin.routes() if self.signin is not None else [])],
            exception_handlers={wire.WireError: api.wire_error, DomainError: api.domain_error,
                                DatabaseDown: api.database_down},
            lifespan=lifespan,
        )


async def create_app(
    config: Config, *, serve: bool = True, clock: Callable[[], float] = time.time,
    oidc_http: httpx.AsyncClient | None = None, dns_poll: float = 1.0,
) -> App:
    """Build the server on ``config``'s data dir: open the store, fold the log, wire the parts.

    ``serve=False`` (the CLI running an admin command in-process) builds no relay and no sign-in; such an App is
    never started. ``oidc_http``: the client sign-in talks to the identity provider with (tests pass one).
    ``dns_poll``: seconds between polls of the extra records file.
    """
    oidc = config.oidc_config() if serve else None
    private.ensure_dir(config.data_path)
    private_key = load_or_create_key(config.data_path / "server.key")
    settings = Settings(config.base_domain, derp_map(config), dns.reverse_zones(config.prefix_v4, config.prefix_v6),
                        urlsplit(config.server_url).hostname or "", config.keep_established_on_policy_change)
    rules = decide.Rules(Pool.parse(config.prefix_v4, config.prefix_v6), config.key_expiry_s)
    checkpoint_key = logfiles.load_or_create_signing_key(config.data_path / "checkpoint.key")
    store: Store
    if config.postgres:
        from coord.store.postgres import PgStore  # asyncpg only when PostgreSQL is configured

        store = await PgStore.open(config.postgres)
    else:
        store = await SqliteStore.open(config.data_path / "shoal.db", config.durability)

    async def read(after: int, until: int | None) -> AsyncIterator[ev.Record]:
        async for r in store.read(Filter(since_seq=after, until_seq=until)):
            yield r

    history = History(logfiles.SnapshotDir(config.data_path / "snapshots"), read, config.snapshot_every_n)
    try:
        state = await history.startup()
    except BaseException:
        await store.close()
        raise
    async def reload() -> State:
        return (await history.load()).state

    service = Service(store, state, rules, settings, clock, reload=reload,
                      credential_hashes=await store.secrets())
    service.appended.append(history.maybe_snapshot)
    supervisor = Supervisor()
    checkpointer = Checkpointer(
        checkpoint_key, logfiles.CheckpointSink(config.checkpoint_file, config.checkpoint_command),
        lambda: service.committed, clock,
        config.checkpoint_every_n, config.checkpoint_interval_s,
    )
    service.appended.append(checkpointer.appended)
    fanout = Poll(Fanout(service, config.batch_delay_s, config.keepalive_s), clock)
    service.publish = fanout.submit
    lifecycle = Lifecycle(service, fanout.has_session, config.ephemeral_timeout_s, supervisor=supervisor)
    logins = Logins(service, lifecycle, config.server_url)
    signin = None
    if oidc is not None:
        base = config.server_url.rstrip("/")
        http = oidc_http or httpx.AsyncClient(timeout=httpx.Timeout(10.0), follow_redirects=False)
        signin = SignIn(oidc, Provider(oidc, f"{base}/oidc/callback", http, clock), logins, config.server_url, clock)
        logins.links = signin
    # One metrics registry per server (never prometheus_client's global one); served by coord/serve.py.
    metrics = ServerMetrics(CollectorRegistry())
    service.on_commit = metrics.appended
    fanout.on_flush = metrics.fanned_out
    # Webhook delivery keeps its cursors and secrets in the SQLite database; on PostgreSQL it would need a lease
    # per endpoint and secrets kept off the shared database (docs/ha.md): not there yet, so no webhooks.
    webhooks = Webhooks(service, WebhookTables(store.conn), config.base_domain, supervisor,
                        on_attempt=metrics.webhook_attempt) if isinstance(store, SqliteStore) else None
    app = App(config, private_key, clock, service, fanout, lifecycle, logins, history, checkpointer, supervisor,
              metrics, webhooks, signin=signin, dns_poll=dns_poll)
    metrics.bind(app.readings)
    if serve and config.derp:
        # The embedded relay (region 900) admits only node keys of this tailnet's active nodes.
        async def admit(node_key: bytes, source: str) -> bool:
            return active_node_key(service.state, wire.key_text("nodekey", node_key))

        app.relay = DerpServer(load_or_create_key(config.data_path / "derp.key"), admit=admit)
        metrics.registry.register(RelayCollector(app.relay.snapshot))
    return app
