"""Cut the established flows a narrowed packet filter no longer allows (`conntrack -L` / `conntrack -D`).

Our nft table lets `ct state established,related` through before any rule (node/render/nft.py), as Tailscale's
filter does, so a flow opened under an old policy would outlive it. After a new filter is in place the agent
lists the kernel's connection-tracking table and deletes each TCP or UDP entry that came in from the tailnet
and that the new FilterRules refuse; its next packet is then `ct state new` and meets the new rules (UDP and a
TCP segment without SYN are dropped). The server's `keep_established_on_policy_change` turns this off.

Input read (`conntrack -L -f ipv4|ipv6 -p tcp|udp`, one entry a line, the original tuple first):

    tcp      6 431999 ESTABLISHED src=100.64.0.1 dst=100.64.0.2 sport=40000 dport=22 src=100.64.0.2 ... [ASSURED] ...
    udp      17 29 src=100.64.0.1 dst=100.64.0.2 sport=5000 dport=7000 [UNREPLIED] src=100.64.0.2 ... use=1

Lines that do not read as an entry (the tool's summary, other protocols) are ignored. An entry is a candidate
only when its original source is a tailnet address (100.64.0.0/10, fd7a:115c:a1e0::/48) other than our own:
flows this node opened, and traffic from elsewhere, are not the tailnet filter's business. Its verdict is the
filter's for (source, original destination, protocol, original destination port): the SSH redirect keeps the
original port 22 in the original tuple, so it is judged as port 22.

Each refused entry is deleted by its full original tuple (`conntrack -D -f F -p P -s S -d D --sport X --dport Y`);
an entry gone in between (exit 1, "0 flow entries") is not an error.
"""

from __future__ import annotations

import ipaddress
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from node.run import Runner

TAILNET = (ipaddress.ip_network("100.64.0.0/10"), ipaddress.ip_network("fd7a:115c:a1e0::/48"))
PROTOS = {"tcp": 6, "udp": 17}
DEFAULT_PROTOS = (6, 17, 1, 58)

IPAddr = ipaddress.IPv4Address | ipaddress.IPv6Address


@dataclass(frozen=True)
class Flow:
    proto: int  # 6 or 17
    src: IPAddr
    dst: IPAddr
    sport: int
    dport: int

    def delete_argv(self) -> list[str]:
        name = "tcp" if self.proto == 6 else "udp"
        return ["conntrack", "-D", "-f", "ipv4" if self.src.version == 4 else "ipv6", "-p", name,
                "-s", str(self.src), "-d", str(self.dst), "--sport", str(self.sport), "--dport", str(self.dport)]


def parse(text: str) -> list[Flow]:
    """The TCP and UDP entries of `conntrack -L` output, by their original tuple."""
    out: list[Flow] = []
    for line in text.splitlines():
        words = line.split()
        if len(words) < 2 or words[0] not in PROTOS:
            continue
        fields: dict[str, str] = {}
        for w in words[2:]:
            k, eq, v = w.partition("=")
            if eq and k in ("src", "dst", "sport", "dport") and k not in fields:
                fields[k] = v
        try:
            flow = Flow(PROTOS[words[0]], ipaddress.ip_address(fields["src"]), ipaddress.ip_address(fields["dst"]),
                        int(fields["sport"]), int(fields["dport"]))
        except (KeyError, ValueError):
            continue
        if flow.src.version == flow.dst.version and 0 <= flow.sport <= 65535 and 0 <= flow.dport <= 65535:
            out.append(flow)
    return out


def _in(addr: IPAddr, spec: str) -> bool:
    """Whether `addr` is in a FilterRule address: "*", a CIDR or address, or a range "a-b"."""
    if spec == "*":
        return True
    try:
        if "-" in spec:
            lo, _, hi = spec.partition("-")
            a, b = ipaddress.ip_address(lo), ipaddress.ip_address(hi)
            return a.version == b.version == addr.version and a <= addr <= b  # type: ignore[operator]
        net = ipaddress.ip_network(spec, strict=False)
    except ValueError:
        return False
    return net.version == addr.version and addr in net


def allowed(rules: Sequence[Mapping[str, Any]], flow: Flow) -> bool:
    """Whether the FilterRules (wire shape) let this flow's first packet in."""
    for r in rules:
        protos = r.get("IPProto") or DEFAULT_PROTOS
        if flow.proto not in protos:
            continue
        if not any(_in(flow.src, s) for s in r.get("SrcIPs", ())):
            continue
        for d in r.get("DstPorts", ()):
            ports = d.get("Ports", {})
            if _in(flow.dst, d.get("IP", "")) and ports.get("First", 0) <= flow.dport <= ports.get("Last", -1):
                return True
    return False


def refused(rules: Sequence[Mapping[str, Any]], flows: Iterable[Flow], own: Iterable[str] = ()) -> list[Flow]:
    """The flows from other tailnet nodes that the rules no longer let in."""
    mine = {ipaddress.ip_address(a.split("/")[0]) for a in own}
    return [f for f in flows
            if any(f.src.version == n.version and f.src in n for n in TAILNET) and f.src not in mine
            and not allowed(rules, f)]


class ConntrackCutter:
    """Lists the tracked TCP/UDP flows through a Runner and deletes those the new filter refuses."""

    def __init__(self, runner: Runner) -> None:
        self.runner = runner

    async def cut(self, rules: Sequence[Mapping[str, Any]], own: Iterable[str] = ()) -> list[Flow]:
        """Returns the flows deleted. Raises CommandError when `conntrack -L` fails."""
        own = list(own)
        flows: list[Flow] = []
        for fam in ("ipv4", "ipv6"):
            for proto in PROTOS:
                r = await self.runner.run(["conntrack", "-L", "-f", fam, "-p", proto])
                flows += parse(r.out)
        cut = refused(rules, flows, own)
        for f in cut:
            await self.runner.run(f.delete_argv(), check=False)
        return cut
