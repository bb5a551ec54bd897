"""Commands decided on state: registration, re-registration, expiry, tags and auth key rules."""

from __future__ import annotations

import os

import pytest

from coord import decide, wire
from coord import events as ev
from coord.errors import Conflict, DomainError, NotFound, Unauthorized
from coord.ipam import Pool
from tests.coord.util import DAY, Tailnet, rules


def test_register_allocates_names_and_addresses() -> None:
    t = Tailnet()
    t.user("alice")
    k = t.key("alice")
    ids = [t.register(os.urandom(32), h, k)[0] for h in ("laptop", "Laptop.local", "laptop", "LAPTOP-1")]
    nodes = [t.state.nodes[i] for i in ids]
    assert [n.given_name for n in nodes] == ["laptop", "laptop-1", "laptop-2", "laptop-1-1"]
    assert [n.ipv4 for n in nodes] == ["100.64.0.1", "100.64.0.2", "100.64.0.3", "100.64.0.4"]
    assert [n.ipv6 for n in nodes] == [f"fd7a:115c:a1e0::{i}" for i in range(1, 5)]
    assert nodes[0].key_expiry == t.now + 180 * DAY
    assert nodes[0].hostname == "laptop"


def test_reregistration_keeps_node_addresses_and_name() -> None:
    t = Tailnet()
    t.user("alice")
    k = t.key("alice")
    m = os.urandom(32)
    nid, _ = t.register(m, "box", k)
    before = (t.state.nodes[nid].ipv4, t.state.nodes[nid].ipv6, t.state.nodes[nid].given_name)
    t.register(os.urandom(32), "other", k)
    t.now += 10
    new_key = os.urandom(32)
    nid2, change = t.register(m, "box", k, node_key=new_key)
    assert nid2 == nid and len(t.state.nodes) == 2
    n = t.state.nodes[nid]
    assert (n.ipv4, n.ipv6, n.given_name) == before
    assert n.node_key == wire.key_text("nodekey", new_key)
    assert isinstance(t.log[-1], ev.NodeReauthenticated)
    assert nid in change.close, "the old stream (old node key) must end"


def test_address_not_reused_while_owner_exists_but_after_delete() -> None:
    t = Tailnet()
    t.user("alice")
    k = t.key("alice")
    a, _ = t.register(os.urandom(32), "a", k)
    b, _ = t.register(os.urandom(32), "b", k)
    t.run(lambda s: decide.expire_node(s, str(a), t.now))
    t.run(lambda s: decide.logout(s, bytes.fromhex(t.state.nodes[b].machine_key[5:])))
    c, _ = t.register(os.urandom(32), "c", k)
    assert t.state.nodes[c].ipv4 not in (t.state.nodes[a].ipv4, t.state.nodes[b].ipv4)
    ip_a = t.state.nodes[a].ipv4
    t.run(lambda s: decide.delete_node(s, str(a)))
    assert ip_a not in t.state.used_ipv4


def test_tagged_nodes_never_expire() -> None:
    t = Tailnet()
    t.user("alice")
    tagged = t.key("alice", tags=("tag:server",))
    plain = t.key("alice")
    s, _ = t.register(os.urandom(32), "srv", tagged)
    p, _ = t.register(os.urandom(32), "pc", plain)
    assert t.state.nodes[s].key_expiry is None and t.state.nodes[s].tags == ("tag:server",)
    assert t.state.nodes[p].key_expiry is not None
    t.now += 181 * DAY
    due = decide.expire_due(t.state, t.now)
    assert [e.node_id for e in due if isinstance(e, ev.NodeExpired)] == [p]
    # tagging a user's node by an admin drops its expiry too
    t.run(lambda st: decide.tag_node(st, str(p), ("tag:b", "tag:a", "tag:a")))
    assert t.state.nodes[p].tags == ("tag:a", "tag:b") and t.state.nodes[p].key_expiry is None
    assert decide.expire_due(t.state, t.now + 1000 * DAY) == []


def test_key_expiry_disabled_by_config() -> None:
    t = Tailnet(rules=rules(None))
    t.user("alice")
    n, _ = t.register(os.urandom(32), "x", t.key("alice"))
    assert t.state.nodes[n].key_expiry is None


def test_auth_key_rules() -> None:
    t = Tailnet()
    t.user("alice")
    once = t.key("alice", reusable=False)
    t.register(os.urandom(32), "a", once)
    with pytest.raises(Unauthorized, match="already been used"):
        decide.check_auth_key(t.state, *once, t.now)
    many = t.key("alice", reusable=True)
    for _ in range(3):
        t.register(os.urandom(32), "m", many)
    with pytest.raises(Unauthorized, match=r"^invalid auth key$"):
        decide.check_auth_key(t.state, many[0], "0" * 64, t.now)
    with pytest.raises(Unauthorized, match=r"^invalid auth key$"):
        decide.check_auth_key(t.state, "nosuchprefix", many[1], t.now)
    soon = t.key("alice", expiration=t.now + 60)
    decide.check_auth_key(t.state, *soon, t.now + 59)
    with pytest.raises(Unauthorized, match="expired"):
        decide.check_auth_key(t.state, *soon, t.now + 60)
    t.run(lambda s: decide.revoke_key(s, many[0]))
    with pytest.raises(Unauthorized, match="revoked"):
        decide.check_auth_key(t.state, *many, t.now)
    with pytest.raises(Conflict, match="already revoked"):
        decide.revoke_key(t.state, many[0])
    with pytest.raises(NotFound):
        decide.revoke_key(t.state, "nope")
    eph = t.key("alice", ephemeral=True)
    n, _ = t.register(os.urandom(32), "e", eph)
    assert t.state.nodes[n].ephemeral
    assert decide.key_usable(t.state.keys[t.state.keys_by_prefix[eph[0]]], t.now)


def test_key_tags_must_be_valid_and_user_must_exist() -> None:
    t = Tailnet()
    t.user("alice")
    with pytest.raises(DomainError, match="tag"):
        t.key("alice", tags=("server",))
    with pytest.raises(NotFound, match="no user 'bob'"):
        t.key("bob")


def test_requested_tags_need_a_tag_owner() -> None:
    t = Tailnet()
    t.user("alice")
    k = t.key("alice")
    with pytest.raises(Unauthorized, match="may not apply tag:web"):
        t.register(os.urandom(32), "w", k, request_tags=["tag:web"])
    t.rules = decide.Rules(t.rules.pool, t.rules.key_expiry, lambda user, tag: tag == "tag:web")
    n, _ = t.register(os.urandom(32), "w", k, request_tags=["tag:web"])
    assert t.state.nodes[n].tags == ("tag:web",) and t.state.nodes[n].key_expiry is None


def test_users_create_rename_delete() -> None:
    t = Tailnet()
    t.user("alice")
    with pytest.raises(Conflict):
        decide.create_user(t.state, "alice")
    with pytest.raises(DomainError, match="not valid"):
        decide.create_user(t.state, "bad name")
    t.run(lambda s: decide.rename_user(s, "alice", "alicia"))
    assert t.state.user_by_name("alicia") is not None and t.state.user_by_name("alice") is None
    k = t.key("alicia")
    n, _ = t.register(os.urandom(32), "a", k)
    with pytest.raises(Conflict, match="still owns nodes"):
        decide.delete_user(t.state, "alicia")
    t.run(lambda s: decide.delete_node(s, str(n)))
    t.run(lambda s: decide.delete_user(s, "alicia"))
    assert not t.state.users
    assert t.state.keys[t.state.keys_by_prefix[k[0]]].revoked


def test_rename_node_rules() -> None:
    t = Tailnet()
    t.user("alice")
    k = t.key("alice")
    a, _ = t.register(os.urandom(32), "a", k)
    t.register(os.urandom(32), "b", k)
    with pytest.raises(Conflict, match="taken"):
        decide.rename_node(t.state, "a", "b")
    with pytest.raises(DomainError, match="DNS label"):
        decide.rename_node(t.state, "a", "Not_OK")
    t.run(lambda s: decide.rename_node(s, "a", "c"))
    assert t.state.nodes[a].given_name == "c" and t.state.nodes[a].name_by_admin
    # the hostname changes, but an admin's name sticks
    n = t.state.nodes[a]
    evs = decide.map_update(t.state, n, disco_key=None, endpoints=None, endpoint_types=(), home_derp=None,
                            hostname="renamed", os="linux", routes=None)
    assert [type(e) for e in evs] == [ev.NodeHostinfoChanged]


def test_hostname_change_renames_unless_taken() -> None:
    t = Tailnet()
    t.user("alice")
    k = t.key("alice")
    a, _ = t.register(os.urandom(32), "a", k)
    t.register(os.urandom(32), "b", k)
    evs = decide.map_update(t.state, t.state.nodes[a], disco_key=None, endpoints=None, endpoint_types=(),
                            home_derp=None, hostname="b.local", os="", routes=None)
    renamed = [e for e in evs if isinstance(e, ev.NodeRenamed)]
    assert [e.given_name for e in renamed] == ["b-1"]


def test_heartbeat_is_not_an_event() -> None:
    t = Tailnet()
    t.user("alice")
    a, _ = t.register(os.urandom(32), "a", t.key("alice"))
    n = t.state.nodes[a]
    args = dict(disco_key=None, endpoints=("192.0.2.1:1",), endpoint_types=(1,), home_derp=1, hostname=None,
                os=None, routes=None)
    t.run(lambda s: decide.map_update(s, n, **args))  # type: ignore[arg-type]
    assert decide.map_update(t.state, n, **args) == []  # type: ignore[arg-type]


def test_logout_rules() -> None:
    t = Tailnet()
    t.user("alice")
    m = os.urandom(32)
    a, _ = t.register(m, "a", t.key("alice"))
    t.run(lambda s: decide.logout(s, m))
    assert t.state.nodes[a].logged_out
    assert decide.logout(t.state, m) == []
    with pytest.raises(Unauthorized):
        decide.logout(t.state, os.urandom(32))
    me, _ = t.register(os.urandom(32), "e", t.key("alice", ephemeral=True))
    mk = bytes.fromhex(t.state.nodes[me].machine_key[5:])
    t.run(lambda s: decide.logout(s, mk))
    assert me not in t.state.nodes


def test_node_key_in_use_by_another_machine() -> None:
    t = Tailnet()
    t.user("alice")
    k = t.key("alice")
    nk = os.urandom(32)
    t.register(os.urandom(32), "a", k, node_key=nk)
    with pytest.raises(Conflict, match="in use"):
        t.register(os.urandom(32), "b", k, node_key=nk)


def test_pool_exhaustion_is_a_domain_error() -> None:
    t = Tailnet(rules=decide.Rules(Pool.parse("100.64.0.0/30", "fd7a:115c:a1e0::/126"), None))
    t.user("alice")
    k = t.key("alice")
    t.register(os.urandom(32), "a", k)
    t.register(os.urandom(32), "b", k)
    with pytest.raises(DomainError, match="no free address"):
        t.register(os.urandom(32), "c", k)
