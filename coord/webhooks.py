"""Webhooks, the sans-IO core: which events an endpoint gets, the body and signature, and the retry schedule.

The shell (coord/delivery.py) reads committed events from the store by seq, asks this module what to send and
when, and posts it with httpx. Nothing here reads a clock: ``now`` (UNIX seconds) is passed in.

Wire format (Tailscale's webhooks)::

    POST <endpoint url>
    Content-Type: application/json
    Tailscale-Webhook-Signature: t=<unix seconds>,v1=<hex HMAC-SHA256(secret, "<t>.<body>")>

    [{"timestamp": "2026-11-25T12:00:00.000001Z", "version": 1, "type": "nodeCreated",
      "tailnet": "<base domain>", "message": "Node laptop created", "data": {..., "seq": 42}}, ...]

The body is a JSON array of one or more events, oldest first. ``data.seq`` is the event's place in the log (a
Shoal addition): delivery is at least once, so a receiver dedupes by it. Each attempt, retries included, is
signed afresh with the time of that attempt; receivers reject a ``t`` older than 5 minutes (``verify``).

Delivery (per endpoint, in log order): a batch is the next run of events the endpoint subscribes to. It is
retried after ``retry_delay`` (exponential, capped) until ``max_age`` (24 h) after its first attempt; then it is
recorded undeliverable and the endpoint's cursor moves past it. The cursor moves only after a 2xx or a give-up.
"""

from __future__ import annotations

import hashlib
import hmac
import json
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any
from urllib.parse import urlsplit

from coord import events as ev
from coord.errors import DomainError, NotFound
from coord.state import State

VERSION = 1
SIGNATURE_HEADER = "Tailscale-Webhook-Signature"
MAX_SKEW = 300.0  # receivers reject a signature older than 5 minutes
MAX_AGE = 24 * 3600.0  # retry window of a batch, from its first attempt
RETRY_BASE = 1.0
RETRY_CAP = 3600.0
MAX_BATCH = 20

# Tailscale's event types (its API's webhook subscriptions) that Shoal has events for, and those events (see
# ``types_of``). Not yet: nodeNeedsApproval (a pending registration is held in memory, coord/logins.py, and
# logged only once approved), nodeSigned, nodeNeedsSignature, userNeedsApproval, userSuspended, userRestored,
# userApproved, subnetIPForwardingNotEnabled, exitNodeIPForwardingNotEnabled (no such events in Shoal).
TYPES: dict[str, str] = {
    "nodeCreated": "NodeRegistered",
    "nodeApproved": "NodeRegistered/NodeReauthenticated by an admin (a pending registration approved)",
    "nodeDeleted": "NodeDeleted",
    "nodeKeyExpired": "NodeExpired",
    "nodeKeyExpiringInOneDay": "NodeKeyExpiringSoon",
    "policyUpdate": "PolicySet",
    "userCreated": "UserCreated",
    "userDeleted": "UserDeleted",
    "userRoleUpdated": "UserRoleSet",
}
TEST_TYPE = "test"


def types_of(r: ev.Record) -> list[str]:
    """The Tailscale types an event is (most are one, or none)."""
    e = r.event
    match e:
        case ev.NodeRegistered():
            return ["nodeCreated", "nodeApproved"] if r.actor == "admin" else ["nodeCreated"]
        case ev.NodeReauthenticated():
            return ["nodeApproved"] if r.actor == "admin" else []
        case ev.NodeDeleted():
            return ["nodeDeleted"]
        case ev.NodeExpired():
            return ["nodeKeyExpired"]
        case ev.NodeKeyExpiringSoon():
            return ["nodeKeyExpiringInOneDay"]
        case ev.PolicySet():
            return ["policyUpdate"]
        case ev.UserCreated():
            return ["userCreated"]
        case ev.UserDeleted():
            return ["userDeleted"]
        case ev.UserRoleSet():
            return ["userRoleUpdated"]
    return []


# Names of deleted nodes and users, which the state no longer knows: ("node" | "user", id) -> name. The shell finds
# them in the log (``deleted_names``, ``names_from``).
Names = dict[tuple[str, int], str]


def deleted_names(records: Sequence[ev.Record], state: State) -> set[tuple[str, int]]:
    """The (kind, id) whose names rendering these records needs from the log."""
    out: set[tuple[str, int]] = set()
    for r in records:
        if isinstance(r.event, ev.NodeDeleted) and r.event.node_id not in state.nodes:
            out.add(("node", r.event.node_id))
        if isinstance(r.event, ev.UserDeleted | ev.UserRoleSet) and r.event.user_id not in state.users:
            out.add(("user", r.event.user_id))
    return out


def names_from(records: Sequence[ev.Record], wanted: set[tuple[str, int]]) -> Names:
    """The last name each wanted node or user had in these records (the log before their deletion)."""
    out: Names = {}
    for r in records:
        e = r.event
        if isinstance(e, ev.NodeRegistered | ev.NodeRenamed) and ("node", e.node_id) in wanted:
            out["node", e.node_id] = e.given_name
        if isinstance(e, ev.UserCreated | ev.UserRenamed) and ("user", e.user_id) in wanted:
            out["user", e.user_id] = e.name
    return out


def message(kind: str, r: ev.Record, state: State, names: Names | None = None) -> tuple[str, dict[str, Any]]:
    """The message and data of one Tailscale event. Names the event does not carry come from ``state``, or for
    deleted nodes and users from ``names``; ``data`` never holds a secret (events hold none)."""
    e = r.event
    known = names or {}
    data: dict[str, Any] = {"actor": r.actor, "seq": r.seq}
    nid = getattr(e, "node_id", None)
    if isinstance(nid, int):
        n = state.nodes.get(nid)
        name = e.given_name if isinstance(e, ev.NodeRegistered) else (
            n.given_name if n is not None else known.get(("node", nid), ""))
        data |= {"nodeID": str(nid), "deviceName": name}
    if isinstance(e, ev.UserCreated | ev.UserDeleted | ev.UserRoleSet):
        u = state.users.get(e.user_id)
        uname = e.name if isinstance(e, ev.UserCreated) else (u.name if u else known.get(("user", e.user_id), ""))
        data |= {"userID": str(e.user_id), "user": uname}
    what = {
        "nodeCreated": "Node {n} created", "nodeApproved": "Node {n} approved", "nodeDeleted": "Node {n} deleted",
        "nodeKeyExpired": "Node {n} key expired", "nodeKeyExpiringInOneDay": "Node {n} key is expiring in one day",
        "policyUpdate": "Tailnet policy file updated", "userCreated": "User {u} created",
        "userDeleted": "User {u} deleted", "userRoleUpdated": "User {u} role updated to {r}",
    }[kind]
    if isinstance(e, ev.UserRoleSet):
        data["newRoles"] = [e.role]
    if isinstance(e, ev.NodeKeyExpiringSoon | ev.NodeExpired):
        data["expiry"] = ev.rfc3339(e.key_expiry if isinstance(e, ev.NodeKeyExpiringSoon) else e.at)
    if isinstance(e, ev.PolicySet):
        data["sha256"] = e.sha256
    text = what.format(n=data.get("deviceName") or data.get("nodeID", ""), u=data.get("user", ""),
                       r=getattr(e, "role", ""))
    return text, data


def render(records: Sequence[ev.Record], subscribed: Sequence[str], tailnet: str,
           state: State, names: Names | None = None) -> list[dict[str, Any]]:
    """The body's events for these records, for an endpoint subscribed to ``subscribed``."""
    out = []
    for r in records:
        for kind in types_of(r):
            if kind in subscribed:
                text, data = message(kind, r, state, names)
                out.append({"timestamp": r.time, "version": VERSION, "type": kind, "tailnet": tailnet,
                            "message": text, "data": data})
    return out


def sample_event(tailnet: str, now: float) -> dict[str, Any]:
    return {"timestamp": ev.rfc3339(now), "version": VERSION, "type": TEST_TYPE, "tailnet": tailnet,
            "message": "This is a test event", "data": {}}


def body_bytes(events: list[dict[str, Any]]) -> bytes:
    return json.dumps(events, separators=(",", ":"), ensure_ascii=False).encode()


def signature(secret: str, t: int, body: bytes) -> str:
    """The header value: ``t=<t>,v1=<hex HMAC-SHA256(secret, "<t>.<body>")>``."""
    mac = hmac.new(secret.encode(), f"{t}.".encode() + body, hashlib.sha256).hexdigest()
    return f"t={t},v1={mac}"


class BadSignature(ValueError):
    pass


def verify(secret: str, header: str, body: bytes, now: float, max_skew: float = MAX_SKEW) -> int:
    """What a receiver checks: the header parses, its ``t`` is at most ``max_skew`` old (and not in the future by
    more), and a ``v1`` matches. Returns ``t``; BadSignature says which check failed."""
    parts: dict[str, list[str]] = {}
    for item in header.split(","):
        k, sep, v = item.strip().partition("=")
        if not sep:
            raise BadSignature(f"signature header: {item!r} is not key=value")
        parts.setdefault(k, []).append(v)
    try:
        (t_text,) = parts["t"]
        if not (t_text.isascii() and t_text.isdigit() and len(t_text) <= 12):
            raise ValueError(t_text)
        t = int(t_text)
    except (KeyError, ValueError):
        raise BadSignature("signature header: needs exactly one t=<unix seconds>") from None
    if now - t > max_skew:
        raise BadSignature(f"signature too old: t={t} is {now - t:.0f}s before now (limit {max_skew:.0f}s)")
    if t - now > max_skew:
        raise BadSignature(f"signature from the future: t={t} is {t - now:.0f}s after now")
    want = signature(secret, t, body).partition(",v1=")[2]
    if not any(hmac.compare_digest(want, v) for v in parts.get("v1", [])):
        raise BadSignature("signature does not match the body")
    return t


# --- endpoints --------------------------------------------------------------------------------------------


def check_url(url: str) -> str:
    u = urlsplit(url)
    if u.scheme not in ("http", "https") or not u.hostname:
        raise DomainError(f"url: {url!r} is not an http:// or https:// URL")
    return url


def check_types(types: Sequence[str]) -> tuple[str, ...]:
    if not types:
        return tuple(TYPES)
    bad = [t for t in types if t not in TYPES]
    if bad:
        raise DomainError(f"events: unknown type(s) {', '.join(bad)}; known: {', '.join(TYPES)}")
    return tuple(dict.fromkeys(types))


def find_endpoint(state: State, ref: str) -> str:
    if ref in state.webhooks:
        return ref
    raise NotFound(f"no webhook endpoint {ref!r}")


def add_endpoint(state: State, endpoint_id: str, url: str, types: Sequence[str]) -> list[ev.Event]:
    if endpoint_id in state.webhooks:
        raise DomainError(f"webhook endpoint {endpoint_id} exists")
    return [ev.WebhookEndpointAdded(endpoint_id, check_url(url), check_types(types))]


def remove_endpoint(state: State, ref: str) -> list[ev.Event]:
    return [ev.WebhookEndpointRemoved(find_endpoint(state, ref))]


def update_endpoint(state: State, ref: str, types: Sequence[str]) -> list[ev.Event]:
    """New subscriptions for an endpoint (at least one: an empty list is refused, not read as "all")."""
    eid = find_endpoint(state, ref)
    if not types:
        raise DomainError("subscriptions: at least one event type")
    checked = check_types(types)
    return [] if checked == state.webhooks[eid][1] else [ev.WebhookEndpointUpdated(eid, checked)]


# --- the retry schedule -----------------------------------------------------------------------------------


def retry_delay(attempts: int, u: float = 0.5, base: float = RETRY_BASE, cap: float = RETRY_CAP) -> float:
    """Seconds to wait after the ``attempts``-th failed attempt (>= 1): base * 2^(attempts-1), capped, with +-20%
    jitter from the uniform draw ``u`` in [0, 1) (0.5: none)."""
    raw = min(cap, base * 2.0 ** min(attempts - 1, 62))
    return raw * (1.0 + 0.2 * (2.0 * u - 1.0))


@dataclass
class Batch:
    """The events in flight to one endpoint: ``through`` is the seq the cursor moves to once they are done (the
    last event in the batch; events between that the endpoint does not subscribe to are done with it)."""

    endpoint_id: str
    events: list[dict[str, Any]]
    first_seq: int
    through: int
    first_attempt: float | None = None
    attempts: int = 0

    def body(self) -> bytes:
        return body_bytes(self.events)

    def request(self, secret: str, now: float) -> tuple[bytes, dict[str, str]]:
        """The body and headers of the next attempt, signed at ``now``."""
        if self.first_attempt is None:
            self.first_attempt = now
        self.attempts += 1
        body = self.body()
        return body, {"Content-Type": "application/json", SIGNATURE_HEADER: signature(secret, int(now), body)}

    def failed(self, now: float, u: float = 0.5, max_age: float = MAX_AGE, base: float = RETRY_BASE,
               cap: float = RETRY_CAP) -> float | None:
        """After a failed attempt: seconds until the next, or None when the window is over (give up)."""
        assert self.first_attempt is not None
        delay = retry_delay(self.attempts, u, base, cap)
        if now + delay - self.first_attempt > max_age:
            # One last attempt at the end of the window, unless this one was it.
            left = self.first_attempt + max_age - now
            return left if left > 0.5 else None
        return delay


def next_batch(endpoint_id: str, records: Sequence[ev.Record], subscribed: Sequence[str], tailnet: str,
               state: State, names: Names | None = None, max_batch: int = MAX_BATCH) -> tuple[Batch | None, int]:
    """From records after the cursor (in seq order): the next batch to send, or (None, seq the cursor may skip
    to) when none of them is for this endpoint."""
    events: list[dict[str, Any]] = []
    first = through = 0
    for r in records:
        got = render([r], subscribed, tailnet, state, names)
        if not got:
            continue
        if events and len(events) + len(got) > max_batch:
            break
        events += got
        first = first or r.seq
        through = r.seq
    if not events:
        return None, records[-1].seq if records else 0
    return Batch(endpoint_id, events, first, through), through
