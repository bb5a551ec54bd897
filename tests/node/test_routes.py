"""Route applier as command transcripts (golden text) through FakeRunner, plus parser checks."""

from __future__ import annotations

import contextlib
import json

import pytest
from hypothesis import example, given
from hypothesis import strategies as st

from node.render.routes import RouteApplier, RouteConfig, RouteStateError, parse_state
from node.run import CommandError, FakeRunner

FRESH_ADDR = json.dumps([{
    "ifindex": 5, "ifname": "shoal0", "flags": ["POINTOPOINT", "MULTICAST", "NOARP"], "mtu": 1420,
    "operstate": "DOWN", "addr_info": [],
}])
CONFIGURED_ADDR = json.dumps([{
    "ifindex": 5, "ifname": "shoal0", "flags": ["POINTOPOINT", "MULTICAST", "NOARP", "UP", "LOWER_UP"],
    "mtu": 1280, "addr_info": [
        {"family": "inet", "local": "100.64.0.1", "prefixlen": 32, "scope": "global"},
        {"family": "inet6", "local": "fd7a:115c:a1e0::1", "prefixlen": 128, "scope": "global"},
        {"family": "inet6", "local": "fe80::1", "prefixlen": 64, "scope": "link"},
    ],
}])
CONFIGURED_R4 = json.dumps([
    {"dst": "100.64.0.0/10", "scope": "link", "flags": []},
    {"dst": "10.1.0.0/16", "scope": "link", "flags": []},
])
CONFIGURED_R6 = json.dumps([
    {"dst": "fd7a:115c:a1e0::1", "protocol": "kernel", "metric": 256, "flags": []},
    {"dst": "fd7a:115c:a1e0::/48", "metric": 1024, "flags": []},
    {"dst": "fe80::/64", "protocol": "kernel", "metric": 256, "flags": []},
])
READS = (
    "ip -j addr show dev shoal0\n"
    "ip -j route show dev shoal0\n"
    "ip -j -6 route show dev shoal0\n"
)

CFG = RouteConfig("shoal0", ("fd7a:115c:a1e0::1/128", "100.64.0.1/32"), ("10.1.0.0/16",))


def runner(addr: str, r4: str = "[]", r6: str = "[]") -> FakeRunner:
    r = FakeRunner()
    r.respond("ip -j addr show dev shoal0", addr)
    r.respond("ip -j route show dev shoal0", r4)
    r.respond("ip -j -6 route show dev shoal0", r6)
    return r


@pytest.mark.anyio
async def test_fresh_interface() -> None:
    r = runner(FRESH_ADDR)
    await RouteApplier(r).set(CFG)
    assert r.transcript == READS + (
        "ip link set dev shoal0 mtu 1280\n"
        "ip link set dev shoal0 up\n"
        "ip addr add 100.64.0.1/32 dev shoal0\n"
        "ip -6 addr add fd7a:115c:a1e0::1/128 dev shoal0 nodad\n"
        "ip route add 10.1.0.0/16 dev shoal0\n"
        "ip route add 100.64.0.0/10 dev shoal0\n"
        "ip -6 route add fd7a:115c:a1e0::/48 dev shoal0\n"
    )


@pytest.mark.anyio
async def test_configured_interface_is_left_alone() -> None:
    r = runner(CONFIGURED_ADDR, CONFIGURED_R4, CONFIGURED_R6)
    assert await RouteApplier(r).set(CFG) == []
    assert r.transcript == READS


@pytest.mark.anyio
async def test_changes_only_what_differs() -> None:
    r = runner(CONFIGURED_ADDR, CONFIGURED_R4, CONFIGURED_R6)
    cfg = RouteConfig("shoal0", ("100.64.0.9/32", "fd7a:115c:a1e0::1/128"), ("192.0.2.0/24",))
    await RouteApplier(r).set(cfg)
    assert r.transcript == READS + (
        "ip addr del 100.64.0.1/32 dev shoal0\n"
        "ip addr add 100.64.0.9/32 dev shoal0\n"
        "ip route del 10.1.0.0/16 dev shoal0\n"
        "ip route add 192.0.2.0/24 dev shoal0\n"
    )


@pytest.mark.anyio
async def test_clear_removes_what_we_own() -> None:
    r = runner(CONFIGURED_ADDR, CONFIGURED_R4, CONFIGURED_R6)
    await RouteApplier(r).clear("shoal0")
    assert r.transcript == READS + (
        "ip route del 10.1.0.0/16 dev shoal0\n"
        "ip route del 100.64.0.0/10 dev shoal0\n"
        "ip -6 route del fd7a:115c:a1e0::/48 dev shoal0\n"
        "ip addr del 100.64.0.1/32 dev shoal0\n"
        "ip -6 addr del fd7a:115c:a1e0::1/128 dev shoal0\n"
    )


@pytest.mark.anyio
async def test_missing_interface_and_failing_command() -> None:
    r = FakeRunner()
    r.respond("ip -j addr show dev shoal0", rc=1, err='Device "shoal0" does not exist.\n')
    with pytest.raises(RouteStateError, match="does not exist"):
        await RouteApplier(r).set(CFG)
    r = runner(FRESH_ADDR)
    r.respond("ip link set dev shoal0 up", rc=2, err="RTNETLINK answers: Operation not permitted")
    with pytest.raises(CommandError, match="not permitted"):
        await RouteApplier(r).set(CFG)


def test_config_validation() -> None:
    with pytest.raises(ValueError, match="interface name"):
        RouteConfig("a-very-long-interface-name")
    with pytest.raises(ValueError, match="bad interface address"):
        RouteConfig("shoal0", ("100.64.0.300/32",))
    with pytest.raises(ValueError, match="bad route prefix"):
        RouteConfig("shoal0", (), ("nope",))


def test_parse_errors() -> None:
    with pytest.raises(RouteStateError, match="cannot parse"):
        parse_state("{", "[]", "[]")
    with pytest.raises(RouteStateError, match="listed 0 links"):
        parse_state("[]", "[]", "[]")
    with pytest.raises(RouteStateError, match="without dst"):
        parse_state(FRESH_ADDR, '[{"scope": "link"}]', "[]")


@given(st.recursive(
    st.none() | st.booleans() | st.integers() | st.text(max_size=20),
    lambda c: st.lists(c, max_size=4) | st.dictionaries(
        st.sampled_from(["flags", "mtu", "addr_info", "local", "prefixlen", "scope", "dst", "protocol"]), c,
        max_size=5),
    max_leaves=20,
))
@example([{"flags": None, "mtu": None, "protocol": []}])  # an unhashable protocol once raised TypeError
def test_parse_state_fuzz(doc: object) -> None:
    text = json.dumps(doc)
    for args in ((text, "[]", "[]"), (FRESH_ADDR, text, "[]"), (FRESH_ADDR, "[]", text)):
        with contextlib.suppress(RouteStateError):
            parse_state(*args)


@pytest.mark.anyio
async def test_runners() -> None:
    from node.run import Result, SubprocessRunner

    fake = FakeRunner({"x": [Result(0, "first", ""), Result(3, "", "boom")]})
    assert (await fake.run(["x"], input=b"a\nb")).out == "first"
    assert (await fake.run(["x"], check=False)).rc == 3
    with pytest.raises(CommandError, match="boom"):
        await fake.run(["x"])
    assert fake.transcript == "x\n    a\n    b\nx\nx\n"
    real = SubprocessRunner()
    assert (await real.run(["cat"], input=b"hi")).out == "hi"
    with pytest.raises(CommandError, match="exited 1"):
        await real.run(["false"])
    assert SubprocessRunner(netns="ns1").argv_for(["ip", "link"]) == ["ip", "netns", "exec", "ns1", "ip", "link"]


@pytest.mark.anyio
async def test_dns_quad100_addresses_are_host_scope_and_idempotent() -> None:
    cfg = RouteConfig("shoal0", ("100.64.0.1/32", "fd7a:115c:a1e0::1/128"),
                      host_addresses=("fd7a:115c:a1e0::53/128", "100.100.100.100/32"))
    r = runner(CONFIGURED_ADDR, CONFIGURED_R4, CONFIGURED_R6)
    await RouteApplier(r).set(cfg)
    assert r.transcript == READS + (
        "ip addr add 100.100.100.100/32 dev shoal0 scope host\n"
        "ip -6 addr add fd7a:115c:a1e0::53/128 dev shoal0 scope host nodad\n"
        "ip route del 10.1.0.0/16 dev shoal0\n"
    )
    have = json.loads(CONFIGURED_ADDR)
    have[0]["addr_info"] += [{"family": "inet", "local": "100.100.100.100", "prefixlen": 32, "scope": "host"},
                             {"family": "inet6", "local": "fd7a:115c:a1e0::53", "prefixlen": 128, "scope": "host"}]
    r = runner(json.dumps(have), CONFIGURED_R4, CONFIGURED_R6)
    await RouteApplier(r).set(cfg)
    assert r.transcript == READS + "ip route del 10.1.0.0/16 dev shoal0\n"
    r = runner(json.dumps(have), CONFIGURED_R4, CONFIGURED_R6)
    await RouteApplier(r).set(RouteConfig("shoal0", ("100.64.0.1/32", "fd7a:115c:a1e0::1/128")))
    assert "ip addr del 100.100.100.100/32 dev shoal0\n" in r.transcript
