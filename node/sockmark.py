"""The bypass firewall mark on the agent's own sockets, so its traffic never enters the tunnel.

With an exit node, every packet of this host is routed into the tunnel (table 52, node/render/exitroute.py)
except what carries `BYPASS_MARK` in the 0xff0000 byte (Tailscale's 0x80000, ts:tsconst/linuxfw.go): the rule at
priority 5210 sends that to the main table. The senders that must carry it, all set here or through
`socket_options`:

    control HTTP (node/control.py)         an httpcore network backend that connects through `connect_tcp`
                                           (httpx's socket_options come after connect: the SYN would not
                                           carry the mark)
    DERP TCP (derp/client.py)              the client's `fwmark`, set on the socket before connect
    raw disco/STUN sender (node/rawsock.py) RawSender(fwmark=)
    WireGuard's UDP socket                 WgConfig.fwmark (UAPI `fwmark=`, netlink WGDEVICE_A_FWMARK)

SO_MARK needs CAP_NET_ADMIN; a mark of 0 sets nothing (unit tests, unprivileged runs).
"""

from __future__ import annotations

import asyncio
import socket

BYPASS_MARK = 0x80000
MARK_MASK = 0xFF0000


def socket_options(mark: int) -> list[tuple[int, int, int]]:
    """httpx/asyncio socket options for `mark` (none for 0)."""
    return [(socket.SOL_SOCKET, socket.SO_MARK, mark)] if mark else []


def mark(sock: socket.socket, value: int) -> None:
    """Sets SO_MARK on `sock` (raises OSError without CAP_NET_ADMIN); 0 leaves the socket alone."""
    if value:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_MARK, value)


async def connect_tcp(host: str, port: int, value: int) -> socket.socket:
    """A connected non-blocking TCP socket to host:port whose SYN already carries the mark."""
    loop = asyncio.get_running_loop()
    infos = await loop.getaddrinfo(host, port, type=socket.SOCK_STREAM)
    err: OSError = OSError(f"cannot resolve {host}")
    for family, kind, proto, _, addr in infos:
        sock = socket.socket(family, kind, proto)
        try:
            mark(sock, value)
            sock.setblocking(False)
            await loop.sock_connect(sock, addr)
        except OSError as e:
            sock.close()
            err = e
            continue
        return sock
    raise err
