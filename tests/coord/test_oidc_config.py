"""The [oidc] config: precise errors, the secret never inline and never shown."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest

from coord.auth.config import OidcConfig, Secret, check_server_url, parse
from coord.errors import ConfigError

BASE = {"issuer": "https://idp.example.com/", "client_id": "shoal", "client_secret_env": "OIDC_SECRET"}
ENV = {"OIDC_SECRET": "hunter2-very-secret"}


def cfg(**kw: Any) -> OidcConfig:
    data = {**BASE, **kw}
    return parse({k: v for k, v in data.items() if v is not None}, env=ENV)


def err(**kw: Any) -> str:
    with pytest.raises(ConfigError) as e:
        cfg(**kw)
    return str(e.value)


def test_oidc_config_defaults() -> None:
    c = cfg()
    assert c.issuer == "https://idp.example.com"
    assert c.scopes == ("openid", "email", "profile")
    assert c.groups_claim == ("groups",)
    assert c.user_name == "email"
    assert not c.expiry_from_token and not c.allow_http
    assert c.client_secret.reveal() == "hunter2-very-secret"


def test_oidc_config_full() -> None:
    c = cfg(scopes=["openid", "email", "groups"], allowed_domains=["Example.COM", "@corp.example"],
            allowed_users=["Boss@Example.com"], allowed_groups=["eng"], groups_claim="realm_access.roles",
            user_name="preferred_username", expiry_from_token=True,
            group_map={"shoal-admins": "group:admins", "eng": "group:eng"})
    assert c.allowed_domains == ("example.com", "corp.example")
    assert c.allowed_users == ("boss@example.com",)
    assert c.groups_claim == ("realm_access", "roles")
    assert c.policy_groups == {"eng": "group:eng", "shoal-admins": "group:admins"}
    assert c.expiry_from_token


def test_oidc_config_lists_from_flags_are_comma_separated() -> None:
    assert cfg(allowed_domains="a.example, b.example").allowed_domains == ("a.example", "b.example")


def test_oidc_secret_from_file(tmp_path: Path) -> None:
    f = tmp_path / "secret"
    f.write_text("s3cr3t\n")
    c = parse({**BASE, "client_secret_env": None, "client_secret_file": str(f)} | {"client_secret_env": ""},
              env={})
    assert c.client_secret.reveal() == "s3cr3t"


@pytest.mark.parametrize(("kw", "message"), [
    ({"issuer": None}, "oidc.issuer: required"),
    ({"issuer": "ftp://x"}, "oidc.issuer: 'ftp://x' must be an http:// or https:// URL"),
    ({"issuer": "https://x/?a=1"}, "without query or fragment"),
    ({"client_id": ""}, "oidc.client_id: required"),
    ({"client_secret": "inline"}, "oidc.client_secret: the secret is not accepted inline"),
    ({"client_secret_file": "/x"}, "set exactly one of client_secret_file and client_secret_env"),
    ({"client_secret_env": "NOPE"}, "environment variable NOPE is not set"),
    ({"client_secret_env": "1BAD"}, "'1BAD' is not an environment variable name"),
    ({"scopes": ["email"]}, "oidc.scopes: must include 'openid'"),
    ({"scopes": ["openid", "a b"]}, "oidc.scopes[1]: 'a b' is not a scope token"),
    ({"scopes": "openid,openid"}, "oidc.scopes: 'openid' is listed twice"),
    ({"allowed_domains": ["ok.example", "not a domain"]}, "oidc.allowed_domains[1]: 'not a domain'"),
    ({"allowed_users": ["nobody"]}, "oidc.allowed_users[0]: 'nobody' is not an e-mail address"),
    ({"allowed_groups": [""]}, "oidc.allowed_groups[0]: expected a non-empty string"),
    ({"allowed_groups": "x", "allowed_users": 3}, "oidc.allowed_users: expected a list of strings, got int"),
    ({"groups_claim": "a..b"}, "oidc.groups_claim: 'a..b' is not a dotted claim path"),
    ({"user_name": "nickname"}, "oidc.user_name: expected one of email, preferred_username, sub"),
    ({"expiry_from_token": "maybe"}, "oidc.expiry_from_token: expected true or false"),
    ({"pkce": "plain"}, "oidc.pkce: PKCE S256 is always on"),
    ({"group_map": {"admins": "admins"}}, "oidc.group_map.admins: 'admins' is not a policy group"),
    ({"group_map": ["x"]}, "oidc.group_map: expected a table"),
    ({"colour": "blue"}, "oidc: unknown key 'colour'"),
])
def test_oidc_config_errors_name_the_key(kw: dict[str, Any], message: str) -> None:
    assert message in err(**kw)


def test_oidc_secret_file_errors(tmp_path: Path) -> None:
    base = {**BASE, "client_secret_env": ""}
    with pytest.raises(ConfigError, match=r"oidc.client_secret_file: .*missing: No such file"):
        parse(base | {"client_secret_file": str(tmp_path / "missing")}, env={})
    (tmp_path / "empty").write_text("\n")
    with pytest.raises(ConfigError, match=r"the client secret \(file .*empty\) is empty"):
        parse(base | {"client_secret_file": str(tmp_path / "empty")}, env={})
    (tmp_path / "two").write_text("a\nb\n")
    with pytest.raises(ConfigError, match="more than one line"):
        parse(base | {"client_secret_file": str(tmp_path / "two")}, env={})


def test_oidc_secret_is_never_shown() -> None:
    c = cfg()
    for text in (repr(c), str(c), repr(c.client_secret), str(c.client_secret), f"{c.client_secret}"):
        assert "hunter2" not in text
    assert Secret("a") == Secret("a") and Secret("a") != Secret("b")
    # Errors about the secret name where it came from, never what it is.
    with pytest.raises(ConfigError) as e:
        parse({**BASE}, env={"OIDC_SECRET": "x\ny"})
    assert "x\ny" not in str(e.value) and "OIDC_SECRET" in str(e.value)


def test_oidc_http_server_url_only_on_loopback_or_in_a_lab() -> None:
    c = cfg()
    check_server_url(c, "https://shoal.example.com")
    check_server_url(c, "http://127.0.0.1:8080")
    check_server_url(c, "http://localhost:8080")
    check_server_url(c, "http://[::1]:8080")
    with pytest.raises(ConfigError, match="sign-in cookies need https"):
        check_server_url(c, "http://198.51.100.1:8080")
    check_server_url(cfg(allow_http=True), "http://198.51.100.1:8080")


def test_oidc_server_config_file_env_and_flags(tmp_path: Path) -> None:
    from coord import config

    f = tmp_path / "shoal.toml"
    f.write_text('server_url = "https://vpn.example.com"\n[oidc]\nissuer = "https://idp.example.com"\n'
                 'client_id = "shoal"\nclient_secret_env = "S"\nallowed_domains = ["example.com"]\n'
                 '[oidc.group_map]\n"shoal-admins" = "group:admins"\n')
    c = config.load(str(f), env={"S": "x", "SHOAL_OIDC_USER_NAME": "sub"},
                    overrides={"oidc_allowed_groups": "eng,ops", "oidc_group_map": ["eng=group:eng"]})
    o = c.oidc_config({"S": "x"})
    assert o is not None
    assert o.issuer == "https://idp.example.com" and o.allowed_domains == ("example.com",)
    assert o.user_name == "sub" and o.allowed_groups == ("eng", "ops")
    assert o.policy_groups == {"eng": "group:eng"}  # a flag replaces the file's table
    hash(c)
    o2 = config.load(str(f), env={}).oidc_config({"S": "y"})
    assert o2 is not None and o2.policy_groups == {"shoal-admins": "group:admins"}
    assert config.load(None, env={}).oidc_config({}) is None
    with pytest.raises(ConfigError, match="oidc: set issuer"):
        config.load(None, env={}, overrides={"oidc_client_id": "x"}).oidc_config({})
    with pytest.raises(ConfigError, match=r"oidc\.group_map: 'eng' is not IDP_GROUP=group:name"):
        config.load(None, env={}, overrides={"oidc_group_map": "eng"})
    with pytest.raises(ConfigError, match="sign-in cookies need https"):
        config.load(None, env={}, overrides={"server_url": "http://198.51.100.1:8080",
                                             "oidc_issuer": "https://idp", "oidc_client_id": "x",
                                             "oidc_client_secret_env": "S"}).oidc_config({"S": "x"})


def test_oidc_http_issuer_only_on_loopback_or_in_a_lab() -> None:
    assert "identity providers speak https" in err(issuer="http://idp.example.com")
    assert cfg(issuer="http://127.0.0.1:9000").issuer == "http://127.0.0.1:9000"
    assert cfg(issuer="http://203.0.113.1:9000", allow_http=True).allow_http
