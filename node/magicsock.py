"""The agent's NAT-traversal glue: raw port, disco paths, DERP connections, netcheck, engine reconciliation.

One `MagicSock` per agent, made when the engine is up. It composes the tested pieces (docs/nat.md):
- `rawsock.RawPort` on the WireGuard port: STUN and disco go out from that port, and only STUN replies and
  disco packets come back into Python (BPF filter);
- `paths.Magic`: one disco path state machine per peer; its timers run on the loop;
- `derpsock.DerpSockets`: while a peer has no confirmed direct path its WireGuard endpoint is a loopback socket
  whose datagrams go over DERP to the peer's node key;
- `DerpClient`s: the home region (NotePreferred), and peers' home regions opened on demand; packets for a
  region not yet connected wait in a short queue, so a first handshake is not lost to the dial;
- `netcheck.Runner` from the raw port: re-STUN every 20-26 s (5 s while UDP looks blocked), which also picks
  the home region and gives the STUN endpoints (type 2) reported beside the local ones (type 1);
- a poll of the engine (UAPI get, every `poll_interval`): counters that move mark the peer's session active,
  and an endpoint that differs from our choice (wireguard-go roams to the source of the last authenticated
  packet) is set back.

Roaming: when a direct path loses its trust window, the agent re-STUNs at once and pings its home relay; no
Pong within 2 s redials it (a NAT that changed its outside address has killed the TCP connection too).

A WireGuard handshake initiation that went to the DERP socket is replayed once to the direct address when
that path is confirmed within 5 s: wireguard-go would otherwise wait its 5 s retry before using the new path
(and with no relay at all, a LAN peer would never hear the first one). A replay the peer already saw is
rejected by WireGuard's timestamp check.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
from collections import Counter, deque
from collections.abc import Awaitable, Callable, Collection, Coroutine, Mapping
from dataclasses import dataclass, field
from typing import Any

from nacl.public import Box

from coord import wire
from derp import frames
from derp.client import ClientEvent, Connected, DerpClient, Disconnected
from node import disco, netcheck, paths, rawsock
from node.derpsock import DerpSockets
from node.disco import AddrPort
from node.netcheck import Report
from node.paths import PathKind
from node.status import PathView
from node.wg.config import DeviceState

log = logging.getLogger("shoald.magicsock")

EP_LOCAL = wire.EP_LOCAL
EP_STUN = wire.EP_STUN
POLL_INTERVAL = 0.5
DERP_PENDING = 64  # packets held per region while it dials
REPLAY_WINDOW = 5.0  # wireguard-go's REKEY_TIMEOUT: an older initiation has been retried already
ROAM_PONG_TIMEOUT = 2.0
ROAM_MIN_INTERVAL = 3.0
ACTIVITY_EVERY = 0.5  # note_activity at most this often per peer from the DERP send path
WG_INITIATION = 1
WG_INITIATION_LEN = 148


def fmt_addr(a: AddrPort) -> str:
    return f"[{a[0]}]:{a[1]}" if ":" in a[0] else f"{a[0]}:{a[1]}"


def parse_endpoint(text: object) -> AddrPort | None:
    """An endpoint "ip:port" / "[ip6]:port" (ours, or the engine's) as an AddrPort; None when malformed."""
    try:
        return wire.Endpoint.parse(text).addr
    except wire.WireError:
        return None


def derp_url(node: wire.DERPNode) -> str | None:
    if node.url.startswith(("http://", "https://")):
        return node.url
    host = node.host_name
    if not host:
        return None
    port = node.derp_port
    scheme = "http" if node.insecure_for_tests else "https"
    hostport = f"[{host}]" if ":" in host else host
    return f"{scheme}://{hostport}:{port}/derp" if port else f"{scheme}://{hostport}/derp"


def region_urls(derp_map: wire.DERPMap | None) -> dict[int, str]:
    """Region id -> URL of its first relay."""
    out: dict[int, str] = {}
    for r in derp_map.regions if derp_map is not None else ():
        for n in r.nodes:
            if (url := derp_url(n)) is not None:
                out[r.region_id] = url
                break
    return out


@dataclass
class _Region:
    region_id: int
    client: DerpClient
    pending: deque[tuple[bytes, bytes]] = field(default_factory=lambda: deque(maxlen=DERP_PENDING))


@dataclass
class _PeerInfo:
    disco_key: bytes
    box: Box
    region: int
    endpoints: tuple[AddrPort, ...]


@dataclass
class _Ping:
    node_key: bytes
    fut: asyncio.Future[tuple[AddrPort | None, int]]


class MagicSock:
    def __init__(
        self,
        port: int,
        node_private: bytes,
        node_public: bytes,
        disco_private: bytes,
        *,
        engine_get: Callable[[], Awaitable[DeviceState]],
        apply: Callable[[], Awaitable[None]],
        on_endpoints: Callable[[], None],
        poll_interval: float = POLL_INTERVAL,
        held: Callable[[bytes], bool] = lambda _key: False,
        fwmark: int = 0,
    ) -> None:
        self.loop = asyncio.get_running_loop()
        self.fwmark = fwmark  # on the raw sender and every DERP connection (node/sockmark.py)
        self.port = port
        self.node_private = node_private
        self.node_public = node_public
        self.disco_private = disco_private
        self.engine_get = engine_get
        self.apply = apply
        self.on_endpoints = on_endpoints
        self.poll_interval = poll_interval
        self.held = held  # peers the engine has without an endpoint for now (node/handshake.py)
        self.magic = paths.Magic(disco_private, node_public, rand=os.urandom)
        self.derpsock = DerpSockets(port, self._wg_to_derp, loop=self.loop)
        self.raw: rawsock.RawPort | None = None
        self.raw_error = ""
        try:
            self.raw = rawsock.RawPort(port, self._on_raw, loop=self.loop, fwmark=fwmark)
        except OSError as e:  # no CAP_NET_RAW: DERP still works, direct paths only from LAN endpoints
            self.raw_error = f"raw socket on port {port}: {e}"
            log.warning("%s; no STUN or disco over UDP", self.raw_error)
        self.stun = netcheck.Runner(self._send_udp)
        self.regions: list[netcheck.Region] = []
        self.urls: dict[int, str] = {}
        self.derp_map: wire.DERPMap | None = None
        self.home = 0
        self.report: Report | None = None
        self.last_netcheck = 0.0
        self.stun_endpoints: list[AddrPort] = []
        self.local_endpoints: list[AddrPort] = []
        self.clients: dict[int, _Region] = {}
        self.peers: dict[bytes, _PeerInfo] = {}  # node key -> info
        self.stats: Counter[str] = Counter()
        self.engine_endpoints: dict[bytes, str | None] = {}
        self._counters: dict[bytes, tuple[int, int]] = {}
        self._last_activity: dict[bytes, float] = {}
        self._initiations: dict[bytes, tuple[float, bytes]] = {}
        self._pings: dict[bytes, _Ping] = {}
        self._timer: asyncio.TimerHandle | None = None
        self._restun = asyncio.Event()
        self._last_roam = -1e9
        self._tasks: set[asyncio.Task[Any]] = set()
        self._main: list[asyncio.Task[None]] = [
            self.loop.create_task(self._netcheck_loop(), name="netcheck"),
            self.loop.create_task(self._poll_loop(), name="engine-poll"),
        ]

    # --- lifecycle ---------------------------------------------------------------------------------------

    async def close(self) -> None:
        for t in [*self._main, *self._tasks]:
            t.cancel()
        for t in [*self._main, *self._tasks]:
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await t
        if self._timer is not None:
            self._timer.cancel()
        for r in self.clients.values():
            await r.client.close()
        self.clients.clear()
        for p in self._pings.values():
            if not p.fut.done():
                p.fut.cancel()
        if self.raw is not None:
            self.raw.close()
        self.derpsock.close_all()

    def _spawn(self, coro: Coroutine[Any, Any, Any]) -> None:
        task: asyncio.Task[Any] = self.loop.create_task(coro)
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    # --- inputs from the agent ---------------------------------------------------------------------------

    def set_derp_map(self, derp_map: wire.DERPMap | None) -> None:
        if derp_map == self.derp_map:
            return
        self.derp_map = derp_map
        self.regions = netcheck.regions_from_derp_map(derp_map) if derp_map is not None else []
        self.urls = region_urls(derp_map)
        if self.home not in self.urls:
            self._set_home(min(self.urls) if self.urls else 0)
        self._restun.set()

    def set_local_endpoints(self, endpoints: list[AddrPort]) -> None:
        if endpoints != self.local_endpoints:
            self.local_endpoints = list(endpoints)
            self._self_endpoints_changed()
            self._restun.set()  # an address changed: the NAT mapping may have too

    def set_peers(self, peers: Mapping[int, wire.Node], active: Collection[bytes] | None = None) -> None:
        """The netmap's peers: disco key, node key, endpoints and home region of each.

        Only `active` peers (default: all) take part in disco: the agent passes those its engine has, so a peer
        learns a path to us (and replays its first handshake there) only once our WireGuard would accept it,
        and a peer kept out of WireGuard (its filter not in place) gets no disco answer either. The others
        still get their DERP socket, so the first handshake to them can go out over the relay."""
        now = self.loop.time()
        seen: set[bytes] = set()
        for p in peers.values():
            node_key, disco_key = p.key, p.disco_key
            if node_key is None or disco_key is None or p.expired:
                continue
            seen.add(node_key)
            eps = tuple(ep.addr for ep in p.endpoints if _usable(ep))
            region = p.home_derp
            info = self.peers.get(node_key)
            if info is None or info.disco_key != disco_key:
                info = _PeerInfo(disco_key, disco.box_for(self.disco_private, disco_key), region, ())
                self.peers[node_key] = info
            info.region = region
            if active is not None and node_key not in active:
                if self.magic.peer_by_node(node_key) is not None:
                    self.magic.remove_peer(info.disco_key)
                info.endpoints = ()
                continue
            if info.endpoints != eps or self.magic.peer_by_node(node_key) is None:
                info.endpoints = eps
                self.magic.upsert_peer(disco_key, node_key, eps, now)
        for node_key in [k for k in self.peers if k not in seen]:
            info = self.peers.pop(node_key)
            self.magic.remove_peer(info.disco_key)
            self.derpsock.close(node_key)
            self.engine_endpoints.pop(node_key, None)
        self._pump()

    def endpoint_for(self, node_key: bytes) -> str | None:
        """The WireGuard endpoint we want for a peer: its confirmed direct path, else its DERP socket.
        None for a peer without disco (the agent falls back to its reported endpoints)."""
        if node_key not in self.peers:
            return None
        # Always keep the DERP socket: a peer still on DERP toward us sends there even after we went direct.
        derp_ep = self.derpsock.open(node_key)
        peer = self.magic.peer_by_node(node_key)
        addr = peer.endpoint if peer is not None else None
        return fmt_addr(addr or derp_ep)

    # --- what the agent reports ----------------------------------------------------------------------------

    def endpoints(self) -> tuple[list[str], list[int]]:
        """STUN endpoints (type 2), then local ones (type 1)."""
        eps: list[str] = []
        types: list[int] = []
        for kind, group in ((EP_STUN, self.stun_endpoints), (EP_LOCAL, self.local_endpoints)):
            for ep in group:
                text = fmt_addr(ep)
                if text not in eps:
                    eps.append(text)
                    types.append(kind)
        return eps, types

    def peer_path(self, node_key: bytes) -> dict[str, Any]:
        """For `shoal status`: the engine's actual endpoint, what it is, and our path state."""
        actual = self.engine_endpoints.get(node_key)
        info = self.peers.get(node_key)
        peer = self.magic.peer_by_node(node_key)
        now = self.loop.time()
        kind = PathKind.NONE
        region = None
        if actual:
            ap = parse_endpoint(actual)
            if ap is not None and self.derpsock.node_key_for(ap) == node_key:
                region = self._region_for(node_key)
                kind = PathKind.DERP
            else:
                kind = PathKind.DIRECT
        out: dict[str, Any] = {"Path": kind, "DERPRegion": region, "PeerHomeDERP": info.region if info else None}
        if peer is not None:
            out["Best"] = fmt_addr(peer.best) if peer.best else None
            out["BestLatency"] = peer.best_latency if peer.best else None
            out["Trusted"] = peer.trusted(now)
            out["Active"] = peer.active(now)
            out["Chosen"] = fmt_addr(peer.endpoint) if peer.endpoint else "derp"
        return out

    def observe(self, node_key: bytes, endpoint: str | None) -> PathView | None:
        """For `shoal status` and `shoal ping`: what we know of a peer's path, beside the engine's endpoint
        for it read in the same snapshot. None for a peer without disco."""
        info = self.peers.get(node_key)
        if info is None:
            return None
        peer = self.magic.peer_by_node(node_key)
        now = self.loop.time()
        ap = parse_endpoint(endpoint) if endpoint else None
        derp = ap is not None and self.derpsock.node_key_for(ap) == node_key
        confirmed = None
        fields: dict[str, Any] = {"PeerHomeDERP": info.region}
        if peer is not None:
            if peer.endpoint is not None and peer.trusted(now):
                confirmed = fmt_addr(peer.endpoint)
            fields.update(Best=fmt_addr(peer.best) if peer.best else None,
                          BestLatency=peer.best_latency if peer.best else None, Trusted=peer.trusted(now),
                          Active=peer.active(now), Chosen=fmt_addr(peer.endpoint) if peer.endpoint else "derp")
        return PathView(derp, self._region_for(node_key), confirmed, fields)

    def status(self) -> dict[str, Any]:
        return {
            "HomeDERP": self.home,
            "DERPConnected": {str(r): c.client.connected for r, c in sorted(self.clients.items())},
            "RawError": self.raw_error,
            "RawReceived": self.raw.received if self.raw is not None else 0,
            "RawSendErrors": self.raw.send_errors if self.raw is not None else 0,
            "DiscoReceived": dict(self.magic.stats.received),
            "DiscoDrops": dict(self.magic.stats.drops),
            "DerpSock": dict(self.derpsock.stats),
            "Counters": dict(self.stats),
            "Netcheck": self.report.to_json() if self.report is not None else None,
        }

    # --- netcheck ----------------------------------------------------------------------------------------

    async def netcheck(self, timeout: float = netcheck.TIMEOUT) -> Report:
        """One netcheck from the WireGuard port; updates home region and STUN endpoints."""
        if self.raw is None or not self.regions:
            report = await netcheck.netcheck_udp(self.regions, previous_home=self.home, timeout=timeout) \
                if self.regions else Report()
        else:
            report = await self.stun.run(self.regions, previous_home=self.home, timeout=timeout)
        self._take_report(report)
        return report

    def _take_report(self, report: Report) -> None:
        self.report = report
        self.last_netcheck = self.loop.time()
        eps = [e for e in report.endpoints() if ":" not in e[0]]
        changed = eps != self.stun_endpoints
        self.stun_endpoints = eps
        home = report.preferred_derp or self.home or (min(self.urls) if self.urls else 0)
        if home not in self.urls and self.urls:
            home = self.home if self.home in self.urls else min(self.urls)
        if home != self.home:
            self._set_home(home)
            changed = True
        if changed:
            self._self_endpoints_changed()

    def _set_home(self, region: int) -> None:
        old = self.clients.get(self.home)
        if old is not None:
            old.client.note_preferred(False)
        self.home = region
        self.magic.derp_region = region
        if region:
            r = self._client(region)
            if r is not None:
                r.client.note_preferred(True)
        log.info("home DERP region %d", region)
        self.on_endpoints()

    def _self_endpoints_changed(self) -> None:
        eps = [*self.stun_endpoints, *self.local_endpoints]
        self.magic.set_self_endpoints([e for e in dict.fromkeys(eps) if ":" not in e[0]])
        self.on_endpoints()

    async def _netcheck_loop(self) -> None:
        while True:
            if self.regions:
                try:
                    await self.netcheck(timeout=1.5 if self.report is None else netcheck.TIMEOUT)
                except Exception as e:  # keep re-STUNning whatever one run did
                    log.warning("netcheck: %s", e)
            udp_ok = self.report.udp if self.report is not None else False
            self._restun.clear()
            # not asyncio.wait_for: on 3.11 it can swallow the cancel that close() sends
            wake = self.loop.call_later(netcheck.restun_delay(udp_ok), self._restun.set)
            try:
                await self._restun.wait()
            finally:
                wake.cancel()

    # --- DERP --------------------------------------------------------------------------------------------

    def _client(self, region: int) -> _Region | None:
        r = self.clients.get(region)
        if r is not None:
            return r
        url = self.urls.get(region)
        if url is None:
            return None
        def on_event(ev: ClientEvent) -> None:
            self._on_derp(region, ev)

        client = DerpClient(url, self.node_private, preferred=region == self.home, on_event=on_event,
                            fwmark=self.fwmark)
        r = self.clients[region] = _Region(region, client)
        client.start()
        return r

    async def wait_home(self, timeout: float) -> bool:
        r = self.clients.get(self.home)
        if r is None:
            return False
        try:
            await r.client.wait_connected(timeout)
        except TimeoutError:
            return False
        return True

    def _region_for(self, node_key: bytes) -> int:
        info = self.peers.get(node_key)
        region = info.region if info is not None and info.region in self.urls else 0
        return region or self.home

    def _send_derp(self, node_key: bytes, packet: bytes) -> bool:
        region = self._region_for(node_key)
        r = self._client(region) if region else None
        if r is None:
            self.stats["derp_no_region"] += 1
            return False
        if r.client.connected and not r.pending:
            if r.client.send(node_key, packet):
                self.stats["derp_sent"] += 1
                return True
            self.stats["derp_send_dropped"] += 1
            return False
        r.pending.append((node_key, packet))
        self.stats["derp_queued"] += 1
        return True

    def _on_derp(self, region: int, ev: ClientEvent) -> None:
        if isinstance(ev, frames.RecvPacket):
            self.stats["derp_recv"] += 1
            if disco.looks_like_disco(ev.packet):
                self._on_disco(ev.packet, None, ev.src)
            else:
                self.derpsock.deliver(ev.src, ev.packet)
        elif isinstance(ev, Connected):
            r = self.clients.get(region)
            if r is not None:
                if region == self.home:
                    r.client.note_preferred(True)
                while r.pending:
                    dst, pkt = r.pending.popleft()
                    r.client.send(dst, pkt)
            log.info("DERP region %d connected", region)
        elif isinstance(ev, Disconnected):
            log.info("DERP region %d disconnected: %s", region, ev.reason)
        elif isinstance(ev, frames.Health) and ev.problem:
            log.warning("DERP region %d: %s", region, ev.problem)

    def _wg_to_derp(self, node_key: bytes, packet: bytes) -> None:
        peer = self.magic.peer_by_node(node_key)
        if peer is not None and peer.endpoint is not None and self.raw is not None:
            # The direct path is confirmed but the engine still (or again, after roaming) sends here: until the
            # new endpoint is set, the packet goes direct from the WireGuard port rather than the long way.
            self.raw.sendto(packet, peer.endpoint)
            self.stats["derpsock_sent_direct"] += 1
        else:
            if packet[:1] == bytes([WG_INITIATION]) and len(packet) == WG_INITIATION_LEN:
                self._initiations[node_key] = (self.loop.time(), packet)
            if peer is not None and peer.best is not None and self.raw is not None:
                # Tailscale's "DERP plus the stale address": the last path that worked may work again (a peer
                # back after a restart answers there before any disco round; with no relay it is the only way)
                self.raw.sendto(packet, peer.best)
                self.stats["derpsock_sent_stale"] += 1
            self._send_derp(node_key, packet)
        now = self.loop.time()
        if now - self._last_activity.get(node_key, -1e9) >= ACTIVITY_EVERY:
            self._last_activity[node_key] = now
            self.magic.note_activity(node_key, now)
            self._pump()

    # --- UDP (raw port) ----------------------------------------------------------------------------------

    def _send_udp(self, data: bytes, addr: AddrPort) -> None:
        if self.raw is not None and ":" not in addr[0]:
            self.raw.sendto(data, addr)

    def _on_raw(self, payload: bytes, src: AddrPort) -> None:
        if disco.looks_like_disco(payload):
            self._on_disco(payload, src, None)
        elif not self.stun.feed(payload, src):
            self.stats["raw_unexpected"] += 1

    # --- disco -------------------------------------------------------------------------------------------

    def _on_disco(self, packet: bytes, src: AddrPort | None, derp_src: bytes | None) -> None:
        if self._pings and self._take_pong(packet, src, derp_src):
            return
        self.magic.receive(packet, src, self.loop.time(), derp_src=derp_src)
        self._pump()

    def _pump(self) -> None:
        while (a := self.magic.next_action()) is not None:
            if isinstance(a, paths.EndpointChanged):
                self._endpoint_changed(a.node_key, a.addr)
            elif a.addr is None:
                self._send_derp(a.node_key, a.data)
            else:
                self._send_udp(a.data, a.addr)
        if self._timer is not None:
            self._timer.cancel()
        t = self.magic.next_timer()
        self._timer = None if t is None else self.loop.call_at(t, self._on_timer)

    def _on_timer(self) -> None:
        self._timer = None
        self.magic.handle_timer(self.loop.time())
        self._pump()

    def _endpoint_changed(self, node_key: bytes, addr: AddrPort | None) -> None:
        log.info("peer %s: path %s", node_key.hex()[:8], fmt_addr(addr) if addr else "DERP")
        self.stats["path_direct" if addr else "path_derp"] += 1
        if addr is not None:
            init = self._initiations.pop(node_key, None)
            if init is not None and self.loop.time() - init[0] < REPLAY_WINDOW and self.raw is not None:
                self.raw.sendto(init[1], addr)
                self.stats["initiation_replayed"] += 1
        else:
            self._roam_check()
        self._spawn(self._apply())

    def _roam_check(self) -> None:
        """A direct path stopped answering: maybe our NAT changed its outside address. Re-STUN at once, and
        ping the home relay; redial it when it does not answer within 2 s."""
        now = self.loop.time()
        if now - self._last_roam < ROAM_MIN_INTERVAL:
            return
        self._last_roam = now
        self.stats["roam_checks"] += 1
        self._restun.set()
        self._spawn(self._check_home())

    async def _apply(self) -> None:
        await self.apply()

    async def _check_home(self) -> None:
        r = self.clients.get(self.home)
        if r is None:
            return
        try:
            await r.client.ping(ROAM_PONG_TIMEOUT)
            return
        except (TimeoutError, ConnectionError):
            pass
        self.stats["derp_redials"] += 1
        log.info("home DERP region %d did not answer a ping in %.0fs: redialling", self.home, ROAM_PONG_TIMEOUT)
        region = self.home
        old = self.clients.pop(region, None)
        if old is not None:
            await old.client.close()
        fresh = self._client(region)
        if fresh is not None and old is not None:
            fresh.pending.extend(old.pending)

    # --- `shoal ping` ------------------------------------------------------------------------------------

    async def ping(self, node_key: bytes, timeout: float = 5.0) -> tuple[str, float, AddrPort | None]:
        """One disco ping on the peer's current path: (path text, seconds, direct address or None)."""
        info = self.peers.get(node_key)
        if info is None:
            raise LookupError("peer has no disco key (it cannot answer disco pings)")
        now = self.loop.time()
        self.magic.note_activity(node_key, now)  # as traffic would: start path discovery
        self._pump()
        peer = self.magic.peer_by_node(node_key)
        dst = peer.endpoint if peer is not None else None
        txid = os.urandom(disco.TXID_LEN)
        fut: asyncio.Future[tuple[AddrPort | None, int]] = self.loop.create_future()
        self._pings[txid] = _Ping(node_key, fut)
        data = disco.seal(disco.Ping(txid, self.node_public), self.magic.public, info.box)
        t0 = self.loop.time()
        try:
            if dst is None:
                self._send_derp(node_key, data)
            else:
                self._send_udp(data, dst)
            src, region = await asyncio.wait_for(fut, timeout)
        finally:
            self._pings.pop(txid, None)
        took = self.loop.time() - t0
        if src is None:
            return f"DERP({region})", took, None
        return fmt_addr(src), took, src

    def _take_pong(self, packet: bytes, src: AddrPort | None, derp_src: bytes | None) -> bool:
        try:
            sender = disco.sender_key(packet)
        except disco.DiscoError:
            return False
        for node_key, info in self.peers.items():
            if info.disco_key != sender:
                continue
            try:
                msg = disco.open_packet(packet, info.box)
            except disco.DiscoError:
                return False
            if not isinstance(msg, disco.Pong):
                return False
            p = self._pings.get(msg.txid)
            if p is None or p.node_key != node_key or p.fut.done():
                return False
            p.fut.set_result((src, self._region_for(node_key) if src is None else 0))
            return True
        return False

    # --- engine poll ---------------------------------------------------------------------------------------

    async def _poll_loop(self) -> None:
        while True:
            await asyncio.sleep(self.poll_interval)
            try:
                await self.poll()
            except asyncio.CancelledError:
                raise
            except Exception as e:  # the engine restarting, say: try again next round
                self.stats["poll_errors"] += 1
                log.debug("engine poll: %s", e)

    async def poll(self) -> None:
        dev = await self.engine_get()
        now = self.loop.time()
        mismatch = False
        for st in dev.peers:
            key = st.public_key.raw
            if key not in self.peers:
                continue
            self.engine_endpoints[key] = st.endpoint
            counters = (st.rx_bytes, st.tx_bytes)
            if self._counters.get(key) != counters:
                self._counters[key] = counters
                self.magic.note_activity(key, now)
            want = self.endpoint_for(key)
            if want is not None and st.endpoint != want and not self.held(key):
                mismatch = True
        self._pump()
        if mismatch:
            self.stats["reconciled"] += 1
            await self.apply()


def _usable(ep: wire.Endpoint) -> bool:
    """Candidates we can ping from the IPv4 raw port."""
    ip = ep.ip
    return ip.version == 4 and not (ip.is_loopback or ip.is_multicast or ip.is_unspecified or ip.is_link_local)
