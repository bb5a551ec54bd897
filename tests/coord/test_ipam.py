"""Address allocation: reserved ranges are skipped, IPv4 and IPv6 share the offset, the pool can run out."""

from __future__ import annotations

import ipaddress

import pytest

from coord.ipam import Pool, PoolExhausted

POOL = Pool.parse("100.64.0.0/10", "fd7a:115c:a1e0::/48")


def test_first_addresses() -> None:
    assert POOL.allocate(set(), 1) == (1, "100.64.0.1", "fd7a:115c:a1e0::1")
    assert POOL.allocate({"100.64.0.1"}, 1)[1:] == ("100.64.0.2", "fd7a:115c:a1e0::2")


def test_skips_quad_100_and_chromeos_ranges() -> None:
    start = POOL.index_of("100.100.99.254")
    got = POOL.allocate(set(), start)
    assert got[1] == "100.100.99.254"
    _, v4, _ = POOL.allocate({"100.100.99.254"}, start)
    # 100.100.99.255 is a .255 octet; all of 100.100.100.0/24 is reserved.
    assert v4 == "100.100.101.1"
    _, v4, _ = POOL.allocate(set(), POOL.index_of("100.115.91.254") + 1)
    assert v4 == "100.115.94.1"
    for net in ("100.100.100.0/24", "100.115.92.0/23"):
        for a in ipaddress.ip_network(net):
            assert not POOL.usable(POOL.index_of(str(a)))


def test_skips_the_magicdns_ipv6_resolver() -> None:
    idx = 0x53
    assert POOL.addresses(idx)[1] == "fd7a:115c:a1e0::53"
    assert not POOL.usable(idx)
    used = {POOL.addresses(i)[0] for i in range(1, idx)}
    _, v4, v6 = POOL.allocate(used, 1)
    assert (v4, v6) == ("100.64.0.84", "fd7a:115c:a1e0::54")


def test_never_hands_out_network_broadcast_or_zero_octets() -> None:
    assert not POOL.usable(0)
    assert not POOL.usable(POOL.v4.num_addresses - 1)
    assert not POOL.usable(256)  # 100.64.1.0
    assert not POOL.usable(255)  # 100.64.0.255


def test_wraps_and_exhausts() -> None:
    small = Pool.parse("100.64.0.0/29", "fd7a:115c:a1e0::/120")
    got = []
    used: set[str] = set()
    hint = 5
    while True:
        try:
            _, v4, _ = small.allocate(used, hint)
        except PoolExhausted as e:
            assert "100.64.0.0/29" in str(e)
            break
        used.add(v4)
        got.append(v4)
    assert got == ["100.64.0.5", "100.64.0.6", "100.64.0.1", "100.64.0.2", "100.64.0.3", "100.64.0.4"]


def test_parse_rejects_wrong_families() -> None:
    with pytest.raises(ValueError):
        Pool.parse("fd7a::/48", "100.64.0.0/10")
