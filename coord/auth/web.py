"""Sign-in routes (the thin shell over login flows, sessions, the relying party and the pages).

    GET  /login/<token>   a login URL from `shoal up`: used up, then 302 to the IdP (state, nonce, PKCE S256)
    GET  /oidc/callback   the IdP's redirect: validates everything, then the confirm page (sets the session)
    POST /oidc/confirm    the confirm form (session cookie + CSRF token): approves the pending node

Every refusal is a page with a stable code (``id="code"``) and changes no state; the `Host` counts it and
records at most one audit event per user per minute. The host is the coordination service: what the pages
need of it is the `Host` protocol, so this module knows nothing of events or the database.
"""

from __future__ import annotations

import logging
import secrets
from collections.abc import Callable
from dataclasses import dataclass
from typing import Protocol
from urllib.parse import parse_qsl

from starlette.requests import Request
from starlette.responses import HTMLResponse, RedirectResponse, Response
from starlette.routing import Route

from coord.auth import pages
from coord.auth.claims import Identity, Profile, Refused, map_claims
from coord.auth.config import OidcConfig
from coord.auth.flow import LOGIN_TTL, LoginError, LoginFlows
from coord.auth.oidc import IdpUnavailable, Provider, TokenRefused, new_transaction_secrets
from coord.auth.sessions import LOGIN_COOKIE, SESSION_COOKIE, CookieSpec, Sessions, csrf_ok
from coord.errors import DomainError

log = logging.getLogger("shoal.auth")

MAX_FORM = 4096


@dataclass(frozen=True)
class Approved:
    hostname: str
    user: str
    address: str


class Host(Protocol):
    """What sign-in needs of the coordination service."""

    def machine(self, pending_id: str) -> pages.Machine | None:
        """The pending node behind a login, or None if it is gone (approved, expired, deleted)."""

    def check(self, profile: Profile) -> None:
        """Raises Refused if the state refuses this sign-in (its name belongs to another identity, ...)."""

    async def approve_signed_in(self, pending_id: str, profile: Profile) -> Approved:
        """Creates or updates the user from the profile and registers the node: one decide, one append.
        Raises Refused (or a DomainError) to refuse."""

    async def refused(self, code: str, identity: Identity | None, pending_id: str | None) -> None:
        """Counts a refused sign-in; the host records at most one audit event per user per minute."""


class SignIn:
    def __init__(
        self,
        cfg: OidcConfig,
        provider: Provider,
        host: Host,
        server_url: str,
        clock: Callable[[], float],
        *,
        flows: LoginFlows | None = None,
        sessions: Sessions | None = None,
        token: Callable[[], str] = lambda: secrets.token_urlsafe(24),
    ) -> None:
        self.cfg = cfg
        self.provider = provider
        self.host = host
        self.base = server_url.rstrip("/")
        self.clock = clock
        self.flows = flows or LoginFlows()
        self.sessions = sessions or Sessions()
        self.cookie = CookieSpec.for_server(server_url)
        self.token = token

    def routes(self) -> list[Route]:
        return [
            Route("/login/{token}", self.login, methods=["GET"]),
            Route("/oidc/callback", self.callback, methods=["GET"]),
            Route("/oidc/confirm", self.confirm, methods=["POST"]),
        ]

    def login_url(self, pending_id: str) -> str:
        """The login URL for a pending node (the live one, or a fresh one)."""
        login = self.flows.issue(pending_id, self.clock(), self.token())
        return f"{self.base}/login/{login.token}"

    def resolve(self, token: str) -> str | None:
        """The pending id behind a login URL's token (see LoginFlows.pending_for)."""
        return self.flows.pending_for(token)

    def forget(self, pending_id: str) -> None:
        self.flows.forget_pending(pending_id)

    # --- responses --------------------------------------------------------------------------------------

    @staticmethod
    def _html(body: str, status: int = 200) -> HTMLResponse:
        return HTMLResponse(body, status_code=status, headers=pages.HEADERS)

    async def _refuse(
        self, status: int, title: str, code: str, message: str, next_step: str = "",
        identity: Identity | None = None, pending_id: str | None = None,
    ) -> HTMLResponse:
        try:
            await self.host.refused(code, identity, pending_id)
        except Exception:
            log.exception("recording a refused sign-in failed")
        log.info("sign-in refused: %s (%s)", code, identity.key if identity else "-")
        return self._html(pages.page(title, message, next_step, code=code), status)

    def _set_cookie(self, resp: Response, name: str, value: str, max_age: int) -> None:
        c = self.cookie
        resp.set_cookie(name, value, max_age=max_age, path=c.path, secure=c.secure, httponly=c.httponly,
                        samesite="lax")

    # --- GET /login/<token> -----------------------------------------------------------------------------

    async def login(self, request: Request) -> Response:
        token = request.path_params["token"]
        now = self.clock()
        s = new_transaction_secrets()
        try:
            # Check the IdP first: a login link must not be used up by a sign-in that cannot happen.
            await self.provider.metadata()
        except IdpUnavailable as e:
            return await self._refuse(503, "Identity provider unreachable", "idp_unavailable", str(e),
                                      "The machine stays pending. Try the same link again in a minute.")
        try:
            txn = self.flows.start(token, now, state=s["state"], nonce=s["nonce"], verifier=s["verifier"],
                                    browser=s["browser"])
        except LoginError as e:
            return await self._refuse(410 if e.code != "unknown_login" else 404, "This login link does not work",
                                      e.code, e.message)
        if self.host.machine(txn.pending_id) is None:
            return await self._refuse(410, "Nothing to approve", "not_pending", "the machine behind this link is "
                                      "no longer waiting (approved, expired or removed)", "Run `shoal up` again.")
        url = await self.provider.authorize_url(txn)
        resp = RedirectResponse(url, status_code=302, headers={"Cache-Control": "no-store",
                                                               "Referrer-Policy": "no-referrer"})
        self._set_cookie(resp, LOGIN_COOKIE, s["browser"], int(LOGIN_TTL))
        return resp

    # --- GET /oidc/callback -----------------------------------------------------------------------------

    async def callback(self, request: Request) -> Response:
        q = request.query_params
        state = q.get("state", "")
        now = self.clock()
        try:
            txn = self.flows.finish(state, now, request.cookies.get(LOGIN_COOKIE))
        except LoginError as e:
            return await self._refuse(400, "Sign-in not accepted", e.code, e.message)
        if q.get("error"):
            # The IdP said no (the person cancelled, or the IdP refused the client): pass its words on.
            detail = q.get("error_description") or q["error"]
            return await self._refuse(400, "The identity provider did not sign you in", "idp_error",
                                      f"the identity provider answered: {detail[:200]}",
                                      "Run `shoal up` again to retry.", pending_id=txn.pending_id)
        iss = q.get("iss")
        if iss is not None and iss.rstrip("/") != self.cfg.issuer:
            # RFC 9207: a callback naming another issuer is a mix-up attack.
            return await self._refuse(400, "Sign-in not accepted", "wrong_issuer", "the callback names another "
                                      "identity provider", pending_id=txn.pending_id)
        code = q.get("code", "")
        if not code:
            return await self._refuse(400, "Sign-in not accepted", "no_code", "the identity provider sent no "
                                      "sign-in code", pending_id=txn.pending_id)
        try:
            id_claims, info = await self.provider.sign_in(code, txn)
            profile = map_claims(self.cfg, id_claims, info)
            self.host.check(profile)
        except IdpUnavailable as e:
            return await self._refuse(503, "Identity provider unreachable", "idp_unavailable", str(e),
                                      "The machine stays pending. Run `shoal up` again in a minute.",
                                      pending_id=txn.pending_id)
        except TokenRefused as e:
            return await self._refuse(400, "Sign-in not accepted", e.code, e.message, pending_id=txn.pending_id)
        except Refused as e:
            return await self._refuse(403, "You cannot join this tailnet", e.code, e.message,
                                      "Ask an admin of this tailnet if you think you should.", e.identity,
                                      txn.pending_id)
        machine = self.host.machine(txn.pending_id)
        if machine is None:
            return await self._refuse(410, "Nothing to approve", "not_pending", "the machine is no longer waiting "
                                      "(approved, expired or removed)", "Run `shoal up` again.",
                                      profile.identity, txn.pending_id)
        session_id, csrf = secrets.token_urlsafe(32), secrets.token_urlsafe(32)
        session = self.sessions.create(profile, now, session_id=session_id, csrf=csrf)
        cid = secrets.token_urlsafe(24)
        self.flows.confirm_later(txn, profile, session.id_hash, now, cid)
        body = pages.confirm(machine, profile, action=f"{self.cookie.path}oidc/confirm", confirm_id=cid, csrf=csrf)
        resp = self._html(body)
        self._set_cookie(resp, SESSION_COOKIE, session_id, int(self.sessions.ttl))
        resp.delete_cookie(LOGIN_COOKIE, path=self.cookie.path)
        return resp

    # --- POST /oidc/confirm -----------------------------------------------------------------------------

    async def confirm(self, request: Request) -> Response:
        now = self.clock()
        body = await _read_limited(request, MAX_FORM)
        if body is None:
            return self._html(pages.page("Request too large", "the form is larger than a confirm form can be",
                                         code="too_large"), 413)
        form = _parse_form(body)
        session = self.sessions.get(request.cookies.get(SESSION_COOKIE), now)
        if not csrf_ok(session, form.get("csrf")):
            return await self._refuse(403, "Approval not accepted", "csrf", "this approval did not come from the "
                                      "confirm page of your own sign-in (missing or wrong form token)",
                                      "Open the login link from `shoal up` again and use its Approve button.")
        assert session is not None
        try:
            c = self.flows.confirm(form.get("confirm", ""), session.id_hash, now)
        except LoginError as e:
            return await self._refuse(400, "Approval not accepted", e.code, e.message,
                                      identity=session.profile.identity)
        try:
            done = await self.host.approve_signed_in(c.pending_id, c.profile)
        except Refused as e:
            return await self._refuse(403, "You cannot join this tailnet", e.code, e.message,
                                      "Ask an admin of this tailnet if you think you should.", e.identity,
                                      c.pending_id)
        except DomainError as e:
            return await self._refuse(409 if e.status == 400 else e.status, "The machine was not approved",
                                      "not_approved", e.message, "Run `shoal up` again.",
                                      c.profile.identity, c.pending_id)
        return self._html(pages.approved(done.hostname, done.user, done.address))


async def _read_limited(request: Request, limit: int) -> bytes | None:
    chunks, size = [], 0
    async for chunk in request.stream():
        size += len(chunk)
        if size > limit:
            return None
        chunks.append(chunk)
    return b"".join(chunks)


def _parse_form(body: bytes) -> dict[str, str]:
    try:
        pairs = parse_qsl(body.decode("ascii"), keep_blank_values=True, max_num_fields=16)
    except (UnicodeDecodeError, ValueError):
        return {}
    return dict(pairs)

