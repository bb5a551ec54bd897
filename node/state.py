"""What shoald keeps in its state dir besides the keys (node/keys.py): preferences and the last netmap.

Files (mode 0600, written atomically with node.keys.write_private):

``prefs.json``::

    {"version": 1,
     "login_server": "http://203.0.113.1:8080",   # "" until the first `shoal up`
     "control_urls": ["http://203.0.113.2:8080"], # other replicas of that server (same pinned key)
     "server_key": "mkey:<64 hex>" | "",          # pinned on first contact (or by `up --server-key`); any
                                                  # other key is refused
     "ca_file": "/etc/ssl/shoal-ca.pem" | "",     # CA bundle for an https server ("" = the system store)
     "want_running": true,                        # false after `shoal down`; restored at start
     "logged_out": false,                         # true after `shoal logout`
     "hostname": "", "advertise_tags": ["tag:x"],
     "advertise_routes": ["198.51.100.0/24"],     # subnet routes offered (Hostinfo.RoutableIPs)
     "advertise_exit_node": false,                # offer 0.0.0.0/0 and ::/0 too
     "accept_routes": false,                      # install peers' approved subnet routes
     "snat_subnet_routes": true,                  # masquerade traffic forwarded to advertised subnets
     "exit_node": "",                             # the peer (name or tailnet IP) all traffic goes through
     "exit_node_allow_lan_access": false,         # with it, directly connected LANs stay outside the tunnel
     "route_probe": ""}                           # an address on the LAN that must answer for routes to count

``netmap.json``: the last netmap (``node.mapsession.NetMap.to_json()``, a full MapResponse), so a restart while
the server is down brings the tunnels back. It holds no secrets but is 0600 all the same (it lists the tailnet).

A file that exists but cannot be read is a ``StateFileError`` naming it and the way out; nothing here ever
replaces an unreadable file with defaults.
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from coord import wire
from node.keys import StateFileError, write_private
from node.mapsession import NetMap

PREFS = "prefs.json"
NETMAP = "netmap.json"
VERSION = 1


@dataclass
class Prefs:
    login_server: str = ""
    # more replicas of the same server (`shoal up --login-server A --login-server B`): they hold the pinned key
    # too; the control loop moves to the next when its replica fails (docs/ha.md)
    control_urls: list[str] = field(default_factory=list)
    server_key: str = ""
    ca_file: str = ""
    want_running: bool = False
    logged_out: bool = False
    hostname: str = ""
    advertise_tags: list[str] = field(default_factory=list)
    accept_dns: bool = True  # MagicDNS may point the OS at quad-100 (`shoal up --accept-dns=false`: never)
    advertise_routes: list[str] = field(default_factory=list)
    advertise_exit_node: bool = False
    accept_routes: bool = False
    snat_subnet_routes: bool = True
    run_ssh: bool = False  # `shoal up --ssh`: serve Shoal SSH on the tailnet addresses (node/ssh)
    exit_node: str = ""  # as given to `shoal up --exit-node` (name or tailnet IP); "" = none
    exit_node_allow_lan_access: bool = False
    route_probe: str = ""  # an address on the advertised LAN that must answer ping (`--route-probe`); "" = none

    def routable_ips(self) -> tuple[str, ...]:
        """What Hostinfo.RoutableIPs offers: the subnet routes, and both default routes for an exit node."""
        exit_routes = ("0.0.0.0/0", "::/0") if self.advertise_exit_node else ()
        return tuple(dict.fromkeys([*self.advertise_routes, *exit_routes]))

    def server_key_raw(self) -> bytes | None:
        return wire.parse_key(self.server_key, "mkey", "server_key") if self.server_key else None

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> Prefs:
        out = cls()
        for name, kind in (("login_server", str), ("server_key", str), ("ca_file", str), ("want_running", bool),
                           ("logged_out", bool), ("hostname", str), ("accept_dns", bool), ("advertise_exit_node", bool),
                           ("accept_routes", bool), ("snat_subnet_routes", bool), ("run_ssh", bool),
                           ("exit_node", str), ("exit_node_allow_lan_access", bool), ("route_probe", str)):
            if name in data:
                if not isinstance(data[name], kind):
                    raise ValueError(f"{name}: expected {kind.__name__}")
                setattr(out, name, data[name])
        tags = data.get("advertise_tags", [])
        if not isinstance(tags, list) or not all(isinstance(t, str) for t in tags):
            raise ValueError("advertise_tags: expected a list of strings")
        out.advertise_tags = list(tags)
        urls = data.get("control_urls", [])
        if not isinstance(urls, list) or not all(isinstance(u, str) for u in urls):
            raise ValueError("control_urls: expected a list of strings")
        out.control_urls = list(urls)
        routes = data.get("advertise_routes", [])
        if not isinstance(routes, list) or not all(isinstance(r, str) for r in routes):
            raise ValueError("advertise_routes: expected a list of strings")
        out.advertise_routes = list(routes)
        if out.server_key:
            try:
                out.server_key_raw()
            except wire.WireError as e:
                raise ValueError(str(e)) from None
        return out


class StateDir:
    def __init__(self, path: Path | str) -> None:
        self.dir = Path(path)

    def ensure(self) -> None:
        self.dir.mkdir(parents=True, exist_ok=True, mode=0o700)

    def _read_json(self, name: str) -> dict[str, Any] | None:
        path = self.dir / name
        try:
            text = path.read_text()
        except FileNotFoundError:
            return None
        except (OSError, UnicodeDecodeError) as e:
            raise StateFileError(path, str(e)) from None
        try:
            data = json.loads(text)
        except ValueError as e:
            raise StateFileError(path, f"not JSON: {e}") from None
        if not isinstance(data, dict):
            raise StateFileError(path, "not a JSON object")
        return data

    def load_prefs(self) -> Prefs:
        data = self._read_json(PREFS)
        if data is None:
            return Prefs()
        try:
            return Prefs.from_json(data)
        except ValueError as e:
            raise StateFileError(self.dir / PREFS, str(e)) from None

    def save_prefs(self, prefs: Prefs) -> None:
        self.ensure()
        data = {"version": VERSION, **asdict(prefs)}
        write_private(self.dir / PREFS, json.dumps(data, indent=1) + "\n")

    def load_netmap(self) -> NetMap | None:
        data = self._read_json(NETMAP)
        if data is None:
            return None
        try:
            return NetMap.from_json(data)
        except wire.WireError as e:
            raise StateFileError(self.dir / NETMAP, f"not a netmap: {e}") from None

    def save_netmap(self, nm: NetMap) -> None:
        self.ensure()
        write_private(self.dir / NETMAP, json.dumps(nm.to_json(), separators=(",", ":")) + "\n")

    def forget_netmap(self) -> None:
        (self.dir / NETMAP).unlink(missing_ok=True)
