"""DERP loopback sockets: real UDP on loopback, with a fake DERP that hands A's packets to B and back."""

from __future__ import annotations

import asyncio
import socket

import pytest

from node.derpsock import DerpSockets

A_KEY, B_KEY, C_KEY = b"\xaa" * 32, b"\xbb" * 32, b"\xcc" * 32


def udp(host: str = "127.0.0.1") -> socket.socket:
    s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    s.bind((host, 0))
    s.setblocking(False)
    return s


@pytest.mark.anyio
async def test_packets_cross_the_fake_derp_both_ways() -> None:
    loop = asyncio.get_running_loop()
    # Stand-ins for each node's engine port.
    wg_a, wg_b = udp(), udp()
    relayed: list[tuple[str, bytes, bytes]] = []

    def derp_from_a(dst: bytes, pkt: bytes) -> None:
        relayed.append(("a", dst, pkt))
        assert dst == B_KEY
        ds_b.deliver(A_KEY, pkt)

    def derp_from_b(dst: bytes, pkt: bytes) -> None:
        relayed.append(("b", dst, pkt))
        assert dst == A_KEY
        ds_a.deliver(B_KEY, pkt)

    ds_a = DerpSockets(wg_a.getsockname()[1], derp_from_a)
    ds_b = DerpSockets(wg_b.getsockname()[1], derp_from_b)
    try:
        ep_a_to_b = ds_a.open(B_KEY)  # A's engine uses this as B's endpoint
        ep_b_to_a = ds_b.open(A_KEY)
        assert ds_a.open(B_KEY) == ep_a_to_b  # idempotent
        assert ep_a_to_b[0] == "127.0.0.1" and ep_a_to_b[1] > 0
        assert ds_a.node_key_for(ep_a_to_b) == B_KEY and ds_a.node_key_for(("127.0.0.1", 1)) is None

        await loop.sock_sendto(wg_a, b"handshake initiation", ep_a_to_b)
        data, src = await asyncio.wait_for(loop.sock_recvfrom(wg_b, 2000), 2)
        # B's engine sees the packet come from its endpoint for A, so it would keep that endpoint.
        assert (data, src) == (b"handshake initiation", ep_b_to_a)

        await loop.sock_sendto(wg_b, b"handshake response", src)
        data, src = await asyncio.wait_for(loop.sock_recvfrom(wg_a, 2000), 2)
        assert (data, src) == (b"handshake response", ep_a_to_b)

        big = bytes(range(256)) * 5
        for _ in range(10):  # bursts small enough for the default socket buffers: UDP may drop the rest
            for _ in range(10):
                await loop.sock_sendto(wg_a, big, ep_a_to_b)
            for _ in range(10):
                assert (await asyncio.wait_for(loop.sock_recvfrom(wg_b, 2000), 2))[0] == big
        assert ds_a.stats["to_derp"] == 101 and ds_b.stats["from_derp"] == 101
        assert [r[0] for r in relayed].count("b") == 1
    finally:
        ds_a.close_all()
        ds_b.close_all()
        wg_a.close()
        wg_b.close()
    assert len(ds_a) == 0


@pytest.mark.anyio
async def test_only_the_engine_port_is_forwarded() -> None:
    loop = asyncio.get_running_loop()
    wg = udp()
    other = udp()
    sent: list[tuple[bytes, bytes]] = []
    ds = DerpSockets(wg.getsockname()[1], lambda k, p: sent.append((k, p)))
    try:
        ep = ds.open(C_KEY)
        await loop.sock_sendto(other, b"spoof", ep)
        await loop.sock_sendto(wg, b"real", ep)
        for _ in range(100):
            if sent:
                break
            await asyncio.sleep(0.01)
        await asyncio.sleep(0.05)
        assert sent == [(C_KEY, b"real")]
        assert ds.stats["foreign"] == 1
        # Nothing for a peer without a socket.
        assert not ds.deliver(A_KEY, b"x")
        assert ds.stats["no_socket"] == 1
        ds.close(C_KEY)
        assert ds.endpoint(C_KEY) is None
        ds.close(C_KEY)  # twice is fine
    finally:
        ds.close_all()
        wg.close()
        other.close()
