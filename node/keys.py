"""Curve25519 keys of a node and the state files that keep them.

Three key pairs, as in Tailscale: the machine key (long-lived, authenticates the device to the control
server), the node key (the WireGuard key and DERP address) and the disco key (authenticates path discovery).

Text forms:
- public keys: `mkey:<64 hex>`, `nodekey:<64 hex>`, `discokey:<64 hex>` (the control protocol and logs);
- WireGuard wants base64 (`wg`, pyroute2) or bare hex (UAPI), both offered on the key objects.
State file (one per key, in the state dir, mode 0600): `privkey:<64 hex>\n`, written atomically (tmp + fsync +
rename). A private key never reaches a log: repr() masks it.
"""

from __future__ import annotations

import base64
import binascii
import contextlib
import os
from dataclasses import dataclass
from pathlib import Path
from typing import ClassVar

from nacl.public import PrivateKey as _NaclPrivate

from node.errors import LocalError

KEY_LEN = 32


class BadKey(LocalError, ValueError):
    """A key text or state file is malformed."""


class StateFileError(LocalError):
    """A state file exists but cannot be used. Never answered by silently making a new identity."""

    def __init__(self, path: Path, why: str) -> None:
        self.path = path
        super().__init__(
            f"state file {path} is unusable ({why}); restore it from a backup, or delete it to give this "
            f"node a new identity (the server will then see a new machine that must be approved again)"
        )


@dataclass(frozen=True, slots=True)
class PublicKey:
    raw: bytes
    prefix: str = "nodekey"

    def __post_init__(self) -> None:
        if len(self.raw) != KEY_LEN:
            raise BadKey(f"a public key is {KEY_LEN} bytes, got {len(self.raw)}")

    def __str__(self) -> str:
        return f"{self.prefix}:{self.raw.hex()}"

    def __repr__(self) -> str:
        return f"PublicKey({self})"

    @property
    def hex(self) -> str:
        return self.raw.hex()

    @property
    def b64(self) -> str:
        return base64.b64encode(self.raw).decode()

    @classmethod
    def parse(cls, text: str, prefix: str = "nodekey") -> PublicKey:
        want = prefix + ":"
        if not text.startswith(want):
            raise BadKey(f"expected a {prefix} key ({want}<64 hex>), got {text[:16]!r}")
        return cls(_unhex(text[len(want) :]), prefix)

    @classmethod
    def from_b64(cls, text: str, prefix: str = "nodekey") -> PublicKey:
        try:
            raw = base64.b64decode(text, validate=True)
        except binascii.Error as e:
            raise BadKey(f"bad base64 key: {e}") from None
        return cls(raw, prefix)

    @classmethod
    def from_hex(cls, text: str, prefix: str = "nodekey") -> PublicKey:
        return cls(_unhex(text), prefix)


class PrivateKey:
    """A Curve25519 private key. `prefix` names the kind of its public half (mkey, nodekey, discokey)."""

    __slots__ = ("_raw", "prefix")
    PREFIXES: ClassVar[tuple[str, ...]] = ("mkey", "nodekey", "discokey")

    def __init__(self, raw: bytes, prefix: str = "nodekey") -> None:
        if len(raw) != KEY_LEN:
            raise BadKey(f"a private key is {KEY_LEN} bytes, got {len(raw)}")
        self._raw = raw
        self.prefix = prefix

    @classmethod
    def generate(cls, prefix: str = "nodekey") -> PrivateKey:
        return cls(bytes(_NaclPrivate.generate()), prefix)

    @property
    def raw(self) -> bytes:
        return self._raw

    @property
    def hex(self) -> str:
        return self._raw.hex()

    @property
    def b64(self) -> str:
        return base64.b64encode(self._raw).decode()

    def public(self) -> PublicKey:
        return PublicKey(bytes(_NaclPrivate(self._raw).public_key), self.prefix)

    def nacl(self) -> _NaclPrivate:
        return _NaclPrivate(self._raw)

    def __repr__(self) -> str:
        return f"PrivateKey({self.prefix}, public={self.public()})"

    __str__ = __repr__

    def __eq__(self, other: object) -> bool:
        return isinstance(other, PrivateKey) and self._raw == other._raw and self.prefix == other.prefix

    def __hash__(self) -> int:
        return hash((self._raw, self.prefix))


def _unhex(text: str) -> bytes:
    if len(text) != 2 * KEY_LEN:
        raise BadKey(f"a key is {2 * KEY_LEN} hex digits, got {len(text)}")
    try:
        return bytes.fromhex(text)
    except ValueError:
        raise BadKey("key is not hex") from None


def write_private(path: Path, text: str) -> None:
    """Writes a secret file atomically with mode 0600 from its first byte."""
    tmp = path.with_name(f".{path.name}.tmp{os.getpid()}")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    try:
        os.fchmod(fd, 0o600)
        os.write(fd, text.encode())
        os.fsync(fd)
    finally:
        os.close(fd)
    try:
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        raise
    dfd = os.open(path.parent, os.O_RDONLY)
    try:
        os.fsync(dfd)
    finally:
        os.close(dfd)


class KeyStore:
    """Keys of one node in a state dir: `machine.key`, `node.key`, `disco.key`."""

    FILES: ClassVar[dict[str, str]] = {"mkey": "machine.key", "nodekey": "node.key", "discokey": "disco.key"}

    def __init__(self, state_dir: Path | str) -> None:
        self.dir = Path(state_dir)

    def path(self, prefix: str) -> Path:
        return self.dir / self.FILES[prefix]

    def load(self, prefix: str) -> PrivateKey | None:
        """The stored key, None when the file does not exist; StateFileError when it exists but is bad."""
        path = self.path(prefix)
        try:
            data = path.read_bytes()
        except FileNotFoundError:
            return None
        except OSError as e:
            raise StateFileError(path, e.strerror or str(e)) from None
        try:
            text = data.decode("ascii").strip()
        except UnicodeDecodeError:
            raise StateFileError(path, "not ASCII text") from None
        if not text.startswith("privkey:"):
            raise StateFileError(path, "does not start with 'privkey:'")
        try:
            return PrivateKey(_unhex(text[len("privkey:") :]), prefix)
        except BadKey as e:
            raise StateFileError(path, str(e)) from None

    def save(self, key: PrivateKey) -> None:
        self.dir.mkdir(parents=True, exist_ok=True, mode=0o700)
        write_private(self.path(key.prefix), f"privkey:{key.hex}\n")

    def load_or_create(self, prefix: str) -> PrivateKey:
        key = self.load(prefix)
        if key is None:
            key = PrivateKey.generate(prefix)
            self.save(key)
        return key

    def replace(self, prefix: str) -> PrivateKey:
        """A new key for `prefix` (node key rotation on re-auth; disco key per start)."""
        key = PrivateKey.generate(prefix)
        self.save(key)
        return key
