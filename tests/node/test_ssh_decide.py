"""Shoal SSH decisions (node/ssh/decide.py) and the nft rules that bring port 22 to the listener."""

from __future__ import annotations

from coord import wire
from node.render import nft
from node.ssh.decide import decide

OWN = ("100.64.0.1/32", "fd7a:115c:a1e0::1/128")
ALICE = wire.SSHPrincipal(2, "alice@example.com", (), ("100.64.0.2", "fd7a:115c:a1e0::2"))
CI = wire.SSHPrincipal(4, None, ("tag:ci",), ("100.64.0.4",))
POLICY = wire.SSHPolicy.from_json({"Rules": [
    {"Principals": [ALICE.to_json()], "SSHUsers": {"*": "=", "root": ""}, "Action": "accept", "Origin": 0},
    {"Principals": [ALICE.to_json()], "SSHUsers": {"root": "root"}, "Action": "check", "CheckPeriod": "12h",
     "Origin": 1},
    {"Principals": [CI.to_json()], "SSHUsers": {"deploy": "git"}, "Action": "accept", "Origin": 2},
]})


def test_ssh_decide_maps_the_login_by_the_first_matching_rule() -> None:
    d = decide(POLICY, "100.64.0.2", "100.64.0.1", 22, "alice", OWN)
    assert (d.allowed, d.local_user, d.origin, d.principal) == (True, "alice", 0, ALICE)
    d = decide(POLICY, "fd7a:115c:a1e0::2", "fd7a:115c:a1e0::1", 22, "bob", OWN)
    assert (d.allowed, d.local_user) == (True, "bob")
    d = decide(POLICY, "100.64.0.4", "100.64.0.1", 22, "deploy", OWN)
    assert (d.allowed, d.local_user, d.principal) == (True, "git", CI)


def test_ssh_decide_refuses() -> None:
    cases = {
        # root: "" in rule 0, then a check rule, which this node cannot ask for
        ("100.64.0.2", "100.64.0.1", 22, "root"): "to sign in again (check)",
        ("100.64.0.4", "100.64.0.1", 22, "ci"): "no ssh rule lets 100.64.0.4 log in as ci",
        ("100.64.0.9", "100.64.0.1", 22, "alice"): "no ssh rule lets 100.64.0.9",
        ("100.64.0.1", "100.64.0.1", 22, "alice"): "this node's own address",
        ("fd7a:115c:a1e0::1", "fd7a:115c:a1e0::1", 22, "alice"): "this node's own address",
        ("100.64.0.2", "100.64.0.1", 41022, "alice"): "port 22",  # not through the redirect
        ("100.64.0.2", "192.0.2.10", 22, "alice"): "port 22",  # not a tailnet address of ours
        ("100.64.0.2", "100.64.0.1", 22, "-oProxyCommand=x"): "not a valid local user name",
    }
    for (src, dst, port, login), why in cases.items():
        d = decide(POLICY, src, dst, port, login, OWN)
        assert not d.allowed and why in d.reason, (src, login, d)
    assert not decide(None, "100.64.0.2", "100.64.0.1", 22, "alice", OWN).allowed


def test_ssh_policy_wire_refuses_bad_rules() -> None:
    for bad, where in (({"Rules": [{"Principals": [], "SSHUsers": {}, "Action": "drop"}]}, "Action"),
                       ({"Rules": [{"Principals": [{"Node": 1, "IPs": ["x"]}], "SSHUsers": {}, "Action": "accept"}]},
                        "IPs[0]"),
                       ({"Rules": [{"Principals": [], "SSHUsers": {"a": 1}, "Action": "accept"}]}, "SSHUsers")):
        try:
            wire.SSHPolicy.from_json(bad)
        except wire.WireError as e:
            assert where in str(e)
        else:
            raise AssertionError(f"accepted {bad}")
    assert wire.SSHPolicy.from_json(POLICY.to_json()) == POLICY


RULE_22 = [{"SrcIPs": ["100.64.0.2/32"], "DstPorts": [{"IP": "100.64.0.1/32", "Ports": {"First": 22, "Last": 22}}],
            "IPProto": [6]}]


def test_ssh_nft_redirects_tailnet_port_22_to_the_listener() -> None:
    script = nft.render(RULE_22, "tail0", OWN, ssh_port=41022)
    lines = [x.strip() for x in script.splitlines()]
    assert 'iifname "tail0" ip daddr 100.64.0.1 tcp dport 22 dnat ip to 100.64.0.1:41022' in lines
    assert 'iifname "tail0" ip6 daddr fd7a:115c:a1e0::1 tcp dport 22 dnat ip6 to [fd7a:115c:a1e0::1]:41022' in lines
    assert "type nat hook prerouting priority dstnat; policy accept;" in lines
    # the listener only through the redirect, and only from the tunnel
    assert 'iifname != "tail0" tcp dport 41022 counter name dropped drop' in lines
    assert "tcp dport 41022 ct original proto-dst != 22 counter name dropped drop" in lines
    # who may reach 22 may reach the listener; nobody else
    assert "ip saddr 100.64.0.2 ip daddr 100.64.0.1 tcp dport 22 ct state new accept" in lines
    assert "ip saddr 100.64.0.2 ip daddr 100.64.0.1 tcp dport 41022 ct state new accept" in lines
    no22 = nft.render([{**RULE_22[0], "DstPorts": [{"IP": "100.64.0.1/32", "Ports": {"First": 80, "Last": 80}}]}],
                      "tail0", OWN, ssh_port=41022)
    assert "tcp dport 41022 ct state new accept" not in no22
    # without --ssh nothing of it
    assert "41022" not in nft.render(RULE_22, "tail0", OWN) and "dnat" not in nft.render(RULE_22, "tail0", OWN)
