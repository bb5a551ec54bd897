"""MagicDNS settings, server side: validation, the fold of the DNS events, and the DNSConfig each netmap carries.

Pure: no I/O, no clock. The settings live in the event log (coord/events.py ``DNS*`` events), seeded from the
server config's ``[dns]`` table (coord/config.py) and changed with ``shoal-server dns set|records``.

The netmap's DNSConfig (wire format in coord/wire/schema.py), for base domain ``B``::

    Resolvers          [{Addr}] the global upstreams, when override_local_dns is on (else empty)
    FallbackResolvers  [{Addr}] the global upstreams, when override_local_dns is off: the host's resolvers first
    Routes             {"B.": [], "<reverse zones>.": [], "<split suffix>.": [{Addr}, ...]}
                       (the base domain and the reverse zones of the tailnet prefixes only with MagicDNS on;
                       an empty list means "answered by the node's own resolver")
    Domains            search domains: B first (with MagicDNS on), then the configured ones
    Proxied            MagicDNS on or off
    ExtraRecords       [{Name, Type, Value}] A/AAAA records: the configured/admin ones, then the watched file's

Resolver addresses are ``IP`` or ``IP:port`` / ``[IPv6]:port``. Names are kept lowercase without the trailing dot.
A records file (``extra_records_file``) is JSON in Tailscale's ExtraRecords shape: ``[{"Name": "grafana.example.com",
"Type": "A", "Value": "100.64.0.10"}, ...]`` (lowercase keys, as Headscale writes them, are accepted too).
"""

from __future__ import annotations

import dataclasses
import ipaddress
import json
import re
from collections.abc import Iterable
from dataclasses import dataclass
from typing import Any, TypeVar

T = TypeVar("T")

Record = tuple[str, str, str]  # (name, type, value)
Split = tuple[tuple[str, tuple[str, ...]], ...]  # (suffix, resolvers), sorted by suffix

RECORD_TYPES = ("A", "AAAA")
MAX_RECORDS = 10_000
MAX_RESOLVERS = 16
_LABEL = re.compile(r"^[a-z0-9_]([a-z0-9_-]{0,61}[a-z0-9_])?$")


class DnsError(ValueError):
    """Bad DNS input; the message says which value and why."""


@dataclass(frozen=True)
class DnsSettings:
    magic_dns: bool = True
    nameservers: tuple[str, ...] = ()
    split: Split = ()
    search_domains: tuple[str, ...] = ()
    override_local_dns: bool = True
    extra_records: tuple[Record, ...] = ()


DEFAULT = DnsSettings()
FIELDS = tuple(f.name for f in dataclasses.fields(DnsSettings))


# --- validation -------------------------------------------------------------------------------------------


def dns_name(text: object, what: str) -> str:
    """A DNS name (lowercased, trailing dot dropped), at least two labels; DnsError naming ``what``."""
    if not isinstance(text, str):
        raise DnsError(f"{what}: expected a DNS name, got {type(text).__name__}")
    name = text.strip().lower().removesuffix(".")
    if not name:
        raise DnsError(f"{what}: empty DNS name")
    if len(name) > 253:
        raise DnsError(f"{what}: {text!r} is longer than 253 characters")
    labels = name.split(".")
    for label in labels:
        if not _LABEL.match(label):
            raise DnsError(f"{what}: {text!r} is not a DNS name (label {label!r}: a-z, 0-9, - and _, 1-63 "
                           "characters, not starting or ending with -)")
    if len(labels) < 2:
        raise DnsError(f"{what}: {text!r} needs at least two labels (e.g. corp.example)")
    return name


def resolver(text: object, what: str = "nameserver") -> str:
    """``IP``, ``IP:port`` or ``[IPv6]:port``, normalised (``1.1.1.1``, ``[2606:4700::1111]:5353``)."""
    if not isinstance(text, str) or not text.strip():
        raise DnsError(f"{what}: expected an IP address (optionally with :port)")
    t = text.strip()
    host, port = t, None
    if t.startswith("["):
        host, sep, rest = t[1:].partition("]")
        if not sep or (rest and not rest.startswith(":")):
            raise DnsError(f"{what}: {text!r} is not [IPv6]:port")
        port = rest[1:] if rest else None
    elif t.count(":") == 1:
        host, _, port = t.partition(":")
    try:
        ip = ipaddress.ip_address(host)
    except ValueError:
        raise DnsError(f"{what}: {text!r} is not an IP address (optionally with :port)") from None
    if port is not None:
        if not port.isdigit() or not 0 < int(port) < 65536:
            raise DnsError(f"{what}: {text!r}: port must be 1-65535")
        return f"[{ip}]:{int(port)}" if ip.version == 6 else f"{ip}:{int(port)}"
    if ip.version == 6 and t.startswith("["):
        raise DnsError(f"{what}: {text!r}: brackets need a port")
    return str(ip)


def record(name: object, kind: object, value: object, what: str = "extra record") -> Record:
    n = dns_name(name, f"{what} name")
    if kind is not None and not isinstance(kind, str):
        raise DnsError(f"{what} {n}: type must be A or AAAA")
    if kind and kind.strip().upper() not in RECORD_TYPES:
        raise DnsError(f"{what} {n}: type {kind!r} is not A or AAAA (only those are served)")
    if not isinstance(value, str):
        raise DnsError(f"{what} {n}: value must be an IP address")
    try:
        ip = ipaddress.ip_address(value.strip())
    except ValueError:
        raise DnsError(f"{what} {n}: {value!r} is not an IP address") from None
    t = (kind or "").strip().upper() or ("A" if ip.version == 4 else "AAAA")
    if (t == "A") != (ip.version == 4):
        raise DnsError(f"{what} {n}: type {t} needs an IPv{4 if t == 'A' else 6} address, not {value!r}")
    return (n, t, str(ip))


_BASE = re.compile(r"^[a-z0-9]([a-z0-9-]*[a-z0-9])?(\.[a-z0-9]([a-z0-9-]*[a-z0-9])?)+$")


def base_domain(text: object, server_host: str, what: str = "base_domain") -> str:
    """A MagicDNS base domain: a lowercase name of two labels or more that neither is nor contains the server URL's
    host, since nodes would then look the server up through MagicDNS and lose it."""
    if not isinstance(text, str) or not _BASE.match(text):
        raise DnsError(f"{what}: {text!r} is not a lowercase DNS name with a dot")
    host = server_host.lower().rstrip(".")
    if host == text or host.endswith("." + text):
        how = "is the server URL's host" if host == text else f"is a suffix of the server URL's host {host}"
        raise DnsError(f"{what}: {text!r} {how}: nodes would resolve the server's name through MagicDNS and lose "
                       "it; choose a domain the server URL is not in (the default is shoal.internal)")
    return text


def _outside(suffix: str, base_domain: str, what: str) -> None:
    if suffix == base_domain or suffix.endswith("." + base_domain):
        raise DnsError(f"{what}: {suffix} is inside the base domain {base_domain}, which MagicDNS answers")


def settings(
    *, magic_dns: object = True, nameservers: Iterable[object] = (), split: dict[str, Any] | Iterable[Any] = (),
    search_domains: Iterable[object] = (), override_local_dns: object = True, extra_records: Iterable[Any] = (),
    base_domain: str = "",
) -> DnsSettings:
    """Validated, normalised settings from loose values (config, CLI); DnsError on the first bad one."""
    for key, v in (("magic_dns", magic_dns), ("override_local_dns", override_local_dns)):
        if not isinstance(v, bool):
            raise DnsError(f"{key}: expected true or false, got {v!r}")
    ns = _dedup(resolver(a, "nameservers") for a in _list(nameservers, "nameservers"))
    if len(ns) > MAX_RESOLVERS:
        raise DnsError(f"nameservers: at most {MAX_RESOLVERS}")
    pairs = split.items() if isinstance(split, dict) else split
    routes: dict[str, tuple[str, ...]] = {}
    for item in _list(pairs, "split"):
        if not isinstance(item, (tuple, list)) or len(item) != 2:
            raise DnsError("split: expected suffix = [resolvers]")
        suffix = dns_name(item[0], "split suffix")
        if base_domain:
            _outside(suffix, base_domain, "split suffix")
        addrs = _dedup(resolver(a, f"split {suffix}") for a in _list(item[1], f"split {suffix}"))
        if not addrs:
            raise DnsError(f"split {suffix}: give at least one resolver")
        if len(addrs) > MAX_RESOLVERS:
            raise DnsError(f"split {suffix}: at most {MAX_RESOLVERS} resolvers")
        if suffix in routes:
            raise DnsError(f"split: {suffix} is given twice")
        routes[suffix] = addrs
    search = _dedup(dns_name(d, "search domain") for d in _list(search_domains, "search_domains"))
    recs = records(extra_records, "extra_records")
    return DnsSettings(bool(magic_dns), ns, tuple(sorted(routes.items())), search, bool(override_local_dns), recs)


def records(items: Iterable[Any], what: str) -> tuple[Record, ...]:
    """Records from ``{name, type, value}`` tables (any key case) or ``[name, type, value]`` triples."""
    out: list[Record] = []
    for i, r in enumerate(_list(items, what)):
        at = f"{what}[{i}]"
        if isinstance(r, dict):
            low = {str(k).lower(): v for k, v in r.items()}
            unknown = set(low) - {"name", "type", "value"}
            if unknown:
                raise DnsError(f"{at}: unknown key(s) {', '.join(sorted(unknown))} (expected Name, Type, Value)")
            out.append(record(low.get("name"), low.get("type"), low.get("value"), at))
        elif isinstance(r, (list, tuple)) and len(r) == 3:
            out.append(record(r[0], r[1], r[2], at))
        else:
            raise DnsError(f"{at}: expected {{Name, Type, Value}}")
    if len(out) > MAX_RECORDS:
        raise DnsError(f"{what}: at most {MAX_RECORDS} records")
    return _dedup(out)


def parse_records_file(text: str, path: str) -> tuple[Record, ...]:
    """A records file's content (Tailscale's ExtraRecords JSON); DnsError naming the file."""
    try:
        data = json.loads(text)
    except ValueError as e:
        raise DnsError(f"{path}: not JSON ({e})") from None
    if not isinstance(data, list):
        raise DnsError(f"{path}: expected a JSON list of {{Name, Type, Value}}")
    try:
        return records(data, "records")
    except DnsError as e:
        raise DnsError(f"{path}: {e}") from None


def _list(v: Any, what: str) -> list[Any]:
    if isinstance(v, (str, bytes, dict)) or not isinstance(v, Iterable):
        raise DnsError(f"{what}: expected a list")
    return list(v)


def _dedup(items: Iterable[T]) -> tuple[T, ...]:
    return tuple(dict.fromkeys(items))


# --- the fold's helpers (event data arrives as JSON lists) ------------------------------------------------


def split_from(v: Any) -> Split:
    return tuple((str(s), tuple(str(a) for a in rs)) for s, rs in v)


def records_from(v: Any) -> tuple[Record, ...]:
    return tuple((str(n), str(t), str(x)) for n, t, x in v)


def seeded(current: DnsSettings, old_seed: DnsSettings, new_seed: DnsSettings) -> DnsSettings:
    """The settings after the config's [dns] table changed from ``old_seed`` to ``new_seed``: a field the config
    changed takes the config's value, every other field keeps what the admin set."""
    changes = {f: getattr(new_seed, f) for f in FIELDS if getattr(new_seed, f) != getattr(old_seed, f)}
    return dataclasses.replace(current, **changes)


def as_json(s: DnsSettings) -> dict[str, Any]:
    return {
        "magic_dns": s.magic_dns, "nameservers": list(s.nameservers), "split": {k: list(v) for k, v in s.split},
        "search_domains": list(s.search_domains), "override_local_dns": s.override_local_dns,
        "extra_records": [{"name": n, "type": t, "value": v} for n, t, v in s.extra_records],
    }


# --- the netmap's DNSConfig ------------------------------------------------------------------------------


def reverse_zones(prefix_v4: str, prefix_v6: str) -> tuple[str, ...]:
    """The in-addr.arpa and ip6.arpa zones covering the tailnet prefixes (a /10 is 64 /16 zones, as Tailscale
    routes 64...127.100.in-addr.arpa; a /48 is one zone of 12 nibbles)."""
    out: list[str] = []
    v4 = ipaddress.IPv4Network(prefix_v4)
    octets = -(-v4.prefixlen // 8)  # round up to whole octets
    subnets = [v4] if v4.prefixlen == octets * 8 else list(v4.subnets(new_prefix=min(32, octets * 8)))
    for net in subnets[:256]:
        parts = str(net.network_address).split(".")[:octets]
        out.append(".".join(reversed(parts)) + ".in-addr.arpa.")
    v6 = ipaddress.IPv6Network(prefix_v6)
    nibbles = -(-v6.prefixlen // 4)
    subnets6 = [v6] if v6.prefixlen == nibbles * 4 else list(v6.subnets(new_prefix=min(128, nibbles * 4)))
    for net6 in subnets6[:16]:
        hexes = net6.network_address.exploded.replace(":", "")[:nibbles]
        out.append(".".join(reversed(hexes)) + ".ip6.arpa.")
    return tuple(out)


def _addrs(rs: Iterable[str]) -> list[dict[str, str]]:
    return [{"Addr": a} for a in rs]


def render(s: DnsSettings, file_records: tuple[Record, ...], base_domain: str,
           zones: tuple[str, ...]) -> dict[str, Any]:
    """The DNSConfig every node's netmap carries."""
    routes: dict[str, list[dict[str, str]]] = {}
    domains: list[str] = []
    if s.magic_dns:
        routes[f"{base_domain}."] = []
        routes.update((z, []) for z in zones)
        domains.append(base_domain)
    for suffix, rs in s.split:
        routes[f"{suffix}."] = _addrs(rs)
    domains += [d for d in s.search_domains if d != base_domain]
    out: dict[str, Any] = {
        "Resolvers": _addrs(s.nameservers) if s.override_local_dns else [],
        "Domains": domains,
        "Proxied": s.magic_dns,
        "Routes": routes,
    }
    if s.nameservers and not s.override_local_dns:
        out["FallbackResolvers"] = _addrs(s.nameservers)
    extra = _dedup(s.extra_records + file_records)
    if extra:
        out["ExtraRecords"] = [{"Name": n, "Type": t, "Value": v} for n, t, v in extra]
    return out
