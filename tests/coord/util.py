"""Helpers for the coord tests: a pure in-memory tailnet driven through decide.* and state.apply."""

from __future__ import annotations

import hashlib
import os
import subprocess
import sys
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from coord import decide, wire
from coord import events as ev
from coord.change import Change
from coord.ipam import Pool
from coord.state import State, apply

POOL = Pool.parse("100.64.0.0/10", "fd7a:115c:a1e0::/48")
DAY = 86400.0


def rules(key_expiry: float | None = 180 * DAY) -> decide.Rules:
    return decide.Rules(POOL, key_expiry)


@dataclass
class Tailnet:
    """State plus a clock, folded exactly as the service folds: decide, then apply each event."""

    state: State = field(default_factory=State)
    now: float = 1_800_000_000.0
    rules: decide.Rules = field(default_factory=rules)
    log: list[ev.Event] = field(default_factory=list)

    def run(self, decide_fn: Callable[[State], list[ev.Event]]) -> Change:
        change = Change()
        for e in decide_fn(self.state):
            change.merge(apply(self.state, e, self.now))
            self.log.append(e)
        return change

    def user(self, name: str) -> int:
        self.run(lambda s: decide.create_user(s, name))
        u = self.state.user_by_name(name)
        assert u is not None
        return u.id

    def key(self, user: str, *, reusable: bool = True, ephemeral: bool = False, expiration: float | None = None,
            tags: tuple[str, ...] = ()) -> tuple[str, str]:
        """(prefix, secret hash) of a new key."""
        prefix = os.urandom(6).hex()
        h = hashlib.sha256(prefix.encode()).hexdigest()
        self.run(lambda s: decide.create_key(s, user, prefix=prefix, secret_hash=h, reusable=reusable,
                                             ephemeral=ephemeral, expiration=expiration, tags=tags))
        return prefix, h

    def register(self, machine: bytes, hostname: str, key: tuple[str, str], *, node_key: bytes | None = None,
                 request_tags: Sequence[str] = ()) -> tuple[int, Change]:
        k = decide.check_auth_key(self.state, key[0], key[1], self.now)
        owner = decide.owner_from_key(self.state, k)
        req = wire.RegisterRequest(
            node_key=node_key or os.urandom(32), disco_key=os.urandom(32),
            hostinfo=wire.Hostinfo(hostname=hostname, request_tags=tuple(request_tags)),
        )
        change = self.run(lambda s: decide.register(s, machine, req, owner, self.rules, self.now))
        return self.state.by_machine[wire.key_text("mkey", machine)], change


def cli(data: Path, *args: str, check: bool = True, timeout: float = 60) -> subprocess.CompletedProcess[str]:
    """``shoal-server ARGS --data DATA`` in a subprocess."""
    p = subprocess.run(
        [sys.executable, "-m", "coord.cli", *args, "--data", str(data)],
        capture_output=True, text=True, timeout=timeout, env={**os.environ, "SHOAL_CONFIG": ""},
    )
    if check and p.returncode != 0:
        raise AssertionError(f"shoal-server {' '.join(args)} exited {p.returncode}: {p.stderr}")
    return p


def cli_json(data: Path, *args: str) -> Any:
    import json

    p = cli(data, *args, "--json")
    return json.loads(p.stdout)
