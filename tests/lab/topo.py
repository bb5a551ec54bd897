"""Topology descriptions for the lab, and presets.

A topology is a set of LANs behind routers, plus nodes sitting directly on the "internet" namespace:

    Topology.parse("lan1: easy n1 n2; lan2: hard n3; public: n4")

LAN kinds: `none` (a plain router, no NAT, no firewall), `easy` (nftables `masquerade`: the source port is
kept, one mapping for every destination) and `hard` (`masquerade random,fully-random`: a new port per
destination).
Every NAT router drops unsolicited inbound traffic like a home router (input policy drop; accept loopback,
established/related and the LAN side).

Addressing (documentation ranges only): the internet is 203.0.113.0/24 (servers on .1 and .2, routers' WAN
side and public nodes from .10 up); LAN i is 192.0.2.(64 i)/26 for i < 4, then 198.51.100.(64 (i-4))/26, with
the router on .1 of its LAN and nodes from .10 up.
"""

from __future__ import annotations

import ipaddress
import re
from dataclasses import dataclass
from typing import Literal

Nat = Literal["none", "easy", "hard"]
NAME = re.compile(r"^[a-z][a-z0-9]{0,6}$")  # short: interface names embed it under the 15-char limit
MAX_LANS = 8
SERVERS = ("203.0.113.1", "203.0.113.2")


@dataclass(frozen=True)
class Lan:
    name: str
    nodes: tuple[str, ...]
    nat: Nat = "none"


@dataclass(frozen=True)
class Topology:
    lans: tuple[Lan, ...] = ()
    public: tuple[str, ...] = ()  # nodes with an internet address of their own

    def __post_init__(self) -> None:
        names = [*self.nodes(), *(lan.name for lan in self.lans)]
        for n in names:
            if not NAME.match(n) or n in ("inet",):
                raise ValueError(f"lab name {n!r}: 1-7 lowercase letters/digits, starting with a letter")
        if len(set(names)) != len(names):
            raise ValueError("lab names (nodes and LANs) must be unique")
        if len(self.lans) > MAX_LANS:
            raise ValueError(f"at most {MAX_LANS} LANs")
        for lan in self.lans:
            if lan.nat not in ("none", "easy", "hard"):
                raise ValueError(f"LAN {lan.name}: NAT kind {lan.nat!r} is not none, easy or hard")
            if len(lan.nodes) > 50:
                raise ValueError(f"LAN {lan.name}: at most 50 nodes")
        if len(self.public) + len(self.lans) > 200:
            raise ValueError("too many internet hosts")

    @classmethod
    def parse(cls, text: str) -> Topology:
        lans: list[Lan] = []
        public: tuple[str, ...] = ()
        for part in filter(None, (p.strip() for p in text.split(";"))):
            name, sep, rest = part.partition(":")
            if not sep:
                raise ValueError(f"topology part {part!r} is not 'name: [kind] nodes...'")
            words = rest.split()
            if name.strip() == "public":
                public = tuple(words)
                continue
            nat: Nat = "none"
            if words and words[0] in ("none", "easy", "hard"):
                nat = words.pop(0)  # type: ignore[assignment]
            lans.append(Lan(name.strip(), tuple(words), nat))
        return cls(tuple(lans), public)

    def nodes(self) -> tuple[str, ...]:
        return tuple(n for lan in self.lans for n in lan.nodes) + self.public


def lan_net(index: int) -> ipaddress.IPv4Network:
    base = ipaddress.IPv4Address("192.0.2.0" if index < 4 else "198.51.100.0")
    return ipaddress.IPv4Network(f"{base + 64 * (index % 4)}/26")


def internet_addr(index: int) -> str:
    return str(ipaddress.ip_address("203.0.113.10") + index)


def one_lan(n: int = 3, nat: Nat = "none") -> Topology:
    return Topology((Lan("lan", tuple(f"n{i}" for i in range(1, n + 1)), nat),))


def easy_nat_pair() -> Topology:
    return Topology((Lan("lana", ("a",), "easy"), Lan("lanb", ("b",), "easy")))


def hard_nat_pair() -> Topology:
    return Topology((Lan("lana", ("a",), "hard"), Lan("lanb", ("b",), "hard")))


def mixed(easy: int = 1, hard: int = 1, public: int = 1, plain: int = 0) -> Topology:
    """One node behind each of `easy` easy NATs, `hard` hard NATs and `plain` routers, plus public nodes."""
    lans = [Lan(f"e{i}", (f"ne{i}",), "easy") for i in range(easy)]
    lans += [Lan(f"h{i}", (f"nh{i}",), "hard") for i in range(hard)]
    lans += [Lan(f"p{i}", (f"np{i}",), "none") for i in range(plain)]
    return Topology(tuple(lans), tuple(f"pub{i}" for i in range(public)))
