"""MagicDNS settings, server side: the [dns] config table (TOML, SHOAL_DNS_*, --dns-* flags), its validation, and
the DNSConfig a netmap carries (coord/dns.py ``render``)."""

from __future__ import annotations

import contextlib
from pathlib import Path
from typing import Any

import pytest
from hypothesis import given
from hypothesis import strategies as st

from coord import dns
from coord.cli import build_parser, config_from
from coord.config import load
from coord.errors import ConfigError
from coord.wire import DNSConfig

TOML = """
server_url = "https://ctl.example.com"
[dns]
magic_dns = true
nameservers = ["1.1.1.1", "[2606:4700::1111]:53", "1.1.1.1"]
search_domains = ["Corp.Example."]
override_local_dns = false
extra_records = [{name = "grafana.example.com", type = "A", value = "100.64.0.9"},
                 {name = "grafana.example.com", value = "fd7a:115c:a1e0::9"}]
[dns.split]
"corp.example" = ["192.0.2.53", "192.0.2.54:5353"]
"""


def write(tmp_path: Path, text: str) -> str:
    p = tmp_path / "shoal.toml"
    p.write_text(text)
    return str(p)


def test_dns_config_defaults() -> None:
    s = load(None, env={}).dns_settings()
    assert s == dns.DnsSettings(magic_dns=True, override_local_dns=True)


def test_dns_config_toml_table_is_validated_and_normalised(tmp_path: Path) -> None:
    s = load(write(tmp_path, TOML), env={}).dns_settings()
    assert s.nameservers == ("1.1.1.1", "[2606:4700::1111]:53")  # duplicates dropped, order kept
    assert s.search_domains == ("corp.example",)  # lowercase, no trailing dot
    assert s.split == (("corp.example", ("192.0.2.53", "192.0.2.54:5353")),)
    assert s.override_local_dns is False
    assert s.extra_records == (("grafana.example.com", "A", "100.64.0.9"),
                               ("grafana.example.com", "AAAA", "fd7a:115c:a1e0::9"))


def test_dns_config_environment_and_flags(tmp_path: Path) -> None:
    env = {"SHOAL_DNS_MAGIC_DNS": "off", "SHOAL_DNS_NAMESERVERS": "9.9.9.9, 149.112.112.112",
           "SHOAL_DNS_SPLIT": "corp.example=192.0.2.53,192.0.2.54;lab.example=198.51.100.53",
           "SHOAL_DNS_SEARCH_DOMAINS": "corp.example", "SHOAL_DNS_OVERRIDE_LOCAL_DNS": "false",
           "SHOAL_DNS_EXTRA_RECORDS": "a.example.com A 100.64.0.1; b.example.com AAAA fd7a:115c:a1e0::2"}
    s = load(None, env=env).dns_settings()
    assert s.magic_dns is False and s.override_local_dns is False
    assert s.nameservers == ("9.9.9.9", "149.112.112.112")
    assert dict(s.split) == {"corp.example": ("192.0.2.53", "192.0.2.54"), "lab.example": ("198.51.100.53",)}
    assert s.extra_records == (("a.example.com", "A", "100.64.0.1"), ("b.example.com", "AAAA", "fd7a:115c:a1e0::2"))
    # flags win over the file and the environment
    args = build_parser().parse_args([
        "serve", "--config", write(tmp_path, TOML), "--dns-magic-dns", "off", "--dns-split", "a.example=192.0.2.1",
        "--dns-split", "b.example=192.0.2.2,192.0.2.3", "--dns-extra-record", "x.example.com A 100.64.0.7",
        "--dns-extra-records-file", "/nonexistent/records.json",
    ])
    args.data_dir, args.json = str(tmp_path / "d"), False
    cfg = config_from(args)
    s = cfg.dns_settings()
    assert s.magic_dns is False
    assert dict(s.split) == {"a.example": ("192.0.2.1",), "b.example": ("192.0.2.2", "192.0.2.3")}
    assert s.extra_records == (("x.example.com", "A", "100.64.0.7"),)
    assert s.nameservers == ("1.1.1.1", "[2606:4700::1111]:53")  # from the file
    assert cfg.dns_records_file == "/nonexistent/records.json"


@pytest.mark.parametrize(("env", "message"), [
    ({"SHOAL_DNS_NAMESERVERS": "dns.google"}, "dns.nameservers: 'dns.google' is not an IP address"),
    ({"SHOAL_DNS_NAMESERVERS": "1.1.1.1:99999"}, "port must be 1-65535"),
    ({"SHOAL_DNS_NAMESERVERS": "[1.1.1.1"}, "is not [IPv6]:port"),
    ({"SHOAL_DNS_SPLIT": "shoal.internal=192.0.2.1"}, "split suffix: shoal.internal is inside the base domain"),
    ({"SHOAL_DNS_SPLIT": "x.shoal.internal=192.0.2.1"}, "x.shoal.internal is inside the base domain shoal.internal"),
    ({"SHOAL_DNS_SPLIT": "corp.example="}, "split corp.example: give at least one resolver"),
    ({"SHOAL_DNS_SPLIT": "192.0.2.1"}, "is not SUFFIX=ADDR[,ADDR]"),
    ({"SHOAL_DNS_SPLIT": "-bad.example=192.0.2.1"}, "is not a DNS name (label '-bad'"),
    ({"SHOAL_DNS_SEARCH_DOMAINS": "localhost"}, "search domain: 'localhost' needs at least two labels"),
    ({"SHOAL_DNS_EXTRA_RECORDS": "x.example A fd7a::1"}, "type A needs an IPv4 address, not 'fd7a::1'"),
    ({"SHOAL_DNS_EXTRA_RECORDS": "x.example MX 192.0.2.1"}, "type 'MX' is not A or AAAA"),
    ({"SHOAL_DNS_EXTRA_RECORDS": "x.example A"}, "is not NAME TYPE VALUE"),
    ({"SHOAL_DNS_EXTRA_RECORDS": "x.example A 100.64.0.300"}, "'100.64.0.300' is not an IP address"),
    ({"SHOAL_DNS_MAGIC_DNS": "maybe"}, "SHOAL_DNS_MAGIC_DNS: expected on or off, got 'maybe'"),
    ({"SHOAL_SERVER_URL": "http://shoal.internal:8080"},
     "base_domain: 'shoal.internal' is the server URL's host"),
    ({"SHOAL_SERVER_URL": "https://ctl.corp.example", "SHOAL_BASE_DOMAIN": "corp.example"},
     "base_domain: 'corp.example' is a suffix of the server URL's host ctl.corp.example"),
])
def test_dns_config_refuses_bad_values_precisely(env: dict[str, str], message: str) -> None:
    with pytest.raises(ConfigError) as e:
        load(None, env=env)
    assert message in str(e.value)


def test_dns_config_a_base_domain_beside_the_server_host_is_fine() -> None:
    # "example.com" is neither the host nor a suffix of it; "notexample.com" is not a suffix of "ctl.example.com"
    load(None, env={"SHOAL_SERVER_URL": "https://ctl.example.com", "SHOAL_BASE_DOMAIN": "tail.example.net"})
    load(None, env={"SHOAL_SERVER_URL": "https://ctl.notexample.com", "SHOAL_BASE_DOMAIN": "example.com"})


@pytest.mark.parametrize(("table", "message"), [
    ("[dns]\nnameserver = [\"1.1.1.1\"]\n", "dns: unknown key(s) nameserver"),
    ("[dns]\nmagic_dns = \"yes\"\n", "dns.magic_dns: expected true or false, got 'yes'"),
    ("[dns]\nnameservers = \"1.1.1.1\"\n", "dns.nameservers: expected a list"),
    ("[dns]\nextra_records = [{name = \"a.example\", kind = \"A\", value = \"192.0.2.1\"}]\n",
     "unknown key(s) kind (expected Name, Type, Value)"),
    ("[dns]\nextra_records_file = 3\n", "dns.extra_records_file: expected a path"),
])
def test_dns_config_refuses_bad_toml(tmp_path: Path, table: str, message: str) -> None:
    with pytest.raises(ConfigError) as e:
        load(write(tmp_path, table), env={})
    assert message in str(e.value)


def test_dns_records_file_shapes() -> None:
    text = ('[{"Name": "Grafana.Example.com.", "Type": "A", "Value": "100.64.0.9"},'
            ' {"name": "db.example.com", "type": "aaaa", "value": "fd7a:115c:a1e0::a"},'
            ' {"Name": "v4.example.com", "Value": "100.64.0.10"}]')
    assert dns.parse_records_file(text, "r.json") == (
        ("grafana.example.com", "A", "100.64.0.9"), ("db.example.com", "AAAA", "fd7a:115c:a1e0::a"),
        ("v4.example.com", "A", "100.64.0.10"),
    )
    for bad, message in (("{", "r.json: not JSON"), ('{"Name": "x"}', "r.json: expected a JSON list"),
                         ('[{"Name": "x.example", "Type": "CNAME", "Value": "y"}]',
                          "records[0] x.example: type 'CNAME' is not A or AAAA"),
                         ('[{"Value": "192.0.2.1"}]', "records[0] name: expected a DNS name")):
        with pytest.raises(dns.DnsError) as e:
            dns.parse_records_file(bad, "r.json")
        assert message in str(e.value)


@given(st.text(max_size=80))
def test_dns_records_file_parser_never_crashes(text: str) -> None:
    with contextlib.suppress(dns.DnsError):
        dns.parse_records_file(text, "r.json")


@given(st.recursive(st.none() | st.booleans() | st.integers() | st.text(max_size=20),
                    lambda c: st.lists(c, max_size=4) | st.dictionaries(st.text(max_size=6), c, max_size=4),
                    max_leaves=12))
def test_dns_records_from_any_json_value_never_crash(value: Any) -> None:
    with contextlib.suppress(dns.DnsError):
        dns.records(value if isinstance(value, list) else [value], "records")


ZONES = dns.reverse_zones("100.64.0.0/10", "fd7a:115c:a1e0::/48")


def test_dns_reverse_zones_cover_the_tailnet_prefixes() -> None:
    assert ZONES[0] == "64.100.in-addr.arpa." and ZONES[63] == "127.100.in-addr.arpa." and len(ZONES) == 65
    assert ZONES[-1] == "0.e.1.a.c.5.1.1.a.7.d.f.ip6.arpa."
    assert dns.reverse_zones("10.0.0.0/8", "fd00::/8") == ("10.in-addr.arpa.", "d.f.ip6.arpa.")
    assert dns.reverse_zones("100.64.0.0/24", "fd7a:115c:a1e0:ab12::/64")[0] == "0.64.100.in-addr.arpa."


def test_dns_render_carries_every_setting() -> None:
    s = load(None, env={"SHOAL_DNS_NAMESERVERS": "1.1.1.1", "SHOAL_DNS_SPLIT": "corp.example=192.0.2.53",
                        "SHOAL_DNS_SEARCH_DOMAINS": "corp.example,shoal.internal",
                        "SHOAL_DNS_EXTRA_RECORDS": "grafana.example.com A 100.64.0.9"}).dns_settings()
    out = dns.render(s, (("file.example.com", "A", "100.64.0.50"),), "shoal.internal", ZONES)
    assert out["Resolvers"] == [{"Addr": "1.1.1.1"}] and "FallbackResolvers" not in out
    assert out["Domains"] == ["shoal.internal", "corp.example"]  # the base domain first, once
    assert out["Proxied"] is True
    routes = out["Routes"]
    assert next(iter(routes)) == "shoal.internal." and routes["shoal.internal."] == []
    assert routes["64.100.in-addr.arpa."] == [] and routes["0.e.1.a.c.5.1.1.a.7.d.f.ip6.arpa."] == []
    assert routes["corp.example."] == [{"Addr": "192.0.2.53"}]
    assert out["ExtraRecords"] == [{"Name": "grafana.example.com", "Type": "A", "Value": "100.64.0.9"},
                                   {"Name": "file.example.com", "Type": "A", "Value": "100.64.0.50"}]
    # the node's parser reads it back
    parsed = DNSConfig.from_json(out)
    assert parsed.resolvers == ("1.1.1.1",) and parsed.proxied
    assert ("corp.example.", ("192.0.2.53",)) in parsed.routes
    assert parsed.extra_records[1] == ("file.example.com", "A", "100.64.0.50")


def test_dns_render_magic_dns_off_and_local_dns_kept() -> None:
    s = dns.settings(magic_dns=False, nameservers=["9.9.9.9"], override_local_dns=False, search_domains=["a.example"],
                     split={"corp.example": ["192.0.2.53"]})
    out = dns.render(s, (), "shoal.internal", ZONES)
    assert out["Proxied"] is False
    assert out["Routes"] == {"corp.example.": [{"Addr": "192.0.2.53"}]}  # no local zones without MagicDNS
    assert out["Domains"] == ["a.example"]
    assert out["Resolvers"] == [] and out["FallbackResolvers"] == [{"Addr": "9.9.9.9"}]
    assert DNSConfig.from_json(out).fallback_resolvers == ("9.9.9.9",)
    assert "ExtraRecords" not in out
