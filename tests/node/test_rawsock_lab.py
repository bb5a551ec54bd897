"""Raw sockets beside a real wireguard-go on its port, in lab namespaces.

The receive socket must see exactly the disco and STUN datagrams sent to the WireGuard port: not a junk flood to
the same port, not the same magic to another port, not WireGuard's own traffic. The send socket must put the
WireGuard port as source although wireguard-go owns it.
"""

from __future__ import annotations

import asyncio
import contextlib
import ctypes
import os
import socket
import subprocess
import time
from collections.abc import Iterator

import pytest

from node import bpf, disco, rawsock
from node.keys import PrivateKey
from node.render.routes import RouteApplier, RouteConfig
from node.run import SubprocessRunner
from node.wg.config import WgConfig, WgPeer
from node.wg.go import GoEngine
from tests.lab import Lab, one_lan
from tests.lab.fixtures import lab, lab_sweep
from tests.lab.lab import aping

__all__ = ["lab", "lab_sweep"]

pytestmark = pytest.mark.lab

PORT = 41641
CLONE_NEWNET = 0x40000000
_libc = ctypes.CDLL(None, use_errno=True)


@contextlib.contextmanager
def netns(name: str) -> Iterator[None]:
    """Run the block in namespace `name` (this thread only); sockets made there stay there."""
    with open("/proc/thread-self/ns/net") as home, open(f"/var/run/netns/{name}") as target:
        if _libc.setns(target.fileno(), CLONE_NEWNET) != 0:
            raise OSError(ctypes.get_errno(), f"setns {name}")
        try:
            yield
        finally:
            if _libc.setns(home.fileno(), CLONE_NEWNET) != 0:
                os._exit(99)  # stuck in a lab namespace: nothing after this could be trusted


def disco_packet(i: int) -> bytes:
    return disco.MAGIC + bytes([i]) * 32 + bytes(24) + os.urandom(16 + 14)


def stun_packet(i: int) -> bytes:
    return bytes.fromhex("0101000c2112a442") + bytes([i]) * 12 + bytes(12)


def collect(rx: rawsock.RawReceiver, want: int, timeout: float = 2.0) -> list[tuple[bytes, disco.AddrPort]]:
    got: list[tuple[bytes, disco.AddrPort]] = []
    end = time.monotonic() + timeout
    while time.monotonic() < end:
        item = rx.recv()
        if item is None:
            if len(got) >= want:
                time.sleep(0.2)  # anything extra would have arrived by now
                item = rx.recv()
                if item is None:
                    break
            else:
                time.sleep(0.01)
                continue
        got.append(item)
    return got


def test_shares_port_with_wireguard_go(lab: Lab) -> None:
    lab.build(one_lan(2))
    asyncio.run(share_port(lab))


async def share_port(lab: Lab) -> None:
    names = ("n1", "n2")
    keys = {n: PrivateKey.generate() for n in names}
    tun = {"n1": "100.64.0.1", "n2": "100.64.0.2"}
    engines = {n: GoEngine(lab.iface(n), netns=lab.ns(n)) for n in names}
    n1_addr, n2_addr = lab.nodes["n1"].addr, lab.nodes["n2"].addr
    try:
        for n in names:
            other = "n2" if n == "n1" else "n1"
            await engines[n].start()
            peer = WgPeer(keys[other].public(), (f"{tun[other]}/32",), f"{lab.nodes[other].addr}:{PORT}")
            await engines[n].set(WgConfig(keys[n], PORT, (peer,)))
            await RouteApplier(SubprocessRunner(netns=lab.ns(n))).set(RouteConfig(lab.iface(n), (f"{tun[n]}/32",)))

        with netns(lab.ns("n1")):
            # wireguard-go owns the port: nobody else can bind it.
            probe = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
            with pytest.raises(OSError, match="in use"):
                probe.bind(("0.0.0.0", PORT))
            probe.close()
            rx = rawsock.RawReceiver(PORT)
            tx = rawsock.RawSender(PORT)
        with netns(lab.ns("n2")):
            peer_sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
            peer_sock.bind(("0.0.0.0", 0))
            peer_sock.settimeout(2)
        src = (n2_addr, peer_sock.getsockname()[1])
        # Handshake first: under load an initiation lost in the junk flood below is retried only after 5 s.
        for _ in range(10):
            if await aping(lab, "n2", tun["n1"]):
                break
        else:
            raise AssertionError("the tunnel never came up")
        try:
            # Real WireGuard traffic through the tunnel, on the same UDP port.
            ping = await asyncio.create_subprocess_exec(
                "ip",
                "netns",
                "exec",
                lab.ns("n2"),
                "ping",
                "-c",
                "30",
                "-i",
                "0.02",
                "-W",
                "2",
                tun["n1"],
                stdout=asyncio.subprocess.DEVNULL,
            )
            wanted = [disco_packet(i) for i in range(5)] + [stun_packet(i) for i in range(3)]
            for i in range(2000):
                peer_sock.sendto(os.urandom(40) if i % 2 else b"\x04" + bytes(60), (n1_addr, PORT))
                if i % 250 == 0:
                    d = wanted[i // 250]
                    peer_sock.sendto(d, (n1_addr, PORT))
                    peer_sock.sendto(d, (n1_addr, PORT + 1))  # right magic, wrong port
            assert await ping.wait() == 0, "the tunnel must keep working beside the raw sockets"
            got = collect(rx, len(wanted))
            assert [p for p, _ in got] == wanted
            assert {s for _, s in got} == {src}
            assert rx.malformed == 0

            # Send from the WireGuard port although wireguard-go holds it.
            tx.sendto(b"from the wireguard port", src)
            data, seen = peer_sock.recvfrom(100)
            assert (data, seen) == (b"from the wireguard port", (n1_addr, PORT))
            # wireguard-go still answers on that port (a fresh handshake works).
            assert (await engines["n2"].get()).peers[0].rx_bytes > 0
        finally:
            rx.close()
            tx.close()
            peer_sock.close()
    finally:
        for e in engines.values():
            await e.stop()


def test_drain_before_filter_and_ipv6(lab: Lab, monkeypatch: pytest.MonkeyPatch) -> None:
    lab.build(one_lan(1))
    wg = subprocess.Popen(
        ["ip", "netns", "exec", lab.ns("n1"), "wireguard-go", "-f", lab.iface("n1")],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    sock_path = f"/var/run/wireguard/{lab.iface('n1')}.sock"
    try:
        for _ in range(200):
            if os.path.exists(sock_path):
                break
            time.sleep(0.02)
        key = lab.exec("n1", ["wg", "genkey"]).stdout.strip()
        lab.exec("n1", ["wg", "set", lab.iface("n1"), "listen-port", str(PORT), "private-key", "/dev/stdin"], input=key)
        with netns(lab.ns("n1")):
            sender = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
            sender.bind(("127.0.0.1", 0))
            real_attach = rawsock.attach_filter

            early = disco_packet(1)

            def slow_attach(sock: socket.socket, prog: list[bpf.Insn]) -> None:
                # Widen the window between socket() and the filter: these arrive unfiltered.
                for i in range(50):
                    sender.sendto(b"junk" * 10, ("127.0.0.1", PORT))
                    if i == 25:
                        sender.sendto(early, ("127.0.0.1", PORT))
                time.sleep(0.1)
                real_attach(sock, prog)

            monkeypatch.setattr(rawsock, "attach_filter", slow_attach)
            rx = rawsock.RawReceiver(PORT)
            monkeypatch.setattr(rawsock, "attach_filter", real_attach)
            try:
                assert rx.pending == 1  # the drain kept the disco packet and threw the junk away
                sender.sendto(b"junk", ("127.0.0.1", PORT))
                sender.sendto(stun_packet(2), ("127.0.0.1", PORT))
                got = collect(rx, 2)
                assert [p for p, _ in got] == [early, stun_packet(2)]
            finally:
                rx.close()
                sender.close()

            # IPv6: no IP header before the filter; the kernel computes the UDP checksum we leave at 0.
            rx6 = rawsock.RawReceiver(PORT, socket.AF_INET6)
            tx6 = rawsock.RawSender(PORT, socket.AF_INET6)
            s6 = socket.socket(socket.AF_INET6, socket.SOCK_DGRAM)
            s6.bind(("::1", 0))
            s6.settimeout(2)
            try:
                for _ in range(100):
                    s6.sendto(os.urandom(30), ("::1", PORT))
                d3 = disco_packet(3)
                s6.sendto(d3, ("::1", PORT))
                s6.sendto(stun_packet(4), ("::1", PORT + 1))
                got6 = collect(rx6, 1)
                assert [p for p, _ in got6] == [d3]
                assert got6[0][1] == ("::1", s6.getsockname()[1])
                tx6.sendto(b"v6 from the wireguard port", ("::1", s6.getsockname()[1]))
                data, addr = s6.recvfrom(100)
                assert (data, addr[:2]) == (b"v6 from the wireguard port", ("::1", PORT))
            finally:
                rx6.close()
                tx6.close()
                s6.close()
    finally:
        wg.terminate()
        wg.wait(5)
        with contextlib.suppress(FileNotFoundError):
            os.unlink(sock_path)


def test_raw_port_on_asyncio(lab: Lab) -> None:
    lab.build(one_lan(1))
    with netns(lab.ns("n1")):
        asyncio.run(echo_over_raw_port())


async def echo_over_raw_port() -> None:
    # No engine here: the port is free, but nothing binds it; RawPort alone answers disco pings.
    got: list[tuple[bytes, disco.AddrPort]] = []
    done = asyncio.Event()

    def on_packet(payload: bytes, src: disco.AddrPort) -> None:
        got.append((payload, src))
        port.sendto(b"pong:" + payload[:6], src)
        done.set()

    port = rawsock.RawPort(PORT, on_packet)
    loop = asyncio.get_running_loop()
    client = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    client.bind(("127.0.0.1", 0))
    client.setblocking(False)
    try:
        client.sendto(b"not disco at all", ("127.0.0.1", PORT))
        client.sendto(disco_packet(9), ("127.0.0.1", PORT))
        await asyncio.wait_for(done.wait(), 2)
        reply = await asyncio.wait_for(loop.sock_recv(client, 100), 2)
        assert reply == b"pong:" + disco.MAGIC
        assert len(got) == 1 and got[0][1] == ("127.0.0.1", client.getsockname()[1])
        assert port.received == 1
    finally:
        port.close()
        client.close()
