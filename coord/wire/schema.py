"""The messages of the control protocol, as typed frozen values parsed once where they are read.

Messages are JSON objects; field names follow Tailscale's tailcfg where the meaning is the same. Each type has
``from_json`` (raises WireError naming the JSON path of what is wrong) and ``to_json``; what parses survives
its own encoding.

Requests (node -> server)
-------------------------
RegisterRequest: ``NodeKey, OldNodeKey?, DiscoKey?, Auth?{AuthKey}, Hostinfo?, Followup?, Expiry?, Ephemeral?``.
``Expiry`` in the past means log out.

MapRequest: ``NodeKey, DiscoKey?, Stream, OmitPeers?, Endpoints?, EndpointTypes?, HomeDERP?, Hostinfo?``.
EndpointTypes: 1 local (an address of one of the node's interfaces), 2 STUN (as a STUN server saw it).

Hostinfo: ``Hostname, OS, RequestTags?, RoutableIPs?``.

Responses (server -> node)
--------------------------
RegisterResponse: ``MachineAuthorized, NodeKeyExpired, AuthURL, User?{ID, LoginName}, Login?{Tags},
LoggedOut?, Error?``.

MapResponse: ``Node`` (self), ``Peers`` (full list, sorted by ID), ``PeersChanged``, ``PeersRemoved`` (IDs),
``PeersChangedPatch`` (``[{NodeID, Endpoints?, HomeDERP?, Online?, LastSeen?, DiscoKey?, Key?, KeyExpiry?}]``),
``DERPMap``, ``DNSConfig``, ``PacketFilter``, ``SSHPolicy``, ``Domain``, ``KeepAlive``, ``ControlTime``,
``KeepEstablished`` (bool, a Shoal extension: true keeps the established flows a narrowed PacketFilter no longer
allows; false, the default, has the node cut them, node/render/conntrack.py). A missing
field means "unchanged"; a present ``Peers`` replaces the whole peer list (PeersChanged, PeersRemoved and
PeersChangedPatch are then ignored). ``PacketFilter`` present and empty blocks all. Node/mapsession.py applies them.

Node object: ``ID, StableID, Name (FQDN with trailing dot), User (null for tagged nodes), Key, KeyExpiry (null =
never), Machine, DiscoKey ("" = none), Addresses, AllowedIPs, PrimaryRoutes, Endpoints, HomeDERP, Online,
LastSeen, Tags, Hostinfo{Hostname, OS, RoutableIPs}, Created, Expired``, and ``MachineAuthorized`` on the self
node. Times are RFC 3339 UTC with microseconds. Routes a node advertises travel in ``Hostinfo.RoutableIPs``
(masked CIDR prefixes; anything else is refused); they count once approved. ``PrimaryRoutes`` are the subnet
routes the node is the elected router for, and ``AllowedIPs`` is its addresses plus those, plus 0.0.0.0/0 and ::/0
for an approved exit node.

FilterRule: ``{SrcIPs: [cidr|"*"|"a-b"], DstPorts: [{IP: cidr|"*", Ports: {First, Last}}], IPProto?: [int]}``
for traffic arriving at the node. SSHPolicy: ``{Rules: [{Principals: [{Node, User, Tags, IPs}], SSHUsers: {login|"*":
local|"="|""}, Action: "accept"|"check", CheckPeriod, Origin}]}`` for Shoal SSH to the node (coord/policy/ssh.py);
no rules: no SSH. CapGrants: ``[{SrcIPs: [ip], CapMap: {cap: [object]}}]``, the app capabilities sources
hold on this node (coord/policy/capgrant.py). The renderer (node/render/nft.py) checks the addresses again before any of
them reaches an nft script.

DERPMap: ``{Regions: {"<id>": {RegionID, RegionCode, RegionName, NoMeasureNoHome?, Nodes: [{Name, RegionID,
HostName, IPv4?, IPv6?, STUNPort (0 = 3478, -1 = none), DERPPort (0 = 443), URL?, InsecureForTests?,
STUNOnly?}]}}}``. ``URL`` (a Shoal extension) wins over HostName and DERPPort. DNSConfig: ``{Resolvers:
[{Addr}], Domains: [str], Proxied, Routes: {suffix: [{Addr}]}, ExtraRecords?: [{Name, Type?, Value}]}``:
``Proxied`` is MagicDNS on; ``Routes`` with an empty list means "answer locally" (the base domain, and the
reverse zones); ``ExtraRecords`` are A/AAAA records (``Type`` "" or absent = by the value's family), their
names FQDNs without the trailing dot, as in Tailscale's tailcfg.DNSRecord; ``FallbackResolvers?: [{Addr}]``: the
global upstreams when the host's own resolvers are kept (override_local_dns off), used when the host has none.

What a node tolerates
---------------------
A MapResponse that is malformed as a whole (a field of the wrong type, a bad self node or packet filter) is
refused with a WireError, and the node keeps the last map it had. One peer record or patch that cannot be read
is left out and its peer dropped until a good record comes; one endpoint, address or prefix that cannot be read
is left out of its list; one DERP region or relay that cannot be read is left out of the DERP map. Each of these
is described in ``MapResponse.problems`` with its JSON path.
"""

from __future__ import annotations

import dataclasses
import enum
import ipaddress
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any, Literal, TypeVar

from coord.wire.errors import WireError
from coord.wire.keys import key_text, parse_key, parse_opt_key

JSON = dict[str, Any]
IPAddress = ipaddress.IPv4Address | ipaddress.IPv6Address
IPNetwork = ipaddress.IPv4Network | ipaddress.IPv6Network
IPInterface = ipaddress.IPv4Interface | ipaddress.IPv6Interface
T = TypeVar("T")

# What a real client needs, and no more: anyone can send a RegisterRequest, and a server keeps an interactive one
# until an admin approves it (coord/logins.py bounds how many).
MAX_ENDPOINTS = 64  # Endpoints and EndpointTypes entries
MAX_ENDPOINT = 64  # characters of one endpoint ("[v6]:port" is at most 47)
MAX_TAGS = 64  # RequestTags entries
MAX_TAG = 64  # characters of one tag, "tag:" included
MAX_ROUTES = 256  # RoutableIPs entries
MAX_ROUTE = 43  # characters of one prefix (an IPv6 /128 written out in full)
MAX_HOSTNAME = 255  # a DNS name's length
MAX_OS = 64
MAX_AUTH_KEY = 128  # skey-<prefix>-<secret> is about 70
MAX_FOLLOWUP = 512  # a login URL this server handed out
EP_LOCAL = 1  # EndpointTypes: an address of one of the node's interfaces
EP_STUN = 2  # EndpointTypes: our address as a STUN server saw it


class DERPMapError(WireError):
    """A DERP map (or a region or relay in it) that cannot be read."""


# --- parsing helpers --------------------------------------------------------------------------------------


def _fail(problems: list[str] | None, err: WireError) -> None:
    """Strict parsing (no ``problems`` list) raises; lenient parsing notes the problem and goes on."""
    if problems is None:
        raise err
    problems.append(str(err))


def _obj(v: object, where: str) -> JSON:
    if not isinstance(v, dict):
        raise WireError(f"{where}: expected an object")
    return v


def _fields(v: object, where: str, *required: str) -> JSON:
    """An object that has every one of ``required``."""
    d = _obj(v, where)
    if any(k not in d for k in required):
        raise WireError(f"{where}: missing {' or '.join(required)}")
    return d


def _list(v: object, where: str) -> list[Any]:
    if not isinstance(v, list):
        raise WireError(f"{where}: expected a list")
    return v


def _int(v: object, where: str, lo: int | None = None, hi: int | None = None) -> int:
    if not isinstance(v, int) or isinstance(v, bool) or (lo is not None and v < lo) or (hi is not None and v > hi):
        span = "" if lo is None or hi is None else f" in {lo}..{hi}"
        raise WireError(f"{where}: expected an integer{span}")
    return v


def _bool(v: object, where: str) -> bool:
    if v is None:
        return False
    if not isinstance(v, bool):
        raise WireError(f"{where}: expected a boolean")
    return v


def _str(v: object, where: str) -> str:
    if v is None:
        return ""
    if not isinstance(v, str):
        raise WireError(f"{where}: expected a string")
    return v


def _strs(v: object, where: str) -> tuple[str, ...]:
    if v is None:
        return ()
    items = _list(v, where)
    for i, x in enumerate(items):
        if not isinstance(x, str):
            raise WireError(f"{where}[{i}]: expected a string")
    return tuple(items)


def _items(v: object, where: str, parse: Callable[[object, str], T], problems: list[str] | None) -> tuple[T, ...]:
    """A list whose unreadable items are left out (lenient) or refused (strict)."""
    if v is None:
        return ()
    out: list[T] = []
    for i, x in enumerate(_list(v, where)):
        try:
            out.append(parse(x, f"{where}[{i}]"))
        except WireError as e:
            _fail(problems, e)
    return tuple(out)


def _opt_str(d: dict[str, Any], key: str, limit: int, where: str = "") -> str:
    path = f"{where}.{key}" if where else key
    v = d.get(key, "")
    if v is None:
        return ""
    if not isinstance(v, str):
        raise WireError(f"{path}: expected a string")
    if len(v) > limit:
        raise WireError(f"{path}: {len(v)} characters; at most {limit}")
    return v


def _str_list(d: dict[str, Any], key: str, limit: int, each: int, where: str = "") -> tuple[str, ...]:
    """A list of at most ``limit`` strings of at most ``each`` characters."""
    path = f"{where}.{key}" if where else key
    v = d.get(key)
    if v is None:
        return ()
    if not isinstance(v, list):
        raise WireError(f"{path}: expected a list of strings")
    if len(v) > limit:
        raise WireError(f"{path}: {len(v)} entries; at most {limit}")
    for i, x in enumerate(v):
        if not isinstance(x, str):
            raise WireError(f"{path}[{i}]: expected a string")
        if len(x) > each:
            raise WireError(f"{path}[{i}]: {len(x)} characters; at most {each}")
    return tuple(v)


# --- times ------------------------------------------------------------------------------------------------


def rfc3339(ts: float) -> str:
    """Unix seconds as RFC 3339 UTC with microseconds, e.g. ``2026-11-25T12:00:00.000001Z``."""
    return time_text(datetime.fromtimestamp(ts, UTC))


def time_text(dt: datetime) -> str:
    return dt.astimezone(UTC).isoformat(timespec="microseconds").replace("+00:00", "Z")


def parse_datetime(text: str) -> datetime:
    """RFC 3339 (``Z`` or an offset) or a date; a time without an offset is UTC. Raises ValueError."""
    t = text.strip()
    if t.endswith(("Z", "z")):
        t = t[:-1] + "+00:00"
    dt = datetime.fromisoformat(t)
    if dt.tzinfo is None:
        dt = dt.replace(tzinfo=UTC)
    try:
        return dt.astimezone(UTC)
    except OverflowError:
        raise ValueError(f"time {text!r} is out of range") from None


def parse_time(text: str) -> float:
    """Unix seconds of an RFC 3339 time (see parse_datetime). Raises ValueError."""
    return parse_datetime(text).timestamp()


def _time(v: object, where: str) -> datetime | None:
    if v is None:
        return None
    if not isinstance(v, str):
        raise WireError(f"{where}: expected an RFC 3339 time or null")
    try:
        return parse_datetime(v)
    except ValueError:
        raise WireError(f"{where}: {v[:40]!r} is not an RFC 3339 time") from None


def time_json(dt: datetime | None) -> str | None:
    return None if dt is None else time_text(dt)


# --- endpoints --------------------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class Endpoint:
    """A UDP address as ``1.2.3.4:5`` or ``[2001:db8::1]:5``; IPv4-mapped IPv6 addresses become IPv4."""

    ip: IPAddress
    port: int

    @classmethod
    def parse(cls, text: object, where: str = "") -> Endpoint:
        at = f"{where}: " if where else ""
        if not isinstance(text, str):
            raise WireError(f"{at}expected an endpoint string ip:port")
        host, sep, port_s = text.rpartition(":")
        if not sep or not port_s.isascii() or not port_s.isdigit():
            raise WireError(f"{at}endpoint {text!r} is not host:port")
        port = int(port_s)
        if not 0 < port < 65536:
            raise WireError(f"{at}endpoint {text!r} has port out of range")
        bracketed = host.startswith("[") and host.endswith("]")
        try:
            ip = ipaddress.ip_address(host[1:-1] if bracketed else host)
        except ValueError:
            raise WireError(f"{at}endpoint {text!r} has no IP address") from None
        if ip.version == 6 and not bracketed:
            raise WireError(f"{at}IPv6 endpoint {text!r} needs brackets: [addr]:port")
        if isinstance(ip, ipaddress.IPv6Address) and ip.ipv4_mapped is not None:
            ip = ip.ipv4_mapped
        return cls(ip, port)

    @property
    def host(self) -> str:
        return str(self.ip)

    @property
    def addr(self) -> tuple[str, int]:
        """As a socket address (host, port)."""
        return (str(self.ip), self.port)

    def __str__(self) -> str:
        return f"[{self.ip}]:{self.port}" if self.ip.version == 6 else f"{self.ip}:{self.port}"


def check_endpoint(ep: str) -> tuple[str, int]:
    """``1.2.3.4:5`` or ``[::1]:5`` -> (host, port); WireError otherwise."""
    return Endpoint.parse(ep).addr


def _endpoint(v: object, where: str) -> Endpoint:
    return Endpoint.parse(v, where)


def _interface(v: object, where: str) -> IPInterface:
    if not isinstance(v, str):
        raise WireError(f"{where}: expected an address string")
    try:
        return ipaddress.ip_interface(v)
    except ValueError:
        raise WireError(f"{where}: {v[:60]!r} is not an address/prefix") from None


def _network(v: object, where: str) -> IPNetwork:
    if not isinstance(v, str):
        raise WireError(f"{where}: expected a prefix string")
    try:
        return ipaddress.ip_network(v, strict=False)
    except ValueError:
        raise WireError(f"{where}: {v[:60]!r} is not a CIDR prefix") from None


def _routes(texts: tuple[str, ...], where: str) -> tuple[str, ...]:
    """Advertised routes: masked prefixes (10.0.0.0/24, not 10.0.0.1/24), in canonical text, without repeats."""
    out: list[str] = []
    for i, t in enumerate(texts):
        try:
            net = ipaddress.ip_network(t, strict=True)
        except ValueError:
            raise WireError(f"{where}[{i}]: {t[:60]!r} is not a masked CIDR prefix") from None
        if str(net) not in out:
            out.append(str(net))
    return tuple(out)


# --- requests ---------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Hostinfo:
    hostname: str = ""
    os: str = ""
    request_tags: tuple[str, ...] = ()
    routable_ips: tuple[str, ...] = ()

    @classmethod
    def from_json(cls, v: object) -> Hostinfo:
        if v is None:
            return cls()
        if not isinstance(v, dict):
            raise WireError("Hostinfo: expected an object")
        return cls(
            hostname=_opt_str(v, "Hostname", MAX_HOSTNAME, "Hostinfo"),
            os=_opt_str(v, "OS", MAX_OS, "Hostinfo"),
            request_tags=_str_list(v, "RequestTags", MAX_TAGS, MAX_TAG, "Hostinfo"),
            routable_ips=_routes(_str_list(v, "RoutableIPs", MAX_ROUTES, MAX_ROUTE, "Hostinfo"),
                                 "Hostinfo.RoutableIPs"),
        )

    def to_json(self) -> dict[str, Any]:
        out: dict[str, Any] = {"Hostname": self.hostname, "OS": self.os}
        if self.request_tags:
            out["RequestTags"] = list(self.request_tags)
        if self.routable_ips:
            out["RoutableIPs"] = list(self.routable_ips)
        return out


@dataclass(frozen=True)
class RegisterRequest:
    node_key: bytes
    old_node_key: bytes | None = None
    disco_key: bytes | None = None
    auth_key: str = ""
    hostinfo: Hostinfo = Hostinfo()
    followup: str = ""
    expiry: float | None = None
    ephemeral: bool = False

    @classmethod
    def from_json(cls, d: dict[str, Any]) -> RegisterRequest:
        auth = d.get("Auth") or {}
        if not isinstance(auth, dict):
            raise WireError("Auth: expected an object")
        expiry = d.get("Expiry")
        if expiry is not None and (not isinstance(expiry, (int, float)) or isinstance(expiry, bool)):
            raise WireError("Expiry: expected unix seconds")
        eph = d.get("Ephemeral", False)
        if not isinstance(eph, bool):
            raise WireError("Ephemeral: expected a boolean")
        old = d.get("OldNodeKey")
        disco = d.get("DiscoKey")
        return cls(
            node_key=parse_key(d.get("NodeKey"), "nodekey", "NodeKey"),
            old_node_key=parse_key(old, "nodekey", "OldNodeKey") if old else None,
            disco_key=parse_key(disco, "discokey", "DiscoKey") if disco else None,
            auth_key=_opt_str(auth, "AuthKey", MAX_AUTH_KEY, "Auth"),
            hostinfo=Hostinfo.from_json(d.get("Hostinfo")),
            followup=_opt_str(d, "Followup", MAX_FOLLOWUP),
            expiry=None if expiry is None else float(expiry),
            ephemeral=eph,
        )

    def to_json(self) -> dict[str, Any]:
        out: dict[str, Any] = {"NodeKey": key_text("nodekey", self.node_key), "Hostinfo": self.hostinfo.to_json()}
        if self.old_node_key:
            out["OldNodeKey"] = key_text("nodekey", self.old_node_key)
        if self.disco_key:
            out["DiscoKey"] = key_text("discokey", self.disco_key)
        if self.auth_key:
            out["Auth"] = {"AuthKey": self.auth_key}
        if self.followup:
            out["Followup"] = self.followup
        if self.expiry is not None:
            out["Expiry"] = self.expiry
        if self.ephemeral:
            out["Ephemeral"] = True
        return out


@dataclass(frozen=True)
class MapRequest:
    node_key: bytes
    disco_key: bytes | None = None
    stream: bool = False
    omit_peers: bool = False
    endpoints: tuple[str, ...] | None = None
    endpoint_types: tuple[int, ...] = ()
    home_derp: int | None = None
    hostinfo: Hostinfo | None = None

    @classmethod
    def from_json(cls, d: dict[str, Any]) -> MapRequest:
        for k in ("Stream", "OmitPeers"):
            if not isinstance(d.get(k, False), bool):
                raise WireError(f"{k}: expected a boolean")
        eps = d.get("Endpoints")
        endpoints = None if eps is None else _str_list(d, "Endpoints", MAX_ENDPOINTS, MAX_ENDPOINT)
        for i, ep in enumerate(endpoints or ()):
            Endpoint.parse(ep, f"Endpoints[{i}]")
        types = d.get("EndpointTypes") or []
        if not isinstance(types, list) or not all(isinstance(t, int) and not isinstance(t, bool) for t in types):
            raise WireError("EndpointTypes: expected a list of integers")
        if len(types) > MAX_ENDPOINTS:
            raise WireError(f"EndpointTypes: {len(types)} entries; at most {MAX_ENDPOINTS}")
        for i, t in enumerate(types):
            if not 0 <= t < 256:
                raise WireError(f"EndpointTypes[{i}]: expected 0-255")
        if endpoints is not None and types and len(types) != len(endpoints):
            raise WireError("EndpointTypes: must be as long as Endpoints")
        home = d.get("HomeDERP")
        if home is not None and (not isinstance(home, int) or isinstance(home, bool) or not 0 <= home < 1 << 16):
            raise WireError("HomeDERP: expected a region id")
        disco = d.get("DiscoKey")
        hi = d.get("Hostinfo")
        return cls(
            node_key=parse_key(d.get("NodeKey"), "nodekey", "NodeKey"),
            disco_key=parse_key(disco, "discokey", "DiscoKey") if disco else None,
            stream=bool(d.get("Stream", False)),
            omit_peers=bool(d.get("OmitPeers", False)),
            endpoints=endpoints,
            endpoint_types=tuple(types),
            home_derp=home,
            hostinfo=None if hi is None else Hostinfo.from_json(hi),
        )

    def to_json(self) -> dict[str, Any]:
        out: dict[str, Any] = {"NodeKey": key_text("nodekey", self.node_key), "Stream": self.stream}
        if self.disco_key:
            out["DiscoKey"] = key_text("discokey", self.disco_key)
        if self.omit_peers:
            out["OmitPeers"] = True
        if self.endpoints is not None:
            out["Endpoints"] = list(self.endpoints)
            if self.endpoint_types:
                out["EndpointTypes"] = list(self.endpoint_types)
        if self.home_derp is not None:
            out["HomeDERP"] = self.home_derp
        if self.hostinfo is not None:
            out["Hostinfo"] = self.hostinfo.to_json()
        return out


# --- register response ------------------------------------------------------------------------------------


@dataclass(frozen=True)
class RegisterResponse:
    machine_authorized: bool = False
    node_key_expired: bool = False
    auth_url: str = ""
    user_id: int | None = None
    login_name: str | None = None  # None: the response had no User object
    tags: tuple[str, ...] | None = None  # None: the response had no Login object
    logged_out: bool = False
    error: str = ""

    @classmethod
    def from_json(cls, d: object) -> RegisterResponse:
        w = "RegisterResponse"
        d = _obj(d, w)
        user, login = d.get("User"), d.get("Login")
        user_id: int | None = None
        login_name: str | None = None
        if user is not None:
            u = _obj(user, f"{w}.User")
            uid = u.get("ID")
            user_id = None if uid is None else _int(uid, f"{w}.User.ID")
            login_name = _str(u.get("LoginName"), f"{w}.User.LoginName")
        tags = None if login is None else _strs(_obj(login, f"{w}.Login").get("Tags"), f"{w}.Login.Tags")
        return cls(
            machine_authorized=_bool(d.get("MachineAuthorized"), f"{w}.MachineAuthorized"),
            node_key_expired=_bool(d.get("NodeKeyExpired"), f"{w}.NodeKeyExpired"),
            auth_url=_str(d.get("AuthURL"), f"{w}.AuthURL"),
            user_id=user_id,
            login_name=login_name,
            tags=tags,
            logged_out=_bool(d.get("LoggedOut"), f"{w}.LoggedOut"),
            error=_str(d.get("Error"), f"{w}.Error"),
        )

    def to_json(self) -> JSON:
        out: JSON = {"MachineAuthorized": self.machine_authorized, "NodeKeyExpired": self.node_key_expired,
                     "AuthURL": self.auth_url}
        if self.login_name is not None:
            out["User"] = {"ID": self.user_id, "LoginName": self.login_name}
        if self.tags is not None:
            out["Login"] = {"Tags": list(self.tags)}
        if self.logged_out:
            out["LoggedOut"] = True
        if self.error:
            out["Error"] = self.error
        return out


# --- packet filter ----------------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class PortRange:
    first: int
    last: int

    @classmethod
    def from_json(cls, v: object, where: str) -> PortRange:
        d = _fields(v, where, "First", "Last")
        first = _int(d["First"], f"{where}.First", 0, 65535)
        last = _int(d["Last"], f"{where}.Last", 0, 65535)
        if first > last:
            raise WireError(f"{where}: bad port range {first}-{last}")
        return cls(first, last)

    def to_json(self) -> JSON:
        return {"First": self.first, "Last": self.last}


ALL_PORTS = PortRange(0, 65535)


@dataclass(frozen=True, slots=True)
class NetPortRange:
    ip: str  # a CIDR prefix, an address or "*"
    ports: PortRange

    @classmethod
    def from_json(cls, v: object, where: str) -> NetPortRange:
        d = _fields(v, where, "IP", "Ports")
        ip = d["IP"]
        if not isinstance(ip, str):
            raise WireError(f"{where}.IP: expected an address string")
        return cls(ip, PortRange.from_json(d["Ports"], f"{where}.Ports"))

    def to_json(self) -> JSON:
        return {"IP": self.ip, "Ports": self.ports.to_json()}


@dataclass(frozen=True, slots=True)
class FilterRule:
    src_ips: tuple[str, ...]
    dst_ports: tuple[NetPortRange, ...]
    ip_proto: tuple[int, ...] = ()  # empty: TCP, UDP, ICMPv4, ICMPv6

    @classmethod
    def from_json(cls, v: object, where: str = "FilterRule") -> FilterRule:
        d = _fields(v, where, "SrcIPs", "DstPorts")
        src = d["SrcIPs"]
        if not isinstance(src, list) or not all(isinstance(s, str) for s in src):
            raise WireError(f"{where}.SrcIPs: expected a list of address strings")
        dsts = tuple(NetPortRange.from_json(x, f"{where}.DstPorts[{i}]")
                     for i, x in enumerate(_list(d["DstPorts"], f"{where}.DstPorts")))
        protos = d.get("IPProto")
        proto = () if protos is None else tuple(
            _int(p, f"{where}.IPProto[{i}]", 0, 255) for i, p in enumerate(_list(protos, f"{where}.IPProto")))
        return cls(tuple(src), dsts, proto)

    def to_json(self) -> JSON:
        out: JSON = {"SrcIPs": list(self.src_ips), "DstPorts": [d.to_json() for d in self.dst_ports]}
        if self.ip_proto:
            out["IPProto"] = list(self.ip_proto)
        return out

    @property
    def allows_all(self) -> bool:
        """Any source, any destination, any port, any protocol."""
        return "*" in self.src_ips and not self.ip_proto and any(
            d.ip == "*" and d.ports == ALL_PORTS for d in self.dst_ports)


ALLOW_ALL_RULE = FilterRule(("*",), (NetPortRange("*", ALL_PORTS),))
# The filter of a tailnet without a policy, as the server sends it (Tailscale's default).
FILTER_ALLOW_ALL: list[JSON] = [ALLOW_ALL_RULE.to_json()]


def parse_filter(v: object, where: str = "PacketFilter") -> tuple[FilterRule, ...]:
    return tuple(FilterRule.from_json(r, f"{where}[{i}]") for i, r in enumerate(_list(v, where)))


# --- SSH policy -------------------------------------------------------------------------------------------

SSH_ACTIONS = ("accept", "check")


@dataclass(frozen=True, slots=True)
class SSHPrincipal:
    node: int
    user: str | None
    tags: tuple[str, ...]
    ips: tuple[str, ...]

    @classmethod
    def from_json(cls, v: object, where: str) -> SSHPrincipal:
        d = _fields(v, where, "Node", "IPs")
        user = d.get("User")
        if user is not None and not isinstance(user, str):
            raise WireError(f"{where}.User: expected a string or null")
        ips = _strs(d["IPs"], f"{where}.IPs")
        for i, ip in enumerate(ips):
            try:
                a = ipaddress.ip_address(ip)
            except ValueError:
                raise WireError(f"{where}.IPs[{i}]: expected an address") from None
            if isinstance(a, ipaddress.IPv6Address) and a.scope_id is not None:
                raise WireError(f"{where}.IPs[{i}]: scoped address")
        return cls(_int(d["Node"], f"{where}.Node"), user, _strs(d.get("Tags"), f"{where}.Tags"), ips)

    def to_json(self) -> JSON:
        return {"Node": self.node, "User": self.user, "Tags": list(self.tags), "IPs": list(self.ips)}


@dataclass(frozen=True, slots=True)
class SSHRule:
    principals: tuple[SSHPrincipal, ...]
    users: tuple[tuple[str, str], ...]  # (login asked for or "*", local user | "=" | "")
    action: str
    check_period: str | None = None
    origin: int = 0

    @classmethod
    def from_json(cls, v: object, where: str) -> SSHRule:
        d = _fields(v, where, "Principals", "SSHUsers", "Action")
        users = _obj(d["SSHUsers"], f"{where}.SSHUsers")
        for k, val in users.items():
            if not isinstance(val, str):
                raise WireError(f"{where}.SSHUsers[{k!r}]: expected a string")
        action = _str(d["Action"], f"{where}.Action")
        if action not in SSH_ACTIONS:
            raise WireError(f"{where}.Action: expected one of {', '.join(SSH_ACTIONS)}")
        period = d.get("CheckPeriod")
        if period is not None and not isinstance(period, str):
            raise WireError(f"{where}.CheckPeriod: expected a string or null")
        principals = tuple(SSHPrincipal.from_json(p, f"{where}.Principals[{i}]")
                           for i, p in enumerate(_list(d["Principals"], f"{where}.Principals")))
        return cls(principals, tuple(sorted(users.items())), action, period,
                   _int(d.get("Origin") or 0, f"{where}.Origin", 0))

    def to_json(self) -> JSON:
        return {"Principals": [p.to_json() for p in self.principals], "SSHUsers": dict(self.users),
                "Action": self.action, "CheckPeriod": self.check_period, "Origin": self.origin}


@dataclass(frozen=True, slots=True)
class SSHPolicy:
    """The ssh rules for connections TO this node, in policy order (coord/policy/ssh.py); no rules: no SSH."""

    rules: tuple[SSHRule, ...] = ()

    @classmethod
    def from_json(cls, v: object, where: str = "SSHPolicy") -> SSHPolicy:
        d = _obj(v, where)
        return cls(tuple(SSHRule.from_json(r, f"{where}.Rules[{i}]")
                         for i, r in enumerate(_list(d.get("Rules") or [], f"{where}.Rules"))))

    def to_json(self) -> JSON:
        return {"Rules": [r.to_json() for r in self.rules]}


@dataclass(frozen=True)
class CapGrant:
    """App capabilities the sources hold on this node (coord/policy/capgrant.py); values are opaque JSON."""

    src_ips: tuple[str, ...]
    cap_map: tuple[tuple[str, tuple[JSON, ...]], ...]

    @classmethod
    def from_json(cls, v: object, where: str) -> CapGrant:
        d = _fields(v, where, "SrcIPs", "CapMap")
        ips = _strs(d["SrcIPs"], f"{where}.SrcIPs")
        for i, ip in enumerate(ips):
            try:
                ipaddress.ip_network(ip, strict=False)
            except ValueError:
                raise WireError(f"{where}.SrcIPs[{i}]: expected an address or prefix") from None
        caps: list[tuple[str, tuple[JSON, ...]]] = []
        for name, vals in _obj(d["CapMap"], f"{where}.CapMap").items():
            items = _list(vals, f"{where}.CapMap[{name!r}]")
            if not all(isinstance(x, dict) for x in items):
                raise WireError(f"{where}.CapMap[{name!r}]: expected a list of objects")
            caps.append((name, tuple(items)))
        return cls(ips, tuple(caps))

    def to_json(self) -> JSON:
        return {"SrcIPs": list(self.src_ips), "CapMap": {k: list(v) for k, v in self.cap_map}}


# --- DERP map ---------------------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class DERPNode:
    name: str = ""
    region_id: int = 0
    host_name: str = ""
    ipv4: str = ""  # "" = not given (use HostName if it is an IP), "none" = no IPv4, else an address
    ipv6: str = ""
    stun_port: int = 0  # 0 = 3478, -1 = no STUN
    derp_port: int = 0  # 0 = 443
    url: str = ""
    insecure_for_tests: bool = False
    stun_only: bool = False

    @classmethod
    def from_json(cls, v: object, where: str) -> DERPNode:
        if not isinstance(v, dict):
            raise DERPMapError(f"{where}: node is not an object")
        try:
            return cls(
                name=_str(v.get("Name"), f"{where}.Name"),
                region_id=_int(v.get("RegionID") or 0, f"{where}.RegionID"),
                host_name=_str(v.get("HostName"), f"{where}.HostName"),
                ipv4=_ip_field(v.get("IPv4"), f"{where}.IPv4"),
                ipv6=_ip_field(v.get("IPv6"), f"{where}.IPv6"),
                stun_port=_int(v.get("STUNPort") or 0, f"{where}.STUNPort", -1, 65535),
                derp_port=_int(v.get("DERPPort") or 0, f"{where}.DERPPort", 0, 65535),
                url=_str(v.get("URL"), f"{where}.URL"),
                insecure_for_tests=_bool(v.get("InsecureForTests"), f"{where}.InsecureForTests"),
                stun_only=_bool(v.get("STUNOnly"), f"{where}.STUNOnly"),
            )
        except DERPMapError:
            raise
        except WireError as e:
            raise DERPMapError(str(e)) from None

    def to_json(self) -> JSON:
        out: JSON = {"Name": self.name, "RegionID": self.region_id, "HostName": self.host_name}
        if self.ipv4:
            out["IPv4"] = self.ipv4
        if self.ipv6:
            out["IPv6"] = self.ipv6
        out["DERPPort"] = self.derp_port
        out["STUNPort"] = self.stun_port
        if self.url:
            out["URL"] = self.url
        out["InsecureForTests"] = self.insecure_for_tests
        if self.stun_only:
            out["STUNOnly"] = True
        return out


def _ip_field(v: object, where: str) -> str:
    text = _str(v, where)
    if text in ("", "none"):
        return text
    try:
        return str(ipaddress.ip_address(text))
    except ValueError:
        raise DERPMapError(f"{where}: {text[:60]!r} is not an IP address or \"none\"") from None


@dataclass(frozen=True, slots=True)
class DERPRegion:
    region_id: int
    region_code: str = ""
    region_name: str = ""
    nodes: tuple[DERPNode, ...] = ()
    no_measure_no_home: bool = False

    @classmethod
    def from_json(cls, key: str, v: object, where: str, problems: list[str] | None) -> DERPRegion:
        if not isinstance(v, dict):
            raise DERPMapError(f"region {key}: not an object")
        rid = v.get("RegionID", key)
        if isinstance(rid, str) and rid.isascii() and rid.strip().isdigit():
            rid = int(rid)
        if not isinstance(rid, int) or isinstance(rid, bool):
            raise DERPMapError(f"region {key}: RegionID {rid!r} is not an integer")
        nodes = v.get("Nodes")
        if nodes is not None and not isinstance(nodes, list):
            raise DERPMapError(f"region {rid}: Nodes is not a list")
        out: list[DERPNode] = []
        for i, n in enumerate(nodes or ()):
            try:
                out.append(DERPNode.from_json(n, f"region {rid} node {i}"))
            except WireError as e:
                _fail(problems, e)
        try:
            return cls(
                region_id=rid,
                region_code=_str(v.get("RegionCode"), f"{where}.RegionCode"),
                region_name=_str(v.get("RegionName"), f"{where}.RegionName"),
                nodes=tuple(out),
                no_measure_no_home=_bool(v.get("NoMeasureNoHome"), f"{where}.NoMeasureNoHome"),
            )
        except WireError as e:
            raise DERPMapError(str(e)) from None

    def to_json(self) -> JSON:
        out: JSON = {"RegionID": self.region_id, "RegionCode": self.region_code, "RegionName": self.region_name,
                     "Nodes": [n.to_json() for n in self.nodes]}
        if self.no_measure_no_home:
            out["NoMeasureNoHome"] = True
        return out


@dataclass(frozen=True, slots=True)
class DERPMap:
    """Regions by id, in the order the map listed them."""

    regions: tuple[DERPRegion, ...] = ()

    @classmethod
    def from_json(cls, v: object, where: str = "DERPMap", problems: list[str] | None = None) -> DERPMap:
        if not isinstance(v, dict):
            raise DERPMapError(f"{where}: expected an object")
        regions = v.get("Regions")
        if not isinstance(regions, dict):
            _fail(problems, DERPMapError("DERPMap without a Regions object"))
            return cls()
        out: dict[int, DERPRegion] = {}
        for key, r in regions.items():
            try:
                region = DERPRegion.from_json(str(key), r, f"{where}.Regions.{key}", problems)
            except WireError as e:
                _fail(problems, e)
                continue
            out.setdefault(region.region_id, region)
        return cls(tuple(out.values()))

    def to_json(self) -> JSON:
        return {"Regions": {str(r.region_id): r.to_json() for r in self.regions}}

    def region(self, region_id: int) -> DERPRegion | None:
        return next((r for r in self.regions if r.region_id == region_id), None)


# --- DNS --------------------------------------------------------------------------------------------------


def _resolver(v: object, where: str) -> str:
    if isinstance(v, str):
        return v
    return _str(_obj(v, where).get("Addr"), f"{where}.Addr")


@dataclass(frozen=True, slots=True)
class DNSConfig:
    resolvers: tuple[str, ...] = ()
    domains: tuple[str, ...] = ()
    proxied: bool = False
    routes: tuple[tuple[str, tuple[str, ...]], ...] = ()  # (suffix, resolvers), in the map's order
    extra_records: tuple[tuple[str, str, str], ...] = ()  # (name, type, value)
    fallback_resolvers: tuple[str, ...] = ()

    @classmethod
    def from_json(cls, v: object, where: str = "DNSConfig") -> DNSConfig:
        d = _obj(v, where)
        records: list[tuple[str, str, str]] = []
        extra = d.get("ExtraRecords")
        for i, r in enumerate(_list(extra or [], f"{where}.ExtraRecords")):
            at = f"{where}.ExtraRecords[{i}]"
            o = _obj(r, at)
            kind = o.get("Type")
            records.append((_str(o.get("Name"), f"{at}.Name"), "" if kind is None else _str(kind, f"{at}.Type"),
                            _str(o.get("Value"), f"{at}.Value")))
        routes = d.get("Routes")
        pairs: list[tuple[str, tuple[str, ...]]] = []
        for suffix, rs in _obj(routes, f"{where}.Routes").items() if routes is not None else ():
            at = f"{where}.Routes[{suffix!r}]"
            pairs.append((suffix, tuple(_resolver(r, f"{at}[{i}]") for i, r in enumerate(_list(rs or [], at)))))
        resolvers = d.get("Resolvers")
        fallback = d.get("FallbackResolvers")
        return cls(
            resolvers=tuple(_resolver(r, f"{where}.Resolvers[{i}]")
                            for i, r in enumerate(_list(resolvers or [], f"{where}.Resolvers"))),
            domains=_strs(d.get("Domains"), f"{where}.Domains"),
            proxied=_bool(d.get("Proxied"), f"{where}.Proxied"),
            routes=tuple(pairs),
            extra_records=tuple(records),
            fallback_resolvers=tuple(_resolver(r, f"{where}.FallbackResolvers[{i}]")
                                     for i, r in enumerate(_list(fallback or [], f"{where}.FallbackResolvers"))),
        )

    def to_json(self) -> JSON:
        out: JSON = {
            "Resolvers": [{"Addr": r} for r in self.resolvers],
            "Domains": list(self.domains),
            "Proxied": self.proxied,
            "Routes": {s: [{"Addr": r} for r in rs] for s, rs in self.routes},
        }
        if self.extra_records:
            out["ExtraRecords"] = [{"Name": n, "Type": t, "Value": v} for n, t, v in self.extra_records]
        if self.fallback_resolvers:
            out["FallbackResolvers"] = [{"Addr": r} for r in self.fallback_resolvers]
        return out


# --- nodes ------------------------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class Node:
    """A node record: the self node or a peer."""

    id: int
    stable_id: str = ""
    name: str = ""  # FQDN with a trailing dot
    user: int | None = None
    key: bytes | None = None
    key_expiry: datetime | None = None
    machine: bytes | None = None
    disco_key: bytes | None = None
    addresses: tuple[IPInterface, ...] = ()
    allowed_ips: tuple[IPNetwork, ...] = ()
    primary_routes: tuple[IPNetwork, ...] = ()
    endpoints: tuple[Endpoint, ...] = ()
    home_derp: int = 0
    online: bool = False
    last_seen: datetime | None = None
    tags: tuple[str, ...] = ()
    hostinfo: Hostinfo = Hostinfo()
    created: datetime | None = None
    expired: bool = False
    machine_authorized: bool | None = None  # sent on the self node only

    @classmethod
    def from_json(cls, v: object, where: str = "Node", problems: list[str] | None = None) -> Node:
        """Strict without ``problems``; with it, unreadable endpoints, addresses and prefixes are left out."""
        d = _fields(v, where, "ID")
        user = d.get("User")
        hostinfo = d.get("Hostinfo")
        try:
            hi = Hostinfo.from_json(hostinfo)
        except WireError as e:
            msg = str(e)
            raise WireError(f"{where}.{msg}" if msg.startswith("Hostinfo") else f"{where}.Hostinfo.{msg}") from None
        authorized = d.get("MachineAuthorized")
        return cls(
            id=_int(d["ID"], f"{where}.ID"),
            stable_id=_str(d.get("StableID"), f"{where}.StableID"),
            name=_str(d.get("Name"), f"{where}.Name"),
            user=None if user is None else _int(user, f"{where}.User"),
            key=parse_opt_key(d.get("Key"), "nodekey", f"{where}.Key"),
            key_expiry=_time(d.get("KeyExpiry"), f"{where}.KeyExpiry"),
            machine=parse_opt_key(d.get("Machine"), "mkey", f"{where}.Machine"),
            disco_key=parse_opt_key(d.get("DiscoKey"), "discokey", f"{where}.DiscoKey"),
            addresses=_items(d.get("Addresses"), f"{where}.Addresses", _interface, problems),
            allowed_ips=_items(d.get("AllowedIPs"), f"{where}.AllowedIPs", _network, problems),
            primary_routes=_items(d.get("PrimaryRoutes"), f"{where}.PrimaryRoutes", _network, problems),
            endpoints=_items(d.get("Endpoints"), f"{where}.Endpoints", _endpoint, problems),
            home_derp=_int(d.get("HomeDERP") or 0, f"{where}.HomeDERP", 0, 65535),
            online=_bool(d.get("Online"), f"{where}.Online"),
            last_seen=_time(d.get("LastSeen"), f"{where}.LastSeen"),
            tags=_strs(d.get("Tags"), f"{where}.Tags"),
            hostinfo=hi,
            created=_time(d.get("Created"), f"{where}.Created"),
            expired=_bool(d.get("Expired"), f"{where}.Expired"),
            machine_authorized=None if authorized is None else _bool(authorized, f"{where}.MachineAuthorized"),
        )

    def to_json(self) -> JSON:
        """The record as the server writes it (coord/netmap.py ``node_record``)."""
        out: JSON = {
            "ID": self.id,
            "StableID": self.stable_id,
            "Name": self.name,
            "User": self.user,
            "Key": _key_json("nodekey", self.key),
            "KeyExpiry": time_json(self.key_expiry),
            "Machine": _key_json("mkey", self.machine),
            "DiscoKey": _key_json("discokey", self.disco_key),
            "Addresses": [str(a) for a in self.addresses],
            "AllowedIPs": [str(a) for a in self.allowed_ips],
            "PrimaryRoutes": [str(a) for a in self.primary_routes],
            "Endpoints": [str(e) for e in self.endpoints],
            "HomeDERP": self.home_derp,
            "Online": self.online,
            "LastSeen": time_json(self.last_seen),
            "Tags": list(self.tags),
            "Hostinfo": {"Hostname": self.hostinfo.hostname, "OS": self.hostinfo.os,
                         "RoutableIPs": list(self.hostinfo.routable_ips)},
            "Created": time_json(self.created),
            "Expired": self.expired,
        }
        if self.hostinfo.request_tags:
            out["Hostinfo"]["RequestTags"] = list(self.hostinfo.request_tags)
        if self.machine_authorized is not None:
            out["MachineAuthorized"] = self.machine_authorized
        return out

    @property
    def short_name(self) -> str:
        """The first label of the name (the host name)."""
        return self.name.split(".", 1)[0]

    @property
    def key_text(self) -> str | None:
        return None if self.key is None else key_text("nodekey", self.key)

    def ips(self) -> list[str]:
        """The node's tailnet addresses without prefix lengths."""
        return [str(a.ip) for a in self.addresses]


def _key_json(kind: str, raw: bytes | None) -> str:
    return "" if raw is None else key_text(kind, raw)


class Keep(enum.Enum):
    """A PeerChange field that was not sent: the peer keeps what it had."""

    KEEP = "keep"


KEEP = Keep.KEEP


@dataclass(frozen=True, slots=True)
class PeerChange:
    """A patch of one peer (PeersChangedPatch): only the fields sent change."""

    node_id: int
    endpoints: tuple[Endpoint, ...] | Literal[Keep.KEEP] = KEEP
    home_derp: int | Literal[Keep.KEEP] = KEEP
    online: bool | Literal[Keep.KEEP] = KEEP
    last_seen: datetime | Literal[Keep.KEEP] | None = KEEP
    disco_key: bytes | Literal[Keep.KEEP] | None = KEEP
    key: bytes | Literal[Keep.KEEP] | None = KEEP
    key_expiry: datetime | Literal[Keep.KEEP] | None = KEEP

    @classmethod
    def from_json(cls, v: object, where: str = "PeerChange", problems: list[str] | None = None) -> PeerChange:
        d = _fields(v, where, "NodeID")
        kw: dict[str, Any] = {}
        if "Endpoints" in d:
            kw["endpoints"] = _items(d["Endpoints"], f"{where}.Endpoints", _endpoint, problems)
        if "HomeDERP" in d:
            kw["home_derp"] = _int(d["HomeDERP"] or 0, f"{where}.HomeDERP", 0, 65535)
        if "Online" in d:
            kw["online"] = _bool(d["Online"], f"{where}.Online")
        if "LastSeen" in d:
            kw["last_seen"] = _time(d["LastSeen"], f"{where}.LastSeen")
        if "DiscoKey" in d:
            kw["disco_key"] = parse_opt_key(d["DiscoKey"], "discokey", f"{where}.DiscoKey")
        if "Key" in d:
            kw["key"] = parse_opt_key(d["Key"], "nodekey", f"{where}.Key")
        if "KeyExpiry" in d:
            kw["key_expiry"] = _time(d["KeyExpiry"], f"{where}.KeyExpiry")
        return cls(_int(d["NodeID"], f"{where}.NodeID"), **kw)

    def to_json(self) -> JSON:
        out: JSON = {"NodeID": self.node_id}
        if self.endpoints is not KEEP:
            out["Endpoints"] = [str(e) for e in self.endpoints]
        if self.home_derp is not KEEP:
            out["HomeDERP"] = self.home_derp
        if self.online is not KEEP:
            out["Online"] = self.online
        if self.last_seen is not KEEP:
            out["LastSeen"] = time_json(self.last_seen)
        if self.disco_key is not KEEP:
            out["DiscoKey"] = _key_json("discokey", self.disco_key)
        if self.key is not KEEP:
            out["Key"] = _key_json("nodekey", self.key)
        if self.key_expiry is not KEEP:
            out["KeyExpiry"] = time_json(self.key_expiry)
        return out

    def apply(self, peer: Node) -> Node:
        changes = {f.name: getattr(self, f.name) for f in dataclasses.fields(self)
                   if f.name != "node_id" and getattr(self, f.name) is not KEEP}
        return dataclasses.replace(peer, **changes)


# --- map response -----------------------------------------------------------------------------------------


@dataclass(frozen=True)
class MapResponse:
    node: Node | None = None
    peers: tuple[Node, ...] | None = None  # None: unchanged; else the whole list
    peers_changed: tuple[Node, ...] = ()
    peers_removed: tuple[int, ...] = ()
    peers_patch: tuple[PeerChange, ...] = ()
    derp_map: DERPMap | None = None
    dns: DNSConfig | None = None
    packet_filter: tuple[FilterRule, ...] | None = None  # None: unchanged; () blocks all
    ssh_policy: SSHPolicy | None = None  # None: unchanged; no rules: no SSH
    cap_grants: tuple[CapGrant, ...] | None = None  # None: unchanged
    domain: str = ""
    keep_alive: bool = False
    control_time: datetime | None = None
    keep_established: bool | None = None  # None: unchanged
    # What was left out as unreadable (see the module doc), each with its JSON path.
    problems: tuple[str, ...] = field(default=(), compare=False)

    @classmethod
    def from_json(cls, v: object) -> MapResponse:
        w = "MapResponse"
        d = _obj(v, w)
        problems: list[str] = []
        node = d.get("Node")
        peers = d.get("Peers")
        removed = [_int(x, f"{w}.PeersRemoved[{i}]")
                   for i, x in enumerate(_list(d.get("PeersRemoved") or [], f"{w}.PeersRemoved"))]
        changed = _records(d.get("PeersChanged"), f"{w}.PeersChanged", Node.from_json, removed, problems)
        patches = _records(d.get("PeersChangedPatch"), f"{w}.PeersChangedPatch", PeerChange.from_json, removed,
                           problems)
        derp, dns, filt = d.get("DERPMap"), d.get("DNSConfig"), d.get("PacketFilter")
        return cls(
            node=None if node is None else Node.from_json(node, f"{w}.Node", problems),
            peers=None if peers is None else _records(peers, f"{w}.Peers", Node.from_json, None, problems),
            peers_changed=changed,
            peers_removed=tuple(removed),
            peers_patch=patches,
            derp_map=None if derp is None else DERPMap.from_json(derp, f"{w}.DERPMap", problems),
            dns=None if dns is None else DNSConfig.from_json(dns, f"{w}.DNSConfig"),
            packet_filter=None if filt is None else parse_filter(filt, f"{w}.PacketFilter"),
            ssh_policy=None if d.get("SSHPolicy") is None else SSHPolicy.from_json(d["SSHPolicy"], f"{w}.SSHPolicy"),
            cap_grants=None if d.get("CapGrants") is None else tuple(
                CapGrant.from_json(g, f"{w}.CapGrants[{i}]") for i, g in enumerate(_list(d["CapGrants"], w))),
            domain=_str(d.get("Domain"), f"{w}.Domain"),
            keep_alive=_bool(d.get("KeepAlive"), f"{w}.KeepAlive"),
            control_time=_time(d.get("ControlTime"), f"{w}.ControlTime"),
            keep_established=None if d.get("KeepEstablished") is None else _bool(
                d["KeepEstablished"], f"{w}.KeepEstablished"),
            problems=tuple(problems),
        )

    def to_json(self) -> JSON:
        out: JSON = {}
        if self.node is not None:
            out["Node"] = self.node.to_json()
        if self.peers is not None:
            out["Peers"] = [p.to_json() for p in self.peers]
        if self.peers_changed:
            out["PeersChanged"] = [p.to_json() for p in self.peers_changed]
        if self.peers_removed:
            out["PeersRemoved"] = list(self.peers_removed)
        if self.peers_patch:
            out["PeersChangedPatch"] = [p.to_json() for p in self.peers_patch]
        if self.derp_map is not None:
            out["DERPMap"] = self.derp_map.to_json()
        if self.dns is not None:
            out["DNSConfig"] = self.dns.to_json()
        if self.packet_filter is not None:
            out["PacketFilter"] = [r.to_json() for r in self.packet_filter]
        if self.ssh_policy is not None:
            out["SSHPolicy"] = self.ssh_policy.to_json()
        if self.cap_grants is not None:
            out["CapGrants"] = [g.to_json() for g in self.cap_grants]
        if self.domain:
            out["Domain"] = self.domain
        if self.keep_alive:
            out["KeepAlive"] = True
        if self.keep_established is not None:
            out["KeepEstablished"] = self.keep_established
        if self.control_time is not None:
            out["ControlTime"] = time_text(self.control_time)
        return out

    @property
    def empty(self) -> bool:
        """Nothing in it changes a netmap (a keep-alive, say)."""
        return (self.node is None and self.peers is None and not self.peers_changed and not self.peers_removed
                and not self.peers_patch and self.derp_map is None and self.dns is None
                and self.packet_filter is None and self.ssh_policy is None and self.cap_grants is None
                and not self.domain and self.keep_established is None)


R = TypeVar("R", Node, PeerChange)


def _records(v: object, where: str, parse: Callable[[object, str, list[str] | None], R], removed: list[int] | None,
             problems: list[str]) -> tuple[R, ...]:
    """Peer records or patches: one that cannot be read is left out, and (``removed``) its peer is dropped, so no
    peer lives on with data the server has since replaced."""
    if v is None:
        return ()
    out: list[R] = []
    for i, x in enumerate(_list(v, where)):
        try:
            out.append(parse(x, f"{where}[{i}]", problems))
        except WireError as e:
            problems.append(str(e))
            pid = x.get("ID", x.get("NodeID")) if isinstance(x, dict) else None
            if removed is not None and isinstance(pid, int) and not isinstance(pid, bool):
                removed.append(pid)
    return tuple(out)


# --- JSON-level netmap (the server's tests) ---------------------------------------------------------------

PATCH_FIELDS = ("Endpoints", "HomeDERP", "Online", "LastSeen", "DiscoKey", "Key", "KeyExpiry")


@dataclass
class NetMap:
    """A full MapResponse and the deltas after it, applied as JSON: the server's tests compare maps with it.

    The node applies typed MapResponses instead (node/mapsession.py); tests/coord/test_shape_wire.py checks that
    the two agree on what the server sends."""

    node: dict[str, Any] | None = None
    peers: dict[int, dict[str, Any]] = field(default_factory=dict)
    derp_map: dict[str, Any] | None = None
    dns: dict[str, Any] | None = None
    packet_filter: list[dict[str, Any]] | None = None
    domain: str = ""
    ssh_policy: dict[str, Any] | None = None
    cap_grants: list[dict[str, Any]] | None = None
    keep_established: bool = False

    def apply(self, msg: dict[str, Any]) -> None:
        if "Node" in msg and msg["Node"] is not None:
            self.node = msg["Node"]
        if msg.get("Peers") is not None:
            self.peers = {p["ID"]: p for p in msg["Peers"]}
        else:
            for p in msg.get("PeersChanged") or ():
                self.peers[p["ID"]] = p
            for pid in msg.get("PeersRemoved") or ():
                self.peers.pop(pid, None)
            for patch in msg.get("PeersChangedPatch") or ():
                peer = self.peers.get(patch["NodeID"])
                if peer is None:
                    continue
                peer = dict(peer)
                for k in PATCH_FIELDS:
                    if k in patch:
                        peer[k] = patch[k]
                self.peers[patch["NodeID"]] = peer
        for attr, key in (("derp_map", "DERPMap"), ("dns", "DNSConfig"), ("packet_filter", "PacketFilter"),
                          ("ssh_policy", "SSHPolicy"), ("cap_grants", "CapGrants")):
            if msg.get(key) is not None:
                setattr(self, attr, msg[key])
        if msg.get("Domain"):
            self.domain = msg["Domain"]
        if msg.get("KeepEstablished") is not None:
            self.keep_established = bool(msg["KeepEstablished"])

    def as_json(self) -> dict[str, Any]:
        return {
            "Node": self.node,
            "Peers": [self.peers[k] for k in sorted(self.peers)],
            "DERPMap": self.derp_map,
            "DNSConfig": self.dns,
            "PacketFilter": self.packet_filter,
            "Domain": self.domain,
            "SSHPolicy": self.ssh_policy,
            "CapGrants": self.cap_grants,
            "KeepEstablished": self.keep_established,
        }

