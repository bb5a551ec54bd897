"""The node agent: registration, the map long-poll, and netmap -> OS reconciliation.

One `Agent` per shoald. Its asyncio shell around the pure pieces in node/compile.py:

- `up()` pins the server key and registers (auth key or interactive login URL), then starts the control loop;
  `down()` stops the loop and takes the tunnel down (the node stays registered); `logout()` sends a
  RegisterRequest with an expiry in the past and forgets the netmap; `status()` joins the netmap with the
  engine's counters.
- The control loop keeps one map stream open. Each MapResponse (typed, parsed as it is read) is applied to the
  netmap (node/mapsession.py), persisted to the
  state dir, and reconciled into the OS: WireGuard peers (engine.set), addresses and routes (RouteApplier),
  the packet filter (`nft -f -`). Every applier changes only what differs. When the stream breaks the last
  netmap and every tunnel stay as they are; the loop retries with jittered exponential back-off.
- Endpoints and paths (NAT traversal, node/magicsock.py): once the engine is up a `MagicSock` shares its UDP
  port (raw socket + BPF), runs netcheck and keeps the DERP connections. The node reports its STUN endpoints
  (type 2) and interface addresses (type 1) and its home region; each peer's WireGuard endpoint is its
  confirmed direct path, else a loopback socket that carries the packets over DERP (`_choose`). The engine's
  actual endpoints are polled and set back when wireguard-go roamed them elsewhere.
"""

from __future__ import annotations

import asyncio
import contextlib
import enum
import logging
import random
import socket
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

from coord import wire
from node import compile, mapsession
from node.control import ControlClient, ControlError, PinMismatch
from node.errors import LocalError
from node.keys import KeyStore, PrivateKey
from node.magicsock import MagicSock, parse_endpoint
from node.render.routes import RouteApplier, RouteConfig
from node.run import CommandError, Runner, SubprocessRunner
from node.state import Prefs, StateDir
from node.wg.config import WgConfig
from node.wg.engine import Engine, choose_engine

log = logging.getLogger("shoald")

# A map stream that stays silent this long is dead even if TCP has not noticed (the server sends
# keep-alives every 50 s by default).
STREAM_IDLE = 130.0
UP_WAIT = 20.0
# On the first netmap, how long the tunnel waits for the home relay, so the first handshake is not lost.
DERP_FIRST_WAIT = 2.0


class BackendState(enum.StrEnum):
    NO_STATE = "NoState"
    NEEDS_LOGIN = "NeedsLogin"
    STARTING = "Starting"
    RUNNING = "Running"
    STOPPED = "Stopped"


class AgentError(LocalError):
    """A request the agent refuses or cannot carry out; `status` is the HTTP status the local API answers."""

    def __init__(self, status: int, message: str) -> None:
        super().__init__(message)
        self.status = status
        self.message = message


@dataclass
class AgentConfig:
    state_dir: Path
    iface: str = "shoal0"
    port: int = 41641
    engine: str = "auto"  # auto | wireguard-go | kernel
    endpoint_poll: float = 5.0
    backoff_max: float = 10.0
    keepalive: int = compile.KEEPALIVE
    control_timeout: float = 10.0


EngineFactory = Callable[[str, Callable[[], Awaitable[None]]], Engine]


def default_engine_factory(cfg: AgentConfig) -> EngineFactory:
    def make(iface: str, on_restart: Callable[[], Awaitable[None]]) -> Engine:
        prefer = None if cfg.engine == "auto" else cfg.engine
        return choose_engine(iface, prefer=prefer, on_restart=on_restart,
                             log_path=cfg.state_dir / "wireguard-go.log")

    return make


@dataclass
class Agent:
    cfg: AgentConfig
    runner: Runner = field(default_factory=SubprocessRunner)
    engine_factory: EngineFactory | None = None
    clock: Callable[[], float] = time.time

    def __post_init__(self) -> None:
        self.state = StateDir(self.cfg.state_dir)
        self.keys = KeyStore(self.cfg.state_dir)
        self.routes = RouteApplier(self.runner)
        self.prefs = Prefs()
        self.netmap = mapsession.NetMap()
        self.backend = BackendState.NO_STATE
        self.auth_url = ""
        self.last_error = ""
        self.key_expired = False
        self.connected = False
        self.endpoints: list[str] = []
        self.endpoint_types: list[int] = []
        self.choose: compile.EndpointChooser = compile.first_endpoint()
        self.local_endpoints: list[str] = []
        self.magicsock: MagicSock | None = None
        self._push_task: asyncio.Task[None] | None = None
        self._pushed_home = 0
        self._keepalive_on: set[bytes] = set()
        self._keepalive_pending: set[bytes] = set()
        self._bg: set[asyncio.Task[None]] = set()
        self._push_again = False
        self.engine: Engine | None = None
        self._engine_up = False
        self._applied_routes: RouteConfig | None = None
        self._applied_nft: str | None = None
        self._apply_lock = asyncio.Lock()
        self._op_lock = asyncio.Lock()
        self._applied = asyncio.Event()
        self._control: asyncio.Task[None] | None = None
        self._watcher: asyncio.Task[None] | None = None
        self._client: ControlClient | None = None

    # --- lifecycle ----------------------------------------------------------------------------------------

    async def start(self) -> None:
        """Loads (or on first start creates) keys and prefs; restores the last netmap if the node was up."""
        self.state.ensure()
        self.machine = self.keys.load_or_create("mkey")
        self.node_key = self.keys.load_or_create("nodekey")
        self.disco = self.keys.load_or_create("discokey")
        self.prefs = self.state.load_prefs()
        saved = self.state.load_netmap()
        factory = self.engine_factory or default_engine_factory(self.cfg)
        self.engine = factory(self.cfg.iface, self._on_engine_restart)
        await self._discover_endpoints()
        if self.prefs.want_running and self.prefs.login_server and not self.prefs.logged_out:
            self.backend = BackendState.STARTING
            if saved is not None and saved.node is not None:
                # the server may be down: bring back the tunnels we had before asking it anything
                self.netmap = saved
                self.key_expired = compile.self_expired(saved, self.clock())
                await self._reconcile()
            self._start_control(registered=False)
        elif self.prefs.login_server and not self.prefs.logged_out:
            self.backend = BackendState.STOPPED
        else:
            self.backend = BackendState.NEEDS_LOGIN
        self._watcher = asyncio.create_task(self._watch_endpoints(), name="endpoints")

    async def stop(self) -> None:
        """Daemon shutdown: the tunnel goes, the prefs stay (a restart brings it back)."""
        if self._watcher is not None:
            self._watcher.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._watcher
        await self._stop_control()
        await self._teardown_os()

    # --- commands from the local API ----------------------------------------------------------------------

    async def up(self, login_server: str = "", auth_key: str = "", hostname: str | None = None,
                 advertise_tags: list[str] | None = None, wait: float = UP_WAIT, server_key: str = "",
                 ca_file: str | None = None) -> dict[str, Any]:
        async with self._op_lock:
            return await self._up(login_server, auth_key, hostname, advertise_tags, wait, server_key, ca_file)

    async def _up(self, login_server: str, auth_key: str, hostname: str | None,
                  advertise_tags: list[str] | None, wait: float, server_key: str = "",
                  ca_file: str | None = None) -> dict[str, Any]:
        server = (login_server or self.prefs.login_server).rstrip("/")
        if not server:
            raise AgentError(400, "no login server: pass --login-server URL")
        if not server.startswith(("http://", "https://")):
            raise AgentError(400, f"login server {server!r} must be an http:// or https:// URL")
        have = self.prefs.login_server.rstrip("/")
        if have and server != have and not self.prefs.logged_out:
            raise AgentError(409, f"this node is registered with {have}; run `shoal logout` before switching "
                                  f"to {server}")
        # nothing changes until the server has answered: a failed `up` leaves the node as it was
        prefs = replace(self.prefs, advertise_tags=list(self.prefs.advertise_tags))
        if server != have:
            prefs.server_key = ""
        if server_key:
            # pinned up front (`shoal up --server-key`): the first contact is checked too, not trusted
            try:
                want = wire.key_text("mkey", wire.parse_key(server_key, "mkey", "--server-key"))
            except wire.WireError as e:
                raise AgentError(400, str(e)) from None
            if prefs.server_key and prefs.server_key != want:
                raise AgentError(409, f"this node pinned server key {prefs.server_key} for {server}, but "
                                      f"--server-key says {want}; refusing (run `shoal logout` to start over)")
            prefs.server_key = want
        if ca_file is not None:
            prefs.ca_file = ca_file
        prefs.login_server = server
        if hostname is not None:
            prefs.hostname = hostname
        if advertise_tags is not None:
            prefs.advertise_tags = list(advertise_tags)
        client = self._new_client(prefs)
        node_key, old_key = self.node_key, None
        if self.key_expired or self.prefs.logged_out:
            # an expired or logged-out node key is never reused: re-authentication brings a new one
            node_key, old_key = PrivateKey.generate("nodekey"), self.node_key.public().raw
        try:
            await self._pin(client, prefs)
            resp = await client.login(self._register_request(auth_key=auth_key, old_key=old_key,
                                                             node_key=node_key, prefs=prefs))
            if resp.node_key_expired:
                node_key, old_key = PrivateKey.generate("nodekey"), node_key.public().raw
                resp = await client.login(self._register_request(auth_key=auth_key, old_key=old_key,
                                                                 node_key=node_key, prefs=prefs))
        except PinMismatch as e:
            raise AgentError(409, str(e)) from None
        except ControlError as e:
            msg = e.message if e.status == 0 else f"{server}: {e.message}"
            raise AgentError(502 if e.status in (0, 500, 502, 503) else e.status, msg) from None
        except wire.WireError as e:
            raise AgentError(502, f"{server}: {e}") from None
        finally:
            await client.close()
        if resp.error:
            raise AgentError(403, f"{server}: {resp.error}")
        await self._stop_control()
        if node_key is not self.node_key:
            self.keys.save(node_key)
            self.node_key = node_key
        self.prefs = prefs
        self.prefs.want_running = True
        self.prefs.logged_out = False
        self.state.save_prefs(self.prefs)
        self.key_expired = False
        self.last_error = ""
        self._applied.clear()
        if resp.machine_authorized:
            self.auth_url = ""
            self.backend = BackendState.STARTING
            self._start_control(registered=True)
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._applied.wait(), wait)
        elif resp.auth_url:
            self.auth_url = resp.auth_url
            self.backend = BackendState.NEEDS_LOGIN
            self._start_control(registered=False, followup=self.auth_url)
        else:
            raise AgentError(502, f"{server}: registration neither authorized nor gave a login URL")
        return await self.status()

    async def down(self) -> dict[str, Any]:
        async with self._op_lock:
            self.prefs.want_running = False
            if self.prefs.login_server:
                self.state.save_prefs(self.prefs)
            await self._stop_control()
            await self._teardown_os()
            self.backend = (BackendState.STOPPED if self.prefs.login_server and not self.prefs.logged_out
                            else BackendState.NEEDS_LOGIN)
            return await self.status()

    async def logout(self) -> dict[str, Any]:
        async with self._op_lock:
            if not self.prefs.login_server or self.prefs.logged_out:
                raise AgentError(409, "not logged in")
            client = self._new_client()
            try:
                await self._pin(client)
                await client.login(self._register_request(expiry=self.clock() - 1))
            except PinMismatch as e:
                raise AgentError(409, str(e)) from None
            except ControlError as e:
                raise AgentError(502, f"{self.prefs.login_server}: {e.message}") from None
            except wire.WireError as e:
                raise AgentError(502, f"{self.prefs.login_server}: {e}") from None
            finally:
                await client.close()
            await self._stop_control()
            await self._teardown_os()
            self.netmap = mapsession.NetMap()
            self.state.forget_netmap()
            self.prefs.logged_out = True
            self.prefs.want_running = False
            self.state.save_prefs(self.prefs)
            self.node_key = self.keys.replace("nodekey")
            self.backend = BackendState.NEEDS_LOGIN
            self.auth_url = ""
            return await self.status()

    async def status(self) -> dict[str, Any]:
        dev = None
        if self.engine is not None and self._engine_up:
            try:
                dev = await self.engine.get()
            except Exception as e:  # status must answer even when the engine is sick
                self.last_error = f"engine: {e}"
        node = self.netmap.node
        health = []
        if self.key_expired:
            health.append("node key expired: run `shoal up` (with --auth-key or the login URL) to re-authenticate")
        if self.prefs.want_running and not self.connected and self.backend != BackendState.NEEDS_LOGIN:
            health.append("not connected to the coordination server; using the last network map")
        if self.last_error:
            health.append(self.last_error)
        return {
            "BackendState": self.backend,
            "AuthURL": self.auth_url,
            "LoginServer": self.prefs.login_server,
            "Connected": self.connected,
            "KeyExpired": self.key_expired,
            "Engine": self.engine.name if self.engine is not None else "",
            "Interface": self.cfg.iface,
            "Port": self.cfg.port,
            "Health": health,
            "MagicDNSSuffix": self.netmap.domain,
            "Self": {
                "ID": node.id if node is not None else None,
                "Name": node.name if node is not None else "",
                "HostName": (node.short_name if node is not None else "") or self._hostname(),
                "Addresses": node.ips() if node is not None else [],
                "Key": str(self.node_key.public()),
                "KeyExpiry": wire.time_json(node.key_expiry) if node is not None else None,
                "Endpoints": list(self.endpoints),
                "Online": self.connected,
            },
            "Peers": compile.peer_rows(self.netmap, dev, self._peer_paths()) if self.prefs.want_running else [],
            "Magic": self.magicsock.status() if self.magicsock is not None else None,
        }

    def _peer_paths(self) -> dict[bytes, dict[str, Any]]:
        ms = self.magicsock
        if ms is None:
            return {}
        return {k: ms.peer_path(k) for k in ms.peers}

    # --- NAT traversal commands -----------------------------------------------------------------------------

    def _find_peer(self, name: str) -> tuple[wire.Node, bytes]:
        want = name.lower().rstrip(".")
        for p in self.netmap.peers.values():
            names = {p.short_name.lower(), p.name.lower().rstrip(".")}
            if want in names or name in p.ips() or name == p.key_text:
                key = compile.peer_key(p)
                if key is not None:
                    return p, key.raw
        raise AgentError(404, f"no peer named {name!r} in this node's network map")

    async def ping(self, peer: str, timeout: float = 5.0) -> dict[str, Any]:
        """One disco ping to a peer on its current path (`shoal ping`)."""
        ms = self.magicsock
        if ms is None:
            raise AgentError(409, "not running: run `shoal up` first")
        record, key = self._find_peer(peer)
        try:
            path, took, direct = await ms.ping(key, timeout)
        except LookupError as e:
            raise AgentError(409, str(e)) from None
        except TimeoutError:
            raise AgentError(504, f"no pong from {record.short_name} in {timeout:g}s") from None
        return {
            "Peer": record.short_name,
            "Address": next(iter(record.ips()), ""),
            "Path": path,
            "Direct": direct is not None,
            "LatencySeconds": took,
        }

    async def netcheck(self) -> dict[str, Any]:
        """A netcheck now: from the WireGuard port when running, else from a socket of its own."""
        from node import netcheck as nc
        ms = self.magicsock
        if ms is not None:
            report = await ms.netcheck()
            regions, per_region, home = ms.regions, ms.region_endpoints(report), ms.home
        else:
            if self.netmap.derp_map is None:
                raise AgentError(409, "no DERP map yet: run `shoal up` first")
            regions = nc.regions_from_derp_map(self.netmap.derp_map)
            report = await nc.netcheck_udp(regions)
            by_addr = {s.addr: r.region_id for r in regions for s in r.servers}
            per_region = {}
            for server, seen in report.seen.items():
                rid = by_addr.get(server)
                if rid is not None:
                    per_region.setdefault(rid, f"{seen[0]}:{seen[1]}")
            home = report.preferred_derp
        out = report.to_json()
        out["RegionEndpoints"] = {str(k): v for k, v in sorted(per_region.items())}
        out["RegionCodes"] = {str(r.region_id): r.code for r in regions}
        out["HomeDERP"] = home
        return out

    # --- control loop -------------------------------------------------------------------------------------

    def _new_client(self, prefs: Prefs | None = None) -> ControlClient:
        prefs = prefs or self.prefs
        return ControlClient(prefs.login_server, self.machine.raw, self.machine.public().raw,
                             server_public=prefs.server_key_raw(), clock=self.clock,
                             timeout=self.cfg.control_timeout, ca_file=prefs.ca_file)

    async def _pin(self, client: ControlClient, prefs: Prefs | None = None) -> None:
        """Pins on first contact. `prefs` other than ours (a tentative `up`) is updated but not saved."""
        key = await client.pin()
        text = wire.key_text("mkey", key)
        if prefs is not None and prefs is not self.prefs:
            prefs.server_key = text
        elif self.prefs.server_key != text:
            self.prefs.server_key = text
            self.state.save_prefs(self.prefs)

    def _hostname(self, prefs: Prefs | None = None) -> str:
        return (prefs or self.prefs).hostname or socket.gethostname()

    def _hostinfo(self, prefs: Prefs | None = None) -> wire.Hostinfo:
        prefs = prefs or self.prefs
        return wire.Hostinfo(hostname=self._hostname(prefs), os="linux", request_tags=tuple(prefs.advertise_tags))

    def _register_request(self, auth_key: str = "", followup: str = "", old_key: bytes | None = None,
                          expiry: float | None = None, node_key: PrivateKey | None = None,
                          prefs: Prefs | None = None) -> wire.RegisterRequest:
        return wire.RegisterRequest(
            node_key=(node_key or self.node_key).public().raw, old_node_key=old_key,
            disco_key=self.disco.public().raw, auth_key=auth_key, hostinfo=self._hostinfo(prefs),
            followup=followup, expiry=expiry,
        )

    def _map_request(self, stream: bool) -> wire.MapRequest:
        return wire.MapRequest(
            node_key=self.node_key.public().raw, disco_key=self.disco.public().raw, stream=stream,
            endpoints=tuple(self.endpoints), endpoint_types=tuple(self.endpoint_types),
            home_derp=self.magicsock.home if self.magicsock is not None and self.magicsock.home else None,
            hostinfo=self._hostinfo() if stream else None,
        )

    def _start_control(self, registered: bool, followup: str = "") -> None:
        self._control = asyncio.create_task(self._control_loop(registered, followup), name="control")

    async def _stop_control(self) -> None:
        task, self._control = self._control, None
        if task is not None:
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await task
        self.connected = False

    async def _control_loop(self, registered: bool, followup: str) -> None:
        backoff = compile.Backoff(cap=self.cfg.backoff_max)
        while True:
            client = self._new_client()
            try:
                await self._pin(client)
                if followup or not registered:
                    resp = await client.login(self._register_request(followup=followup))
                    if resp.node_key_expired:
                        self.key_expired = True
                        self.backend = BackendState.NEEDS_LOGIN
                        log.warning("node key expired; waiting for `shoal up` to re-authenticate")
                        return
                    if resp.machine_authorized:
                        registered, followup = True, ""
                        self.auth_url = ""
                        self.backend = BackendState.STARTING
                    elif resp.auth_url:
                        # the server held the followup until approval or its timeout: ask again at once
                        followup = self.auth_url = resp.auth_url
                        self.backend = BackendState.NEEDS_LOGIN
                        backoff.reset()
                        continue
                    else:
                        raise ControlError(0, f"registration refused: {resp.error or resp.to_json()}")
                self._client = client
                await self._stream(client, backoff)
            except asyncio.CancelledError:
                raise
            except PinMismatch as e:
                self.last_error = str(e)
                log.error("%s", e)
            except ControlError as e:
                self.last_error = f"control: {e}"
                if e.status in (401, 403):
                    registered = False
                if e.status == 401 and followup:
                    followup = ""  # the login expired on the server: start a new one
                log.warning("control: %s", e)
            except (wire.WireError, OSError, ValueError) as e:
                self.last_error = f"control: {e}"
                log.warning("control: %s", e)
            finally:
                self._client = None
                self.connected = False
                await client.close()
            await asyncio.sleep(backoff.next(random.random()))

    async def _stream(self, client: ControlClient, backoff: compile.Backoff) -> None:
        it = client.poll(self._map_request(stream=True))
        try:
            while True:
                msg = await asyncio.wait_for(it.__anext__(), STREAM_IDLE)
                if not self.connected:
                    self.connected = True
                    self.last_error = ""
                    backoff.reset()
                    log.info("connected to %s", self.prefs.login_server)
                if msg.keep_alive and msg.empty:
                    continue
                if msg.problems:
                    log.warning("map from %s: left out %s", self.prefs.login_server, "; ".join(msg.problems))
                self.netmap = mapsession.apply(self.netmap, msg)
                self.key_expired = compile.self_expired(self.netmap, self.clock())
                self.backend = BackendState.NEEDS_LOGIN if self.key_expired else BackendState.RUNNING
                await self._reconcile()
                self._persist()
        except StopAsyncIteration:
            raise ControlError(0, "map stream ended") from None
        except TimeoutError:
            raise ControlError(0, f"map stream silent for {STREAM_IDLE:.0f}s") from None
        finally:
            await it.aclose()

    def _persist(self) -> None:
        try:
            self.state.save_netmap(self.netmap)
        except OSError as e:
            self.last_error = f"cannot save the netmap: {e}"

    # --- endpoints ----------------------------------------------------------------------------------------

    async def _discover_endpoints(self) -> bool:
        """What this node reports as its endpoints: STUN-reflexive ones (from MagicSock) and local ones."""
        r = await self.runner.run(["ip", "-j", "addr", "show"], check=False)
        local, _ = compile.local_endpoints(r.out, self.cfg.port, exclude=[self.cfg.iface])
        self.local_endpoints = local
        fallback = compile.first_endpoint(compile.families_of(local) or (4, 6))
        self.choose = self._chooser(fallback)
        if self.magicsock is not None:
            self.magicsock.set_local_endpoints([ap for e in local if (ap := parse_endpoint(e)) is not None])
        return self._combine_endpoints()

    def _combine_endpoints(self) -> bool:
        if self.magicsock is not None:
            eps, types = self.magicsock.endpoints()
            # IPv6 interface addresses are reported too (the raw port is IPv4 only, but peers may use them)
            for e in self.local_endpoints:
                if e not in eps:
                    eps.append(e)
                    types.append(wire.EP_LOCAL)
            eps, types = eps[: wire.MAX_ENDPOINTS], types[: wire.MAX_ENDPOINTS]
        else:
            eps, types = list(self.local_endpoints), [wire.EP_LOCAL] * len(self.local_endpoints)
        if eps == self.endpoints and types == self.endpoint_types:
            return False
        self.endpoints, self.endpoint_types = eps, types
        return True

    def _chooser(self, fallback: compile.EndpointChooser) -> compile.EndpointChooser:
        """A peer's WireGuard endpoint: MagicSock's choice (direct or DERP), else the first usable one it
        reported (a peer without a disco key, or no MagicSock)."""
        def choose(peer: wire.Node) -> str | None:
            ms = self.magicsock
            key = compile.peer_key(peer)
            if ms is not None and key is not None:
                ep = ms.endpoint_for(key.raw)
                if ep is not None:
                    return ep
            return fallback(peer)

        return choose

    def _on_magic_endpoints(self) -> None:
        """MagicSock learnt new STUN endpoints or a new home region: tell the server (coalesced)."""
        self._push_again = True
        if self._push_task is None or self._push_task.done():
            self._push_task = asyncio.create_task(self._push_endpoints(), name="push-endpoints")

    async def _push_endpoints(self) -> None:
        while self._push_again:
            self._push_again = False
            await asyncio.sleep(0)
            changed = self._combine_endpoints()
            home = self.magicsock.home if self.magicsock is not None else 0
            if not changed and home == self._pushed_home:
                continue
            self._pushed_home = home
            log.info("endpoints: %s; home DERP %d", ", ".join(self.endpoints) or "none", home)
            client = self._client
            if client is not None and self.connected:
                try:
                    await client.update(self._map_request(stream=False))
                except Exception as e:  # the stream's reconnect sends them again
                    log.warning("endpoint update failed: %s", e)

    async def _watch_endpoints(self) -> None:
        while True:
            await asyncio.sleep(self.cfg.endpoint_poll)
            try:
                if not await self._discover_endpoints():
                    continue
                log.info("endpoints changed: %s", ", ".join(self.endpoints) or "none")
                client = self._client
                if client is not None and self.connected:
                    await client.update(self._map_request(stream=False))
                await self._reconcile()
            except asyncio.CancelledError:
                raise
            except Exception as e:
                log.warning("endpoint update failed: %s", e)

    # --- OS reconciliation --------------------------------------------------------------------------------

    async def _reconcile(self) -> None:
        """Netmap -> engine, routes, filter. Failures are reported in status and retried with the next map."""
        async with self._apply_lock:
            if not self.prefs.want_running or self.netmap.node is None or self.engine is None:
                return
            try:
                await self._apply(self.engine, self.node_key)
                self._applied.set()
            except (CommandError, OSError, ValueError, RuntimeError) as e:
                self.last_error = f"applying the network map: {e}"
                log.error("%s", self.last_error)
            except Exception as e:  # EngineError and friends: keep the agent alive, say what broke
                self.last_error = f"applying the network map: {e}"
                log.exception("applying the network map failed")

    async def _apply(self, engine: Engine, key: PrivateKey) -> None:
        nm = self.netmap
        fresh_engine = not self._engine_up
        if not self._engine_up:
            await engine.start()
            self._engine_up = True
            self._applied_routes = None
        first = self.magicsock is None
        if first:
            self.magicsock = MagicSock(
                self.cfg.port, key.raw, key.public().raw, self.disco.raw, engine_get=engine.get,
                apply=self._reconcile, on_endpoints=self._on_magic_endpoints,
            )
            self.magicsock.set_local_endpoints(
                [ap for e in self.local_endpoints if (ap := parse_endpoint(e)) is not None])
        ms = self.magicsock
        assert ms is not None
        ms.set_derp_map(nm.derp_map)
        ms.set_peers(nm.peers)
        if first and ms.urls:
            await ms.wait_home(DERP_FIRST_WAIT)
        wg = compile.wg_config(nm, key, self.cfg.port, self.choose, self.cfg.keepalive)
        await engine.set(self._stagger_keepalive(wg, fresh_engine) if ms.peers else wg)
        rc = compile.route_config(nm, self.cfg.iface)
        if rc != self._applied_routes:
            await self.routes.set(rc)
            self._applied_routes = rc
        script = compile.filter_script(nm, self.cfg.iface)
        if script != self._applied_nft:
            await self.runner.run(["nft", "-f", "-"], input=script.encode())
            self._applied_nft = script

    def _stagger_keepalive(self, cfg: WgConfig, fresh_engine: bool) -> WgConfig:
        """A peer's persistent keepalive is on at once when our engine is new (we joined or restarted: our peers
        hold stale sessions until we initiate, and `up` returns with the handshakes on their way), and switched
        on 1-1.5 s later when the peer is the new one (it initiates first).

        Setting it makes wireguard-go initiate a handshake at once (the first packet over DERP, and a restarted
        node re-keying its peers). Two nodes that learn of each other in the same netmap round would otherwise
        initiate at the same instant, each void the other's handshake, and wait for the 5 s retry."""
        peers = []
        for p in cfg.peers:
            k = p.public_key.raw
            if fresh_engine:
                self._keepalive_on.add(k)
            if k in self._keepalive_on or not p.persistent_keepalive:
                peers.append(p)
                continue
            peers.append(replace(p, persistent_keepalive=0))
            if k not in self._keepalive_pending:
                self._keepalive_pending.add(k)
                asyncio.get_running_loop().call_later(random.uniform(1.0, 1.5), self._enable_keepalive, k)
        return replace(cfg, peers=tuple(peers))

    def _enable_keepalive(self, key: bytes) -> None:
        if key not in self._keepalive_pending:
            return  # the engine was restarted or torn down meanwhile
        self._keepalive_pending.discard(key)
        self._keepalive_on.add(key)
        task = asyncio.create_task(self._reconcile())
        self._bg.add(task)
        task.add_done_callback(self._bg.discard)

    async def _on_engine_restart(self) -> None:
        # a new wireguard-go child is a new interface: its addresses and routes are gone
        self._keepalive_on.clear()
        self._keepalive_pending.clear()
        self._applied_routes = None
        await self._reconcile()

    async def _teardown_os(self) -> None:
        async with self._apply_lock:
            ms, self.magicsock = self.magicsock, None
            if ms is not None:
                await ms.close()
            self._keepalive_on.clear()
            self._keepalive_pending.clear()
            if self.engine is not None and self._engine_up:
                try:
                    await self.engine.stop()
                except Exception as e:
                    log.warning("stopping the engine: %s", e)
                self._engine_up = False
            self._applied_routes = None
            if self._applied_nft is not None:
                await self.runner.run(["nft", "-f", "-"], input=compile.delete_filter_script().encode(),
                                      check=False)
                self._applied_nft = None
