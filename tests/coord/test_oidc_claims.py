"""Claims -> Profile (pure): identity by issuer+subject, verified-e-mail allow-lists, groups only via the mapping."""

from __future__ import annotations

from typing import Any

import pytest
from hypothesis import given
from hypothesis import strategies as st

from coord.auth.claims import Identity, Refused, dotted, map_claims
from coord.auth.config import OidcConfig, parse

ISS = "https://idp.example.com"


def cfg(**kw: Any) -> OidcConfig:
    return parse({"issuer": ISS, "client_id": "shoal", "client_secret_env": "S", **kw}, env={"S": "x"})


def tok(**kw: Any) -> dict[str, Any]:
    base: dict[str, Any] = {"iss": ISS, "sub": "u-1", "aud": "shoal", "exp": 2_000_000_000, "iat": 1,
                            "email": "Alice@Example.com", "email_verified": True, "name": "Alice"}
    return {k: v for k, v in (base | kw).items() if v is not None}


def refused(c: OidcConfig, claims: dict[str, Any], info: dict[str, Any] | None = None) -> str:
    with pytest.raises(Refused) as e:
        map_claims(c, claims, info)
    return e.value.code


def test_oidc_claims_identity_and_name() -> None:
    p = map_claims(cfg(), tok())
    assert p.identity == Identity(ISS, "u-1")
    assert p.name == "alice@example.com" and p.email == "alice@example.com" and p.email_verified
    assert p.display_name == "Alice" and p.groups == () and p.expiry is None


def test_oidc_claims_name_strategies() -> None:
    assert map_claims(cfg(user_name="preferred_username"), tok(preferred_username="al")).name == "al"
    assert map_claims(cfg(user_name="sub"), tok()).name == "u-1"
    assert refused(cfg(user_name="preferred_username"), tok()) == "no_name"
    assert refused(cfg(user_name="preferred_username"), tok(preferred_username="not ok")) == "bad_name"
    assert refused(cfg(user_name="sub"), tok(sub="a" * 70)) == "bad_name"
    # The e-mail strategy needs a verified address: an unverified one could take someone else's name.
    assert refused(cfg(), tok(email_verified=False)) == "unverified_email"
    assert refused(cfg(), tok(email=None)) == "no_name"
    # preferred_username does not need an e-mail at all
    assert map_claims(cfg(user_name="preferred_username"), tok(email=None, preferred_username="al")).name == "al"


def test_oidc_claims_email_verified_must_be_true() -> None:
    c = cfg(allowed_domains=["example.com"])
    for v in (False, "false", 1, "yes", None):
        assert refused(c, tok(email_verified=v)) == "unverified_email", v
    assert map_claims(c, tok(email_verified="true")).email_verified


def test_oidc_claims_allow_lists_are_anded() -> None:
    c = cfg(allowed_domains=["example.com"], allowed_users=["alice@example.com", "bob@example.com"])
    assert map_claims(c, tok()).name == "alice@example.com"
    assert refused(c, tok(email="carol@example.com")) == "user_not_allowed"
    assert refused(cfg(allowed_domains=["example.com"]), tok(email="a@example.com.evil")) == "domain_not_allowed"
    assert refused(cfg(allowed_domains=["example.com"]), tok(email="a@sub.example.com")) == "domain_not_allowed"
    assert refused(cfg(allowed_users=["x@y.example"]), tok(email=None)) == "no_email"


def test_oidc_claims_groups_through_the_mapping_only() -> None:
    c = cfg(group_map={"shoal-admins": "group:admins", "eng": "group:eng"}, allowed_groups=["staff"])
    p = map_claims(c, tok(), {"sub": "u-1", "groups": ["staff", "eng", "shoal-admins-fake", "shoal-admins"]})
    assert p.groups == ("group:admins", "group:eng")
    assert p.idp_groups == ("eng", "shoal-admins", "staff")  # only groups the config names are kept
    assert refused(c, tok(), {"sub": "u-1", "groups": ["eng"]}) == "group_not_allowed"
    assert map_claims(cfg(group_map={"a": "group:a"}), tok(groups="a")).groups == ("group:a",)


def test_oidc_claims_nested_groups_claim() -> None:
    c = cfg(groups_claim="realm_access.roles", group_map={"ops": "group:ops"})
    assert map_claims(c, tok(realm_access={"roles": ["ops"]})).groups == ("group:ops",)
    assert map_claims(c, tok(realm_access={"other": 1})).groups == ()
    assert map_claims(c, tok(realm_access="flat")).groups == ()
    assert dotted({"a": {"b": {"c": 1}}}, ("a", "b", "c")) == 1


def test_oidc_claims_bad_groups_are_refused() -> None:
    c = cfg(group_map={"a": "group:a"})
    assert refused(c, tok(groups=[1, 2])) == "bad_groups"
    assert refused(c, tok(groups={"a": True})) == "bad_groups"
    assert refused(c, tok(groups=[str(i) for i in range(300)])) == "bad_groups"
    assert refused(c, tok(groups=["x" * 300])) == "bad_groups"


def test_oidc_claims_userinfo_must_be_the_same_subject() -> None:
    assert refused(cfg(), tok(), {"sub": "someone-else", "groups": []}) == "userinfo_mismatch"
    assert refused(cfg(), tok(), {"groups": []}) == "userinfo_mismatch"
    # userinfo cannot move the token's issuer or expiry
    p = map_claims(cfg(expiry_from_token=True), tok(), {"sub": "u-1", "iss": "https://evil", "exp": 1})
    assert p.identity.issuer == ISS and p.expiry == 2_000_000_000


def test_oidc_claims_need_issuer_and_subject() -> None:
    assert refused(cfg(), tok(sub=None)) == "bad_token"
    assert refused(cfg(), tok(sub=5)) == "bad_token"
    assert refused(cfg(), tok(iss=None)) == "bad_token"


json_values = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats(allow_nan=False) | st.text(max_size=20),
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=8), inner, max_size=4),
    max_leaves=20,
)
claim_dicts = st.dictionaries(
    st.sampled_from(["iss", "sub", "email", "email_verified", "groups", "name", "preferred_username", "exp",
                     "realm_access"]) | st.text(max_size=6),
    json_values, max_size=10,
)


@given(claim_dicts, st.none() | claim_dicts)
def test_oidc_claims_fuzz_any_json_gives_a_profile_or_a_refusal(claims: dict[str, Any],
                                                                info: dict[str, Any] | None) -> None:
    c = cfg(groups_claim="realm_access.roles", group_map={"a": "group:a"}, allowed_domains=["example.com"])
    for strategy_cfg in (c, cfg(user_name="sub"), cfg(user_name="preferred_username")):
        try:
            p = map_claims(strategy_cfg, claims, info)
        except Refused as e:
            assert e.code and e.message
        else:
            assert p.identity.subject == claims["sub"]
            assert all(g.startswith("group:") for g in p.groups)
