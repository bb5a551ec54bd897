"""A real OpenID Connect provider for the sign-in tests: npm oidc-provider, run by tests/oidc/idp/idp.mjs.

`Idp.start(...)` writes its config (a static confidential client, PKCE required, a signing key the test holds so
it can forge tokens the IdP would sign) and the accounts file (re-read at every sign-in, so a test can change a
user's groups at the IdP), starts node, and waits for "ready". `spawn` decides where it runs: a plain child on
loopback by default, or a lab namespace (``lab.spawn``), so the lab's server and browser can reach it.
"""

from __future__ import annotations

import fcntl
import json
import os
import secrets
import shutil
import socket
import subprocess
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx
from joserfc.jwk import RSAKey

HERE = Path(__file__).parent / "idp"
CLIENT_ID = "shoal-test"

# Test accounts: login -> claims. Logins are what the test types into the IdP's login form.
ACCOUNTS: dict[str, dict[str, Any]] = {
    "alice": {"email": "alice@example.com", "email_verified": True, "name": "Alice", "preferred_username": "alice",
              "groups": ["shoal-admins", "staff"]},
    "bob": {"email": "bob@example.com", "email_verified": True, "name": "Bob", "preferred_username": "bob"},
    "carol": {"email": "carol@example.com", "email_verified": True, "name": "Carol", "groups": ["staff"]},
    "unverified": {"email": "dave@example.com", "email_verified": False, "name": "Dave", "groups": ["staff"]},
    "outsider": {"email": "eve@elsewhere.example", "email_verified": True, "name": "Eve", "groups": ["staff"]},
}


def ensure_installed() -> None:
    """`npm ci` once per checkout (./scripts/test does it too); a lock keeps parallel runs from racing."""
    if (HERE / "node_modules" / "oidc-provider" / "package.json").exists():
        return
    npm = shutil.which("npm")
    if npm is None:
        raise RuntimeError("npm is not installed; ./scripts/test installs nodejs and npm")
    with open(HERE / ".install.lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        if not (HERE / "node_modules" / "oidc-provider" / "package.json").exists():
            subprocess.run([npm, "ci", "--no-audit", "--no-fund", "--loglevel=error"], cwd=HERE, check=True,
                           timeout=300)


def free_port(host: str = "127.0.0.1") -> int:
    with socket.socket() as s:
        s.bind((host, 0))
        return int(s.getsockname()[1])


Spawn = Callable[[list[str], Path], "subprocess.Popen[bytes]"]


def _local_spawn(argv: list[str], log_path: Path) -> subprocess.Popen[bytes]:
    with open(log_path, "wb") as log:
        return subprocess.Popen(argv, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)


@dataclass
class Idp:
    workdir: Path
    host: str
    port: int
    redirect_uris: list[str]
    client_secret: str = field(default_factory=lambda: secrets.token_urlsafe(24))
    key: RSAKey = field(default_factory=lambda: RSAKey.generate_key(
        2048, parameters={"kid": "idp-key-1", "use": "sig", "alg": "RS256"}, private=True))
    accounts: dict[str, dict[str, Any]] = field(default_factory=lambda: json.loads(json.dumps(ACCOUNTS)))
    id_token_ttl: int = 3600
    proc: subprocess.Popen[bytes] | None = None
    kill: Callable[[subprocess.Popen[bytes]], Any] | None = None

    @property
    def issuer(self) -> str:
        return f"http://{self.host}:{self.port}"

    @property
    def accounts_file(self) -> Path:
        return self.workdir / "accounts.json"

    @property
    def log_path(self) -> Path:
        return self.workdir / "idp.log"

    def write_accounts(self) -> None:
        tmp = self.accounts_file.with_suffix(".tmp")
        tmp.write_text(json.dumps(self.accounts))
        os.replace(tmp, self.accounts_file)

    def set_claims(self, login: str, **claims: Any) -> None:
        """Changes an account at the IdP; the next sign-in sees it."""
        self.accounts[login].update(claims)
        self.write_accounts()

    def start(self, spawn: Spawn | None = None, *, check_from: Callable[[str], bool] | None = None,
              timeout: float = 20.0) -> Idp:
        ensure_installed()
        self.workdir.mkdir(parents=True, exist_ok=True)
        self.write_accounts()
        config = {
            "issuer": self.issuer, "host": self.host, "port": self.port, "cookie_key": secrets.token_hex(16),
            "client": {"client_id": CLIENT_ID, "client_secret": self.client_secret,
                       "redirect_uris": self.redirect_uris},
            "jwks": {"keys": [self.key.as_dict(private=True)]},
            "accounts_file": str(self.accounts_file),
            "id_token_ttl": self.id_token_ttl,
        }
        cfg_path = self.workdir / "idp.json"
        fd = os.open(cfg_path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
        with os.fdopen(fd, "w") as f:
            json.dump(config, f)
        node = shutil.which("node")
        if node is None:
            raise RuntimeError("node is not installed; ./scripts/test installs nodejs")
        argv = [node, str(HERE / "idp.mjs"), str(cfg_path)]
        self.proc = (spawn or _local_spawn)(argv, self.log_path)
        deadline = time.monotonic() + timeout
        ready = check_from or self._ready
        while not ready(self.issuer):
            if self.proc.poll() is not None:
                raise RuntimeError(f"the test IdP exited {self.proc.returncode}: {self.log()[-2000:]}")
            if time.monotonic() > deadline:
                raise RuntimeError(f"the test IdP did not start in {timeout}s: {self.log()[-2000:]}")
            time.sleep(0.1)
        return self

    @staticmethod
    def _ready(issuer: str) -> bool:
        try:
            return httpx.get(f"{issuer}/.well-known/openid-configuration", timeout=1).status_code == 200
        except httpx.HTTPError:
            return False

    def log(self) -> str:
        try:
            return self.log_path.read_text(errors="replace")
        except OSError:
            return ""

    def stop(self) -> None:
        if self.proc is None:
            return
        if self.kill is not None:
            self.kill(self.proc)
        elif self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(5)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(5)
        self.proc = None
