"""MagicDNS on a node: the resolver (node/dns/server.py) and the OS side (node/dns/osconf.py), driven by the
agent with each netmap (`apply`), stopped with the tunnel (`stop`), read by `shoal dns status|query`.

- The resolver runs whenever the tunnel is up and DNS is enabled in the agent's config (`shoald` enables it;
  unit tests do not), on quad-100 port 53. Each netmap rebuilds the name table; the answer cache goes with it.
- The OS side is systemd-resolved over D-Bus (node/dns/resolved.py) when it owns resolv.conf, else resolv.conf
  is rewritten (node/dns/osconf.py); either is given back on `down`, stop, or `--accept-dns=false`.
- The OS points at it only when the prefs accept DNS (`shoal up --accept-dns=false` leaves the OS alone) and
  `resolv_conf` is set. The host's original nameservers (from the backup) are the upstreams of last resort.
- At start a backup left by a crashed agent is put back before anything else (`recover`).
"""

from __future__ import annotations

import logging
import socket
import time
from pathlib import Path
from typing import Any

from dnslib import QTYPE, RCODE, DNSRecord

from coord import wire
from node.dns.answer import Answerer
from node.dns.osconf import ResolvConf, nameservers
from node.dns.resolved import LinkConfig, Resolved, mode_of
from node.dns.server import TIMEOUT, DNSServer
from node.dns.table import QUAD100, Table

log = logging.getLogger("shoald.dns")


class MagicDNS:
    def __init__(self, enabled: bool, resolv_conf: Path | None, backup: Path, port: int = 53,
                 addrs: tuple[str, ...] = QUAD100, timeout: float = TIMEOUT, iface: str = "",
                 resolved_bus: str | None = None, fwmark: int = 0) -> None:
        self.enabled = enabled
        self.fwmark = fwmark  # on the forwarder's upstream sockets (node/sockmark.py)
        self.port = port
        self.addrs = addrs
        self.timeout = timeout
        self.answerer = Answerer()
        self.server: DNSServer | None = None
        self.resolv = ResolvConf(resolv_conf, backup) if resolv_conf is not None else None
        self.os_mode = "off"
        self.error = ""
        self.iface = iface
        self.resolved = Resolved(resolved_bus)
        self.resolved_link = 0  # the ifindex resolved was told about (0: none)

    def recover(self) -> bool:
        """A backup left by an agent that died goes back now (the OS must not point at a dead resolver)."""
        if self.resolv is not None and self.resolv.backup.exists():
            self.resolv.restore()
            log.warning("dns: restored %s from the backup a previous run left", self.resolv.path)
            return True
        return False

    def host_resolvers(self) -> list[str]:
        return nameservers(self.resolv.original()) if self.resolv is not None else []

    async def apply(self, node: wire.Node | None, peers: list[wire.Node], dns: wire.DNSConfig | None,
                    accept_dns: bool) -> str:
        """Brings resolver and OS in line with the netmap; returns what failed ("" when nothing)."""
        if not self.enabled:
            return ""
        errors = []
        table = Table.build(node, peers, dns, self.host_resolvers())
        if table != self.answerer.table:
            self.answerer.set_table(table)
        if self.server is None:
            self.server = DNSServer(self.answerer, self.addrs, self.port, self.timeout, self.fwmark)
            await self.server.start()
        if self.server.errors:
            errors.append("; ".join(f"listen {k}: {v}" for k, v in self.server.errors.items()))
        if self.resolv is not None:
            try:
                resolved = not self.resolv.backup.exists() and mode_of(self.resolv.path) == "systemd-resolved"
                if accept_dns and self.server.listening and resolved:
                    await self._set_resolved(table)
                elif accept_dns and self.server.listening:
                    if self.resolv.set([self.addrs[0]], table.search):
                        log.info("dns: %s points at %s", self.resolv.path, self.addrs[0])
                    self.os_mode = "direct"
                else:
                    await self._give_back()
            except Exception as e:  # OSError, D-Bus errors: the resolver still answers; status says why
                errors.append(f"{self.os_mode if self.os_mode != 'off' else 'os'}: {e}")
        self.error = "; ".join(errors)
        return self.error

    async def _set_resolved(self, table: Table) -> None:
        ifindex = socket.if_nametoindex(self.iface)
        split = [s for s, _ in table.routes]
        cfg = LinkConfig.build(ifindex, self.addrs, table.search, table.local_zones, split, table.capture_all)
        self.os_mode = "systemd-resolved"
        if await self.resolved.set(cfg):
            log.info("dns: systemd-resolved sends %s to %s on link %d", ", ".join(cfg.routing) or "nothing",
                     self.addrs[0], ifindex)
        self.resolved_link = ifindex

    async def _give_back(self) -> None:
        if self.resolved_link:
            link, self.resolved_link = self.resolved_link, 0
            await self.resolved.revert(link)
        if self.resolv is not None and self.resolv.restore():
            log.info("dns: %s restored", self.resolv.path)
        self.os_mode = "off"

    async def stop(self) -> list[str]:
        failed = []
        if self.server is not None:
            await self.server.close()
            self.server = None
        try:
            await self._give_back()
        except Exception as e:
            failed.append(f"dns: {e}")
        self.os_mode = "off"
        return failed

    def status(self, accept_dns: bool) -> dict[str, Any]:
        t = self.answerer.table
        srv = self.server
        return {
            "Enabled": self.enabled,
            "Running": srv is not None and bool(srv.listening),
            "Listening": list(srv.listening) if srv is not None else [],
            "AcceptDNS": accept_dns,
            "OSConfig": self.os_mode,
            "ResolvConf": str(self.resolv.path) if self.resolv is not None else "",
            "Names": {n: [*v4, *v6] for n, (v4, v6) in sorted(t.hosts.items())},
            "Search": list(t.search),
            "LocalZones": [z for z in t.local_zones if not z.endswith(".in-addr.arpa.")],
            "Routes": {s: [f"{h}:{p}" for h, p in ups] for s, ups in t.routes},
            "Upstreams": [f"{h}:{p}" for h, p in t.upstreams],
            "Skipped": t.skipped,
            "Queries": srv.queries if srv is not None else 0,
            "CacheHits": self.answerer.hits,
            "Forwarded": self.answerer.forwarded,
            "ServFail": srv.failed if srv is not None else 0,
            "Error": self.error,
        }

    async def query(self, name: str, qtype: str) -> dict[str, Any]:
        """One query through the resolver's own path (as over TCP: no truncation)."""
        try:
            q = DNSRecord.question(name, qtype.upper())
        except Exception as e:
            raise ValueError(f"cannot make a query for {name!r} {qtype!r}: {e}") from None
        srv = self.server or DNSServer(self.answerer, (), self.port, self.timeout)
        t0 = time.monotonic()
        out = await srv.resolve(bytes(q.pack()), udp=False)
        took = time.monotonic() - t0
        if out is None:
            raise ValueError("the resolver dropped the query")
        r = DNSRecord.parse(out)
        return {
            "Name": str(q.q.qname), "Type": QTYPE.get(q.q.qtype), "Rcode": RCODE.get(r.header.rcode),
            "Authoritative": bool(r.header.aa), "Answers": [str(rr) for rr in r.rr], "Millis": round(took * 1000, 2),
        }
