"""Roles: set from the CLI (the only way to make an owner), each change an event, and the policy's role
autogroups filled from them, so `policy check` against the live tailnet resolves role-dependent tests."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest

from coord import decide, wire
from coord import events as ev
from coord.app import create_app
from coord.cli import main
from coord.config import load
from coord.errors import DomainError
from tests.coord.util import Tailnet

POLICY = """{
  "tagOwners": {"tag:web": ["autogroup:admin"]},
  "acls": [{"action": "accept", "src": ["autogroup:admin"], "dst": ["tag:web:22"]},
           {"action": "accept", "src": ["autogroup:member"], "dst": ["tag:web:443"]}],
  "tests": [{"src": "alice@example.com", "accept": ["tag:web:22", "tag:web:443"]},
            {"src": "bob@example.com", "accept": ["tag:web:443"], "deny": ["tag:web:22"]}]
}
"""


def cli(data: Path, *args: str) -> int:
    return main([*args, "--data", str(data)])


def test_roles_cli_sets_roles_and_policy_check_resolves_them(tmp_path: Path,
                                                             capsys: pytest.CaptureFixture[str]) -> None:
    data = tmp_path / "data"
    for u in ("alice@example.com", "bob@example.com"):
        assert cli(data, "users", "create", u) == 0
    (tmp_path / "p.hujson").write_text(POLICY)
    capsys.readouterr()
    # alice is a member: the test that needs autogroup:admin fails (it is resolved, not skipped)
    assert cli(data, "policy", "check", str(tmp_path / "p.hujson"), "--json") != 0
    result = json.loads(capsys.readouterr().out)
    assert result["skipped"] == [] and [f["src"] for f in result["failed"]] == ["alice@example.com"]
    assert cli(data, "users", "role", "alice@example.com", "admin") == 0
    capsys.readouterr()
    assert cli(data, "policy", "check", str(tmp_path / "p.hujson"), "--json") == 0
    result = json.loads(capsys.readouterr().out)
    assert result["ok"] and result["skipped"] == [] and not result["failed"]
    assert cli(data, "users", "role", "bob@example.com", "owner") == 0
    capsys.readouterr()
    assert cli(data, "users", "list", "--json") == 0
    roles = {u["name"]: u["role"] for u in json.loads(capsys.readouterr().out)}
    assert roles == {"alice@example.com": "admin", "bob@example.com": "owner"}
    assert cli(data, "users", "role", "bob@example.com", "king") != 0
    capsys.readouterr()
    assert cli(data, "events", "tail", "--json", "--type", "UserRoleSet") == 0
    out = capsys.readouterr().out
    assert out.count("UserRoleSet") == 2 and '"actor": "admin"' in out


def test_roles_default_member_and_fold() -> None:
    tn = Tailnet()
    uid = tn.user("carol@example.com")
    assert tn.state.users[uid].role == "member"  # OIDC sign-in and `users create` alike
    tn.run(lambda s: decide.set_role(s, "carol@example.com", "it-admin"))
    assert tn.state.users[uid].role == "it-admin"
    assert tn.log[-1] == ev.UserRoleSet(uid, "it-admin")
    tn.run(lambda s: decide.set_role(s, "carol@example.com", "it-admin"))
    assert tn.log[-1] == ev.UserRoleSet(uid, "it-admin") and len(tn.log) == 2  # no event when unchanged
    with pytest.raises(DomainError, match="role 'root' is not one of"):
        decide.set_role(tn.state, "carol@example.com", "root")


@pytest.mark.anyio
async def test_roles_auto_approve_routes_when_a_role_is_given(tmp_path: Path) -> None:
    """autoApprovers naming autogroup:admin approve a router of alice's once (and only once) she is an admin."""
    config = load(None, env={}, overrides={"data_dir": str(tmp_path), "derp": False, "stun_listen": ""})
    app = await create_app(config, serve=False)
    svc = app.service
    try:
        await svc.set_policy('{"autoApprovers": {"routes": {"192.0.2.0/24": ["autogroup:admin"]}}}')
        await svc.create_user("alice@example.com")
        await svc.create_key("alice@example.com", reusable=True, ephemeral=False, expiration=3600.0, tags=())
        owner = decide.owner_from_key(svc.state, svc.state.keys[1])
        req = wire.RegisterRequest(node_key=os.urandom(32), disco_key=os.urandom(32),
                                   hostinfo=wire.Hostinfo(hostname="router", routable_ips=("192.0.2.0/24",)))
        await svc.execute(lambda s: decide.register(s, os.urandom(32), req, owner, svc.rules, svc.clock()), "admin")
        (n,) = svc.state.nodes.values()
        assert n.routes == ("192.0.2.0/24",) and n.approved_routes == ()
        await svc.set_role("alice@example.com", "admin")
        assert n.approved_routes == ("192.0.2.0/24",)
    finally:
        await app.close()


def test_roles_and_credentials_survive_a_snapshot() -> None:
    from coord import snapshot

    tn = Tailnet()
    tn.user("dave@example.com")
    tn.run(lambda s: decide.set_role(s, "dave@example.com", "auditor"))
    tn.run(lambda s: decide.create_credential(s, credential_id="tk0123456789ab", kind="api", user_id=1,
                                              description="d", expires=tn.now + 60, scopes=(), tags=()))
    tn.run(lambda s: decide.revoke_credential(s, "tk0123456789ab"))
    tn.state.last_seq = len(tn.log)
    back = snapshot.decode(snapshot.encode(tn.state, ev.rfc3339(tn.now)))
    assert back.users[1].role == "auditor"
    assert back.credentials == tn.state.credentials
    assert back.credentials["tk0123456789ab"]["revoked"] == tn.now


def test_roles_oidc_user_starts_as_member() -> None:
    from coord.auth.claims import Identity, Profile

    tn = Tailnet()
    p = Profile(Identity("https://idp.example", "sub-1"), "erin@example.com", "erin@example.com", True, "Erin",
                (), ("group:eng",), None)
    tn.run(lambda s: decide.sign_in_user(s, p)[1])
    u = tn.state.user_by_name("erin@example.com")
    assert u is not None and u.role == "member"
    assert not any(isinstance(e, ev.UserRoleSet) for e in tn.log)
