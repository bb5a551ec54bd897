"""Exit routes in netmaps follow the policy: a viewer gets an exit node's 0.0.0.0/0 and ::/0 only if a rule lets it
use the exit node (``autogroup:internet`` or ``*`` as a destination); with no policy, everyone does. Full maps and
deltas agree, including when a policy change grants or takes the exit node without the node itself changing."""

from __future__ import annotations

import json
from typing import Any

import pytest

from coord.state import EXIT_ROUTES
from tests.coord.test_subnet_router import Net

pytestmark = pytest.mark.anyio

BASE = """{"tagOwners": {"tag:exit": ["alice@example.com"]},
  "autoApprovers": {"exitNode": ["tag:exit"]},
  "acls": [%s]}"""
ALICE_INTERNET = '{"action": "accept", "src": ["alice@example.com"], "dst": ["autogroup:internet:*"]}'
BOB_TAG = '{"action": "accept", "src": ["bob@example.com"], "dst": ["tag:exit:22"]}'
BOB_INTERNET = '{"action": "accept", "src": ["bob@example.com"], "dst": ["autogroup:internet:443"]}'
BOB_ALL = '{"action": "accept", "src": ["bob@example.com"], "dst": ["*:*"]}'


async def exit_tailnet() -> tuple[Net, int, int, int]:
    net = Net()
    await net.user("alice@example.com")
    await net.user("bob@example.com")
    alice = await net.join("alice@example.com", "alice-laptop")
    bob = await net.join("bob@example.com", "bob-laptop")
    exit_ = await net.join("alice@example.com", "exit", EXIT_ROUTES, tags=("tag:exit",))
    for n in (alice, bob, exit_):
        await net.online(n)
    return net, alice, bob, exit_


def has_exit(rec: dict[str, Any]) -> bool:
    return all(r in rec["AllowedIPs"] for r in EXIT_ROUTES)


async def test_exit_node_routes_only_to_viewers_the_policy_allows() -> None:
    net, alice, bob, exit_ = await exit_tailnet()
    await net.svc.approve_routes("exit", EXIT_ROUTES)
    # no policy: allow-all, everyone may use the exit node (today's behaviour)
    assert has_exit(net.peer(alice, exit_)) and has_exit(net.peer(bob, exit_))
    await net.svc.set_policy(BASE % ",".join([ALICE_INTERNET, BOB_TAG]))
    assert net.state.nodes[exit_].exit_node
    assert has_exit(net.peer(alice, exit_))
    # bob sees the exit node (he may reach its port 22) but not as an exit node; Hostinfo still says what it offers
    rec = net.peer(bob, exit_)
    ex = net.state.nodes[exit_]
    assert rec["AllowedIPs"] == [f"{ex.ipv4}/32", f"{ex.ipv6}/128"]
    assert rec["Hostinfo"]["RoutableIPs"] == list(EXIT_ROUTES)
    # one port of the internet is enough to use it; so is "*"
    await net.svc.set_policy(BASE % ",".join([ALICE_INTERNET, BOB_INTERNET]))
    assert has_exit(net.peer(bob, exit_))
    await net.svc.set_policy(BASE % ",".join([ALICE_INTERNET, BOB_ALL]))
    assert has_exit(net.peer(bob, exit_))


async def test_exit_node_routes_follow_policy_changes_in_deltas() -> None:
    """The exit node's version does not change with the policy: the record must still be resent to bob."""
    net, alice, bob, exit_ = await exit_tailnet()
    await net.svc.approve_routes("exit", EXIT_ROUTES)
    await net.svc.set_policy(BASE % ",".join([ALICE_INTERNET, BOB_TAG]))
    b = net.svc.builder
    _, sent = b.full(net.svc.visibility, bob, net.now)
    version = net.state.nodes[exit_].version
    net.changes.clear()
    await net.svc.set_policy(BASE % ",".join([ALICE_INTERNET, BOB_INTERNET]))
    assert net.state.nodes[exit_].version == version
    (change,) = [c for c in net.changes if c.policy]
    delta = json.loads(b.delta(net.svc.visibility, bob, change, sent, net.now) or b"{}")
    (rec,) = [p for p in delta["PeersChanged"] if p["ID"] == exit_]
    assert has_exit(rec)
    # and taken away again
    net.changes.clear()
    await net.svc.set_policy(BASE % ",".join([ALICE_INTERNET, BOB_TAG]))
    (change,) = [c for c in net.changes if c.policy]
    delta = json.loads(b.delta(net.svc.visibility, bob, change, sent, net.now) or b"{}")
    (rec,) = [p for p in delta["PeersChanged"] if p["ID"] == exit_]
    assert not has_exit(rec)
    # nothing changed: nothing resent
    again = json.loads(b.delta(net.svc.visibility, bob, change, sent, net.now) or b"{}")
    assert exit_ not in [p["ID"] for p in again.get("PeersChanged", [])]
    # alice's view is untouched by bob's variant (two cached encodings)
    body, _ = b.full(net.svc.visibility, alice, net.now)
    assert has_exit({p["ID"]: p for p in json.loads(body)["Peers"]}[exit_])
