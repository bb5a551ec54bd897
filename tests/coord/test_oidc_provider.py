"""The relying party against a scripted IdP (httpx.MockTransport): caching of discovery and keys, key rotation,
and every ID token check. The same checks run against the real oidc-provider in tests/oidc."""

from __future__ import annotations

import base64
import json
from typing import Any

import httpx
import pytest
from joserfc import jwt
from joserfc.jwk import OctKey, RSAKey

from coord.auth.config import parse
from coord.auth.flow import Transaction
from coord.auth.oidc import IdpUnavailable, Provider, TokenRefused

pytestmark = pytest.mark.anyio
ISS = "https://idp.example.com"
K1 = RSAKey.generate_key(2048, parameters={"kid": "k1", "alg": "RS256", "use": "sig"}, private=True)
K2 = RSAKey.generate_key(2048, parameters={"kid": "k2", "alg": "RS256", "use": "sig"}, private=True)


class FakeIdp:
    def __init__(self) -> None:
        self.keys = [K1]
        self.hits: list[str] = []
        self.down = False
        self.token_answer: dict[str, Any] = {}
        self.token_status = 200
        self.userinfo: dict[str, Any] = {"sub": "alice", "groups": ["g"]}
        self.discovery: dict[str, Any] = {
            "issuer": ISS, "authorization_endpoint": f"{ISS}/auth", "token_endpoint": f"{ISS}/token",
            "jwks_uri": f"{ISS}/jwks", "userinfo_endpoint": f"{ISS}/me", "response_types_supported": ["code"],
            "subject_types_supported": ["public"], "id_token_signing_alg_values_supported": ["RS256"],
            "token_endpoint_auth_methods_supported": ["client_secret_basic"],
        }
        self.last_token_request: httpx.Request | None = None

    def handler(self, request: httpx.Request) -> httpx.Response:
        self.hits.append(request.url.path)
        if self.down:
            raise httpx.ConnectError("down", request=request)
        path = request.url.path
        if path == "/.well-known/openid-configuration":
            return httpx.Response(200, json=self.discovery)
        if path == "/jwks":
            return httpx.Response(200, json={"keys": [k.as_dict(private=False) for k in self.keys]})
        if path == "/token":
            self.last_token_request = request
            return httpx.Response(self.token_status, json=self.token_answer)
        if path == "/me":
            return httpx.Response(200, json=self.userinfo)
        return httpx.Response(404)


class Clock:
    def __init__(self) -> None:
        self.t = 1_900_000_000.0

    def __call__(self) -> float:
        return self.t


def claims(clock: Clock, **kw: Any) -> dict[str, Any]:
    base = {"iss": ISS, "sub": "alice", "aud": "shoal", "iat": int(clock.t), "exp": int(clock.t) + 300,
            "nonce": "n1"}
    return {k: v for k, v in (base | kw).items() if v is not None}


def sign(c: dict[str, Any], key: Any = K1, alg: str = "RS256", kid: str | None = "k1") -> str:
    header: dict[str, Any] = {"alg": alg}
    if kid is not None:
        header["kid"] = kid
    return jwt.encode(header, c, key, algorithms=[alg])


@pytest.fixture
def env() -> tuple[FakeIdp, Provider, Clock]:
    idp, clock = FakeIdp(), Clock()
    cfg = parse({"issuer": ISS, "client_id": "shoal", "client_secret_env": "S"}, env={"S": "pa:ss word-long-enough"})
    http = httpx.AsyncClient(transport=httpx.MockTransport(idp.handler))
    return idp, Provider(cfg, "https://shoal.example/oidc/callback", http, clock), clock


async def refused(p: Provider, token: str, nonce: str = "n1") -> str:
    with pytest.raises(TokenRefused) as e:
        await p.validate_id_token(token, nonce)
    return e.value.code


async def test_oidc_provider_valid_token(env: tuple[FakeIdp, Provider, Clock]) -> None:
    idp, p, clock = env
    got = await p.validate_id_token(sign(claims(clock)), "n1")
    assert got["sub"] == "alice"
    await p.validate_id_token(sign(claims(clock)), "n1")
    assert idp.hits.count("/jwks") == 1 and idp.hits.count("/.well-known/openid-configuration") == 1


async def test_oidc_provider_each_bad_token(env: tuple[FakeIdp, Provider, Clock]) -> None:
    _, p, clock = env
    assert await refused(p, sign(claims(clock)), nonce="other") == "wrong_nonce"
    assert await refused(p, sign(claims(clock, nonce=None))) == "bad_token"
    assert await refused(p, sign(claims(clock, aud="other"))) == "wrong_audience"
    assert await refused(p, sign(claims(clock, aud=["other", "shoal"], azp="other"))) == "wrong_audience"
    assert await refused(p, sign(claims(clock, iss="https://evil.example"))) == "wrong_issuer"
    assert await refused(p, sign(claims(clock, exp=int(clock.t) - 31))) == "expired_token"
    assert await refused(p, sign(claims(clock, exp=None))) == "bad_token"
    assert await refused(p, sign(claims(clock), key=K2, kid="k1")) == "bad_signature"
    assert await refused(p, sign(claims(clock), key=K2, kid="k2")) == "unknown_key"
    assert await refused(p, "not.a.token") == "bad_token"
    # HMAC with the client secret, and alg "none", are never accepted
    hs = sign(claims(clock), key=OctKey.import_key("pa:ss word-long-enough"), alg="HS256", kid=None)
    assert await refused(p, hs) == "bad_token"
    head = base64.urlsafe_b64encode(b'{"alg":"none"}').rstrip(b"=").decode()
    body = base64.urlsafe_b64encode(json.dumps(claims(clock)).encode()).rstrip(b"=").decode()
    assert await refused(p, f"{head}.{body}.") == "bad_token"
    # within the clock-skew leeway an expiry just past is still accepted
    await p.validate_id_token(sign(claims(clock, exp=int(clock.t) - 10)), "n1")


async def test_oidc_provider_key_rotation_refreshes_at_most_once_a_minute(
    env: tuple[FakeIdp, Provider, Clock],
) -> None:
    idp, p, clock = env
    await p.validate_id_token(sign(claims(clock)), "n1")
    idp.keys = [K1, K2]  # the IdP rotates
    assert await refused(p, sign(claims(clock), key=K2, kid="k2")) == "unknown_key"
    assert idp.hits.count("/jwks") == 1  # fetched less than a minute ago: no refetch
    clock.t += 61
    assert (await p.validate_id_token(sign(claims(clock), key=K2, kid="k2"), "n1"))["sub"] == "alice"
    assert idp.hits.count("/jwks") == 2
    for _ in range(20):  # a flood of random kids costs nothing within the minute
        await refused(p, sign(claims(clock), key=K2, kid="random"))
    assert idp.hits.count("/jwks") == 2


async def test_oidc_provider_discovery_failures(env: tuple[FakeIdp, Provider, Clock]) -> None:
    idp, p, clock = env
    idp.down = True
    with pytest.raises(IdpUnavailable, match="did not answer"):
        await p.metadata()
    idp.down = False
    with pytest.raises(IdpUnavailable):  # within the retry pause the failure is remembered
        await p.metadata()
    assert idp.hits.count("/.well-known/openid-configuration") == 1
    clock.t += 11
    assert (await p.metadata()).token_endpoint == f"{ISS}/token"


@pytest.mark.parametrize(("change", "message"), [
    ({"issuer": "https://other.example"}, "says its issuer is"),
    ({"jwks_uri": None}, "discovery document is invalid"),
    ({"id_token_signing_alg_values_supported": ["HS256", "none"]}, "RS256\" MUST be included"),
])
async def test_oidc_provider_bad_discovery(env: tuple[FakeIdp, Provider, Clock], change: dict[str, Any],
                                           message: str) -> None:
    idp, p, _ = env
    idp.discovery = {k: v for k, v in (idp.discovery | change).items() if v is not None}
    with pytest.raises(IdpUnavailable, match=message):
        await p.metadata()


async def test_oidc_provider_refuses_private_keys_in_jwks(env: tuple[FakeIdp, Provider, Clock]) -> None:
    idp, p, clock = env
    orig = idp.handler

    def leaky(request: httpx.Request) -> httpx.Response:
        if request.url.path == "/jwks":
            return httpx.Response(200, json={"keys": [K1.as_dict(private=True)]})
        return orig(request)
    p.http = httpx.AsyncClient(transport=httpx.MockTransport(leaky))
    with pytest.raises(IdpUnavailable, match="private keys"):
        await p.validate_id_token(sign(claims(clock)), "n1")


async def test_oidc_provider_exchange_and_userinfo(env: tuple[FakeIdp, Provider, Clock]) -> None:
    idp, p, clock = env
    txn = Transaction("st", "n1", "verifier-123", "tok", "p1", "bh", clock.t)
    idp.token_answer = {"access_token": "at", "token_type": "Bearer", "id_token": sign(claims(clock))}
    got, info = await p.sign_in("the-code", txn)
    assert got["sub"] == "alice" and info == {"sub": "alice", "groups": ["g"]}
    req = idp.last_token_request
    assert req is not None
    form = dict(x.split("=", 1) for x in req.content.decode().split("&"))
    assert form["code_verifier"] == "verifier-123" and form["code"] == "the-code"
    assert "client_secret" not in form
    assert base64.b64decode(req.headers["authorization"].split()[1]) == b"shoal:pa%3Ass%20word-long-enough"
    idp.token_status, idp.token_answer = 400, {"error": "invalid_grant"}
    with pytest.raises(TokenRefused, match="invalid_grant") as e:
        await p.sign_in("the-code", txn)
    assert e.value.code == "code_refused"
    idp.token_status, idp.token_answer = 200, {"access_token": "at", "token_type": "Bearer"}
    with pytest.raises(TokenRefused) as e:
        await p.sign_in("c", txn)
    assert e.value.code == "no_id_token"
    idp.token_status = 500
    with pytest.raises(IdpUnavailable, match="answered 500"):
        await p.sign_in("c", txn)


async def test_oidc_provider_authorize_url(env: tuple[FakeIdp, Provider, Clock]) -> None:
    _, p, clock = env
    url = await p.authorize_url(Transaction("st", "n1", "v" * 43, "tok", "p1", "bh", clock.t))
    assert url.startswith(f"{ISS}/auth?")
    for part in ("response_type=code", "client_id=shoal", "state=st", "nonce=n1", "code_challenge_method=S256",
                 "scope=openid+email+profile", "redirect_uri=https%3A%2F%2Fshoal.example%2Foidc%2Fcallback"):
        assert part in url
