"""A throw-away PostgreSQL cluster for tests (and ``scripts/serve --postgres``): Debian's postgresql 15 binaries
(not on PATH), a data directory and unix socket in a fresh temporary directory owned by the ``postgres`` user
(PostgreSQL refuses to run as root), no TCP listener, so it never meets the package's default cluster on 5432.
Trust authentication is safe here: the socket lives in a 0700 directory only root and ``postgres`` can enter.
"""

from __future__ import annotations

import itertools
import os
import pwd
import shutil
import subprocess
import tempfile
from dataclasses import dataclass, field
from pathlib import Path

BIN = Path("/usr/lib/postgresql/15/bin")
USER = "postgres"


def _as_pg(*args: str) -> list[str]:
    return ["runuser", "-u", USER, "--", *args] if os.geteuid() == 0 else list(args)


@dataclass
class Cluster:
    root: Path
    port: int = 5432
    _names: itertools.count[int] = field(default_factory=lambda: itertools.count(1))

    @property
    def data(self) -> Path:
        return self.root / "data"

    @property
    def socket_dir(self) -> Path:
        return self.root

    def dsn(self, db: str = "postgres") -> str:
        return f"postgresql://shoal@/{db}?host={self.socket_dir}&port={self.port}"

    def start(self) -> None:
        opts = f"-c listen_addresses='' -c unix_socket_directories={self.socket_dir} -p {self.port} -c fsync=off " \
               "-c synchronous_commit=off -c full_page_writes=off -c max_connections=200"
        subprocess.run(_as_pg(str(BIN / "pg_ctl"), "-D", str(self.data), "-o", opts, "-l",
                              str(self.root / "log"), "-w", "-t", "30", "start"),
                       check=True, stdout=subprocess.DEVNULL)

    def stop(self, mode: str = "fast") -> None:
        subprocess.run(_as_pg(str(BIN / "pg_ctl"), "-D", str(self.data), "-m", mode, "-w", "stop"),
                       check=False, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)

    def psql(self, db: str, sql: str) -> str:
        out = subprocess.run(
            [str(BIN / "psql"), "-X", "-q", "-A", "-t",
             "-h", str(self.socket_dir), "-p", str(self.port), "-U", "shoal", "-d", db, "-c", sql],
            capture_output=True, text=True,
        )
        if out.returncode != 0:
            raise RuntimeError(f"psql {sql!r}: {out.stderr.strip()}")
        return out.stdout

    def new_database(self, prefix: str = "t") -> str:
        name = f"{prefix}{next(self._names)}"
        self.psql("postgres", f"CREATE DATABASE {name}")
        return name

    def remove(self) -> None:
        self.stop("immediate")
        shutil.rmtree(self.root, ignore_errors=True)


def create(parent: str | None = None) -> Cluster:
    root = Path(tempfile.mkdtemp(prefix="shoal-pg-", dir=parent))
    c = Cluster(root)
    try:
        if os.geteuid() == 0:
            pw = pwd.getpwnam(USER)
            os.chown(root, pw.pw_uid, pw.pw_gid)
        os.chmod(root, 0o700)
        subprocess.run(_as_pg(str(BIN / "initdb"), "-D", str(c.data), "-U", "shoal", "-A", "trust", "-E", "UTF8",
                              "--no-sync", "--no-instructions"),
                       check=True, stdout=subprocess.DEVNULL)
        c.start()
    except BaseException:
        c.remove()
        raise
    return c
