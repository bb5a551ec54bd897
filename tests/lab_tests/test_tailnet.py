"""A real tailnet in the lab (issue 4): shoal-server in the internet namespace, shoald + wireguard-go per node."""

from __future__ import annotations

import base64
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor

import pytest

from tests.lab import one_lan
from tests.lab_tests.tailnet import Tailnet

pytestmark = pytest.mark.lab


def wg_peers(tn: Tailnet, name: str) -> set[str]:
    out = tn.lab.exec(name, ["wg", "show", tn.lab.iface(name), "peers"]).stdout
    return set(out.split())


def b64(nodekey: str) -> str:
    return base64.b64encode(bytes.fromhex(nodekey.split(":", 1)[1])).decode()


def all_ping(tn: Tailnet, names: list[str]) -> None:
    addrs = {n: (tn.ip(n, "-4"), tn.ip(n, "-6")) for n in names}
    for a in names:
        for b in names:
            if a != b:
                for addr in addrs[b]:
                    assert tn.ping(a, addr), f"{a} cannot ping {b} at {addr}"


def test_three_nodes_then_join_delete_down_up_restart_expire(tailnet: Tailnet) -> None:
    tn, lab = tailnet, tailnet.lab
    lab.build(one_lan(4))
    tn.start_server()
    key = tn.auth_key()
    names = ["n1", "n2", "n3"]
    for n in names:
        tn.start_agent(n)
        tn.up(n, key)
    all_ping(tn, names)
    keys = {n: tn.status(n)["Self"]["Key"] for n in names}
    for n in names:
        assert wg_peers(tn, n) == {b64(keys[m]) for m in names if m != n}
    st = tn.status("n1")
    assert st["BackendState"] == "Running" and st["Engine"] == "wireguard-go" and st["Connected"]
    assert {p["HostName"] for p in st["Peers"]} == {"n2", "n3"}
    assert all(p["Path"] == "direct" and p["Online"] for p in st["Peers"])
    text = tn.shoal("n1", "status").stdout
    assert "n2" in text and "direct 192.0.2.11:41641" in text

    # a fourth node joins: the others reach it within 2 s of its `shoal up`
    tn.start_agent("n4")
    tn.up("n4", key)
    joined = time.monotonic()
    ip4 = tn.ip("n4")

    def reach(n: str) -> float:
        tn.wait_for(f"{n} -> n4", lambda: tn.ping(n, ip4, wait=0.3), timeout=5, step=0)
        return time.monotonic() - joined

    with ThreadPoolExecutor(len(names)) as pool:
        took = dict(zip(names, pool.map(reach, names), strict=True))
    assert max(took.values()) < 2.0, took
    # deleted on the server: gone from every peer's map and WireGuard
    key4 = b64(tn.status("n4")["Self"]["Key"])
    tn.admin("nodes", "delete", "n4")
    for n in names:
        tn.wait_for(f"n4 gone from {n}", lambda n=n: "n4" not in tn.peer_names(n), timeout=5)
        assert key4 not in wg_peers(tn, n)
    assert not tn.ping("n1", ip4, wait=1)

    # down takes the tunnel away but keeps the registration; up brings it back
    ip1 = tn.ip("n1")
    tn.shoal("n1", "down")
    st = tn.status("n1")
    assert st["BackendState"] == "Stopped" and st["Peers"] == []
    assert lab.exec("n1", ["ip", "link", "show", lab.iface("n1")], check=False).returncode != 0
    assert not tn.ping("n2", ip1, wait=1)
    tn.shoal("n1", "up")  # the login server is remembered; no key needed while registered
    assert tn.ip("n1") == ip1 and tn.status("n1")["Self"]["Key"] == keys["n1"]
    assert tn.ping("n2", ip1) and tn.ping("n1", tn.ip("n3", "-6"))

    # restarting shoald keeps the identity and the addresses
    before = tn.status("n2")["Self"]
    tn.stop_agent("n2")
    tn.start_agent("n2")
    tn.wait_for("n2 running", lambda: tn.status("n2")["BackendState"] == "Running", timeout=10)
    after = tn.status("n2")["Self"]
    assert (after["Key"], after["Addresses"], after["Name"]) == (before["Key"], before["Addresses"], before["Name"])
    assert tn.ping("n1", after["Addresses"][0], count=2) and tn.ping("n2", ip1)

    # an expired node key: status says so and asks for re-authentication; `shoal up --auth-key` fixes it
    tn.admin("nodes", "expire", "n3")
    tn.wait_for("n3 expired", lambda: tn.status("n3")["KeyExpired"], timeout=5)
    st = tn.status("n3")
    assert st["BackendState"] == "NeedsLogin"
    assert any("re-authenticate" in h for h in st["Health"])
    assert "re-authenticate" in tn.shoal("n3", "status").stdout
    tn.up("n3", key)
    st = tn.status("n3")
    assert st["BackendState"] == "Running" and not st["KeyExpired"] and st["Self"]["Key"] != keys["n3"]
    tn.wait_for("n1 -> n3 after re-auth", lambda: tn.ping("n1", tn.ip("n3"), wait=0.5), timeout=5, step=0)


def test_server_outage_keeps_tunnels_and_restart_restores_from_saved_netmap(tailnet: Tailnet) -> None:
    tn, lab = tailnet, tailnet.lab
    lab.build(one_lan(3))
    tn.start_server()
    key = tn.auth_key()
    for n in ("n1", "n2"):
        tn.start_agent(n)
        tn.up(n, key)
    ip2 = tn.ip("n2")
    assert tn.ping("n1", ip2)
    tn.stop_server()
    # exactly 60 s of pings at 5 per second while the server is down
    ping = subprocess.run(["ip", "netns", "exec", lab.ns("n1"), "ping", "-q", "-c", "300", "-i", "0.2", "-W", "1",
                           ip2], capture_output=True, text=True, timeout=90)
    assert " 0% packet loss" in ping.stdout, ping.stdout
    st = tn.status("n1")
    assert not st["Connected"] and any("not connected" in h for h in st["Health"])
    assert [p["HostName"] for p in st["Peers"]] == ["n2"]

    # restarting shoald with the server still down brings the tunnel back from the saved netmap
    tn.stop_agent("n2")
    assert not tn.ping("n1", ip2, wait=1)
    tn.start_agent("n2")
    tn.wait_for("tunnel to n2 restored", lambda: tn.ping("n1", ip2, wait=0.5), timeout=10, step=0)
    assert not tn.status("n2")["Connected"]

    # the server comes back: agents reconnect by themselves and a new node joins
    tn.start_server()
    for n in ("n1", "n2"):
        tn.wait_for(f"{n} reconnected", lambda n=n: tn.status(n)["Connected"], timeout=20, step=0.5)
    tn.start_agent("n3")
    tn.up("n3", key)
    ip3 = tn.ip("n3")
    for n in ("n1", "n2"):
        tn.wait_for(f"{n} -> n3", lambda n=n: tn.ping(n, ip3, wait=0.5), timeout=5, step=0)


def test_interactive_login_then_ephemeral_node_leaves_after_its_agent_stops(tailnet: Tailnet) -> None:
    tn, lab = tailnet, tailnet.lab
    lab.build(one_lan(3))
    tn.start_server("--ephemeral-timeout", "2s")
    tn.start_agent("n1")
    tn.up("n1", tn.auth_key())
    tn.start_agent("n2")
    tn.up("n2", tn.auth_key(ephemeral=True))
    assert tn.peer_names("n1") == {"n2"}
    assert tn.ping("n1", tn.ip("n2"))
    tn.stop_agent("n2")
    took = tn.wait_for("ephemeral n2 gone", lambda: not tn.peer_names("n1"), timeout=10, step=0.2)
    assert took >= 1.5, f"gone after {took:.1f}s: sooner than the 2 s timeout"
    assert not wg_peers(tn, "n1")
    assert not any(n["name"] == "n2" for n in tn.admin("nodes", "list"))

    # without a key, `shoal up` prints a login URL and waits until an admin approves it
    tn.start_agent("n3")
    up = subprocess.Popen(["ip", "netns", "exec", lab.ns("n3"), sys.executable, "-m", "node.cli", "--socket",
                           str(tn.socket("n3")), "up", "--login-server", tn.url, "--hostname", "n3"],
                          stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        assert up.stdout is not None
        url = ""
        while not url:
            line = up.stdout.readline()
            assert line, f"shoal up ended without a login URL: {up.stderr.read() if up.stderr else ''}"
            if "/register/" in line:
                url = line.strip()
        assert url.startswith(f"{tn.url}/register/")
        assert tn.status("n3")["BackendState"] == "NeedsLogin" and tn.status("n3")["AuthURL"] == url
        tn.admin("nodes", "approve", url.rsplit("/", 1)[1], "--user", "alice")
        out, err = up.communicate(timeout=20)
        assert up.returncode == 0 and "Success." in out, err
    finally:
        if up.poll() is None:
            up.kill()
            up.wait()
    assert tn.status("n3")["BackendState"] == "Running"
    tn.wait_for("n1 -> n3", lambda: tn.ping("n1", tn.ip("n3"), wait=0.5), timeout=5, step=0)
