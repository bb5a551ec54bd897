"""Subnet routes in the agent: what a client with and without --accept-routes and a router with and without SNAT
do with a netmap, as command transcripts (nft scripts, routes, WireGuard); the flags; the forwarding warning."""

from __future__ import annotations

import asyncio
from pathlib import Path
from typing import Any

import pytest

from node import cli, compile, login
from node.render import nft
from node.state import Prefs
from tests.node.test_agent import ALLOW_ALL, EXIT_READ, HI, LO, ROUTES, Harness, peer

LAN = "198.51.100.0/24"


def router_peer(pid: int, key: str, primary: bool = True) -> dict[str, Any]:
    rec = peer(pid, key)
    if primary:
        rec["AllowedIPs"] = [*rec["AllowedIPs"], LAN]
        rec["PrimaryRoutes"] = [LAN]
    rec["Hostinfo"] = {"Hostname": f"n{pid}", "OS": "linux", "RoutableIPs": [LAN]}
    return rec


def run_client(tmp_path: Path, accept: bool) -> str:
    h = Harness(tmp_path)

    async def go() -> None:
        a = await h.start()
        a.prefs.accept_routes = accept
        await h.netmap([router_peer(2, LO), peer(3, HI)], ALLOW_ALL)
        # the interface now holds the route (as `ip -j route` shows it)
        h.runner.respond("ip -j route show dev shoal0",
                         '[{"dst": "100.64.0.0/10", "flags": []}, {"dst": "198.51.100.0/24", "flags": []}]')
        h.mark("the router is no longer primary")
        await h.netmap([router_peer(2, LO, primary=False), peer(3, HI)], ALLOW_ALL)
        await a.stop()

    asyncio.run(go())
    return h.runner.transcript


def test_subnet_router_client_installs_routes_only_with_accept_routes(tmp_path: Path) -> None:
    without = run_client(tmp_path / "a", False)
    assert LAN not in without
    assert "wg add 00000000 allowed=100.64.0.2/32,fd7a:115c:a1e0::2/128\n" in without
    with_ = run_client(tmp_path / "b", True)
    first, second = with_.split("--- the router is no longer primary\n")
    assert first.endswith(
        ROUTES.replace("ip route add 100.64.0.0/10 dev shoal0\n",
                       "ip route add 100.64.0.0/10 dev shoal0\nip route add 198.51.100.0/24 dev shoal0\n") +
        EXIT_READ + "wg add 00000000 allowed=100.64.0.2/32,198.51.100.0/24,fd7a:115c:a1e0::2/128\n"
        "wg add ffffffff endpoint=192.0.2.13:41641 keepalive=25 allowed=100.64.0.3/32,fd7a:115c:a1e0::3/128\n")
    # the route follows the primary: withdrawn from the interface and from the peer's AllowedIPs
    assert "ip route del 198.51.100.0/24 dev shoal0\n" in second
    assert "wg update 00000000 allowed=100.64.0.2/32,fd7a:115c:a1e0::2/128\n" in second


def test_subnet_router_client_ignores_routes_outside_primary_and_default_routes() -> None:
    from coord import wire

    p = wire.Node.from_json({**peer(2, LO), "AllowedIPs": ["100.64.0.2/32", "10.0.0.0/8", "0.0.0.0/0"],
                             "PrimaryRoutes": ["0.0.0.0/0", "192.0.2.0/24", "100.64.0.0/10"]})
    assert compile.subnet_routes(p) == ()
    assert compile._peer_allowed(p, True) == ("100.64.0.2/32",)


def router_script(tmp_path: Path, snat: bool) -> str:
    h = Harness(tmp_path)

    async def go() -> str:
        a = await h.start()
        a.prefs.advertise_routes = [LAN]
        a.prefs.snat_subnet_routes = snat
        await h.netmap([peer(2, LO)], ALLOW_ALL)
        await a.stop()
        return h.runner.transcript

    return asyncio.run(go())


def test_subnet_router_router_masquerades_by_default(tmp_path: Path) -> None:
    t = router_script(tmp_path / "a", True)
    assert '    \t\tiifname "shoal0" oifname != "shoal0" meta mark set meta mark & 0xff00ffff | 0x00040000\n' in t
    assert ("    \tchain postrouting {\n    \t\ttype nat hook postrouting priority srcnat; policy accept;\n"
            "    \t\tmeta mark & 0x00ff0000 == 0x00040000 masquerade\n    \t}\n") in t
    # the forward chain filters what comes from the tailnet through the same policy chain as input
    assert t.count('    \t\tiifname "shoal0" jump from_tailnet\n') == 2
    kept = router_script(tmp_path / "b", False)
    assert "masquerade" not in kept and "meta mark" not in kept


def test_subnet_router_nft_render_snat_transcript() -> None:
    rules = [{"SrcIPs": ["100.64.0.2/32"], "DstPorts": [{"IP": LAN, "Ports": {"First": 80, "Last": 80}}],
              "IPProto": [6]}]
    text = nft.render(rules, "tail0", ["100.64.0.1/32"], snat=True)
    forward = text.split("\tchain forward {\n")[1].split("\t}\n")[0]
    assert forward == (
        "\t\ttype filter hook forward priority filter; policy accept;\n"
        '\t\tiifname != { "lo", "tail0" } ip saddr 100.64.0.0/10 counter name spoofed drop\n'
        '\t\tiifname != { "lo", "tail0" } ip6 saddr fd7a:115c:a1e0::/48 counter name spoofed drop\n'
        '\t\tiifname "tail0" oifname != "tail0" meta mark set meta mark & 0xff00ffff | 0x00040000\n'
        '\t\tiifname "tail0" jump from_tailnet\n'
    )
    assert "\t\tip saddr 100.64.0.2 ip daddr 198.51.100.0/24 tcp dport 80 ct state new accept\n" in text
    assert "postrouting" not in nft.render(rules, "tail0", ["100.64.0.1/32"])


def test_subnet_router_forwarding_warning(tmp_path: Path) -> None:
    assert compile.forwarding_warning([LAN], "1\n", "0\n") == ""
    msg = compile.forwarding_warning([LAN, "2001:db8::/48"], "0\n", None)
    assert msg.startswith("IP forwarding is off (net.ipv4.ip_forward, net.ipv6.conf.all.forwarding is not 1)")
    assert "sysctl -w net.ipv4.ip_forward=1 net.ipv6.conf.all.forwarding=1" in msg
    assert compile.forwarding_warning([], "0", "0") == ""
    # in the agent's status, from its sysctl dir
    h = Harness(tmp_path)
    sysctl = tmp_path / "sys"
    (sysctl / "net/ipv4").mkdir(parents=True)
    (sysctl / "net/ipv4/ip_forward").write_text("0\n")
    h.agent.cfg.sysctl_dir = sysctl

    async def go() -> tuple[list[str], list[str]]:
        a = await h.start()
        a.prefs.advertise_routes = [LAN]
        off = (await a.status())["Health"]
        (sysctl / "net/ipv4/ip_forward").write_text("1\n")
        on = (await a.status())["Health"]
        await a.stop()
        return off, on

    off, on = asyncio.run(go())
    assert any(x.startswith("IP forwarding is off (net.ipv4.ip_forward") for x in off), off
    assert not any("forwarding" in x for x in on)


def test_subnet_router_up_flags_and_prefs() -> None:
    p = login.up_prefs(Prefs(), "http://192.0.2.1:8080", None, None,
                       routing=login.RouteFlags(["198.51.100.0/24", "198.51.100.0/24"], True, True, False))
    assert (p.advertise_routes, p.advertise_exit_node, p.accept_routes, p.snat_subnet_routes) == (
        [LAN], True, True, False)
    assert p.routable_ips() == (LAN, "0.0.0.0/0", "::/0")
    # unset flags keep what was there
    again = login.up_prefs(p, "", None, None)
    assert again.advertise_routes == [LAN] and again.accept_routes and not again.snat_subnet_routes
    assert Prefs.from_json({**p.__dict__}) == p
    with pytest.raises(login.UpRefused, match="not a masked CIDR"):
        login.up_prefs(Prefs(), "http://192.0.2.1:8080", None, None, routing=login.RouteFlags(["198.51.100.1/24"]))
    with pytest.raises(login.UpRefused, match="--advertise-exit-node"):
        login.up_prefs(Prefs(), "http://192.0.2.1:8080", None, None, routing=login.RouteFlags(["0.0.0.0/0"]))
    args = cli.build_parser().parse_args(["up", "--advertise-routes", f"{LAN},203.0.113.0/24", "--accept-routes",
                                          "--snat-subnet-routes=false", "--advertise-exit-node"])
    assert (args.advertise_routes, args.accept_routes, args.snat_subnet_routes, args.advertise_exit_node) == (
        f"{LAN},203.0.113.0/24", True, False, True)
    plain = cli.build_parser().parse_args(["up"])
    assert (plain.advertise_routes, plain.accept_routes, plain.snat_subnet_routes) == (None, None, None)


def test_subnet_router_hostinfo_offers_routes(tmp_path: Path) -> None:
    h = Harness(tmp_path)
    h.agent.prefs.advertise_routes = [LAN]
    hi = h.agent._hostinfo()
    assert hi.routable_ips == (LAN,)
    h.agent.prefs.advertise_exit_node = True
    assert h.agent._hostinfo().routable_ips == (LAN, "0.0.0.0/0", "::/0")


def test_subnet_router_status_shows_offered_primary_and_used_routes(tmp_path: Path) -> None:
    h = Harness(tmp_path)

    async def go() -> tuple[dict[str, Any], dict[str, Any]]:
        a = await h.start()
        a.prefs.accept_routes = True
        a.prefs.advertise_routes = ["203.0.113.0/24"]
        await h.netmap([router_peer(2, LO), router_peer(3, HI, primary=False)], ALLOW_ALL)
        used = await a.status()
        a.prefs.accept_routes = False
        await h.netmap([router_peer(2, LO), router_peer(3, HI, primary=False)], ALLOW_ALL)
        unused = await a.status()
        await a.stop()
        return used, unused

    used, unused = asyncio.run(go())
    rows = {p["HostName"]: p for p in used["Peers"]}
    assert (rows["n2"]["PrimaryRoutes"], rows["n2"]["RoutesInUse"]) == ([LAN], [LAN])
    assert (rows["n3"]["PrimaryRoutes"], rows["n3"]["RoutesInUse"]) == ([], [])
    assert used["Self"]["AdvertisedRoutes"] == ["203.0.113.0/24"] and used["Self"]["PrimaryRoutes"] == []
    text = cli.render_status(used, 0.0)
    assert "# Routes: offering 203.0.113.0/24; primary for -; not approved or standby: 203.0.113.0/24" in text
    assert text.splitlines()[-2].endswith(f"routes {LAN}")
    assert cli.render_status(unused, 0.0).splitlines()[-2].endswith(f"routes {LAN} (not used)")
