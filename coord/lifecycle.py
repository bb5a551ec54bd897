"""Node lifecycle over time: online/offline as streams open and end, ephemeral nodes deleted once they have been
gone ``ephemeral_timeout``, and node keys expired when due. The timers are asyncio; every write goes through
``Service.execute``.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable, Coroutine
from dataclasses import dataclass, field
from typing import Any

from coord import decide
from coord import events as ev
from coord.service import Actor, Service, node_actor
from coord.state import State
from coord.supervise import Supervisor

log = logging.getLogger("shoal.lifecycle")


@dataclass
class Lifecycle:
    service: Service
    has_session: Callable[[int], bool]
    ephemeral_timeout: float
    expiry_interval: float = 1.0
    supervisor: Supervisor = field(default_factory=Supervisor)
    _timers: dict[int, asyncio.TimerHandle] = field(default_factory=dict)
    _tasks: set[asyncio.Task[Any]] = field(default_factory=set)

    async def start(self) -> None:
        """Streams do not survive a restart: mark online nodes offline, restart ephemeral timers, sweep expiry.

        On a shared store (replicas) the online nodes may be streaming from another replica: there the leader's
        orphan sweep (coord/app.py ``App.orphan_sweep``) marks offline the nodes no live replica holds."""
        if not self.service.shared:
            await self.service.execute(
                lambda s: [ev.NodeDisconnected(n.id) for n in s.nodes.values() if n.online], Actor.SYSTEM
            )
        for n in self.service.state.nodes.values():
            if n.ephemeral:
                self._schedule_ephemeral(n.id)
        # Supervised: a locked database or a bug in one sweep is logged and retried, never the end of expiry.
        self.spawn(self.supervisor.periodic("expiry", self.expiry_interval, self.expiry_sweep))

    async def stop(self) -> None:
        for t in self._timers.values():
            t.cancel()
        for task in list(self._tasks):
            task.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)

    def spawn(self, coro: Coroutine[Any, Any, Any]) -> None:
        task = asyncio.get_running_loop().create_task(coro)
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    # --- streams ------------------------------------------------------------------------------------------

    async def connected(self, nid: int) -> None:
        t = self._timers.pop(nid, None)
        if t is not None:
            t.cancel()
        await self.service.execute(
            lambda s: [ev.NodeConnected(nid)] if nid in s.nodes and not s.nodes[nid].online else [], node_actor(nid)
        )

    async def disconnected(self, nid: int) -> None:
        await self.service.execute(
            lambda s: [ev.NodeDisconnected(nid)] if nid in s.nodes and s.nodes[nid].online else [], node_actor(nid)
        )
        n = self.service.state.nodes.get(nid)
        if n is not None and n.ephemeral:
            self._schedule_ephemeral(nid)

    # --- ephemeral nodes ----------------------------------------------------------------------------------

    def registered(self, recs: list[ev.Record]) -> None:
        # An ephemeral node that registers but never opens a stream must not linger either.
        for r in recs:
            if isinstance(r.event, ev.NodeRegistered) and r.event.ephemeral:
                self._schedule_ephemeral(r.event.node_id)

    def _schedule_ephemeral(self, nid: int) -> None:
        loop = asyncio.get_running_loop()
        old = self._timers.pop(nid, None)
        if old is not None:
            old.cancel()
        self._timers[nid] = loop.call_later(
            self.ephemeral_timeout,
            lambda: self.spawn(self.supervisor.restarting("ephemeral-gc", lambda: self._ephemeral_gc(nid))),
        )

    async def _ephemeral_gc(self, nid: int) -> None:
        self._timers.pop(nid, None)

        def gc(s: State) -> list[ev.Event]:
            n = s.nodes.get(nid)
            if n is None or not n.ephemeral or n.online or self.has_session(nid):
                return []
            return decide.deleted(s, nid, "ephemeral node inactive")

        await self.service.execute(gc, Actor.SYSTEM)

    # --- key expiry ---------------------------------------------------------------------------------------

    async def expiry_sweep(self) -> None:
        # Keys due now expire; keys due within a day get their NodeKeyExpiringSoon (the nodeKeyExpiringInOneDay
        # webhook), once per expiry.
        now = self.service.clock()
        await self.service.execute(lambda s: decide.expire_due(s, now) + decide.expiring_soon(s, now), Actor.SYSTEM)
