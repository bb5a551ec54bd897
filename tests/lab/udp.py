"""Tiny UDP tools run inside lab namespaces with `python -c`: a reflector and a prober.

The reflector answers every datagram with the source `ip:port` it saw (a poor man's STUN), which is how the lab
tests see what a NAT did to a flow.
"""

from __future__ import annotations

import sys
from collections.abc import Sequence

REFLECT = r"""
import socket, sys
s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
s.bind((sys.argv[1], int(sys.argv[2])))
print("ready", flush=True)
while True:
    data, addr = s.recvfrom(2048)
    s.sendto(f"{addr[0]}:{addr[1]}".encode(), addr)
"""

# argv: local_port dest... ; prints one line per dest: "dest seen" or "dest -" when nothing came back
PROBE = r"""
import socket, sys
s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
s.bind(("0.0.0.0", int(sys.argv[1])))
s.settimeout(0.2)
for dest in sys.argv[2:]:
    host, port = dest.rsplit(":", 1)
    seen = "-"
    for _ in range(10):
        try:
            s.sendto(b"probe", (host, int(port)))
        except PermissionError:  # a firewall in this namespace refused it
            break
        try:
            data, addr = s.recvfrom(2048)
        except TimeoutError:
            continue
        if f"{addr[0]}:{addr[1]}" == dest:
            seen = data.decode()
            break
    print(dest, seen, flush=True)
"""

# argv: ip port seconds ; prints how many datagrams arrived
COUNT = r"""
import socket, sys, time
s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
s.bind((sys.argv[1], int(sys.argv[2])))
print("ready", flush=True)
s.settimeout(0.1)
n, end = 0, time.monotonic() + float(sys.argv[3])
while time.monotonic() < end:
    try:
        s.recvfrom(2048)
        n += 1
    except TimeoutError:
        pass
print(n, flush=True)
"""


def py(script: str, *args: object) -> Sequence[str]:
    return [sys.executable, "-c", script, *(str(a) for a in args)]
