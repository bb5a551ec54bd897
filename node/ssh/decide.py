"""Who may log in as whom over Shoal SSH (sans-IO).

Input: the node's SSHPolicy from its netmap (coord/wire/schema.py, compiled by coord/policy/ssh.py), the
connection's source address, its ORIGINAL destination (before the nft redirect of tailnet port 22 to our
listener), the login name the client asked for, and the node's own tailnet addresses. Identity comes from the
source address alone, which is sound only because (a) the packet filter drops tailnet sources arriving on any
interface but the tunnel, where WireGuard binds them to a peer's key, (b) our own addresses are refused here and
in the filter, and (c) the listener is reachable only through the redirect (a direct connection to its port has
an original destination that is not port 22).

Rules are tried in order; the first whose principals hold the source address and whose SSHUsers maps the login
decides. SSHUsers: an exact key wins over "*"; "=" is the login itself; "" refuses that login under this rule
(the next rule may still allow it). A `check` rule asks the user to sign in again, which this node cannot yet
ask for: it refuses, saying so.
"""

from __future__ import annotations

import ipaddress
import re
from collections.abc import Iterable
from dataclasses import dataclass

from coord import wire

SSH_PORT = 22
# The same rule as the policy's (coord/policy/model.py LOCAL_USER): never a leading '-', at most 32 characters.
LOCAL_USER = re.compile(r"[A-Za-z_][A-Za-z0-9_.-]{0,30}\$?")


@dataclass(frozen=True)
class Decision:
    allowed: bool
    reason: str
    local_user: str = ""
    principal: wire.SSHPrincipal | None = None
    origin: int = -1


def _ip(text: str) -> str:
    try:
        return str(ipaddress.ip_address(text.split("%")[0]))
    except ValueError:
        return ""


def decide(policy: wire.SSHPolicy | None, src: str, dst: str, dst_port: int, login: str,
           own: Iterable[str]) -> Decision:
    own_ips = {_ip(a.split("/")[0]) for a in own} - {""}
    src_ip, dst_ip = _ip(src), _ip(dst)
    if dst_port != SSH_PORT or dst_ip not in own_ips:
        return Decision(False, f"not a connection to this node's tailnet address port {SSH_PORT}")
    if not src_ip or src_ip in own_ips:
        return Decision(False, f"{src} is this node's own address: identity by address needs another node")
    if not LOCAL_USER.fullmatch(login):
        return Decision(False, f"{login!r} is not a valid local user name")
    seen: wire.SSHPrincipal | None = None  # who the source is, for the refusal's audit line
    for rule in policy.rules if policy is not None else ():
        who = next((p for p in rule.principals if src_ip in {_ip(a) for a in p.ips}), None)
        if who is None:
            continue
        seen = seen or who
        users = dict(rule.users)
        target = users.get(login, users.get("*"))
        if not target:
            continue
        local = login if target == "=" else target
        if not LOCAL_USER.fullmatch(local):
            continue
        if rule.action == "check":
            return Decision(False, f"ssh rule {rule.origin} needs {_name(who)} to sign in again (check), which this "
                                   "node cannot ask for yet", local, who, rule.origin)
        return Decision(True, f"ssh rule {rule.origin}", local, who, rule.origin)
    return Decision(False, f"no ssh rule lets {src_ip} log in as {login}", principal=seen)


def _name(p: wire.SSHPrincipal) -> str:
    return p.user or ",".join(p.tags) or f"node {p.node}"


def who(p: wire.SSHPrincipal | None) -> str:
    """The identity for audit lines: user or tags, and the node."""
    return "unknown" if p is None else f"{_name(p)} (node {p.node})"
