"""Sign-in against a real oidc-provider and a real chromium, with the real server (create_app) on loopback.

A simulated node registers without an auth key and waits; the browser signs in and approves. Each refusal must
be a clear page with a stable code and change nothing: no event but the rate-limited SignInRefused audit record,
the node still pending. (`shoal up` in a lab node is tests/lab_tests/test_oidc_lab.py.)
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx
import pytest

from coord import decide
from coord.auth.claims import Identity
from coord.auth.config import Secret
from coord.auth.web import SignIn
from coord.logins import Logins
from coord.store import Filter
from tests.coord.harness import Running, SimNode, running_server, sim_node
from tests.oidc.browser import local_context, open_browser, sign_in
from tests.oidc.idp import CLIENT_ID, Idp
from tests.oidc.rig import Tamper, forge, unverified_claims

pytestmark = pytest.mark.anyio


@dataclass
class Rig:
    idp: Idp
    server: Running
    tamper: Tamper
    url: str
    skew: list[float]
    node: SimNode | None = None

    @property
    def signin(self) -> SignIn:
        assert self.server.app.signin is not None
        return self.server.app.signin

    @property
    def host(self) -> Logins:
        return self.server.logins

    async def pending(self, hostname: str = "laptop") -> str:
        """A node registers without a key; returns the login URL it got."""
        self.node = sim_node(self.url, hostname)
        await self.node.client.pin()
        resp = await self.node.client.register(self.node.register_request())
        assert resp["MachineAuthorized"] is False
        return str(resp["AuthURL"])

    async def login_url(self, hostname: str = "laptop") -> str:
        return await self.pending(hostname)

    async def events(self, after: int = 0) -> list[str]:
        return [r.event.type async for r in self.server.svc.store.read(Filter()) if r.seq > after]


def extra_config(idp: Idp, secret_file: Path, **extra: Any) -> dict[str, Any]:
    out = {"oidc_issuer": idp.issuer, "oidc_client_id": CLIENT_ID, "oidc_client_secret_file": str(secret_file),
           "oidc_scopes": "openid,email,profile,groups", "oidc_group_map": ["shoal-admins=group:admins"]}
    out.update({f"oidc_{k}": v for k, v in extra.items()})
    return out


@pytest.fixture
async def rig(idp: Idp, server_port: int, tmp_path: Path, request: pytest.FixtureRequest) -> AsyncIterator[Rig]:
    extra = getattr(request, "param", {})
    secret = tmp_path / "client-secret"
    secret.write_text(idp.client_secret + "\n")
    url = f"http://127.0.0.1:{server_port}"
    tamper = Tamper()
    skew = [0.0]

    def clock() -> float:
        return time.time() + skew[0]
    async with httpx.AsyncClient(transport=tamper, timeout=5) as http, running_server(
        tmp_path / "server", app_kw={"oidc_http": http, "clock": clock}, listen=f"127.0.0.1:{server_port}",
        server_url=url, **extra_config(idp, secret, **extra),
    ) as server:
        yield Rig(idp, server, tamper, url, skew)


async def approve_in_browser(r: Rig, login: str = "alice", hostname: str = "laptop") -> tuple[float, str, Any]:
    url = await r.pending(hostname)
    assert r.node is not None
    waiting = asyncio.create_task(r.node.client.register(r.node.register_request(followup=url)))
    async with open_browser() as browser:
        ctx = await local_context(browser, {"127.0.0.1"})
        page = await ctx.new_page()
        t0 = time.monotonic()
        await sign_in(page, url, login, back_to=r.url)
        assert await page.inner_text("h1") == f"Add {hostname} to the tailnet?"
        await page.click("#approve")
        await page.wait_for_selector("text=Machine approved")
        took = time.monotonic() - t0
        text = await page.inner_text("body")
    resp = await asyncio.wait_for(waiting, 10)
    assert resp["MachineAuthorized"] is True
    return took, text, ctx.blocked  # type: ignore[attr-defined]


async def test_oidc_browser_sign_in_confirm_approve(rig: Rig) -> None:
    before = rig.server.svc.state.last_seq
    took, text, blocked = await approve_in_browser(rig)
    assert "laptop joined the tailnet as alice@example.com" in text
    assert await rig.events(before) == ["UserCreated", "UserClaimsUpdated", "NodeRegistered", "UserSignedIn"]
    st = rig.server.svc.state
    (u,) = st.users.values()
    assert (u.issuer, u.subject, u.name) == (rig.idp.issuer, "alice", "alice@example.com")
    assert u.groups == ("group:admins",)  # "staff" is not mapped: it gives nothing
    assert u.idp_groups == ("shoal-admins",) and u.email_verified
    (n,) = st.nodes.values()
    assert n.user_id == u.id and n.hostname == "laptop"
    assert rig.host.pending == {}
    assert any("fonts.googleapis.com" in u for u in blocked)  # the IdP's page tried; the context refused
    assert took < 10
    # a second machine of the same person: same user, nothing about the user rewritten
    seq = rig.server.svc.state.last_seq
    await approve_in_browser(rig, hostname="desktop")
    assert await rig.events(seq) == ["NodeRegistered", "UserSignedIn"]
    assert len(rig.server.svc.state.users) == 1


async def test_oidc_confirm_page_shows_the_machine(rig: Rig) -> None:
    url = await rig.pending("build-box")
    async with open_browser() as browser:
        ctx = await local_context(browser, {"127.0.0.1"})
        page = await ctx.new_page()
        await sign_in(page, url, "alice", back_to=rig.url)
        assert await page.inner_text("#machine") == "build-box"
        assert await page.inner_text("#operating-system") == "linux"
        assert await page.inner_text("#asked-from") == "127.0.0.1"
        assert "seconds ago" in await page.inner_text("#asked")
        assert await page.inner_text("#your-groups-here") == "group:admins"
        cookies = {c["name"]: c for c in await ctx.cookies()}
        s = cookies["shoal_session"]
        assert s["httpOnly"] and s["sameSite"] == "Lax" and not s["secure"]  # http on loopback: not Secure
    assert rig.server.svc.state.users == {} and len(rig.host.pending) == 1  # nothing without the POST


async def refused_in_browser(r: Rig, login: str = "alice", *, edit: str = "", replay: bool = False) -> str:
    """Runs one sign-in that must be refused; checks the page and that nothing changed."""
    url = await r.pending()
    seq = r.server.svc.state.last_seq
    waiting = len(r.host.pending)
    async with open_browser() as browser:
        ctx = await local_context(browser, {"127.0.0.1"})
        page = await ctx.new_page()
        await sign_in(page, url, login, back_to=r.url)
        if edit:
            await page.evaluate(edit)
            await page.click("#approve")
        await page.wait_for_selector("#code")
        code = await page.inner_text("#code")
        assert await page.inner_text("#message")
    assert set(await r.events(seq)) <= {"SignInRefused"}
    assert r.server.svc.state.nodes == {} and len(r.host.pending) == waiting
    assert r.host.refusals.by_code[code] >= 1
    return code


async def test_oidc_confirm_without_csrf_is_refused(rig: Rig) -> None:
    code = await refused_in_browser(rig, edit="document.querySelector('input[name=csrf]').remove()")
    assert code == "csrf"
    code = await refused_in_browser(rig, edit="document.querySelector('input[name=csrf]').value = 'forged'")
    assert code == "csrf"


async def test_oidc_replayed_callback_and_tampered_state(rig: Rig) -> None:
    url = await rig.pending()
    seq = rig.server.svc.state.last_seq
    async with open_browser() as browser:
        ctx = await local_context(browser, {"127.0.0.1"})
        page = await ctx.new_page()
        callbacks: list[str] = []
        page.on("request", lambda req: callbacks.append(req.url) if "/oidc/callback" in req.url else None)
        await sign_in(page, url, "alice", back_to=rig.url)
        (cb,) = callbacks
        await page.goto(cb)  # the same callback again, same browser
        assert await page.inner_text("#code") == "unknown_state"
        await page.goto(cb.replace("state=", "state=x"))
        assert await page.inner_text("#code") == "unknown_state"
    assert await rig.events(seq) == []  # no identity behind a bad state: counted, not logged
    assert rig.host.refusals.by_code["unknown_state"] == 2
    assert rig.server.svc.state.nodes == {}


async def test_oidc_tampered_state_on_the_first_callback(rig: Rig) -> None:
    url = await rig.pending()
    async with open_browser() as browser:
        ctx = await local_context(browser, {"127.0.0.1"})
        page = await ctx.new_page()
        held: list[str] = []

        async def hold(route: Any) -> None:
            # The IdP sends the browser to the callback with a redirect, which routes do not see: fetch the
            # IdP's answer ourselves and keep the callback URL instead of following it.
            resp = await route.fetch(max_redirects=0)
            location = resp.headers.get("location", "")
            while location.startswith(rig.idp.issuer) or location.startswith("/"):
                nxt = location if location.startswith("http") else rig.idp.issuer + location
                resp = await ctx.request.get(nxt, max_redirects=0)
                location = resp.headers.get("location", "")
            if "/oidc/callback" in location:
                held.append(location)
                await route.fulfill(status=200, content_type="text/html", body="<p>held by the test</p>")
            else:
                await route.fulfill(response=resp)

        def at_idp(u: str) -> bool:
            return u.startswith(rig.idp.issuer)
        await page.route(at_idp, hold)
        await page.goto(url)
        await page.fill('input[name="login"]', "alice")
        await page.fill('input[name="password"]', "x")
        await page.click('button[type="submit"]')
        await page.wait_for_selector('input[name="prompt"][value="consent"]', state="attached")
        await page.click('button[type="submit"]')
        await page.wait_for_selector("text=held by the test")
        await page.unroute(at_idp)
        (cb,) = held
        await page.goto(cb.replace("state=", "state=A"))
        assert await page.inner_text("#code") == "unknown_state"
        await page.goto(cb)  # the untampered callback still works: the tampered one used nothing up
        assert await page.inner_text("h1") == "Add laptop to the tailnet?"
    assert rig.server.svc.state.nodes == {} and len(rig.host.pending) == 1


async def test_oidc_login_url_is_single_use_and_expires(rig: Rig) -> None:
    url = await rig.pending()
    async with httpx.AsyncClient() as c:
        first = await c.get(url)
        assert first.status_code == 302 and first.headers["location"].startswith(rig.idp.issuer)
        again = await c.get(url)
        assert again.status_code == 410 and 'id="code">login_used<' in again.text
        # running `shoal up` again gives the same pending machine a fresh link
        assert rig.node is not None
        fresh = await rig.node.client.register(rig.node.register_request())
        assert fresh["AuthURL"] != url and (await c.get(fresh["AuthURL"])).status_code == 302
        late_url = await rig.pending("other")
        rig.skew[0] = 601.0
        late = await c.get(late_url)
        assert 'id="code">login_expired<' in late.text
        unknown = await c.get(f"{rig.url}/login/nonsense")
        assert unknown.status_code == 404 and 'id="code">unknown_login<' in unknown.text
    assert rig.server.svc.state.nodes == {}


async def test_oidc_followup_with_an_unknown_login_url_is_refused(rig: Rig) -> None:
    # (a follow-up with the real URL is held until approval: approve_in_browser relies on it)
    await rig.pending()
    assert rig.node is not None
    with pytest.raises(Exception, match="unknown or expired login"):
        await rig.node.client.register(rig.node.register_request(followup=f"{rig.url}/login/not-a-token"))


async def test_oidc_authorization_request_has_state_nonce_pkce(rig: Rig) -> None:
    from urllib.parse import parse_qs, urlsplit

    async with httpx.AsyncClient() as c:
        r = await c.get(await rig.pending())
    q = {k: v[0] for k, v in parse_qs(urlsplit(r.headers["location"]).query).items()}
    assert q["response_type"] == "code" and q["client_id"] == CLIENT_ID
    assert q["code_challenge_method"] == "S256" and len(q["code_challenge"]) == 43
    assert len(q["state"]) >= 43 and len(q["nonce"]) >= 43
    assert q["redirect_uri"] == f"{rig.url}/oidc/callback"
    set_cookie = r.headers["set-cookie"]
    assert set_cookie.startswith("shoal_login=") and "HttpOnly" in set_cookie and "SameSite=lax" in set_cookie


def _claims(token: dict[str, Any]) -> dict[str, Any]:
    return unverified_claims(token["id_token"])


async def test_oidc_wrong_nonce(rig: Rig) -> None:
    rig.tamper.rewrite = lambda t: t | {"id_token": forge(rig.idp.key, _claims(t) | {"nonce": "not-ours"})}
    assert await refused_in_browser(rig) == "wrong_nonce"


async def test_oidc_expired_id_token(rig: Rig) -> None:
    now = int(time.time())
    rig.tamper.rewrite = lambda t: t | {"id_token": forge(rig.idp.key, _claims(t) | {"iat": now - 7200,
                                                                                      "exp": now - 3600})}
    assert await refused_in_browser(rig) == "expired_token"


async def test_oidc_token_signed_by_unknown_key(rig: Rig) -> None:
    from joserfc.jwk import RSAKey

    stranger = RSAKey.generate_key(2048, parameters={"kid": "not-published"}, private=True)
    rig.tamper.rewrite = lambda t: t | {"id_token": forge(stranger, _claims(t))}
    assert await refused_in_browser(rig) == "unknown_key"
    provider = rig.signin.provider
    assert provider.jwks_fetches == 1  # fetched for the first token; no second fetch within the minute
    rig.skew[0] = 61.0
    assert await refused_in_browser(rig) == "unknown_key"
    assert provider.jwks_fetches == 2  # a minute later an unknown kid refreshes the keys once
    assert await refused_in_browser(rig) == "unknown_key"
    assert provider.jwks_fetches == 2  # and not again within that minute
    assert provider.discovery_fetches == 1


async def test_oidc_token_with_published_kid_but_other_key(rig: Rig) -> None:
    from joserfc.jwk import RSAKey

    stranger = RSAKey.generate_key(2048, private=True)
    rig.tamper.rewrite = lambda t: t | {"id_token": forge(stranger, _claims(t), kid=rig.idp.key.kid)}
    assert await refused_in_browser(rig) == "bad_signature"


async def test_oidc_wrong_audience(rig: Rig) -> None:
    rig.tamper.rewrite = lambda t: t | {"id_token": forge(rig.idp.key, _claims(t) | {"aud": "another-client"})}
    assert await refused_in_browser(rig) == "wrong_audience"


async def test_oidc_unverified_email_is_audited_once_a_minute(rig: Rig) -> None:
    seq = rig.server.svc.state.last_seq
    assert await refused_in_browser(rig, "unverified") == "unverified_email"
    assert await refused_in_browser(rig, "unverified") == "unverified_email"
    assert rig.host.refusals.by_code["unverified_email"] == 2
    assert await rig.events(seq) == ["SignInRefused"]  # the second within the minute: counted, not logged
    rig.skew[0] = 61.0
    assert await refused_in_browser(rig, "unverified") == "unverified_email"
    assert await rig.events(seq) == ["SignInRefused", "SignInRefused"]
    assert rig.server.svc.state.users == {}


@pytest.mark.parametrize("rig", [{"allowed_domains": "example.com"}], indirect=True)
async def test_oidc_disallowed_domain(rig: Rig) -> None:
    seq = rig.server.svc.state.last_seq
    assert await refused_in_browser(rig, "outsider") == "domain_not_allowed"
    recs = [r async for r in rig.server.svc.store.read(Filter()) if r.seq > seq]
    assert [r.event.data() for r in recs] == [
        {"issuer": rig.idp.issuer, "subject": "outsider", "reason": "domain_not_allowed"}]
    assert await refused_in_browser(rig, "unverified") == "unverified_email"


@pytest.mark.parametrize("rig", [{"allowed_groups": "shoal-admins"}], indirect=True)
async def test_oidc_disallowed_group(rig: Rig) -> None:
    assert await refused_in_browser(rig, "carol") == "group_not_allowed"


async def test_oidc_name_of_another_identity_is_refused(rig: Rig) -> None:
    # an admin-made user holds the name alice's e-mail derives: the sign-in must not take it over
    await rig.server.svc.execute(lambda s: decide.create_user(s, "alice@example.com"), "admin")
    assert await refused_in_browser(rig) == "name_taken"
    assert [u.subject for u in rig.server.svc.state.users.values()] == [""]


async def test_oidc_idp_down(rig: Rig) -> None:
    url = await rig.pending()
    rig.tamper.down = True
    async with httpx.AsyncClient() as c:
        r = await c.get(url)
        assert r.status_code == 503 and 'id="code">idp_unavailable<' in r.text
        assert "stays pending" in r.text
        assert (await c.get(f"{rig.url}/health")).status_code == 200  # the server keeps serving
        # The link was not used up: once the IdP is back (after the retry pause), it works.
        rig.tamper.down = False
        rig.skew[0] = 11.0
        r = await c.get(url)
        assert r.status_code == 302
    assert len(rig.host.pending) == 1 and rig.server.svc.state.nodes == {}


async def test_oidc_idp_down_at_token_exchange(rig: Rig) -> None:
    orig = rig.tamper.handle_async_request

    async def down_at_token(request: httpx.Request) -> httpx.Response:
        if request.url.path.endswith("/token"):
            raise httpx.ConnectError("refused", request=request)
        return await orig(request)
    rig.tamper.handle_async_request = down_at_token  # type: ignore[method-assign]
    assert await refused_in_browser(rig) == "idp_unavailable"


async def test_oidc_secret_never_in_pages_events_or_repr(rig: Rig) -> None:
    cfg = rig.signin.cfg
    assert rig.idp.client_secret not in repr(cfg) and rig.idp.client_secret not in str(cfg)
    assert isinstance(cfg.client_secret, Secret)
    await approve_in_browser(rig)
    async for r in rig.server.svc.store.read(Filter()):
        assert rig.idp.client_secret not in str(r.as_json())
    assert Identity(rig.idp.issuer, "alice").key in {f"{u.issuer} {u.subject}" for u in
                                                     rig.server.svc.state.users.values()}
