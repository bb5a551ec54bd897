"""Plain-WireGuard devices in the lab (issue 23): a namespace with no agent brings up the config that
`shoal-server devices add-wg` printed, with the real `wg-quick` (userspace: wireguard-go), and reaches the
tailnet through its hub.

Topology: one LAN with the hub h (alice's), alice's node a, bob's node b, and the device namespace d (no agent).
The policy lets alice reach alice's nodes, and bob reach alice's nodes on TCP 22 only (so b sees the hub as a
peer, and a packet from the device to b meets the hub's forward filter rather than a missing route).
"""

from __future__ import annotations

import json
import os
import stat
import subprocess
import sys
from pathlib import Path

import pytest

from tests.lab import Lab, Topology
from tests.lab_tests.tailnet import Tailnet

pytestmark = pytest.mark.lab

ALICE, BOB = "alice@example.com", "bob@example.com"
POLICY = """{
  "acls": [
    {"action": "accept", "src": ["alice@example.com"], "dst": ["alice@example.com:*"]},
    {"action": "accept", "src": ["bob@example.com"], "dst": ["alice@example.com:22", "bob@example.com:*"]},
  ],
}
"""


def server_cli(tn: Tailnet, *args: str, cwd: Path | None = None) -> subprocess.CompletedProcess[str]:
    p = subprocess.run([sys.executable, "-m", "coord.cli", *args, "--data", str(tn.data)], capture_output=True,
                       text=True, timeout=60, cwd=cwd)
    assert p.returncode == 0, p.stdout + p.stderr
    return p


def dropped(lab: Lab, name: str) -> int:
    out = lab.exec(name, ["nft", "-j", "list", "counter", "inet", "shoal_filter", "dropped"]).stdout
    return int(next(x["counter"] for x in json.loads(out)["nftables"] if "counter" in x)["packets"])


def wg_quick(lab: Lab, ns: str, action: str, conf: Path) -> subprocess.CompletedProcess[str]:
    env = {"PATH": os.environ.get("PATH", "/usr/sbin:/usr/bin:/sbin:/bin"),
           "WG_QUICK_USERSPACE_IMPLEMENTATION": "wireguard-go", "WG_SUDO": "1"}
    return subprocess.run(["ip", "netns", "exec", ns, "wg-quick", action, str(conf)], capture_output=True,
                          text=True, timeout=30, env=env)


def ping(lab: Lab, ns: str, addr: str, count: int = 1, wait: float = 2) -> bool:
    p = subprocess.run(["ip", "netns", "exec", ns, "ping", "-c", str(count), "-i", "0.2", "-W", str(wait), addr],
                       capture_output=True, timeout=count * 3 + 10)
    return p.returncode == 0


def test_wg_device_reaches_allowed_node_not_forbidden_and_stops_after_revocation(
    tailnet: Tailnet, tmp_path: Path
) -> None:
    tn, lab = tailnet, tailnet.lab
    lab.build(Topology.parse("lan: h a b d"))
    lab.sysctl(lab.ns("h"), "net.ipv4.ip_forward", "1")
    tn.start_server()
    policy = tmp_path / "policy.hujson"
    policy.write_text(POLICY)
    server_cli(tn, "policy", "set", str(policy))
    for n in ("h", "a", "b"):
        tn.start_agent(n)
    tn.up("h", tn.auth_key(ALICE))
    tn.up("a", tn.auth_key(ALICE))
    tn.up("b", tn.auth_key(BOB))
    tn.wait_for("b sees h", lambda: "h" in tn.peer_names("b"), timeout=15)

    # the device: its private key is only in what this command printed and in the PNG
    iface = lab.iface("wg")
    png = tmp_path / "phone.png"
    out = server_cli(tn, "devices", "add-wg", "phone", "--via", "h", "--user", ALICE, "--qr-png", str(png),
                     cwd=tmp_path).stdout
    conf_text = out[out.index("[Interface]"):out.index("PersistentKeepalive")].rstrip() + "\nPersistentKeepalive = 25\n"
    private = next(line.split(" = ", 1)[1] for line in conf_text.splitlines() if line.startswith("PrivateKey"))
    assert "DNS" not in conf_text
    assert "\u2588" in out or "\u2580" in out or "\u2584" in out  # the terminal QR code
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert stat.S_IMODE(png.stat().st_mode) == 0o600
    # never stored: not in the log, the database or anything else under the data dir
    for f in tn.data.rglob("*"):
        if f.is_file() and not f.is_socket():
            assert private.encode() not in f.read_bytes(), f
    conf = tmp_path / f"{iface}.conf"
    conf.write_text(conf_text)
    conf.chmod(0o600)

    devices = {n["name"]: n for n in tn.admin("nodes", "list")}
    dev4 = devices["phone"]["ipv4"]
    a4, b4, h4 = tn.ip("a"), tn.ip("b"), tn.ip("h")
    # receivers route the device's address through the hub: it is in the hub's AllowedIPs
    tn.wait_for("a routes the device via h", lambda: any(
        p["HostName"] == "h" and f"{dev4}/32" in p.get("AllowedIPs", []) for p in tn.status("a")["Peers"]),
        timeout=15)

    r = wg_quick(lab, lab.ns("d"), "up", conf)
    assert r.returncode == 0, r.stdout + r.stderr
    try:
        tn.wait_for("the device pings a by its tailnet address", lambda: ping(lab, lab.ns("d"), a4), timeout=20,
                    step=0.5)
        assert ping(lab, lab.ns("d"), h4)
        # bob's node: the hub has it as a peer, but its forward filter lets nothing from the device through
        before = dropped(lab, "h")
        assert not ping(lab, lab.ns("d"), b4, count=2)
        assert dropped(lab, "h") > before

        # revoked: gone from the hub's peers and the others' AllowedIPs, and the tunnel carries nothing
        server_cli(tn, "devices", "revoke", "phone")
        tn.wait_for("a no longer routes the device", lambda: not any(
            f"{dev4}/32" in p.get("AllowedIPs", []) for p in tn.status("a")["Peers"]), timeout=15)
        tn.wait_for("h drops the device peer", lambda: "phone" not in tn.peer_names("h"), timeout=15)
        assert not ping(lab, lab.ns("d"), a4, count=3)
    finally:
        wg_quick(lab, lab.ns("d"), "down", conf)
