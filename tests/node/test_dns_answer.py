"""The resolver core: names, short names, PTR, NODATA, NXDOMAIN, forwarding decisions, EDNS, TC, the packed
cache, and fuzzed garbage (FORMERR or dropped, never an exception)."""

from __future__ import annotations

import ipaddress

from dnslib import EDNS0, QTYPE, RCODE, DNSQuestion, DNSRecord
from hypothesis import given, settings
from hypothesis import strategies as st

from coord import wire
from node.dns.answer import Answerer, Forward, Reply, fit_udp, servfail
from node.dns.table import Table, parse_upstream


def node(i: int, name: str) -> wire.Node:
    return wire.Node(id=i, name=name, addresses=(ipaddress.ip_interface(f"100.64.0.{i}/32"),
                                                 ipaddress.ip_interface(f"fd7a:115c:a1e0::{i}/128")))


DNS = wire.DNSConfig(domains=("shoal.internal",), proxied=True, routes=(
    ("shoal.internal.", ()), ("corp.example.", ("192.0.2.53", "[2001:db8::53]:5353"))),
    resolvers=("198.51.100.53",), extra_records=(("db.shoal.internal", "A", "100.64.9.9"),
                                                 ("bad.shoal.internal", "TXT", "x")))
SELF = node(1, "alpha.shoal.internal.")
PEERS = [node(2, "beta.shoal.internal.")]


def answerer(dns: wire.DNSConfig = DNS, host: tuple[str, ...] = ()) -> Answerer:
    return Answerer(Table.build(SELF, PEERS, dns, host))


def ask(a: Answerer, name: str, qtype: str = "A", edns: bool = False, ident: int = 7, udp: bool = True) -> DNSRecord:
    q = DNSRecord.question(name, qtype)
    q.header.id = ident
    if edns:
        q.add_ar(EDNS0(udp_len=1232))
    out = a.handle(bytes(q.pack()), udp=udp)
    assert isinstance(out, Reply), out
    return DNSRecord.parse(out.data)


def test_dns_full_and_short_names() -> None:
    a = answerer()
    r = ask(a, "beta.shoal.internal", "A")
    assert r.header.rcode == RCODE.NOERROR and r.header.aa
    assert [(str(x.rdata), x.ttl) for x in r.rr] == [("100.64.0.2", 5)]
    r = ask(a, "BETA", "AAAA")
    assert [str(x.rdata) for x in r.rr] == ["fd7a:115c:a1e0::2"]
    assert str(r.q.qname) == "BETA."
    assert [str(x.rdata) for x in ask(a, "alpha.shoal.internal.", "A").rr] == ["100.64.0.1"]


def test_dns_nodata_nxdomain_extra_records() -> None:
    a = answerer()
    r = ask(a, "beta.shoal.internal", "MX")
    assert r.header.rcode == RCODE.NOERROR and not r.rr
    assert ask(a, "gamma.shoal.internal", "A").header.rcode == RCODE.NXDOMAIN
    assert [str(x.rdata) for x in ask(a, "db.shoal.internal", "A").rr] == ["100.64.9.9"]
    assert ask(a, "bad.shoal.internal", "TXT").header.rcode == RCODE.NXDOMAIN
    assert a.table.skipped == 1


def test_dns_ptr() -> None:
    a = answerer()
    r = ask(a, "2.0.64.100.in-addr.arpa", "PTR")
    assert [str(x.rdata) for x in r.rr] == ["beta.shoal.internal."]
    v6 = ipaddress.ip_address("fd7a:115c:a1e0::1").reverse_pointer
    assert [str(x.rdata) for x in ask(a, v6, "PTR").rr] == ["alpha.shoal.internal."]
    assert ask(a, "9.9.64.100.in-addr.arpa", "PTR").header.rcode == RCODE.NXDOMAIN
    assert ask(a, "2.0.64.100.in-addr.arpa", "A").header.rcode == RCODE.NOERROR


def test_dns_forwarding_decisions() -> None:
    a = answerer()
    q = DNSRecord.question("www.corp.example", "A").pack()
    out = a.handle(q)
    assert isinstance(out, Forward) and out.upstreams == (("192.0.2.53", 53), ("2001:db8::53", 5353))
    out = a.handle(DNSRecord.question("example.org", "A").pack())
    assert isinstance(out, Forward) and out.upstreams == (("198.51.100.53", 53),)
    # no global resolvers: the host's own (never quad-100 itself); none at all: SERVFAIL
    b = answerer(wire.DNSConfig(routes=(("shoal.internal.", ()),)), host=("100.100.100.100", "203.0.113.5"))
    out = b.handle(DNSRecord.question("example.org", "A").pack())
    assert isinstance(out, Forward) and out.upstreams == (("203.0.113.5", 53),)
    fb = answerer(wire.DNSConfig(fallback_resolvers=("192.0.2.9",)))
    out = fb.handle(DNSRecord.question("example.org", "A").pack())
    assert isinstance(out, Forward) and out.upstreams == (("192.0.2.9", 53),)
    c = answerer(wire.DNSConfig())
    assert ask(c, "example.org").header.rcode == RCODE.SERVFAIL
    assert ask(c, "zzz.shoal.internal").header.rcode == RCODE.NXDOMAIN  # the self name's suffix is local
    sf = DNSRecord.parse(servfail(DNSRecord.question("x.org")))
    assert sf.header.rcode == RCODE.SERVFAIL


def test_dns_edns_and_truncation() -> None:
    many = tuple(("big.shoal.internal", "A", f"100.64.1.{i}") for i in range(60))
    a = answerer(wire.DNSConfig(routes=(("shoal.internal.", ()),), extra_records=many))
    r = ask(a, "big.shoal.internal", "A")
    assert r.header.tc and not r.rr
    r = ask(a, "big.shoal.internal", "A", edns=True)
    assert not r.header.tc and len(r.rr) == 60 and r.ar[0].rtype == QTYPE.OPT
    r = ask(a, "big.shoal.internal", "A", udp=False)
    assert not r.header.tc and len(r.rr) == 60
    big = DNSRecord.parse(b"\0" * 12)
    big.add_question(DNSQuestion("x.org"))
    answer = bytes(600)
    assert len(fit_udp(b"\x00\x01\x81\x80\x00\x00\x00\x00\x00\x00\x00\x00" + answer, big)) == 12


def test_dns_cache_patches_id_and_case() -> None:
    a = answerer()
    first = ask(a, "beta.shoal.internal", "A", ident=1)
    assert a.hits == 0
    again = ask(a, "BeTa.shoal.internal", "A", ident=999)
    assert a.hits == 1 and again.header.id == 999 and str(again.q.qname) == "BeTa.shoal.internal."
    assert [str(x.rdata) for x in again.rr] == [str(x.rdata) for x in first.rr]
    e = ask(a, "beta.shoal.internal", "A", edns=True, ident=5)
    assert e.ar and e.ar[0].rtype == QTYPE.OPT
    assert ask(a, "beta.shoal.internal", "A", edns=True, ident=6).ar[0].rtype == QTYPE.OPT and a.hits == 2
    a.set_table(Table())
    assert a.cache == {}


def test_dns_refuses_odd_queries() -> None:
    a = answerer()
    q = DNSRecord.question("beta.shoal.internal", "A", "CH")
    out = a.handle(q.pack())
    assert isinstance(out, Reply) and DNSRecord.parse(out.data).header.rcode == RCODE.REFUSED
    q = DNSRecord.question("beta.shoal.internal")
    q.header.opcode = 2
    out = a.handle(q.pack())
    assert isinstance(out, Reply) and DNSRecord.parse(out.data).header.rcode == RCODE.NOTIMP
    resp = DNSRecord.question("beta.shoal.internal").reply()
    assert a.handle(resp.pack()) is None  # a response is never answered
    assert a.handle(b"\x00\x01") is None


def test_dns_upstream_parsing() -> None:
    assert parse_upstream("192.0.2.1") == ("192.0.2.1", 53)
    assert parse_upstream("192.0.2.1:5353") == ("192.0.2.1", 5353)
    assert parse_upstream("[2001:db8::1]:54") == ("2001:db8::1", 54)
    assert parse_upstream("2001:db8::1") == ("2001:db8::1", 53)
    assert parse_upstream("https://dns.example/q") is None
    assert parse_upstream("192.0.2.1:0") is None


@settings(max_examples=400, deadline=None)
@given(st.binary(max_size=600))
def test_dns_fuzz_garbage(data: bytes) -> None:
    out = answerer().handle(data)
    assert out is None or isinstance(out, (Reply, Forward))
    if isinstance(out, Reply):
        assert out.data[:2] == data[:2] and out.data[2] & 0x80


@settings(max_examples=300, deadline=None)
@given(st.sampled_from(["beta.shoal.internal", "BETA", "x.corp.example", "2.0.64.100.in-addr.arpa", "a.org"]),
       st.integers(0, 65535), st.integers(12, 80), st.binary(max_size=8), st.booleans())
def test_dns_fuzz_mangled_queries(name: str, qtype: int, cut: int, junk: bytes, edns: bool) -> None:
    q = DNSRecord.question(name)
    q.q.qtype = qtype
    if edns:
        q.add_ar(EDNS0(udp_len=4096))
    raw = bytes(q.pack())
    a = answerer()
    for pkt in (raw[:cut], raw + junk, raw[:cut] + junk, raw):
        out = a.handle(pkt)
        assert out is None or isinstance(out, (Reply, Forward))
