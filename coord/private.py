"""Paths only the server's user can reach, from the instant they exist (issue 11.2).

The data dir is 0700 and everything the server writes in it 0600: the admin socket (unauthenticated: it mints
keys and sets the policy), the database and its -wal/-shm/-journal, server.lock, the key files. Modes are given
at creation (``os.open``/``mkdir`` with the mode, ``fchmod`` before ``bind``), never narrowed afterwards, because
umask is process-wide and cannot be trusted or changed safely with threads running (aiosqlite's). What an older
version left wider is narrowed before it is used.
"""

from __future__ import annotations

import contextlib
import os
import socket
import stat
from pathlib import Path

DIR_MODE = 0o700
FILE_MODE = 0o600


def ensure_dir(path: Path) -> Path:
    """Create ``path`` 0700 (parents as umask says: they are not ours), or narrow it if it exists wider."""
    path.parent.mkdir(parents=True, exist_ok=True)
    with contextlib.suppress(FileExistsError):
        os.mkdir(path, DIR_MODE)
    narrow(path, DIR_MODE)
    return path


def narrow(path: Path, mode: int = FILE_MODE) -> None:
    """Take group and other bits off ``path`` if it exists (never follows a symlink)."""
    try:
        st = os.lstat(path)
    except FileNotFoundError:
        return
    if stat.S_ISLNK(st.st_mode):
        return
    if stat.S_IMODE(st.st_mode) & ~mode:
        os.chmod(path, stat.S_IMODE(st.st_mode) & mode)


def open_file(path: Path, flags: int) -> int:
    """``os.open(path, flags | O_CREAT, 0600)``; an existing file is narrowed through its descriptor."""
    fd = os.open(path, flags | os.O_CREAT | os.O_NOFOLLOW | os.O_CLOEXEC, FILE_MODE)
    try:
        if stat.S_IMODE(os.fstat(fd).st_mode) & ~FILE_MODE:
            os.fchmod(fd, FILE_MODE)
    except BaseException:
        os.close(fd)
        raise
    return fd


def write_file(path: Path, data: bytes) -> None:
    """Write ``path`` atomically (temp file, fsync, rename), 0600 from the first byte."""
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    with contextlib.suppress(FileNotFoundError):
        os.unlink(tmp)
    fd = open_file(tmp, os.O_WRONLY | os.O_EXCL)
    with os.fdopen(fd, "wb") as f:
        f.write(data)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


def touch(path: Path) -> None:
    """Create ``path`` empty and 0600 if it does not exist (sqlite gives its -wal/-shm/-journal the mode of the
    database file), narrow it if it does."""
    os.close(open_file(path, os.O_RDWR))


def bind_unix(path: Path, backlog: int = 128) -> socket.socket:
    """A listening Unix socket at ``path`` that is 0600 from the instant it exists.

    Linux gives a socket file the mode of the socket's inode when it binds, so ``fchmod`` comes first; it is bound
    under a temporary name in the same (0700) directory, checked, and renamed over ``path``, so ``path`` is
    never a socket nobody listens on, nor one that is wider.
    """
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    with contextlib.suppress(FileNotFoundError):
        os.unlink(tmp)
    s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    try:
        os.fchmod(s.fileno(), FILE_MODE)
        s.bind(str(tmp))
        os.chmod(tmp, FILE_MODE)  # where fchmod before bind is not honoured
        s.listen(backlog)
        s.setblocking(False)
        os.replace(tmp, path)
    except BaseException:
        s.close()
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
        raise
    return s
