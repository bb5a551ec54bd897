"""The OS side of MagicDNS, `direct` mode (PROTOCOLS.md 5): /etc/resolv.conf points at quad-100.

    ResolvConf(path, backup).set(nameservers, search)   # idempotent; the first set keeps a backup
    ResolvConf(path, backup).restore()                   # the backup goes back, then is removed

The file we write (`render`):

    # Written by shoald (MagicDNS); the original is kept in <backup> and put back on `shoal down`.
    nameserver 100.100.100.100
    search shoal.internal

Writes are in place (open, truncate, write, fsync), never a rename: under `ip netns exec`, /etc/resolv.conf is
a bind mount of /etc/netns/NAME/resolv.conf and a rename over a mount point fails with EBUSY (a real host's
file may also be a symlink we must not replace). The backup lives in the agent's state dir and is written
before the file is touched; an agent that finds one at start had crashed, and puts it back (`restore`).
A file that already carries our header is never taken as the original.
"""

from __future__ import annotations

import os
from collections.abc import Iterable
from pathlib import Path

HEADER = "# Written by shoald (MagicDNS)"


def render(nameservers: Iterable[str], search: Iterable[str], backup: Path) -> str:
    lines = [f"{HEADER}; the original is kept in {backup} and put back on `shoal down`."]
    lines += [f"nameserver {n}" for n in nameservers]
    domains = [d.rstrip(".") for d in search if d.rstrip(".")]
    if domains:
        lines.append("search " + " ".join(domains))
    return "\n".join(lines) + "\n"


def nameservers(text: str) -> list[str]:
    """The `nameserver` lines of a resolv.conf, in order."""
    out = []
    for line in text.splitlines():
        parts = line.split()
        if len(parts) >= 2 and parts[0] == "nameserver":
            out.append(parts[1])
    return out


def write_in_place(path: Path, text: str) -> None:
    fd = os.open(path, os.O_WRONLY | os.O_CREAT, 0o644)
    try:
        data = text.encode()
        os.ftruncate(fd, 0)
        view = memoryview(data)
        while view:
            n = os.write(fd, view)
            view = view[n:]
        os.fsync(fd)
    finally:
        os.close(fd)


def _write_new(path: Path, text: str) -> None:
    tmp = path.with_name(path.name + ".tmp")
    write_in_place(tmp, text)
    os.replace(tmp, path)


class ResolvConf:
    def __init__(self, path: Path, backup: Path) -> None:
        self.path = path
        self.backup = backup
        self.active = False  # our file is in place

    def original(self) -> str:
        """The host's own resolv.conf: the backup while ours is in place, else the file itself."""
        for p in (self.backup, self.path):
            try:
                text = p.read_text()
            except FileNotFoundError:
                continue
            if not text.startswith(HEADER):
                return text
        return ""

    def set(self, servers: Iterable[str], search: Iterable[str]) -> bool:
        """Puts our file in place; returns whether anything was written."""
        want = render(servers, search, self.backup)
        try:
            have = self.path.read_text()
        except FileNotFoundError:
            have = ""
        if not self.backup.exists() and not have.startswith(HEADER):
            _write_new(self.backup, have)
        self.active = True
        if have == want:
            return False
        write_in_place(self.path, want)
        return True

    def restore(self) -> bool:
        """Puts the backup back (in place) and removes it; returns whether there was one."""
        self.active = False
        try:
            text = self.backup.read_text()
        except FileNotFoundError:
            return False
        write_in_place(self.path, text)
        self.backup.unlink()
        return True
