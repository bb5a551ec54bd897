"""UDP glue for the STUN server: answers every binding request with the sender's address (see derp.stun)."""

from __future__ import annotations

import asyncio
import logging
import socket
from dataclasses import dataclass
from typing import cast

from derp import stun

log = logging.getLogger("derp.stun")


@dataclass
class StunStats:
    requests: int = 0
    responses: int = 0
    bad: int = 0
    send_errors: int = 0


class _StunProtocol(asyncio.DatagramProtocol):
    def __init__(self, stats: StunStats) -> None:
        self.stats = stats
        self.transport: asyncio.DatagramTransport | None = None

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = cast(asyncio.DatagramTransport, transport)

    def datagram_received(self, data: bytes, addr: tuple[str | int, ...]) -> None:
        self.stats.requests += 1
        try:
            req = stun.parse_request(data)
            reply = stun.build_response(req, str(addr[0]), int(addr[1]))
        except (stun.StunError, ValueError) as e:
            self.stats.bad += 1
            log.debug("ignored datagram from %s: %s", addr, e)
            return
        assert self.transport is not None
        self.transport.sendto(reply, addr)
        self.stats.responses += 1

    def error_received(self, exc: Exception) -> None:
        # ICMP errors for earlier replies land here; they are the requester's problem, not ours.
        self.stats.send_errors += 1


class StunServer:
    """A running STUN server. ``port`` is the bound port (useful with port 0); ``close()`` stops it."""

    def __init__(self, transport: asyncio.DatagramTransport, stats: StunStats) -> None:
        self.transport = transport
        self.stats = stats
        sockname = transport.get_extra_info("sockname")
        self.host, self.port = str(sockname[0]), int(sockname[1])

    def close(self) -> None:
        self.transport.close()


async def start_stun_server(host: str = "::", port: int = 3478) -> StunServer:
    """Listen for STUN binding requests on UDP ``host:port``. ``::`` serves IPv4 and IPv6 where the OS allows it."""
    loop = asyncio.get_running_loop()
    stats = StunStats()
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_DGRAM)
    try:
        if family == socket.AF_INET6:
            sock.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 0)
        sock.bind((host, port))
    except OSError:
        sock.close()
        raise
    transport, _ = await loop.create_datagram_endpoint(lambda: _StunProtocol(stats), sock=sock)
    return StunServer(transport, stats)
