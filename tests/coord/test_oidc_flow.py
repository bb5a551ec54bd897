"""Login URLs, transactions, confirmations, sessions, CSRF and the refusal counter (pure cores, time passed in)."""

from __future__ import annotations

import pytest

from coord.auth.claims import Identity, Profile
from coord.auth.flow import LoginError, LoginFlows, digest
from coord.auth.refusals import Refusals
from coord.auth.sessions import CookieSpec, Sessions, csrf_ok

PROFILE = Profile(Identity("https://idp", "u1"), "alice", "alice@x.example", True, "Alice", (), (), None)


def start(lg: LoginFlows, token: str, now: float, n: str = "1", browser: str = "b") -> object:
    return lg.start(token, now, state=f"state{n}", nonce=f"nonce{n}", verifier=f"v{n}", browser=browser)


def code(fn: object) -> str:
    with pytest.raises(LoginError) as e:
        fn()  # type: ignore[operator]
    return e.value.code


def test_oidc_login_url_single_use() -> None:
    lg = LoginFlows()
    login = lg.issue("p1", 0.0, "tok1")
    assert lg.issue("p1", 5.0, "tok2").token == "tok1"  # the live link is reused while it is unused
    txn = lg.start("tok1", 10.0, state="s", nonce="n", verifier="v", browser="b")
    assert (txn.pending_id, txn.state, txn.nonce, txn.verifier) == ("p1", "s", "n", "v")
    assert txn.browser_hash == digest("b")
    assert code(lambda: start(lg, "tok1", 11.0)) == "login_used"
    assert login.used
    assert lg.issue("p1", 12.0, "tok3").token == "tok3"  # a used link is replaced by a new one
    assert code(lambda: start(lg, "nope", 11.0)) == "unknown_login"


def test_oidc_login_url_expires_after_ten_minutes() -> None:
    lg = LoginFlows()
    lg.issue("p1", 0.0, "tok1")
    assert code(lambda: start(lg, "tok1", 600.5)) == "login_expired"
    lg.issue("p2", 0.0, "tok2")
    lg.issue("p3", 700.0, "tok3")  # sweeps tok2
    assert code(lambda: start(lg, "tok2", 700.0)) == "unknown_login"
    assert lg.live_url_token("p3", 700.0) == "tok3" and lg.live_url_token("p2", 700.0) is None


def test_oidc_callback_state_single_use_and_browser_bound() -> None:
    lg = LoginFlows()
    lg.issue("p1", 0.0, "tok1")
    start(lg, "tok1", 1.0)
    assert code(lambda: lg.finish("state1x", 2.0, "b")) == "unknown_state"  # tampered
    assert code(lambda: lg.finish("state1", 2.0, "other")) == "other_browser"
    assert code(lambda: lg.finish("state1", 2.0, None)) == "other_browser"
    assert lg.finish("state1", 2.0, "b").pending_id == "p1"
    assert code(lambda: lg.finish("state1", 3.0, "b")) == "unknown_state"  # replayed


def test_oidc_confirmation_bound_to_the_session() -> None:
    lg = LoginFlows()
    lg.issue("p1", 0.0, "tok1")
    start(lg, "tok1", 1.0)
    txn = lg.finish("state1", 2.0, "b")
    lg.confirm_later(txn, PROFILE, "sess-hash", 2.0, "c1")
    assert code(lambda: lg.confirm("c1", "other-session", 3.0)) == "unknown_confirmation"
    assert lg.confirm("c1", "sess-hash", 3.0).pending_id == "p1"
    assert code(lambda: lg.confirm("c1", "sess-hash", 4.0)) == "unknown_confirmation"


def test_oidc_tables_are_bounded() -> None:
    lg = LoginFlows(capacity=3)
    for i in range(10):
        lg.issue(f"p{i}", float(i), f"t{i}")
    assert lg.counts()["logins"] == 3
    assert code(lambda: start(lg, "t0", 10.0)) == "unknown_login"  # oldest dropped first
    start(lg, "t9", 10.0)


def test_oidc_sessions_hashed_expiring_bounded() -> None:
    ss = Sessions(ttl=100.0, capacity=2)
    s = ss.create(PROFILE, 0.0, session_id="cookie-1", csrf="c")
    assert s.id_hash == digest("cookie-1") and "cookie-1" not in repr(ss._by_hash)
    assert ss.get("cookie-1", 50.0) is s
    assert ss.get("cookie-1", 100.0) is None
    assert ss.get(None, 1.0) is None and ss.get("", 1.0) is None
    ss.create(PROFILE, 1.0, session_id="a", csrf="c")
    ss.create(PROFILE, 2.0, session_id="b", csrf="c")
    ss.create(PROFILE, 3.0, session_id="c", csrf="c")
    assert len(ss) == 2 and ss.get("a", 4.0) is None
    ss.end("c")
    assert ss.get("c", 4.0) is None


def test_oidc_csrf() -> None:
    s = Sessions().create(PROFILE, 0.0, session_id="x", csrf="token")
    assert csrf_ok(s, "token")
    assert not csrf_ok(s, "tokem") and not csrf_ok(s, "") and not csrf_ok(s, None) and not csrf_ok(None, "token")


def test_oidc_cookie_spec() -> None:
    assert CookieSpec.for_server("https://vpn.example.com") == CookieSpec(secure=True, path="/")
    assert CookieSpec.for_server("http://127.0.0.1:8080").secure is False
    assert CookieSpec.for_server("https://example.com/shoal/").path == "/shoal/"


def test_oidc_refusals_recorded_once_per_user_per_minute() -> None:
    r = Refusals()
    assert r.count("iss alice", "unverified_email", 0.0)
    assert not r.count("iss alice", "unverified_email", 10.0)
    assert not r.count("iss alice", "domain_not_allowed", 59.9)
    assert r.count("iss bob", "unverified_email", 30.0)
    assert r.count("iss alice", "unverified_email", 60.0)
    assert r.total == 5 and r.by_code["unverified_email"] == 4


def test_oidc_refusals_table_bounded() -> None:
    r = Refusals(capacity=10)
    for i in range(1000):
        r.count(f"u{i}", "x", 0.0)
    assert len(r._last) == 10
