"""Signed checkpoints: the anchor that makes truncating or rewriting the event log detectable.

The hash chain alone proves only that the rows agree with each other: whoever can write the table can drop its
tail or recompute a whole fresh chain. A checkpoint, signed by the server and kept off the box, pins one point of
the chain; a log that still verifies *and* holds that exact event at that seq extends the checkpoint.

One checkpoint is one line of ASCII text (a trailing newline is allowed, nothing else)::

    shoal-checkpoint/1 <seq> <head> <time> <signature>

    seq        decimal, >= 0: the number of events the log held (0: the empty log)
    head       64 lowercase hex digits: the ``hash`` of event ``seq`` (``"0"*64`` for the empty log)
    time       RFC 3339 UTC with microseconds: when the server signed it (the server attests that by then its
               log held exactly these ``seq`` events ending in ``head``)
    signature  128 lowercase hex digits: Ed25519 over the signed message below

    signed message = b"shoal-checkpoint/1\\n" + f"{seq}\\n{head}\\n{time}\\n".encode()

The signing key is Ed25519 (``checkpoint.key`` in the data dir, 0600), separate from the X25519 key that seals the
control protocol: that one can only do key agreement, and a key used for one purpose is never reused for another.
Its public half is printed as ``ckptkey:<64 hex digits>`` (``shoal-server info``).

This module is pure: no file, socket or clock. Reading and writing ``checkpoint.key`` is ``coord/logfiles.py``.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

from nacl.exceptions import BadSignatureError
from nacl.signing import SigningKey, VerifyKey

from coord import events as ev

MAGIC = "shoal-checkpoint/1"
PUBLIC_PREFIX = "ckptkey:"
PRIVATE_PREFIX = "ckptsecret:"

_LINE = re.compile(
    r"^shoal-checkpoint/1 (0|[1-9][0-9]{0,18}) ([0-9a-f]{64}) "
    r"([0-9]{4}-[0-9]{2}-[0-9]{2}T[0-9]{2}:[0-9]{2}:[0-9]{2}\.[0-9]{6}Z) ([0-9a-f]{128})\n?\Z"
)


class CheckpointError(ValueError):
    """A line that is not a checkpoint, or one whose signature does not verify."""


@dataclass(frozen=True)
class Checkpoint:
    seq: int
    head: str
    time: str
    signature: str

    def message(self) -> bytes:
        return signed_message(self.seq, self.head, self.time)

    def line(self) -> str:
        """The one-line text form, without a newline."""
        return f"{MAGIC} {self.seq} {self.head} {self.time} {self.signature}"


def signed_message(seq: int, head: str, time: str) -> bytes:
    return f"{MAGIC}\n{seq}\n{head}\n{time}\n".encode()


# --- keys -----------------------------------------------------------------------------------------------


def new_key(seed: bytes) -> SigningKey:
    """A signing key from 32 random bytes (the caller draws them: this module reads no randomness)."""
    if len(seed) != 32:
        raise CheckpointError("a checkpoint key seed is 32 bytes")
    return SigningKey(seed)


def private_text(key: SigningKey) -> str:
    return PRIVATE_PREFIX + bytes(key).hex()


def parse_private(text: str, where: str = "checkpoint key") -> SigningKey:
    body = text.strip()
    if not body.startswith(PRIVATE_PREFIX):
        raise CheckpointError(f"{where}: expected {PRIVATE_PREFIX}<64 hex digits>")
    try:
        seed = bytes.fromhex(body[len(PRIVATE_PREFIX):])
    except ValueError:
        seed = b""
    if len(seed) != 32:
        raise CheckpointError(f"{where}: expected {PRIVATE_PREFIX}<64 hex digits>")
    return SigningKey(seed)


def public_text(key: SigningKey | VerifyKey) -> str:
    vk = key.verify_key if isinstance(key, SigningKey) else key
    return PUBLIC_PREFIX + bytes(vk).hex()


def parse_public(text: str, where: str = "checkpoint public key") -> VerifyKey:
    body = text.strip()
    raw = b""
    if body.startswith(PUBLIC_PREFIX):
        try:
            raw = bytes.fromhex(body[len(PUBLIC_PREFIX):])
        except ValueError:
            raw = b""
    if len(raw) != 32:
        raise CheckpointError(f"{where}: expected {PUBLIC_PREFIX}<64 hex digits>")
    return VerifyKey(raw)


# --- sign, parse, verify --------------------------------------------------------------------------------


def sign(key: SigningKey, seq: int, head: str, time: str) -> Checkpoint:
    if seq < 0 or not re.fullmatch(r"[0-9a-f]{64}", head):
        raise CheckpointError("a checkpoint needs seq >= 0 and a 64-hex-digit head hash")
    sig = key.sign(signed_message(seq, head, time)).signature.hex()
    cp = Checkpoint(seq, head, time, sig)
    parse(cp.line())  # the time must fit the line format too
    return cp


def sign_head(key: SigningKey, last: tuple[int, str], now: float) -> Checkpoint:
    """The checkpoint of a log whose last event is ``last`` = (seq, hash) ((0, GENESIS): empty), signed at ``now``."""
    return sign(key, last[0], last[1], ev.rfc3339(now))


def parse(text: str) -> Checkpoint:
    """Exactly one checkpoint line (an optional trailing newline); anything else is a CheckpointError."""
    m = _LINE.match(text)
    if m is None:
        first = text.split("\n", 1)[0][:60]
        if not text.startswith(MAGIC + " "):
            raise CheckpointError(f"not a checkpoint line (it must start with {MAGIC!r}): {first!r}")
        if text.removesuffix("\n").count("\n"):
            raise CheckpointError("a checkpoint file holds exactly one line")
        raise CheckpointError(f"malformed checkpoint line (want: {MAGIC} SEQ HEAD TIME SIGNATURE): {first!r}...")
    return Checkpoint(int(m.group(1)), m.group(2), m.group(3), m.group(4))


def verify_signature(cp: Checkpoint, key: VerifyKey) -> None:
    try:
        key.verify(cp.message(), bytes.fromhex(cp.signature))
    except BadSignatureError:
        raise CheckpointError(
            f"checkpoint at seq {cp.seq}: the signature does not verify with {public_text(key)}"
        ) from None


# --- does the log extend a checkpoint? ------------------------------------------------------------------


@dataclass(frozen=True)
class Extends:
    """The verdict of ``extends``: ``ok``, or what of the checkpointed log is missing or changed."""

    ok: bool
    checkpoint: Checkpoint
    log_last_seq: int
    reason: str = ""

    def text(self) -> str:
        if self.ok:
            return (
                f"ok: the log ({self.log_last_seq} events) extends the checkpoint at seq {self.checkpoint.seq} "
                f"(head {self.checkpoint.head[:16]}, {self.checkpoint.time})"
            )
        return f"the log does not extend the checkpoint at seq {self.checkpoint.seq}: {self.reason}"


def extends(cp: Checkpoint, at: ev.Record | None, log_last_seq: int) -> Extends:
    """Whether a chain-verified log of ``log_last_seq`` events, holding ``at`` at seq ``cp.seq``, extends ``cp``.

    In a verified chain, event ``cp.seq`` carrying hash ``cp.head`` fixes every event up to it: changing any earlier
    event would change that hash. So the proof is that one event, at its seq, with the checkpoint's hash.
    ``at`` is None when the log has no event ``cp.seq``. Names what is missing (the log ends before ``cp.seq``) or
    changed (another event at ``cp.seq``).
    """
    if cp.seq == 0:
        if cp.head != ev.GENESIS:
            return Extends(False, cp, log_last_seq, "a checkpoint at seq 0 must name the genesis hash")
        return Extends(True, cp, log_last_seq)
    if at is None or log_last_seq < cp.seq:
        missing = f"events {log_last_seq + 1}..{cp.seq}" if log_last_seq + 1 < cp.seq else f"event {cp.seq}"
        return Extends(
            False, cp, log_last_seq,
            f"{missing} missing: the log ends at seq {log_last_seq}, the checkpoint covers seq {cp.seq} "
            "(the tail was truncated)",
        )
    if at.seq != cp.seq:
        raise ValueError(f"extends: given event {at.seq} for a checkpoint at seq {cp.seq}")
    if at.hash != cp.head:
        return Extends(
            False, cp, log_last_seq,
            f"event {cp.seq} changed: its hash is {at.hash[:16]}..., the checkpoint says {cp.head[:16]}... "
            f"(the log was rewritten at or before seq {cp.seq})",
        )
    return Extends(True, cp, log_last_seq)
