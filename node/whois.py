"""`shoal whois ADDR`: who a tailnet address is, and the app capabilities it holds on this node (pure).

From the netmap alone: the peer (or this node) with that address, and the union, in policy order, of the
`CapGrants` (coord/policy/capgrant.py) whose sources contain the address. An application on this node that sees
a connection from ADDR asks this and authorises by the capabilities, as with Tailscale's `tailscale whois`:

    {"Node": {"ID": 2, "Name": "laptop.shoal.internal.", "User": 1, "Tags": [], "Addresses": ["100.64.0.2/32"]},
     "CapMap": {"example.com/cap/files": [{"shares": ["docs"]}]}}
"""

from __future__ import annotations

import ipaddress
from typing import Any

from node.mapsession import NetMap


class WhoisError(ValueError):
    pass


def whois(nm: NetMap, addr: str) -> dict[str, Any]:
    try:
        ip = ipaddress.ip_address(addr.strip())
    except ValueError:
        raise WhoisError(f"{addr!r} is not an IP address") from None
    nodes = ([nm.node] if nm.node is not None else []) + nm.sorted_peers()
    node = next((n for n in nodes if any(a.ip == ip for a in n.addresses)), None)
    if node is None:
        raise WhoisError(f"no node of this tailnet has the address {ip}")
    caps: dict[str, list[Any]] = {}
    for g in nm.cap_grants:
        if any(ip in ipaddress.ip_network(s, strict=False) for s in g.src_ips):
            for name, vals in g.cap_map:
                caps.setdefault(name, []).extend(vals)
    return {
        "Node": {"ID": node.id, "Name": node.name, "User": node.user, "Tags": list(node.tags),
                 "Addresses": [str(a) for a in node.addresses]},
        "CapMap": caps,
    }
