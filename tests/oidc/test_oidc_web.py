"""The sign-in routes against a real oidc-provider and a real chromium, on loopback.

The host here is a small in-memory stand-in for the coordination service (the end-to-end tests with the real
service and `shoal up` are tests/lab_tests/test_oidc_lab.py); it records what the routes asked of it.
"""

from __future__ import annotations

import time
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from typing import Any

import httpx
import pytest
from starlette.applications import Starlette

from coord.auth import pages
from coord.auth.claims import Identity, Profile, Refused
from coord.auth.config import Secret, parse
from coord.auth.oidc import Provider
from coord.auth.web import Approved, SignIn
from tests.oidc.browser import local_context, open_browser, sign_in
from tests.oidc.idp import CLIENT_ID, Idp
from tests.oidc.rig import Tamper, forge, serve, unverified_claims

pytestmark = pytest.mark.anyio


@dataclass
class Host:
    pending: dict[str, pages.Machine] = field(default_factory=dict)
    names: dict[str, Identity] = field(default_factory=dict)
    approved: list[tuple[str, Profile]] = field(default_factory=list)
    refusals: list[tuple[str, Identity | None, str | None]] = field(default_factory=list)

    def machine(self, pending_id: str) -> pages.Machine | None:
        return self.pending.get(pending_id)

    def check(self, profile: Profile) -> None:
        owner = self.names.get(profile.name)
        if owner is not None and owner != profile.identity:
            raise Refused("name_taken", f"the user name {profile.name} belongs to another identity",
                          profile.identity)

    async def approve_signed_in(self, pending_id: str, profile: Profile) -> Approved:
        self.check(profile)
        m = self.pending.pop(pending_id)
        self.names[profile.name] = profile.identity
        self.approved.append((pending_id, profile))
        return Approved(m.hostname, profile.name, "100.64.0.1")

    async def refused(self, code: str, identity: Identity | None, pending_id: str | None) -> None:
        self.refusals.append((code, identity, pending_id))


@dataclass
class Rig:
    idp: Idp
    host: Host
    signin: SignIn
    tamper: Tamper
    url: str
    skew: list[float]

    def login_url(self, pending_id: str = "p1", hostname: str = "laptop") -> str:
        self.host.pending.setdefault(pending_id, pages.Machine(hostname, "linux", "192.0.2.10", 0.0))
        return self.signin.login_url(pending_id)


def oidc_config(idp: Idp, **extra: Any) -> dict[str, Any]:
    return {"issuer": idp.issuer, "client_id": CLIENT_ID, "client_secret_env": "SECRET",
            "scopes": ["openid", "email", "profile", "groups"],
            "group_map": {"shoal-admins": "group:admins"}, **extra}


@pytest.fixture
async def rig(idp: Idp, server_port: int, request: pytest.FixtureRequest) -> AsyncIterator[Rig]:
    extra = getattr(request, "param", {})
    cfg = parse(oidc_config(idp, **extra), env={"SECRET": idp.client_secret})
    url = f"http://127.0.0.1:{server_port}"
    tamper = Tamper()
    async with httpx.AsyncClient(transport=tamper, timeout=5) as http:
        skew = [0.0]

        def clock() -> float:
            return time.time() + skew[0]
        provider = Provider(cfg, f"{url}/oidc/callback", http, clock)
        host = Host()
        signin = SignIn(cfg, provider, host, url, clock)
        app = Starlette(routes=signin.routes())
        async with serve(app, "127.0.0.1", server_port):
            yield Rig(idp, host, signin, tamper, url, skew)


async def approve_in_browser(r: Rig, login: str = "alice", pending_id: str = "p1") -> Any:
    async with open_browser() as browser:
        ctx = await local_context(browser, {"127.0.0.1"})
        page = await ctx.new_page()
        t0 = time.monotonic()
        await sign_in(page, r.login_url(pending_id), login, back_to=r.url)
        assert await page.inner_text("h1") == "Add laptop to the tailnet?"
        await page.click("#approve")
        await page.wait_for_selector("text=Machine approved")
        return time.monotonic() - t0, await page.inner_text("body"), ctx.blocked  # type: ignore[attr-defined]


async def test_oidc_browser_sign_in_confirm_approve(rig: Rig) -> None:
    took, text, blocked = await approve_in_browser(rig)
    assert "laptop joined the tailnet as alice@example.com" in text
    ((pid, profile),) = rig.host.approved
    assert pid == "p1"
    assert profile.identity == Identity(rig.idp.issuer, "alice")
    assert profile.groups == ("group:admins",)  # "staff" is not mapped: it gives nothing
    assert profile.idp_groups == ("shoal-admins",)
    assert profile.email_verified
    assert rig.host.refusals == []
    assert any("fonts.googleapis.com" in u for u in blocked)  # the IdP's page tried; the context refused
    assert took < 10


async def test_oidc_confirm_page_shows_the_machine(rig: Rig) -> None:
    rig.host.pending["p1"] = pages.Machine("build-box", "linux", "198.51.100.7", 0.0)
    async with open_browser() as browser:
        ctx = await local_context(browser, {"127.0.0.1"})
        page = await ctx.new_page()
        await sign_in(page, rig.login_url(), "alice", back_to=rig.url)
        assert await page.inner_text("#machine") == "build-box"
        assert await page.inner_text("#operating-system") == "linux"
        assert await page.inner_text("#asked-from") == "198.51.100.7"
        assert "ago" in await page.inner_text("#asked")
        assert await page.inner_text("#your-groups-here") == "group:admins"
        cookies = {c["name"]: c for c in await ctx.cookies()}
        s = cookies["shoal_session"]
        assert s["httpOnly"] and s["sameSite"] == "Lax" and not s["secure"]  # http on loopback: not Secure
    assert rig.host.approved == []  # nothing without the POST


async def test_oidc_confirm_without_csrf_is_refused(rig: Rig) -> None:
    async with open_browser() as browser:
        ctx = await local_context(browser, {"127.0.0.1"})
        page = await ctx.new_page()
        await sign_in(page, rig.login_url(), "alice", back_to=rig.url)
        await page.evaluate("document.querySelector('input[name=csrf]').remove()")
        await page.click("#approve")
        await page.wait_for_selector("#code")
        assert await page.inner_text("#code") == "csrf"
        assert await page.inner_text("h1") == "Approval not accepted"
    assert rig.host.approved == []
    assert "p1" in rig.host.pending


async def test_oidc_replayed_callback_and_tampered_state(rig: Rig) -> None:
    async with open_browser() as browser:
        ctx = await local_context(browser, {"127.0.0.1"})
        page = await ctx.new_page()
        callbacks: list[str] = []
        page.on("request", lambda req: callbacks.append(req.url) if "/oidc/callback" in req.url else None)
        await sign_in(page, rig.login_url(), "alice", back_to=rig.url)
        (cb,) = callbacks
        await page.goto(cb)  # the same callback again, same browser
        assert await page.inner_text("#code") == "unknown_state"
        await page.goto(cb.replace("state=", "state=x"))
        assert await page.inner_text("#code") == "unknown_state"
    assert rig.host.approved == []
    assert [c for c, _, _ in rig.host.refusals] == ["unknown_state", "unknown_state"]


async def test_oidc_login_url_is_single_use_and_expires(rig: Rig) -> None:
    url = rig.login_url()
    async with httpx.AsyncClient() as c:
        first = await c.get(url)
        assert first.status_code == 302 and first.headers["location"].startswith(rig.idp.issuer)
        again = await c.get(url)
        assert again.status_code == 410 and 'id="code">login_used<' in again.text
        rig.signin.flows.ttl = 0.0
        stale = rig.signin.login_url("p2")
        time.sleep(0.01)
        late = await c.get(stale)
        assert 'id="code">login_expired<' in late.text or 'id="code">unknown_login<' in late.text
        unknown = await c.get(f"{rig.url}/login/nonsense")
        assert unknown.status_code == 404 and 'id="code">unknown_login<' in unknown.text


async def test_oidc_authorization_request_has_state_nonce_pkce(rig: Rig) -> None:
    from urllib.parse import parse_qs, urlsplit

    async with httpx.AsyncClient() as c:
        r = await c.get(rig.login_url())
    q = {k: v[0] for k, v in parse_qs(urlsplit(r.headers["location"]).query).items()}
    assert q["response_type"] == "code" and q["client_id"] == CLIENT_ID
    assert q["code_challenge_method"] == "S256" and len(q["code_challenge"]) == 43
    assert len(q["state"]) >= 43 and len(q["nonce"]) >= 43
    assert q["redirect_uri"] == f"{rig.url}/oidc/callback"
    set_cookie = r.headers["set-cookie"]
    assert set_cookie.startswith("shoal_login=") and "HttpOnly" in set_cookie and "SameSite=lax" in set_cookie


async def refused_in_browser(r: Rig, login: str = "alice") -> str:
    async with open_browser() as browser:
        ctx = await local_context(browser, {"127.0.0.1"})
        page = await ctx.new_page()
        await sign_in(page, r.login_url(), login, back_to=r.url)
        await page.wait_for_selector("#code")
        code = await page.inner_text("#code")
    assert r.host.approved == []
    assert "p1" in r.host.pending
    assert r.host.refusals and r.host.refusals[-1][0] == code
    return code


def _claims(r: Rig, token: dict[str, Any]) -> dict[str, Any]:
    return unverified_claims(token["id_token"])


async def test_oidc_wrong_nonce(rig: Rig) -> None:
    def rewrite(t: dict[str, Any]) -> dict[str, Any]:
        c = _claims(rig, t) | {"nonce": "not-the-one-we-sent"}
        return t | {"id_token": forge(rig.idp.key, c)}
    rig.tamper.rewrite = rewrite
    assert await refused_in_browser(rig) == "wrong_nonce"


async def test_oidc_expired_id_token(rig: Rig) -> None:
    def rewrite(t: dict[str, Any]) -> dict[str, Any]:
        now = int(time.time())
        c = _claims(rig, t) | {"iat": now - 7200, "exp": now - 3600}
        return t | {"id_token": forge(rig.idp.key, c)}
    rig.tamper.rewrite = rewrite
    assert await refused_in_browser(rig) == "expired_token"


async def test_oidc_token_signed_by_unknown_key(rig: Rig) -> None:
    from joserfc.jwk import RSAKey

    stranger = RSAKey.generate_key(2048, parameters={"kid": "not-published"}, private=True)

    def rewrite(t: dict[str, Any]) -> dict[str, Any]:
        return t | {"id_token": forge(stranger, _claims(rig, t))}
    rig.tamper.rewrite = rewrite
    assert await refused_in_browser(rig) == "unknown_key"
    provider = rig.signin.provider
    assert provider.jwks_fetches == 1  # fetched for the first token; no second fetch within the minute

    async def again(pending_id: str) -> None:
        rig.host.pending[pending_id] = pages.Machine("laptop", "linux", "192.0.2.10", 0.0)
        async with open_browser() as browser:
            ctx = await local_context(browser, {"127.0.0.1"})
            page = await ctx.new_page()
            await sign_in(page, rig.signin.login_url(pending_id), "alice", back_to=rig.url)
            assert await page.inner_text("#code") == "unknown_key"

    rig.skew[0] = 61.0
    await again("p2")
    assert provider.jwks_fetches == 2  # a minute later an unknown kid refreshes the keys once
    await again("p3")
    assert provider.jwks_fetches == 2  # and not again within that minute
    assert provider.discovery_fetches == 1


async def test_oidc_token_with_published_kid_but_other_key(rig: Rig) -> None:
    from joserfc.jwk import RSAKey

    stranger = RSAKey.generate_key(2048, private=True)

    def rewrite(t: dict[str, Any]) -> dict[str, Any]:
        return t | {"id_token": forge(stranger, _claims(rig, t), kid=rig.idp.key.kid)}
    rig.tamper.rewrite = rewrite
    assert await refused_in_browser(rig) == "bad_signature"


async def test_oidc_wrong_audience(rig: Rig) -> None:
    def rewrite(t: dict[str, Any]) -> dict[str, Any]:
        return t | {"id_token": forge(rig.idp.key, _claims(rig, t) | {"aud": "some-other-client"})}
    rig.tamper.rewrite = rewrite
    assert await refused_in_browser(rig) == "wrong_audience"


async def test_oidc_unverified_email(rig: Rig) -> None:
    assert await refused_in_browser(rig, "unverified") == "unverified_email"


@pytest.mark.parametrize("rig", [{"allowed_domains": ["example.com"]}], indirect=True)
async def test_oidc_disallowed_domain(rig: Rig) -> None:
    assert await refused_in_browser(rig, "outsider") == "domain_not_allowed"
    ((_, identity, pid),) = rig.host.refusals
    assert identity == Identity(rig.idp.issuer, "outsider") and pid == "p1"


@pytest.mark.parametrize("rig", [{"allowed_groups": ["shoal-admins"]}], indirect=True)
async def test_oidc_disallowed_group(rig: Rig) -> None:
    assert await refused_in_browser(rig, "carol") == "group_not_allowed"


async def test_oidc_name_of_another_identity_is_refused(rig: Rig) -> None:
    rig.host.names["alice@example.com"] = Identity("https://other-idp.example", "alice")
    assert await refused_in_browser(rig) == "name_taken"


async def test_oidc_idp_down(rig: Rig) -> None:
    url = rig.login_url()
    rig.tamper.down = True
    async with httpx.AsyncClient() as c:
        r = await c.get(url)
        assert r.status_code == 503 and 'id="code">idp_unavailable<' in r.text
        assert "stays pending" in r.text
        # The link was not used up: once the IdP is back (after the retry pause), it works.
        rig.tamper.down = False
        rig.signin.provider._meta_failed = None
        r = await c.get(url)
        assert r.status_code == 302
    assert "p1" in rig.host.pending and rig.host.approved == []


async def test_oidc_idp_down_at_token_exchange(rig: Rig) -> None:
    async with open_browser() as browser:
        ctx = await local_context(browser, {"127.0.0.1"})
        page = await ctx.new_page()
        orig = rig.tamper.handle_async_request

        async def down_at_token(request: httpx.Request) -> httpx.Response:
            if request.url.path.endswith("/token"):
                raise httpx.ConnectError("refused", request=request)
            return await orig(request)
        rig.tamper.handle_async_request = down_at_token  # type: ignore[method-assign]
        await sign_in(page, rig.login_url(), "alice", back_to=rig.url)
        assert await page.inner_text("#code") == "idp_unavailable"
    assert rig.host.approved == [] and "p1" in rig.host.pending


async def test_oidc_secret_never_in_pages_or_repr(rig: Rig) -> None:
    cfg = rig.signin.cfg
    assert rig.idp.client_secret not in repr(cfg) and rig.idp.client_secret not in str(cfg)
    assert isinstance(cfg.client_secret, Secret)
    async with httpx.AsyncClient() as c:
        r = await c.get(rig.login_url())
    assert rig.idp.client_secret not in r.headers["location"]
