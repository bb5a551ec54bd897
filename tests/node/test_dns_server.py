"""The resolver's asyncio shell on loopback: UDP and TCP answers, forwarding to fake upstreams, SERVFAIL in time
when an upstream drops queries, the TCP retry when an upstream truncates, and garbage that does not stop it."""

from __future__ import annotations

import asyncio
import ipaddress
import socket
import struct
import time
from typing import cast

from dnslib import QTYPE, RCODE, RR, A, DNSRecord

from coord import wire
from node import sockmark
from node.dns.answer import Answerer
from node.dns.server import DNSServer
from node.dns.table import Table


class Upstream(asyncio.DatagramProtocol):
    """Answers every A query with 192.0.2.1; `drop` ignores them; `truncate` sets TC (TCP gets 40 records)."""

    def __init__(self, drop: bool = False, truncate: bool = False) -> None:
        self.drop, self.truncate, self.seen = drop, truncate, 0
        self.transport: asyncio.DatagramTransport | None = None

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = cast(asyncio.DatagramTransport, transport)

    def answer(self, data: bytes, records: int) -> bytes:
        q = DNSRecord.parse(data)
        r = q.reply()
        for i in range(records):
            r.add_answer(RR(q.q.qname, QTYPE.A, rdata=A(f"192.0.2.{i + 1}"), ttl=60))
        return bytes(r.pack())

    def datagram_received(self, data: bytes, addr: tuple[str, int]) -> None:
        self.seen += 1
        if self.drop or self.transport is None:
            return
        out = self.answer(data, 1)
        if self.truncate:
            out = out[:2] + bytes([out[2] | 0x02]) + out[3:]
        self.transport.sendto(out, addr)


async def start_upstream(up: Upstream) -> tuple[asyncio.DatagramTransport, int, asyncio.Server]:
    loop = asyncio.get_running_loop()
    t, _ = await loop.create_datagram_endpoint(lambda: up, local_addr=("127.0.0.1", 0))
    port = t.get_extra_info("sockname")[1]

    async def tcp(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        n = struct.unpack("!H", await reader.readexactly(2))[0]
        out = up.answer(await reader.readexactly(n), 40)
        writer.write(struct.pack("!H", len(out)) + out)
        await writer.drain()
        writer.close()

    srv = await asyncio.start_server(tcp, "127.0.0.1", port)
    return t, port, srv


def make_server(upstream_port: int, timeout: float = 1.0) -> DNSServer:
    peer = wire.Node(id=2, name="beta.shoal.internal.", addresses=(ipaddress.ip_interface("100.64.0.2/32"),))
    dns = wire.DNSConfig(domains=("shoal.internal",), routes=(("shoal.internal.", ()),),
                         resolvers=(f"127.0.0.1:{upstream_port}",))
    return DNSServer(Answerer(Table.build(None, [peer], dns)), ["127.0.0.1"], port=0, timeout=timeout)


async def udp_query(port: int, name: str, qtype: str = "A", timeout: float = 5) -> DNSRecord:
    loop = asyncio.get_running_loop()
    s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    s.setblocking(False)
    try:
        await loop.sock_connect(s, ("127.0.0.1", port))
        await loop.sock_sendall(s, bytes(DNSRecord.question(name, qtype).pack()))
        return DNSRecord.parse(await asyncio.wait_for(loop.sock_recv(s, 65535), timeout))
    finally:
        s.close()


async def tcp_query(port: int, name: str) -> DNSRecord:
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    q = bytes(DNSRecord.question(name).pack())
    writer.write(struct.pack("!H", len(q)) + q)
    n = struct.unpack("!H", await reader.readexactly(2))[0]
    data = await reader.readexactly(n)
    writer.close()
    return DNSRecord.parse(data)


def test_dns_server_udp_tcp_and_forward() -> None:
    asyncio.run(_udp_tcp_and_forward())


async def _udp_tcp_and_forward() -> None:
    up = Upstream()
    t, uport, tcp = await start_upstream(up)
    srv = make_server(uport)
    await srv.start()
    try:
        port = srv.bound[0][1]
        r = await udp_query(port, "beta.shoal.internal")
        assert [str(x.rdata) for x in r.rr] == ["100.64.0.2"]
        r = await tcp_query(port, "beta")
        assert [str(x.rdata) for x in r.rr] == ["100.64.0.2"]
        r = await udp_query(port, "www.example.org")
        assert [str(x.rdata) for x in r.rr] == ["192.0.2.1"] and up.seen == 1
        r = await tcp_query(port, "www.example.org")
        assert len(r.rr) == 1  # a TCP client, a UDP upstream that did not truncate
        # garbage does not stop it
        s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        for junk in (b"", b"\xff" * 3, b"\x00" * 12 + b"\x3f" * 40):
            s.sendto(junk, ("127.0.0.1", port))
        s.close()
        r = await udp_query(port, "beta.shoal.internal")
        assert r.header.rcode == RCODE.NOERROR
    finally:
        await srv.close()
        t.close()
        tcp.close()


def test_dns_server_servfail_when_upstream_drops() -> None:
    asyncio.run(_servfail())


async def _servfail() -> None:
    up = Upstream(drop=True)
    t, uport, tcp = await start_upstream(up)
    srv = make_server(uport, timeout=0.5)
    await srv.start()
    try:
        t0 = time.monotonic()
        r = await udp_query(srv.bound[0][1], "www.example.org")
        took = time.monotonic() - t0
        assert r.header.rcode == RCODE.SERVFAIL and took < 1.5 and up.seen == 1
        assert srv.failed == 1
    finally:
        await srv.close()
        t.close()
        tcp.close()


def test_dns_server_tcp_retry_on_truncation() -> None:
    asyncio.run(_tcp_retry())


async def _tcp_retry() -> None:
    up = Upstream(truncate=True)
    t, uport, tcp = await start_upstream(up)
    srv = make_server(uport)
    await srv.start()
    try:
        r = await tcp_query(srv.bound[0][1], "big.example.org")
        assert len(r.rr) == 40
        r = await udp_query(srv.bound[0][1], "big.example.org")
        assert r.header.tc and not r.rr  # 40 records do not fit 512 bytes: the client must ask over TCP
    finally:
        await srv.close()
        t.close()
        tcp.close()


def test_exit_node_dns_forwarder_upstream_queries_carry_the_bypass_mark() -> None:
    """The forwarder's upstreams are the host's resolvers: with an exit node their queries must leave outside the
    tunnel, so its UDP socket carries the bypass mark (read back from the kernel), and the TCP retry after a
    truncated answer still gets its answer through a marked connection."""
    asyncio.run(_marked_upstreams())


async def _marked_upstreams() -> None:
    up = Upstream(truncate=True)
    t, uport, tcp = await start_upstream(up)
    base = make_server(uport)
    srv = DNSServer(base.answerer, ["127.0.0.1"], port=0, timeout=1.0, fwmark=sockmark.BYPASS_MARK)
    await srv.start()
    try:
        r = await tcp_query(srv.bound[0][1], "big.example.org")  # UDP, truncated: a marked TCP connection
        assert len(r.rr) == 40
        r = await udp_query(srv.bound[0][1], "big.example.org")  # marked UDP, then the TCP retry
        assert r.header.tc and up.seen == 2  # each asked over UDP first, truncated, then over TCP
        (sock,) = srv.pool.socks.values()
        assert sock.getsockopt(socket.SOL_SOCKET, socket.SO_MARK) == sockmark.BYPASS_MARK
    finally:
        await srv.close()
        t.close()
        tcp.close()
    # and without a mark (unit tests, no exit-node support) nothing is set
    t, uport, tcp = await start_upstream(Upstream())
    plain = make_server(uport)
    await plain.start()
    try:
        await udp_query(plain.bound[0][1], "www.example.org")
        (sock,) = plain.pool.socks.values()
        assert sock.getsockopt(socket.SOL_SOCKET, socket.SO_MARK) == 0
    finally:
        await plain.close()
        t.close()
        tcp.close()
