"""Classic BPF programs that let a raw socket see only disco and STUN datagrams to the WireGuard port (sans-IO).

The agent shares the WireGuard engine's UDP port by reading a raw IPPROTO_UDP socket, which gets a copy of every
UDP datagram the host receives. Without a filter each WireGuard data packet would wake Python (measured: 172,020
packets in 4 s of iperf3, and the tunnel fell from 573 to 446 Mbps). These programs run in the kernel
(SO_ATTACH_FILTER) and keep a datagram only if it is addressed to `port` and its payload starts with the disco
magic's first 4 bytes ("TS\\xf0\\x9f") or carries the STUN magic cookie at payload offset 4.

Layout seen by the filter:
- AF_INET raw socket: the IPv4 header, then UDP. `ldxb 4*([0]&0xf)` puts the header length in X, so UDP fields
  are at X+k: dst port X+2, payload X+8.
- AF_INET6 raw socket: no IPv6 header (the kernel strips it before the filter runs and before delivery), so UDP
  starts at 0: dst port 2, payload 8. Extension headers are gone too.

A sock_filter is `struct { u16 code; u8 jt; u8 jf; u32 k; }` in host byte order; `pack()` builds the array that
`struct sock_fprog` points to. `run()` is a small interpreter for the opcodes used here: the tests check the
programs with it, and the receive path uses it to re-filter datagrams that were queued before the filter was
attached.
"""

from __future__ import annotations

import struct
from typing import Final, NamedTuple

from node.errors import LocalError

# Opcode parts, from linux/filter.h.
LD, LDX, JMP, RET = 0x00, 0x01, 0x05, 0x06
W, H, B = 0x00, 0x08, 0x10
ABS, IND, MSH = 0x20, 0x40, 0xA0
JEQ, K = 0x10, 0x00

SO_ATTACH_FILTER: Final = 26
SO_LOCK_FILTER: Final = 44
DISCO_PREFIX: Final = 0x5453F09F  # "TS\xf0\x9f", the first 4 bytes of the disco magic
STUN_COOKIE: Final = 0x2112A442
ACCEPT: Final = 0xFFFFFFFF  # keep the whole datagram
DROP: Final = 0


class Insn(NamedTuple):
    code: int
    jt: int
    jf: int
    k: int


def program_v4(port: int) -> list[Insn]:
    _check_port(port)
    return [
        Insn(LDX | B | MSH, 0, 0, 0),  # X = IPv4 header length
        Insn(LD | H | IND, 0, 0, 2),  # A = UDP dst port
        Insn(JMP | JEQ | K, 0, 4, port),
        Insn(LD | W | IND, 0, 0, 8),  # A = payload[0:4]
        Insn(JMP | JEQ | K, 3, 0, DISCO_PREFIX),
        Insn(LD | W | IND, 0, 0, 12),  # A = payload[4:8]
        Insn(JMP | JEQ | K, 1, 0, STUN_COOKIE),
        Insn(RET | K, 0, 0, DROP),
        Insn(RET | K, 0, 0, ACCEPT),
    ]


def program_v6(port: int) -> list[Insn]:
    _check_port(port)
    return [
        Insn(LD | H | ABS, 0, 0, 2),
        Insn(JMP | JEQ | K, 0, 4, port),
        Insn(LD | W | ABS, 0, 0, 8),
        Insn(JMP | JEQ | K, 3, 0, DISCO_PREFIX),
        Insn(LD | W | ABS, 0, 0, 12),
        Insn(JMP | JEQ | K, 1, 0, STUN_COOKIE),
        Insn(RET | K, 0, 0, DROP),
        Insn(RET | K, 0, 0, ACCEPT),
    ]


def _check_port(port: int) -> None:
    if not 0 < port <= 0xFFFF:
        raise ValueError(f"port out of range: {port}")


def pack(prog: list[Insn]) -> bytes:
    """The sock_filter array, native byte order as the kernel reads it."""
    return b"".join(struct.pack("=HBBI", *insn) for insn in prog)


class BpfError(LocalError, ValueError):
    pass


def run(prog: list[Insn], packet: bytes) -> int:
    """Interpret `prog` on `packet` like the kernel: returns how many bytes to keep (0 = drop). A load past the
    end of the packet ends the program with 0, as in the kernel."""
    a = x = 0
    pc = 0
    # Classic BPF only jumps forward, so each instruction runs at most once.
    while pc < len(prog):
        code, jt, jf, k = prog[pc]
        pc += 1
        cls = code & 0x07
        if cls == RET:
            return k if code & 0x18 == K else a
        if cls in (LD, LDX):
            size = {W: 4, H: 2, B: 1}[code & 0x18]
            mode = code & 0xE0
            off = k + x if mode == IND else k
            if off + size > len(packet):
                return 0
            if cls == LDX and mode == MSH:
                x = 4 * (packet[off] & 0x0F)
            elif cls == LD and mode in (ABS, IND):
                a = int.from_bytes(packet[off : off + size], "big")
            else:
                raise BpfError(f"unsupported load 0x{code:02x}")
            continue
        if code == JMP | JEQ | K:
            pc += jt if a == k else jf
            continue
        raise BpfError(f"unsupported opcode 0x{code:02x}")
    raise BpfError("program fell off the end")
