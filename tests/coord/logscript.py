"""Random tailnet histories for the event-log tests: one command language, run purely or through a real Service.

Every byte a command needs (machine, node and disco keys) is drawn by hypothesis, so a failing example replays
exactly. The language covers what the log must fold and project: users created, renamed and deleted; keys; nodes
registered (with advertised routes), re-authenticated, renamed, tagged, routes approved and unapproved, updated
(endpoints with their types, home relay, hostinfo with routes, disco keys), connected, disconnected, expired, logged
out, deleted; several policies set and cleared (one with autoApprovers); DNS settings set, extra records added and
removed, config seeds and records-file loads (a bad file among them); and a clock that may step back.
"""

from __future__ import annotations

import contextlib
import hashlib
from dataclasses import dataclass, field
from typing import Any

from hypothesis import strategies as st

from coord import decide, dns, wire
from coord import events as ev
from coord.errors import DomainError
from coord.state import State, apply
from tests.coord.util import DAY, POOL

USERS = ("alice@example.com", "bob@example.com", "carol@example.com", "dave")
POLICIES = (
    """{"tagOwners": {"tag:srv": ["alice@example.com"], "tag:db": ["alice@example.com"]},
        "acls": [{"action": "accept", "src": ["alice@example.com"], "dst": ["tag:srv:22"]},
                 {"action": "accept", "src": ["tag:srv"], "dst": ["tag:db:5432"]}]}""",
    """{"tagOwners": {"tag:srv": ["alice@example.com", "bob@example.com"]},
        "acls": [{"action": "accept", "src": ["*"], "dst": ["tag:srv:*"]}]}""",
    """{"acls": [{"action": "accept", "src": ["*"], "dst": ["*:*"]}]}""",
    """{"tagOwners": {"tag:srv": ["alice@example.com"]},
        "autoApprovers": {"routes": {"10.0.0.0/8": ["alice@example.com", "tag:srv"]}, "exitNode": ["tag:srv"]},
        "acls": [{"action": "accept", "src": ["*"], "dst": ["*:*"]}]}""",
)
TAG_SETS = ((), ("tag:srv",), ("tag:db",), ("tag:db", "tag:srv"))
HOSTS = ("laptop", "Laptop.local", "db", "srv", "")
ROUTES = ((), ("10.1.0.0/16",), ("10.1.0.0/16", "192.168.7.0/24"), ("0.0.0.0/0", "::/0"))
ENDPOINTS = ((), ("192.0.2.1:41641",), ("192.0.2.2:41641", "[2001:db8::1]:41641"))
# Tailscale's endpoint types: 1 local, 2 STUN, 3 port-mapped, 4 STUN4LocalPort
ENDPOINT_TYPES = ((), (1,), (2,), (1, 2), (2, 3), (4, 1))
NAMES = ("web", "db", "laptop", "x-1")
# DNS: upstream lists, split routes (an empty list removes the suffix), search domains, records, config seeds and
# versions of the watched records file (the last one is not a records file: refused, nothing logged)
DNS_NAMESERVERS = (None, [], ["1.1.1.1"], ["192.0.2.53", "[2001:db8::53]:5353"])
DNS_SPLITS = (None, {"corp.example": ["192.0.2.53"]}, {"corp.example": []}, {"lab.example": ["192.0.2.1:53"]})
# Base domains at run time: back to the config's, another, and one that holds a split suffix (refused then).
DNS_BASES = ("corp.internal", "shoal.internal", "corp.example")
DNS_SEARCH = (None, [], ["corp.example"], ["a.example", "b.example"])
DNS_RECORDS = (("grafana.example.com", "A", "100.64.0.9"), ("grafana.example.com", "AAAA", "fd7a:115c:a1e0::9"),
               ("db.corp.example", "A", "192.0.2.7"))
DNS_SEEDS = (
    dns.DnsSettings(),
    dns.DnsSettings(nameservers=("9.9.9.9",), search_domains=("corp.example",)),
    dns.DnsSettings(magic_dns=False, extra_records=(("seed.example.com", "A", "100.64.0.42"),)),
)
DNS_FILES = (
    "[]",
    '[{"Name": "file.example.com", "Type": "A", "Value": "100.64.0.50"}]',
    '[{"name": "file.example.com", "type": "AAAA", "value": "fd7a:115c:a1e0::50"}, '
    '{"Name": "other.example.com", "Value": "100.64.0.51"}]',
    '[{"Name": "bad", "Type": "MX", "Value": "x"}]',
)

key32 = st.binary(min_size=32, max_size=32)


def ops() -> st.SearchStrategy[tuple[Any, ...]]:
    node = st.integers(0, 7)
    user = st.integers(0, len(USERS) - 1)
    return st.one_of(
        st.tuples(st.just("user_create"), user),
        st.tuples(st.just("user_rename"), user, user),
        st.tuples(st.just("user_delete"), user),
        st.tuples(st.just("register"), user, st.sampled_from(TAG_SETS), st.sampled_from(HOSTS),
                  st.sampled_from(ROUTES), key32, key32, key32, st.booleans()),
        st.tuples(st.just("register"), user, st.just(()), st.sampled_from(HOSTS), st.just(()), key32, key32,
                  key32, st.just(False)),
        st.tuples(st.just("reauth"), node, user, st.sampled_from(TAG_SETS), key32),
        st.tuples(st.just("update"), node, st.integers(0, len(ENDPOINTS) - 1),
                  st.integers(0, len(ENDPOINT_TYPES) - 1), st.integers(0, 3),
                  st.one_of(st.none(), st.sampled_from(HOSTS)), st.sampled_from(ROUTES),
                  st.one_of(st.none(), key32)),
        st.tuples(st.just("rename"), node, st.sampled_from(NAMES)),
        st.tuples(st.just("tag"), node, st.sampled_from(TAG_SETS)),
        st.tuples(st.just("approve"), node, st.sampled_from(ROUTES[1:])),
        st.tuples(st.just("unapprove"), node, st.sampled_from(ROUTES[1:])),
        st.tuples(st.just("connect"), node),
        st.tuples(st.just("disconnect"), node),
        st.tuples(st.just("expire"), node),
        st.tuples(st.just("expiry"), node, st.one_of(st.none(), st.just(1.0), st.just(400 * DAY))),
        st.tuples(st.just("sweep"),),
        st.tuples(st.just("logout"), node),
        st.tuples(st.just("delete"), node),
        st.tuples(st.just("policy"), st.integers(-1, len(POLICIES) - 1)),
        st.tuples(st.just("policy"), st.integers(-1, len(POLICIES) - 1)),
        st.tuples(st.just("dns_set"), st.one_of(st.none(), st.booleans()), st.integers(0, len(DNS_NAMESERVERS) - 1),
                  st.integers(0, len(DNS_SPLITS) - 1), st.integers(0, len(DNS_SEARCH) - 1),
                  st.one_of(st.none(), st.booleans())),
        st.tuples(st.just("dns_record_add"), st.integers(0, len(DNS_RECORDS) - 1)),
        st.tuples(st.just("dns_record_remove"), st.integers(0, len(DNS_RECORDS) - 1), st.booleans()),
        st.tuples(st.just("dns_seed"), st.integers(0, len(DNS_SEEDS) - 1)),
        st.tuples(st.just("dns_file"), st.integers(0, len(DNS_FILES) - 1)),
        # the clock: forward a little or a lot, or a step back (NTP, a VM restored from a snapshot)
        st.tuples(st.just("clock"), st.sampled_from((0.000001, 0.5, 3.0, 2 * DAY, -0.5, -30.0, -3 * DAY))),
    )


def scripts(min_size: int = 5, max_size: int = 60) -> st.SearchStrategy[list[tuple[Any, ...]]]:
    return st.lists(ops(), min_size=min_size, max_size=max_size)


def policy_sha(text: str) -> str:
    return hashlib.sha256(text.encode()).hexdigest() if text else ""


@dataclass
class PureLog:
    """The service's write path without a database: decide, seal with a monotonic time, fold."""

    state: State = field(default_factory=State)
    wall: float = 1_800_000_000.0
    records: list[ev.Record] = field(default_factory=list)
    machines: dict[int, bytes] = field(default_factory=dict)

    def __post_init__(self) -> None:
        self.rules = decide.Rules(POOL, 30 * DAY)

    def time_text(self) -> str:
        t = ev.rfc3339(self.wall)
        if self.records and t < self.records[-1].time:
            t = self.records[-1].time
        return t

    def run(self, events: list[ev.Event], actor: str = "test") -> None:
        t = self.time_text()
        for e in events:
            r = ev.seal_record(self.state.last_hash, self.state.last_seq + 1, t, actor, e)
            apply(self.state, e, r.ts)
            self.state.last_seq, self.state.last_hash, self.state.last_time = r.seq, r.hash, r.time
            self.records.append(r)

    def decide(self, fn: Any) -> None:
        with contextlib.suppress(DomainError):
            self.run(fn(self.state))

    def step(self, op: tuple[Any, ...]) -> None:
        kind = op[0]
        s = self.state
        ids = sorted(s.nodes)
        nid = ids[op[1] % len(ids)] if ids and isinstance(op[1] if len(op) > 1 else None, int) else None
        if kind == "user_create":
            self.decide(lambda s: decide.create_user(s, USERS[op[1]]))
        elif kind == "user_rename":
            self.decide(lambda s: decide.rename_user(s, USERS[op[1]], USERS[op[2]]))
        elif kind == "user_delete":
            self.decide(lambda s: decide.delete_user(s, USERS[op[1]]))
        elif kind == "register":
            u = s.user_by_name(USERS[op[1]])
            if u is None:
                return
            req = wire.RegisterRequest(
                node_key=op[6], disco_key=op[7],
                hostinfo=wire.Hostinfo(hostname=op[3], routable_ips=op[4]), ephemeral=op[8],
            )
            owner = decide.Owner(u, op[2], False, None)
            before = set(s.nodes)
            self.decide(lambda s: decide.register(s, op[5], req, owner, self.rules, self.wall))
            for n in set(s.nodes) - before:
                self.machines[n] = op[5]
        elif kind == "policy":
            text = "" if op[1] < 0 else POLICIES[op[1]]
            if (text or None) != s.policy_text:
                self.run([ev.PolicySet(text, policy_sha(text))])
        elif kind == "clock":
            self.wall += op[1]
        elif kind == "sweep":
            self.wall += 2
            self.decide(lambda s: decide.expire_due(s, self.wall))
        elif kind.startswith("dns_"):
            self.decide(lambda s: dns_events(s, op))
        elif nid is None:
            return
        elif kind == "reauth":
            u = s.user_by_name(USERS[op[2]])
            if u is None:
                return
            req = wire.RegisterRequest(node_key=op[4], hostinfo=wire.Hostinfo(hostname="re"))
            owner = decide.Owner(u, op[3], False, None)
            self.decide(lambda s: decide.register(s, self.machines[nid], req, owner, self.rules, self.wall))
        elif kind == "update":
            n = s.nodes[nid]
            host = op[5]
            self.decide(lambda s: decide.map_update(
                s, n, disco_key=op[7], endpoints=ENDPOINTS[op[2]], endpoint_types=ENDPOINT_TYPES[op[3]],
                home_derp=op[4], hostname=host, os="linux" if host is not None else None,
                routes=op[6] if host is not None else None,
            ))
        elif kind == "rename":
            self.decide(lambda s: decide.rename_node(s, str(nid), op[2]))
        elif kind == "tag":
            self.decide(lambda s: decide.tag_node(s, str(nid), op[2]))
        elif kind == "approve":
            self.decide(lambda s: decide.approve_routes(s, str(nid), op[2]))
        elif kind == "unapprove":
            self.decide(lambda s: decide.unapprove_routes(s, str(nid), op[2]))
        elif kind == "connect":
            if not s.nodes[nid].online and not s.nodes[nid].logged_out:
                self.run([ev.NodeConnected(nid)])
        elif kind == "disconnect":
            if s.nodes[nid].online:
                self.run([ev.NodeDisconnected(nid)])
        elif kind == "expire":
            self.decide(lambda s: decide.expire_node(s, str(nid), self.wall))
        elif kind == "expiry":
            exp = None if op[2] is None else self.wall + op[2]
            self.decide(lambda s: decide.set_key_expiry(s, str(nid), exp))
        elif kind == "logout":
            self.decide(lambda s: decide.logout(s, self.machines[nid]))
        elif kind == "delete":
            self.decide(lambda s: decide.delete_node(s, str(nid)))


# Every DNS op, for tests that pick one from a list.
DNS_OPS: tuple[tuple[Any, ...], ...] = (
    *(("dns_set", m, n, sp, se, o) for m, n, sp, se, o in
      ((None, 2, 1, 2, None), (False, 0, 0, 0, None), (True, 3, 3, 3, False), (None, 1, 2, 1, True))),
    *(("dns_record_add", i) for i in range(len(DNS_RECORDS))),
    ("dns_record_remove", 0, True), ("dns_record_remove", 0, False), ("dns_record_remove", 2, True),
    *(("dns_seed", i) for i in range(len(DNS_SEEDS))),
    *(("dns_file", i) for i in range(len(DNS_FILES))),
    *(("dns_base", i) for i in range(len(DNS_BASES))),
)


def dns_args(op: tuple[Any, ...]) -> dict[str, Any]:
    """``decide.set_dns``'s keyword arguments for a ``dns_set`` op."""
    return {"magic_dns": op[1], "nameservers": DNS_NAMESERVERS[op[2]], "split": DNS_SPLITS[op[3]],
            "search_domains": DNS_SEARCH[op[4]], "override_local_dns": op[5]}


def dns_events(s: State, op: tuple[Any, ...]) -> list[ev.Event]:
    kind = op[0]
    base = s.base_domain or "shoal.internal"
    if kind == "dns_set":
        return decide.set_dns(s, base, **dns_args(op))
    if kind == "dns_base":
        return decide.set_dns(s, base, domain=DNS_BASES[op[1]], config_domain="shoal.internal",
                              server_host="203.0.113.1")
    if kind == "dns_record_add":
        return decide.add_dns_record(s, *DNS_RECORDS[op[1]])
    if kind == "dns_record_remove":
        name, t, v = DNS_RECORDS[op[1]]
        return decide.remove_dns_record(s, name, t, v) if op[2] else decide.remove_dns_record(s, name)
    if kind == "dns_seed":
        return decide.seed_dns(s, DNS_SEEDS[op[1]])
    return decide.load_dns_file(s, "/etc/shoal/records.json", DNS_FILES[op[1]])


def pure_history(script: list[tuple[Any, ...]], users: int = 2) -> PureLog:
    log = PureLog()
    for name in USERS[:users]:
        log.decide(lambda s, name=name: decide.create_user(s, name))
    for op in script:
        log.step(op)
    return log
