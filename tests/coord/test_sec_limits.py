"""Issue 11.4: the bounds on unauthenticated input, piece by piece (the flood against a real server is
test_sec_flood.py)."""

from __future__ import annotations

import asyncio
import json
import os
from pathlib import Path
from typing import Any

import httpx
import pytest
from hypothesis import given
from hypothesis import strategies as st
from nacl.public import PrivateKey

from coord import limits, logins, wire
from node.control import ControlClient, ControlError
from tests.coord.harness import running_server

NK = wire.key_text("nodekey", b"\x01" * 32)


@pytest.mark.parametrize("host, key", [
    ("192.0.2.7", "192.0.2.7"),
    ("2001:db8:1:2:3:4:5:6", "2001:db8:1:2::/64"),
    ("2001:db8:1:2:ffff::1", "2001:db8:1:2::/64"),
    ("[2001:db8:1:3::1]", "2001:db8:1:3::/64"),
    ("::ffff:198.51.100.9", "198.51.100.9"),
    ("", "unknown"),
    (None, "unknown"),
    ("not-an-ip", "unknown"),
])
def test_sec_source_key(host: str | None, key: str) -> None:
    assert limits.source_key(host) == key


PROXIES = limits.parse_proxies("10.0.0.1, 192.0.2.0/24")


@pytest.mark.parametrize("peer, xff, want", [
    ("198.51.100.1", "203.0.113.9", "198.51.100.1"),  # not a proxy: its header is not believed
    ("10.0.0.1", "203.0.113.9", "203.0.113.9"),
    ("10.0.0.1", "1.2.3.4, 203.0.113.9", "203.0.113.9"),  # the left entries are whatever the client wrote
    ("10.0.0.1", "203.0.113.9, 192.0.2.5", "203.0.113.9"),  # through two trusted proxies
    ("10.0.0.1", "192.0.2.5", "192.0.2.5"),  # only proxies: the farthest one
    ("10.0.0.1", None, "10.0.0.1"),
    ("::ffff:10.0.0.1", "203.0.113.9", "203.0.113.9"),
])
def test_sec_client_address(peer: str, xff: str | None, want: str) -> None:
    assert limits.client_address(peer, xff, PROXIES) == want


def test_sec_client_address_without_proxies_ignores_the_header() -> None:
    assert limits.client_address("127.0.0.1", "203.0.113.9", ()) == "127.0.0.1"


def test_sec_parse_proxies_error() -> None:
    with pytest.raises(ValueError, match=r"'10\.0\.0\.300' is not"):
        limits.parse_proxies("10.0.0.1 10.0.0.300")


def test_sec_rate_limit_bucket_and_table_bound() -> None:
    r = limits.RateLimit(rate=1.0, burst=3, max_sources=100)
    assert [r.allow("a", 0.0) for _ in range(4)] == [True, True, True, False]
    assert not r.available("a", 0.5) and r.available("a", 1.0)
    assert r.allow("a", 1.0) and not r.allow("a", 1.0)
    for i in range(1000):
        r.allow(f"s{i}", 2.0)
    assert len(r.buckets) == 100


def body(**hostinfo: Any) -> dict[str, Any]:
    return {"NodeKey": NK, "Hostinfo": hostinfo}


@pytest.mark.parametrize("req, error", [
    (body(Hostname="h" * 256), "Hostinfo.Hostname: 256 characters; at most 255"),
    (body(OS="o" * 65), "Hostinfo.OS: 65 characters; at most 64"),
    (body(RoutableIPs=["10.0.0.0/8"] * 257), "Hostinfo.RoutableIPs: 257 entries; at most 256"),
    (body(RoutableIPs=["10.0.0.0/8", "1" * 44]), "Hostinfo.RoutableIPs[1]: 44 characters; at most 43"),
    (body(RoutableIPs=["10.0.0.0/8", 7]), "Hostinfo.RoutableIPs[1]: expected a string"),
    (body(RequestTags=["tag:a"] * 65), "Hostinfo.RequestTags: 65 entries; at most 64"),
    (body(RequestTags=["tag:" + "a" * 61]), "Hostinfo.RequestTags[0]: 65 characters; at most 64"),
    ({"NodeKey": NK, "Auth": {"AuthKey": "k" * 129}}, "Auth.AuthKey: 129 characters; at most 128"),
    ({"NodeKey": NK, "Followup": "u" * 513}, "Followup: 513 characters; at most 512"),
])
def test_sec_register_request_field_bounds(req: dict[str, Any], error: str) -> None:
    with pytest.raises(wire.WireError) as e:
        wire.RegisterRequest.from_json(req)
    assert str(e.value) == error


@pytest.mark.parametrize("req, error", [
    ({"NodeKey": NK, "Endpoints": ["192.0.2.1:1"] * 65}, "Endpoints: 65 entries; at most 64"),
    ({"NodeKey": NK, "Endpoints": ["192.0.2.1:1", "x" * 65]}, "Endpoints[1]: 65 characters; at most 64"),
    ({"NodeKey": NK, "Endpoints": ["192.0.2.1:1", "nope"]}, "Endpoints[1]: endpoint 'nope' is not host:port"),
    ({"NodeKey": NK, "EndpointTypes": [1] * 65}, "EndpointTypes: 65 entries; at most 64"),
    ({"NodeKey": NK, "EndpointTypes": [1, 300]}, "EndpointTypes[1]: expected 0-255"),
    ({"NodeKey": NK, "Hostinfo": {"Hostname": "h" * 300}}, "Hostinfo.Hostname: 300 characters; at most 255"),
])
def test_sec_map_request_field_bounds(req: dict[str, Any], error: str) -> None:
    with pytest.raises(wire.WireError) as e:
        wire.MapRequest.from_json(req)
    assert str(e.value) == error


def test_sec_largest_accepted_request_fits_the_body_limit() -> None:
    from tests.coord.flood import junk_body

    biggest = junk_body()
    wire.RegisterRequest.from_json(json.loads(biggest))
    # sealed with its envelope (ts, id) and the box overhead, it still fits in a control body
    assert len(biggest) + 200 < wire.MAX_CONTROL


@given(st.lists(st.text(max_size=50), max_size=300), st.text(max_size=300))
def test_sec_hostinfo_bounds_fuzz(routes: list[str], hostname: str) -> None:
    try:
        h = wire.Hostinfo.from_json({"Hostname": hostname, "RoutableIPs": routes})
    except wire.WireError as e:
        assert str(e).startswith("Hostinfo.")
        return
    assert len(h.routable_ips) <= wire.MAX_ROUTES and all(len(r) <= wire.MAX_ROUTE for r in h.routable_ips)
    assert len(h.hostname) <= wire.MAX_HOSTNAME


async def interactive(url: str, headers: dict[str, str] | None = None) -> wire.RegisterResponse:
    m = PrivateKey.generate()
    c = ControlClient(url, bytes(m), bytes(m.public_key), timeout=10)
    if headers:
        c._http().headers.update(headers)
    try:
        await c.pin()
        return await c.login(wire.RegisterRequest(node_key=os.urandom(32), hostinfo=wire.Hostinfo(hostname="p")))
    finally:
        await c.close()


def test_sec_pending_per_source_and_forwarded_for(tmp_path: Path) -> None:
    """A source gets PENDING_PER_SOURCE waiting logins; X-Forwarded-For from an untrusted peer changes nothing."""

    async def main() -> None:
        async with running_server(tmp_path / "data") as r:
            for i in range(logins.PENDING_PER_SOURCE):
                resp = await interactive(r.url, {"X-Forwarded-For": f"203.0.113.{i}"})
                assert resp.auth_url
            with pytest.raises(ControlError) as e:
                await interactive(r.url, {"X-Forwarded-For": "203.0.113.200"})
            assert e.value.status == 429 and "already waiting for approval" in e.value.message
            async with httpx.AsyncClient() as h:
                health = (await h.get(f"{r.url}/health")).json()
            assert health["refused"] == 1
            assert len(r.app.logins.pending) == logins.PENDING_PER_SOURCE

    asyncio.run(main())


def test_sec_forwarded_for_believed_from_a_trusted_proxy(tmp_path: Path) -> None:
    async def main() -> None:
        async with running_server(tmp_path / "data", trusted_proxies="127.0.0.1") as r:
            for i in range(logins.PENDING_PER_SOURCE + 2):
                resp = await interactive(r.url, {"X-Forwarded-For": f"203.0.113.{i}"})
                assert resp.auth_url
            assert {p.source for p in r.app.logins.pending.values()} == {
                f"203.0.113.{i}" for i in range(logins.PENDING_PER_SOURCE + 2)}

    asyncio.run(main())
