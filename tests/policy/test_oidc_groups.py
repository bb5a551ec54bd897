"""Members of policy groups from the identity provider: the policy declares the group, the IdP adds members."""

from __future__ import annotations

from coord.policy import PolicyEngine, PolicyNode, parse, run_tests, tailnet_state

POLICY = """{
  "groups": {"group:admins": [], "group:ops": ["olga@example.com"]},
  "acls": [{"action": "accept", "src": ["group:admins"], "dst": ["tag:server:22"]}],
  "tagOwners": {"tag:server": []},
  "tests": [{"src": "alice@example.com", "accept": ["tag:server:22"]}]
}"""
SERVER = PolicyNode(1, None, frozenset({"tag:server"}), ("100.64.0.1",))
ALICE = PolicyNode(2, "alice@example.com", frozenset(), ("100.64.0.2",))
BOB = PolicyNode(3, "bob@example.com", frozenset(), ("100.64.0.3",))


def src_ips(eng: PolicyEngine) -> set[str]:
    return {ip for rule in eng.filter(1) for ip in rule["SrcIPs"]}


def test_oidc_idp_groups_fill_declared_groups() -> None:
    eng = PolicyEngine(parse(POLICY), [SERVER, ALICE, BOB], idp_groups={"alice@example.com": ["group:admins"]})
    assert src_ips(eng) == {"100.64.0.2/32"}
    assert eng.peers(2) == {1} and eng.peers(3) == frozenset()


def test_oidc_idp_groups_change_reaches_the_filter_incrementally() -> None:
    policy = parse(POLICY)
    eng = PolicyEngine(policy, [SERVER, ALICE, BOB])
    assert src_ips(eng) == set()
    assert eng.set_idp_groups("alice@example.com", ["group:admins"]) == {1, 2}
    assert src_ips(eng) == {"100.64.0.2/32"}
    assert eng.set_idp_groups("alice@example.com", ["group:admins"]) == set()  # no change, nothing to send
    assert eng.set_idp_groups("alice@example.com", []) == {1, 2}
    assert src_ips(eng) == set()
    # the incremental result equals a fresh compile
    eng.set_idp_groups("bob@example.com", ["group:admins"])
    fresh = PolicyEngine(policy, [SERVER, ALICE, BOB], idp_groups={"bob@example.com": ["group:admins"]})
    for i in (1, 2, 3):
        assert eng.filter(i) == fresh.filter(i) and eng.peers(i) == fresh.peers(i)


def test_oidc_idp_groups_never_create_groups() -> None:
    # group:root is not in the policy: an IdP that names it gives nothing
    eng = PolicyEngine(parse(POLICY), [SERVER, ALICE], idp_groups={"alice@example.com": ["group:root"]})
    assert src_ips(eng) == set()
    assert eng.user_groups.get("alice@example.com") is None


def test_oidc_idp_groups_add_to_policy_members() -> None:
    eng = PolicyEngine(parse(POLICY), [], idp_groups={"olga@example.com": ["group:admins"]})
    assert eng.user_groups["olga@example.com"] == {"group:admins", "group:ops"}


def test_oidc_policy_tests_see_idp_groups_in_the_live_tailnet() -> None:
    policy = parse(POLICY)
    without = run_tests(policy, tailnet_state([SERVER, ALICE]))
    assert not without["ok"] and without["failed"][0]["src"] == "alice@example.com"
    with_groups = run_tests(policy, tailnet_state([SERVER, ALICE], idp_groups={"alice@example.com": ["group:admins"]}))
    assert with_groups["ok"], with_groups
