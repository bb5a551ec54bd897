"""MagicDNS in the lab (issue 15): real shoal-server, shoald + wireguard-go, quad-100 on each node, real clients
(`dig`, glibc's `getent hosts`, `ping`) going through each namespace's own resolv.conf.

The lab gives every namespace /etc/netns/NS/resolv.conf (tests/lab/lab.py), which `ip netns exec` bind-mounts
over /etc/resolv.conf: the agent writes it in place, and the host's /etc/resolv.conf must come out of every
test byte for byte as it went in (checked here).
"""

from __future__ import annotations

import base64
import hashlib
import json
import re
import signal
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.lab import Topology
from tests.lab.lab import netns_resolv_conf
from tests.lab.udp import py
from tests.lab_tests.tailnet import Tailnet
from tests.lab_tests.test_policy import set_policy

pytestmark = pytest.mark.lab

BASE = "shoal.internal"
USERS = {"a": "a@example.com", "b": "b@example.com", "c": "c@example.com"}
# a@ may reach b@ on 22 (and ping it); c@ is in no rule, so neither a nor b sees it
POLICY = """{
  "acls": [{"action": "accept", "src": ["a@example.com"], "proto": "tcp", "dst": ["b@example.com:22"]}],
}
"""
HOST_RESOLV = Path("/etc/resolv.conf")


def _digest(p: Path) -> str:
    try:
        return hashlib.sha256(p.read_bytes()).hexdigest()
    except FileNotFoundError:
        return "absent"


@pytest.fixture(autouse=True)
def host_resolv_conf_untouched() -> Iterator[None]:
    """The guard: whatever a test does, the host's /etc/resolv.conf is unchanged."""
    before = _digest(HOST_RESOLV)
    yield
    assert _digest(HOST_RESOLV) == before, "the host's /etc/resolv.conf changed"


def dig(tn: Tailnet, node: str, *args: str, server: str = "100.100.100.100") -> str:
    return tn.lab.exec(node, ["dig", f"@{server}", "+time=2", "+tries=1", *args], check=False, timeout=20).stdout


def short(tn: Tailnet, node: str, name: str, qtype: str = "A", server: str = "100.100.100.100") -> list[str]:
    # -q/-t: a node called `a` is not the type A to dig
    return dig(tn, node, "+short", "-q", name, "-t", qtype, server=server).split()


def status_line(out: str) -> str:
    m = re.search(r"status: (\w+)", out)
    return m.group(1) if m else "no answer"


def b64(nodekey: str) -> str:
    return base64.b64encode(bytes.fromhex(nodekey.split(":", 1)[1])).decode()


def bring_up(tn: Tailnet, names: list[str], *extra: str) -> None:
    for n in names:
        tn.start_agent(n)
    for n in names:
        tn.up(n, tn.auth_key(USERS[n]), *extra)


def test_dns_lab_names_ptr_getent_ping_rename_hidden_and_closed(tailnet: Tailnet, tmp_path: Path) -> None:
    tn, lab = tailnet, tailnet.lab
    lab.build(Topology.parse("lan: a b c"))
    tn.start_server()
    pol = tmp_path / "policy.hujson"
    pol.write_text(POLICY)
    bring_up(tn, ["a", "b", "c"])
    set_policy(tn, pol)
    tn.wait_for("c hidden from a", lambda: "c" not in tn.peer_names("a"), timeout=10)
    ip = {n: (tn.ip(n, "-4"), tn.ip(n, "-6")) for n in USERS}

    # dig at quad-100: full and short names, both families, from a and b
    for src, dst in (("a", "b"), ("b", "a"), ("a", "a")):
        assert short(tn, src, f"{dst}.{BASE}") == [ip[dst][0]]
        assert short(tn, src, f"{dst}.{BASE}", "AAAA") == [ip[dst][1]]
        assert short(tn, src, dst) == [ip[dst][0]]
    out = dig(tn, "a", f"b.{BASE}")
    print(out)
    assert status_line(out) == "NOERROR" and " aa " in out.split("flags:")[1].split(";")[0] + " "
    assert re.search(rf"^b\.{re.escape(BASE)}\.\s+5\s+IN\s+A\s+{re.escape(ip['b'][0])}$", out, re.M), out
    # PTR for each tailnet address of a visible node
    for n in ("a", "b"):
        for addr in ip[n]:
            assert dig(tn, "a", "+short", "-x", addr).split() == [f"{n}.{BASE}."], (n, addr)
    # the peer the policy hides: no name, no reverse name; an unknown name in the base domain is NXDOMAIN
    assert status_line(dig(tn, "a", f"c.{BASE}")) == "NXDOMAIN"
    assert status_line(dig(tn, "a", "-x", ip["c"][0])) == "NXDOMAIN"
    assert status_line(dig(tn, "a", f"nobody.{BASE}")) == "NXDOMAIN"
    assert status_line(dig(tn, "a", f"b.{BASE}", "MX")) == "NOERROR"  # NODATA
    assert short(tn, "a", f"b.{BASE}", "MX") == []
    # the OS path: resolv.conf in the namespace points at quad-100 with the search domain
    conf = netns_resolv_conf(lab.ns("a")).read_text()
    assert "nameserver 100.100.100.100" in conf and f"search {BASE}" in conf, conf
    got = lab.exec("a", ["getent", "hosts", "b"]).stdout.split()
    assert got[0] in ip["b"] and f"b.{BASE}" in got, got
    got = lab.exec("a", ["getent", "ahostsv4", f"b.{BASE}"]).stdout.split()
    assert got[0] == ip["b"][0], got
    assert lab.exec("a", ["ping", "-c", "1", "-W", "2", "b"], check=False).returncode == 0
    assert lab.exec("a", ["ping", "-c", "1", "-W", "2", f"b.{BASE}"], check=False).returncode == 0
    # shoal dns status / query, and names in shoal status
    q = json.loads(tn.shoal("a", "dns", "query", "b", "A", "--json").stdout)
    assert q["Rcode"] == "NOERROR" and ip["b"][0] in q["Answers"][0]
    st = tn.shoal("a", "dns", "status").stdout
    print(st)
    assert "running on 100.100.100.100:53" in st and f"b.{BASE}" in st and "OS: direct" in st
    assert f"b.{BASE}" in tn.shoal("a", "status").stdout

    # a rename reaches the other node's resolver within 2 s
    t0 = time.monotonic()
    tn.admin("nodes", "rename", "b", "bee")
    took = tn.wait_for("bee resolves on a", lambda: short(tn, "a", f"bee.{BASE}") == [ip["b"][0]], timeout=5,
                       step=0.05)
    print(f"rename resolved on a {took:.2f}s after the admin command returned ({time.monotonic() - t0:.2f}s)")
    assert took < 2.0
    assert status_line(dig(tn, "a", f"b.{BASE}")) == "NXDOMAIN"

    # the base domain changed at run time: every name moves at once, short names keep working
    tn.admin("dns", "set", "--base-domain", "corp.internal")
    took = tn.wait_for("bee.corp.internal resolves on a",
                       lambda: short(tn, "a", "bee.corp.internal") == [ip["b"][0]], timeout=5, step=0.05)
    print(f"base domain change resolved on a in {took:.2f}s")
    assert took < 2.0
    assert short(tn, "b", "a.corp.internal") == [ip["a"][0]]
    assert tn.lab.exec("a", ["getent", "hosts", "bee"]).stdout.split()[0] in ip["b"]
    assert "bee.corp.internal" in tn.shoal("a", "dns", "status").stdout
    tn.admin("dns", "set", "--base-domain", BASE)
    tn.wait_for("back to the config's base domain", lambda: short(tn, "a", f"bee.{BASE}") == [ip["b"][0]],
                timeout=5, step=0.05)

    # quad-100 serves its own node only: b sends a query to a's 100.100.100.100 through the tunnel (b's own
    # resolver moved aside, WireGuard told that a carries 100.100.100.100) and gets nothing back
    a_key = b64(tn.status("a")["Self"]["Key"])
    iface_b = lab.iface("b")
    lab.exec("b", ["ip", "addr", "del", "100.100.100.100/32", "dev", iface_b])
    lab.exec("b", ["wg", "set", iface_b, "peer", a_key, "allowed-ips", f"{ip['a'][0]}/32,{ip['a'][1]}/128,"
                   "100.100.100.100/32"])
    lab.exec("b", ["ip", "route", "add", "100.100.100.100/32", "dev", iface_b])
    before = dropped(tn, "a")
    out = dig(tn, "b", f"a.{BASE}")
    assert "connection timed out" in out or "no servers could be reached" in out, out
    assert dropped(tn, "a") > before, "a's table did not drop the query"
    # and a's tailnet address does not serve DNS either (the resolver is bound to quad-100 only)
    assert status_line(dig(tn, "b", f"a.{BASE}", server=ip["a"][0])) == "no answer"


def dropped(tn: Tailnet, name: str) -> int:
    out = tn.lab.exec(name, ["nft", "-j", "list", "counter", "inet", "shoal_filter", "dropped"]).stdout
    counters = [x["counter"] for x in json.loads(out)["nftables"] if "counter" in x]
    return int(counters[0]["packets"])


def test_dns_lab_resolv_conf_restored_after_down_and_after_sigkill(tailnet: Tailnet) -> None:
    tn, lab = tailnet, tailnet.lab
    lab.build(Topology.parse("lan: a b"))
    tn.start_server()
    conf = netns_resolv_conf(lab.ns("a"))
    original = "# the namespace's own\nnameserver 192.0.2.53\noptions edns0\n"
    conf.write_text(original)
    bring_up(tn, ["a", "b"])
    assert "nameserver 100.100.100.100" in conf.read_text()
    assert short(tn, "a", "b") == [tn.ip("b")]
    tn.shoal("a", "down")
    assert conf.read_text() == original
    tn.up("a", tn.auth_key(USERS["a"]))
    assert "nameserver 100.100.100.100" in conf.read_text()
    # SIGKILL: nothing restores it now; the next start does, then `up` (remembered) points it back
    lab.kill(tn.agents.pop("a"), sig=signal.SIGKILL)
    assert "nameserver 100.100.100.100" in conf.read_text()
    tn.start_agent("a")
    tn.wait_for("a running again", lambda: tn.status("a")["BackendState"] == "Running", timeout=15)
    tn.wait_for("resolv.conf ours again", lambda: "100.100.100.100" in conf.read_text(), timeout=10)
    assert short(tn, "a", "b") == [tn.ip("b")]
    tn.stop_agent("a")  # SIGTERM: restored on the way out
    assert conf.read_text() == original
    tn.start_agent("a")
    tn.wait_for("a running again", lambda: tn.status("a")["BackendState"] == "Running", timeout=15)
    # --accept-dns=false leaves the OS alone while the resolver still answers
    tn.shoal("a", "up", "--accept-dns=false")
    tn.wait_for("resolv.conf given back", lambda: conf.read_text() == original, timeout=10)
    assert short(tn, "a", "b") == [tn.ip("b")]


# A UDP "resolver" that reads queries and never answers (argv: address port).
BLACKHOLE = r"""
import socket, sys
s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
s.bind((sys.argv[1], int(sys.argv[2])))
print("ready", flush=True)
while True:
    s.recvfrom(4096)
"""


def dnsmasq(tn: Tailnet, addr: str, port: int, *records: str, log: Path) -> None:
    """Debian's dnsmasq binary (dnsmasq-base) in the foreground, answering only what it is given."""
    argv = ["dnsmasq", "--keep-in-foreground", "--log-facility=-", "--no-resolv", "--no-hosts",
            "--conf-file=/dev/null", "--pid-file=", "--user=root", "--bind-interfaces", f"--listen-address={addr}",
            f"--port={port}", *records]
    tn.lab.spawn(tn.server_ns, argv, log_path=log)


def test_dns_lab_split_dns_upstreams_servfail_and_extra_records(tailnet: Tailnet, tmp_path: Path) -> None:
    tn, lab = tailnet, tailnet.lab
    lab.build(Topology.parse("lan: a b"))
    tn.start_server()
    up_addr = tn.server_addr  # the resolvers live in the internet namespace, next to the server
    dnsmasq(tn, up_addr, 5301, "--address=/corp.example/192.0.2.80", log=tmp_path / "corp.log")
    dnsmasq(tn, up_addr, 5302, "--host-record=www.example.org,198.51.100.80", log=tmp_path / "global.log")
    lab.spawn(tn.server_ns, py(BLACKHOLE, up_addr, 5303), log_path=tmp_path / "blackhole.log")
    tn.wait_for("upstreams listening", lambda: all(
        f":{p}" in lab.exec(tn.server_ns, ["ss", "-Hnul"]).stdout for p in (5301, 5302, 5303)), timeout=10)
    bring_up(tn, ["a", "b"])
    tn.admin("dns", "set", "--nameserver", f"{up_addr}:5302", "--split", f"corp.example={up_addr}:5301",
             "--split", f"drop.example={up_addr}:5303")
    tn.admin("dns", "records", "add", f"db.{BASE}", "A", "100.64.9.9")
    print(json.dumps(tn.admin("dns", "get"), indent=1))
    tn.wait_for("split route on a", lambda: "corp.example." in json.loads(
        tn.shoal("a", "dns", "status", "--json").stdout)["Routes"], timeout=5)

    out = dig(tn, "a", "-q", "www.corp.example")
    print(out)
    assert status_line(out) == "NOERROR" and short(tn, "a", "www.corp.example") == ["192.0.2.80"]
    assert short(tn, "a", "www.example.org") == ["198.51.100.80"]  # everything else: the global upstream
    # the OS path too: glibc asks quad-100, which forwards
    assert lab.exec("a", ["getent", "hosts", "www.corp.example"]).stdout.split()[0] == "192.0.2.80"
    # an upstream that drops queries: SERVFAIL within the resolver's timeout, not a client timeout
    t0 = time.monotonic()
    out = dig(tn, "a", "+time=5", "-q", "x.drop.example")
    took = time.monotonic() - t0
    print(f"drop.example: {status_line(out)} after {took:.2f}s")
    assert status_line(out) == "SERVFAIL" and took < 4.0, out
    # extra records resolve (name table), and the base domain's own names still do
    assert short(tn, "a", f"db.{BASE}") == ["100.64.9.9"]
    assert short(tn, "b", "db") == ["100.64.9.9"]
    assert short(tn, "a", "b") == [tn.ip("b")]
    st = json.loads(tn.shoal("a", "dns", "status", "--json").stdout)
    assert st["ServFail"] >= 1 and st["Forwarded"] >= 3
