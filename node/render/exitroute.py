"""Policy routing for an exit node (table 52 and its ip rules) as `ip` commands: sans-IO renderer, applier.

With an exit node chosen (`shoal up --exit-node NAME|IP`) everything this host sends goes into the tunnel,
except the agent's own traffic, which carries the bypass mark (node/sockmark.py). The rules are Tailscale's
(ts:wgengine/router/osrouter/router_linux.go), for IPv4 and IPv6 alike:

    5210  fwmark 0x80000/0xff0000 lookup main         the agent's own sockets: the normal routing
    5230  fwmark 0x80000/0xff0000 lookup default
    5250  fwmark 0x80000/0xff0000 unreachable         ... and never the tunnel, even without a main route
    5270  lookup 52                                   everything else: table 52

Table 52 holds `default dev <tailnet interface>`, an `unreachable default metric 4096` under it (should the
interface go, a wireguard-go restart, traffic stops instead of falling through to the main table's gateway),
and with `--exit-node-allow-lan-access` one `throw` route per directly connected LAN prefix, so those go back
to the main table. When the chosen exit node is offline or gone from the netmap the table stays: WireGuard has
no peer for 0.0.0.0/0 and drops the packets, so nothing leaves through the local gateway until the user
clears the exit node (`shoal up --exit-node=`), which removes rules and table.

Strict reverse-path filtering (rp_filter=1) would drop the replies to the agent's marked traffic: a reply from
the control server arrives on the LAN interface, but without the mark the reverse lookup goes through rule 5270
to table 52 and says the source lives behind the tailnet interface. So, as wg-quick and Tailscale do, while an
exit node is chosen a small nftables table `inet shoal_exit` copies the bypass bit from an outgoing packet into
its connection's mark and back onto the packets of the reply direction, and `net.ipv4.conf.all.src_valid_mark=1`
makes the reverse lookup honour it (rule 5210: the main table, the right interface). The table goes with the exit
node; src_valid_mark stays (it only makes the kernel use marks it would otherwise ignore). IPv6 has no rp_filter
sysctl.

Current state is read from `ip -j [-6] rule show` and `ip -j [-6] route show table 52`; we own the rules at
the four priorities above and every route in table 52. `render` returns only the commands that close the gap.
"""

from __future__ import annotations

import ipaddress
import json
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from node.errors import LocalError
from node.sockmark import BYPASS_MARK, MARK_MASK

if TYPE_CHECKING:
    from node.run import Runner

TABLE = "52"
PRIORITIES = (5210, 5230, 5250, 5270)
UNREACHABLE_METRIC = 4096
FAMILIES = ("-4", "-6")


RP_TABLE = "shoal_exit"
SRC_VALID_MARK = ["sysctl", "-w", "net.ipv4.conf.all.src_valid_mark=1"]


def rp_script(mark: int = BYPASS_MARK) -> str:
    """The connmark save/restore table, replaced whole (idempotent)."""
    m, k = f"{mark:#x}", f"{MARK_MASK:#x}"
    return (
        f"table inet {RP_TABLE} {{}}\n"
        f"delete table inet {RP_TABLE}\n"
        f"table inet {RP_TABLE} {{\n"
        "\tchain output {\n"
        "\t\ttype filter hook output priority mangle; policy accept;\n"
        f"\t\tmeta mark & {k} == {m} ct mark set ct mark | {m}\n"
        "\t}\n"
        "\tchain prerouting {\n"
        "\t\ttype filter hook prerouting priority mangle; policy accept;\n"
        f"\t\tct mark & {k} == {m} meta mark set meta mark | {m}\n"
        "\t}\n"
        "}\n"
    )


RP_DELETE = ["nft", "delete", "table", "inet", RP_TABLE]


class ExitRouteError(LocalError, ValueError):
    """`ip -j` output we cannot read."""


@dataclass(frozen=True, slots=True)
class ExitConfig:
    iface: str
    on: bool = False  # an exit node is chosen (whether or not it is reachable now)
    throw: tuple[str, ...] = ()  # LAN prefixes kept out of the tunnel (--exit-node-allow-lan-access)
    mark: int = BYPASS_MARK

    def __post_init__(self) -> None:
        if not 1 <= len(self.iface) <= 15 or "/" in self.iface or " " in self.iface:
            raise ValueError(f"bad interface name {self.iface!r}")
        nets = {ipaddress.ip_network(t, strict=False) for t in self.throw}
        object.__setattr__(self, "throw", tuple(str(n) for n in sorted(nets, key=lambda n: (n.version, n))))


@dataclass(frozen=True, slots=True)
class ExitState:
    rules: frozenset[tuple[str, str]]  # (family, rule as `ip rule add` arguments after the family)
    routes: frozenset[tuple[str, str]]  # (family, route as `ip route add` arguments without `table 52`)


def _fam(net: str) -> str:
    return "-6" if ":" in net else "-4"


def wanted(cfg: ExitConfig) -> ExitState:
    if not cfg.on:
        return ExitState(frozenset(), frozenset())
    m = f"{cfg.mark:#x}/{MARK_MASK:#x}"
    rules = set()
    routes = set()
    for fam in FAMILIES:
        rules |= {(fam, f"priority 5210 fwmark {m} table main"), (fam, f"priority 5230 fwmark {m} table default"),
                  (fam, f"priority 5250 fwmark {m} unreachable"), (fam, f"priority 5270 table {TABLE}")}
        routes |= {(fam, f"default dev {cfg.iface}"), (fam, f"unreachable default metric {UNREACHABLE_METRIC}")}
    routes |= {(_fam(t), f"throw {t}") for t in cfg.throw}
    return ExitState(frozenset(rules), frozenset(routes))


def _order(item: tuple[str, str]) -> tuple[str, str]:
    return item


def render(cfg: ExitConfig, cur: ExitState) -> list[list[str]]:
    """Routes before rules when turning on (the rule must never point at an empty table), rules first when
    turning off; stale entries out before new ones in."""
    want = wanted(cfg)
    del_rules = [["ip", f, "rule", "del", *r.split()] for f, r in sorted(cur.rules - want.rules, key=_order)]
    add_rules = [["ip", f, "rule", "add", *r.split()] for f, r in sorted(want.rules - cur.rules, key=_order)]
    del_routes = [["ip", f, "route", "del", *r.split(), "table", TABLE]
                  for f, r in sorted(cur.routes - want.routes, key=_order)]
    add_routes = [["ip", f, "route", "add", *r.split(), "table", TABLE]
                  for f, r in sorted(want.routes - cur.routes, key=_order)]
    if cfg.on:
        return add_routes + del_routes + del_rules + add_rules
    return del_rules + del_routes


def _json(text: str, what: str) -> list[dict[str, Any]]:
    try:
        data = json.loads(text or "[]")
    except json.JSONDecodeError as e:
        raise ExitRouteError(f"cannot parse {what}: {e}") from None
    if not isinstance(data, list) or not all(isinstance(x, dict) for x in data):
        raise ExitRouteError(f"{what} is not a list of objects")
    return data


def parse_rules(text: str, fam: str) -> set[tuple[str, str]]:
    """Our rules (by priority) from `ip -j rule show`, spelled as `wanted` spells them."""
    out = set()
    for r in _json(text, "ip -j rule"):
        prio = r.get("priority")
        if prio not in PRIORITIES:
            continue
        parts = [f"priority {prio}"]
        mark = r.get("fwmark")
        if isinstance(mark, str):  # iproute2 gives {"fwmark": "0x80000", "fwmask": "0xff0000"}
            val, _, mask = mark.partition("/")
            mask = str(r.get("fwmask") or mask or "0xffffffff")
            try:
                parts.append(f"fwmark {int(val, 16):#x}/{int(mask, 16):#x}")
            except ValueError:
                raise ExitRouteError(f"ip -j rule: bad fwmark {mark!r:.40}") from None
        action = r.get("action")
        if action in ("unreachable", "blackhole", "prohibit"):
            parts.append(str(action))
        else:
            parts.append(f"table {r.get('table', 'main')}")
        out.add((fam, " ".join(parts)))
    return out


def parse_routes(text: str, fam: str) -> set[tuple[str, str]]:
    out = set()
    for r in _json(text, "ip -j route show table 52"):
        dst = r.get("dst")
        if not isinstance(dst, str):
            raise ExitRouteError(f"ip -j route: entry without dst {r!r:.80}")
        kind = r.get("type", "unicast")
        if kind == "unicast" and isinstance(r.get("dev"), str):
            out.add((fam, f"{dst} dev {r['dev']}"))
        elif kind == "unreachable" and isinstance(r.get("metric"), int):
            out.add((fam, f"unreachable {dst} metric {r['metric']}"))
        else:
            out.add((fam, f"{kind} {dst}"))
    return out


class ExitRouteApplier:
    """Idempotent `set(cfg)` for the rules and table 52, through a Runner."""

    name = "exit"

    def __init__(self, runner: Runner) -> None:
        self.runner = runner
        self.iface = ""
        # What we last put in place; off at start. The prefs that turned it on are saved, so an agent restarted
        # after a crash turns it on again, and clearing the exit node later removes what is there.
        self.applied: ExitConfig | None = None
        self.rp = False  # the shoal_exit table is in place (made once per turning on)

    async def read(self) -> ExitState:
        rules: set[tuple[str, str]] = set()
        routes: set[tuple[str, str]] = set()
        for fam in FAMILIES:
            r = await self.runner.run(["ip", "-j", fam, "rule", "show"])
            rules |= parse_rules(r.out, fam)
            t = await self.runner.run(["ip", "-j", fam, "route", "show", "table", TABLE], check=False)
            if t.rc == 0:  # an empty table may not exist yet
                routes |= parse_routes(t.out, fam)
        return ExitState(frozenset(rules), frozenset(routes))

    async def set(self, cfg: ExitConfig) -> None:
        """Reads and closes the gap while an exit node is chosen (the interface's `default dev` route goes
        with a restarted engine, so it is checked each time); nothing while it stays off. The first call always
        reads: rules and routes left by an agent that crashed with an exit node in use go, once the exit node is
        cleared in the prefs, at the next start."""
        if not cfg.on and self.applied is not None and not self.applied.on:
            self.applied = cfg
            return
        self.iface = cfg.iface
        # on (or turning off) until it is all gone: a failure half-way is retried, and `clear` cleans up
        self.applied = cfg if cfg.on else self.applied
        cur = await self.read()
        for argv in render(cfg, cur):
            await self.runner.run(argv)
        if cfg.on and not self.rp:
            await self.runner.run(SRC_VALID_MARK, check=False)
            await self.runner.run(["nft", "-f", "-"], input=rp_script(cfg.mark).encode())
            self.rp = True
        elif not cfg.on and (self.rp or cur.rules or cur.routes):
            await self.runner.run(RP_DELETE, check=False)  # absent when it was never made
            self.rp = False
        self.applied = cfg

    async def clear(self) -> None:
        was, self.applied = self.applied, None
        if was is None or not was.on:
            return
        for argv in render(ExitConfig(self.iface), await self.read()):
            await self.runner.run(argv, check=False)
        await self.runner.run(RP_DELETE, check=False)
        self.rp = False
