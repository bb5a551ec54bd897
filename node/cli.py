"""`shoal`: the node CLI. It talks only to shoald's local API (node/api.py) over its Unix socket.

    shoal [--socket PATH] up --login-server URL [--auth-key K] [--hostname H] [--advertise-tags tag:a,tag:b]
          [--advertise-routes CIDR,...] [--advertise-exit-node] [--accept-routes] [--snat-subnet-routes=false]
                             [--server-key mkey:HEX] [--ca-file PEM]
          [--exit-node NAME|IP] [--exit-node-allow-lan-access]     (--exit-node= clears it)
          [--route-probe ADDR]
    shoal down | logout
    shoal exit-node list [--json] | suggest
    shoal status [--json] [--filter]
    shoal ip [-4|-6] [PEER]
    shoal ping [-c N] [--timeout S] [--no-until-direct] PEER
    shoal netcheck [--json]
    shoal dns status [--json]
    shoal dns query NAME [TYPE]

Errors are one line on stderr and exit status 1 (2 for bad usage).
"""

from __future__ import annotations

import argparse
import ipaddress
import json
import os
import sys
import time
import urllib.parse
from collections.abc import Sequence
from typing import Any, NoReturn

import httpx

from coord import wire
from node.errors import LocalError

DEFAULT_SOCKET = "/run/shoal/shoald.sock"
EXIT_ERROR = 1
EXIT_USAGE = 2


class CliError(LocalError):
    pass


class Parser(argparse.ArgumentParser):
    def error(self, message: str) -> NoReturn:
        sys.stderr.write(f"shoal: {message} (see --help)\n")
        raise SystemExit(EXIT_USAGE)


def build_parser() -> argparse.ArgumentParser:
    p = Parser(prog="shoal", description="Shoal node CLI (talks to shoald).")
    p.add_argument("--socket", default=os.environ.get("SHOAL_SOCKET", DEFAULT_SOCKET),
                   help=f"shoald's socket (default {DEFAULT_SOCKET} or $SHOAL_SOCKET)")
    sub = p.add_subparsers(dest="cmd", required=True, parser_class=Parser)
    up = sub.add_parser("up", help="join the tailnet and bring the tunnel up")
    up.add_argument("--login-server", action="append", default=[],
                    help="coordination server URL (remembered); repeat for replicas of one server (failover)")
    up.add_argument("--auth-key", default=os.environ.get("SHOAL_AUTH_KEY", ""),
                    help="pre-auth key (default $SHOAL_AUTH_KEY); without one, a login URL is printed")
    up.add_argument("--hostname", default=None, help="name to register (default: the machine's)")
    up.add_argument("--advertise-tags", default=None, help="comma-separated tag:name list")
    up.add_argument("--advertise-routes", default=None, metavar="CIDR,...",
                    help="offer these subnets to the tailnet (they count once approved); '' to stop")
    up.add_argument("--advertise-exit-node", default=None, action=argparse.BooleanOptionalAction,
                    help="offer this node as an exit node (0.0.0.0/0 and ::/0)")
    up.add_argument("--accept-routes", default=None, action=argparse.BooleanOptionalAction,
                    help="use the subnet routes peers offer (default off)")
    up.add_argument("--snat-subnet-routes", default=None, type=bool_arg, metavar="true|false",
                    help="masquerade traffic forwarded to advertised subnets (default true; false keeps the "
                         "tailnet source address, the LAN must route 100.64.0.0/10 back to this node)")
    up.add_argument("--exit-node", default=None, metavar="NAME|IP",
                    help="send all traffic through this peer (an approved exit node); '' to stop using one")
    up.add_argument("--exit-node-allow-lan-access", default=None, action=argparse.BooleanOptionalAction,
                    help="with --exit-node, keep directly connected LANs outside the tunnel (default off)")
    up.add_argument("--route-probe", default=None, metavar="ADDR",
                    help="with --advertise-routes: an address on the LAN that must answer ping, else the routes "
                         "are withdrawn until it does (HA: another router takes over); '' for none")
    up.add_argument("--server-key", default=None, type=server_key_arg,
                    help="the server key to pin, as `shoal-server info` prints it (mkey:<64 hex>); a server "
                         "presenting another is refused. Default: pin the key the server presents first")
    up.add_argument("--ca-file", default=None, type=ca_file_arg,
                    help="PEM CA bundle an https login server's certificate must chain to (remembered; "
                         "default: the system store)")
    up.add_argument("--accept-dns", default=None, type=bool_arg, metavar="true|false",
                    help="point the OS resolver at MagicDNS (100.100.100.100) (remembered; default true)")
    up.add_argument("--ssh", default=None, action=argparse.BooleanOptionalAction,
                    help="serve Shoal SSH on this node's tailnet addresses, port 22: peers log in by their tailnet "
                         "identity as the policy's ssh rules say (remembered; default off)")
    up.add_argument("--timeout", type=float, default=0,
                    help="give up waiting for login approval after this many seconds (default: wait)")
    sub.add_parser("down", help="take the tunnel down; stay registered")
    ex = sub.add_parser("exit-node", help="exit nodes this node may use")
    exsub = ex.add_subparsers(dest="exit_cmd", required=True, parser_class=Parser)
    exl = exsub.add_parser("list", help="the peers offering an exit node (approved), and which is in use")
    exl.add_argument("--json", action="store_true")
    exsub.add_parser("suggest", help="the exit node to use (online; direct path, then home DERP region)")
    sub.add_parser("logout", help="log this node out of the tailnet")
    st = sub.add_parser("status", help="this node and its peers")
    st.add_argument("--json", action="store_true")
    st.add_argument("--filter", action="store_true", help="what each packet-filter rule let in (nft counters)")
    ip = sub.add_parser("ip", help="tailnet addresses of this node or a peer")
    fam = ip.add_mutually_exclusive_group()
    fam.add_argument("-4", dest="v4", action="store_true", help="IPv4 only")
    fam.add_argument("-6", dest="v6", action="store_true", help="IPv6 only")
    ip.add_argument("peer", nargs="?", help="peer name or address")
    wh = sub.add_parser("whois", help="who a tailnet address is, and its app capabilities on this node")
    wh.add_argument("--json", action="store_true")
    wh.add_argument("addr", help="a tailnet address")
    pg = sub.add_parser("ping", help="disco ping a peer: which path (DERP or direct) and how fast")
    pg.add_argument("-c", "--count", type=int, default=10, help="attempts (default 10)")
    pg.add_argument("--timeout", type=float, default=5.0, help="seconds to wait for each pong (default 5)")
    pg.add_argument("--until-direct", action=argparse.BooleanOptionalAction, default=True,
                    help="stop at the first pong over a direct path (default on)")
    pg.add_argument("peer", help="peer name, tailnet address or node key")
    nc = sub.add_parser("netcheck", help="UDP reachability, public address per DERP region, NAT kind, latency")
    nc.add_argument("--json", action="store_true")
    dns = sub.add_parser("dns", help="MagicDNS: the resolver on 100.100.100.100")
    dsub = dns.add_subparsers(dest="dns_cmd", required=True, parser_class=Parser)
    ds = dsub.add_parser("status", help="names, routes, upstreams and what the OS points at")
    ds.add_argument("--json", action="store_true")
    dq = dsub.add_parser("query", help="ask the resolver, the way the OS would")
    dq.add_argument("name")
    dq.add_argument("type", nargs="?", default="A")
    dq.add_argument("--json", action="store_true")
    return p


def bool_arg(text: str) -> bool:
    t = text.strip().lower()
    if t in ("true", "1", "yes", "on"):
        return True
    if t in ("false", "0", "no", "off"):
        return False
    raise argparse.ArgumentTypeError(f"{text!r} is not true or false")


def server_key_arg(text: str) -> str:
    try:
        return wire.key_text("mkey", wire.parse_key(text.strip(), "mkey", "server key"))
    except wire.WireError as e:
        raise argparse.ArgumentTypeError(f"{e} (copy it from `shoal-server info`)") from None


def ca_file_arg(text: str) -> str:
    # shoald reads it, from its own working directory: pass an absolute path
    path = os.path.abspath(text)
    if not os.path.isfile(path) or not os.access(path, os.R_OK):
        raise argparse.ArgumentTypeError(f"{text}: not a readable file")
    return path


class Api:
    def __init__(self, path: str) -> None:
        self.path = path
        self.http = httpx.Client(transport=httpx.HTTPTransport(uds=path), base_url="http://shoald",
                                 timeout=httpx.Timeout(10.0, read=120.0))

    def call(self, method: str, route: str, body: dict[str, Any] | None = None) -> dict[str, Any]:
        try:
            r = self.http.request(method, route, json=body)
        except httpx.TransportError as e:
            raise CliError(f"cannot reach shoald at {self.path}: {e} (is shoald running? are you root?)") from None
        try:
            data = r.json()
        except ValueError:
            raise CliError(f"shoald answered {r.status_code} with something that is not JSON") from None
        if r.status_code != 200 or not isinstance(data, dict):
            msg = data.get("error") if isinstance(data, dict) else None
            raise CliError(str(msg or f"shoald answered {r.status_code}"))
        return data


def parse_tags(text: str) -> list[str]:
    tags = [t.strip() for t in text.split(",") if t.strip()]
    for t in tags:
        if not t.startswith("tag:") or len(t) < 5:
            raise CliError(f"--advertise-tags: {t!r} is not tag:name")
    return tags


def cmd_up(api: Api, args: argparse.Namespace) -> int:
    servers = list(args.login_server)
    body: dict[str, Any] = {"login_server": servers[0] if servers else "", "auth_key": args.auth_key}
    if len(servers) > 1:
        body["control_urls"] = servers[1:]
    if args.accept_dns is not None:
        body["accept_dns"] = args.accept_dns
    if args.server_key:
        body["server_key"] = args.server_key
    if args.ca_file is not None:
        body["ca_file"] = args.ca_file
    if args.hostname is not None:
        body["hostname"] = args.hostname
    if args.advertise_tags is not None:
        body["advertise_tags"] = parse_tags(args.advertise_tags)
    if args.advertise_routes is not None:
        body["advertise_routes"] = [r.strip() for r in args.advertise_routes.split(",") if r.strip()]
    for name in ("advertise_exit_node", "accept_routes", "snat_subnet_routes", "ssh", "exit_node",
                 "exit_node_allow_lan_access", "route_probe"):
        if getattr(args, name) is not None:
            body[name] = getattr(args, name)
    st = api.call("POST", "/up", body)
    if st["BackendState"] == "NeedsLogin" and st.get("AuthURL"):
        print(f"\nTo authenticate, visit:\n\n\t{st['AuthURL']}\n", flush=True)
        deadline = time.monotonic() + args.timeout if args.timeout > 0 else None
        while st["BackendState"] != "Running":
            if deadline is not None and time.monotonic() > deadline:
                raise CliError(f"not approved within {args.timeout:g}s; shoald keeps waiting (see shoal status)")
            time.sleep(0.5)
            st = api.call("GET", "/status")
            if st["BackendState"] == "NeedsLogin" and not st.get("AuthURL"):
                raise CliError("login failed: " + "; ".join(st.get("Health") or ["no login URL any more"]))
        print("Success.")
        return 0
    if st["BackendState"] != "Running":
        raise CliError(f"registered, but the tunnel is not up yet ({st['BackendState']}): "
                       + "; ".join(st.get("Health") or ["no network map yet"]))
    return 0


def _ago(ts: float | None, now: float) -> str:
    if not ts:
        return "never"
    d = max(0.0, now - ts)
    if d < 120:
        return f"{d:.0f}s ago"
    if d < 7200:
        return f"{d / 60:.0f}m ago"
    return f"{d / 3600:.0f}h ago"


def _bytes(n: int) -> str:
    for unit in ("B", "KiB", "MiB", "GiB"):
        if n < 1024 or unit == "GiB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024  # type: ignore[assignment]
    return str(n)


def render_status(st: dict[str, Any], now: float) -> str:
    conn = "connected" if st.get("Connected") else "not connected"
    lines = [f"# {st['BackendState']}: server {st.get('LoginServer') or '-'} ({conn}), engine {st['Engine']} "
             f"on {st['Interface']}:{st['Port']}"]
    if st.get("AuthURL"):
        lines.append(f"# Log in at: {st['AuthURL']}")
    for h in st.get("Health") or ():
        lines.append(f"# Health: {h}")
    me = st["Self"]
    offered = me.get("AdvertisedRoutes") or []
    if offered:
        primary = me.get("PrimaryRoutes") or []
        waiting = [r for r in offered if r not in primary and r not in ("0.0.0.0/0", "::/0")]
        lines.append(f"# Routes: offering {', '.join(offered)}; primary for {', '.join(primary) or '-'}"
                     + (f"; not approved or standby: {', '.join(waiting)}" if waiting else ""))
    ex = st.get("ExitNode")
    if ex:
        if ex.get("ID") is None:
            lines.append(f"# Exit node: {ex['Wanted']}: not an exit node in the network map; traffic is stopped"
                         " (run `shoal up --exit-node=` to go out directly)")
        else:
            state = "in use" if ex.get("InUse") else "not in WireGuard yet"
            online = "online" if ex.get("Online") else "offline, traffic is stopped"
            lan = "; LAN access allowed" if me.get("ExitNodeAllowLANAccess") else ""
            lines.append(f"# Exit node: {str(ex.get('Name') or '').rstrip('.')} ({online}, {state}){lan}")
    addrs = me.get("Addresses") or ["-"]
    rows = [[addrs[0], " ".join(addrs[1:]), _name(me), "self",
             "endpoints " + (", ".join(me.get("Endpoints") or []) or "-"), "", "", ""]]
    for p in st.get("Peers") or ():
        a = p.get("Addresses") or ["-"]
        path = str(p.get("PathText") or "no path")  # the agent's words: direct only when observed
        rows.append([a[0], " ".join(a[1:]), _name(p), "online" if p.get("Online") else "offline",
                     path, f"handshake {_ago(p.get('LastHandshake'), now)}",
                     f"rx {_bytes(p.get('RxBytes', 0))} tx {_bytes(p.get('TxBytes', 0))}", _routes(p)])
    widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]
    for r in rows:
        lines.append("  ".join(c.ljust(w) for c, w in zip(r, widths, strict=True)).rstrip())
    return "\n".join(lines)


def _name(node: dict[str, Any]) -> str:
    """The MagicDNS name (FQDN, no trailing dot) when the node has one, else its host name."""
    return str(node.get("Name") or "").rstrip(".") or str(node.get("HostName") or "") or "-"


def render_exit_nodes(d: dict[str, Any]) -> str:
    rows = [["IP", "NAME", "STATUS", ""]]
    for n in d.get("ExitNodes") or ():
        rows.append([(n.get("Addresses") or ["-"])[0], _name(n), "online" if n.get("Online") else "offline",
                     "selected" if n.get("Selected") else ""])
    if len(rows) == 1:
        return "no exit nodes in the network map (an exit node must be approved, and the policy must allow " \
               "autogroup:internet)"
    widths = [max(len(r[i]) for r in rows) for i in range(4)]
    return "\n".join("  ".join(c.ljust(w) for c, w in zip(r, widths, strict=True)).rstrip() for r in rows)


def cmd_exit_node(api: Api, args: argparse.Namespace) -> int:
    d = api.call("GET", "/exit-nodes")
    if args.exit_cmd == "list":
        print(json.dumps(d, indent=2) if args.json else render_exit_nodes(d))
        return 0
    if not d.get("Suggested"):
        raise CliError("no online exit node to suggest")
    name = str(d["Suggested"]).rstrip(".")
    print(f"Suggested exit node: {name}\nTo use it, run: shoal up --exit-node={name}")
    return 0


def render_dns_status(d: dict[str, Any]) -> str:
    state = "running on " + ", ".join(d["Listening"]) if d.get("Running") else "not running"
    lines = [f"# MagicDNS: {state}; OS: {d.get('OSConfig')}"
             + (f" ({d['ResolvConf']})" if d.get("OSConfig") == "direct" else "")
             + ("" if d.get("AcceptDNS") else " (--accept-dns=false)")]
    if d.get("Error"):
        lines.append(f"# Error: {d['Error']}")
    lines.append("search: " + (" ".join(s.rstrip(".") for s in d.get("Search") or []) or "-"))
    lines.append("local zones: " + (" ".join(d.get("LocalZones") or []) or "-"))
    for suffix, ups in (d.get("Routes") or {}).items():
        lines.append(f"route {suffix} -> {', '.join(ups)}")
    lines.append("upstreams: " + (", ".join(d.get("Upstreams") or []) or "none (SERVFAIL)"))
    lines.append(f"queries {d.get('Queries', 0)}, cache hits {d.get('CacheHits', 0)}, forwarded "
                 f"{d.get('Forwarded', 0)}, SERVFAIL {d.get('ServFail', 0)}")
    for name, addrs in (d.get("Names") or {}).items():
        lines.append(f"{name.rstrip('.')}  {' '.join(addrs)}")
    return "\n".join(lines)


def cmd_dns(api: Api, args: argparse.Namespace) -> int:
    if args.dns_cmd == "status":
        d = api.call("GET", "/dns/status")
        print(json.dumps(d, indent=2) if args.json else render_dns_status(d))
        return 0
    r = api.call("POST", "/dns/query", {"name": args.name, "type": args.type})
    if args.json:
        print(json.dumps(r, indent=2))
    else:
        print(f";; {r['Name']} {r['Type']}: {r['Rcode']}{' (authoritative)' if r['Authoritative'] else ''}, "
              f"{r['Millis']} ms")
        for a in r["Answers"]:
            print(a)
    return 0 if r["Rcode"] in ("NOERROR",) else EXIT_ERROR
def _routes(p: dict[str, Any]) -> str:
    primary = p.get("PrimaryRoutes") or []
    if not primary:
        return ""
    used = set(p.get("RoutesInUse") or [])
    return "routes " + ", ".join(r + ("" if r in used else " (not used)") for r in primary)


def find_peer(st: dict[str, Any], name: str) -> dict[str, Any]:
    want = name.lower().rstrip(".")
    for p in st.get("Peers") or ():
        names = {str(p.get("HostName", "")).lower(), str(p.get("Name", "")).lower().rstrip(".")}
        if want in names or name in (p.get("Addresses") or ()):
            return dict(p)
    raise CliError(f"no peer named {name!r} in this node's network map")


def cmd_ip(api: Api, args: argparse.Namespace) -> int:
    st = api.call("GET", "/status")
    addrs = find_peer(st, args.peer).get("Addresses") or [] if args.peer else st["Self"].get("Addresses") or []
    if not addrs:
        raise CliError("no tailnet address yet (run shoal up)")
    for a in addrs:
        v = ipaddress.ip_address(a).version
        if (args.v4 and v != 4) or (args.v6 and v != 6):
            continue
        print(a)
    return 0


def cmd_ping(api: Api, args: argparse.Namespace) -> int:
    if args.count < 1:
        raise CliError("-c: expected at least 1")
    got = 0
    for i in range(args.count):
        t0 = time.monotonic()
        try:
            r = api.call("POST", "/ping", {"peer": args.peer, "timeout": args.timeout})
        except CliError as e:
            if "no pong" not in str(e):
                raise
            print(f"timeout: {e}", flush=True)
        else:
            got += 1
            print(f"pong from {r['Peer']} ({r['Address']}) via {r['Path']} in {r['LatencySeconds'] * 1000:.1f}ms"
                  + wireguard_note(r), flush=True)
            if r.get("Direct") and args.until_direct:
                return 0
        if i + 1 < args.count:
            time.sleep(max(0.0, 1.0 - (time.monotonic() - t0)))
    if got == 0:
        raise CliError(f"no reply from {args.peer}")
    if args.until_direct:
        print(f"direct connection not established after {args.count} pings", flush=True)
        return 1
    return 0


def wireguard_note(r: dict[str, Any]) -> str:
    """What WireGuard's own path is, when it is not the one the pong took (the status rule: a direct pong
    is not a direct tunnel until the engine holds that address and a handshake happened)."""
    text, kind = r.get("WireGuardText"), r.get("WireGuard")
    if not text:
        return ""
    pong_direct = not str(r["Path"]).startswith("DERP")
    if (pong_direct and kind == "direct") or (not pong_direct and kind == "derp"):
        return ""
    return f" (WireGuard: {text})"


def render_netcheck(r: dict[str, Any]) -> str:
    lines = ["Report:", f"\t* UDP: {str(r.get('UDP')).lower()}"]
    lines.append(f"\t* IPv4: {'yes, ' + r['GlobalV4'] if r.get('GlobalV4') else 'no'}")
    lines.append(f"\t* IPv6: {'yes, ' + r['GlobalV6'] if r.get('GlobalV6') else 'no'}")
    mv = r.get("MappingVariesByDestIP")
    lines.append(f"\t* MappingVariesByDestIP: {'unknown' if mv is None else str(mv).lower()}")
    codes = r.get("RegionCodes") or {}
    pref = str(r.get("PreferredDERP") or r.get("HomeDERP") or "")
    lines.append(f"\t* Nearest DERP: {codes.get(pref, '-')} ({pref or 'none'})")
    lines.append("\t* DERP latency:")
    lat = r.get("RegionLatency") or {}
    eps = r.get("RegionEndpoints") or {}
    for rid in sorted(codes, key=lambda k: lat.get(k, 1e9)):
        ms = f"{lat[rid] * 1000:.1f}ms" if rid in lat else "-"
        lines.append(f"\t\t- {rid} {codes[rid]}: {ms}  {eps.get(rid, '')}".rstrip())
    return "\n".join(lines)


def render_whois(w: dict[str, Any]) -> str:
    n = w["Node"]
    owner = ", ".join(n["Tags"]) if n["Tags"] else f"user {n['User']}"
    lines = [f"{n['Name'].rstrip('.')} (node {n['ID']}, {owner}): {' '.join(n['Addresses'])}"]
    if not w["CapMap"]:
        lines.append("no app capabilities on this node")
    for cap, vals in w["CapMap"].items():
        lines.append(f"  {cap}: {json.dumps(vals)}")
    return "\n".join(lines)


def render_filter(f: dict[str, Any]) -> str:
    """`shoal status --filter`: one line per rule of the node's packet filter, then the drops."""
    if not f.get("InPlace"):
        return "no packet filter of ours in place"
    if f.get("AllowAll"):
        lines = ["allow-all: every packet from the tailnet is let in (no per-rule counters)"]
    else:
        lines = [f"{'rule':<8}{'packets':>12}{'bytes':>14}"]
        lines += [f"{r['Rule']:<8}{r['Packets']:>12}{r['Bytes']:>14}" for r in f.get("Rules", [])]
    lines += [f"{k.lower():<8}{v['Packets']:>12}{v['Bytes']:>14}" for k, v in f.get("Drops", {}).items()]
    return "\n".join(lines)


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    api = Api(args.socket)
    try:
        if args.cmd == "up":
            return cmd_up(api, args)
        if args.cmd in ("down", "logout"):
            api.call("POST", f"/{args.cmd}", {})
            return 0
        if args.cmd == "status" and args.filter:
            f = api.call("GET", "/filter")
            print(json.dumps(f, indent=2) if args.json else render_filter(f))
            return 0
        if args.cmd == "status":
            st = api.call("GET", "/status")
            print(json.dumps(st, indent=2) if args.json else render_status(st, time.time()))
            return 0
        if args.cmd == "ping":
            return cmd_ping(api, args)
        if args.cmd == "whois":
            w = api.call("GET", "/whois?addr=" + urllib.parse.quote(args.addr))
            print(json.dumps(w, indent=2) if args.json else render_whois(w))
            return 0
        if args.cmd == "dns":
            return cmd_dns(api, args)
        if args.cmd == "exit-node":
            return cmd_exit_node(api, args)
        if args.cmd == "netcheck":
            r = api.call("POST", "/netcheck", {})
            print(json.dumps(r, indent=2) if args.json else render_netcheck(r))
            return 0
        return cmd_ip(api, args)
    except CliError as e:
        sys.stderr.write(f"shoal: {e}\n")
        return EXIT_ERROR
    except KeyboardInterrupt:
        return 130


if __name__ == "__main__":
    raise SystemExit(main())
