"""STUN codec golden vectors (hand-checked against RFC 5389 XOR rules) and fuzzing; the server with aiostun."""

from __future__ import annotations

import asyncio
import contextlib
import ipaddress
import socket

import aiostun
import pytest
from hypothesis import given
from hypothesis import strategies as st

from derp import stun
from derp.stunserver import start_stun_server

TX = bytes(range(12))
TX16 = bytes(range(16))

# 192.0.2.1:41641 -> XOR port 0xa2a9 ^ 0x2112 = 0x83bb, address c0000201 ^ 2112a442 = e112a643.
RESP_V4 = "0101000c2112a442000102030405060708090a0b00200008000183bbe112a643"
# RFC 3489 request (no cookie): MAPPED-ADDRESS in clear, then XOR-MAPPED-ADDRESS, 16-byte transaction ID echoed.
RESP_CLASSIC = "01010018000102030405060708090a0b0c0d0e0f000100080001a2a9c000020100200008000183bbe112a643"
# 2001:db8::1 XOR (cookie + transaction ID).
RESP_V6 = "010100182112a442000102030405060708090a0b00200014000283bb0113a9fa000102030405060708090a0a"
# SOFTWARE "tailnode" + FINGERPRINT, as Tailscale's netcheck sends.
REQ = "000100142112a442000102030405060708090a0b802200087461696c6e6f6465802800048aabad90"


@pytest.mark.parametrize(
    "req,host,want",
    [
        (stun.BindingRequest(TX), "192.0.2.1", RESP_V4),
        (stun.BindingRequest(TX16), "192.0.2.1", RESP_CLASSIC),
        (stun.BindingRequest(TX), "::ffff:192.0.2.1", RESP_V4),
        (stun.BindingRequest(TX), "2001:db8::1", RESP_V6),
    ],
)
def test_response_golden(req: stun.BindingRequest, host: str, want: str) -> None:
    wire = stun.build_response(req, host, 41641)
    assert wire.hex() == want
    got = stun.parse_response(wire)
    assert (got.txid, got.port) == (req.txid, 41641)
    assert got.host == host.removeprefix("::ffff:")


def test_request_golden() -> None:
    assert stun.build_request(TX).hex() == REQ
    assert stun.parse_request(bytes.fromhex(REQ)) == stun.BindingRequest(TX)
    assert stun.looks_like_stun(bytes.fromhex(REQ))


def test_plain_rfc5389_and_rfc3489_requests_are_answered() -> None:
    bare = bytes.fromhex("000100002112a442") + TX
    assert stun.parse_request(bare) == stun.BindingRequest(TX)
    classic = bytes.fromhex("00010000") + TX16
    assert stun.parse_request(classic).classic


@pytest.mark.parametrize(
    "data,message",
    [
        (b"\x00\x01", "2 bytes is shorter than a STUN header"),
        (bytes.fromhex("010100002112a442") + TX, "message type 0x0101 is not a binding request"),
        (bytes.fromhex("000100042112a442") + TX, "length field 4 does not match a 20-byte datagram"),
        (bytes.fromhex("c00100002112a442") + TX, "top two bits are not zero"),
        (bytes.fromhex(REQ[:-2] + "91"), "bad FINGERPRINT"),
    ],
)
def test_bad_requests(data: bytes, message: str) -> None:
    with pytest.raises(stun.StunError) as e:
        stun.parse_request(data)
    assert str(e.value) == message


@given(st.binary(max_size=200))
def test_fuzz_parse(data: bytes) -> None:
    for parse in (stun.parse_request, stun.parse_response):
        with contextlib.suppress(stun.StunError):
            parse(data)


@given(st.binary(min_size=12, max_size=12), st.ip_addresses(), st.integers(0, 65535))
def test_roundtrip(txid: bytes, ip: ipaddress.IPv4Address | ipaddress.IPv6Address, port: int) -> None:
    got = stun.parse_response(stun.build_response(stun.BindingRequest(txid), str(ip), port))
    want = ip.ipv4_mapped if isinstance(ip, ipaddress.IPv6Address) and ip.ipv4_mapped else ip
    assert (got.txid, got.host, got.port) == (txid, str(want), port)


@pytest.mark.anyio
@pytest.mark.parametrize("classic", [False, True], ids=["rfc5389", "rfc3489"])
async def test_aiostun_gets_its_address(classic: bool) -> None:
    server = await start_stun_server("127.0.0.1", 0)
    try:
        client = aiostun.Client(host="127.0.0.1", port=server.port, family=aiostun.IP4, proto=aiostun.UDP)
        await client.connect()
        try:
            mapped = await client.get_mapped_address(use_classicstun=classic)
            local = client.get_local_addr()
        finally:
            client.close()
        assert mapped["ip"] == "127.0.0.1"
        assert mapped["port"] == local[1]
        assert server.stats.responses == 1
    finally:
        server.close()


@pytest.mark.anyio
async def test_server_ignores_and_counts_garbage() -> None:
    server = await start_stun_server("127.0.0.1", 0)
    loop = asyncio.get_running_loop()
    sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    sock.setblocking(False)
    sock.bind(("127.0.0.1", 0))
    try:
        sock.sendto(b"not stun at all, just junk bytes", ("127.0.0.1", server.port))
        sock.sendto(stun.build_request(TX), ("127.0.0.1", server.port))
        reply = await asyncio.wait_for(loop.sock_recv(sock, 1500), 2)
        got = stun.parse_response(reply)
        assert (got.txid, got.host, got.port) == (TX, "127.0.0.1", sock.getsockname()[1])
        assert server.stats.bad == 1 and server.stats.responses == 1
    finally:
        sock.close()
        server.close()
