"""The network-namespace lab: builds a Topology out of namespaces, veth pairs, bridges and nftables routers.

Safety rules this module keeps:
- every namespace is named `<prefix>-<name>` with a per-run prefix `sh` + 6 random hex digits; interface names
  made from it stay within 15 characters; wireguard-go sockets are `/var/run/wireguard/<prefix>*.sock`;
- veth pairs are created from inside lab namespaces straight into lab namespaces: no lab namespace ever gets a
  link or route to the host's network;
- teardown kills, by PID, what `spawn` started and whatever else still runs inside our namespaces, deletes the
  namespaces and removes our sockets, whatever state the run is in;
- each namespace gets its own /etc/netns/<ns>/resolv.conf before anything runs in it (`ip netns exec`
  bind-mounts it over /etc/resolv.conf), so an agent's MagicDNS never writes the host's; teardown removes it;
- each run records its owner PID in RUN_DIR/<prefix>; `sweep()` removes leftovers only of runs whose owner is
  dead, so concurrent runs leave each other alone; a lab made by `scripts/lab up` is marked `keep` and only
  `scripts/lab down` removes it.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import re
import secrets
import shutil
import signal
import subprocess
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import IO

from tests.lab.topo import SERVERS, Topology, internet_addr, lan_net

RUN_DIR = Path(os.environ.get("SHOAL_LAB_RUN_DIR", "/run/shoal-lab/runs"))
SOCK_DIR = Path("/var/run/wireguard")
NETNS_ETC = Path("/etc/netns")  # ip-netns(8): files here are bind-mounted over /etc in the namespace
PREFIX_RE = re.compile(r"^sh[0-9a-f]{6}$")
NS_RE = re.compile(r"^(sh[0-9a-f]{6})-")


class LabError(Exception):
    pass


@dataclass(frozen=True)
class Node:
    name: str
    ns: str
    addr: str  # underlay address (LAN or internet)
    gateway: str
    lan: str | None  # None for public nodes
    iface: str  # a unique WireGuard interface name for this node


@dataclass(frozen=True)
class Router:
    name: str
    ns: str
    lan_addr: str
    wan_addr: str
    nat: str
    lan_net: str


def _run(argv: Sequence[str], input: str | None = None, check: bool = True,
         timeout: float = 30) -> subprocess.CompletedProcess[str]:
    p = subprocess.run(list(argv), input=input, capture_output=True, text=True, timeout=timeout)
    if check and p.returncode != 0:
        raise LabError(f"`{' '.join(argv)}` exited {p.returncode}: {p.stderr.strip() or p.stdout.strip()}")
    return p


def list_netns() -> list[str]:
    out = _run(["ip", "netns", "list"]).stdout
    return [line.split()[0] for line in out.splitlines() if line.strip()]


def netns_pids(ns: str) -> list[int]:
    out = _run(["ip", "netns", "pids", ns], check=False).stdout
    return [int(x) for x in out.split() if x.isdigit()]


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def _kill_pids(pids: Sequence[int], grace: float = 2.0) -> None:
    for pid in pids:
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signal.SIGTERM)
    deadline = time.monotonic() + grace
    left = list(pids)
    while left and time.monotonic() < deadline:
        left = [p for p in left if _alive_not_zombie(p)]
        if left:
            time.sleep(0.02)
    for pid in left:
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signal.SIGKILL)


def _alive_not_zombie(pid: int) -> bool:
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()[0] != "Z"
    except (FileNotFoundError, IndexError, ProcessLookupError):
        return False


def remove_prefix(prefix: str) -> None:
    """Removes every namespace, process and socket of run `prefix`."""
    if not PREFIX_RE.match(prefix):
        raise LabError(f"refusing to remove {prefix!r}: not a lab prefix")
    spaces = [ns for ns in list_netns() if ns.startswith(prefix + "-")]
    pids = [pid for ns in spaces for pid in netns_pids(ns)]
    _kill_pids(pids)
    for ns in spaces:
        _run(["ip", "netns", "del", ns], check=False)
    if SOCK_DIR.is_dir():
        for sock in SOCK_DIR.glob(f"{prefix}*.sock"):
            with contextlib.suppress(FileNotFoundError):
                sock.unlink()
    if NETNS_ETC.is_dir():
        for d in NETNS_ETC.glob(f"{prefix}-*"):
            shutil.rmtree(d, ignore_errors=True)
    with contextlib.suppress(FileNotFoundError):
        (RUN_DIR / prefix).unlink()


def netns_resolv_conf(ns: str) -> Path:
    """The file `ip netns exec NS` bind-mounts over /etc/resolv.conf; each lab namespace gets one before any
    process runs there, so an agent's MagicDNS writes it, never the host's own file."""
    return NETNS_ETC / ns / "resolv.conf"


def sweep() -> list[str]:
    """Removes leftovers of crashed runs (owner PID dead or unknown). Returns the prefixes removed."""
    prefixes = {m.group(1) for ns in list_netns() if (m := NS_RE.match(ns))}
    if SOCK_DIR.is_dir():
        prefixes |= {s.name[:8] for s in SOCK_DIR.glob("sh*.sock") if PREFIX_RE.match(s.name[:8])}
    if RUN_DIR.is_dir():
        prefixes |= {p.name for p in RUN_DIR.iterdir() if PREFIX_RE.match(p.name)}
    if NETNS_ETC.is_dir():
        prefixes |= {m.group(1) for p in NETNS_ETC.iterdir() if (m := NS_RE.match(p.name))}
    removed = []
    for prefix in sorted(prefixes):
        try:
            mark = (RUN_DIR / prefix).read_text().strip()
        except FileNotFoundError:
            mark = ""
        if mark == "keep" or (mark.isdigit() and _pid_alive(int(mark))):
            continue
        remove_prefix(prefix)
        removed.append(prefix)
    return removed


class Lab:
    """One run's namespaces. Build with `build(topology)`; always `teardown()` (the fixture does)."""

    def __init__(self, prefix: str | None = None, owner_pid: int | None = None, keep: bool = False) -> None:
        self.prefix = prefix or "sh" + secrets.token_hex(3)
        if not PREFIX_RE.match(self.prefix):
            raise LabError(f"lab prefix {self.prefix!r} must be 'sh' and 6 hex digits")
        self.owner_pid = owner_pid or os.getpid()
        self.keep = keep
        self.nodes: dict[str, Node] = {}
        self.routers: dict[str, Router] = {}
        self.namespaces: list[str] = []
        self.procs: dict[int, subprocess.Popen[bytes]] = {}
        self.inet = self.ns_name("inet")
        self.servers = SERVERS
        self._logs: list[IO[bytes]] = []

    # -- names ----------------------------------------------------------------------------------------------
    def ns_name(self, name: str) -> str:
        return f"{self.prefix}-{name}"

    def iface(self, name: str) -> str:
        out = f"{self.prefix}{name}"
        if len(out) > 15:
            raise LabError(f"interface name {out!r} over 15 characters")
        return out

    def ns(self, name: str) -> str:
        """Namespace of a node, router (LAN name) or 'inet'."""
        if name in self.nodes:
            return self.nodes[name].ns
        if name in self.routers:
            return self.routers[name].ns
        if name == "inet":
            return self.inet
        raise LabError(f"no node, router or namespace called {name!r} in this lab")

    # -- building -------------------------------------------------------------------------------------------
    def _mark(self) -> None:
        # the owner mark goes down before the first namespace, so a crash at any point is sweepable
        mark = RUN_DIR / self.prefix
        if not mark.exists():
            RUN_DIR.mkdir(parents=True, exist_ok=True)
            mark.write_text("keep\n" if self.keep else f"{self.owner_pid}\n")

    def add_ns(self, name: str) -> str:
        self._mark()
        ns = self.ns_name(name)
        conf = netns_resolv_conf(ns)
        conf.parent.mkdir(parents=True, exist_ok=True)
        conf.write_text(f"# lab namespace {ns}: its own resolv.conf (the host's is never touched)\n")
        _run(["ip", "netns", "add", ns])
        self.namespaces.append(ns)
        _run(["ip", "-n", ns, "link", "set", "lo", "up"])
        return ns

    def veth(self, ns_a: str, if_a: str, ns_b: str, if_b: str) -> None:
        # created from inside ns_a straight into ns_b: the host namespace never holds either end
        _run(["ip", "-n", ns_a, "link", "add", if_a, "type", "veth", "peer", "name", if_b, "netns", ns_b])

    def sysctl(self, ns: str, key: str, value: str) -> None:
        _run(["ip", "netns", "exec", ns, "sysctl", "-qw", f"{key}={value}"])

    def build(self, topo: Topology) -> Lab:
        inet = self.add_ns("inet")
        self.sysctl(inet, "net.ipv4.ip_forward", "1")
        _run(["ip", "-n", inet, "link", "add", "br0", "type", "bridge"])
        for s in SERVERS:
            _run(["ip", "-n", inet, "addr", "add", f"{s}/24", "dev", "br0"])
        _run(["ip", "-n", inet, "link", "set", "br0", "up"])
        host = 0
        for i, lan in enumerate(topo.lans):
            net = lan_net(i)
            lan_gw = str(net.network_address + 1)
            wan = internet_addr(host)
            host += 1
            rns = self.add_ns(lan.name)
            self.sysctl(rns, "net.ipv4.ip_forward", "1")
            # with br_netfilter, frames bridged between LAN hosts would cross the router's IP forward chain
            for key in ("net.bridge.bridge-nf-call-iptables", "net.bridge.bridge-nf-call-ip6tables"):
                if Path("/proc/sys", key.replace(".", "/")).exists():
                    self.sysctl(rns, key, "0")
            self.veth(rns, "wan0", inet, f"r-{lan.name}")
            _run(["ip", "-n", inet, "link", "set", f"r-{lan.name}", "master", "br0", "up"])
            _run(["ip", "-n", rns, "addr", "add", f"{wan}/24", "dev", "wan0"])
            _run(["ip", "-n", rns, "link", "set", "wan0", "up"])
            _run(["ip", "-n", rns, "link", "add", "br0", "type", "bridge"])
            _run(["ip", "-n", rns, "addr", "add", f"{lan_gw}/{net.prefixlen}", "dev", "br0"])
            _run(["ip", "-n", rns, "link", "set", "br0", "up"])
            if lan.nat == "none":
                _run(["ip", "-n", inet, "route", "add", str(net), "via", wan])
            else:
                self.nft(rns, nat_ruleset(lan.nat))
            self.routers[lan.name] = Router(lan.name, rns, lan_gw, wan, lan.nat, str(net))
            for j, name in enumerate(lan.nodes):
                addr = str(net.network_address + 10 + j)
                self._add_node(name, addr, net.prefixlen, lan_gw, rns, f"v-{name}", lan.name)
        for name in topo.public:
            addr = internet_addr(host)
            host += 1
            self._add_node(name, addr, 24, SERVERS[0], inet, f"p-{name}", None)
        return self

    def _add_node(self, name: str, addr: str, plen: int, gw: str, up_ns: str, up_if: str,
                  lan: str | None) -> None:
        ns = self.add_ns(name)
        self.veth(ns, "eth0", up_ns, up_if)
        _run(["ip", "-n", up_ns, "link", "set", up_if, "master", "br0", "up"])
        _run(["ip", "-n", ns, "addr", "add", f"{addr}/{plen}", "dev", "eth0"])
        _run(["ip", "-n", ns, "link", "set", "eth0", "up"])
        _run(["ip", "-n", ns, "route", "add", "default", "via", gw])
        self.nodes[name] = Node(name, ns, addr, gw, lan, self.iface(name))

    def nft(self, ns: str, ruleset: str) -> None:
        _run(["ip", "netns", "exec", ns, "nft", "-f", "-"], input=ruleset)

    # -- helpers for tests ----------------------------------------------------------------------------------
    def exec(self, name: str, argv: Sequence[str], check: bool = True, input: str | None = None,
             timeout: float = 30) -> subprocess.CompletedProcess[str]:
        """Runs argv in the namespace of node/router `name` (or a full namespace name) and waits for it."""
        ns = name if name in self.namespaces else self.ns(name)
        return _run(["ip", "netns", "exec", ns, *argv], input=input, check=check, timeout=timeout)

    def spawn(self, name: str, argv: Sequence[str], log_path: Path | str | None = None,
              env: dict[str, str] | None = None) -> subprocess.Popen[bytes]:
        """Starts argv in a namespace; its PID is tracked and killed at teardown. Output goes to log_path."""
        ns = name if name in self.namespaces else self.ns(name)
        out: IO[bytes] | int = subprocess.DEVNULL
        if log_path is not None:
            f = open(log_path, "ab")  # noqa: SIM115 (kept open for the child, closed at teardown)
            self._logs.append(f)
            out = f
        proc = subprocess.Popen(["ip", "netns", "exec", ns, *argv], stdin=subprocess.DEVNULL, stdout=out,
                                stderr=subprocess.STDOUT, env=env, start_new_session=True)
        self.procs[proc.pid] = proc
        return proc

    def kill(self, proc: subprocess.Popen[bytes], sig: int = signal.SIGTERM, wait: float = 5.0) -> int | None:
        with contextlib.suppress(ProcessLookupError):
            proc.send_signal(sig)
        try:
            return proc.wait(wait)
        except subprocess.TimeoutExpired:
            proc.kill()
            return proc.wait(wait)

    def block_udp(self, name: str) -> None:
        """Drops all UDP to, from and through a namespace (loopback excepted), e.g. to force DERP."""
        self.nft(self.ns(name), BLOCK_UDP)

    def unblock_udp(self, name: str) -> None:
        self.exec(name, ["nft", "delete", "table", "inet", "shoalblock"], check=False)

    def renumber(self, router: str, new_wan_addr: str) -> None:
        """Gives a router a new internet address and forgets its NAT mappings (a roaming/DHCP-renew event)."""
        r = self.routers[router]
        ns = r.ns
        _run(["ip", "-n", ns, "addr", "flush", "dev", "wan0"])
        _run(["ip", "-n", ns, "addr", "add", f"{new_wan_addr}/24", "dev", "wan0"])
        if r.nat == "none":
            _run(["ip", "-n", self.inet, "route", "replace", r.lan_net, "via", new_wan_addr])
        _run(["ip", "netns", "exec", ns, "conntrack", "-F"], check=False)
        self.routers[router] = Router(r.name, ns, r.lan_addr, new_wan_addr, r.nat, r.lan_net)

    # -- teardown -------------------------------------------------------------------------------------------
    def teardown(self) -> None:
        errors = []
        try:
            _kill_pids([pid for pid, p in self.procs.items() if p.poll() is None])
            for p in self.procs.values():
                with contextlib.suppress(subprocess.TimeoutExpired):
                    p.wait(1)
        except Exception as e:  # keep going: namespaces and sockets must still go
            errors.append(e)
        for f in self._logs:
            f.close()
        try:
            remove_prefix(self.prefix)
        except Exception as e:
            errors.append(e)
        self.namespaces.clear()
        if errors:
            raise LabError(f"teardown of {self.prefix}: {errors}")

    def __enter__(self) -> Lab:
        return self

    def __exit__(self, *exc: object) -> None:
        self.teardown()


def nat_ruleset(kind: str) -> str:
    flags = " random,fully-random" if kind == "hard" else ""
    return f"""
table ip shoallab {{
    chain input {{
        type filter hook input priority 0; policy drop;
        iif "lo" accept
        ct state established,related accept
        iifname "br0" accept
    }}
    chain forward {{
        type filter hook forward priority 0; policy drop;
        iifname "br0" oifname "wan0" accept
        iifname "br0" oifname "br0" accept
        ct state established,related accept
    }}
    chain postrouting {{
        type nat hook postrouting priority 100; policy accept;
        oifname "wan0" masquerade{flags}
    }}
}}
"""


BLOCK_UDP = """
table inet shoalblock {
    chain input {
        type filter hook input priority -10; policy accept; iif "lo" accept; meta l4proto udp drop;
    }
    chain output {
        type filter hook output priority -10; policy accept; oif "lo" accept; meta l4proto udp drop;
    }
    chain forward { type filter hook forward priority -10; policy accept; meta l4proto udp drop; }
}
"""


def require_tools() -> None:
    missing = [t for t in ("ip", "nft", "wireguard-go", "wg") if shutil.which(t) is None]
    if os.geteuid() != 0:
        raise LabError("the lab needs root (network namespaces, nftables)")
    if missing:
        raise LabError(f"the lab needs {', '.join(missing)} (run scripts/test, which installs them)")


async def aping(lab: Lab, node: str, addr: str, count: int = 1, interval: float = 0.2) -> bool:
    """``ping`` from a lab node without blocking the event loop: True if any reply came back."""
    proc = await asyncio.create_subprocess_exec(
        "ip", "netns", "exec", lab.ns(node), "ping", "-c", str(count), "-i", str(interval), "-W", "2", addr,
        stdout=asyncio.subprocess.DEVNULL, stderr=asyncio.subprocess.DEVNULL,
    )
    return await proc.wait() == 0
