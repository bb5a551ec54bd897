# ruff: noqa: E501  (conntrack lines quoted verbatim)
"""node/render/conntrack.py: which tracked flows a narrowed filter cuts, and the commands that cut them."""

from __future__ import annotations

import asyncio
import ipaddress

from hypothesis import given
from hypothesis import strategies as st

from node.render.conntrack import ConntrackCutter, Flow, allowed, parse, refused
from node.run import FakeRunner

LIST = """\
tcp      6 431999 ESTABLISHED src=100.64.0.1 dst=100.64.0.2 sport=40000 dport=22 src=100.64.0.2 dst=100.64.0.1 sport=22 dport=40000 [ASSURED] mark=0 use=1
udp      17 29 src=100.64.0.1 dst=100.64.0.2 sport=5000 dport=7000 [UNREPLIED] src=100.64.0.2 dst=100.64.0.1 sport=7000 dport=5000 mark=0 use=1
udp      17 29 src=100.64.0.2 dst=100.64.0.1 sport=6000 dport=53 src=100.64.0.1 dst=100.64.0.2 sport=53 dport=6000 mark=0 use=1
udp      17 29 src=192.0.2.7 dst=100.64.0.2 sport=1 dport=7000 src=100.64.0.2 dst=192.0.2.7 sport=7000 dport=1 use=1
icmp     1 29 src=100.64.0.1 dst=100.64.0.2 type=8 code=0 id=3 src=100.64.0.2 dst=100.64.0.1 type=0 code=0 id=3 use=1
udp      17 29 src=100.64.0.1 dst=nonsense sport=1 dport=2 use=1
conntrack v1.4.7 (conntrack-tools): 5 flow entries have been shown.
"""

A, B = ipaddress.ip_address("100.64.0.1"), ipaddress.ip_address("100.64.0.2")


def _rule(src: str, ports: tuple[int, int], protos: list[int] | None = None) -> dict[str, object]:
    r: dict[str, object] = {"SrcIPs": [src], "DstPorts": [{"IP": "100.64.0.2/32", "Ports": {"First": ports[0],
                                                                                            "Last": ports[1]}}]}
    if protos is not None:
        r["IPProto"] = protos
    return r


def test_policy_conntrack_parse_reads_original_tuples_and_skips_the_rest() -> None:
    assert parse(LIST) == [
        Flow(6, A, B, 40000, 22),
        Flow(17, A, B, 5000, 7000),
        Flow(17, B, A, 6000, 53),
        Flow(17, ipaddress.ip_address("192.0.2.7"), B, 1, 7000),
    ]


def test_policy_conntrack_refused_only_tailnet_flows_the_rules_no_longer_allow() -> None:
    flows = parse(LIST)
    # narrowed to ssh only: the UDP flow from the peer goes; our own outgoing flow and the outsider stay
    assert refused([_rule("100.64.0.1/32", (22, 22), [6])], flows, ["100.64.0.2/32"]) == [Flow(17, A, B, 5000, 7000)]
    # nothing allowed: both flows from the peer go
    assert refused([], flows, ["100.64.0.2/32"]) == [Flow(6, A, B, 40000, 22), Flow(17, A, B, 5000, 7000)]
    # a range source, default protocols, the port in range: all kept
    assert refused([_rule("100.64.0.0-100.64.0.9", (1, 65535))], flows, ["100.64.0.2"]) == []
    assert allowed([_rule("*", (7000, 7000), [17])], Flow(17, A, B, 5000, 7000))
    assert not allowed([_rule("*", (7000, 7000), [6])], Flow(17, A, B, 5000, 7000))
    assert not allowed([_rule("fd7a:115c:a1e0::/48", (0, 65535))], Flow(17, A, B, 5000, 7000))


def test_policy_conntrack_cutter_deletes_each_refused_flow_by_its_tuple() -> None:
    runner = FakeRunner()
    runner.respond("conntrack -L -f ipv4 -p udp", LIST)
    cut = asyncio.run(ConntrackCutter(runner).cut([_rule("100.64.0.1/32", (22, 22), [6])], ["100.64.0.2/32"]))
    assert cut == [Flow(17, A, B, 5000, 7000)]
    assert runner.transcript == (
        "conntrack -L -f ipv4 -p tcp\n"
        "conntrack -L -f ipv4 -p udp\n"
        "conntrack -L -f ipv6 -p tcp\n"
        "conntrack -L -f ipv6 -p udp\n"
        "conntrack -D -f ipv4 -p udp -s 100.64.0.1 -d 100.64.0.2 --sport 5000 --dport 7000\n"
    )


@given(st.text())
def test_policy_conntrack_parse_never_raises(text: str) -> None:
    for f in parse(text):
        assert f.proto in (6, 17) and f.src.version == f.dst.version
