"""The relay end to end over loopback TCP (port 0): forwarding, slow readers, forged keys, duplicates, PeerGone,
mesh, restart and reconnect, admission, and the HTTP paths."""

from __future__ import annotations

import asyncio
import os
import socket
import ssl
import subprocess
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path

import pytest
from nacl.public import Box, PrivateKey

from derp import frames as f
from derp.client import Connected, DerpClient
from derp.protocol import NEED_DATA, ClientInfoJSON, DerpConnection, Role, State
from derp.scan import DISCO_MAGIC
from derp.server import DerpServer

pytestmark = pytest.mark.anyio


def newkey() -> bytes:
    return bytes(PrivateKey.generate())


@asynccontextmanager
async def relay(**kw: object) -> AsyncIterator[tuple[DerpServer, str]]:
    server = DerpServer(newkey(), **kw)  # type: ignore[arg-type]
    srv = await server.serve("127.0.0.1", 0)
    port = srv.sockets[0].getsockname()[1]
    try:
        yield server, f"http://127.0.0.1:{port}/derp"
    finally:
        await server.close()


@asynccontextmanager
async def client(url: str, key: bytes | None = None, **kw: object) -> AsyncIterator[DerpClient]:
    c = DerpClient(url, key or newkey(), backoff_min=0.05, backoff_max=0.2, **kw)  # type: ignore[arg-type]
    c.start()
    try:
        await c.wait_connected(5)
        assert isinstance(await asyncio.wait_for(c.recv(), 2), Connected)
        yield c
    finally:
        await c.close()


async def next_of(c: DerpClient, kind: type, timeout: float = 3.0) -> object:
    async def go() -> object:
        while True:
            ev = await c.recv()
            if isinstance(ev, kind):
                return ev

    return await asyncio.wait_for(go(), timeout)


async def raw_upgrade(url: str) -> tuple[asyncio.StreamReader, asyncio.StreamWriter, bytes]:
    port = int(url.rsplit(":", 1)[1].split("/")[0])
    r, w = await asyncio.open_connection("127.0.0.1", port)
    w.write(b"GET /derp HTTP/1.1\r\nHost: x\r\nUpgrade: DERP\r\nConnection: Upgrade\r\n\r\n")
    head = await r.readuntil(b"\r\n\r\n")
    assert head.startswith(b"HTTP/1.1 101 ")
    return r, w, head


async def test_two_clients_exchange_packets() -> None:
    async with relay() as (server, url), client(url) as a, client(url) as b:
        for i in range(100):
            assert a.send(b.public_key, b"a->b %d" % i)
        for i in range(100):
            ev = await next_of(b, f.RecvPacket)
            assert ev == f.RecvPacket(a.public_key, b"a->b %d" % i)
        b.send(a.public_key, b"reply")
        assert await next_of(a, f.RecvPacket) == f.RecvPacket(b.public_key, b"reply")
        assert await a.ping() < 1.0
        assert server.metrics.packets_forwarded >= 101
        # Plain TCP, asyncio's or uvloop's transport: runs are written straight from the read buffer.
        assert all(c.fd >= 0 for c in server.conns if c.mode == "open")


async def test_slow_reader_does_not_slow_others_and_drops_are_counted() -> None:
    async with relay(queue_bytes=32 << 10, write_high=32 << 10) as (server, url), client(url) as a, client(url) as b:
        # A raw DERP client that completes the handshake, then never reads again.
        r, w, _ = await raw_upgrade(url)
        slow_key = PrivateKey.generate()
        conn = DerpConnection(Role.CLIENT, bytes(slow_key))
        while conn.state is not State.OPEN:
            conn.receive_data(await r.read(4096))
            while conn.next_event() is not NEED_DATA:
                pass
            w.write(conn.data_to_send())
        sock = w.get_extra_info("socket")
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
        slow_pub = bytes(slow_key.public_key)
        await asyncio.sleep(0.1)
        blob = os.urandom(1200)
        for round_ in range(40):
            for _ in range(100):
                a.send(slow_pub, blob)
            a.send(b.public_key, b"still here %d" % round_)
            got = await next_of(b, f.RecvPacket, timeout=2.0)
            assert got == f.RecvPacket(a.public_key, b"still here %d" % round_)
            await asyncio.sleep(0)
        assert server.metrics.drops["queue_full"] > 0
        w.close()


async def test_forged_client_info_is_refused() -> None:
    async with relay() as (server, url):
        r, w, _ = await raw_upgrade(url)
        hdr = await r.readexactly(5)
        sk = f.decode(hdr[0], await r.readexactly(int.from_bytes(hdr[1:], "big")))
        assert isinstance(sk, f.ServerKey)
        victim = bytes(PrivateKey.generate().public_key)
        sealed = Box(PrivateKey.generate(), PrivateKey(server.private_key).public_key).encrypt(
            b'{"version":2}', bytes(24)
        )
        w.write(f.encode_client_info(victim, bytes(24), sealed.ciphertext))
        assert await asyncio.wait_for(r.read(), 3) == b""  # closed, no ServerInfo
        assert server.metrics.closes["forged_client_info"] == 1
        assert victim not in server.registry.active


async def test_same_key_twice_newest_wins_and_old_gets_health() -> None:
    key = newkey()
    async with relay() as (_, url), client(url) as peer, client(url, key) as first:
        async with client(url, key) as second:
            health = await next_of(first, f.Health)
            assert isinstance(health, f.Health) and "another connection" in health.problem
            peer.send(second.public_key, b"to the newest")
            assert await next_of(second, f.RecvPacket) == f.RecvPacket(peer.public_key, b"to the newest")
        # The newest left: the first is active and healthy again.
        assert await next_of(first, f.Health) == f.Health("")
        peer.send(first.public_key, b"back to first")
        assert await next_of(first, f.RecvPacket) == f.RecvPacket(peer.public_key, b"back to first")


async def test_sender_learns_peer_gone() -> None:
    async with relay() as (server, url), client(url) as a:
        async with client(url) as b:
            a.send(b.public_key, b"hi")
            await next_of(b, f.RecvPacket)
        gone = await next_of(a, f.PeerGone)
        assert gone == f.PeerGone(b.public_key, f.PeerGoneReason.DISCONNECTED)
        a.send(b.public_key, b"anyone?")
        assert await next_of(a, f.PeerGone) == f.PeerGone(b.public_key, f.PeerGoneReason.NOT_HERE)
        assert server.metrics.drops["unknown_dest"] == 1


async def test_two_meshed_relays_forward_between_their_clients() -> None:
    mesh_key = os.urandom(32)
    async with relay(mesh_key=mesh_key) as (s1, url1), relay(mesh_key=mesh_key) as (s2, url2):
        s1.mesh_with, s2.mesh_with = [url1, url2], [url1, url2]  # each lists itself too: it is skipped
        await s1.start()
        await s2.start()
        async with client(url1) as a, client(url2) as b:
            for _ in range(100):
                if b.public_key in s1.registry.forwarders and a.public_key in s2.registry.forwarders:
                    break
                await asyncio.sleep(0.05)
            a.send(b.public_key, b"across the mesh")
            assert await next_of(b, f.RecvPacket) == f.RecvPacket(a.public_key, b"across the mesh")
            b.send(a.public_key, b"and back")
            assert await next_of(a, f.RecvPacket) == f.RecvPacket(b.public_key, b"and back")
        assert "derp_mesh_peers 1" in s1.render_metrics()


async def test_mesh_frames_need_the_mesh_key() -> None:
    async with relay(mesh_key=os.urandom(32)) as (server, url), client(url) as a:
        a.send_raw(f.encode_watch_conns())
        await asyncio.sleep(0.2)
        assert server.metrics.closes["not_mesh"] == 1


async def test_relay_restart_and_client_reconnect() -> None:
    key = newkey()
    server = DerpServer(key)
    srv = await server.serve("127.0.0.1", 0)
    port = srv.sockets[0].getsockname()[1]
    url = f"http://127.0.0.1:{port}/derp"
    async with client(url) as a, client(url) as b:
        a.note_preferred(True)
        await server.close(reconnect_in=0.1)
        server2 = DerpServer(key)
        await server2.serve("127.0.0.1", port)
        try:
            await next_of(a, Connected, timeout=5)
            await next_of(b, Connected, timeout=5)
            assert a.connects == 2
            a.send(b.public_key, b"after restart")
            assert await next_of(b, f.RecvPacket) == f.RecvPacket(a.public_key, b"after restart")
            assert "derp_clients_home 1" in server2.render_metrics()
        finally:
            await server2.close()


async def test_admission_fails_closed() -> None:
    async def slow(key: bytes, ip: str) -> bool:
        await asyncio.sleep(10)
        return True

    allowed: set[bytes] = set()

    async def check(key: bytes, ip: str) -> bool:
        assert ip == "127.0.0.1"
        return key in allowed

    async with relay(admit=slow, admit_timeout=0.2) as (server, url):
        c = DerpClient(url, newkey(), backoff_min=5)
        c.start()
        await asyncio.sleep(0.6)
        assert not c.connected and server.metrics.closes["admission_error"] == 1
        await c.close()
    async with relay(admit=check) as (server, url):
        ok = newkey()
        allowed.add(bytes(PrivateKey(ok).public_key))
        async with client(url, ok):
            pass
        c = DerpClient(url, newkey(), backoff_min=5)
        c.start()
        await asyncio.sleep(0.3)
        assert not c.connected and server.metrics.closes["admission_denied"] == 1
        await c.close()


async def http_get(url: str, path: str, headers: str = "") -> bytes:
    port = int(url.rsplit(":", 1)[1].split("/")[0])
    r, w = await asyncio.open_connection("127.0.0.1", port)
    w.write(f"GET {path} HTTP/1.1\r\nHost: x\r\n{headers}\r\n".encode())
    data = await asyncio.wait_for(r.read(), 3)
    w.close()
    return data


async def test_http_paths() -> None:
    async with relay() as (server, url):
        assert (await http_get(url, "/derp")).startswith(b"HTTP/1.1 426 ")
        probe = await http_get(url, "/derp/probe")
        assert probe.startswith(b"HTTP/1.1 200 ") and b"Access-Control-Allow-Origin: *" in probe
        r204 = await http_get(url, "/generate_204", "X-Tailscale-Challenge: abc.123\r\n")
        assert r204.startswith(b"HTTP/1.1 204 ") and b"X-Tailscale-Response: response abc.123" in r204
        assert (await http_get(url, "/health")).endswith(b"ok\n")
        # Metrics are not on the public port: only on the loopback metrics listener (tests/derp/test_metrics_relay.py).
        assert (await http_get(url, "/metrics")).startswith(b"HTTP/1.1 404 ")
        assert (await http_get(url, "/nope")).startswith(b"HTTP/1.1 404 ")
        port = int(url.rsplit(":", 1)[1].split("/")[0])
        r, w = await asyncio.open_connection("127.0.0.1", port)
        w.write(b"\x00\x01garbage\r\n\r\n")
        assert (await asyncio.wait_for(r.read(), 3)).startswith(b"HTTP/1.1 400 ")
        assert server.metrics.closes["bad_http"] == 1


async def raw_client(url: str) -> tuple[asyncio.StreamReader, asyncio.StreamWriter, bytes]:
    """A DERP client on a bare socket, past the handshake: (reader, writer, its public key)."""
    r, w, _ = await raw_upgrade(url)
    key = PrivateKey.generate()
    conn = DerpConnection(Role.CLIENT, bytes(key))
    while conn.state is not State.OPEN:
        conn.receive_data(await r.read(4096))
        while conn.next_event() is not NEED_DATA:
            pass
        w.write(conn.data_to_send())
    return r, w, bytes(key.public_key)


async def read_frames(r: asyncio.StreamReader, until: object, timeout: float = 3.0) -> list[f.Frame]:
    """Decode frames from ``r`` until ``until(frames_so_far)`` is true."""
    buf = f.FrameBuffer(max_frame=f.MAX_FRAME_LEN)
    got: list[f.Frame] = []

    async def go() -> None:
        while not until(got):  # type: ignore[operator]
            data = await r.read(1 << 16)
            assert data, "relay closed the connection"
            buf.feed(data)
            got.extend(f.decode(t, p) for t, p in buf.frames())

    await asyncio.wait_for(go(), timeout)
    return got


async def test_disco_is_not_dropped_behind_bulk_data() -> None:
    # hold=0: the queues, not backpressure, are under test. With a hold the relay may write one more 256 KiB read
    # of the sender's past write_high (by design), which then drains through the 4 KiB buffers below at tens of
    # KB/s and outlasted read_frames' timeout in about a third of the runs under uvloop.
    async with relay(queue_bytes=8 << 10, write_high=8 << 10, hold=0) as (server, url), client(url) as a:
        r, w, slow_pub = await raw_client(url)
        w.get_extra_info("socket").setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
        await asyncio.sleep(0.1)
        # Small kernel buffers on both ends, so the relay's queues fill after a few hundred KB.
        slow = server.registry.active[slow_pub].transport
        assert slow is not None
        slow.get_extra_info("socket").setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, 4096)
        blob = os.urandom(1200)
        for _ in range(300):
            a.send(slow_pub, blob)
        await asyncio.sleep(0.2)
        # Each disco packet is followed by far more data than the data queue holds.
        for i in range(10):
            a.send(slow_pub, DISCO_MAGIC + b"disco %d" % i)
            for _ in range(40):
                a.send(slow_pub, blob)
            await asyncio.sleep(0.02)
        await asyncio.sleep(0.2)
        assert server.metrics.drops["queue_full"] > 0
        got = await read_frames(r, lambda fs: sum(1 for x in fs if x.packet.startswith(DISCO_MAGIC)) == 10)
        disco = [x.packet for x in got if isinstance(x, f.RecvPacket) and x.packet.startswith(DISCO_MAGIC)]
        assert disco == [DISCO_MAGIC + b"disco %d" % i for i in range(10)]
        assert server.metrics.drops["disco_queue_full"] == 0
        w.close()


async def test_client_honours_restarting() -> None:
    key = newkey()
    server = DerpServer(key)
    port = (await server.serve("127.0.0.1", 0)).sockets[0].getsockname()[1]
    url = f"http://127.0.0.1:{port}/derp"
    loop = asyncio.get_running_loop()
    # Normal back-off would wait 2.4-3.6 s before each reconnect; the Restarting frame overrides it.
    c = DerpClient(url, newkey(), backoff_min=3.0, backoff_max=3.0)
    c.start()
    try:
        await next_of(c, Connected)
        # 1. Come back after reconnect-in (smeared over its second half), not at once and not after back-off.
        t0 = loop.time()
        await server.close(reconnect_in=0.6, try_for=5.0)
        ev = await next_of(c, f.Restarting)
        assert isinstance(ev, f.Restarting) and 300 <= ev.reconnect_in_ms <= 600 and ev.try_for_ms == 5000
        server = DerpServer(key)
        await server.serve("127.0.0.1", port)
        await next_of(c, Connected)
        assert ev.reconnect_in_ms / 1000 - 0.05 <= loop.time() - t0 < 1.5
        # 2. The relay stays down longer than reconnect-in: retries keep coming quickly within try-for.
        t0 = loop.time()
        await server.close(reconnect_in=0.1, try_for=5.0)
        await next_of(c, f.Restarting)
        await asyncio.sleep(1.0)
        server = DerpServer(key)
        await server.serve("127.0.0.1", port)
        await next_of(c, Connected)
        assert 1.0 <= loop.time() - t0 < 1.8
    finally:
        await c.close()
        await server.close()


async def test_large_frame_arriving_in_pieces_and_bulk_runs() -> None:
    async with relay() as (server, url), client(url) as b:
        _, w, a_pub = await raw_client(url)
        big = os.urandom(60000)
        frame = f.encode_send_packet(b.public_key, big)
        for i in range(0, len(frame), 12000):  # 12 KB, then 24 KB: the rest waits in its own buffer
            w.write(frame[i : i + 12000])
            await w.drain()
            await asyncio.sleep(0.05)
        assert await next_of(b, f.RecvPacket) == f.RecvPacket(a_pub, big)
        # A long run of equal frames plus odd ones, written at once: the batched path, in order.
        pkts = [os.urandom(1000) for _ in range(500)] + [b"short"] + [os.urandom(1000) for _ in range(100)]
        w.write(b"".join(f.encode_send_packet(b.public_key, p) for p in pkts))
        for p in pkts:
            assert await next_of(b, f.RecvPacket) == f.RecvPacket(a_pub, p)
        assert server.metrics.packets_forwarded == 602
        w.close()


def test_forwarding_under_uvloop() -> None:
    import uvloop

    async def main() -> None:
        await test_two_clients_exchange_packets()
        await test_large_frame_arriving_in_pieces_and_bulk_runs()
        await test_disco_is_not_dropped_behind_bulk_data()

    with asyncio.Runner(loop_factory=uvloop.new_event_loop) as runner:
        runner.run(main())



@pytest.mark.parametrize("hold", [1.0, 0.0])
async def test_a_reader_that_falls_behind_holds_its_sender_for_a_while(hold: float) -> None:
    # hold=1.0: the sender is not read while the reader catches up, so nothing is dropped. hold=0 (no
    # backpressure) shows the same traffic would lose packets: the mechanism, not luck, saves them.
    async with relay(write_high=16 << 10, hold=hold) as (server, url):
        rr, rw, r_pub = await raw_client(url)
        rw.get_extra_info("socket").setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 65536)
        _, sw, _ = await raw_client(url)
        await asyncio.sleep(0.05)
        server.registry.active[r_pub].transport.get_extra_info("socket").setsockopt(  # type: ignore[union-attr]
            socket.SOL_SOCKET, socket.SO_SNDBUF, 65536
        )
        frame = f.encode_send_packet(r_pub, os.urandom(1200))
        count = 1500

        async def send() -> None:
            for _ in range(count // 50):
                sw.write(frame * 50)
                await sw.drain()  # the relay's backpressure reaches the sender here

        async def receive() -> int:
            got = 0
            while got < count * len(frame):
                data = await asyncio.wait_for(rr.read(16 << 10), 3)
                assert data, (got, server.metrics)
                got += len(data)
                await asyncio.sleep(0.002)  # slower than the sender, but reading
            return got

        sender = asyncio.create_task(send())
        if hold:
            assert await receive() == count * len(frame)
            await sender
            assert server.metrics.drops["queue_full"] == 0
            assert server.metrics.packets_forwarded == count
        else:
            await sender
            for _ in range(50):
                if server.metrics.packets_received == count:
                    break
                await asyncio.sleep(0.02)
            assert server.metrics.drops["queue_full"] > 0
        rw.close()
        sw.close()


async def test_tls_relay_forwards_runs(tmp_path: Path) -> None:
    # The relay writes runs straight to plain TCP sockets; over TLS that would put plaintext on the wire, so TLS
    # connections must go through the transport (fd -1), and bulk runs must arrive intact.
    subprocess.run(
        ["openssl", "req", "-x509", "-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:prime256v1", "-nodes",
         "-keyout", str(tmp_path / "k.pem"), "-out", str(tmp_path / "c.pem"), "-days", "1", "-subj", "/CN=localhost"],
        check=True, capture_output=True,
    )
    ctx = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    ctx.load_cert_chain(tmp_path / "c.pem", tmp_path / "k.pem")
    cctx = ssl.create_default_context()
    cctx.check_hostname = False
    cctx.verify_mode = ssl.CERT_NONE
    server = DerpServer(newkey())
    port = (await server.serve("127.0.0.1", 0, ssl=ctx)).sockets[0].getsockname()[1]
    url = f"https://127.0.0.1:{port}/derp"
    try:
        async with client(url, ssl=cctx) as a, client(url, ssl=cctx) as b:
            assert all(c.fd == -1 for c in server.conns)
            pkts = [os.urandom(1200) for _ in range(300)]
            assert a.send_raw(b"".join(f.encode_send_packet(b.public_key, p) for p in pkts))
            for p in pkts:
                assert await next_of(b, f.RecvPacket) == f.RecvPacket(a.public_key, p)
    finally:
        await server.close()


async def handshake_with(url: str, info: ClientInfoJSON) -> tuple[asyncio.StreamReader, asyncio.StreamWriter]:
    """Send ``info`` as ClientInfo on a bare socket; returns once the relay accepted or closed."""
    r, w, _ = await raw_upgrade(url)
    conn = DerpConnection(Role.CLIENT, newkey(), client_info=info)
    while conn.state is not State.OPEN:
        data = await asyncio.wait_for(r.read(4096), 3)
        if not data:
            break
        conn.receive_data(data)
        while conn.next_event() is not NEED_DATA:
            pass
        w.write(conn.data_to_send())
    return r, w


async def test_sec_mesh_key_under_a_capitalised_json_key_makes_a_mesh_peer() -> None:
    mesh_key = os.urandom(32)
    async with relay(mesh_key=mesh_key) as (server, url), client(url) as a:
        # Go's encoding/json reads "MeshKey" into ClientInfo.MeshKey; so does the relay.
        r, w = await handshake_with(url, ClientInfoJSON(extra={"MeshKey": mesh_key.hex().upper()}))
        w.write(f.encode_watch_conns())
        got = await read_frames(r, lambda fs: any(isinstance(x, f.PeerPresent) for x in fs))
        assert [x.key for x in got if isinstance(x, f.PeerPresent)] == [a.public_key]
        assert server.metrics.closes["not_mesh"] == 0
        w.close()


async def test_sec_relay_refuses_a_mesh_key_of_the_wrong_length() -> None:
    async with relay(mesh_key=os.urandom(32)) as (server, url):
        r, w = await handshake_with(url, ClientInfoJSON(mesh_key="ab" * 16))
        assert await asyncio.wait_for(r.read(), 3) == b""
        assert server.metrics.closes["handshake_error"] == 1 and server.metrics.accepts == 0
        w.close()
