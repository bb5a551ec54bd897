"""The node's login and registration state, without I/O: what the backend state is, and what a registration
answer means for what the agent does next.

    NoState --start--> NeedsLogin | Stopped | Starting
    Starting/NeedsLogin --register: authorized--> Starting --first netmap--> Running
                        --register: login URL--> NeedsLogin (the agent follows the URL up, long-polling)
                        --register: key expired--> NeedsLogin, KeyExpired (the agent waits for `shoal up`)
    Running --netmap: self expired--> NeedsLogin, KeyExpired
    any --down--> Stopped (registered) | NeedsLogin;  any --logout--> NeedsLogin

`read(response)` is the one reading of a RegisterResponse, for `shoal up` and for the control loop alike.
"""

from __future__ import annotations

import enum
import ipaddress
from dataclasses import dataclass, replace
from typing import Protocol

from coord import wire
from node.state import Prefs


class State(enum.StrEnum):
    NO_STATE = "NoState"
    NEEDS_LOGIN = "NeedsLogin"
    STARTING = "Starting"
    RUNNING = "Running"
    STOPPED = "Stopped"


class Registration(Protocol):
    """What a RegisterResponse says (coord.wire's type has these fields)."""

    @property
    def machine_authorized(self) -> bool: ...
    @property
    def node_key_expired(self) -> bool: ...
    @property
    def auth_url(self) -> str: ...
    @property
    def error(self) -> str: ...


class Answer(enum.Enum):
    AUTHORIZED = "authorized"  # open the map stream
    NEEDS_AUTH = "needs-auth"  # a login URL: wait for approval (follow it up)
    KEY_EXPIRED = "key-expired"  # this node key may not be used again: re-authenticate with a new one
    REFUSED = "refused"  # the server said no (`Error`)
    UNCLEAR = "unclear"  # neither authorized nor a login URL: nothing we can act on


@dataclass(frozen=True)
class Reading:
    answer: Answer
    auth_url: str = ""
    error: str = ""


def read(resp: Registration) -> Reading:
    if resp.node_key_expired:
        return Reading(Answer.KEY_EXPIRED)
    if resp.error:
        return Reading(Answer.REFUSED, error=resp.error)
    if resp.machine_authorized:
        return Reading(Answer.AUTHORIZED)
    if resp.auth_url:
        return Reading(Answer.NEEDS_AUTH, auth_url=resp.auth_url)
    return Reading(Answer.UNCLEAR, error="registration neither authorized nor gave a login URL")


@dataclass
class Login:
    state: State = State.NO_STATE
    auth_url: str = ""
    key_expired: bool = False

    def started(self, *, logged_in: bool, want_running: bool) -> None:
        """At daemon start, from the saved prefs."""
        if logged_in and want_running:
            self.state = State.STARTING
        elif logged_in:
            self.state = State.STOPPED
        else:
            self.state = State.NEEDS_LOGIN

    def registered(self, r: Reading) -> None:
        if r.answer is Answer.AUTHORIZED:
            self.auth_url = ""
            self.key_expired = False
            self.state = State.STARTING
        elif r.answer is Answer.NEEDS_AUTH:
            self.auth_url = r.auth_url
            self.state = State.NEEDS_LOGIN
        elif r.answer is Answer.KEY_EXPIRED:
            self.key_expired = True
            self.state = State.NEEDS_LOGIN

    def netmap(self, self_expired: bool) -> None:
        self.key_expired = self_expired
        self.state = State.NEEDS_LOGIN if self_expired else State.RUNNING

    def down(self, *, logged_in: bool) -> None:
        self.state = State.STOPPED if logged_in else State.NEEDS_LOGIN

    def logged_out(self) -> None:
        self.state = State.NEEDS_LOGIN
        self.auth_url = ""


class UpRefused(Exception):
    """A `shoal up` refused before anything is sent; `status` is the HTTP status the local API answers."""

    def __init__(self, status: int, message: str) -> None:
        super().__init__(message)
        self.status = status


@dataclass(frozen=True)
class RouteFlags:
    """`shoal up`'s routing flags; None keeps what the prefs hold."""

    advertise_routes: list[str] | None = None
    advertise_exit_node: bool | None = None
    accept_routes: bool | None = None
    snat_subnet_routes: bool | None = None
    exit_node: str | None = None  # "" clears it
    exit_node_allow_lan_access: bool | None = None
    route_probe: str | None = None  # "" clears it


def parse_routes(texts: list[str]) -> list[str]:
    """--advertise-routes: masked prefixes (as Tailscale: 10.0.0.1/24 is refused, not silently masked); the
    default routes only through --advertise-exit-node."""
    out: list[str] = []
    for t in texts:
        try:
            net = ipaddress.ip_network(t.strip(), strict=True)
        except ValueError:
            msg = f"--advertise-routes: {t!r} is not a masked CIDR prefix (e.g. 198.51.100.0/24)"
            raise UpRefused(400, msg) from None
        if net.prefixlen == 0:
            raise UpRefused(400, f"--advertise-routes: {t}: use --advertise-exit-node to offer the default routes")
        if str(net) not in out:
            out.append(str(net))
    return out


def up_prefs(prefs: Prefs, login_server: str, hostname: str | None, tags: list[str] | None,
             server_key: str = "", ca_file: str | None = None, routing: RouteFlags = RouteFlags(),
             control_urls: list[str] | None = None) -> Prefs:
    """The prefs a `shoal up` would leave, checked. A copy: nothing is kept until the server has answered."""
    server = (login_server or prefs.login_server).rstrip("/")
    if not server:
        raise UpRefused(400, "no login server: pass --login-server URL")
    if not server.startswith(("http://", "https://")):
        raise UpRefused(400, f"login server {server!r} must be an http:// or https:// URL")
    have = prefs.login_server.rstrip("/")
    if have and server != have and not prefs.logged_out:
        raise UpRefused(409, f"this node is registered with {have}; run `shoal logout` before switching to {server}")
    out = replace(prefs, advertise_tags=list(prefs.advertise_tags), login_server=server)
    if server != have:
        out.server_key = ""
    if server_key:
        # pinned up front (`shoal up --server-key`): the first contact is checked too, not trusted
        try:
            want = wire.key_text("mkey", wire.parse_key(server_key, "mkey", "--server-key"))
        except wire.WireError as e:
            raise UpRefused(400, str(e)) from None
        if out.server_key and out.server_key != want:
            raise UpRefused(409, f"this node pinned server key {out.server_key} for {server}, but --server-key "
                                 f"says {want}; refusing (run `shoal logout` to start over)")
        out.server_key = want
    if control_urls is not None:
        urls = []
        for u in control_urls:
            u = u.rstrip("/")
            if not u.startswith(("http://", "https://")):
                raise UpRefused(400, f"login server {u!r} must be an http:// or https:// URL")
            if u != server and u not in urls:
                urls.append(u)
        out.control_urls = urls
    elif server != have:
        out.control_urls = []
    if ca_file is not None:
        out.ca_file = ca_file
    if hostname is not None:
        out.hostname = hostname
    if tags is not None:
        out.advertise_tags = list(tags)
    out.advertise_routes = list(prefs.advertise_routes)
    if routing.advertise_routes is not None:
        out.advertise_routes = parse_routes(routing.advertise_routes)
    for name in ("advertise_exit_node", "accept_routes", "snat_subnet_routes", "exit_node_allow_lan_access"):
        v = getattr(routing, name)
        if v is not None:
            setattr(out, name, v)
    if routing.exit_node is not None:
        out.exit_node = parse_exit_node(routing.exit_node)
    if routing.route_probe is not None:
        t = routing.route_probe.strip()
        try:
            out.route_probe = str(ipaddress.ip_address(t)) if t else ""
        except ValueError:
            raise UpRefused(400, f"--route-probe: {routing.route_probe!r} is not an IP address") from None
    if out.exit_node and out.advertise_exit_node:
        raise UpRefused(400, "--exit-node and --advertise-exit-node cannot both be set (an exit node does not use "
                             "another)")
    return out


def parse_exit_node(text: str) -> str:
    """--exit-node: a tailnet IP, or a peer's name (its MagicDNS label or full name); "" clears it."""
    t = text.strip().rstrip(".")
    if not t:
        return ""
    try:
        return str(ipaddress.ip_address(t))
    except ValueError:
        pass
    if len(t) > 253 or not all(c.isalnum() or c in "-." for c in t):
        raise UpRefused(400, f"--exit-node: {text!r} is neither an IP address nor a node name")
    return t.lower()
