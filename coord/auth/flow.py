"""Interactive login state (pure: time and random values are passed in; nothing here survives a restart).

A pending node gets one *login URL* ``<server>/login/<token>``. The path through it::

    issue(pending)        -> Login          token in the URL; single use, LOGIN_TTL (10 min)
    start(token, ...)     -> Transaction    the URL is used up; state, nonce, PKCE verifier, browser binding
      ... browser goes to the IdP and comes back to /oidc/callback?state=..&code=..
    finish(state, ...)    -> Transaction    the state is used up: a replayed or tampered callback finds nothing
      ... the callback validates the tokens, then
    confirm_later(txn, profile, session) -> Confirmation   the confirm page's form; bound to the browser session
    confirm(id, session)  -> Confirmation   used up by the POST that approves the node

Everything an unauthenticated caller can make the server hold is bounded: logins follow pending nodes (bounded
by the register path) and are capped here too; transactions and confirmations are capped and expire. When a
table is full the oldest entry goes first.

The browser binding is a random value in a short-lived cookie set by ``start``, stored here hashed: a callback
from a browser that did not start the login (someone who sent the victim a URL they opened themselves) fails.
"""

from __future__ import annotations

import hashlib
import hmac
from collections import OrderedDict
from dataclasses import dataclass
from typing import Any, Generic, TypeVar

from coord.auth.claims import Profile

LOGIN_TTL = 600.0
MAX_LOGINS = 10_000
MAX_TRANSACTIONS = 10_000
MAX_CONFIRMATIONS = 10_000


def digest(secret: str) -> str:
    # Tokens carry >=128 random bits: a fast hash is enough, there is nothing to brute-force.
    return hashlib.sha256(secret.encode()).hexdigest()


class LoginError(Exception):
    """A step refused. ``code`` is stable for tests and counters; ``message`` is for the person."""

    def __init__(self, code: str, message: str) -> None:
        super().__init__(f"{code}: {message}")
        self.code = code
        self.message = message


@dataclass
class Login:
    token: str
    pending_id: str
    created: float
    used: bool = False


@dataclass(frozen=True)
class Transaction:
    state: str
    nonce: str
    verifier: str
    token: str
    pending_id: str
    browser_hash: str
    created: float


@dataclass(frozen=True)
class Confirmation:
    id: str
    pending_id: str
    profile: Profile
    session_hash: str
    created: float


K = TypeVar("K")
V = TypeVar("V")


class _Bounded(Generic[K, V]):
    """Insertion-ordered table with a cap: the oldest entry is dropped to make room."""

    def __init__(self, capacity: int) -> None:
        self.capacity = capacity
        self.items: OrderedDict[K, V] = OrderedDict()

    def put(self, key: K, value: V) -> None:
        self.items.pop(key, None)
        while len(self.items) >= self.capacity:
            self.items.popitem(last=False)
        self.items[key] = value

    def __len__(self) -> int:
        return len(self.items)


class LoginFlows:
    def __init__(self, ttl: float = LOGIN_TTL, capacity: int = MAX_LOGINS) -> None:
        self.ttl = ttl
        self._logins: _Bounded[str, Login] = _Bounded(capacity)
        self._by_pending: dict[str, str] = {}
        self._txns: _Bounded[str, Transaction] = _Bounded(MAX_TRANSACTIONS)
        self._confirms: _Bounded[str, Confirmation] = _Bounded(MAX_CONFIRMATIONS)

    # --- login URLs -------------------------------------------------------------------------------------

    def issue(self, pending_id: str, now: float, token: str) -> Login:
        """The login URL for a pending node: the live one if it has one, else a new one with ``token``."""
        self.sweep(now)
        cur = self._by_pending.get(pending_id)
        if cur is not None:
            login = self._logins.items.get(digest(cur))
            if login is not None and not login.used and now - login.created <= self.ttl:
                return login
        login = Login(token, pending_id, now)
        self._logins.put(digest(token), login)
        self._by_pending[pending_id] = token
        return login

    def live_url_token(self, pending_id: str, now: float) -> str | None:
        token = self._by_pending.get(pending_id)
        if token is None:
            return None
        login = self._logins.items.get(digest(token))
        if login is None or login.used or now - login.created > self.ttl:
            return None
        return token

    def pending_for(self, token: str) -> str | None:
        """The pending node a login URL was issued for, used or not, until the URL is forgotten: how a node's
        follow-up request (which carries the URL) finds its pending registration."""
        login = self._logins.items.get(digest(token))
        return login.pending_id if login is not None else None

    def start(self, token: str, now: float, *, state: str, nonce: str, verifier: str, browser: str) -> Transaction:
        login = self._logins.items.get(digest(token))
        if login is None:
            raise LoginError("unknown_login", "this login link is unknown or has expired; run `shoal up` again "
                             "for a new one")
        if login.used:
            raise LoginError("login_used", "this login link was already used; each link works once. Run "
                             "`shoal up` again for a new one")
        if now - login.created > self.ttl:
            raise LoginError("login_expired", "this login link has expired (links last 10 minutes); run "
                             "`shoal up` again for a new one")
        login.used = True
        txn = Transaction(state, nonce, verifier, token, login.pending_id, digest(browser), now)
        self._txns.put(digest(state), txn)
        return txn

    def forget_pending(self, pending_id: str) -> None:
        token = self._by_pending.pop(pending_id, None)
        if token is not None:
            self._logins.items.pop(digest(token), None)

    # --- the IdP callback -------------------------------------------------------------------------------

    def finish(self, state: str, now: float, browser: str | None) -> Transaction:
        """The transaction a callback's ``state`` names, used up; LoginError if there is none for this browser."""
        key = digest(state)
        txn = self._txns.items.get(key)
        if txn is None:
            raise LoginError("unknown_state", "this sign-in is unknown: it was already completed, has expired, or "
                             "its link was altered. Start again from the login link `shoal up` prints")
        if browser is None or not hmac.compare_digest(txn.browser_hash, digest(browser)):
            raise LoginError("other_browser", "this sign-in was started in another browser; open the login link "
                             "in the browser you sign in with")
        del self._txns.items[key]
        if now - txn.created > self.ttl:
            raise LoginError("login_expired", "this sign-in took more than 10 minutes; run `shoal up` again")
        return txn

    # --- the confirm page -------------------------------------------------------------------------------

    def confirm_later(
        self, txn: Transaction, profile: Profile, session_hash: str, now: float, cid: str
    ) -> Confirmation:
        c = Confirmation(cid, txn.pending_id, profile, session_hash, now)
        self._confirms.put(digest(cid), c)
        return c

    def confirm(self, cid: str, session_hash: str, now: float) -> Confirmation:
        key = digest(cid)
        c = self._confirms.items.get(key)
        if c is None or not hmac.compare_digest(c.session_hash, session_hash):
            raise LoginError("unknown_confirmation", "this confirmation is unknown or was already used; start "
                             "again from the login link `shoal up` prints")
        del self._confirms.items[key]
        if now - c.created > self.ttl:
            raise LoginError("login_expired", "the confirmation page was open more than 10 minutes; run "
                             "`shoal up` again")
        return c

    def peek_confirmation(self, cid: str, session_hash: str) -> Confirmation | None:
        c = self._confirms.items.get(digest(cid))
        if c is None or not hmac.compare_digest(c.session_hash, session_hash):
            return None
        return c

    # --- housekeeping -----------------------------------------------------------------------------------

    def sweep(self, now: float) -> None:
        """Drop what has expired; cheap enough to run on every issue (entries are in creation order)."""
        tables: tuple[_Bounded[str, Any], ...] = (self._logins, self._txns, self._confirms)
        for table in tables:
            items = table.items
            while items:
                key, value = next(iter(items.items()))
                if now - value.created <= self.ttl:
                    break
                del items[key]
                if isinstance(value, Login) and self._by_pending.get(value.pending_id) == value.token:
                    del self._by_pending[value.pending_id]
        # A login dropped by the cap leaves its pending id behind; keep that index as bounded as the table.
        if len(self._by_pending) > self._logins.capacity:
            live = {v.token for v in self._logins.items.values()}
            self._by_pending = {p: t for p, t in self._by_pending.items() if t in live}

    def counts(self) -> dict[str, int]:
        return {"logins": len(self._logins), "transactions": len(self._txns), "confirmations": len(self._confirms)}
