"""A real tailnet in the lab: shoal-server in the internet namespace, one shoald per node namespace.

Used by tests/lab_tests/test_tailnet*.py, scripts/lab and scripts/bench/dataplane. Every process goes through
`lab.spawn`, so the lab's teardown kills it by PID.
"""

from __future__ import annotations

import json
import socket
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from tests.lab.lab import Lab, LabError

PY = sys.executable
SERVER_PORT = 8080
STUN_PORT = 3478
RELAY2_REGION = 901


@dataclass
class Tailnet:
    lab: Lab
    workdir: Path
    server_ns: str = ""  # namespace name of the server ("inet" by default)
    server_addr: str = ""
    server: subprocess.Popen[bytes] | None = None
    agents: dict[str, subprocess.Popen[bytes]] = field(default_factory=dict)
    agent_ns: dict[str, str] = field(default_factory=dict)

    def __post_init__(self) -> None:
        self.server_ns = self.server_ns or self.lab.inet
        self.server_addr = self.server_addr or self.lab.servers[0]
        self.data = self.workdir / "server"

    @property
    def url(self) -> str:
        return f"http://{self.server_addr}:{SERVER_PORT}"

    # --- the coordination server ----------------------------------------------------------------------------

    def start_server(self, *extra: str, timeout: float = 15.0, derp: bool = False) -> None:
        """`derp=True`: the embedded relay (region 900) with STUN on the server's address, plus region 901 (a
        `shoal-derp` with STUN on the lab's second server address, see `start_relay2`) in the DERP map, so a
        netcheck can tell a hard NAT from an easy one."""
        self.data.mkdir(parents=True, exist_ok=True)
        sock = self.data / "admin.sock"
        sock.unlink(missing_ok=True)
        relay = ["--stun-listen", "", "--no-derp"]
        if derp:
            map_file = self.workdir / "derpmap.json"
            map_file.write_text(json.dumps(self.relay2_map()))
            relay = ["--stun-listen", f"{self.server_addr}:{STUN_PORT}", "--derp-map-file", str(map_file)]
        argv = [PY, "-m", "coord.cli", "serve", "--data", str(self.data), "--listen",
                f"{self.server_addr}:{SERVER_PORT}", "--server-url", self.url, *relay,
                "--batch-delay", "10ms", "--log-level", "warning", *extra]
        self.server = self.lab.spawn(self.server_ns, argv, log_path=self.workdir / "server.log")
        deadline = time.monotonic() + timeout
        while not _connectable(sock):
            if self.server.poll() is not None:
                raise LabError(f"shoal-server exited {self.server.returncode}; see {self.workdir / 'server.log'}")
            if time.monotonic() > deadline:
                raise LabError(f"shoal-server did not start in {timeout}s")
            time.sleep(0.05)

    @property
    def relay2_addr(self) -> str:
        return self.lab.servers[1]

    def relay2_map(self) -> dict[str, Any]:
        host = self.relay2_addr
        return {"Regions": {str(RELAY2_REGION): {
            "RegionID": RELAY2_REGION, "RegionCode": "lab2", "RegionName": "Lab relay 2",
            "Nodes": [{"Name": f"{RELAY2_REGION}a", "RegionID": RELAY2_REGION, "HostName": host,
                       "DERPPort": SERVER_PORT, "STUNPort": STUN_PORT, "URL": f"http://{host}:{SERVER_PORT}/derp",
                       "InsecureForTests": True}]}}}

    def start_relay2(self, timeout: float = 15.0) -> subprocess.Popen[bytes]:
        """A standalone `shoal-derp` (region 901) in the internet namespace, admitting the tailnet's nodes."""
        d = self.workdir / "relay2"
        d.mkdir(parents=True, exist_ok=True)
        argv = [PY, "-m", "derp.cli", "--addr", f"{self.relay2_addr}:{SERVER_PORT}", "--stun-addr",
                self.relay2_addr, "--stun-port", str(STUN_PORT), "--key-file", str(d / "derp.key"),
                "--verify-client-url", f"{self.url}/derp/admit", "--log-level", "warning"]
        proc = self.lab.spawn(self.server_ns, argv, log_path=d / "relay.log")
        deadline = time.monotonic() + timeout
        while True:
            r = subprocess.run(["ip", "netns", "exec", self.server_ns, PY, "-c",
                                f"import socket; socket.create_connection(('{self.relay2_addr}', {SERVER_PORT}), 1)"],
                               capture_output=True)
            if r.returncode == 0:
                return proc
            if proc.poll() is not None:
                raise LabError(f"shoal-derp exited {proc.returncode}; see {d / 'relay.log'}")
            if time.monotonic() > deadline:
                raise LabError(f"shoal-derp did not start in {timeout}s")
            time.sleep(0.1)

    def stop_server(self) -> None:
        if self.server is not None:
            self.lab.kill(self.server)
            self.server = None

    def admin(self, *args: str) -> Any:
        p = subprocess.run([PY, "-m", "coord.cli", *args, "--data", str(self.data), "--json"],
                           capture_output=True, text=True, timeout=30)
        if p.returncode != 0:
            raise LabError(f"shoal-server {' '.join(args)}: {p.stderr.strip()}")
        return json.loads(p.stdout)

    def auth_key(self, user: str = "alice", ephemeral: bool = False) -> str:
        users = self.admin("users", "list")
        if not any(u["name"] == user for u in users):
            self.admin("users", "create", user)
        args = ["keys", "create", "--user", user, "--reusable"] + (["--ephemeral"] if ephemeral else [])
        return str(self.admin(*args)["key"])

    # --- agents ---------------------------------------------------------------------------------------------

    def socket(self, name: str) -> Path:
        return self.workdir / name / "shoald.sock"

    def start_agent(self, name: str, ns: str | None = None, iface: str | None = None, port: int = 41641,
                    timeout: float = 15.0, env: dict[str, str] | None = None) -> subprocess.Popen[bytes]:
        ns = ns or self.lab.ns(name)
        iface = iface or self.lab.iface(name)
        d = self.workdir / name
        d.mkdir(parents=True, exist_ok=True)
        sock = self.socket(name)
        argv = [PY, "-m", "node.daemon", "--state-dir", str(d / "state"), "--socket", str(sock),
                "--iface", iface, "--port", str(port), "--engine", "wireguard-go"]
        proc = self.lab.spawn(ns, argv, log_path=d / "shoald.log", env=env)
        self.agents[name] = proc
        self.agent_ns[name] = ns
        deadline = time.monotonic() + timeout
        while not _connectable(sock):
            if proc.poll() is not None:
                raise LabError(f"shoald {name} exited {proc.returncode}: {self.log(name)[-2000:]}")
            if time.monotonic() > deadline:
                raise LabError(f"shoald {name} made no socket in {timeout}s")
            time.sleep(0.05)
        return proc

    def stop_agent(self, name: str) -> int | None:
        proc = self.agents.pop(name)
        return self.lab.kill(proc, wait=10)

    def log(self, name: str) -> str:
        return (self.workdir / name / "shoald.log").read_text(errors="replace")

    def shoal(self, name: str, *args: str, check: bool = True, timeout: float = 60) -> subprocess.CompletedProcess[str]:
        argv = ["ip", "netns", "exec", self.agent_ns[name], PY, "-m", "node.cli", "--socket",
                str(self.socket(name)), *args]
        p = subprocess.run(argv, capture_output=True, text=True, timeout=timeout)
        if check and p.returncode != 0:
            raise LabError(f"shoal {' '.join(args)} on {name} exited {p.returncode}: {p.stderr.strip()}")
        return p

    def up(self, name: str, key: str, *extra: str) -> None:
        self.shoal(name, "up", "--login-server", self.url, "--auth-key", key, "--hostname", name, *extra)

    def status(self, name: str) -> dict[str, Any]:
        data = json.loads(self.shoal(name, "status", "--json").stdout)
        assert isinstance(data, dict)
        return data

    def ip(self, name: str, family: str = "-4") -> str:
        return self.shoal(name, "ip", family).stdout.strip()

    def ping(self, name: str, addr: str, count: int = 1, wait: float = 2, interval: float = 0.2) -> bool:
        p = subprocess.run(["ip", "netns", "exec", self.agent_ns[name], "ping", "-c", str(count), "-i",
                            str(interval), "-W", str(wait), addr], capture_output=True, timeout=count * 3 + 10)
        return p.returncode == 0

    def wait_for(self, what: str, check: Any, timeout: float = 10.0, step: float = 0.1) -> float:
        """Polls check() until true; returns the seconds it took, raises LabError on timeout."""
        t0 = time.monotonic()
        while True:
            if check():
                return time.monotonic() - t0
            if time.monotonic() - t0 > timeout:
                raise LabError(f"timed out after {timeout}s waiting for {what}")
            time.sleep(step)

    def peer_names(self, name: str) -> set[str]:
        return {str(p["HostName"]) for p in self.status(name)["Peers"]}


def _connectable(path: Path) -> bool:
    if not path.exists():
        return False
    s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    try:
        s.connect(str(path))
        return True
    except OSError:
        return False
    finally:
        s.close()
