"""Render a node's packet filter (Tailscale FilterRules) as an `nft -f` script.

Input: the FilterRules for traffic ARRIVING at this node (coord/policy wire shape, see PROTOCOLS.md 4):

    [{"SrcIPs": ["100.64.0.1/32", "*", ...],
      "DstPorts": [{"IP": "100.64.0.2/32" | "*" | "<cidr>", "Ports": {"First": 22, "Last": 22}}],
      "IPProto": [6, 17, 1, 58]}]        # omitted or empty: TCP, UDP, ICMPv4, ICMPv6

Output: one script that atomically replaces a table of our own (`table inet <name> {}` makes sure it
exists, `delete table` drops it, and the full definition follows; `nft -f` applies all or nothing):

    table inet shoal_filter {
      counter dropped {}
      chain input   { type filter hook input priority filter; policy accept; iifname "tail0" jump from_tailnet }
      chain forward { type filter hook forward priority filter; policy accept; iifname "tail0" jump from_tailnet }
      chain from_tailnet {
        ct state established,related accept      # replies and flows opened before a policy change
        ip saddr @self4 counter name dropped drop   # our own address coming in from the tailnet: spoofed
        ... one accept per (sources, destination, protocol, ports), with ct state new ...
        ICMP echo to an address where any port is open to those sources (Tailscale's rule)
        counter name dropped drop
      }
    }

The agent applies it with `nft -f -`; the same input always renders the same text, so re-applying is a
no-op in effect. Established connections survive a policy change because conntrack state is kept.
"""

from __future__ import annotations

import ipaddress
import re
from collections.abc import Iterable, Mapping, Sequence
from typing import Any

DEFAULT_PROTOS = (6, 17, 1, 58)
PORT_PROTOS = {6: "tcp", 17: "udp", 132: "sctp"}
NAME = re.compile(r"[A-Za-z][A-Za-z0-9_]{0,30}")
IFNAME = re.compile(r"[A-Za-z0-9_.\-]{1,15}")


class RenderError(ValueError):
    pass


def _nets(items: Iterable[str]) -> tuple[list[str], list[str], bool]:
    """Split addresses by family; the bool says whether `*` (any source) was present."""
    v4: list[str] = []
    v6: list[str] = []
    star = False
    for raw in items:
        if raw == "*":
            star = True
            continue
        if "-" in raw:  # an a-b range, as Tailscale allows in SrcIPs
            a, b = (ipaddress.ip_address(x.strip()) for x in raw.split("-", 1))
            if a.version != b.version or int(a) > int(b):
                raise RenderError(f"bad address range {raw!r}")
            (v4 if a.version == 4 else v6).append(f"{a}-{b}")
            continue
        try:
            n = ipaddress.ip_network(raw, strict=False)
        except ValueError:
            raise RenderError(f"bad address {raw!r}") from None
        text = str(n.network_address) if n.prefixlen == n.max_prefixlen else str(n)
        (v4 if n.version == 4 else v6).append(text)
    return _uniq(v4), _uniq(v6), star


def _uniq(xs: Iterable[str]) -> list[str]:
    return list(dict.fromkeys(xs))


def _set(items: Sequence[str]) -> str:
    return items[0] if len(items) == 1 else "{ " + ", ".join(items) + " }"


def _ports(first: int, last: int) -> str:
    if not (0 <= first <= last <= 65535):
        raise RenderError(f"bad port range {first}-{last}")
    return str(first) if first == last else f"{first}-{last}"


def _matches(family: str, src: list[str] | None, dst: str | None) -> str:
    """`ip saddr ... ip daddr ...` for one family; None means any."""
    kw = "ip" if family == "4" else "ip6"
    parts = [f"{kw} saddr {_set(src)}" if src else "", f"{kw} daddr {dst}" if dst else ""]
    if not any(parts):
        parts = [f"meta nfproto {'ipv4' if family == '4' else 'ipv6'}"]
    return " ".join(p for p in parts if p)


def render(
    rules: Sequence[Mapping[str, Any]],
    iface: str,
    own_addresses: Iterable[str] = (),
    table: str = "shoal_filter",
) -> str:
    """The nft script; raises RenderError for malformed rules or names."""
    if not NAME.fullmatch(table):
        raise RenderError(f"bad table name {table!r}")
    if not IFNAME.fullmatch(iface):
        raise RenderError(f"bad interface name {iface!r}")
    self4, self6, _ = _nets(a.split("/")[0] for a in own_addresses)
    body: list[str] = []
    for rule in rules:
        body.extend(_rule_lines(rule))
    body = _uniq(body)

    out = [
        f"table inet {table} {{}}",
        f"delete table inet {table}",
        f"table inet {table} {{",
        "\tcounter dropped {}",
    ]
    for fam, addrs in (("4", self4), ("6", self6)):
        if addrs:
            kind = "ipv4_addr" if fam == "4" else "ipv6_addr"
            out.append(f"\tset self{fam} {{ type {kind}; elements = {{ {', '.join(addrs)} }} }}")
    for chain, hook in (("input", "input"), ("forward", "forward")):
        out += [
            f"\tchain {chain} {{",
            f"\t\ttype filter hook {hook} priority filter; policy accept;",
            f'\t\tiifname "{iface}" jump from_tailnet',
            "\t}",
        ]
    out += ["\tchain from_tailnet {", "\t\tct state established,related accept"]
    if self4:
        out.append("\t\tip saddr @self4 counter name dropped drop")
    if self6:
        out.append("\t\tip6 saddr @self6 counter name dropped drop")
    out += [f"\t\t{line}" for line in body]
    out += ["\t\tcounter name dropped drop", "\t}", "}"]
    return "\n".join(out) + "\n"


def _rule_lines(rule: Mapping[str, Any]) -> list[str]:
    try:
        src_ips = list(rule["SrcIPs"])
        dst_ports = list(rule["DstPorts"])
        protos = [int(p) for p in (rule.get("IPProto") or DEFAULT_PROTOS)]
    except (KeyError, TypeError, ValueError) as e:
        raise RenderError(f"malformed FilterRule: {e}") from None
    src4, src6, star = _nets(src_ips)
    if not (src4 or src6 or star):
        return []
    lines: list[str] = []
    for dp in dst_ports:
        try:
            ip = str(dp["IP"])
            first, last = int(dp["Ports"]["First"]), int(dp["Ports"]["Last"])
        except (KeyError, TypeError, ValueError) as e:
            raise RenderError(f"malformed DstPorts entry: {e}") from None
        ports = _ports(first, last)
        dst4, dst6, dst_star = _nets([ip])
        for fam, srcs, dsts in (("4", src4, dst4), ("6", src6, dst6)):
            src = None if star else srcs
            if src is not None and not src:
                continue  # no source of this family
            targets: list[str | None] = [None] if dst_star else list(dsts)
            for dst in targets:
                m = _matches(fam, src, dst)
                icmp = "icmp" if fam == "4" else "icmpv6"
                for p in protos:
                    if p in PORT_PROTOS:
                        lines.append(f"{m} {PORT_PROTOS[p]} dport {ports} ct state new accept")
                    elif (p == 1 and fam == "4") or (p == 58 and fam == "6"):
                        lines.append(f"{m} meta l4proto {icmp} accept")
                    elif p not in (1, 58):
                        lines.append(f"{m} meta l4proto {p} accept")
                # Tailscale: ICMP echo to an address is allowed if any port there is allowed.
                lines.append(f"{m} {icmp} type echo-request accept")
    return lines
