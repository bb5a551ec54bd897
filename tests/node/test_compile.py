"""node/compile.py: netmap in -> WireGuard, routes and filter out (golden), endpoints, back-off, status rows."""

from __future__ import annotations

import json
from dataclasses import replace
from typing import Any

from hypothesis import given
from hypothesis import strategies as st

from coord import wire
from node import compile, mapsession, status
from node.keys import PrivateKey, PublicKey
from node.render.routes import RouteConfig
from node.wg.config import WgConfig, WgPeer

SELF_PRIV = PrivateKey(bytes(range(32)))
K2 = "nodekey:" + "22" * 32
K3 = "nodekey:" + "33" * 32
ALLOW_ALL = [{"SrcIPs": ["*"], "DstPorts": [{"IP": "*", "Ports": {"First": 0, "Last": 65535}}]}]
SSH_FROM_N2 = [{"SrcIPs": ["100.64.0.2/32"], "DstPorts": [{"IP": "100.64.0.1/32", "Ports": {"First": 22, "Last": 22}}],
                "IPProto": [6]}]


def peer(pid: int, key: str, eps: list[str], **kw: Any) -> dict[str, Any]:
    addrs = [f"100.64.0.{pid}/32", f"fd7a:115c:a1e0::{pid}/128"]
    rec = {"ID": pid, "Name": f"n{pid}.shoal.internal.", "Key": key, "Addresses": addrs, "AllowedIPs": addrs,
           "Endpoints": eps, "Online": True, "Expired": False}
    rec.update(kw)
    return rec


def netmap(peers: list[dict[str, Any]], filt: list[dict[str, Any]] | None = ALLOW_ALL) -> mapsession.NetMap:
    return mapsession.apply(mapsession.NetMap(), wire.MapResponse.from_json({
        "Node": {"ID": 1, "Name": "n1.shoal.internal.", "Key": str(SELF_PRIV.public()),
                 "Addresses": ["100.64.0.1/32", "fd7a:115c:a1e0::1/128"], "KeyExpiry": "2099-01-01T00:00:00Z"},
        "Peers": peers, "PacketFilter": filt, "Domain": "shoal.internal",
    }))


def test_golden_wireguard_and_routes() -> None:
    nm = netmap([
        peer(3, K3, ["[fe80::1]:41641", "[2001:db8::3]:41641", "192.0.2.13:41641"]),
        peer(2, K2, ["192.0.2.12:41641", "198.51.100.2:41641"],
             AllowedIPs=["100.64.0.2/32", "fd7a:115c:a1e0::2/128", "10.9.0.0/16"], PrimaryRoutes=["10.9.0.0/16"]),
    ])
    # a peer's subnet route is used only with --accept-routes
    cfg = compile.wg_config(nm, SELF_PRIV, 41641, compile.first_endpoint((4,)))
    assert cfg.peers[0].allowed_ips == ("100.64.0.2/32", "fd7a:115c:a1e0::2/128")
    cfg = compile.wg_config(nm, SELF_PRIV, 41641, compile.first_endpoint((4,)), accept_routes=True)
    assert cfg == WgConfig(SELF_PRIV, 41641, (
        WgPeer(PublicKey.parse(K2), ("100.64.0.2/32", "10.9.0.0/16", "fd7a:115c:a1e0::2/128"),
               "192.0.2.12:41641", 25),
        WgPeer(PublicKey.parse(K3), ("100.64.0.3/32", "fd7a:115c:a1e0::3/128"), "192.0.2.13:41641", 25),
    ))
    # with IPv6 available the first usable endpoint wins; link-local never does
    v6 = compile.wg_config(nm, SELF_PRIV, 41641, compile.first_endpoint((4, 6)))
    assert v6.peers[1].endpoint == "[2001:db8::3]:41641"
    assert compile.route_config(nm, "shoal0") == RouteConfig(
        "shoal0", ("100.64.0.1/32", "fd7a:115c:a1e0::1/128"))
    assert compile.route_config(nm, "shoal0", accept_routes=True).routes == ("10.9.0.0/16",)


def test_broken_peers_are_left_out_not_fatal() -> None:
    nm = netmap([
        peer(2, "nodekey:zz", ["192.0.2.12:41641"]),
        peer(3, K3, ["nonsense", "127.0.0.1:1", "100.64.0.9:41641"]),
        peer(4, str(SELF_PRIV.public()), ["192.0.2.14:41641"]),  # our own key
        peer(5, K3, ["192.0.2.15:41641"]),  # a key another peer already has
        peer(6, "nodekey:" + "66" * 32, ["192.0.2.16:41641"], Expired=True),
        peer(7, "nodekey:" + "77" * 32, [], AllowedIPs=["bogus", "100.64.0.7/32"]),
    ])
    cfg = compile.wg_config(nm, SELF_PRIV, 41641, compile.first_endpoint())
    assert [(p.public_key.hex[:2], p.endpoint, p.allowed_ips) for p in cfg.peers] == [
        ("33", None, ("100.64.0.3/32", "fd7a:115c:a1e0::3/128")),
        ("77", None, ("100.64.0.7/32",)),
    ]


def test_sec_allow_all_keeps_a_table_with_the_always_on_rules_and_a_policy_renders_a_filter() -> None:
    # issue 11: allow-all no longer removes our table; it accepts everything from the tunnel, and the anti-spoof
    # rules stay (before: "table inet shoal_filter {}\ndelete table inet shoal_filter\n", no table at all)
    allow = compile.filter_script(netmap([]), "shoal0")
    assert allow.startswith("table inet shoal_filter {}\ndelete table inet shoal_filter\ntable inet shoal_filter {")
    assert 'iifname != { "lo", "shoal0" } ip saddr 100.64.0.0/10 counter name spoofed drop' in allow
    assert allow.split("chain from_tailnet {")[1].split() [-3:] == ["accept", "}", "}"]
    text = compile.filter_script(netmap([], SSH_FROM_N2), "shoal0")
    assert "ip saddr 100.64.0.2 ip daddr 100.64.0.1 tcp dport 22 ct state new accept" in text
    assert "ip saddr @self4 counter name dropped drop" in text and 'iifname "shoal0"' in text
    # a missing or empty filter blocks everything rather than allowing it
    for filt in (None, []):
        blocked = compile.filter_script(netmap([], filt), "shoal0")
        body = blocked[blocked.index("chain from_tailnet"):]
        assert "accept" not in body.replace("ct state established,related accept", "")
    assert not compile.is_allow_all([wire.FilterRule.from_json(
        {"SrcIPs": ["*"], "DstPorts": [{"IP": "*", "Ports": {"First": 0, "Last": 65535}}], "IPProto": [6]})])


IP_ADDR = json.dumps([
    {"ifname": "lo", "flags": ["LOOPBACK", "UP"], "addr_info": [
        {"family": "inet", "local": "127.0.0.1", "prefixlen": 8, "scope": "host"}]},
    {"ifname": "eth0", "flags": ["BROADCAST", "UP", "LOWER_UP"], "addr_info": [
        {"family": "inet6", "local": "2001:db8::10", "prefixlen": 64, "scope": "global"},
        {"family": "inet6", "local": "fe80::1", "prefixlen": 64, "scope": "link"},
        {"family": "inet", "local": "192.0.2.10", "prefixlen": 26, "scope": "global"},
        {"family": "inet6", "local": "2001:db8::11", "prefixlen": 64, "scope": "global", "tentative": True}]},
    {"ifname": "eth1", "flags": ["BROADCAST"], "addr_info": [
        {"family": "inet", "local": "198.51.100.9", "prefixlen": 24, "scope": "global"}]},
    {"ifname": "shoal0", "flags": ["UP"], "addr_info": [
        {"family": "inet", "local": "100.64.0.1", "prefixlen": 32, "scope": "global"}]},
    {"ifname": "other", "flags": ["UP"], "addr_info": [
        {"family": "inet", "local": "100.64.0.77", "prefixlen": 32, "scope": "global"}]},
])


def test_local_endpoints_from_ip_addr() -> None:
    eps, types = compile.local_endpoints(IP_ADDR, 41641, exclude=["shoal0"])
    assert eps == ["192.0.2.10:41641", "[2001:db8::10]:41641"]
    assert types == [1, 1]
    assert compile.families_of(eps) == (4, 6)
    assert compile.local_endpoints("not json", 1) == ([], [])


@given(st.text(max_size=300))
def test_local_endpoints_never_crash_on_garbage(text: str) -> None:
    compile.local_endpoints(text, 41641)


@given(st.recursive(st.none() | st.booleans() | st.integers() | st.text(max_size=20),
                    lambda c: st.lists(c, max_size=4) | st.dictionaries(st.text(max_size=10), c, max_size=4),
                    max_leaves=20))
def test_local_endpoints_never_crash_on_odd_json(data: object) -> None:
    compile.local_endpoints(json.dumps(data), 41641)


@given(st.lists(st.dictionaries(st.sampled_from(["ID", "Key", "Endpoints", "AllowedIPs", "Expired", "Addresses"]),
                                st.none() | st.text(max_size=70) | st.lists(st.text(max_size=30), max_size=3)
                                | st.booleans()), max_size=5))
def test_wg_config_survives_malformed_peer_records(records: list[dict[str, Any]]) -> None:
    # what the parser lets through of them (it leaves out the records it cannot read)
    nm = netmap([{**r, "ID": i} for i, r in enumerate(records)])
    compile.wg_config(nm, SELF_PRIV, 41641, compile.first_endpoint())
    status.peer_rows(nm, None, status.no_magic, 0.0)


def test_expiry() -> None:
    nm = netmap([])
    assert not compile.self_expired(nm, 0)
    assert compile.self_expired(nm, 4_102_444_800.0)  # 2100-01-01
    assert nm.node is not None
    nm = replace(nm, node=replace(nm.node, expired=True))
    assert compile.self_expired(nm, 0)


def test_backoff_is_jittered_exponential_and_capped() -> None:
    b = compile.Backoff(base=0.5, cap=10.0)
    lows = [b.next(0.0) for _ in range(8)]
    assert lows == [0.25, 0.5, 1.0, 2.0, 4.0, 5.0, 5.0, 5.0]
    b.reset()
    assert b.next(0.999) < 0.5
    assert [compile.Backoff(cap=10.0, attempt=20).next(r) for r in (0.0, 0.5)] == [5.0, 7.5]


PORTS = st.dictionaries(st.sampled_from(["First", "Last"]), st.integers(-1, 70000))
DST = st.none() | st.text(max_size=5) | st.dictionaries(st.sampled_from(["IP", "Ports"]),
                                                        st.none() | st.just("*") | PORTS)
FIELD = st.none() | st.text(max_size=5) | st.lists(DST, max_size=3)
RULE = st.none() | st.text(max_size=5) | st.dictionaries(st.sampled_from(["SrcIPs", "DstPorts", "IPProto"]), FIELD)


@given(st.lists(RULE, max_size=3))
def test_malformed_filters_give_a_render_error_or_a_script(rules: list[Any]) -> None:
    try:
        nm = netmap([], rules)  # a WireError (a ValueError) when the parser refuses the filter
        text = compile.filter_script(nm, "shoal0")
    except ValueError:
        return
    assert text.startswith("table inet shoal_filter {}")
