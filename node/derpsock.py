"""Loopback UDP sockets that carry a peer's WireGuard packets over DERP.

While no direct path to a peer is confirmed, its WireGuard endpoint is `127.0.0.1:<port>`, a UDP socket of the
agent made for that peer alone. The engine sends the peer's packets there; the agent hands each one to
`send_to_derp(node_key, packet)`, which sends it to the peer's node key over DERP. Packets that arrive over DERP
from that node key go back to the engine's port from the same socket, so the engine sees them come from the
endpoint it has for that peer and keeps it.

One socket per peer is what lets the engine keep per-peer endpoints and the agent know the destination key
without parsing WireGuard (receiver indexes are not keys). Only datagrams from the engine's own port on loopback
are forwarded; a local process cannot bind that port while the engine holds it.

The packets are WireGuard ciphertext: DERP sees nothing else. Disco messages that arrive over DERP must be taken
out (disco.looks_like_disco) and given to paths.Magic before `deliver` is called with the rest.
"""

from __future__ import annotations

import asyncio
import socket
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass

from node.disco import AddrPort

SendToDerp = Callable[[bytes, bytes], None]
MAX_DATAGRAM = 65535
# Per wakeup, so one busy peer cannot starve the loop.
READ_BUDGET = 64


@dataclass(slots=True)
class _Relay:
    node_key: bytes
    sock: socket.socket


class DerpSockets:
    """Per-peer loopback endpoints for the engine listening on `wg_port`."""

    def __init__(
        self,
        wg_port: int,
        send_to_derp: SendToDerp,
        *,
        host: str = "127.0.0.1",
        loop: asyncio.AbstractEventLoop | None = None,
    ) -> None:
        self.loop = loop or asyncio.get_running_loop()
        self.wg_port = wg_port
        self.host = host
        self.send_to_derp = send_to_derp
        self._relays: dict[bytes, _Relay] = {}
        self.stats: Counter[str] = Counter()

    def open(self, node_key: bytes) -> AddrPort:
        """The loopback endpoint for a peer, made on first use. Set it as the peer's WireGuard endpoint."""
        relay = self._relays.get(node_key)
        if relay is None:
            family = socket.AF_INET6 if ":" in self.host else socket.AF_INET
            sock = socket.socket(family, socket.SOCK_DGRAM)
            try:
                sock.setblocking(False)
                sock.bind((self.host, 0))
            except BaseException:
                sock.close()
                raise
            relay = self._relays[node_key] = _Relay(node_key, sock)
            self.loop.add_reader(sock.fileno(), self._readable, relay)
        return self.endpoint_of(relay)

    def endpoint(self, node_key: bytes) -> AddrPort | None:
        relay = self._relays.get(node_key)
        return None if relay is None else self.endpoint_of(relay)

    @staticmethod
    def endpoint_of(relay: _Relay) -> AddrPort:
        host, port = relay.sock.getsockname()[:2]
        return (str(host), int(port))

    def node_key_for(self, endpoint: AddrPort) -> bytes | None:
        """Which peer a loopback endpoint belongs to (to read the engine's endpoints back)."""
        for key, relay in self._relays.items():
            if self.endpoint_of(relay) == endpoint:
                return key
        return None

    def deliver(self, node_key: bytes, packet: bytes) -> bool:
        """A WireGuard packet from this peer arrived over DERP: give it to the engine. False when the peer has
        no socket (it is not on DERP from our side) or the datagram could not be queued."""
        relay = self._relays.get(node_key)
        if relay is None:
            self.stats["no_socket"] += 1
            return False
        try:
            relay.sock.sendto(packet, (self.host, self.wg_port))
        except OSError:  # buffer full or engine gone: lost, like any datagram
            self.stats["send_error"] += 1
            return False
        self.stats["from_derp"] += 1
        return True

    def close(self, node_key: bytes) -> None:
        relay = self._relays.pop(node_key, None)
        if relay is not None:
            self.loop.remove_reader(relay.sock.fileno())
            relay.sock.close()

    def close_all(self) -> None:
        for key in list(self._relays):
            self.close(key)

    def __len__(self) -> int:
        return len(self._relays)

    def _readable(self, relay: _Relay) -> None:
        for _ in range(READ_BUDGET):
            try:
                data, addr = relay.sock.recvfrom(MAX_DATAGRAM)
            except (BlockingIOError, InterruptedError):
                return
            except OSError:  # e.g. ICMP port unreachable reported on the socket
                self.stats["recv_error"] += 1
                return
            if addr[1] != self.wg_port or addr[0] != self.host:
                self.stats["foreign"] += 1
                continue
            self.stats["to_derp"] += 1
            self.send_to_derp(relay.node_key, data)
