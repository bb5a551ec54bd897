"""The data dir's lock: held by a running server for its lifetime; the CLI takes it to run commands in-process."""

from __future__ import annotations

import fcntl
import os
from pathlib import Path

from coord import private


class ServerLock:
    def __init__(self, data_dir: Path) -> None:
        self.path = data_dir / "server.lock"
        self.fd: int | None = None

    def try_acquire(self) -> bool:
        private.ensure_dir(self.path.parent)
        fd = private.open_file(self.path, os.O_RDWR)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            os.close(fd)
            return False
        self.fd = fd
        return True

    def release(self) -> None:
        if self.fd is not None:
            os.close(self.fd)
            self.fd = None
