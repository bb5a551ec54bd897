"""shoald's local API: JSON over HTTP on a root-only Unix socket (mode 0600). The `shoal` CLI is its client.

    GET  /status                    -> Status (below)
    GET  /metrics                   -> Prometheus text exposition (node/metrics.py)
    GET  /filter                    -> {"InPlace": bool, "AllowAll": bool, "Rules": [{"Rule": index into the
                                        PacketFilter, "Packets", "Bytes"}] (first packets each accept let in),
                                        "Drops": {"Dropped"|"Spoofed": {"Packets", "Bytes"}}}
    POST /up      {"login_server"?: str, "auth_key"?: str, "hostname"?: str, "advertise_tags"?: [str],
                   "advertise_routes"?: [cidr], "advertise_exit_node"?: bool, "accept_routes"?: bool,
                   "snat_subnet_routes"?: bool, "exit_node"?: name|tailnet IP|"" (clears),
                   "exit_node_allow_lan_access"?: bool, "route_probe"?: IP|"",
                   "server_key"?: "mkey:<64 hex>", "ca_file"?: path, "wait"?: seconds}
                  -> Status once the first netmap is applied (or a login URL is known)
    GET  /exit-nodes                -> {"ExitNodes": [{ID, Name, HostName, Addresses, Online, Selected}],
                                        "Suggested": Name|null, "Selected": the pref as given}
    POST /down    {}                -> Status
    POST /logout  {}                -> Status
    POST /ping    {"peer": name|tailnet IP|nodekey, "timeout"?: seconds}
                  -> {"Peer", "Address", "Path": "DERP(<region>)"|"ip:port" (the pong's), "Direct": bool (the
                  pong came direct and WireGuard's path is direct), "WireGuard": Path word, "WireGuardText",
                  "LatencySeconds"}
                  (504 when no pong came in time)
    POST /netcheck {}               -> {"UDP", "IPv4", "IPv6", "GlobalV4", "GlobalV6", "MappingVariesByDestIP",
                  "PreferredDERP", "RegionLatency", "RegionV4Latency", "RegionV6Latency", "RegionEndpoints",
                  "RegionCodes", "HomeDERP"}

Status: {"BackendState": "NeedsLogin"|"Starting"|"Running"|"Stopped", "AuthURL", "LoginServer", "Connected",
"KeyExpired", "Engine", "Interface", "Port", "Health": [str], "MagicDNSSuffix",
"Self": {ID, Name, HostName, Addresses, Key, KeyExpiry, Endpoints, Online, AdvertisedRoutes, PrimaryRoutes,
ExitNodeApproved, AcceptRoutes, ExitNode (the pref), ExitNodeAllowLANAccess},
"ExitNode": {"Wanted", "ID", "Name", "Online", "InUse" (0.0.0.0/0 in WireGuard for it now)} | null,
"Peers": [{ID, Name, HostName, Addresses, Online, LastSeen, Key, Endpoint, Path, LastHandshake, RxBytes,
TxBytes, InEngine, PrimaryRoutes, RoutesInUse (in WireGuard now),
Path "direct"|"derp"|"unconfirmed"|"connecting"|"stale"|"none" (node/status.py: direct only with the
confirmed direct address and a handshake within 180 s), PathText (the CLI's words), and with NAT traversal:
Confirmed, DERPRegion, PeerHomeDERP, Best, BestLatency, Trusted, Active, Chosen}],
"Magic": {HomeDERP, DERPConnected, RawReceived (packets the raw socket gave Python), DiscoReceived, DiscoDrops,
Netcheck, ...} | null}.

Errors are {"error": "<one line>"} with a 4xx/5xx status: 400 for a body that is not what the route takes
(and, from uvicorn, for bytes that are not HTTP), 409 for a request that conflicts with the node's state,
502 when the coordination server cannot be reached or refuses.
"""

from __future__ import annotations

import json
from collections.abc import Iterable
from typing import Any

from prometheus_client import CollectorRegistry, generate_latest
from prometheus_client.metrics_core import Metric
from prometheus_client.registry import Collector
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse, Response
from starlette.routing import Route

from node.agent import Agent, AgentError
from node.errors import LocalError
from node.login import RouteFlags

MAX_BODY = 64 << 10
METRICS_TYPE = "text/plain; version=0.0.4; charset=utf-8"  # what generate_latest writes (see derp/expose.py)
UP_FIELDS: dict[str, type | tuple[type, ...]] = {
    "login_server": str, "auth_key": str, "hostname": str, "advertise_tags": list, "wait": (int, float),
    "server_key": str, "ca_file": str, "accept_dns": bool, "advertise_routes": list, "advertise_exit_node": bool,
    "accept_routes": bool, "snat_subnet_routes": bool, "ssh": bool, "exit_node": str,
    "exit_node_allow_lan_access": bool, "route_probe": str,
    "control_urls": list,
}
# bool is an int in Python: a number field must not take true/false, and a bool field must take them.
BOOL_FIELDS = {k for k, t in UP_FIELDS.items() if t is bool}


class BadRequest(LocalError):
    pass


async def _body(request: Request) -> dict[str, Any]:
    raw = b""
    async for chunk in request.stream():
        raw += chunk
        if len(raw) > MAX_BODY:
            raise BadRequest(f"body over {MAX_BODY} bytes")
    if not raw.strip():
        return {}
    try:
        data = json.loads(raw)
    except (ValueError, UnicodeDecodeError) as e:
        raise BadRequest(f"body is not JSON: {e}") from None
    if not isinstance(data, dict):
        raise BadRequest("body must be a JSON object")
    return data


def _up_args(data: dict[str, Any]) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for k, v in data.items():
        want = UP_FIELDS.get(k)
        if want is None:
            raise BadRequest(f"unknown field {k!r}")
        if not isinstance(v, want) or (isinstance(v, bool) and k not in BOOL_FIELDS):
            raise BadRequest(f"{k}: wrong type")
        out[k] = v
    tags = out.get("advertise_tags")
    if tags is not None and not all(isinstance(t, str) and t.startswith("tag:") for t in tags):
        raise BadRequest("advertise_tags: expected a list of tag:name strings")
    routes = out.get("advertise_routes")
    if routes is not None and not all(isinstance(r, str) for r in routes):
        raise BadRequest("advertise_routes: expected a list of CIDR strings")
    wait = out.get("wait")
    if wait is not None and not 0 <= wait <= 300:
        raise BadRequest("wait: expected 0-300 seconds")
    return out


class _AgentCollector(Collector):
    """Holds the families the /metrics handler read (asynchronously) just before rendering the registry."""

    def __init__(self) -> None:
        self.latest: list[Metric] = []

    def collect(self) -> Iterable[Metric]:
        return self.latest


def create_app(agent: Agent, registry: CollectorRegistry | None = None) -> Starlette:
    """The local API. ``registry``: the agent's metrics registry (node/daemon.py builds it; a fresh one if None)."""
    registry = CollectorRegistry() if registry is None else registry
    collector = _AgentCollector()
    registry.register(collector)

    async def metrics(request: Request) -> Response:
        collector.latest = await agent.metric_families()
        return Response(generate_latest(registry), media_type=METRICS_TYPE)

    async def status(request: Request) -> Response:
        return JSONResponse(await agent.status())

    async def filter_counters(request: Request) -> Response:
        return JSONResponse(await agent.filter_counters())

    async def up(request: Request) -> Response:
        args = _up_args(await _body(request))
        return JSONResponse(await agent.up(
            login_server=args.get("login_server", ""), auth_key=args.get("auth_key", ""),
            hostname=args.get("hostname"), advertise_tags=args.get("advertise_tags"),
            wait=float(args.get("wait", 20.0)), server_key=args.get("server_key", ""),
            ca_file=args.get("ca_file"), accept_dns=args.get("accept_dns"), ssh=args.get("ssh"),
            routing=RouteFlags(args.get("advertise_routes"), args.get("advertise_exit_node"),
                               args.get("accept_routes"), args.get("snat_subnet_routes"), args.get("exit_node"),
                               args.get("exit_node_allow_lan_access"), args.get("route_probe")),
            control_urls=args.get("control_urls"),
        ))

    async def exit_nodes(request: Request) -> Response:
        return JSONResponse(await agent.exit_nodes())

    async def down(request: Request) -> Response:
        await _body(request)
        return JSONResponse(await agent.down())

    async def logout(request: Request) -> Response:
        await _body(request)
        return JSONResponse(await agent.logout())

    async def ping(request: Request) -> Response:
        data = await _body(request)
        peer = data.get("peer")
        timeout = data.get("timeout", 5.0)
        if set(data) - {"peer", "timeout"}:
            raise BadRequest(f"unknown field {sorted(set(data) - {'peer', 'timeout'})[0]!r}")
        if not isinstance(peer, str) or not peer:
            raise BadRequest("peer: expected a name, tailnet address or node key")
        if isinstance(timeout, bool) or not isinstance(timeout, int | float) or not 0 < timeout <= 60:
            raise BadRequest("timeout: expected 0-60 seconds")
        return JSONResponse(await agent.ping(peer, float(timeout)))

    async def netcheck(request: Request) -> Response:
        await _body(request)
        return JSONResponse(await agent.netcheck())

    async def dns_status(request: Request) -> Response:
        return JSONResponse(agent.dns.status(agent.prefs.accept_dns))

    async def dns_query(request: Request) -> Response:
        data = await _body(request)
        if set(data) - {"name", "type"}:
            raise BadRequest(f"unknown field {sorted(set(data) - {'name', 'type'})[0]!r}")
        name, qtype = data.get("name"), data.get("type", "A")
        if not isinstance(name, str) or not name or len(name) > 255:
            raise BadRequest("name: expected a DNS name")
        if not isinstance(qtype, str) or not qtype.isalnum() or len(qtype) > 10:
            raise BadRequest("type: expected a record type such as A, AAAA, PTR")
        try:
            return JSONResponse(await agent.dns.query(name, qtype))
        except ValueError as e:
            raise BadRequest(str(e)) from None

    async def whois(request: Request) -> Response:
        addr = request.query_params.get("addr", "")
        if not addr or len(addr) > 64:
            raise BadRequest("addr: expected a tailnet address")
        return JSONResponse(agent.whois(addr))

    async def bad_request(request: Request, exc: Exception) -> Response:
        return JSONResponse({"error": f"bad request: {exc}"}, status_code=400)

    async def agent_error(request: Request, exc: Exception) -> Response:
        assert isinstance(exc, AgentError)
        return JSONResponse({"error": exc.message}, status_code=exc.status)

    return Starlette(
        routes=[
            Route("/status", status, methods=["GET"]),
            Route("/metrics", metrics, methods=["GET"]),
            Route("/filter", filter_counters, methods=["GET"]),
            Route("/whois", whois, methods=["GET"]),
            Route("/up", up, methods=["POST"]),
            Route("/down", down, methods=["POST"]),
            Route("/exit-nodes", exit_nodes, methods=["GET"]),
            Route("/logout", logout, methods=["POST"]),
            Route("/ping", ping, methods=["POST"]),
            Route("/netcheck", netcheck, methods=["POST"]),
            Route("/dns/status", dns_status, methods=["GET"]),
            Route("/dns/query", dns_query, methods=["POST"]),
        ],
        exception_handlers={BadRequest: bad_request, AgentError: agent_error},
    )
