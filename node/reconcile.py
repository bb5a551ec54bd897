"""Netmap -> OS in one step: a list of idempotent appliers, run in order through the injected runner and engine.

    Desired(filter, closed, routes, wg)  ->  Reconciler.apply()  ->  Outcome(errors by applier)

Appliers (each `set(config)` changes only what differs, `clear()` removes what it made):
- `filter`: our nft table (`nft -f -`), first. When the policy for this netmap cannot be put in place (the
  renderer refused it, or nft failed), the `closed` table goes in instead (established flows only, nothing
  new from the tailnet), and if even that fails what was there stays.
- `routes`: the tailnet interface's addresses, MTU and routes (`ip`), skipped when equal to the last applied.
- `wireguard`: the engine's peers (the engine's own `plan()` makes it a diff). It gets only peers whose filter
  is in place: while the filter fails, a peer that was not admitted under the last filter that went in is
  left out, and an admitted one keeps the AllowedIPs it had then.
- `exit`: policy routing for an exit node (table 52 and its ip rules, node/render/exitroute.py), after the
  routes (the interface must be up for `default dev`), before WireGuard gets the default routes for the peer.
- (later) `dns`.

A failure of one applier does not stop the next; all failures come back in `Outcome.errors`, for status.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field, replace
from typing import Protocol, TypeVar

from node.render.exitroute import ExitConfig, ExitRouteApplier
from node.render.nft import NftApplier
from node.render.routes import RouteApplier, RouteConfig
from node.run import Runner
from node.wg.config import WgConfig, WgPeer
from node.wg.engine import Engine

C = TypeVar("C", contravariant=True)


class Applier(Protocol[C]):
    name: str

    async def set(self, cfg: C) -> None: ...

    async def clear(self) -> None: ...


class FilterError(Exception):
    """The filter for this netmap could not be rendered."""


@dataclass(frozen=True)
class Desired:
    filter: str | None  # the nft script for this netmap; None when it could not be rendered (`filter_error`)
    closed: str  # what goes in when `filter` cannot: established flows only
    routes: RouteConfig
    wg: WgConfig
    filter_error: str = ""
    exit: ExitConfig | None = None  # None: leave policy routing alone (tests that do not care)


@dataclass(frozen=True)
class Outcome:
    errors: dict[str, str] = field(default_factory=dict)  # applier name -> what failed
    kept_out: tuple[bytes, ...] = ()  # peers left out of WireGuard because their filter is not in place

    @property
    def ok(self) -> bool:
        return not self.errors


class FilterApplier:
    name = "filter"

    def __init__(self, runner: Runner) -> None:
        self.nft = NftApplier(runner)

    async def set(self, cfg: str) -> None:
        await self.nft.set(cfg)

    async def clear(self) -> None:
        await self.nft.clear()


class RoutesApplier:
    name = "routes"

    def __init__(self, runner: Runner) -> None:
        self.routes = RouteApplier(runner)
        self.applied: RouteConfig | None = None

    async def set(self, cfg: RouteConfig) -> None:
        if cfg != self.applied:
            await self.routes.set(cfg)
            self.applied = cfg

    def forget(self) -> None:
        """The interface is new (an engine (re)start): what was applied is gone with the old one."""
        self.applied = None

    async def clear(self) -> None:
        self.applied = None  # the interface goes with the engine, and with it addresses and routes


class WireGuardApplier:
    name = "wireguard"

    def __init__(self, engine: Engine) -> None:
        self.engine = engine
        self.started = False

    async def start(self) -> bool:
        """Starts the engine unless it runs; True when it is a new one (a new interface, no sessions)."""
        if self.started:
            return False
        await self.engine.start()
        self.started = True
        return True

    async def set(self, cfg: WgConfig) -> None:
        await self.engine.set(cfg)

    async def clear(self) -> None:
        if self.started:
            self.started = False
            await self.engine.stop()


class Reconciler:
    def __init__(self, runner: Runner, engine: Engine) -> None:
        self.filter = FilterApplier(runner)
        self.routes = RoutesApplier(runner)
        self.exit = ExitRouteApplier(runner)
        self.wireguard = WireGuardApplier(engine)
        self.admitted: dict[bytes, WgPeer] = {}  # peers of the last config whose filter went in
        self.installed: set[bytes] = set()  # peers the engine was last given
        self.filter_ok = False

    def engine_new(self) -> None:
        """The engine is a new one (started, or wireguard-go restarted): a new interface, no peers."""
        self.routes.forget()
        self.installed = set()

    @property
    def appliers(self) -> list[Applier[str] | Applier[RouteConfig] | Applier[ExitConfig] | Applier[WgConfig]]:
        return [self.filter, self.routes, self.exit, self.wireguard]

    async def apply(self, want: Desired, shape: Callable[[WgConfig], WgConfig] | None = None) -> Outcome:
        """`shape` adjusts the WireGuard config of the admitted peers last (the handshake tie-break)."""
        errors: dict[str, str] = {}
        try:
            if want.filter is None:
                raise FilterError(want.filter_error or "no filter")
            await self.filter.set(want.filter)
            self.filter_ok = True
        except Exception as e:
            self.filter_ok = False
            errors["filter"] = str(e)
            try:
                await self.filter.set(want.closed)
            except Exception as closed_failed:  # nft itself is broken: only WireGuard can keep peers out
                errors["filter"] += f" (and the closed table: {closed_failed})"
        wg = want.wg
        kept_out: tuple[bytes, ...] = ()
        if self.filter_ok:
            self.admitted = {p.public_key.raw: p for p in wg.peers}
        else:
            wg, kept_out = gate(wg, self.admitted)
        try:
            await self.routes.set(want.routes)
        except Exception as e:
            errors["routes"] = str(e)
        if want.exit is not None:
            try:
                await self.exit.set(want.exit)
            except Exception as e:
                errors["exit"] = str(e)
        try:
            await self.wireguard.set(shape(wg) if shape is not None else wg)
            self.installed = {p.public_key.raw for p in wg.peers}
        except Exception as e:
            errors["wireguard"] = str(e)
        return Outcome(errors, kept_out)

    async def clear(self) -> list[str]:
        """Everything ours goes, in reverse order; returns what could not be removed."""
        failed = []
        for applier in reversed(self.appliers):
            try:
                await applier.clear()
            except Exception as e:
                failed.append(f"{applier.name}: {e}")
        self.admitted = {}
        self.installed = set()
        self.filter_ok = False
        return failed


def gate(cfg: WgConfig, admitted: dict[bytes, WgPeer]) -> tuple[WgConfig, tuple[bytes, ...]]:
    """Only peers admitted under the last filter that went in, with the AllowedIPs they had then."""
    peers, out = [], []
    for p in cfg.peers:
        have = admitted.get(p.public_key.raw)
        if have is None:
            out.append(p.public_key.raw)
        else:
            peers.append(replace(p, allowed_ips=have.allowed_ips))
    return replace(cfg, peers=tuple(peers)), tuple(out)
