"""Debian's chromium driven by Playwright (the Python package; never `playwright install`, never a downloaded browser).

`open_browser(allowed_hosts, ns=...)` launches /usr/bin/chromium through ``executable_path``; with ``ns`` the
browser runs inside that lab namespace (a wrapper script runs it under `ip netns exec`; Playwright talks to it over
pipes, which cross namespaces). Every request to a host outside ``allowed_hosts`` is aborted in the context: the
IdP's built-in pages fetch web fonts from the internet, and a test must not reach outside anyway.

`sign_in(page, url, login)` opens a login URL, signs in at oidc-provider's development login form, grants consent
when asked (login and consent share /interaction/<uid>, so it waits for the form itself), and returns once the
browser is back on the Shoal server.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import shutil
import stat
import tempfile
import time
from collections.abc import AsyncIterator, Iterable
from pathlib import Path
from urllib.parse import urlsplit

from playwright.async_api import Browser, BrowserContext, Page, Route, async_playwright
from playwright.async_api import Error as PlaywrightError

CHROMIUM = "/usr/bin/chromium"


def chromium() -> str:
    if not os.path.exists(CHROMIUM):
        raise RuntimeError(f"{CHROMIUM} is missing; ./scripts/test installs Debian's chromium")
    return CHROMIUM


@contextlib.asynccontextmanager
async def open_browser(ns: str | None = None) -> AsyncIterator[Browser]:
    exe = chromium()
    tmp: Path | None = None
    if ns is not None:
        tmp = Path(tempfile.mkdtemp(prefix="shoal-browser-"))
        wrapper = tmp / "chromium-in-ns"
        ip = shutil.which("ip") or "/usr/sbin/ip"
        wrapper.write_text(f'#!/bin/sh\nexec {ip} netns exec {ns} {exe} "$@"\n')
        wrapper.chmod(stat.S_IRWXU)
        exe = str(wrapper)
    try:
        async with async_playwright() as pw:
            browser = await pw.chromium.launch(executable_path=exe)
            try:
                yield browser
            finally:
                await browser.close()
    finally:
        if tmp is not None:
            shutil.rmtree(tmp, ignore_errors=True)


async def local_context(browser: Browser, allowed_hosts: Iterable[str]) -> BrowserContext:
    allowed = set(allowed_hosts)
    ctx = await browser.new_context()
    ctx.blocked = []  # type: ignore[attr-defined]

    async def gate(route: Route) -> None:
        host = urlsplit(route.request.url).hostname or ""
        if host in allowed:
            await route.continue_()
        else:
            ctx.blocked.append(route.request.url)  # type: ignore[attr-defined]
            await route.abort()

    await ctx.route("**/*", gate)
    return ctx


async def sign_in(page: Page, url: str, login: str, *, back_to: str, timeout: float = 15.0) -> None:
    """Login URL -> IdP login form -> consent (if asked) -> back on ``back_to`` (the Shoal server's origin)."""
    ms = timeout * 1000
    await page.goto(url, timeout=ms)
    deadline = time.monotonic() + timeout
    typed = consented = False
    while not page.url.startswith(back_to):
        if time.monotonic() > deadline:
            raise TimeoutError(f"sign-in did not come back to {back_to}; the browser is at {page.url}")
        with contextlib.suppress(PlaywrightError):
            if not typed and await page.locator('input[name="login"]').count():
                await page.fill('input[name="login"]', login)
                await page.fill('input[name="password"]', "any password")
                typed = True
                await page.click('button[type="submit"]')
            elif not consented and await page.locator('input[name="prompt"][value="consent"]').count():
                consented = True
                await page.click('button[type="submit"]')
        await asyncio.sleep(0.02)
    await page.wait_for_load_state(timeout=ms)
