"""netcheck through real nftables NATs, sent from the WireGuard port (raw sockets beside wireguard-go).

Two STUN servers (derp.stunserver) run in the lab's internet namespace at its two server addresses. Behind the
easy NAT the mapping keeps WireGuard's port and is the same for both servers; behind the hard NAT each server
sees another port: MappingVariesByDestIP.
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable

import pytest

from derp.stunserver import start_stun_server
from node import netcheck, rawsock
from node.disco import AddrPort
from node.keys import PrivateKey
from node.netcheck import Region, StunServer
from node.wg.config import WgConfig
from node.wg.go import GoEngine
from tests.lab import Lab, Topology
from tests.lab.fixtures import lab, lab_sweep
from tests.node.test_rawsock_lab import netns

__all__ = ["lab", "lab_sweep"]

pytestmark = pytest.mark.lab

PORT = 41641


def ports_send(ports: list[rawsock.RawPort]) -> Callable[[bytes, AddrPort], None]:
    # The runner exists before its port (the port's callback is the runner's feed): send through the newest.
    def send(data: bytes, addr: AddrPort) -> None:
        ports[-1].sendto(data, addr)

    return send


def test_netcheck_from_wireguard_port_through_nats(lab: Lab) -> None:
    lab.build(Topology.parse("le: easy ne; lh: hard nh"))
    asyncio.run(run(lab))


async def run(lab: Lab) -> None:
    s1, s2 = lab.servers
    with netns(lab.inet):
        stun1 = await start_stun_server(s1, 3478)
        stun2 = await start_stun_server(s2, 3478)
    regions = [
        Region(900, "lab", (StunServer(900, "900a", (s1, 3478)),)),
        Region(901, "lab2", (StunServer(901, "901a", (s2, 3478)),)),
    ]
    engines = {n: GoEngine(lab.iface(n), netns=lab.ns(n)) for n in ("ne", "nh")}
    ports: list[rawsock.RawPort] = []
    try:
        reports = {}
        for n, engine in engines.items():
            await engine.start()
            await engine.set(WgConfig(PrivateKey.generate(), PORT))
            runner = netcheck.Runner(ports_send(ports))
            with netns(lab.ns(n)):
                ports.append(rawsock.RawPort(PORT, runner.feed))
            reports[n] = await runner.run(regions, timeout=2.0)

        easy, hard = reports["ne"], reports["nh"]
        easy_wan = lab.routers["le"].wan_addr
        hard_wan = lab.routers["lh"].wan_addr
        assert easy.udp and easy.ipv4
        # Sent from the WireGuard port, and the easy NAT kept it: this is the endpoint peers can use.
        assert easy.global_v4 == (easy_wan, PORT)
        assert easy.mapping_varies_by_dest_ip is False
        assert set(easy.region_latency) == {900, 901}
        assert easy.preferred_derp in (900, 901)

        assert hard.udp
        assert hard.global_v4 is not None and hard.global_v4[0] == hard_wan
        assert hard.mapping_varies_by_dest_ip is True
        assert len(hard.endpoints()) == 2

        # From a socket of its own the answer is the same kind: the NAT, not the socket, decides.
        with netns(lab.ns("nh")):
            own = await netcheck.netcheck_udp(regions, timeout=2.0)
        assert own.mapping_varies_by_dest_ip is True
    finally:
        for p in ports:
            p.close()
        for e in engines.values():
            await e.stop()
        stun1.close()
        stun2.close()
