"""The ssh rule compiler (coord/policy/ssh.py): what each destination node is sent, and sshTests."""

from __future__ import annotations

import pytest

from coord.policy import PolicyEngine, PolicyError, PolicyNode, check, parse, render_check

POLICY = """{
  "groups": {"group:ops": ["alice@example.com"]},
  "tagOwners": {"tag:server": ["alice@example.com"], "tag:ci": ["alice@example.com"]},
  "acls": [{"action": "accept", "src": ["*"], "dst": ["*:*"]}],
  "ssh": [
    {"action": "accept", "src": ["group:ops"], "dst": ["tag:server"], "users": ["autogroup:nonroot", "deploy"]},
    {"action": "accept", "src": ["autogroup:member"], "dst": ["tag:server"], "users": ["localpart:*@example.com"]},
    {"action": "check", "src": ["tag:ci", "bob@example.com"], "dst": ["tag:server"], "users": ["root"]},
    {"action": "accept", "src": ["autogroup:member"], "dst": ["autogroup:self"], "users": ["autogroup:nonroot"]}
  ],
  "sshTests": [
    {"src": "alice@example.com", "dst": ["tag:server"], "accept": ["alice", "deploy", "autogroup:nonroot"],
     "deny": ["root"]},
    {"src": "bob@example.com", "dst": ["tag:server"], "accept": ["bob"], "check": ["root"], "deny": ["alice"]},
    {"src": "tag:ci", "dst": ["tag:server"], "deny": ["root", "ci"]},
    {"src": "root@example.com", "dst": ["tag:server"], "deny": ["root"]}
  ]
}"""

NODES = [
    PolicyNode(1, None, frozenset({"tag:server"}), ("100.64.0.1", "fd7a:115c:a1e0::1")),
    PolicyNode(2, "alice@example.com", frozenset(), ("100.64.0.2", "fd7a:115c:a1e0::2")),
    PolicyNode(3, "bob@example.com", frozenset(), ("100.64.0.3",)),
    PolicyNode(4, None, frozenset({"tag:ci"}), ("100.64.0.4",)),
    PolicyNode(5, "root@example.com", frozenset(), ("100.64.0.5",)),
    PolicyNode(6, "bob@example.com", frozenset(), ("100.64.0.6",)),
]


def _principal(n: PolicyNode) -> dict[str, object]:
    return {"Node": n.id, "User": n.user, "Tags": sorted(n.tags), "IPs": list(n.addresses)}


def test_ssh_compile_rules_for_a_tagged_server() -> None:
    eng = PolicyEngine(parse(POLICY), NODES)
    a, b, ci, root, b2 = (NODES[i] for i in (1, 2, 3, 4, 5))
    assert eng.ssh_policy(1) == {"Rules": [
        {"Principals": [_principal(a)], "SSHUsers": {"*": "=", "root": "", "deploy": "deploy"},
         "Action": "accept", "CheckPeriod": None, "Origin": 0},
        # localpart: one rule per principal; root@example.com does not become root
        {"Principals": [_principal(a)], "SSHUsers": {"alice": "alice"}, "Action": "accept", "CheckPeriod": None,
         "Origin": 1},
        {"Principals": [_principal(b)], "SSHUsers": {"bob": "bob"}, "Action": "accept", "CheckPeriod": None,
         "Origin": 1},
        {"Principals": [_principal(b2)], "SSHUsers": {"bob": "bob"}, "Action": "accept", "CheckPeriod": None,
         "Origin": 1},
        # check: the tagged ci node is left out (no user to sign in again)
        {"Principals": [_principal(b), _principal(b2)], "SSHUsers": {"root": "root"}, "Action": "check",
         "CheckPeriod": None, "Origin": 2},
    ]}
    assert ci and root  # named for the reader: neither appears above


def test_ssh_compile_autogroup_self_keeps_the_owner_only() -> None:
    eng = PolicyEngine(parse(POLICY), NODES)
    assert eng.ssh_policy(3) == {"Rules": [
        {"Principals": [_principal(NODES[5])], "SSHUsers": {"*": "=", "root": ""}, "Action": "accept",
         "CheckPeriod": None, "Origin": 3},
    ]}
    assert eng.ssh_policy(4) is None  # tagged ci: nothing names it as a destination


def test_ssh_compile_follows_node_changes() -> None:
    eng = PolicyEngine(parse(POLICY), NODES[:1])
    assert eng.ssh_policy(1) is None
    eng.upsert(NODES[1])
    rules = eng.ssh_policy(1)
    assert rules is not None and [r["Origin"] for r in rules["Rules"]] == [0, 1]
    eng.remove(2)
    assert eng.ssh_policy(1) is None


def test_ssh_tests_are_run_by_policy_check() -> None:
    # given state (here: nobody shared in, no outsiders), bob is a member and autogroup:member's rule applies
    r = check(POLICY, {"users": {}, "nodes": []})
    assert r["errors"] == [] and r["ssh_failed"] == [] and r["ssh_skipped"] == []
    assert (r["ssh_tests"], r["ssh_assertions"], r["ssh_passed"], r["ok"]) == (4, 10, 10, True)


def test_ssh_tests_without_tailnet_skip_what_hinges_on_membership() -> None:
    r = check(POLICY)  # bob gets "bob" only through autogroup:member: whether he is one is not known
    assert r["ssh_skipped"] == [{"ssh_test": 1, "src": "bob@example.com", "dst": ["tag:server"], "user": "bob",
                                 "expected": "accept",
                                 "reason": "whether bob@example.com is a member of the tailnet is not known"}]
    assert (r["ssh_passed"], r["ssh_failed"], r["ok"]) == (9, [], True)


def test_ssh_tests_failures_say_what_the_rules_gave() -> None:
    bad = POLICY.replace('"deny": ["root", "ci"]', '"check": ["root"]')
    r = check(bad)
    assert not r["ok"]
    assert r["ssh_failed"] == [{"ssh_test": 2, "src": "tag:ci", "dst": ["tag:server"], "user": "root",
                                "expected": "check", "got": "deny"}]


@pytest.mark.parametrize("user, msg", [
    ("-oProxyCommand", "is not a valid local user name"),
    ("a b", "is not a valid local user name"),
    ("localpart:alice@example.com", r"expected .localpart:\*@domain."),
    ("autogroup:self", "can only be"),
])
def test_ssh_local_user_names_are_validated(user: str, msg: str) -> None:
    text = POLICY.replace('"users": ["root"]', f'"users": ["{user}"]')
    with pytest.raises(PolicyError, match=msg):
        parse(text)


def test_nodeattr_listed_by_policy_check_as_not_applied() -> None:
    attrs = '"nodeAttrs": [{"target": ["*"], "attr": ["funnel", "nextdns:abc?priority=1", "x-custom"]}],'
    text = POLICY.replace('"sshTests": [', attrs + '\n  "sshTests": [')
    r = check(text)
    assert r["ok"] and r["node_attrs"] == [
        {"node_attr": 0, "attr": "funnel", "applied": False, "reason": "Shoal has no Funnel (public ingress)"},
        {"node_attr": 0, "attr": "nextdns:abc?priority=1", "applied": False,
         "reason": "Shoal's MagicDNS has no NextDNS resolver"},
        {"node_attr": 0, "attr": "x-custom", "applied": False, "reason": "not known to Shoal"},
    ]
    assert "note nodeAttrs[0]: x-custom not applied: not known to Shoal" in render_check(r)
