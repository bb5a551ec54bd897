"""Exit nodes in the agent (issue 16): only the chosen peer gets the default routes, table 52 and its rules as a
command transcript, the LAN throw routes, what happens when the exit node goes, the flags, status and the CLI."""

from __future__ import annotations

import asyncio
import json
import socket
from pathlib import Path
from typing import Any

import pytest

from coord import wire
from node import cli, compile, login, mapsession, sockmark
from node.render import exitroute
from node.render.exitroute import ExitConfig, ExitState
from node.state import Prefs
from node.wg import uapi
from node.wg.config import DeviceState, DeviceUpdate, WgConfig, plan
from tests.node.test_agent import ALLOW_ALL, HI, LO, Harness, peer

ON = [
    "ip -4 route add default dev shoal0 table 52",
    "ip -4 route add unreachable default metric 4096 table 52",
    "ip -6 route add default dev shoal0 table 52",
    "ip -6 route add unreachable default metric 4096 table 52",
    "ip -4 rule add priority 5210 fwmark 0x80000/0xff0000 table main",
    "ip -4 rule add priority 5230 fwmark 0x80000/0xff0000 table default",
    "ip -4 rule add priority 5250 fwmark 0x80000/0xff0000 unreachable",
    "ip -4 rule add priority 5270 table 52",
    "ip -6 rule add priority 5210 fwmark 0x80000/0xff0000 table main",
    "ip -6 rule add priority 5230 fwmark 0x80000/0xff0000 table default",
    "ip -6 rule add priority 5250 fwmark 0x80000/0xff0000 unreachable",
    "ip -6 rule add priority 5270 table 52",
]


def exit_peer(pid: int, key: str, online: bool = True) -> dict[str, Any]:
    rec = peer(pid, key)
    rec["AllowedIPs"] = [*rec["AllowedIPs"], "0.0.0.0/0", "::/0"]
    rec["Online"] = online
    rec["Hostinfo"] = {"Hostname": f"n{pid}", "OS": "linux", "RoutableIPs": ["0.0.0.0/0", "::/0"]}
    return rec


def lines(cmds: list[list[str]]) -> list[str]:
    return [" ".join(c) for c in cmds]


def test_exit_node_render_turns_on_and_off_as_a_transcript() -> None:
    empty = ExitState(frozenset(), frozenset())
    on = ExitConfig("shoal0", on=True)
    assert lines(exitroute.render(on, empty)) == ON  # routes first: the rule never points at an empty table
    # read back as iproute2 prints it, nothing is left to do
    cur = ExitState(frozenset(exitroute.wanted(on).rules), frozenset(exitroute.wanted(on).routes))
    assert exitroute.render(on, cur) == []
    off = lines(exitroute.render(ExitConfig("shoal0"), cur))
    assert off[:8] == [c.replace(" add ", " del ") for c in ON[4:]]  # rules go first
    assert sorted(off[8:]) == sorted(c.replace(" add ", " del ") for c in ON[:4])
    # the LAN stays outside the tunnel with allow-lan-access: throw routes, nothing else changes
    lan = ExitConfig("shoal0", on=True, throw=("192.0.2.0/26", "2001:db8::/64"))
    assert lines(exitroute.render(lan, cur)) == ["ip -4 route add throw 192.0.2.0/26 table 52",
                                                 "ip -6 route add throw 2001:db8::/64 table 52"]


def test_exit_node_parse_reads_what_iproute2_prints() -> None:
    rules = exitroute.parse_rules(json.dumps([
        {"priority": 0, "src": "all", "table": "local"},
        {"priority": 5210, "src": "all", "fwmark": "0x80000", "fwmask": "0xff0000", "table": "main"},
        {"priority": 5250, "src": "all", "fwmark": "0x80000", "fwmask": "0xff0000", "action": "unreachable"},
        {"priority": 5270, "src": "all", "table": "52"},
        {"priority": 32766, "src": "all", "table": "main"}]), "-4")
    assert rules == {("-4", "priority 5210 fwmark 0x80000/0xff0000 table main"),
                     ("-4", "priority 5250 fwmark 0x80000/0xff0000 unreachable"), ("-4", "priority 5270 table 52")}
    routes = exitroute.parse_routes(json.dumps([
        {"dst": "default", "dev": "shoal0", "scope": "link", "flags": []},
        {"type": "unreachable", "dst": "default", "dev": "lo", "metric": 4096, "flags": []},
        {"type": "throw", "dst": "2001:db8::/64", "dev": "lo", "metric": 1024, "flags": []}]), "-6")
    assert routes == {("-6", "default dev shoal0"), ("-6", "unreachable default metric 4096"),
                      ("-6", "throw 2001:db8::/64")}
    with pytest.raises(exitroute.ExitRouteError):
        exitroute.parse_routes('[{"type": "throw"}]', "-4")
    with pytest.raises(exitroute.ExitRouteError):
        exitroute.parse_rules("{", "-4")


def run_client(tmp_path: Path, allow_lan: bool = False) -> tuple[str, list[dict[str, Any]]]:
    h = Harness(tmp_path)
    h.runner.respond("ip -j addr show", json.dumps([
        {"ifname": "eth0", "flags": ["UP"], "addr_info": [
            {"family": "inet", "local": "192.0.2.10", "prefixlen": 26, "scope": "global"}]}]))

    async def go() -> list[dict[str, Any]]:
        a = await h.start()
        a.prefs.exit_node = "n2"
        a.prefs.exit_node_allow_lan_access = allow_lan
        await h.netmap([exit_peer(2, LO), exit_peer(3, HI)], ALLOW_ALL)
        sts = [await a.status()]
        h.mark("the exit node goes offline")
        await h.netmap([exit_peer(2, LO, online=False), exit_peer(3, HI)], ALLOW_ALL)
        h.mark("the exit node leaves the netmap")
        await h.netmap([exit_peer(3, HI)], ALLOW_ALL)
        sts.append(await a.status())
        h.mark("the user clears it")
        # what is in place now, as iproute2 shows it (abridged)
        h.runner.respond("ip -j -4 rule show", '[{"priority": 5270, "src": "all", "table": "52"}]')
        h.runner.respond("ip -j -4 route show table 52", '[{"dst": "default", "dev": "shoal0", "flags": []}]')
        a.prefs.exit_node = ""
        await h.netmap([exit_peer(3, HI)], ALLOW_ALL)
        await a.stop()
        return sts

    sts = asyncio.run(go())
    return h.runner.transcript, sts


def test_exit_node_client_only_the_chosen_peer_gets_default_routes_and_nothing_leaks(tmp_path: Path) -> None:
    t, (st, gone) = run_client(tmp_path)
    first, rest = t.split("--- the exit node goes offline\n")
    # n2 is the exit node: 0/0 and ::/0 in its AllowedIPs; n3 offers too but is not chosen
    assert "wg add 00000000 allowed=0.0.0.0/0,100.64.0.2/32,::/0,fd7a:115c:a1e0::2/128\n" in first
    assert "wg add ffffffff endpoint=192.0.2.13:41641 keepalive=25 allowed=100.64.0.3/32,fd7a:115c:a1e0::3/128\n" \
        in first
    assert "".join(f"{c}\n" for c in ON) in first
    assert "throw" not in t  # without allow-lan-access the LAN goes into the tunnel
    offline, rest = rest.split("--- the exit node leaves the netmap\n")
    assert " rule del " not in offline and " route del " not in offline  # offline: traffic stops in the tunnel
    left, cleared = rest.split("--- the user clears it\n")
    assert " rule del " not in left and " route del " not in left  # gone: still nothing goes out directly
    assert "ip -4 rule del priority 5270 table 52\nip -4 route del default dev shoal0 table 52\n" in cleared
    assert st["ExitNode"]["Name"] == "n2.shoal.internal." and st["Self"]["ExitNode"] == "n2"
    assert gone["ExitNode"] == {"Wanted": "n2", "ID": None, "Name": "", "Online": False, "InUse": False}
    assert "not an exit node in the network map; traffic is stopped" in cli.render_status(gone, 0.0)


def test_exit_node_allow_lan_access_throws_the_lan_prefixes(tmp_path: Path) -> None:
    t, _ = run_client(tmp_path, allow_lan=True)
    assert "ip -4 route add throw 192.0.2.0/26 table 52\n" in t
    assert compile.lan_prefixes(json.dumps([
        {"ifname": "lo", "flags": ["LOOPBACK", "UP"], "addr_info": [{"local": "127.0.0.1", "prefixlen": 8,
                                                                    "scope": "host"}]},
        {"ifname": "shoal0", "flags": ["UP"], "addr_info": [{"local": "100.64.0.1", "prefixlen": 32,
                                                            "scope": "global"}]},
        {"ifname": "eth0", "flags": ["UP"], "addr_info": [
            {"local": "192.0.2.10", "prefixlen": 26, "scope": "global"},
            {"local": "2001:db8::5", "prefixlen": 64, "scope": "global"},
            {"local": "fe80::1", "prefixlen": 64, "scope": "link"},
            {"local": "198.51.100.7", "prefixlen": 32, "scope": "global"}]}]), exclude=["shoal0"]) == [
        "192.0.2.0/26", "2001:db8::/64"]


def test_exit_node_find_by_name_or_ip_and_suggest() -> None:
    nm = mapsession.apply(mapsession.NetMap(), wire.MapResponse.from_json({
        "Node": {"ID": 1, "Name": "n1.shoal.internal.", "Key": "nodekey:" + "11" * 32,
                 "Addresses": ["100.64.0.1/32"]},
        "Peers": [exit_peer(2, LO, online=False), exit_peer(3, HI), peer(4, "nodekey:" + "44" * 32)]}))
    assert compile.find_exit_node(nm, "n2").id == 2  # type: ignore[union-attr]
    assert compile.find_exit_node(nm, "n3.shoal.internal").id == 3  # type: ignore[union-attr]
    assert compile.find_exit_node(nm, "100.64.0.3").id == 3  # type: ignore[union-attr]
    assert compile.find_exit_node(nm, "n4") is None  # not an exit node
    assert [p.id for p in compile.exit_nodes(nm)] == [2, 3]
    assert compile.suggest_exit_node(nm).id == 3  # type: ignore[union-attr]  # the online one


def test_exit_node_flags_prefs_and_cli() -> None:
    p = login.up_prefs(Prefs(), "http://192.0.2.1:8080", None, None,
                       routing=login.RouteFlags(exit_node="E.shoal.internal.", exit_node_allow_lan_access=True))
    assert (p.exit_node, p.exit_node_allow_lan_access) == ("e.shoal.internal", True)
    assert Prefs.from_json({**p.__dict__}) == p
    assert login.up_prefs(p, "", None, None, routing=login.RouteFlags(exit_node="")).exit_node == ""
    assert login.up_prefs(p, "", None, None).exit_node == "e.shoal.internal"  # kept when not given
    with pytest.raises(login.UpRefused, match="neither an IP address nor a node name"):
        login.up_prefs(Prefs(), "http://192.0.2.1:8080", None, None, routing=login.RouteFlags(exit_node="a b"))
    with pytest.raises(login.UpRefused, match="cannot both be set"):
        login.up_prefs(Prefs(), "http://192.0.2.1:8080", None, None,
                       routing=login.RouteFlags(advertise_exit_node=True, exit_node="e"))
    args = cli.build_parser().parse_args(["up", "--exit-node", "e", "--exit-node-allow-lan-access"])
    assert (args.exit_node, args.exit_node_allow_lan_access) == ("e", True)
    assert cli.build_parser().parse_args(["up", "--exit-node="]).exit_node == ""
    listing = {"ExitNodes": [{"Name": "e.shoal.internal.", "Addresses": ["100.64.0.2"], "Online": True,
                              "Selected": True}], "Suggested": "e.shoal.internal.", "Selected": "e"}
    assert cli.render_exit_nodes(listing).splitlines() == [
        "IP          NAME              STATUS", "100.64.0.2  e.shoal.internal  online  selected"]
    assert "autogroup:internet" in cli.render_exit_nodes({"ExitNodes": []})


def test_exit_node_wireguard_fwmark_in_plan_and_uapi() -> None:
    from node.keys import PrivateKey

    key = PrivateKey.generate("nodekey")
    cur = DeviceState(key, 41641)
    up = plan(WgConfig(key, 41641, (), fwmark=sockmark.BYPASS_MARK), cur)
    assert up.fwmark == 0x80000 and not up.empty
    assert b"\nfwmark=524288\n" in uapi.render_set(up)
    assert plan(WgConfig(key, 41641, (), fwmark=0x80000), DeviceState(key, 41641, (), 0x80000)).empty
    got = uapi.parse_get(f"private_key={key.hex}\nlisten_port=41641\nfwmark=524288\nerrno=0\n\n".encode())
    assert got.fwmark == 0x80000
    assert DeviceUpdate(fwmark=0).fwmark == 0 and not DeviceUpdate(fwmark=0).empty


def test_exit_node_bypass_mark_on_sockets() -> None:
    """SO_MARK before connect, as the agent's senders set it (needs CAP_NET_ADMIN, which these tests have)."""
    s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    try:
        sockmark.mark(s, sockmark.BYPASS_MARK)
        assert s.getsockopt(socket.SOL_SOCKET, socket.SO_MARK) == 0x80000
    finally:
        s.close()
    assert sockmark.socket_options(0) == []

    async def connect() -> int:
        srv = socket.socket()
        srv.bind(("127.0.0.1", 0))
        srv.listen(1)
        try:
            c = await sockmark.connect_tcp("127.0.0.1", srv.getsockname()[1], sockmark.BYPASS_MARK)
            mark = c.getsockopt(socket.SOL_SOCKET, socket.SO_MARK)
            c.close()
            return int(mark)
        finally:
            srv.close()

    assert asyncio.run(connect()) == 0x80000


def test_ha_failover_route_health_withholds_what_the_router_cannot_serve() -> None:
    lan = ["198.51.100.0/24"]
    routes = ["198.51.100.0/24", "0.0.0.0/0", "::/0"]
    assert compile.route_health(routes, "1", "1", lan) == (tuple(routes), "")
    assert compile.route_health(routes, "1", "0", lan) == (("198.51.100.0/24", "0.0.0.0/0"),
                                                           "::/0: IP forwarding is off")
    assert compile.route_health(routes, "1", "1", []) == (("0.0.0.0/0", "::/0"),
                                                          "198.51.100.0/24: no up interface on it")
    # with a probe, the probe decides for subnets (the LAN may be behind a gateway)
    assert compile.route_health(routes, "1", "1", [], "198.51.100.10", True)[0] == tuple(routes)
    assert compile.route_health(routes, "1", "1", lan, "198.51.100.10", False) == (
        ("0.0.0.0/0", "::/0"), "198.51.100.0/24: route probe 198.51.100.10 does not answer")
    p = login.up_prefs(Prefs(), "http://192.0.2.1:8080", None, None,
                       routing=login.RouteFlags(route_probe=" 198.51.100.10 "))
    assert p.route_probe == "198.51.100.10"
    with pytest.raises(login.UpRefused, match="--route-probe"):
        login.up_prefs(Prefs(), "http://192.0.2.1:8080", None, None, routing=login.RouteFlags(route_probe="lan"))
    assert cli.build_parser().parse_args(["up", "--route-probe", "198.51.100.10"]).route_probe == "198.51.100.10"


def test_exit_node_leftovers_from_a_crash_go_at_start_when_cleared(tmp_path: Path) -> None:
    """An agent killed with an exit node in use leaves table 52 and its rules; started again with the exit node
    cleared in the prefs, its first netmap removes them (the applier reads on its first set, even when off)."""
    h = Harness(tmp_path)
    h.runner.respond("ip -j -4 rule show", json.dumps([
        {"priority": 5210, "src": "all", "fwmark": "0x80000", "fwmask": "0xff0000", "table": "main"},
        {"priority": 5270, "src": "all", "table": "52"}]))
    h.runner.respond("ip -j -6 route show table 52", json.dumps([
        {"type": "unreachable", "dst": "default", "dev": "lo", "metric": 4096, "flags": []}]))

    async def go() -> None:
        a = await h.start()
        assert a.prefs.exit_node == ""
        await h.netmap([exit_peer(2, LO)], ALLOW_ALL)
        h.mark("second netmap")
        await h.netmap([exit_peer(2, LO), exit_peer(3, HI)], ALLOW_ALL)
        await a.stop()

    asyncio.run(go())
    first, second = h.runner.transcript.split("--- second netmap\n")
    assert "ip -4 rule del priority 5210 fwmark 0x80000/0xff0000 table main\n" \
        "ip -4 rule del priority 5270 table 52\n" \
        "ip -6 route del unreachable default metric 4096 table 52\n" in first
    assert "table 52" not in second and "rule show" not in second  # converged: off stays off without reading


def test_exit_node_rp_filter_keeps_replies_to_marked_traffic_as_a_transcript(tmp_path: Path) -> None:
    """Strict rp_filter: the bypass bit is saved in the connection's mark and restored on replies, and
    src_valid_mark lets the reverse lookup use it; made once when the exit node is chosen, gone when cleared."""
    t, _ = run_client(tmp_path)
    first, rest = t.split("--- the exit node goes offline\n")
    assert "".join(f"{c}\n" for c in ON) + (
        "sysctl -w net.ipv4.conf.all.src_valid_mark=1\n"
        "nft -f -\n"
        "    table inet shoal_exit {}\n"
        "    delete table inet shoal_exit\n"
        "    table inet shoal_exit {\n"
        "    \tchain output {\n"
        "    \t\ttype filter hook output priority mangle; policy accept;\n"
        "    \t\tmeta mark & 0xff0000 == 0x80000 ct mark set ct mark | 0x80000\n"
        "    \t}\n"
        "    \tchain prerouting {\n"
        "    \t\ttype filter hook prerouting priority mangle; policy accept;\n"
        "    \t\tct mark & 0xff0000 == 0x80000 meta mark set meta mark | 0x80000\n"
        "    \t}\n"
        "    }\n") in first
    assert "shoal_exit" not in rest.split("--- the user clears it\n")[0]  # made once, kept while offline
    cleared = rest.split("--- the user clears it\n")[1]
    assert cleared.count("nft delete table inet shoal_exit\n") == 1
