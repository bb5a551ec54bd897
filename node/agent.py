"""The node agent: the asyncio shell of shoald. Commands from the local API, the control loop, endpoints, and
the glue that turns each netmap into OS state; every decision is made in a pure module:

    node/login.py      backend state (NeedsLogin, Starting, Running, ...), the reading of registration answers
    node/compile.py    netmap -> WgConfig, RouteConfig, nft script; our endpoints from `ip -j addr`
    node/reconcile.py  the appliers (filter, then routes, then WireGuard) run in order; the filter gates peers
    node/handshake.py  who sends the first handshake to a new peer (no collision of two fresh engines)
    node/status.py     the status document, and the path rule (direct only when observed)
    node/magicsock.py  NAT traversal (raw port, disco, DERP), made once the engine is up

- `up()` pins the server key and registers (auth key or interactive login URL), then starts the control loop;
  `down()` stops the loop and takes the tunnel down (the node stays registered); `logout()` sends a
  RegisterRequest with an expiry in the past and forgets the netmap; `status()` reads the engine once and
  builds the status from that snapshot.
- The control loop keeps one map stream open. Each MapResponse (typed, parsed as it is read) is applied to the
  netmap (node/mapsession.py), reconciled into the OS and persisted to the state dir. When the stream breaks the
  last netmap and every tunnel stay as they are; the loop retries with jittered exponential back-off.
- Endpoints: the node reports its STUN endpoints (type 2, from MagicSock), interface addresses (type 1) and home
  region; each peer's WireGuard endpoint is its confirmed direct path, else its DERP socket (`_chooser`).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import random
import socket
import time
from collections.abc import Awaitable, Callable, Coroutine, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from prometheus_client.metrics_core import Metric

from coord import wire
from node import compile, endpoints, login, mapsession, sockmark
from node import metrics as node_metrics
from node import status as status_doc
from node import whois as whois_doc
from node.control import ControlClient, ControlError, PinMismatch
from node.dns.magic import MagicDNS
from node.errors import LocalError
from node.handshake import Initiator
from node.keys import KeyStore, PrivateKey
from node.login import Answer, Login, State
from node.magicsock import MagicSock, parse_endpoint
from node.paths import PathKind
from node.reconcile import Desired, Reconciler
from node.render import conntrack, nft
from node.run import Runner, SubprocessRunner
from node.ssh import server as ssh_server
from node.state import Prefs, StateDir
from node.wg.config import DeviceState
from node.wg.engine import Engine, choose_engine

log = logging.getLogger("shoald")

# A map stream that stays silent this long is dead even if TCP has not noticed (the server sends
# keep-alives every 50 s by default).
STREAM_IDLE = 130.0
# A subnet router gets a keep-alive every second (coord/fanout.py ROUTER_KEEPALIVE): once keep-alives come that
# often, a stream silent this long is dead (a cut link the kernel has not noticed), and the router reconnects.
ROUTER_STREAM_IDLE = 6.0
ROUTER_KEEPALIVE_SEEN = 2.0
UP_WAIT = 20.0
ROUTE_PROBE_TIMEOUT = 1  # seconds `ping -W` waits for the --route-probe address
# On the first netmap, how long the tunnel waits for the home relay, so the first handshake is not lost.
DERP_FIRST_WAIT = 2.0

BackendState = State  # the name the rest of node/ knew it by


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
    nat_traversal: bool = True  # False: no MagicSock (peers get their first reported endpoint; unit tests)
    dns: bool = False  # run quad-100 (shoald turns it on; unit tests do not)
    dns_port: int = 53
    resolv_conf: Path | None = None  # the file MagicDNS points at quad-100 (None: never touch the OS)
    sysctl_dir: Path = Path("/proc/sys")  # where IP forwarding is read (per network namespace)
    ssh_port: int = ssh_server.LISTEN_PORT  # where nft redirects tailnet port 22 with `shoal up --ssh`
    route_check: float = 0.0  # seconds between a router's self-checks (`_check_routes`); 0 = none (unit tests)
    fwmark: int = 0  # the bypass mark on our own sockets (shoald: node/sockmark.BYPASS_MARK; 0 in unit tests)


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
        self.prefs = Prefs()
        self.netmap = mapsession.NetMap()
        self.login = Login()
        self.last_error = ""
        self.os_errors: dict[str, str] = {}  # applier -> what failed in the last reconcile
        self.kept_out = 0  # peers left out of WireGuard because their filter is not in place
        self.connected = False
        self.endpoints: list[str] = []
        self.endpoint_types: list[int] = []
        self.choose: compile.EndpointChooser = compile.first_endpoint()
        self.local_endpoints: list[str] = []
        self.lan_prefixes: list[str] = []  # directly connected, for --exit-node-allow-lan-access
        self.magicsock: MagicSock | None = None
        self.engine: Engine | None = None
        self.reconciler: Reconciler | None = None
        self._cut_after: str | None = None  # the filter script whose refused flows were last cut
        self.initiator = Initiator(b"")  # its key is ours once the keys are loaded
        self._push_task: asyncio.Task[None] | None = None
        self._pushed_home = 0
        self._push_again = False
        self._bg: set[asyncio.Task[Any]] = set()
        self._hold_timer: asyncio.TimerHandle | None = None
        self._apply_lock = asyncio.Lock()
        self._op_lock = asyncio.Lock()
        self._applied = asyncio.Event()
        self._control: asyncio.Task[None] | None = None
        self._watcher: asyncio.Task[None] | None = None
        self._route_checker: asyncio.Task[None] | None = None
        # the router's self-check (`_check_routes`): what it offers now, and why the rest is withheld
        self.offered: tuple[str, ...] | None = None  # None: not checked yet, offer what the prefs say
        self.withheld = ""
        self._client: ControlClient | None = None
        self.ssh = ssh_server.SshServer(self.cfg.state_dir / "ssh_host_ed25519_key", self.cfg.ssh_port)
        self._url_index = 0  # which of the login server and its replicas (prefs.control_urls) the loop talks to
        self.dns = MagicDNS(self.cfg.dns, self.cfg.resolv_conf, self.cfg.state_dir / "resolv.conf.shoal",
                            port=self.cfg.dns_port, iface=self.cfg.iface, fwmark=self.cfg.fwmark)

    @property
    def backend(self) -> State:
        return self.login.state

    @property
    def key_expired(self) -> bool:
        return self.login.key_expired

    @property
    def auth_url(self) -> str:
        return self.login.auth_url

    # --- lifecycle ----------------------------------------------------------------------------------------

    async def start(self) -> None:
        """Loads (or on first start creates) keys and prefs; restores the last netmap if the node was up."""
        self.state.ensure()
        self.dns.recover()
        self.machine = self.keys.load_or_create("mkey")
        self.node_key = self.keys.load_or_create("nodekey")
        self.disco = self.keys.load_or_create("discokey")
        self.prefs = self.state.load_prefs()
        saved = self.state.load_netmap()
        factory = self.engine_factory or default_engine_factory(self.cfg)
        self.engine = factory(self.cfg.iface, self._on_engine_restart)
        self.reconciler = Reconciler(self.runner, self.engine)
        self.initiator.own = self.node_key.public().raw
        await self._discover_endpoints()
        logged_in = bool(self.prefs.login_server) and not self.prefs.logged_out
        self.login.started(logged_in=logged_in, want_running=self.prefs.want_running)
        if self.login.state is State.STARTING:
            if saved is not None and saved.node is not None:
                # the server may be down: bring back the tunnels we had before asking it anything; those peers
                # still hold sessions with our old engine, which only our initiation replaces
                self.netmap = saved
                self.initiator.remember(k.raw for p in saved.peers.values() if (k := compile.peer_key(p)))
                self.login.key_expired = compile.self_expired(saved, self.clock())
                await self._reconcile()
            self._start_control(registered=False)
        self._watcher = asyncio.create_task(self._watch_endpoints(), name="endpoints")
        if self.cfg.route_check > 0:
            self._route_checker = asyncio.create_task(self._watch_routes(), name="route-check")

    async def stop(self) -> None:
        """Daemon shutdown: the tunnel goes, the prefs stay (a restart brings it back)."""
        for task in (self._watcher, self._route_checker):
            if task is not None:
                task.cancel()
                with contextlib.suppress(asyncio.CancelledError):
                    await task
        await self._stop_control()
        await self._teardown_os()

    # --- commands from the local API ----------------------------------------------------------------------

    async def up(self, login_server: str = "", auth_key: str = "", hostname: str | None = None,
                 advertise_tags: list[str] | None = None, wait: float = UP_WAIT, server_key: str = "",
                 ca_file: str | None = None, accept_dns: bool | None = None,
                 routing: login.RouteFlags = login.RouteFlags(), ssh: bool | None = None,
                 control_urls: list[str] | None = None) -> dict[str, Any]:
        async with self._op_lock:
            return await self._up(login_server, auth_key, hostname, advertise_tags, wait, server_key, ca_file,
                                  accept_dns, routing, ssh, control_urls)

    async def _up(self, login_server: str, auth_key: str, hostname: str | None,
                  advertise_tags: list[str] | None, wait: float, server_key: str = "",
                  ca_file: str | None = None, accept_dns: bool | None = None,
                  routing: login.RouteFlags = login.RouteFlags(), ssh: bool | None = None,
                  control_urls: list[str] | None = None) -> dict[str, Any]:
        try:
            prefs = login.up_prefs(self.prefs, login_server, hostname, advertise_tags, server_key, ca_file,
                                   routing, control_urls)
        except login.UpRefused as e:
            raise AgentError(e.status, str(e)) from None
        if accept_dns is not None:
            prefs.accept_dns = accept_dns
        if ssh is not None:
            prefs.run_ssh = ssh
        server = prefs.login_server
        # an expired or logged-out node key is never reused: re-authentication brings a new one
        renew = self.login.key_expired or self.prefs.logged_out
        client = self._new_client(prefs)
        try:
            await self._pin(client, prefs)
            node_key, reading = await self._register(client, prefs, auth_key, renew)
        except PinMismatch as e:
            raise AgentError(409, str(e)) from None
        except ControlError as e:
            msg = e.message if e.status == 0 else f"{server}: {e.message}"
            raise AgentError(502 if e.status in (0, 500, 502, 503) else e.status, msg) from None
        except wire.WireError as e:
            raise AgentError(502, f"{server}: {e}") from None
        finally:
            await client.close()
        if reading.answer in (Answer.REFUSED, Answer.UNCLEAR):
            raise AgentError(403 if reading.answer is Answer.REFUSED else 502, f"{server}: {reading.error}")
        await self._stop_control()
        if node_key is not self.node_key:
            self.keys.save(node_key)
            self.node_key = node_key
            self.initiator.own = node_key.public().raw
        self.prefs = prefs
        self.prefs.want_running = True
        self.prefs.logged_out = False
        self.state.save_prefs(self.prefs)
        self.login.key_expired = False
        self.last_error = ""
        self._applied.clear()
        self.login.registered(reading)
        if reading.answer is Answer.AUTHORIZED:
            self._start_control(registered=True)
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._applied.wait(), wait)
        else:
            self._start_control(registered=False, followup=reading.auth_url)
        return await self.status()

    async def _register(self, client: ControlClient, prefs: Prefs, auth_key: str,
                        renew: bool) -> tuple[PrivateKey, login.Reading]:
        """Registers with `shoal up`'s auth key; a key the server calls expired is replaced once."""
        node_key, old_key = self.node_key, None
        if renew:
            node_key, old_key = PrivateKey.generate("nodekey"), self.node_key.public().raw
        reading = login.read(await client.login(self._register_request(
            auth_key=auth_key, old_key=old_key, node_key=node_key, prefs=prefs)))
        if reading.answer is Answer.KEY_EXPIRED:
            node_key, old_key = PrivateKey.generate("nodekey"), node_key.public().raw
            reading = login.read(await client.login(self._register_request(
                auth_key=auth_key, old_key=old_key, node_key=node_key, prefs=prefs)))
            if reading.answer is Answer.KEY_EXPIRED:
                reading = login.Reading(Answer.UNCLEAR, error="the server called a new node key expired")
        return node_key, reading

    async def down(self) -> dict[str, Any]:
        async with self._op_lock:
            self.prefs.want_running = False
            if self.prefs.login_server:
                self.state.save_prefs(self.prefs)
            await self._stop_control()
            await self._teardown_os()
            self.login.down(logged_in=bool(self.prefs.login_server) and not self.prefs.logged_out)
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
            self.initiator.own = self.node_key.public().raw
            self.login.logged_out()
            return await self.status()

    async def status(self) -> dict[str, Any]:
        dev = await self._engine_snapshot()
        # no await from here on: the engine read and the path state are one snapshot
        now = self.clock()
        health = status_doc.health(self.login, want_running=self.prefs.want_running, connected=self.connected,
                                   last_error=self.last_error, os_errors=self.os_errors, kept_out=self.kept_out)
        if self.prefs.want_running:
            warn = compile.forwarding_warning(self.prefs.routable_ips(), self._sysctl("net/ipv4/ip_forward"),
                                              self._sysctl("net/ipv6/conf/all/forwarding"))
            health += [warn] if warn else []
            if self.withheld:
                health.append(f"routes withheld from the tailnet by the self-check: {self.withheld}")
        peers = (status_doc.peer_rows(self.netmap, dev, self._observer(), now)
                 if self.prefs.want_running else [])
        return status_doc.document(
            login=self.login, prefs=self.prefs, connected=self.connected, health=health,
            engine=self.engine.name if self.engine is not None else "", iface=self.cfg.iface, port=self.cfg.port,
            netmap=self.netmap, node_key=str(self.node_key.public()), hostname=self._hostname(),
            endpoints=self.endpoints, peers=peers,
            magic=self.magicsock.status() if self.magicsock is not None else None, dev=dev,
        )

    async def metric_families(self) -> list[Metric]:
        """``GET /metrics``: the status snapshot, the resolver's query count and the filter's nft counters."""
        doc = await self.status()
        filt = None
        if self.prefs.want_running and self.reconciler is not None:
            r = await self.runner.run(["nft", "-j", "list", "counters", "table", "inet", compile.FILTER_TABLE],
                                      check=False)
            if r.rc == 0:
                filt = node_metrics.parse_nft_counters(r.out, compile.FILTER_TABLE)
        queries = self.dns.status(self.prefs.accept_dns).get("Queries", 0)
        return node_metrics.families(doc, int(queries or 0), filt, self.clock())

    async def filter_counters(self) -> dict[str, Any]:
        """``GET /filter`` (`shoal status --filter`): the nft counters of our table, read now."""
        r = None
        if self.prefs.want_running and self.reconciler is not None:
            r = await self.runner.run(["nft", "-j", "list", "counters", "table", "inet", compile.FILTER_TABLE],
                                      check=False)
        if r is None or r.rc != 0:
            return {"InPlace": False, "AllowAll": False, "Rules": [], "Drops": {}}
        counts = node_metrics.parse_rule_counters(r.out, compile.FILTER_TABLE)
        return {"InPlace": True, "AllowAll": compile.is_allow_all(self.netmap.packet_filter or ()),
                "Rules": [{"Rule": i, "Packets": p, "Bytes": b} for i, (p, b) in sorted(counts["rules"].items())],
                "Drops": {k.capitalize(): {"Packets": p, "Bytes": b} for k, (p, b) in sorted(counts["drops"].items())}}

    async def exit_nodes(self) -> dict[str, Any]:
        """`shoal exit-node list|suggest`: the peers the server marked as exit nodes for us (approved; the
        policy's autogroup:internet decides who may send through them), the one chosen, a suggestion."""
        chosen = compile.find_exit_node(self.netmap, self.prefs.exit_node)
        ms = self.magicsock
        home = ms.home if ms is not None else 0

        def direct(p: wire.Node) -> bool:
            key = compile.peer_key(p)
            view = ms.observe(key.raw, None) if ms is not None and key is not None else None
            return view is not None and view.confirmed is not None

        best = compile.suggest_exit_node(self.netmap, home, direct)
        return {"ExitNodes": [{"ID": p.id, "Name": p.name, "HostName": p.short_name, "Addresses": p.ips(),
                               "Online": p.online, "Selected": chosen is not None and chosen.id == p.id}
                              for p in compile.exit_nodes(self.netmap)],
                "Suggested": best.name if best is not None else None, "Selected": self.prefs.exit_node}

    def _sysctl(self, name: str) -> str | None:
        try:
            return (self.cfg.sysctl_dir / name).read_text()
        except OSError:
            return None

    async def _engine_snapshot(self) -> DeviceState | None:
        rec = self.reconciler
        if self.engine is None or rec is None or not rec.wireguard.started:
            return None
        try:
            return await self.engine.get()
        except Exception as e:  # status must answer even when the engine is sick
            self.last_error = f"engine: {e}"
            return None

    def _observer(self) -> status_doc.Observer:
        """What path discovery knows of a peer, next to an engine snapshot (MagicSock's view, when it runs)."""
        ms = self.magicsock
        if ms is None:
            return status_doc.no_magic
        return ms.observe

    def whois(self, addr: str) -> dict[str, Any]:
        try:
            return whois_doc.whois(self.netmap, addr)
        except whois_doc.WhoisError as e:
            raise AgentError(404, str(e)) from None

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
        """One disco ping to a peer on its current path (`shoal ping`); `Direct` only when the pong came from
        a direct address and WireGuard's own path is direct by the status rule."""
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
        dev = await self._engine_snapshot()
        row = status_doc.peer_row(record, dev, self._observer(), self.clock())
        return {
            "Peer": record.short_name,
            "Address": next(iter(record.ips()), ""),
            "Path": path,
            "Direct": direct is not None and row["Path"] == PathKind.DIRECT,
            "WireGuard": row["Path"],
            "WireGuardText": row["PathText"],
            "LatencySeconds": took,
        }

    async def netcheck(self) -> dict[str, Any]:
        """A netcheck now: from the WireGuard port when running, else from a socket of its own."""
        from node import netcheck as nc
        ms = self.magicsock
        if ms is not None:
            report = await ms.netcheck()
            regions, per_region, home = ms.regions, endpoints.region_endpoints(ms.regions, report), ms.home
        else:
            if self.netmap.derp_map is None:
                raise AgentError(409, "no DERP map yet: run `shoal up` first")
            regions = nc.regions_from_derp_map(self.netmap.derp_map)
            report = await nc.netcheck_udp(regions)
            per_region, home = endpoints.region_endpoints(regions, report), report.preferred_derp
        return status_doc.netcheck(report, regions, per_region, home)

    # --- control loop -------------------------------------------------------------------------------------

    def _control_url(self) -> str:
        """The replica the control loop talks to: the login server, or (after failures) one of the others."""
        urls = [self.prefs.login_server, *self.prefs.control_urls]
        return urls[self._url_index % len(urls)]

    def _new_client(self, prefs: Prefs | None = None, url: str = "") -> ControlClient:
        prefs = prefs or self.prefs
        return ControlClient(url or prefs.login_server, self.machine.raw, self.machine.public().raw,
                             server_public=prefs.server_key_raw(), clock=self.clock,
                             timeout=self.cfg.control_timeout, ca_file=prefs.ca_file, fwmark=self.cfg.fwmark)

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
        routes = prefs.routable_ips()
        if prefs is self.prefs and self.offered is not None:
            routes = tuple(r for r in routes if r in self.offered)  # the self-check withholds the others
        return wire.Hostinfo(hostname=self._hostname(prefs), os="linux", request_tags=tuple(prefs.advertise_tags),
                             routable_ips=routes)

    async def _check_routes(self) -> bool:
        """The router's self-check (forwarding on, an up interface on each subnet, the --route-probe answering);
        True when what it may offer changed. A withheld route is withdrawn from Hostinfo.RoutableIPs, so the
        server elects another primary at once; it comes back when the check passes again."""
        prefs = self.prefs
        wanted = prefs.routable_ips()
        if not wanted or not prefs.want_running:
            changed = self.offered is not None
            self.offered, self.withheld = None, ""
            return changed
        probe_ok = True
        if prefs.route_probe:
            fam = "-6" if ":" in prefs.route_probe else "-4"
            r = await self.runner.run(["ping", fam, "-c", "1", "-W", str(ROUTE_PROBE_TIMEOUT), prefs.route_probe],
                                      check=False)
            probe_ok = r.rc == 0
        a = await self.runner.run(["ip", "-j", "addr", "show"], check=False)
        offered, why = compile.route_health(wanted, self._sysctl("net/ipv4/ip_forward"),
                                            self._sysctl("net/ipv6/conf/all/forwarding"),
                                            compile.lan_prefixes(a.out, exclude=[self.cfg.iface]),
                                            prefs.route_probe, probe_ok)
        if offered == self.offered and why == self.withheld:
            return False
        if why != self.withheld:
            log.warning("routes withheld: %s", why) if why else log.info("routes: self-check passes again")
        was, self.offered, self.withheld = self.offered, offered, why
        return was != offered and not (was is None and offered == wanted)

    async def _watch_routes(self) -> None:
        while True:
            try:
                if await self._check_routes():
                    client = self._client
                    if client is not None and self.connected:
                        await client.update(wire.MapRequest(
                            node_key=self.node_key.public().raw, disco_key=self.disco.public().raw,
                            stream=False, endpoints=tuple(self.endpoints),
                            endpoint_types=tuple(self.endpoint_types), hostinfo=self._hostinfo()))
            except asyncio.CancelledError:
                raise
            except Exception as e:
                log.warning("route self-check: %s", e)
            await asyncio.sleep(self.cfg.route_check)

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
            url = self._control_url()
            client = self._new_client(url=url)
            ok = False
            try:
                await self._pin(client)
                if followup or not registered:
                    reading = login.read(await client.login(self._register_request(followup=followup)))
                    self.login.registered(reading)
                    if reading.answer is Answer.KEY_EXPIRED:
                        log.warning("node key expired; waiting for `shoal up` to re-authenticate")
                        return
                    if reading.answer is Answer.NEEDS_AUTH:
                        # the server held the followup until approval or its timeout: ask again at once
                        followup = reading.auth_url
                        backoff.reset()
                        continue
                    if reading.answer in (Answer.REFUSED, Answer.UNCLEAR):
                        raise ControlError(0, f"registration refused: {reading.error}")
                    registered, followup = True, ""
                self._client = client
                await self._stream(client, backoff)
                ok = True
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
            if not ok and self.prefs.control_urls:
                # Another replica of the same server (it must hold the pinned key: `_pin` checks) is tried next.
                self._url_index += 1
                log.info("control: %s failed; next: %s", url, self._control_url())
            await asyncio.sleep(backoff.next(random.random()))

    async def _stream(self, client: ControlClient, backoff: compile.Backoff) -> None:
        it = client.poll(self._map_request(stream=True))
        loop = asyncio.get_running_loop()
        idle, last = STREAM_IDLE, loop.time()
        try:
            while True:
                try:
                    msg = await asyncio.wait_for(it.__anext__(), idle)
                except TimeoutError:
                    raise ControlError(0, f"map stream silent for {idle:.0f}s") from None
                now = loop.time()
                # keep-alives a second apart: the server treats us as a router, and a silence means a cut link
                # (a node that stops being a router reconnects once, after 6 s of the slower keep-alives)
                if msg.keep_alive and msg.empty:
                    idle = ROUTER_STREAM_IDLE if now - last < ROUTER_KEEPALIVE_SEEN else STREAM_IDLE
                last = now
                if not self.connected:
                    self.connected = True
                    self.last_error = ""
                    backoff.reset()
                    log.info("connected to %s", self._control_url())
                if msg.keep_alive and msg.empty:
                    continue
                if msg.problems:
                    log.warning("map from %s: left out %s", self._control_url(), "; ".join(msg.problems))
                self.netmap = mapsession.apply(self.netmap, msg)
                self.login.netmap(compile.self_expired(self.netmap, self.clock()))
                await self._reconcile()
                self._persist()
        except StopAsyncIteration:
            raise ControlError(0, "map stream ended") from None
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
        lan = compile.lan_prefixes(r.out, exclude=[self.cfg.iface])
        lan_changed, self.lan_prefixes = lan != self.lan_prefixes, lan
        self.choose = endpoints.chooser(lambda: self.magicsock, local)
        if self.magicsock is not None:
            self.magicsock.set_local_endpoints([ap for e in local if (ap := parse_endpoint(e)) is not None])
        return self._combine_endpoints() or (lan_changed and self.prefs.exit_node_allow_lan_access)

    def _combine_endpoints(self) -> bool:
        ms = self.magicsock
        eps, types = endpoints.combine(ms.endpoints() if ms is not None else None, self.local_endpoints)
        if eps == self.endpoints and types == self.endpoint_types:
            return False
        self.endpoints, self.endpoint_types = eps, types
        return True

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
        """Netmap -> filter, routes, WireGuard. Failures go to status and are retried with the next map;
        `up` returns once the first attempt is over, whatever it gave."""
        async with self._apply_lock:
            if not self.prefs.want_running or self.netmap.node is None or self.reconciler is None:
                return
            try:
                await self._apply(self.reconciler)
            except Exception as e:  # engine start and friends: keep the agent alive, say what broke
                self.os_errors = {"engine": str(e)}
                log.exception("applying the network map failed")
            finally:
                self._applied.set()

    async def _apply(self, rec: Reconciler) -> None:
        nm, key, initiator = self.netmap, self.node_key, self.initiator
        if await rec.wireguard.start():  # a new engine: a new interface, no sessions
            rec.engine_new()
            initiator.engine_started()
        first = self.magicsock is None and self.cfg.nat_traversal
        if first:
            self.magicsock = MagicSock(
                self.cfg.port, key.raw, key.public().raw, self.disco.raw, engine_get=self._engine_read,
                apply=self._reconcile, on_endpoints=self._on_magic_endpoints, held=initiator.held,
                fwmark=self.cfg.fwmark,
            )
            self.magicsock.set_local_endpoints(
                [ap for e in self.local_endpoints if (ap := parse_endpoint(e)) is not None])
        ms = self.magicsock
        if ms is not None:
            ms.set_derp_map(nm.derp_map)
            ms.set_peers(nm.peers, active=rec.installed)
            if first and ms.urls:
                await ms.wait_home(DERP_FIRST_WAIT)
        try:
            prefs = self.prefs
            snat = bool(prefs.routable_ips()) and prefs.snat_subnet_routes
            ssh_port = self.cfg.ssh_port if prefs.run_ssh else None
            script, script_error = compile.filter_script(nm, self.cfg.iface, snat=snat, ssh_port=ssh_port), ""
        except nft.RenderError as e:
            script, script_error = None, str(e)
        want = Desired(filter=script, closed=compile.closed_filter_script(self.cfg.iface),
                       routes=compile.route_config(nm, self.cfg.iface, self.prefs.accept_routes, dns=self.cfg.dns),
                       wg=compile.wg_config(nm, key, self.cfg.port, self.choose, self.cfg.keepalive,
                                            self.prefs.accept_routes, prefs.exit_node, self.cfg.fwmark),
                       filter_error=script_error,
                       exit=compile.exit_config(nm, self.cfg.iface, prefs.exit_node,
                                                prefs.exit_node_allow_lan_access, self.lan_prefixes,
                                                mark=self.cfg.fwmark or sockmark.BYPASS_MARK))
        loop = asyncio.get_running_loop()
        out = await rec.apply(want, shape=lambda cfg: initiator.shape(cfg, loop.time()))
        await self._cut_refused(nm, script, out.errors)
        if ms is not None:
            ms.set_peers(nm.peers, active=rec.installed)  # disco with the peers our engine now accepts
        self._arm_hold(loop)
        errors = dict(out.errors)
        try:
            dns_error = await self.dns.apply(nm.node, nm.sorted_peers(), nm.dns, self.prefs.accept_dns)
        except Exception as e:  # the tunnel stands without its resolver; status says why
            log.exception("dns")
            dns_error = str(e)
        if dns_error:
            errors["dns"] = dns_error
        ssh_error = await self._apply_ssh(nm)
        if ssh_error:
            errors["ssh"] = ssh_error
        if errors != self.os_errors:
            for name, err in errors.items():
                log.error("applying the network map: %s: %s", name, err)
            if out.kept_out:
                log.error("%d peer(s) kept out of WireGuard until their filter is in place", len(out.kept_out))
        self.os_errors, self.kept_out = errors, len(out.kept_out)

    async def _cut_refused(self, nm: mapsession.NetMap, script: str | None, errors: Mapping[str, str]) -> None:
        """After a new filter went in, the established flows it refuses lose their conntrack entries (unless
        the server keeps them): the next packet of such a flow is new and meets the new rules."""
        if script is None or "filter" in errors or script == self._cut_after:
            return
        first, self._cut_after = self._cut_after is None, script
        rules = [r.to_json() for r in nm.packet_filter or ()]
        if first or nm.keep_established or compile.is_allow_all(nm.packet_filter or ()):
            return  # the first filter of this agent narrows nothing it had; allow-all refuses nothing
        try:
            cut = await conntrack.ConntrackCutter(self.runner).cut(rules, compile.self_addresses(nm))
        except Exception as e:  # the filter stands; old flows may live on, and the log says so
            log.error("cutting flows the new filter refuses: %s", e)
            return
        if cut:
            log.info("cut %d established flow(s) the new filter refuses", len(cut))

    async def _apply_ssh(self, nm: mapsession.NetMap) -> str:
        """Shoal SSH follows the prefs and the netmap's SSHPolicy; returns what failed, or ""."""
        self.ssh.set(nm.ssh_policy, compile.self_addresses(nm))
        try:
            if self.prefs.run_ssh:
                await self.ssh.start()
            else:
                await self.ssh.close()
        except OSError as e:
            log.error("ssh: %s", e)
            return str(e)
        return ""

    async def _engine_read(self) -> DeviceState:
        """MagicSock's engine poll: a held peer with a completed handshake is released at once."""
        assert self.engine is not None
        dev = await self.engine.get()
        if self.initiator.observe(dev):
            self._spawn(self._reconcile())
        return dev

    def _arm_hold(self, loop: asyncio.AbstractEventLoop) -> None:
        if self._hold_timer is not None:
            self._hold_timer.cancel()
            self._hold_timer = None
        at = self.initiator.next_timer()
        if at is not None:
            self._hold_timer = loop.call_at(at, self._hold_over)

    def _hold_over(self) -> None:
        self._hold_timer = None
        if self.initiator.handle_timer(asyncio.get_running_loop().time()):
            self._spawn(self._reconcile())
        else:
            self._arm_hold(asyncio.get_running_loop())

    def _spawn(self, coro: Coroutine[Any, Any, None]) -> None:
        task = asyncio.create_task(coro)
        self._bg.add(task)
        task.add_done_callback(self._bg.discard)

    async def _on_engine_restart(self) -> None:
        # a new wireguard-go child is a new interface: its addresses, routes and sessions are gone
        if self.reconciler is not None:
            self.reconciler.engine_new()
        self.initiator.engine_started()
        await self._reconcile()

    async def _teardown_os(self) -> None:
        async with self._apply_lock:
            ms, self.magicsock = self.magicsock, None
            if ms is not None:
                await ms.close()
            if self._hold_timer is not None:
                self._hold_timer.cancel()
                self._hold_timer = None
            await self.ssh.close()
            for failed in await self.dns.stop():
                log.warning("taking the tunnel down: %s", failed)
            if self.reconciler is not None:
                for failed in await self.reconciler.clear():
                    log.warning("taking the tunnel down: %s", failed)
            self.os_errors, self.kept_out = {}, 0
