"""Browser sessions and CSRF tokens (pure core, shared by node sign-in and, later, the web console's admin sign-in).

A session is created only after the identity provider vouched for someone (a `Profile`). The browser holds an
opaque random id in a cookie; the server keeps only its SHA-256, so a leaked memory dump or log of this table
cannot be replayed as a cookie. Each session has one CSRF token (synchronizer pattern): a state-changing POST
must carry it in its form, compared in constant time, and must come with the session cookie. SameSite=Lax keeps
the cookie off cross-site POSTs as a second line.

Cookie attributes (`CookieSpec.for_server`): HttpOnly, SameSite=Lax, Path=/, Secure whenever the server URL is
https (an http server URL is allowed only on loopback or in a lab, see coord.auth.config.check_server_url). The
names start with ``shoal_`` so they never clash with an IdP's cookies on the same host (cookies ignore ports).

Sessions live in memory, bounded (oldest dropped first) and expire; a restart signs everyone out, which is
harmless: nothing durable depends on a session.
"""

from __future__ import annotations

import hmac
from collections import OrderedDict
from dataclasses import dataclass
from urllib.parse import urlsplit

from coord.auth.claims import Profile
from coord.auth.flow import digest

SESSION_COOKIE = "shoal_session"
LOGIN_COOKIE = "shoal_login"
SESSION_TTL = 12 * 3600.0
MAX_SESSIONS = 10_000


@dataclass(frozen=True)
class CookieSpec:
    secure: bool
    path: str = "/"
    samesite: str = "lax"
    httponly: bool = True

    @classmethod
    def for_server(cls, server_url: str) -> CookieSpec:
        u = urlsplit(server_url)
        return cls(secure=u.scheme == "https", path=(u.path.rstrip("/") or "") + "/")


@dataclass
class Session:
    id_hash: str
    profile: Profile
    csrf: str
    created: float
    expires: float


class Sessions:
    def __init__(self, ttl: float = SESSION_TTL, capacity: int = MAX_SESSIONS) -> None:
        self.ttl = ttl
        self.capacity = capacity
        self._by_hash: OrderedDict[str, Session] = OrderedDict()

    def create(self, profile: Profile, now: float, *, session_id: str, csrf: str) -> Session:
        """``session_id`` (the cookie value) and ``csrf`` are fresh random strings from the caller."""
        self.sweep(now)
        while len(self._by_hash) >= self.capacity:
            self._by_hash.popitem(last=False)
        s = Session(digest(session_id), profile, csrf, now, now + self.ttl)
        self._by_hash[s.id_hash] = s
        return s

    def get(self, cookie: str | None, now: float) -> Session | None:
        if not cookie:
            return None
        s = self._by_hash.get(digest(cookie))
        if s is None or now >= s.expires:
            return None
        return s

    def end(self, cookie: str | None) -> None:
        if cookie:
            self._by_hash.pop(digest(cookie), None)

    def sweep(self, now: float) -> None:
        while self._by_hash:
            key, s = next(iter(self._by_hash.items()))
            if now < s.expires:
                break
            del self._by_hash[key]

    def __len__(self) -> int:
        return len(self._by_hash)


def csrf_ok(session: Session | None, token: str | None) -> bool:
    """The form's token matches the session's; False without a session or a token."""
    if session is None or not token:
        return False
    return hmac.compare_digest(session.csrf.encode(), token.encode())
