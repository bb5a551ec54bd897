"""What this node reports as its endpoints, and which WireGuard endpoint each peer gets (pure).

Reported (MapRequest `Endpoints`/`EndpointTypes`): MagicSock's STUN endpoints (type 2) and its local ones
(type 1, IPv4: what the raw port can use), then every other interface address (IPv6 too: the raw port is IPv4
only, but peers may use them), at most `wire.MAX_ENDPOINTS`. Without MagicSock: the interface addresses.

A peer's WireGuard endpoint: MagicSock's choice (its confirmed direct path, else its DERP socket), else, for a
peer without disco or while MagicSock is not running, the first endpoint it reported that this node can reach.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

from coord import wire
from node import compile
from node.magicsock import MagicSock, fmt_addr
from node.netcheck import Region, Report


def combine(magic: tuple[list[str], list[int]] | None, local: Sequence[str]) -> tuple[list[str], list[int]]:
    if magic is None:
        return list(local), [wire.EP_LOCAL] * len(local)
    eps, types = list(magic[0]), list(magic[1])
    for e in local:
        if e not in eps:
            eps.append(e)
            types.append(wire.EP_LOCAL)
    return eps[: wire.MAX_ENDPOINTS], types[: wire.MAX_ENDPOINTS]


def chooser(magicsock: Callable[[], MagicSock | None], local: Sequence[str]) -> compile.EndpointChooser:
    fallback = compile.first_endpoint(compile.families_of(local) or (4, 6))

    def choose(peer: wire.Node) -> str | None:
        ms = magicsock()
        if ms is not None and peer.key is not None:
            ep = ms.endpoint_for(peer.key)
            if ep is not None:
                return ep
        return fallback(peer)

    return choose


def region_endpoints(regions: Sequence[Region], report: Report) -> dict[int, str]:
    """Our public endpoint per region, as its STUN server saw us."""
    by_addr = {s.addr: r.region_id for r in regions for s in r.servers}
    out: dict[int, str] = {}
    for server, seen in report.seen.items():
        rid = by_addr.get(server)
        if rid is not None and rid not in out:
            out[rid] = fmt_addr(seen)
    return out
