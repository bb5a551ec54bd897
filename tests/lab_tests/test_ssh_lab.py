"""Shoal SSH in the lab (issue 21): Debian's OpenSSH client logs in by tailnet identity, no keys or passwords.

Four nodes: `s` (server@) runs `shoal up --ssh` next to a stand-in host sshd listening on 0.0.0.0:22; `a` (alice@)
may log in as a local user made for this run; `r` (root@example.com) only through `localpart:*@example.com`, which
must never give root; `m` (mallory@) has no ssh rule at all. Every node may reach every other on any port, so
what refuses is the ssh policy, not the packet filter.
"""

from __future__ import annotations

import json
import secrets
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.lab import Topology
from tests.lab.udp import py
from tests.lab_tests.tailnet import Tailnet

pytestmark = pytest.mark.lab

USERS = {"s": "server@example.com", "a": "alice@example.com", "r": "root@example.com", "m": "mallory@example.com"}

# A host sshd stand-in: a wildcard listener on port 22 that says who it is.
HOST_SSHD = r"""
import socket
s = socket.socket()
s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
s.bind(("0.0.0.0", 22))
s.listen(8)
while True:
    c, _ = s.accept()
    c.sendall(b"SSH-2.0-host-sshd-standin\r\n")
    c.close()
"""

BANNER = r"""
import socket, sys
with socket.create_connection((sys.argv[1], 22), timeout=5) as c:
    print(c.recv(100).decode().strip())
"""


def checked(local: str) -> str:
    """Alice's login becomes a `check` rule: she must sign in again, which this node cannot ask for yet."""
    return json.dumps({
        "acls": [{"action": "accept", "src": ["*"], "dst": ["*:*"]}],
        "ssh": [{"action": "check", "src": ["alice@example.com"], "dst": ["server@example.com"], "users": [local],
                 "checkPeriod": "1h"}],
        "sshTests": [{"src": "alice@example.com", "dst": ["server@example.com"], "check": [local]}],
    })


def policy(local: str) -> str:
    return json.dumps({
        "acls": [{"action": "accept", "src": ["*"], "dst": ["*:*"]}],
        "grants": [{"src": ["alice@example.com"], "dst": ["server@example.com"],
                    "app": {"example.com/cap/files": [{"shares": ["docs"]}]}}],
        "ssh": [
            {"action": "accept", "src": ["alice@example.com"], "dst": ["server@example.com"], "users": [local]},
            {"action": "accept", "src": ["root@example.com"], "dst": ["server@example.com"],
             "users": ["localpart:*@example.com"]},
            {"action": "accept", "src": ["alice@example.com"], "dst": ["server@example.com"],
             "users": ["autogroup:nonroot"]},
        ],
        "sshTests": [
            {"src": "alice@example.com", "dst": ["server@example.com"], "accept": [local], "deny": ["root"]},
            {"src": "root@example.com", "dst": ["server@example.com"], "deny": ["root", local]},
            {"src": "mallory@example.com", "dst": ["server@example.com"], "deny": [local, "root"]},
        ],
    })


@pytest.fixture
def local_user(tmp_path: Path) -> Iterator[str]:
    """A local user for this run only (the lab's namespaces share /etc/passwd), removed even on failure."""
    name = "shl" + secrets.token_hex(3)
    home = tmp_path / name
    subprocess.run(["useradd", "-m", "-d", str(home), "-s", "/bin/sh", name], check=True, capture_output=True)
    try:
        yield name
    finally:
        subprocess.run(["userdel", "-r", name], capture_output=True)


def ssh(tn: Tailnet, src: str, login: str, host: str, *cmd: str, tty: bool = False,
        opts: tuple[str, ...] = ()) -> subprocess.CompletedProcess[str]:
    """Debian's OpenSSH client, with no keys, agent or config of its own."""
    argv = ["ssh", "-F", "/dev/null", "-o", "BatchMode=yes", "-o", "StrictHostKeyChecking=no",
            "-o", "UserKnownHostsFile=/dev/null", "-o", "ConnectTimeout=5", "-o", "IdentityAgent=none",
            *(["-tt"] if tty else []), *opts, f"{login}@{host}", *cmd]
    return tn.lab.exec(src, argv, check=False, timeout=30)


def test_ssh_login_by_tailnet_identity(tailnet: Tailnet, local_user: str, tmp_path: Path) -> None:
    tn, lab = tailnet, tailnet.lab
    lab.build(Topology.parse("lan: s a r m"))
    tn.start_server()
    pfile = tmp_path / "policy.hujson"
    pfile.write_text(policy(local_user))
    p = tn.lab.exec(tn.server_ns, [sys.executable, "-m", "coord.cli", "policy", "set", str(pfile),
                                   "--data", str(tn.data)], check=False)
    assert p.returncode == 0 and "policy applied" in p.stdout, p.stdout + p.stderr
    lab.spawn("s", py(HOST_SSHD), log_path=tmp_path / "host-sshd.log")
    for n in USERS:
        tn.start_agent(n)
    for n in USERS:
        tn.up(n, tn.auth_key(USERS[n]), *(["--ssh"] if n == "s" else []))
    s4 = tn.ip("s", "-4")
    # the sshTests against the live tailnet, as `policy check` runs them
    p = lab.exec(tn.server_ns, [sys.executable, "-m", "coord.cli", "policy", "check", str(pfile), "--json",
                                "--data", str(tn.data)], check=False)
    r = json.loads(p.stdout)
    assert (r["ok"], r["ssh_assertions"], r["ssh_passed"]) == (True, 6, 6), r
    tn.wait_for("a reaches s", lambda: tn.ping("a", s4, wait=0.5), timeout=15, step=0)

    # alice: logs in as the local user and runs a command; its exit status comes back
    out = ssh(tn, "a", local_user, s4, "id -un; echo HOME=$HOME; exit 7")
    assert out.returncode == 7, out.stderr
    assert out.stdout.split() == [local_user, f"HOME={tmp_path / local_user}"]
    # the app grant reached s: `shoal whois` there says who alice's address is and what she may
    w = json.loads(tn.shoal("s", "whois", "--json", tn.ip("a", "-4")).stdout)
    assert w["Node"]["Name"].startswith("a.") and w["CapMap"] == {"example.com/cap/files": [{"shares": ["docs"]}]}
    assert json.loads(tn.shoal("s", "whois", "--json", tn.ip("m", "-4")).stdout)["CapMap"] == {}
    # with a PTY: a real terminal, controlling the shell
    out = ssh(tn, "a", local_user, s4, "tty; ps -o tty= -p $$", tty=True)
    assert out.returncode == 0, out.stderr
    tty, ctty = out.stdout.split()
    assert tty.startswith("/dev/pts/") and ctty == tty.removeprefix("/dev/")
    # the same login over IPv6
    s6 = tn.ip("s", "-6")
    out = ssh(tn, "a", local_user, s6, "id -un")
    assert (out.returncode, out.stdout.strip()) == (0, local_user), out.stderr

    # subsystems (sftp, so OpenSSH 9's scp) are not served yet: refused, not run as root
    out = ssh(tn, "a", local_user, s4, "sftp", opts=("-s",))
    assert out.returncode != 0 and "subsystem request failed" in out.stderr, out.stderr

    # root is not among alice's users (autogroup:nonroot and a named user)
    out = ssh(tn, "a", "root", s4, "id -un")
    assert out.returncode == 255 and "Permission denied" in out.stderr and out.stdout == ""
    # root@example.com: localpart would say root, which is never given unless named
    out = ssh(tn, "r", "root", s4, "id -un")
    assert out.returncode == 255 and "no ssh rule lets" in out.stderr and out.stdout == ""
    # mallory: no rule names her
    out = ssh(tn, "m", local_user, s4, "id -un")
    assert out.returncode == 255 and "Permission denied" in out.stderr and out.stdout == ""
    # port forwarding is refused (a remote forward here; asyncssh refuses direct-tcpip channels the same way)
    out = ssh(tn, "a", local_user, s4, "sleep 1", opts=("-o", "ExitOnForwardFailure=yes",
                                                         "-R", "127.0.0.1:9999:127.0.0.1:22"))
    assert out.returncode == 255 and "forwarding failed" in out.stderr.lower(), out.stderr

    # the host's own sshd keeps port 22 on every other address
    banner = lab.exec("a", py(BANNER, lab.nodes["s"].addr)).stdout.strip()
    assert banner == "SSH-2.0-host-sshd-standin"
    # and the listener's own port is not reachable directly, from the tailnet or the LAN
    for target in (s4, lab.nodes["s"].addr):
        direct = ssh(tn, "a", local_user, target, "true", opts=("-p", "41022"))
        assert direct.returncode == 255, (target, direct.stderr)
    log = tn.log("s")
    assert "alice@example.com (node" in log and f"logged in as {local_user}" in log
    assert "refused alice@example.com (node" in log and "as root" in log  # autogroup:nonroot
    assert "refused unknown from" in log  # root@ and mallory@: no rule names them with a user they may have

    # a policy change cuts what it forbids: the next login is asked to sign in again (check), and refused here
    pfile.write_text(checked(local_user))
    p = lab.exec(tn.server_ns, [sys.executable, "-m", "coord.cli", "policy", "set", str(pfile), "--data",
                                str(tn.data)], check=False)
    assert p.returncode == 0, p.stdout + p.stderr

    def refused() -> bool:
        out = ssh(tn, "a", local_user, s4, "true")
        return out.returncode == 255 and "sign in again (check)" in out.stderr

    tn.wait_for("alice refused under check", refused, timeout=10, step=0.2)
