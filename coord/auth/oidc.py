"""The relying party: discovery, the authorization request, the code exchange, ID token and /userinfo (the shell).

authlib does the protocol pieces (discovery metadata validation, the authorization URL, the S256 challenge, the
ID token's claim checks) and joserfc, authlib's JOSE library, checks signatures; HTTP goes through an injected
``httpx.AsyncClient``. authlib's own httpx client is not used: authlib 1.9 deprecates it.

Caching, so no request of a browser makes the server fetch keys:
- discovery is fetched once and kept; a failed fetch is retried at most every ``DISCOVERY_RETRY`` seconds (the
  page says the IdP is unreachable meanwhile, and the server keeps serving);
- the JWKS is fetched once and kept; a token signed with a ``kid`` it does not hold triggers one refetch, at
  most every ``JWKS_REFRESH`` seconds (an IdP rotating keys is seen within a minute; a flood of forged tokens
  with random kids costs one fetch a minute).

ID token checks: signature by a key from the JWKS with an algorithm the IdP announces (never ``none``, never an
HMAC: the client secret is not a signing key here), ``iss`` equal to the configured issuer, ``aud`` containing the
client id (and ``azp`` equal to it when there are several), ``exp`` in the future and ``iat`` present (with
``LEEWAY`` seconds of clock skew), ``nonce`` equal to the transaction's.
"""

from __future__ import annotations

import asyncio
import base64
import secrets
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any
from urllib.parse import quote

import httpx
from authlib.oauth2.rfc6749.parameters import prepare_grant_uri
from authlib.oauth2.rfc7636 import create_s256_code_challenge
from authlib.oidc.core import CodeIDToken
from authlib.oidc.discovery import OpenIDProviderMetadata
from joserfc import jwt
from joserfc.errors import (
    BadSignatureError,
    ClaimError,
    ExpiredTokenError,
    InvalidKeyIdError,
    JoseError,
    MissingClaimError,
)
from joserfc.jwk import KeySet

from coord.auth.config import OidcConfig
from coord.auth.flow import Transaction

DISCOVERY_RETRY = 10.0
JWKS_REFRESH = 60.0
LEEWAY = 30.0
MAX_DOCUMENT = 256 << 10
SIGNING_ALGS = ("RS256", "RS384", "RS512", "PS256", "PS384", "PS512", "ES256", "ES384", "ES512", "EdDSA")


class IdpUnavailable(Exception):
    """The IdP did not answer, or answered with something that is not a usable document."""


class TokenRefused(Exception):
    """The IdP's answer does not prove a sign-in. ``code`` is stable; ``message`` is for the person."""

    def __init__(self, code: str, message: str) -> None:
        super().__init__(f"{code}: {message}")
        self.code = code
        self.message = message


@dataclass(frozen=True)
class Metadata:
    issuer: str
    authorization_endpoint: str
    token_endpoint: str
    jwks_uri: str
    userinfo_endpoint: str | None
    algorithms: tuple[str, ...]
    basic_auth: bool


def new_transaction_secrets() -> dict[str, str]:
    """state, nonce and a PKCE verifier (43+ chars from the unreserved set, RFC 7636 4.1), and the browser binding."""
    return {
        "state": secrets.token_urlsafe(32),
        "nonce": secrets.token_urlsafe(32),
        "verifier": secrets.token_urlsafe(48),
        "browser": secrets.token_urlsafe(32),
    }


class Provider:
    def __init__(
        self, cfg: OidcConfig, redirect_uri: str, http: httpx.AsyncClient, clock: Callable[[], float]
    ) -> None:
        self.cfg = cfg
        self.redirect_uri = redirect_uri
        self.http = http
        self.clock = clock
        self._meta: Metadata | None = None
        self._meta_failed: float | None = None
        self._meta_error = ""
        self._keys: KeySet | None = None
        self._keys_at = float("-inf")
        self._lock = asyncio.Lock()
        self.discovery_fetches = 0
        self.jwks_fetches = 0

    # --- documents --------------------------------------------------------------------------------------

    async def _get_json(self, url: str, what: str, **kw: Any) -> dict[str, Any]:
        try:
            r = await self.http.get(url, **kw)
        except httpx.HTTPError as e:
            raise IdpUnavailable(f"the identity provider did not answer ({what}: {type(e).__name__})") from None
        return _json(r, what)

    async def metadata(self) -> Metadata:
        if self._meta is not None:
            return self._meta
        async with self._lock:
            return await self._metadata_locked()

    async def _metadata_locked(self) -> Metadata:
        if self._meta is None:
            now = self.clock()
            if self._meta_failed is not None and now - self._meta_failed < DISCOVERY_RETRY:
                raise IdpUnavailable(self._meta_error)
            try:
                self._meta = await self._discover()
            except IdpUnavailable as e:
                self._meta_failed, self._meta_error = now, str(e)
                raise
        return self._meta

    async def _discover(self) -> Metadata:
        self.discovery_fetches += 1
        doc = await self._get_json(f"{self.cfg.issuer}/.well-known/openid-configuration", "discovery")
        checked = doc
        if self.cfg.allow_http:
            # authlib requires https endpoints (except on loopback); a lab's IdP is plain http on a lab address.
            checked = {k: "https://" + v[7:] if isinstance(v, str) and v.startswith("http://") else v
                       for k, v in doc.items()}
        try:
            OpenIDProviderMetadata(checked).validate()
        except (ValueError, TypeError) as e:
            raise IdpUnavailable(f"the identity provider's discovery document is invalid: {e}") from None
        if str(doc["issuer"]).rstrip("/") != self.cfg.issuer:
            raise IdpUnavailable(
                f"the identity provider says its issuer is {doc['issuer']!r}, not {self.cfg.issuer!r} as configured"
            )
        algs = tuple(a for a in doc.get("id_token_signing_alg_values_supported", ["RS256"]) if a in SIGNING_ALGS)
        if not algs:
            raise IdpUnavailable("the identity provider signs ID tokens with no algorithm this server accepts")
        methods = doc.get("token_endpoint_auth_methods_supported") or ["client_secret_basic"]
        userinfo = doc.get("userinfo_endpoint")
        return Metadata(
            issuer=self.cfg.issuer,
            authorization_endpoint=str(doc["authorization_endpoint"]),
            token_endpoint=str(doc["token_endpoint"]),
            jwks_uri=str(doc["jwks_uri"]),
            userinfo_endpoint=str(userinfo) if isinstance(userinfo, str) else None,
            algorithms=algs,
            basic_auth="client_secret_basic" in methods or "client_secret_post" not in methods,
        )

    async def _key_set(self, refresh: bool) -> KeySet:
        meta = await self.metadata()
        if self._keys is not None and not refresh:
            return self._keys
        async with self._lock:
            now = self.clock()
            if self._keys is not None and (not refresh or now - self._keys_at < JWKS_REFRESH):
                return self._keys
            self.jwks_fetches += 1
            doc = await self._get_json(meta.jwks_uri, "keys")
            try:
                keys = KeySet.import_key_set(doc)  # type: ignore[arg-type]
            except (JoseError, ValueError, TypeError, KeyError) as e:
                raise IdpUnavailable(f"the identity provider's key set is invalid: {e}") from None
            if any(k.is_private for k in keys.keys):
                raise IdpUnavailable("the identity provider publishes private keys; refusing to use them")
            self._keys, self._keys_at = keys, now
            return keys

    # --- the flow ---------------------------------------------------------------------------------------

    async def authorize_url(self, txn: Transaction) -> str:
        meta = await self.metadata()
        return str(prepare_grant_uri(
            meta.authorization_endpoint, self.cfg.client_id, "code", redirect_uri=self.redirect_uri,
            scope=" ".join(self.cfg.scopes), state=txn.state, nonce=txn.nonce,
            code_challenge=create_s256_code_challenge(txn.verifier), code_challenge_method="S256",
        ))

    async def exchange(self, code: str, verifier: str) -> dict[str, Any]:
        meta = await self.metadata()
        form = {"grant_type": "authorization_code", "code": code, "redirect_uri": self.redirect_uri,
                "code_verifier": verifier}
        headers = {"Accept": "application/json"}
        secret = self.cfg.client_secret.reveal()
        if meta.basic_auth:
            # RFC 6749 2.3.1: both parts form-encoded before base64.
            pair = f"{quote(self.cfg.client_id, safe='')}:{quote(secret, safe='')}"
            headers["Authorization"] = "Basic " + base64.b64encode(pair.encode()).decode()
        else:
            form |= {"client_id": self.cfg.client_id, "client_secret": secret}
        try:
            r = await self.http.post(meta.token_endpoint, data=form, headers=headers)
        except httpx.HTTPError as e:
            raise IdpUnavailable(f"the identity provider did not answer (token: {type(e).__name__})") from None
        if 400 <= r.status_code < 500:
            err = _error_text(r)
            raise TokenRefused("code_refused", f"the identity provider refused the sign-in code ({err}); start "
                               "again from the login link")
        tokens = _json(r, "token")
        if not isinstance(tokens.get("id_token"), str):
            raise TokenRefused("no_id_token", "the identity provider returned no ID token (is 'openid' a scope?)")
        if str(tokens.get("token_type", "")).lower() != "bearer" or not isinstance(tokens.get("access_token"), str):
            raise TokenRefused("bad_token", "the identity provider returned no bearer access token")
        return tokens

    async def validate_id_token(self, raw: str, nonce: str, access_token: str | None = None) -> dict[str, Any]:
        meta = await self.metadata()
        try:
            token = await self._verify_signature(raw, meta)
        except InvalidKeyIdError:
            raise TokenRefused("unknown_key", "the ID token is signed by a key the identity provider does not "
                               "publish") from None
        except BadSignatureError:
            raise TokenRefused("bad_signature", "the ID token's signature is not valid") from None
        except JoseError as e:
            raise TokenRefused("bad_token", f"the ID token is not a valid signed token ({e.error})") from None
        params: dict[str, Any] = {"nonce": nonce, "client_id": self.cfg.client_id}
        if access_token is not None and "at_hash" in token.claims:
            params["access_token"] = access_token
        options: dict[str, Any] = {
            "iss": {"essential": True, "value": self.cfg.issuer},
            "aud": {"essential": True, "value": self.cfg.client_id},
        }
        claims = CodeIDToken(token.claims, token.header, options, params)
        try:
            claims.validate(now=int(self.clock()), leeway=int(LEEWAY))
        except ExpiredTokenError:
            raise TokenRefused("expired_token", "the ID token has expired; start again from the login link") from None
        except MissingClaimError as e:
            raise TokenRefused("bad_token", f"the ID token lacks the {e.claim!r} claim") from None
        except ClaimError as e:
            code = {"aud": "wrong_audience", "azp": "wrong_audience", "iss": "wrong_issuer",
                    "nonce": "wrong_nonce"}.get(e.claim, "bad_token")
            what = {"aud": "is for another client", "azp": "is for another client",
                    "iss": "is from another issuer", "nonce": "does not belong to this sign-in"}
            raise TokenRefused(code, f"the ID token {what.get(e.claim, f'has a bad {e.claim!r} claim')}") from None
        except JoseError as e:
            raise TokenRefused("bad_token", f"the ID token is not valid ({e.error})") from None
        return dict(token.claims)

    async def _verify_signature(self, raw: str, meta: Metadata) -> jwt.Token:
        keys = await self._key_set(refresh=False)
        try:
            return jwt.decode(raw, keys, algorithms=list(meta.algorithms))
        except InvalidKeyIdError:
            fresh = await self._key_set(refresh=True)
            if fresh is keys:
                raise
            return jwt.decode(raw, fresh, algorithms=list(meta.algorithms))

    async def userinfo(self, access_token: str) -> dict[str, Any] | None:
        meta = await self.metadata()
        if meta.userinfo_endpoint is None:
            return None
        return await self._get_json(meta.userinfo_endpoint, "userinfo",
                                    headers={"Authorization": f"Bearer {access_token}", "Accept": "application/json"})

    async def sign_in(self, code: str, txn: Transaction) -> tuple[dict[str, Any], dict[str, Any] | None]:
        """The callback's work: code -> tokens -> validated ID token claims, and /userinfo's claims."""
        tokens = await self.exchange(code, txn.verifier)
        claims = await self.validate_id_token(tokens["id_token"], txn.nonce, tokens["access_token"])
        info = await self.userinfo(tokens["access_token"])
        return claims, info


def _json(r: httpx.Response, what: str) -> dict[str, Any]:
    if r.status_code != 200:
        raise IdpUnavailable(f"the identity provider answered {r.status_code} ({what})")
    if len(r.content) > MAX_DOCUMENT:
        raise IdpUnavailable(f"the identity provider's {what} answer is too large")
    try:
        data = r.json()
    except ValueError:
        raise IdpUnavailable(f"the identity provider's {what} answer is not JSON") from None
    if not isinstance(data, dict):
        raise IdpUnavailable(f"the identity provider's {what} answer is not a JSON object")
    return data


def _error_text(r: httpx.Response) -> str:
    try:
        data = r.json()
    except ValueError:
        return f"HTTP {r.status_code}"
    if isinstance(data, dict) and isinstance(data.get("error"), str):
        return str(data["error"])[:80]
    return f"HTTP {r.status_code}"
