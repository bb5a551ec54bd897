"""netcheck: the sans-IO core against fake STUN servers, and the glue against real ones on loopback."""

from __future__ import annotations

import asyncio
import itertools
from collections.abc import Callable

import pytest
from hypothesis import given
from hypothesis import strategies as st

from coord import wire
from derp import stun
from derp.stunserver import start_stun_server
from node import netcheck
from node.disco import AddrPort
from node.netcheck import Netcheck, Region, StunServer

S1: AddrPort = ("203.0.113.1", 3478)
S2: AddrPort = ("203.0.113.2", 3478)
S3: AddrPort = ("198.51.100.9", 3478)
REGIONS = [
    Region(900, "lab", (StunServer(900, "900a", S1), StunServer(900, "900b", S2))),
    Region(901, "far", (StunServer(901, "901a", S3),)),
]


def rand() -> Callable[[int], bytes]:
    c = itertools.count(1)
    return lambda n: next(c).to_bytes(n, "big")


def answer(nc: Netcheck, now: float, seen: dict[AddrPort, AddrPort], drop: frozenset[AddrPort] = frozenset()) -> int:
    n = 0
    while (out := nc.next_transmit()) is not None:
        data, dst = out
        if dst in drop:
            continue
        req = stun.parse_request(data)
        assert nc.receive(stun.build_response(req, *seen[dst]), dst, now)
        n += 1
    return n


def test_easy_nat_report() -> None:
    nc = Netcheck(REGIONS, 0.0, rand=rand())
    pub = ("192.0.2.77", 41641)
    sent = []
    while (out := nc.next_transmit()) is not None:
        sent.append(out)
    assert [dst for _, dst in sent] == [S1, S2, S3]
    lat = {S1: 0.012, S2: 0.015, S3: 0.080}
    for data, dst in sent:
        req = stun.parse_request(data)
        assert nc.receive(stun.build_response(req, *pub), dst, lat[dst])
    assert nc.finished
    r = nc.report
    assert r.udp and r.ipv4 and not r.ipv6
    assert r.global_v4 == pub
    assert r.mapping_varies_by_dest_ip is False
    assert r.region_latency == {900: pytest.approx(0.012), 901: pytest.approx(0.080)}
    assert r.preferred_derp == 900
    assert r.endpoints() == [pub]
    assert r.to_json()["GlobalV4"] == "192.0.2.77:41641"


def test_hard_nat_varies_by_destination() -> None:
    nc = Netcheck(REGIONS, 0.0, rand=rand())
    answer(nc, 0.02, {S1: ("192.0.2.77", 1001), S2: ("192.0.2.77", 2002), S3: ("192.0.2.77", 3003)})
    assert nc.finished
    assert nc.report.mapping_varies_by_dest_ip is True
    assert nc.report.global_v4 == ("192.0.2.77", 1001)
    assert len(nc.report.endpoints()) == 3


def test_one_server_cannot_tell_mapping() -> None:
    nc = Netcheck(REGIONS[1:], 0.0, rand=rand())
    answer(nc, 0.02, {S3: ("192.0.2.77", 1)})
    assert nc.report.mapping_varies_by_dest_ip is None


def test_retransmits_then_timeout_when_blocked() -> None:
    nc = Netcheck(REGIONS[1:], 0.0, rand=rand(), timeout=3.0)
    times = []
    now = 0.0
    while not nc.finished:
        while nc.next_transmit() is not None:
            times.append(now)
        t = nc.next_timer()
        assert t is not None and t > now
        now = t
        nc.handle_timer(now)
    assert times == pytest.approx([0.0, 0.1, 0.3, 0.5])
    assert now == 3.0
    assert not nc.report.udp and nc.report.preferred_derp == 0
    assert nc.next_timer() is None


def test_late_answer_to_a_retransmit_measures_its_own_latency() -> None:
    nc = Netcheck(REGIONS[1:], 0.0, rand=rand())
    first = nc.next_transmit()
    assert first is not None
    nc.handle_timer(0.1)
    second = nc.next_transmit()
    assert second is not None
    req = stun.parse_request(second[0])
    assert nc.receive(stun.build_response(req, "192.0.2.1", 5), S3, 0.13)
    assert nc.report.region_latency[901] == pytest.approx(0.03)
    # The first request's answer, arriving after the run finished, is not taken.
    assert nc.finished
    assert not nc.receive(stun.build_response(stun.parse_request(first[0]), "192.0.2.1", 6), S3, 0.2)
    assert nc.report.global_v4 == ("192.0.2.1", 5)


def test_replies_from_elsewhere_or_unknown_are_ignored() -> None:
    nc = Netcheck(REGIONS[1:], 0.0, rand=rand())
    data, dst = nc.next_transmit()  # type: ignore[misc]
    req = stun.parse_request(data)
    spoof = stun.build_response(req, "192.0.2.66", 66)
    assert not nc.receive(spoof, ("192.0.2.200", 3478), 0.01)  # right txid, wrong server
    assert not nc.receive(stun.build_response(stun.BindingRequest(b"\x55" * 12), "1.2.3.4", 1), dst, 0.01)
    assert not nc.receive(b"garbage", dst, 0.01)
    assert not nc.finished
    assert nc.receive(stun.build_response(req, "192.0.2.7", 7), dst, 0.02)
    assert nc.report.global_v4 == ("192.0.2.7", 7)


@given(st.lists(st.binary(max_size=80), max_size=10))
def test_fuzz_receive(datagrams: list[bytes]) -> None:
    nc = Netcheck(REGIONS, 0.0)
    for d in datagrams:
        assert nc.receive(d, S1, 0.01) is False
    assert not nc.report.udp


@pytest.mark.parametrize(
    ("latency", "previous", "want"),
    [
        ({}, 900, 0),
        ({900: 0.020, 901: 0.030}, 0, 900),
        ({900: 0.020, 901: 0.025}, 901, 901),  # less than 10 ms better: stay
        ({900: 0.050, 901: 0.065}, 901, 901),  # 15 ms better but > 2/3 of old: stay
        ({900: 0.030, 901: 0.065}, 901, 900),  # clearly better: move
        ({900: 0.030}, 901, 900),  # old home did not answer
    ],
)
def test_preferred_region(latency: dict[int, float], previous: int, want: int) -> None:
    assert netcheck.preferred_region(latency, previous) == want


def test_regions_from_derp_map() -> None:
    derp_map = {
        "Regions": {
            "900": {
                "RegionID": 900,
                "RegionCode": "shoal",
                "Nodes": [
                    {"Name": "900a", "HostName": "203.0.113.1", "STUNPort": 0},
                    {
                        "Name": "900b",
                        "HostName": "derp.example",
                        "IPv4": "203.0.113.2",
                        "IPv6": "none",
                        "STUNPort": 3479,
                    },
                    {"Name": "900c", "HostName": "derp.example"},  # needs DNS: skipped
                    {"Name": "900d", "HostName": "203.0.113.3", "STUNPort": -1},  # no STUN
                ],
            },
            "901": {"RegionID": 901, "Nodes": [{"Name": "901a", "IPv6": "fd7a:115c:a1e0::1"}]},
            "902": {"RegionID": 902, "NoMeasureNoHome": True, "Nodes": [{"HostName": "203.0.113.9"}]},
            "903": {"RegionID": 903, "Nodes": []},
        }
    }
    regions = netcheck.regions_from_derp_map(wire.DERPMap.from_json(derp_map))
    assert regions == [
        Region(
            900,
            "shoal",
            (StunServer(900, "900a", ("203.0.113.1", 3478)), StunServer(900, "900b", ("203.0.113.2", 3479))),
        ),
        Region(901, "", (StunServer(901, "901a", ("fd7a:115c:a1e0::1", 3478)),)),
    ]
    # a DERP map that cannot be read is refused where it is parsed
    with pytest.raises(netcheck.DerpMapError, match="Regions"):
        wire.DERPMap.from_json({})
    with pytest.raises(netcheck.DerpMapError, match="RegionID 'x'"):
        wire.DERPMap.from_json({"Regions": {"1": {"RegionID": "x"}}})


def test_restun_delay() -> None:
    assert netcheck.restun_delay(False) == 5.0
    assert netcheck.restun_delay(True, lambda n: b"\x00" * n) == 20.0
    assert netcheck.restun_delay(True, lambda n: b"\xff" * n) == 26.0


@pytest.mark.anyio
async def test_netcheck_udp_against_real_stun_servers() -> None:
    # Two STUN servers on two loopback addresses: both see our socket's own address, so the mapping is constant.
    a = await start_stun_server("127.0.0.1", 0)
    b = await start_stun_server("127.0.0.2", 0)
    try:
        regions = [
            Region(
                900, "a", (StunServer(900, "a", ("127.0.0.1", a.port)), StunServer(900, "b", ("127.0.0.2", b.port)))
            ),
            Region(901, "dead", (StunServer(901, "x", ("127.0.0.3", 9)),)),  # nothing listens there
        ]
        report = await netcheck.netcheck_udp(regions, bind=("127.0.0.1", 0), timeout=1.0)
    finally:
        a.close()
        b.close()
    assert report.udp and report.ipv4
    assert report.global_v4 is not None and report.global_v4[0] == "127.0.0.1"
    assert report.mapping_varies_by_dest_ip is False
    assert set(report.region_latency) == {900}
    assert 0 < report.region_latency[900] < 0.5
    assert report.preferred_derp == 900
    assert a.stats.responses >= 1 and b.stats.responses >= 1


@pytest.mark.anyio
async def test_runner_finishes_early_when_all_answer() -> None:
    a = await start_stun_server("127.0.0.1", 0)
    try:
        loop = asyncio.get_running_loop()
        t0 = loop.time()
        report = await netcheck.netcheck_udp(
            [Region(1, "a", (StunServer(1, "a", ("127.0.0.1", a.port)),))], bind=("127.0.0.1", 0), timeout=5.0
        )
        assert loop.time() - t0 < 1.0
        assert report.preferred_derp == 1
    finally:
        a.close()
