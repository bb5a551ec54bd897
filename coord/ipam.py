"""Address allocation: one IPv4 from the tailnet prefix and the IPv6 with the same offset in the ULA prefix."""

from __future__ import annotations

import ipaddress
from collections.abc import Container
from dataclasses import dataclass

# Tailscale's quad-100 service range and ChromeOS's VM range are never handed out.
RESERVED_V4 = (ipaddress.ip_network("100.100.100.0/24"), ipaddress.ip_network("100.115.92.0/23"))
RESERVED_V6_HOSTS = (ipaddress.ip_address("fd7a:115c:a1e0::53"),)


class PoolExhausted(Exception):
    pass


@dataclass(frozen=True)
class Pool:
    v4: ipaddress.IPv4Network
    v6: ipaddress.IPv6Network

    @classmethod
    def parse(cls, v4: str, v6: str) -> Pool:
        n4, n6 = ipaddress.ip_network(v4), ipaddress.ip_network(v6)
        if not isinstance(n4, ipaddress.IPv4Network) or not isinstance(n6, ipaddress.IPv6Network):
            raise ValueError("prefixes must be one IPv4 and one IPv6 network")
        return cls(n4, n6)

    @property
    def size(self) -> int:
        return min(self.v4.num_addresses, self.v6.num_addresses)

    def usable(self, index: int) -> bool:
        v4 = self.v4.network_address + index
        if index <= 0 or index >= self.v4.num_addresses - 1:
            return False
        # .0 and .255 octets trip up some stacks; skip them as Tailscale does.
        if int(v4) & 0xFF in (0, 255):
            return False
        if any(v4 in r for r in RESERVED_V4):
            return False
        return self.v6.network_address + index not in RESERVED_V6_HOSTS

    def index_of(self, v4: str) -> int:
        return int(ipaddress.IPv4Address(v4)) - int(self.v4.network_address)

    def addresses(self, index: int) -> tuple[str, str]:
        return str(self.v4.network_address + index), str(self.v6.network_address + index)

    def allocate(self, used_v4: Container[str], hint: int) -> tuple[int, str, str]:
        """The first usable free index at or after ``hint``, wrapping once; returns (index, v4, v6)."""
        limit = min(self.size, 1 << 24)
        start = hint if 0 < hint < limit else 1
        for i in range(limit):
            index = (start + i) % limit
            if self.usable(index):
                v4, v6 = self.addresses(index)
                if v4 not in used_v4:
                    return index, v4, v6
        raise PoolExhausted(f"no free address left in {self.v4}")
