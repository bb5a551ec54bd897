"""What quad-100 does with one query packet (pure: no sockets, no clock).

    Answerer(table).handle(packet, udp=True) -> Reply(bytes) | Forward(upstreams, query) | None (dropped)

Wire format: RFC 1035 messages. UDP answers are limited to 512 bytes, or to the query's EDNS payload size
(at most 1232, what we advertise back in our OPT); a larger answer goes out with TC and no records, so the
client retries over TCP, where the limit is 65535.

Order (PROTOCOLS.md 5): a known name (exact, or a single label under a search domain) -> its A/AAAA with
TTL 5 s, NODATA for other types; a PTR for a tailnet address -> its FQDN; a name inside a local zone ->
NXDOMAIN; a split-DNS suffix -> Forward to its resolvers; anything else -> Forward to the upstreams, or
SERVFAIL when there are none. Only class IN, opcode QUERY, one question; other queries get FORMERR,
NOTIMP or REFUSED; a packet too short for a header, or a response, is dropped (answering could loop).

Hot path: answers made locally are cached packed, keyed by the question's bytes (lowercased) and whether the
query had EDNS. A query whose header and question parse by hand and that carries nothing but an optional
plain OPT record is served from that cache without dnslib: the id is patched and the question is echoed as
asked (0x20 case kept). The cache is dropped with the table.
"""

from __future__ import annotations

import struct
from dataclasses import dataclass

from dnslib import AAAA, CLASS, EDNS0, OPCODE, PTR, QTYPE, RCODE, RR, A, DNSError, DNSRecord

from node.dns.table import TTL, Table, Upstream

UDP_MIN = 512
EDNS_SIZE = 1232
TCP_MAX = 65535
CACHE_MAX = 10000
T_A, T_AAAA, T_PTR, T_ANY, T_OPT = 1, 28, 12, 255, 41


@dataclass(frozen=True)
class Reply:
    data: bytes


@dataclass(frozen=True)
class Forward:
    upstreams: tuple[Upstream, ...]
    query: DNSRecord  # the parsed query (the shell forwards `packet` and builds SERVFAIL from this)
    packet: bytes


def _fast_question(packet: bytes) -> tuple[bytes, int, bool, int] | None:
    """(question bytes, end offset, has EDNS, UDP payload size) when the packet is a plain one-question
    query this module can serve by hand; None sends it down the slow path."""
    if len(packet) < 17:
        return None
    flags, qd, an, ns, ar = struct.unpack_from("!HHHHH", packet, 2)
    if flags & 0xF800 or qd != 1 or an or ns or ar > 1:  # QR set, or an opcode other than QUERY
        return None
    i = 12
    n = len(packet)
    while True:
        if i >= n:
            return None
        ln = packet[i]
        if ln == 0:
            i += 1
            break
        if ln > 63:  # compression in a question: slow path
            return None
        i += ln + 1
    end = i + 4
    if end > n:
        return None
    size = UDP_MIN
    edns = False
    if ar:
        # a root-name OPT: 0x00, type 41, class = payload size, ttl, rdlen 0
        if n != end + 11 or packet[end] != 0 or packet[end + 1:end + 3] != b"\x00\x29":
            return None
        size = struct.unpack_from("!H", packet, end + 3)[0]
        if packet[end + 9:end + 11] != b"\x00\x00":
            return None
        edns = True
    elif n != end:
        return None
    return packet[12:end], end, edns, size


class Answerer:
    def __init__(self, table: Table | None = None) -> None:
        self.table = table or Table()
        self.cache: dict[tuple[bytes, bool], bytes] = {}
        self.hits = 0
        self.forwarded = 0

    def set_table(self, table: Table) -> None:
        self.table = table
        self.cache = {}

    def handle(self, packet: bytes, udp: bool = True) -> Reply | Forward | None:
        fast = _fast_question(packet)
        if fast is not None:
            q, end, edns, size = fast
            hit = self.cache.get((key(q), edns))
            if hit is not None:
                self.hits += 1
                return Reply(_limit(packet[:2] + hit[2:12] + q + hit[end:], udp, edns, size))
        return self._slow(packet, udp, fast)

    def _slow(self, packet: bytes, udp: bool, fast: tuple[bytes, int, bool, int] | None) -> Reply | Forward | None:
        if len(packet) < 12 or packet[2] & 0x80:  # no header, or a response: never answer
            return None
        try:
            req = DNSRecord.parse(packet)
        except (DNSError, ValueError, IndexError, struct.error, UnicodeDecodeError):
            return Reply(formerr(packet))
        except Exception:  # dnslib raises assorted errors on garbage; a query we cannot read is FORMERR
            return Reply(formerr(packet))
        opt = [r for r in req.ar if r.rtype == T_OPT]
        edns = bool(opt)
        size = opt[0].rclass if opt else UDP_MIN
        if req.header.opcode != OPCODE.QUERY:
            return Reply(self._pack(req, RCODE.NOTIMP, edns, udp, size))
        if len(req.questions) != 1 or len(opt) > 1:
            return Reply(self._pack(req, RCODE.FORMERR, edns, udp, size))
        q = req.questions[0]
        if q.qclass != CLASS.IN:
            return Reply(self._pack(req, RCODE.REFUSED, edns, udp, size))
        try:
            name = str(q.qname).lower()
        except Exception:
            return Reply(self._pack(req, RCODE.FORMERR, edns, udp, size))
        if not name.endswith("."):
            name += "."
        qtype = q.qtype
        resp = req.reply(ra=1, aa=0)
        resp.ar = []
        answered = self._local(resp, name, qtype)
        if answered is None:
            ups = self.table.route(name)
            if ups is None:
                ups = self.table.upstreams
            if not ups:
                resp.header.rcode = RCODE.SERVFAIL
                return Reply(self._finish(resp, edns, udp, size))
            self.forwarded += 1
            return Forward(ups, req, packet)
        out = self._finish(resp, edns, udp, size)
        if fast is not None and len(self.cache) < CACHE_MAX:
            full = self._finish(resp, edns, False, size)
            self.cache[(key(fast[0]), fast[2])] = full
        return Reply(out)

    def _local(self, resp: DNSRecord, name: str, qtype: int) -> bool | None:
        """Fills `resp` when the name is ours; None when it must be forwarded."""
        t = self.table
        hit = t.lookup(name)
        if hit is not None:
            _, (v4, v6) = hit
            resp.header.aa = 1
            qn = resp.q.qname
            if qtype in (T_A, T_ANY):
                for a in v4:
                    resp.add_answer(RR(qn, QTYPE.A, rdata=A(a), ttl=TTL))
            if qtype in (T_AAAA, T_ANY):
                for a in v6:
                    resp.add_answer(RR(qn, QTYPE.AAAA, rdata=AAAA(a), ttl=TTL))
            return True
        if qtype in (T_PTR, T_ANY):
            target = t.ptr.get(name)
            if target is not None:
                resp.header.aa = 1
                resp.add_answer(RR(resp.q.qname, QTYPE.PTR, rdata=PTR(target), ttl=TTL))
                return True
        zone = t.local_zone(name)
        if zone is not None:
            resp.header.aa = 1
            if name in t.ptr:  # a known reverse name, another type: NODATA
                return True
            resp.header.rcode = RCODE.NXDOMAIN
            return True
        return None

    def _finish(self, resp: DNSRecord, edns: bool, udp: bool, size: int) -> bytes:
        if edns:
            resp.add_ar(EDNS0(udp_len=EDNS_SIZE))
        out = bytes(resp.pack())
        if edns:
            resp.ar = []
        return _limit(out, udp, edns, size)

    def _pack(self, req: DNSRecord, rcode: int, edns: bool, udp: bool, size: int) -> bytes:
        resp = req.reply(ra=1, aa=0)
        resp.ar = []
        resp.rr = []
        resp.header.rcode = rcode
        return self._finish(resp, edns, udp, size)


def question_bytes(packet: bytes) -> bytes | None:
    """The first question of a message as it is on the wire (no compression), or None."""
    if len(packet) < 17 or struct.unpack_from("!H", packet, 4)[0] != 1:
        return None
    i, n = 12, len(packet)
    while i < n and packet[i] != 0:
        if packet[i] > 63:
            return None
        i += packet[i] + 1
    return packet[12:i + 5] if i + 5 <= n else None


def key(question: bytes) -> bytes:
    """The cache key of a question: the name lowercased (the type and class bytes as they are)."""
    return bytes(question[:-4].lower() + question[-4:])


def _limit(out: bytes, udp: bool, edns: bool, size: int) -> bytes:
    limit = (min(max(size, UDP_MIN), EDNS_SIZE) if edns else UDP_MIN) if udp else TCP_MAX
    return out if len(out) <= limit else truncate(out)


def truncate(out: bytes) -> bytes:
    """The header and question of `out` with TC set and no records (the client asks again over TCP)."""
    flags = struct.unpack_from("!H", out, 2)[0] | 0x0200
    i = 12
    qd = struct.unpack_from("!H", out, 4)[0]
    for _ in range(qd):
        while out[i] != 0:
            if out[i] & 0xC0:
                i += 1
                break
            i += out[i] + 1
        i += 5
    return out[:2] + struct.pack("!HHHHH", flags, qd, 0, 0, 0) + out[12:i]


def formerr(packet: bytes) -> bytes:
    """FORMERR for a query we cannot parse: its id and opcode, no question (we could not read one)."""
    ident = packet[:2]
    opcode = packet[2] & 0x78
    return ident + bytes([0x80 | opcode, RCODE.FORMERR]) + b"\x00" * 8


def servfail(query: DNSRecord) -> bytes:
    resp = query.reply(ra=1, aa=0)
    resp.ar = [r for r in query.ar if r.rtype == T_OPT][:1]
    if resp.ar:
        resp.ar = []
        resp.add_ar(EDNS0(udp_len=EDNS_SIZE))
    resp.rr = []
    resp.header.rcode = RCODE.SERVFAIL
    return bytes(resp.pack())


def fit_udp(answer: bytes, query: DNSRecord) -> bytes:
    """An upstream's answer for a UDP client: TC when it exceeds what the client can take."""
    opt = [r for r in query.ar if r.rtype == T_OPT]
    limit = min(max(opt[0].rclass, UDP_MIN), 4096) if opt else UDP_MIN
    return answer if len(answer) <= limit else truncate(answer)
