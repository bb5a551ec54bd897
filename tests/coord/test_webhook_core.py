"""The sans-IO webhook core: Tailscale's body and signature, the event mapping, the 24-hour retry window, and the
NodeKeyExpiringSoon decision. Time is passed in; nothing here waits."""

from __future__ import annotations

import hashlib
import hmac
import json

import pytest
from hypothesis import given
from hypothesis import strategies as st

from coord import decide
from coord import events as ev
from coord import webhooks as core
from coord.errors import DomainError
from coord.state import State, fold

NOW = 1_800_000_000.0


def records(*events: tuple[str, ev.Event]) -> list[ev.Record]:
    out, prev = [], ev.GENESIS
    for i, (actor, e) in enumerate(events, 1):
        r = ev.seal_record(prev, i, ev.rfc3339(NOW + i), actor, e)
        out.append(r)
        prev = r.hash
    return out


def test_webhook_signature_is_hmac_of_t_dot_body_and_old_t_is_rejected() -> None:
    body = b'[{"type":"test"}]'
    header = core.signature("s3cret", int(NOW), body)
    want = hmac.new(b"s3cret", f"{int(NOW)}.".encode() + body, hashlib.sha256).hexdigest()
    assert header == f"t={int(NOW)},v1={want}"
    assert core.verify("s3cret", header, body, NOW + 299) == int(NOW)
    with pytest.raises(core.BadSignature, match="too old"):
        core.verify("s3cret", header, body, NOW + 301)
    with pytest.raises(core.BadSignature, match="does not match"):
        core.verify("s3cret", header, body + b" ", NOW)
    with pytest.raises(core.BadSignature, match="does not match"):
        core.verify("other", header, body, NOW)
    for bad in ("v1=00", "t=1,t=2,v1=00", "t=" + "9" * 400 + ",v1=00", "t=-5,v1=00"):
        with pytest.raises(core.BadSignature, match="exactly one t"):
            core.verify("s3cret", bad, body, NOW)


def test_webhook_body_is_tailscales_array_with_seq() -> None:
    rs = records(
        ("admin", ev.UserCreated(1, "alice")),
        ("admin", ev.NodeRegistered(1, "mkey:a", "nodekey:a", "discokey:a", 1, (), "laptop", "laptop",
                                    "100.64.0.1", "fd7a::1", False, None, None)),
        ("system", ev.NodeConnected(1)),
        ("system", ev.NodeKeyExpiringSoon(1, NOW + 3600)),
        ("admin", ev.PolicySet("{}", "ab" * 32)),
    )
    st = fold(rs)
    out = core.render(rs, tuple(core.TYPES), "example.ts.net", st)
    assert [e["type"] for e in out] == ["userCreated", "nodeCreated", "nodeApproved", "nodeKeyExpiringInOneDay",
                                        "policyUpdate"]
    for e in out:
        assert set(e) == {"timestamp", "version", "type", "tailnet", "message", "data"}
        assert e["version"] == 1 and e["tailnet"] == "example.ts.net"
    assert out[1]["message"] == "Node laptop created"
    assert out[1]["data"] == {"actor": "admin", "seq": 2, "nodeID": "1", "deviceName": "laptop"}
    assert out[0]["timestamp"] == rs[0].time
    # Subscribed to one type: only it; the batch's cursor target is its last event.
    batch, through = core.next_batch("ep", rs, ("policyUpdate",), "t", st)
    assert batch is not None and through == 5 and batch.first_seq == 5
    assert [e["type"] for e in json.loads(batch.body())] == ["policyUpdate"]
    none, skip = core.next_batch("ep", rs[:3], ("policyUpdate",), "t", st)
    assert none is None and skip == 3


def test_webhook_batches_are_capped_and_in_order() -> None:
    rs = records(*[("admin", ev.UserCreated(i, f"u{i}")) for i in range(1, 8)])
    batch, through = core.next_batch("ep", rs, ("userCreated",), "t", fold(rs), max_batch=3)
    assert batch is not None and (batch.first_seq, through) == (1, 3)
    assert [e["data"]["seq"] for e in batch.events] == [1, 2, 3]


def test_webhook_retries_re_sign_and_give_up_after_24_hours() -> None:
    batch = core.Batch("ep", [core.sample_event("t", NOW)], 1, 1)
    now, sigs, delays = NOW, [], []
    while True:
        body, headers = batch.request("s", now)
        sigs.append(headers[core.SIGNATURE_HEADER])
        core.verify("s", headers[core.SIGNATURE_HEADER], body, now)
        delay = batch.failed(now)
        if delay is None:
            break
        delays.append(delay)
        now += delay
    assert len(set(sigs)) == len(sigs), "each attempt is signed afresh"
    assert delays[:5] == [1.0, 2.0, 4.0, 8.0, 16.0] and max(delays) == core.RETRY_CAP
    # The last attempt is at the end of the window, and there is none after it.
    assert now - NOW == pytest.approx(core.MAX_AGE)
    assert batch.attempts == len(sigs)


def test_webhook_endpoint_checks() -> None:
    st = State()
    (added,) = core.add_endpoint(st, "ab12", "https://hooks.example/x", ["nodeCreated"])
    assert added == ev.WebhookEndpointAdded("ab12", "https://hooks.example/x", ("nodeCreated",))
    with pytest.raises(DomainError, match="unknown type"):
        core.add_endpoint(st, "cd34", "https://hooks.example/x", ["nodeExploded"])
    with pytest.raises(DomainError, match="url"):
        core.add_endpoint(st, "cd34", "ftp://hooks.example/x", [])
    with pytest.raises(DomainError, match="no webhook endpoint"):
        core.remove_endpoint(st, "ab12")
    assert core.check_types([]) == tuple(core.TYPES)


def test_webhook_expiring_soon_is_one_event_per_expiry() -> None:
    reg = ev.NodeRegistered(1, "mkey:a", "nodekey:a", "discokey:a", 1, (), "h", "h", "100.64.0.1", "fd7a::1",
                            False, NOW + 2 * 86400, None)
    st = fold(records(("admin", ev.UserCreated(1, "alice")), ("admin", reg)))
    assert decide.expiring_soon(st, NOW) == []
    due = decide.expiring_soon(st, NOW + 86400 + 1)
    assert due == [ev.NodeKeyExpiringSoon(1, NOW + 2 * 86400)]
    fold(records(("admin", ev.UserCreated(1, "alice")), ("admin", reg), ("system", due[0])), st := State())
    assert decide.expiring_soon(st, NOW + 86400 + 2) == []
    # Past the expiry it is NodeExpired's turn, not a warning.
    assert decide.expiring_soon(st, NOW + 3 * 86400) == []


@given(st.text(max_size=200), st.binary(max_size=64))
def test_webhook_verify_refuses_any_header_precisely(header: str, body: bytes) -> None:
    try:
        core.verify("s", header, body, NOW)
    except core.BadSignature:
        return
    # Only a header carrying the right HMAC gets through, and that is not something random text finds.
    raise AssertionError(f"accepted {header!r}")
