"""App grants (`grants[].app`): capabilities delivered to the destination node (sans-IO).

A grant with `app` gives its sources capabilities on its destinations, as Tailscale's `tailscale.com/cap/...`
grants: the network does nothing with them, an application on the destination authorises by them (`shoal whois
ADDR` on the node says who is connecting and with which capabilities). The destination node gets, in its netmap:

    "CapGrants": [{"SrcIPs": ["100.64.0.2", "fd7a:115c:a1e0::2"],
                   "CapMap": {"example.com/cap/files": [{"shares": ["docs"]}]}}]

one entry per grant and destination, in policy order (an `ip`-only grant gives none). Sources and destinations
match as in the packet filter (posture-gated grants only for sources that satisfy the posture); a node is never
its own source; `autogroup:self` keeps the sources owned by the destination's user.
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

from .match import Subject, any_of, match_sel, posture_ok, same_owner
from .model import Policy, Rule


def compile_node(
    policy: Policy | None, dst: Subject, dst_id: int, nodes: Iterable[tuple[int, Subject]]
) -> list[dict[str, Any]]:
    if policy is None:
        return []
    others = [(i, s) for i, s in nodes if i != dst_id]
    out: list[dict[str, Any]] = []
    for g in policy.grants:
        if not g.app or not g.dst_sels:
            continue
        rule = Rule(("grants",), g.src_sels, (), (), (), g.src_posture)
        ips: list[str] = []
        for _, s in others:
            to = any_of(
                same_owner(s, dst) if d.kind == "autogroup" and d.name == "self" else match_sel(d, dst, dst=True)
                for d in g.dst_sels
            )
            if to.value is not True or any_of(match_sel(x, s, dst=False) for x in g.src_sels).value is not True:
                continue
            if posture_ok(policy, rule, s).value is not True:
                continue
            ips += [str(n.network_address) for n in s.nets or ()]
        if ips:
            out.append({"SrcIPs": ips, "CapMap": {k: list(v) for k, v in sorted(g.app.items())}})
    return out
