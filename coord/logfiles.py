"""Files beside the event log: the checkpoint signing key, the snapshot series, and where checkpoints go.

Every file here is created 0600 from the moment it exists (``os.open`` with the mode, never a chmod after) and
written whole: a temporary file in the same directory, fsync, rename, fsync of the directory. A crash leaves the
old file or the new one, and at worst a ``*.tmp`` that the next write or start-up removes.

    <data>/checkpoint.key                    ckptsecret:<64 hex>   (coord/checkpoint.py)
    <data>/snapshots/<seq, 12 digits>.snap   coord/snapshot.py format
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import re
from dataclasses import dataclass
from pathlib import Path

from nacl.signing import SigningKey

from coord import checkpoint as ckpt
from coord import events as ev
from coord import private
from coord import snapshot as snap
from coord.errors import ConfigError
from coord.state import State

log = logging.getLogger("shoal.logfiles")

SNAPSHOT_NAME = re.compile(r"^([0-9]{12})\.snap$")


def write_private(path: Path, data: bytes, *, durable: bool = True) -> None:
    """Replace ``path`` with ``data``, atomically, mode 0600 from creation."""
    tmp = path.with_name(path.name + ".tmp")
    with contextlib.suppress(FileNotFoundError):
        tmp.unlink()
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    try:
        view = memoryview(data)
        while view:
            view = view[os.write(fd, view):]
        if durable:
            os.fsync(fd)
    finally:
        os.close(fd)
    os.replace(tmp, path)
    if durable:
        dfd = os.open(path.parent, os.O_RDONLY)
        try:
            os.fsync(dfd)
        finally:
            os.close(dfd)


def load_or_create_signing_key(path: Path) -> SigningKey:
    """The checkpoint signing key (Ed25519), created 0600 on first use."""
    if path.exists():
        private.narrow(path)  # a key left wider by hand or by an older version is narrowed before it is read
        try:
            return ckpt.parse_private(path.read_text(), str(path))
        except ckpt.CheckpointError as e:
            raise ConfigError(f"{e}; move it away to create a new one") from None
    key = ckpt.new_key(os.urandom(32))
    path.parent.mkdir(parents=True, exist_ok=True)
    write_private(path, (ckpt.private_text(key) + "\n").encode())
    return key


def read_checkpoint_file(path: Path) -> ckpt.Checkpoint:
    try:
        data = path.read_bytes()
    except OSError as e:
        raise ckpt.CheckpointError(f"{path}: {e.strerror}") from None
    if len(data) > 4096:
        raise ckpt.CheckpointError(f"{path}: a checkpoint file holds exactly one line")
    try:
        text = data.decode("ascii")
    except UnicodeDecodeError:
        raise ckpt.CheckpointError(f"{path}: not a checkpoint line (not ASCII)") from None
    try:
        return ckpt.parse(text)
    except ckpt.CheckpointError as e:
        raise ckpt.CheckpointError(f"{path}: {e}") from None


# --- where the server's checkpoints go ------------------------------------------------------------------


@dataclass(frozen=True)
class CheckpointSink:
    """A file replaced with each new checkpoint line, and/or a shell command that gets the line on stdin."""

    file: str = ""
    command: str = ""
    timeout: float = 30.0

    @property
    def enabled(self) -> bool:
        return bool(self.file or self.command)

    async def put(self, cp: ckpt.Checkpoint) -> None:
        line = (cp.line() + "\n").encode()
        if self.file:
            await asyncio.to_thread(write_private, Path(self.file), line)
        if self.command:
            proc = await asyncio.create_subprocess_shell(
                self.command, stdin=asyncio.subprocess.PIPE, stdout=asyncio.subprocess.DEVNULL,
                stderr=asyncio.subprocess.PIPE,
            )
            try:
                _, err = await asyncio.wait_for(proc.communicate(line), self.timeout)
            except TimeoutError:
                proc.kill()
                await proc.wait()
                raise RuntimeError(f"checkpoint command timed out after {self.timeout:.0f}s") from None
            if proc.returncode != 0:
                tail = err.decode(errors="replace").strip().splitlines()[-1:] or [""]
                raise RuntimeError(f"checkpoint command exited {proc.returncode}: {tail[0][:200]}")


# --- the snapshot series --------------------------------------------------------------------------------


@dataclass(frozen=True)
class SnapshotFile:
    seq: int
    path: Path


class SnapshotDir:
    """``<data>/snapshots``: one file per snapshot, named by its seq."""

    def __init__(self, path: Path, *, durable: bool = True) -> None:
        self.path = path
        self.durable = durable

    def files(self) -> list[SnapshotFile]:
        if not self.path.is_dir():
            return []
        out = []
        for entry in self.path.iterdir():
            m = SNAPSHOT_NAME.match(entry.name)
            if m:
                out.append(SnapshotFile(int(m.group(1)), entry))
        return sorted(out, key=lambda f: f.seq)

    def seqs(self) -> list[int]:
        return [f.seq for f in self.files()]

    def file_for(self, seq: int) -> Path:
        return self.path / f"{seq:012d}.snap"

    def write(self, data: bytes) -> Path:
        """Store an encoded snapshot (blocking: call it in a thread)."""
        h = snap.header(data)
        self.path.mkdir(mode=0o700, parents=True, exist_ok=True)
        dst = self.file_for(h.seq)
        write_private(dst, data, durable=self.durable)
        return dst

    def clean_temporaries(self) -> None:
        if self.path.is_dir():
            for entry in self.path.glob("*.tmp"):
                entry.unlink(missing_ok=True)

    def read(self, seq: int) -> State:
        return snap.decode(self.file_for(seq).read_bytes())

    def headers(self) -> list[snap.Header]:
        out = []
        for f in self.files():
            try:
                with f.path.open("rb") as fh:
                    out.append(snap.header(fh.read(snap.MAX_HEADER)))
            except (OSError, snap.SnapshotError) as e:
                log.warning("snapshot %s unreadable, ignored: %s", f.path.name, e)
        return out

    def prune(self, now: float) -> list[int]:
        """Delete the snapshots the retention rule thins away; the seqs deleted."""
        hs = self.headers()
        keep = snap.keep([snap.Stored(h.seq, ev.parse_time(h.time)) for h in hs], now)
        gone = []
        for h in hs:
            if h.seq not in keep:
                self.file_for(h.seq).unlink(missing_ok=True)
                gone.append(h.seq)
        return gone
