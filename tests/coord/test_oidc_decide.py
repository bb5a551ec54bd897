"""Sign-in on the state (pure): users by issuer+subject, names, claims events, groups reaching the policy engine."""

from __future__ import annotations

import dataclasses

import pytest

from coord import access, decide, policy
from coord import events as ev
from coord.auth.claims import Identity, Profile, Refused
from coord.ipam import Pool
from coord.state import State, apply
from coord.wire import Hostinfo, RegisterRequest

ISS = "https://idp.example.com"
RULES = decide.Rules(Pool.parse("100.64.0.0/10", "fd7a:115c:a1e0::/48"), 86400.0)
ALICE = Profile(Identity(ISS, "sub-alice"), "alice@example.com", "alice@example.com", True, "Alice",
                ("shoal-admins",), ("group:admins",), None)


def req(n: int, hostname: str = "laptop") -> RegisterRequest:
    return RegisterRequest(node_key=bytes([n]) * 32, hostinfo=Hostinfo(hostname=hostname),
                           disco_key=bytes([n + 100]) * 32)


def run(state: State, events: list[ev.Event], t: float = 1000.0) -> None:
    for e in events:
        apply(state, e, t)


def test_oidc_first_sign_in_creates_user_and_registers() -> None:
    s = State()
    events = decide.approve_sign_in(s, b"\x01" * 32, req(1), ALICE, RULES, 1000.0)
    assert [e.type for e in events] == ["UserCreated", "UserClaimsUpdated", "NodeRegistered", "UserSignedIn"]
    run(s, events)
    (u,) = s.users.values()
    assert (u.name, u.issuer, u.subject, u.groups, u.email_verified) == (
        "alice@example.com", ISS, "sub-alice", ("group:admins",), True)
    assert s.by_identity[(ISS, "sub-alice")] == u.id and u.last_sign_in == 1000.0
    (n,) = s.nodes.values()
    assert n.user_id == u.id


def test_oidc_same_identity_again_writes_only_what_changed() -> None:
    s = State()
    run(s, decide.approve_sign_in(s, b"\x01" * 32, req(1), ALICE, RULES, 1000.0))
    again = decide.approve_sign_in(s, b"\x02" * 32, req(2, "desktop"), ALICE, RULES, 1001.0)
    assert [e.type for e in again] == ["NodeRegistered", "UserSignedIn"]
    fewer = dataclasses.replace(ALICE, groups=(), idp_groups=())
    changed = decide.approve_sign_in(s, b"\x02" * 32, req(2, "desktop"), fewer, RULES, 1001.0)
    assert [e.type for e in changed] == ["UserClaimsUpdated", "NodeRegistered", "UserSignedIn"]


def test_oidc_users_are_stable_by_issuer_and_subject() -> None:
    s = State()
    run(s, decide.approve_sign_in(s, b"\x01" * 32, req(1), ALICE, RULES, 1000.0))
    # Someone else (another subject, or another IdP) whose claims derive the same name is refused.
    for ident in (Identity(ISS, "sub-mallory"), Identity("https://other.example", "sub-alice")):
        with pytest.raises(Refused) as e:
            decide.approve_sign_in(s, b"\x03" * 32, req(3), dataclasses.replace(ALICE, identity=ident), RULES, 1.0)
        assert e.value.code == "name_taken"
    # An admin-made user of that name is not taken over either.
    s2 = State()
    run(s2, decide.create_user(s2, "alice@example.com"))
    with pytest.raises(Refused):
        decide.sign_in_user(s2, ALICE)
    # The same identity with a new e-mail keeps its user and is renamed.
    moved = dataclasses.replace(ALICE, name="alice@new.example", email="alice@new.example")
    events = decide.approve_sign_in(s, b"\x01" * 32, req(1), moved, RULES, 1002.0)
    assert [e.type for e in events][:2] == ["UserRenamed", "UserClaimsUpdated"]
    run(s, events)
    assert len(s.users) == 1 and next(iter(s.users.values())).name == "alice@new.example"


def test_oidc_expiry_from_token() -> None:
    s = State()
    p = dataclasses.replace(ALICE, expiry=5000.0)
    events = decide.approve_sign_in(s, b"\x01" * 32, req(1), p, RULES, 1000.0)
    assert ev.NodeKeyExpirySet(1, 5000.0) in events
    run(s, events)
    assert s.nodes[1].key_expiry == 5000.0


POLICY = """{"groups": {"group:admins": []},
 "acls": [{"action": "accept", "src": ["group:admins"], "dst": ["group:admins:*"]}]}"""


def test_oidc_group_changes_reach_the_policy_engine_through_the_log() -> None:
    s = State()
    run(s, decide.approve_sign_in(s, b"\x01" * 32, req(1), ALICE, RULES, 1000.0))
    bob = Profile(Identity(ISS, "sub-bob"), "bob@example.com", "bob@example.com", True, "", (), (), None)
    run(s, decide.approve_sign_in(s, b"\x02" * 32, req(2), bob, RULES, 1000.0))
    second = dataclasses.replace(ALICE)
    run(s, decide.approve_sign_in(s, b"\x03" * 32, req(3, "desktop"), second, RULES, 1000.0))
    vis = access.PolicyVisibility(s, policy.parse(POLICY))
    assert set(vis.peers(1)) == {3} and set(vis.peers(2)) == set()
    # alice loses the group at the IdP and signs in again on a fourth machine
    gone = dataclasses.replace(ALICE, groups=(), idp_groups=())
    events = decide.approve_sign_in(s, b"\x04" * 32, req(4, "tablet"), gone, RULES, 1001.0)
    seq0 = s.last_seq
    records = [ev.seal_record(s.last_hash, seq0 + i + 1, ev.rfc3339(1001.0), "machine:x", e)
               for i, e in enumerate(events)]
    run(s, events, 1001.0)
    change = vis.observe(records)
    assert {1, 3} <= change.visibility
    assert set(vis.peers(1)) == set() and set(vis.peers(3)) == set()
    assert access.tailnet(s)["users"] == {}
    fresh = access.PolicyVisibility(s, policy.parse(POLICY))
    for nid in s.nodes:
        assert set(fresh.peers(nid)) == set(vis.peers(nid)) and fresh.filter(nid) == vis.filter(nid)


def test_oidc_refused_sign_in_folds_to_no_change() -> None:
    s = State()
    before = dataclasses.asdict(s)
    change = apply(s, ev.SignInRefused(ISS, "sub-x", "domain_not_allowed"), 1.0)
    assert dataclasses.asdict(s) == before
    assert not (change.peers or change.removed or change.visibility or change.policy)


def test_oidc_policy_check_reports_tests_a_membership_change_made_false() -> None:
    text = """{"groups": {"group:admins": []},
     "acls": [{"action": "accept", "src": ["group:admins"], "dst": ["group:admins:*"]}],
     "tests": [{"src": "alice@example.com", "accept": ["100.64.0.1:22"]}]}"""
    s = State()
    run(s, decide.approve_sign_in(s, b"\x01" * 32, req(1), ALICE, RULES, 1000.0))
    assert s.nodes[1].ipv4 == "100.64.0.1"
    assert policy.check(text, access.tailnet(s))["ok"]
    gone = dataclasses.replace(ALICE, groups=(), idp_groups=())
    run(s, decide.approve_sign_in(s, b"\x02" * 32, req(2, "desktop"), gone, RULES, 1001.0))
    result = policy.check(text, access.tailnet(s))
    assert not result["ok"] and result["failed"][0]["src"] == "alice@example.com"
