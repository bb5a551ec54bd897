"""Render a node's packet filter (Tailscale FilterRules) as an `nft -f` script.

Input: the FilterRules for traffic ARRIVING at this node (coord/policy wire shape, see PROTOCOLS.md 4):

    [{"SrcIPs": ["100.64.0.1/32", "*", "100.64.0.5-100.64.0.9", ...],
      "DstPorts": [{"IP": "100.64.0.2/32" | "*" | "<cidr>", "Ports": {"First": 22, "Last": 22}}],
      "IPProto": [6, 17, 1, 58]}]        # omitted, null or empty: TCP, UDP, ICMPv4, ICMPv6

Every field is checked before a line is written: lists must be lists, addresses must parse (no IPv6 scope
IDs: `fe80::1%x } accept` parses as an address and would be pasted into the script), ports are integers in
0..65535 with First <= Last, protocols integers in 0..255. Anything else raises RenderError naming the
rule, so the agent keeps the filter it had and says why.

Output: one script that atomically replaces a table of our own (`table inet <name> {}` makes sure it
exists, `delete table` drops it, and the full definition follows; `nft -f` applies all or nothing):

    table inet shoal_filter {
      counter dropped {}
      counter spoofed {}
      chain input {
        type filter hook input priority filter; policy accept;
        iifname != { "lo", "tail0" } ip saddr 100.64.0.0/10 counter name spoofed drop          # always
        iifname != { "lo", "tail0" } ip6 saddr fd7a:115c:a1e0::/48 counter name spoofed drop   # always
        iifname "tail0" jump from_tailnet
      }
      chain forward { ... the same ... }
      chain from_tailnet {
        ip daddr 100.100.100.100 counter name dropped drop        # always: the resolver is ours only
        ip6 daddr fd7a:115c:a1e0::53 counter name dropped drop
        ct state established,related accept      # replies and flows opened before a policy change
        ip saddr @self4 counter name dropped drop   # our own address coming in from the tailnet: spoofed
        ... one accept per (sources, destination, protocol, ports), with ct state new, each after a
            count-only twin `... counter name rule_N` (N: the FilterRule's index; `counter rule_N {}` is
            declared beside `dropped`): `shoal status --filter` shows what each rule let in ...
        ICMP echo to an address where any port is open to those sources (Tailscale's rule)
        counter name dropped drop
      }
    }

A subnet router that masquerades (`snat`, `shoal up --advertise-routes`, the default) adds, in the forward chain
before the jump, `iifname "tail0" oifname != "tail0" meta mark set meta mark & 0xff00ffff | 0x00040000`, and

      chain postrouting {
        type nat hook postrouting priority srcnat; policy accept;
        meta mark & 0x00ff0000 == 0x00040000 masquerade
      }

Forwarded traffic from the tailnet goes through `from_tailnet` like traffic to the node itself: the policy's
rules for the router name the subnet as a destination, so only what the policy allows is forwarded.

The two `spoofed` rules and the two quad-100 drops are in every table we render, whatever the policy (an
allow-all one included, `render_allow_all`): identity is by address (the policy here; later SSH, `whois`), so a tailnet
source may only arrive through the tunnel, where WireGuard's AllowedIPs bind it to a peer's key. Loopback is
exempt (the node talking to its own tailnet address). Our own addresses coming in from the tailnet are
dropped as spoofed in `from_tailnet`, so a connection from them is never taken for a peer's.

With Shoal SSH on (`ssh_port`, `shoal up --ssh`), a `prerouting` nat chain `ssh_redirect` sends tailnet port 22
on our own addresses to the SSH listener (`iifname "tail0" ip daddr 100.64.0.2 tcp dport 22 dnat ip to
100.64.0.2:41022`), so
a host sshd on 0.0.0.0:22 keeps its port; the input chain drops the listener's port from any other interface,
`from_tailnet` drops it unless the connection's original destination port was 22, and every rule that opens TCP
22 opens the listener's port to the same sources.

The agent applies it with `nft -f -` (`NftApplier`); the same input always renders the same text, so
re-applying is a no-op in effect. Established connections survive a policy change because conntrack state
is kept.
"""

from __future__ import annotations

import ipaddress
import re
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from node.run import Runner

from node.errors import RemoteError

DEFAULT_PROTOS = (6, 17, 1, 58)
PORT_PROTOS = {6: "tcp", 17: "udp", 132: "sctp"}
NAME = re.compile(r"[A-Za-z][A-Za-z0-9_]{0,30}")
IFNAME = re.compile(r"[A-Za-z0-9_.\-]{1,15}")
TABLE = "shoal_filter"
TAILNET_SOURCES = (("ip", "100.64.0.0/10"), ("ip6", "fd7a:115c:a1e0::/48"))
QUAD100 = (("ip", "100.100.100.100"), ("ip6", "fd7a:115c:a1e0::53"))
# Tailscale's subnet-route mark (PROTOCOLS.md 6) in its byte of the mark; the other bits are kept.
SUBNET_MARK = "0x00040000"
MARK_MASK = "0x00ff0000"
MARK_KEEP = "0xff00ffff"


class RenderError(RemoteError, ValueError):
    pass


@dataclass(frozen=True)
class _Addrs:
    v4: list[str]
    v6: list[str]
    star: bool


@dataclass(frozen=True)
class _Dst:
    addrs: _Addrs
    ports: str


def _address(raw: str, where: str) -> ipaddress.IPv4Address | ipaddress.IPv6Address:
    try:
        a = ipaddress.ip_address(raw.strip())
    except ValueError:
        raise RenderError(f"{where}: bad address {raw!r}") from None
    if isinstance(a, ipaddress.IPv6Address) and a.scope_id is not None:
        raise RenderError(f"{where}: scoped address {raw!r}")
    return a


def _nets(items: object, where: str) -> _Addrs:
    """Split addresses by family; `star` says whether `*` (any) was present."""
    if not isinstance(items, list):
        raise RenderError(f"{where}: expected a list of addresses, got {type(items).__name__}")
    v4: list[str] = []
    v6: list[str] = []
    star = False
    for i, raw in enumerate(items):
        at = f"{where}[{i}]"
        if not isinstance(raw, str):
            raise RenderError(f"{at}: expected an address string, got {type(raw).__name__}")
        if raw == "*":
            star = True
            continue
        if "-" in raw:  # an a-b range, as Tailscale allows in SrcIPs
            lo, hi = raw.split("-", 1)
            a, b = _address(lo, at), _address(hi, at)
            if a.version != b.version or int(a) > int(b):
                raise RenderError(f"{at}: bad address range {raw!r}")
            (v4 if a.version == 4 else v6).append(f"{a}-{b}")
            continue
        if "%" in raw:
            raise RenderError(f"{at}: scoped address {raw!r}")
        try:
            n = ipaddress.ip_network(raw, strict=False)
        except ValueError:
            raise RenderError(f"{at}: bad address {raw!r}") from None
        text = str(n.network_address) if n.prefixlen == n.max_prefixlen else str(n)
        (v4 if n.version == 4 else v6).append(text)
    return _Addrs(_uniq(v4), _uniq(v6), star)


def _uniq(xs: Iterable[str]) -> list[str]:
    return list(dict.fromkeys(xs))


def _set(items: Sequence[str]) -> str:
    return items[0] if len(items) == 1 else "{ " + ", ".join(items) + " }"


def _int(v: object, lo: int, hi: int, where: str) -> int:
    # bool is an int subclass and 22.0 would truncate silently: neither is a port or protocol number
    if not isinstance(v, int) or isinstance(v, bool) or not lo <= v <= hi:
        raise RenderError(f"{where}: expected an integer in {lo}..{hi}, got {v!r}")
    return v


def _ports(v: object, where: str) -> str:
    if not isinstance(v, Mapping):
        raise RenderError(f"{where}: expected {{First, Last}}, got {type(v).__name__}")
    if "First" not in v or "Last" not in v:
        raise RenderError(f"{where}: missing First or Last")
    first = _int(v["First"], 0, 65535, f"{where}.First")
    last = _int(v["Last"], 0, 65535, f"{where}.Last")
    if first > last:
        raise RenderError(f"{where}: bad port range {first}-{last}")
    return str(first) if first == last else f"{first}-{last}"


def _protos(v: object, where: str) -> list[int]:
    if v is None:
        return list(DEFAULT_PROTOS)
    if not isinstance(v, list):
        raise RenderError(f"{where}: expected a list of protocol numbers, got {type(v).__name__}")
    return [_int(p, 0, 255, f"{where}[{i}]") for i, p in enumerate(v)] or list(DEFAULT_PROTOS)


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
    table: str = TABLE,
    snat: bool = False,
    ssh_port: int | None = None,
) -> str:
    """The nft script; raises RenderError (and nothing else) for malformed rules, addresses or names."""
    _check_names(table, iface)
    if ssh_port is not None:
        _int(ssh_port, 1, 65535, "ssh port")
    if not isinstance(rules, (list, tuple)):
        raise RenderError(f"expected a list of FilterRules, got {type(rules).__name__}")
    body: list[str] = []
    counters: list[str] = []
    for i, rule in enumerate(rules):
        lines = _rule_lines(rule, f"rule {i}", ssh_port)
        if lines:
            counters.append(f"rule_{i}")
        for line in lines:  # a count-only twin just before each accept: what this rule let in (first packets)
            body += [line.removesuffix(" accept") + f" counter name rule_{i}", line]
    return _table(table, iface, own_addresses, [*_uniq(body), "counter name dropped drop"], snat, ssh_port,
                  counters)


def render_allow_all(iface: str, own_addresses: Iterable[str] = (), table: str = TABLE, snat: bool = False,
                     ssh_port: int | None = None) -> str:
    """An allow-all policy: every protocol from the tailnet passes, the always-on rules stay."""
    _check_names(table, iface)
    if ssh_port is not None:
        _int(ssh_port, 1, 65535, "ssh port")
    return _table(table, iface, own_addresses, ["accept"], snat, ssh_port)


def delete_script(table: str = TABLE) -> str:
    """Removes our table, whether or not it exists."""
    return f"table inet {table} {{}}\ndelete table inet {table}\n"


def _check_names(table: str, iface: str) -> None:
    if not isinstance(table, str) or not NAME.fullmatch(table):
        raise RenderError(f"bad table name {table!r}")
    if not isinstance(iface, str) or not IFNAME.fullmatch(iface):
        raise RenderError(f"bad interface name {iface!r}")


def _table(table: str, iface: str, own_addresses: Iterable[str], verdicts: list[str], snat: bool = False,
           ssh_port: int | None = None, counters: Sequence[str] = ()) -> str:
    self4: list[str] = []
    self6: list[str] = []
    for a in own_addresses:
        if not isinstance(a, str):
            raise RenderError(f"own address: expected a string, got {type(a).__name__}")
        ip = _address(a.split("/")[0], "own address")
        (self4 if ip.version == 4 else self6).append(str(ip))
    out = [
        f"table inet {table} {{}}",
        f"delete table inet {table}",
        f"table inet {table} {{",
        "\tcounter dropped {}",
        "\tcounter spoofed {}",
        *(f"\tcounter {c} {{}}" for c in counters),
    ]
    for fam, addrs in (("4", _uniq(self4)), ("6", _uniq(self6))):
        if addrs:
            kind = "ipv4_addr" if fam == "4" else "ipv6_addr"
            out.append(f"\tset self{fam} {{ type {kind}; elements = {{ {', '.join(addrs)} }} }}")
    for chain, hook in (("input", "input"), ("forward", "forward")):
        # Traffic a subnet router forwards from the tailnet is marked, so postrouting (where the input interface
        # is no longer known) masquerades exactly that traffic.
        mark = [f'\t\tiifname "{iface}" oifname != "{iface}" meta mark set meta mark & {MARK_KEEP} | {SUBNET_MARK}']
        out += [
            f"\tchain {chain} {{",
            f"\t\ttype filter hook {hook} priority filter; policy accept;",
            *(f'\t\tiifname != {{ "lo", "{iface}" }} {kw} saddr {net} counter name spoofed drop'
              for kw, net in TAILNET_SOURCES),
            *(mark if snat and chain == "forward" else []),
            *([f'\t\tiifname != "{iface}" tcp dport {ssh_port} counter name dropped drop']
              if ssh_port is not None and chain == "input" else []),
            f'\t\tiifname "{iface}" jump from_tailnet',
            "\t}",
        ]
    if snat:
        out += [
            "\tchain postrouting {",
            "\t\ttype nat hook postrouting priority srcnat; policy accept;",
            f"\t\tmeta mark & {MARK_MASK} == {SUBNET_MARK} masquerade",
            "\t}",
        ]
    if ssh_port is not None and (self4 or self6):
        out += ["\tchain ssh_redirect {", "\t\ttype nat hook prerouting priority dstnat; policy accept;",
                # dnat to the same address, not `redirect`: that picks the interface's first address, which may be
                # quad-100's (dropped in from_tailnet)
                *(f'\t\tiifname "{iface}" ip daddr {x} tcp dport 22 dnat ip to {x}:{ssh_port}' for x in _uniq(self4)),
                *(f'\t\tiifname "{iface}" ip6 daddr {x} tcp dport 22 dnat ip6 to [{x}]:{ssh_port}'
                  for x in _uniq(self6)),
                "\t}"]
    # quad-100 serves this node only, whatever the policy: no peer may use it as a forwarder or list names
    out += ["\tchain from_tailnet {", *(f"\t\t{kw} daddr {a} counter name dropped drop" for kw, a in QUAD100),
            "\t\tct state established,related accept"]
    if ssh_port is not None:  # the SSH listener only through the redirect of port 22
        out.append(f"\t\ttcp dport {ssh_port} ct original proto-dst != 22 counter name dropped drop")
    if self4:
        out.append("\t\tip saddr @self4 counter name dropped drop")
    if self6:
        out.append("\t\tip6 saddr @self6 counter name dropped drop")
    out += [f"\t\t{line}" for line in verdicts]
    out += ["\t}", "}"]
    return "\n".join(out) + "\n"


def _parse_rule(rule: object, where: str) -> tuple[_Addrs, list[_Dst], list[int]]:
    if not isinstance(rule, Mapping):
        raise RenderError(f"{where}: expected an object, got {type(rule).__name__}")
    if "SrcIPs" not in rule or "DstPorts" not in rule:
        raise RenderError(f"{where}: missing SrcIPs or DstPorts")
    src = _nets(rule["SrcIPs"], f"{where}.SrcIPs")
    dps = rule["DstPorts"]
    if not isinstance(dps, list):
        raise RenderError(f"{where}.DstPorts: expected a list, got {type(dps).__name__}")
    dsts: list[_Dst] = []
    for j, dp in enumerate(dps):
        at = f"{where}.DstPorts[{j}]"
        if not isinstance(dp, Mapping):
            raise RenderError(f"{at}: expected {{IP, Ports}}, got {type(dp).__name__}")
        if "IP" not in dp or "Ports" not in dp:
            raise RenderError(f"{at}: missing IP or Ports")
        ip = dp["IP"]
        if not isinstance(ip, str):
            raise RenderError(f"{at}.IP: expected an address string, got {type(ip).__name__}")
        dsts.append(_Dst(_nets([ip], f"{at}.IP"), _ports(dp["Ports"], f"{at}.Ports")))
    return src, dsts, _protos(rule.get("IPProto"), f"{where}.IPProto")


def _rule_lines(rule: object, where: str, ssh_port: int | None = None) -> list[str]:
    src_addrs, dsts, protos = _parse_rule(rule, where)
    if not (src_addrs.v4 or src_addrs.v6 or src_addrs.star):
        return []
    lines: list[str] = []
    for d in dsts:
        for fam, srcs, dst_list in (("4", src_addrs.v4, d.addrs.v4), ("6", src_addrs.v6, d.addrs.v6)):
            src = None if src_addrs.star else srcs
            if src is not None and not src:
                continue  # no source of this family
            targets: list[str | None] = [None] if d.addrs.star else list(dst_list)
            for dst in targets:
                m = _matches(fam, src, dst)
                icmp = "icmp" if fam == "4" else "icmpv6"
                for p in protos:
                    if p in PORT_PROTOS:
                        lines.append(f"{m} {PORT_PROTOS[p]} dport {d.ports} ct state new accept")
                        if p == 6 and ssh_port is not None and _has_port(d.ports, 22):
                            # port 22 arrives redirected to the SSH listener: the same sources may reach it
                            lines.append(f"{m} tcp dport {ssh_port} ct state new accept")
                    elif (p == 1 and fam == "4") or (p == 58 and fam == "6"):
                        lines.append(f"{m} meta l4proto {icmp} accept")
                    elif p not in (1, 58):
                        lines.append(f"{m} meta l4proto {p} accept")
                # Tailscale: ICMP echo to an address is allowed if any port there is allowed.
                lines.append(f"{m} {icmp} type echo-request accept")
    return lines


def _has_port(ports: str, port: int) -> bool:
    first, _, last = ports.partition("-")
    return int(first) <= port <= int(last or first)


class NftApplier:
    """Idempotent `set(script)` for our table through a Runner: a script equal to the one last applied is
    skipped. `applied` is what is in place (None: nothing of ours, or not known after a failure)."""

    def __init__(self, runner: Runner, table: str = TABLE) -> None:
        self.runner = runner
        self.table = table
        self.applied: str | None = None

    async def set(self, script: str) -> bool:
        """Applies `script` (`nft -f -` is all or nothing); returns whether anything ran. Raises
        CommandError when nft fails, and then what was in place before stays."""
        if script == self.applied:
            return False
        await self.runner.run(["nft", "-f", "-"], input=script.encode())
        self.applied = script
        return True

    async def clear(self) -> None:
        if self.applied is not None:
            await self.runner.run(["nft", "-f", "-"], input=delete_script(self.table).encode(), check=False)
            self.applied = None
