"""Raw sockets that share the WireGuard engine's UDP port: send and receive disco and STUN from it.

The engine (wireguard-go or kernel WireGuard) owns the UDP port, so we cannot bind it. We still must send disco
pings and STUN requests *from* that port, or the NAT mappings we learn and punch would not be WireGuard's.

Send: an AF_INET SOCK_RAW IPPROTO_UDP socket without IP_HDRINCL. The kernel writes the IP header (source address
by routing, as for any socket); we write the 8-byte UDP header with the WireGuard port as source port:

    src_port[2] dst_port[2] length[2] checksum[2] payload

The IPv4 UDP checksum is 0 ("not computed", RFC 768): computing it needs the source address the kernel will
pick. For IPv6 the checksum is mandatory; IPV6_CHECKSUM=6 makes the kernel fill it in at offset 6 with the
pseudo-header it builds.

Receive: a raw IPPROTO_UDP socket of the same family, with the classic BPF filter of node/bpf.py attached, so
only disco and STUN datagrams to our port reach Python. The engine gets its own copy of those datagrams and drops
them as junk. Datagrams that arrived between socket() and SO_ATTACH_FILTER went through unfiltered; `open` drains
them and keeps only those the filter program accepts (checked with bpf.run).

AF_INET receive sockets see the IPv4 header, AF_INET6 ones only the UDP header (the source address comes from
recvfrom). Both need CAP_NET_RAW.
"""

from __future__ import annotations

import asyncio
import ctypes
import ipaddress
import socket
import struct
from collections import deque
from collections.abc import Callable
from typing import Final

from node import bpf
from node.disco import AddrPort
from node.errors import RemoteError

IPV6_CHECKSUM: Final = 7  # linux/in6.h; Python's socket module lacks it
MAX_DATAGRAM: Final = 65535
# Bounds the pre-filter drain: at line rate a busy port could refill the queue while we read it.
MAX_DRAIN: Final = 4096


class RawPacketError(RemoteError, ValueError):
    pass


def udp_header(src_port: int, dst_port: int, payload_len: int) -> bytes:
    length = 8 + payload_len
    if length > 0xFFFF:
        raise ValueError(f"UDP datagram of {length} bytes is too big")
    return struct.pack("!HHHH", src_port, dst_port, length, 0)


def parse_v4(packet: bytes, port: int) -> tuple[bytes, AddrPort]:
    """(payload, (src ip, src port)) of an IPv4+UDP packet to `port`, as an AF_INET raw socket delivers it."""
    if len(packet) < 20 or packet[0] >> 4 != 4:
        raise RawPacketError("not an IPv4 packet")
    ihl = 4 * (packet[0] & 0x0F)
    if ihl < 20 or len(packet) < ihl + 8:
        raise RawPacketError(f"IPv4 packet of {len(packet)} bytes with header length {ihl}")
    src = str(ipaddress.IPv4Address(packet[12:16]))
    return _parse_udp(packet[ihl:], port, src)


def parse_v6(datagram: bytes, src_ip: str, port: int) -> tuple[bytes, AddrPort]:
    """(payload, (src ip, src port)) of a UDP datagram as an AF_INET6 raw socket delivers it (no IP header)."""
    return _parse_udp(datagram, port, src_ip.split("%", 1)[0])


def _parse_udp(udp: bytes, port: int, src_ip: str) -> tuple[bytes, AddrPort]:
    if len(udp) < 8:
        raise RawPacketError(f"UDP datagram of {len(udp)} bytes")
    sport, dport, length = struct.unpack("!HHH", udp[:6])
    if dport != port:
        raise RawPacketError(f"datagram to port {dport}, not {port}")
    if length < 8 or length > len(udp):
        raise RawPacketError(f"UDP length field {length} for {len(udp)} bytes")
    return udp[8:length], (src_ip, sport)


def attach_filter(sock: socket.socket, prog: list[bpf.Insn]) -> None:
    code = ctypes.create_string_buffer(bpf.pack(prog))
    # struct sock_fprog { unsigned short len; struct sock_filter *filter; }, native layout
    fprog = struct.pack("HP", len(prog), ctypes.addressof(code))
    sock.setsockopt(socket.SOL_SOCKET, bpf.SO_ATTACH_FILTER, fprog)


class RawReceiver:
    """A non-blocking raw socket that yields only disco/STUN datagrams to `port`."""

    def __init__(self, port: int, family: socket.AddressFamily = socket.AF_INET) -> None:
        if family not in (socket.AF_INET, socket.AF_INET6):
            raise ValueError(f"unsupported family {family!r}")
        self.port = port
        self.family = family
        self.prog = bpf.program_v4(port) if family == socket.AF_INET else bpf.program_v6(port)
        self.sock = socket.socket(family, socket.SOCK_RAW, socket.IPPROTO_UDP)
        self._pending: deque[tuple[bytes, AddrPort]] = deque()
        self.malformed = 0
        try:
            self.sock.setblocking(False)
            attach_filter(self.sock, self.prog)
            self._drain()
        except BaseException:
            self.sock.close()
            raise

    def _drain(self) -> None:
        for _ in range(MAX_DRAIN):
            try:
                data, addr = self.sock.recvfrom(MAX_DATAGRAM)
            except BlockingIOError:
                return
            # The v6 socket has no IP header, so the program's offsets apply to `data` for both families.
            if bpf.run(self.prog, data):
                self._keep(data, addr)

    def _keep(self, data: bytes, addr: tuple[object, ...]) -> None:
        try:
            if self.family == socket.AF_INET:
                self._pending.append(parse_v4(data, self.port))
            else:
                self._pending.append(parse_v6(data, str(addr[0]), self.port))
        except RawPacketError:
            self.malformed += 1

    def recv(self) -> tuple[bytes, AddrPort] | None:
        """The next (payload, source), or None when nothing is queued."""
        while not self._pending:
            try:
                data, addr = self.sock.recvfrom(MAX_DATAGRAM)
            except BlockingIOError:
                return None
            self._keep(data, addr)
        return self._pending.popleft()

    @property
    def pending(self) -> int:
        return len(self._pending)

    def fileno(self) -> int:
        return self.sock.fileno()

    def close(self) -> None:
        self.sock.close()


class RawSender:
    """Sends UDP datagrams with source port `port` through a raw socket, beside the engine that owns it."""

    def __init__(self, port: int, family: socket.AddressFamily = socket.AF_INET, fwmark: int = 0) -> None:
        self.port = port
        self.family = family
        self.sock = socket.socket(family, socket.SOCK_RAW, socket.IPPROTO_UDP)
        try:
            self.sock.setblocking(False)
            if fwmark:  # the exit-node bypass (node/sockmark.py): disco and STUN never enter the tunnel
                self.sock.setsockopt(socket.SOL_SOCKET, socket.SO_MARK, fwmark)
            # A raw socket receives too; this one must not queue a copy of every datagram nobody reads.
            attach_filter(self.sock, [bpf.Insn(bpf.RET | bpf.K, 0, 0, bpf.DROP)])
            if family == socket.AF_INET6:
                self.sock.setsockopt(socket.IPPROTO_IPV6, IPV6_CHECKSUM, 6)
        except BaseException:
            self.sock.close()
            raise

    def sendto(self, payload: bytes, addr: AddrPort) -> None:
        """Raises OSError as sendto does (BlockingIOError when the socket buffer is full: the datagram is lost,
        like any UDP datagram)."""
        ip, dport = addr
        # Raw sockets take port 0 in the address; the port is in our header.
        self.sock.sendto(udp_header(self.port, dport, len(payload)) + payload, (ip, 0))

    def close(self) -> None:
        self.sock.close()


OnPacket = Callable[[bytes, AddrPort], object]


class RawPort:
    """Both directions for one family, wired to an asyncio loop: `on_packet(payload, src)` for each disco or
    STUN datagram to `port`; `sendto(payload, addr)` from `port`."""

    def __init__(
        self,
        port: int,
        on_packet: OnPacket,
        family: socket.AddressFamily = socket.AF_INET,
        loop: asyncio.AbstractEventLoop | None = None,
        fwmark: int = 0,
    ) -> None:
        self.loop = loop or asyncio.get_running_loop()
        self.receiver = RawReceiver(port, family)
        try:
            self.sender = RawSender(port, family, fwmark)
        except BaseException:
            self.receiver.close()
            raise
        self.on_packet = on_packet
        self.received = 0
        self.send_errors = 0
        self.loop.add_reader(self.receiver.fileno(), self._readable)
        # Datagrams kept from the drain are already queued and will not make the fd readable.
        self.loop.call_soon(self._readable)

    def _readable(self) -> None:
        # Bounded, so a flood of valid-looking datagrams cannot starve the loop.
        for _ in range(256):
            item = self.receiver.recv()
            if item is None:
                return
            self.received += 1
            self.on_packet(*item)
        if self.receiver.pending:
            self.loop.call_soon(self._readable)

    def sendto(self, payload: bytes, addr: AddrPort) -> bool:
        """False when the kernel refused the datagram (no route, a firewall's EPERM, a full buffer): it is lost,
        as UDP may lose it anyway, and counted in `send_errors`."""
        try:
            self.sender.sendto(payload, addr)
        except (OSError, ValueError):
            self.send_errors += 1
            return False
        return True

    def close(self) -> None:
        if self.receiver.sock.fileno() >= 0:
            self.loop.remove_reader(self.receiver.fileno())
        self.receiver.close()
        self.sender.close()
