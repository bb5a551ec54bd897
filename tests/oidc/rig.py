"""Helpers shared by the sign-in tests: forging ID tokens, a transport that tampers with the IdP's token answers,
an in-process uvicorn server on loopback."""

from __future__ import annotations

import asyncio
import contextlib
import json
import time
from collections.abc import AsyncIterator, Callable
from typing import Any

import httpx
import uvicorn
from joserfc import jwt
from joserfc.jwk import RSAKey
from starlette.types import ASGIApp


def forge(key: RSAKey, claims: dict[str, Any], kid: str | None = None) -> str:
    header = {"alg": "RS256", "kid": kid if kid is not None else key.kid}
    return jwt.encode(header, claims, key)


def unverified_claims(token: str) -> dict[str, Any]:
    import base64

    body = token.split(".")[1]
    data: dict[str, Any] = json.loads(base64.urlsafe_b64decode(body + "=" * (-len(body) % 4)))
    return data


TokenRewrite = Callable[[dict[str, Any]], dict[str, Any]]


class Tamper(httpx.AsyncBaseTransport):
    """Passes every request to the real IdP; ``rewrite`` (when set) edits the token endpoint's JSON answer, as a
    man in the middle or a broken IdP would. ``down`` makes every request fail as if the IdP were gone."""

    def __init__(self) -> None:
        self.inner = httpx.AsyncHTTPTransport()
        self.rewrite: TokenRewrite | None = None
        self.down = False
        self.requests: list[str] = []

    async def handle_async_request(self, request: httpx.Request) -> httpx.Response:
        self.requests.append(f"{request.method} {request.url.path}")
        if self.down:
            raise httpx.ConnectError("connection refused (test: IdP down)", request=request)
        resp = await self.inner.handle_async_request(request)
        if self.rewrite is None or not request.url.path.endswith("/token"):
            return resp
        body = await resp.aread()
        data = self.rewrite(json.loads(body))
        headers = [(k, v) for k, v in resp.headers.items() if k.lower() not in ("content-length", "content-encoding")]
        return httpx.Response(resp.status_code, headers=headers, content=json.dumps(data).encode())

    async def aclose(self) -> None:
        await self.inner.aclose()


@contextlib.asynccontextmanager
async def serve(app: ASGIApp, host: str, port: int) -> AsyncIterator[str]:
    config = uvicorn.Config(app, host=host, port=port, log_level="warning", lifespan="on")
    server = uvicorn.Server(config)
    task = asyncio.create_task(server.serve())
    deadline = time.monotonic() + 10
    while not server.started:
        if task.done():
            task.result()
            raise RuntimeError("uvicorn exited before it started")
        if time.monotonic() > deadline:
            raise RuntimeError("uvicorn did not start")
        await asyncio.sleep(0.02)
    try:
        yield f"http://{host}:{port}"
    finally:
        server.should_exit = True
        await task
