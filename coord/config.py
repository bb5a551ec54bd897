"""Server configuration: one TOML file, overridden by SHOAL_* environment variables, overridden by flags.

Every key, with its default::

    server_url        = "http://127.0.0.1:8080"   # what nodes dial; login URLs are built on it
    listen            = "127.0.0.1:8080"
    data_dir          = "./data"
    prefix_v4         = "100.64.0.0/10"
    prefix_v6         = "fd7a:115c:a1e0::/48"
    base_domain       = "shoal.internal"          # MagicDNS suffix
    key_expiry        = "180d"                    # node key lifetime; "0" = never
    ephemeral_timeout = "120s"                    # delete ephemeral nodes this long after their stream ends
    batch_delay       = "50ms"                    # fan-out tick: changes within it are merged
    keepalive         = "50s"                     # map stream keep-alive interval
    derp              = true                      # embedded DERP relay on the HTTP port, region 900
    stun_listen       = "0.0.0.0:3478"            # embedded STUN server ("" = off)
    metrics_listen    = "127.0.0.1:9470"          # Prometheus /metrics, server and embedded relay ("" = off)
    derp_map_file     = ""                        # JSON: extra regions and relays
    log_level         = "info"
    durability        = "normal"                  # "full": fsync every commit (survives power loss; docs/control.md)
    snapshot_every    = 10000                     # events between projection snapshots (0 = none)
    checkpoint_every  = 1000                      # events between the server's signed checkpoints ...
    checkpoint_interval = "10m"                   # ... or this long, when the log grew
    checkpoint_file   = ""                        # replaced with each checkpoint line (0600)
    checkpoint_command = ""                       # run by the shell with each checkpoint line on stdin
    tls_cert          = ""                        # PEM certificate chain: serve HTTPS (with tls_key)
    tls_key           = ""                        # PEM private key of tls_cert
    trusted_proxies   = ""                        # reverse proxies whose X-Forwarded-For is believed, e.g.
                                                  # "10.0.0.1, 192.0.2.0/24"; limits count the client behind them
    postgres          = ""                        # libpq URL: store the log in PostgreSQL, shared by several
                                                  # replicas (docs/ha.md); "" = SQLite in data_dir
    replica_name      = ""                        # this replica in `shoal-server replicas` ("" = server_url)
    keep_established_on_policy_change = false     # true: a narrowed policy leaves flows it no longer allows open
                                                  # (false: nodes cut them from conntrack, docs/policy.md)
    [oidc]                                        # sign-in with an OpenID Connect provider; see coord/auth/config.py
    [dns]                                         # MagicDNS (docs/dns.md, coord/dns.py)
    magic_dns          = true
    nameservers        = []                       # global upstreams: "1.1.1.1", "[2606:4700::1111]:53"
    search_domains     = []                       # after the base domain
    override_local_dns = true                     # false: the nameservers only back up the host's resolvers
    extra_records      = []                       # [{name = "grafana.example.com", type = "A", value = "100.64.0.9"}]
    extra_records_file = ""                       # JSON, Tailscale's ExtraRecords shape; watched for changes
    [dns.split]                                   # split DNS: suffix -> resolvers
    "corp.example" = ["192.0.2.53"]

The ``[oidc]`` table's keys come also from SHOAL_OIDC_<KEY> variables and ``--oidc-<key>`` flags (lists comma-
separated; ``--oidc-group-map IDP=group:NAME``, repeatable). Without an issuer, sign-in is off and nodes without
an auth key wait for ``nodes approve``.

The ``[dns]`` table's keys come also from SHOAL_DNS_<KEY> variables and ``--dns-<key>`` flags (on ``serve``):
booleans true/false/on/off; lists comma-separated; ``split`` as ``SUFFIX=ADDR[,ADDR]`` (the variable joins several
with ``;``, the flag repeats); ``extra_records`` as ``NAME TYPE VALUE`` (the variable joins several with ``;``, the
flag ``--dns-extra-record`` repeats). They seed the log's DNS settings at start (coord/app.py ``seed_dns``): a field
whose configured value changed since the last start replaces the setting, so ``shoal-server dns set`` wins until
the config's value for that field changes.
"""

from __future__ import annotations

import ipaddress
import os
import re
import tomllib
from collections.abc import Mapping
from dataclasses import dataclass, fields, replace
from enum import StrEnum
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

from coord import dns as dnsmod
from coord.auth import config as auth_config
from coord.errors import ConfigError
from coord.limits import parse_proxies


class LogLevel(StrEnum):
    DEBUG = "debug"
    INFO = "info"
    WARNING = "warning"
    ERROR = "error"


_DURATION = re.compile(r"^(\d+(?:\.\d+)?)(ms|s|m|h|d)?$")
_UNITS = {"ms": 0.001, "s": 1.0, "m": 60.0, "h": 3600.0, "d": 86400.0, None: 1.0}


def parse_duration(text: str, key: str = "duration") -> float:
    m = _DURATION.match(str(text).strip())
    if not m:
        raise ConfigError(f"{key}: {text!r} is not a duration (examples: 500ms, 30s, 15m, 24h, 180d)")
    return float(m.group(1)) * _UNITS[m.group(2)]


def _count(text: str, key: str) -> int:
    t = str(text).strip()
    if not t.isdigit():
        raise ConfigError(f"{key}: {text!r} is not a whole number of events (0 = never)")
    return int(t)


def parse_hostport(text: str, key: str) -> tuple[str, int]:
    host, sep, port = text.rpartition(":")
    if not sep or not port.isdigit() or not 0 <= int(port) < 65536:
        raise ConfigError(f"{key}: {text!r} is not host:port")
    return host.strip("[]") or "0.0.0.0", int(port)


@dataclass(frozen=True)
class Config:
    server_url: str = "http://127.0.0.1:8080"
    listen: str = "127.0.0.1:8080"
    data_dir: str = "./data"
    prefix_v4: str = "100.64.0.0/10"
    prefix_v6: str = "fd7a:115c:a1e0::/48"
    base_domain: str = "shoal.internal"
    key_expiry: str = "180d"
    ephemeral_timeout: str = "120s"
    batch_delay: str = "50ms"
    keepalive: str = "50s"
    derp: bool = True
    stun_listen: str = "0.0.0.0:3478"
    metrics_listen: str = "127.0.0.1:9470"
    derp_map_file: str = ""
    log_level: str = "info"
    durability: str = "normal"
    snapshot_every: str = "10000"
    checkpoint_every: str = "1000"
    checkpoint_interval: str = "10m"
    checkpoint_file: str = ""
    checkpoint_command: str = ""
    tls_cert: str = ""
    tls_key: str = ""
    trusted_proxies: str = ""
    postgres: str = ""
    replica_name: str = ""
    keep_established_on_policy_change: bool = False
    # The [oidc] table as given (parsed, secret read, by `oidc_config`): sorted (key, value) pairs.
    oidc: tuple[tuple[str, Any], ...] = ()
    # The [dns] table as given (validated by `dns_settings`): sorted (key, value) pairs.
    dns: tuple[tuple[str, Any], ...] = ()

    # --- derived, validated views ---
    @property
    def data_path(self) -> Path:
        return Path(self.data_dir)

    @property
    def listen_addr(self) -> tuple[str, int]:
        return parse_hostport(self.listen, "listen")

    @property
    def key_expiry_s(self) -> float | None:
        v = parse_duration(self.key_expiry, "key_expiry")
        return None if v == 0 else v

    @property
    def ephemeral_timeout_s(self) -> float:
        return parse_duration(self.ephemeral_timeout, "ephemeral_timeout")

    @property
    def batch_delay_s(self) -> float:
        return parse_duration(self.batch_delay, "batch_delay")

    @property
    def keepalive_s(self) -> float:
        return parse_duration(self.keepalive, "keepalive")

    @property
    def proxies(self) -> tuple[ipaddress.IPv4Network | ipaddress.IPv6Network, ...]:
        try:
            return parse_proxies(self.trusted_proxies)
        except ValueError as e:
            raise ConfigError(f"trusted_proxies: {e}") from None
    def oidc_config(self, env: Mapping[str, str] | None = None) -> auth_config.OidcConfig | None:
        """The sign-in config, its secret read from its file or variable; None when sign-in is off."""
        table = {k: _thaw(v) for k, v in self.oidc}
        if not table.get("issuer"):
            if table:
                raise ConfigError("oidc: set issuer (and client_id and the client secret) or remove the oidc keys")
            return None
        cfg = auth_config.parse(table, env=env if env is not None else os.environ)
        auth_config.check_server_url(cfg, self.server_url)
        return cfg
    def dns_settings(self) -> dnsmod.DnsSettings:
        """The [dns] table's settings (the defaults for keys it does not give); ConfigError naming the key."""
        table = {k: _thaw_deep(v) for k, v in self.dns}
        unknown = set(table) - set(DNS_KEYS)
        if unknown:
            raise ConfigError(f"dns: unknown key(s) {', '.join(sorted(unknown))} (known: {', '.join(DNS_KEYS)})")
        kw = {k: table[k] for k in dnsmod.FIELDS if k in table}
        try:
            return dnsmod.settings(base_domain=self.base_domain, **kw)
        except dnsmod.DnsError as e:
            raise ConfigError(f"dns.{e}") from None

    @property
    def dns_records_file(self) -> str:
        v = dict(self.dns).get("extra_records_file", "")
        if not isinstance(v, str):
            raise ConfigError("dns.extra_records_file: expected a path")
        return v

    @property
    def snapshot_every_n(self) -> int:
        return _count(self.snapshot_every, "snapshot_every")

    @property
    def checkpoint_every_n(self) -> int:
        return _count(self.checkpoint_every, "checkpoint_every")

    @property
    def checkpoint_interval_s(self) -> float:
        return parse_duration(self.checkpoint_interval, "checkpoint_interval")

    def validate(self) -> Config:
        u = urlsplit(self.server_url)
        if u.scheme not in ("http", "https") or not u.hostname:
            raise ConfigError(f"server_url: {self.server_url!r} must be an http:// or https:// URL")
        self.listen_addr  # noqa: B018 - validates
        if self.stun_listen:
            parse_hostport(self.stun_listen, "stun_listen")
        if self.metrics_listen:
            parse_hostport(self.metrics_listen, "metrics_listen")
        for key in ("key_expiry", "ephemeral_timeout", "batch_delay", "keepalive", "checkpoint_interval"):
            parse_duration(getattr(self, key), key)
        self.snapshot_every_n  # noqa: B018 - validates
        self.checkpoint_every_n  # noqa: B018 - validates
        if self.durability not in ("normal", "full"):
            raise ConfigError(f"durability: {self.durability!r} is not normal or full")
        for key, version in (("prefix_v4", 4), ("prefix_v6", 6)):
            try:
                net = ipaddress.ip_network(getattr(self, key))
            except ValueError as e:
                raise ConfigError(f"{key}: {e}") from None
            if net.version != version:
                raise ConfigError(f"{key}: expected an IPv{version} prefix")
        try:
            dnsmod.base_domain(self.base_domain, u.hostname or "")
        except dnsmod.DnsError as e:
            raise ConfigError(str(e)) from None
        self.dns_settings()
        self.dns_records_file  # noqa: B018 - validates
        if bool(self.tls_cert) != bool(self.tls_key):
            raise ConfigError("tls_cert and tls_key: give both (HTTPS) or neither")
        for key in ("tls_cert", "tls_key"):
            path = getattr(self, key)
            if path and not os.access(path, os.R_OK):
                raise ConfigError(f"{key}: cannot read {path}")
        self.proxies  # noqa: B018 - validates
        if self.postgres and urlsplit(self.postgres).scheme not in ("postgres", "postgresql"):
            raise ConfigError("postgres: expected a postgresql:// URL")
        if self.log_level not in tuple(LogLevel):
            raise ConfigError("log_level: expected debug, info, warning or error")
        return self


FIELDS = {f.name: f for f in fields(Config) if f.name not in ("oidc", "dns")}
DNS_KEYS = (*dnsmod.FIELDS, "extra_records_file")


def _coerce(key: str, value: Any) -> Any:
    want = FIELDS[key].type
    if want in ("bool", bool):
        if isinstance(value, bool):
            return value
        if isinstance(value, str) and value.lower() in ("1", "true", "yes", "on", "0", "false", "no", "off"):
            return value.lower() in ("1", "true", "yes", "on")
        raise ConfigError(f"{key}: expected true or false, got {value!r}")
    if isinstance(value, bool) or not isinstance(value, (str, int, float)):
        raise ConfigError(f"{key}: expected a string, got {type(value).__name__}")
    return str(value)


def load(path: str | None = None, env: dict[str, str] | None = None, overrides: dict[str, Any] | None = None) -> Config:
    values: dict[str, Any] = {}
    table: dict[str, Any] = {}
    dns_table: dict[str, Any] = {}
    if path:
        try:
            with open(path, "rb") as f:
                data = tomllib.load(f)
        except OSError as e:
            raise ConfigError(f"config file {path}: {e.strerror}") from None
        except tomllib.TOMLDecodeError as e:
            raise ConfigError(f"config file {path}: {e}") from None
        for key, value in data.items():
            if key == "oidc" and isinstance(value, dict):
                table.update(value)
                continue
            if key == "dns" and isinstance(value, dict):
                dns_table.update(value)
                continue
            if key not in FIELDS:
                raise ConfigError(f"config file {path}: unknown key {key!r}")
            values[key] = _coerce(key, value)
    # Only SHOAL_<KEY> for known keys: other tools of ours (the node agent) use SHOAL_* names too.
    environ = env if env is not None else dict(os.environ)
    for name in FIELDS:
        value = environ.get("SHOAL_" + name.upper())
        if name == "data_dir" and value is None:
            value = environ.get("SHOAL_DATA")
        if value is not None:
            values[name] = _coerce(name, value)
    for key in auth_config.KEYS:
        value = environ.get("SHOAL_OIDC_" + key.upper())
        if value is not None:
            table[key] = value
    for key in DNS_KEYS:
        value = environ.get("SHOAL_DNS_" + key.upper())
        if value is not None:
            dns_table[key] = _dns_text(key, value, f"SHOAL_DNS_{key.upper()}")
    for key, value in (overrides or {}).items():
        if value is None:
            continue
        if key.startswith("oidc_"):
            table[key[5:]] = value
        elif key.startswith("dns_"):
            dns_table[key[4:]] = _dns_text(key[4:], value, "--dns-" + key[4:].replace("_", "-"))
        else:
            values[key] = _coerce(key, value)
    if "group_map" in table and isinstance(table["group_map"], (str, list, tuple)):
        table["group_map"] = _group_map(table["group_map"])
    values["oidc"] = tuple(sorted((k, _freeze(v)) for k, v in table.items()))
    values["dns"] = tuple(sorted((k, _freeze(v)) for k, v in dns_table.items()))
    return replace(Config(), **values).validate()


def _dns_text(key: str, value: Any, where: str) -> Any:
    """A [dns] value from a variable or a flag (text, or a list of texts for repeated flags) as TOML gives it."""
    if not isinstance(value, (str, list, tuple)):
        return value
    items = [value] if isinstance(value, str) else list(value)
    if key in ("magic_dns", "override_local_dns"):
        text = str(items[-1]).strip().lower()
        if text not in ("1", "true", "yes", "on", "0", "false", "no", "off"):
            raise ConfigError(f"{where}: expected on or off, got {items[-1]!r}")
        return text in ("1", "true", "yes", "on")
    if key == "extra_records_file":
        return str(items[-1])
    if key in ("split", "extra_records"):
        entries = [e.strip() for item in items for e in str(item).split(";") if e.strip()]
        if key == "extra_records":
            out = []
            for e in entries:
                parts = e.split()
                if len(parts) != 3:
                    raise ConfigError(f"{where}: {e!r} is not NAME TYPE VALUE")
                out.append({"name": parts[0], "type": parts[1], "value": parts[2]})
            return out
        routes: dict[str, list[str]] = {}
        for e in entries:
            suffix, sep, addrs = e.partition("=")
            if not sep or not suffix.strip():
                raise ConfigError(f"{where}: {e!r} is not SUFFIX=ADDR[,ADDR]")
            routes[suffix.strip()] = [a.strip() for a in addrs.split(",") if a.strip()]
        return routes
    return [x.strip() for item in items for x in str(item).split(",") if x.strip()]


def _group_map(value: str | list[str] | tuple[str, ...]) -> dict[str, str]:
    """``IDP=group:name`` pairs (flags, environment: comma-separated) -> the group_map table."""
    items = value.split(",") if isinstance(value, str) else list(value)
    out: dict[str, str] = {}
    for item in (i.strip() for i in items):
        if not item:
            continue
        idp, sep, group = item.rpartition("=")
        if not sep or not idp:
            raise ConfigError(f"oidc.group_map: {item!r} is not IDP_GROUP=group:name")
        out[idp.strip()] = group.strip()
    return out


def _freeze(v: Any) -> Any:
    """Lists -> tuples, tables -> sorted pairs: a Config stays a frozen, hashable value."""
    if isinstance(v, list):
        return tuple(_freeze(x) for x in v)
    if isinstance(v, dict):
        return ("table", tuple(sorted((k, _freeze(x)) for k, x in v.items())))
    return v


def _thaw(v: Any) -> Any:
    if isinstance(v, tuple) and len(v) == 2 and v[0] == "table":
        return {k: _thaw(x) for k, x in v[1]}
    return v


def _thaw_deep(v: Any) -> Any:
    if isinstance(v, tuple) and len(v) == 2 and v[0] == "table" and isinstance(v[1], tuple):
        return {k: _thaw_deep(x) for k, x in v[1]}
    if isinstance(v, tuple):
        return [_thaw_deep(x) for x in v]
    return v
