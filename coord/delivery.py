"""Webhook delivery, the asyncio shell over coord/webhooks.py: one supervised task per endpoint, httpx to post.

Each endpoint's task reads the log from its durable cursor (``webhook_cursors``), only up to the last committed
event (``Service.committed``: group commit folds events before they are durable, and a webhook must never announce
an event a crash could still take back). It sends the next batch, retrying per coord/webhooks.py, and moves the
cursor only after a 2xx or a give-up, in the same transaction as that attempt's row in ``webhook_deliveries``.
A crash between a 2xx and that write re-sends the batch after the restart: at least once, never skipped, in order.
Endpoints have their own tasks, so one that is down (and backing off) holds up no other.

The endpoint list is the fold of the log (``State.webhooks``); its signing secrets are in ``webhook_secrets``
(migrations/0006_webhooks.sql), never in an event. ``Webhooks`` also carries the admin commands
(``shoal-server webhooks ...``, coord/admin.py); it does not depend on any HTTP API.
"""

from __future__ import annotations

import asyncio
import logging
import random
import secrets
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from typing import Any

import httpx

from coord import events as ev
from coord import webhooks as core
from coord.errors import DomainError
from coord.service import Actor, Service
from coord.store import Filter
from coord.store.sqlite import WebhookTables
from coord.supervise import Supervisor

log = logging.getLogger("shoal.webhooks")

READ_AHEAD = 500  # events read from the log per step of one endpoint
TIMEOUT = 10.0


@dataclass
class Webhooks:
    service: Service
    tables: WebhookTables
    tailnet: str
    supervisor: Supervisor = field(default_factory=Supervisor)
    poll: float = 0.2  # seconds between looks at the log when an endpoint is idle
    max_age: float = core.MAX_AGE
    retry_base: float = core.RETRY_BASE
    retry_cap: float = core.RETRY_CAP
    sleep: Callable[[float], Awaitable[None]] = asyncio.sleep
    rand: Callable[[], float] = field(default_factory=lambda: random.Random().random)
    http: httpx.AsyncClient | None = None
    # Each attempt's outcome (delivered, failed, undeliverable) and its batch size: the server's metrics.
    on_attempt: Callable[[str, int], None] = lambda outcome, events: None
    _tasks: dict[str, asyncio.Task[None]] = field(default_factory=dict)
    _loop: asyncio.Task[None] | None = None

    @property
    def clock(self) -> Callable[[], float]:
        return self.service.clock

    @property
    def tailnet_name(self) -> str:
        """The base domain in force (one an admin set at run time, else the config's)."""
        return self.service.state.base_domain or self.tailnet

    # --- admin commands -----------------------------------------------------------------------------------

    async def add(self, url: str, types: list[str], actor: str = Actor.ADMIN) -> dict[str, Any]:
        """A new endpoint; its secret is returned here once. The secret is stored before the event is appended
        (an event whose secret is missing could never be delivered; a secret whose event failed is inert)."""
        core.check_url(url)
        checked = core.check_types(types)
        eid, secret = secrets.token_hex(6), f"whsec-{secrets.token_hex(32)}"
        await self.tables.put_secret(eid, secret)
        try:
            (r,) = await self.service.execute(lambda s: core.add_endpoint(s, eid, url, checked), actor)
        except BaseException:
            await self.tables.forget(eid)
            raise
        # Events from the one after this endpoint's own on.
        await self.tables.set_cursor(eid, r.seq)
        return {**self._view(eid, r.seq, {}), "secret": secret}

    async def remove(self, ref: str, actor: str = Actor.ADMIN) -> dict[str, Any]:
        eid = core.find_endpoint(self.service.state, ref)
        await self.service.execute(lambda s: core.remove_endpoint(s, eid), actor)
        t = self._tasks.pop(eid, None)
        if t is not None:
            t.cancel()
            await asyncio.gather(t, return_exceptions=True)
        await self.tables.forget(eid)
        return {"removed": eid}

    async def update(self, ref: str, types: list[str], actor: str = Actor.ADMIN) -> dict[str, Any]:
        """Replace an endpoint's subscriptions; its task reads them afresh at its next step."""
        eid = core.find_endpoint(self.service.state, ref)
        await self.service.execute(lambda s: core.update_endpoint(s, eid, types), actor)
        return await self.endpoint(eid)

    async def rotate(self, ref: str) -> dict[str, Any]:
        """A new signing secret, returned here once; the old one signs nothing from now on (the next attempt,
        retries included, reads the secret afresh). No event: the log never holds a secret, nor names one."""
        eid = core.find_endpoint(self.service.state, ref)
        secret = f"whsec-{secrets.token_hex(32)}"
        await self.tables.put_secret(eid, secret)
        return {**await self.endpoint(eid), "secret": secret}

    async def endpoint(self, ref: str) -> dict[str, Any]:
        eid = core.find_endpoint(self.service.state, ref)
        last = await self.tables.last_outcomes()
        return self._view(eid, await self.tables.cursor(eid), last.get(eid, {}))

    def _view(self, eid: str, cursor: int | None, last: dict[str, Any]) -> dict[str, Any]:
        url, types = self.service.state.webhooks[eid]
        return {"id": eid, "url": url, "events": list(types), "cursor": cursor,
                "behind": max(0, self.service.committed[0] - (cursor or 0)), "last": last or None}

    async def endpoints(self) -> list[dict[str, Any]]:
        last = await self.tables.last_outcomes()
        return [self._view(eid, await self.tables.cursor(eid), last.get(eid, {}))
                for eid in sorted(self.service.state.webhooks)]

    async def deliveries(self, ref: str | None, limit: int = 50) -> list[dict[str, Any]]:
        return await self.tables.deliveries(ref, limit)

    async def test(self, ref: str) -> dict[str, Any]:
        """A ``test`` event posted now, outside the cursor (and not retried): what the endpoint answered."""
        eid = core.find_endpoint(self.service.state, ref)
        secret = await self.tables.secret(eid)
        if secret is None:
            raise DomainError(f"webhook endpoint {eid} has no secret stored")
        url = self.service.state.webhooks[eid][0]
        body = core.body_bytes([core.sample_event(self.tailnet_name, self.clock())])
        headers = {"Content-Type": "application/json",
                   core.SIGNATURE_HEADER: core.signature(secret, int(self.clock()), body)}
        status, error = await self._post(url, body, headers)
        return {"id": eid, "url": url, "status": status, "error": error,
                "ok": status is not None and 200 <= status < 300}

    # --- the loop -----------------------------------------------------------------------------------------

    async def start(self) -> None:
        self._loop = asyncio.create_task(self.supervisor.periodic("webhooks", self.poll, self.sync))

    async def close(self) -> None:
        tasks = [t for t in (self._loop, *self._tasks.values()) if t is not None]
        for t in tasks:
            t.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
        self._tasks.clear()
        await self.tables.drain()
        if self.http is not None:
            await self.http.aclose()
            self.http = None

    async def sync(self) -> None:
        """One task per endpoint of the (committed) log: start new ones, end removed ones."""
        want = set(self.service.state.webhooks)
        for eid in list(self._tasks):
            if eid not in want:
                self._tasks.pop(eid).cancel()
        for eid in want:
            t = self._tasks.get(eid)
            if t is None or t.done():
                self._tasks[eid] = asyncio.create_task(
                    self.supervisor.restarting(f"webhook {eid}", lambda eid=eid: self._run(eid)))  # type: ignore[misc]

    async def _start_cursor(self, eid: str) -> int | None:
        cursor = await self.tables.cursor(eid)
        if cursor is not None:
            return cursor
        # Added by a server that crashed before it wrote the cursor: start after the endpoint's own event.
        until = self.service.committed[0]
        async for r in self.service.store.read(Filter(types=("WebhookEndpointAdded",), until_seq=until)):
            if isinstance(r.event, ev.WebhookEndpointAdded) and r.event.endpoint_id == eid:
                cursor = r.seq
        if cursor is not None:
            await self.tables.set_cursor(eid, cursor)
        return cursor

    async def _run(self, eid: str) -> None:
        cursor = await self._start_cursor(eid)
        if cursor is None:
            return  # not committed yet: the next sync starts it again
        while eid in self.service.state.webhooks:
            committed = self.service.committed[0]
            if committed <= cursor:
                await self.sleep(self.poll)
                continue
            until = min(committed, cursor + READ_AHEAD)
            records = [r async for r in self.service.store.read(Filter(since_seq=cursor, until_seq=until))]
            _, types = self.service.state.webhooks[eid]
            names = await self._names(records)
            batch, skip = core.next_batch(eid, records, types, self.tailnet_name, self.service.state, names)
            if batch is None:
                # Nothing here for this endpoint: skipping it is as durable as delivering it.
                cursor = skip or until
                await self.tables.set_cursor(eid, cursor)
                continue
            await self._deliver(batch)
            cursor = batch.through

    async def _names(self, records: list[ev.Record]) -> core.Names:
        wanted = core.deleted_names(records, self.service.state)
        if not wanted:
            return {}
        until = records[-1].seq
        kinds = ("NodeRegistered", "NodeRenamed", "UserCreated", "UserRenamed")
        named = [r async for r in self.service.store.read(Filter(types=kinds, until_seq=until))]
        return core.names_from(named, wanted)

    async def _post(self, url: str, body: bytes, headers: dict[str, str]) -> tuple[int | None, str]:
        if self.http is None:
            self.http = httpx.AsyncClient(timeout=httpx.Timeout(TIMEOUT), follow_redirects=False)
        try:
            resp = await self.http.post(url, content=body, headers=headers)
        except httpx.HTTPError as e:
            return None, f"{type(e).__name__}: {e}" if str(e) else type(e).__name__
        ok = 200 <= resp.status_code < 300
        return resp.status_code, "" if ok else f"HTTP {resp.status_code}"

    async def _deliver(self, batch: core.Batch) -> None:
        eid = batch.endpoint_id
        first, attempts = await self.tables.pending_since(eid, batch.first_seq)
        batch.first_attempt, batch.attempts = first, attempts  # a restart keeps the retry window
        while True:
            secret = await self.tables.secret(eid)
            url = self.service.state.webhooks[eid][0]
            now = self.clock()
            if secret is None:
                status, error = None, "no secret stored for this endpoint"
                batch.first_attempt = batch.first_attempt or now
                batch.attempts += 1
            else:
                body, headers = batch.request(secret, now)  # signed afresh, each attempt
                status, error = await self._post(url, body, headers)
            row = (eid, batch.first_seq, batch.through, len(batch.events), batch.attempts, now, status, error)
            if not error:
                await self.tables.attempt_and_cursor(*row, "delivered")
                self.on_attempt("delivered", len(batch.events))
                return
            delay = batch.failed(self.clock(), self.rand(), self.max_age, self.retry_base, self.retry_cap)
            if delay is None:
                log.warning("webhook %s: events %d-%d undeliverable after %d attempts (%s); moving on",
                            eid, batch.first_seq, batch.through, batch.attempts, error)
                await self.tables.attempt_and_cursor(*row, "undeliverable")
                self.on_attempt("undeliverable", len(batch.events))
                return
            await self.tables.attempt(*row, "failed")
            self.on_attempt("failed", len(batch.events))
            await self.sleep(delay)
