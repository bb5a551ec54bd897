"""Signed checkpoints (coord/checkpoint.py): the line format, signatures, and the proof that a log extends one."""

from __future__ import annotations

import pytest
from hypothesis import given
from hypothesis import strategies as st

from coord import checkpoint as ckpt
from coord import events as ev

KEY = ckpt.new_key(b"\x07" * 32)
OTHER = ckpt.new_key(b"\x08" * 32)
NOW = 1_800_000_000.25


def chain(n: int) -> list[ev.Record]:
    out, prev = [], ev.GENESIS
    for i in range(1, n + 1):
        r = ev.seal_record(prev, i, ev.rfc3339(NOW + i), "admin", ev.UserCreated(i, f"u{i}"))
        out.append(r)
        prev = r.hash
    return out


def test_log_checkpoint_line_round_trips_and_verifies() -> None:
    log = chain(5)
    cp = ckpt.sign_head(KEY, (log[-1].seq, log[-1].hash), NOW)
    line = cp.line()
    assert line.startswith("shoal-checkpoint/1 5 " + log[-1].hash + " 2027-01-15T08:00:00.250000Z ")
    assert "\n" not in line and len(line.split(" ")) == 5
    back = ckpt.parse(line + "\n")
    assert back == cp
    ckpt.verify_signature(back, KEY.verify_key)
    assert ckpt.parse_public(ckpt.public_text(KEY)) == KEY.verify_key
    assert ckpt.parse_private(ckpt.private_text(KEY)).verify_key == KEY.verify_key


def test_log_checkpoint_signature_binds_every_field() -> None:
    cp = ckpt.sign(KEY, 5, "ab" * 32, ev.rfc3339(NOW))
    with pytest.raises(ckpt.CheckpointError, match="does not verify"):
        ckpt.verify_signature(cp, OTHER.verify_key)
    for changed in (
        ckpt.Checkpoint(6, cp.head, cp.time, cp.signature),
        ckpt.Checkpoint(5, "cd" * 32, cp.time, cp.signature),
        ckpt.Checkpoint(5, cp.head, ev.rfc3339(NOW + 1), cp.signature),
    ):
        with pytest.raises(ckpt.CheckpointError, match="does not verify"):
            ckpt.verify_signature(changed, KEY.verify_key)


@pytest.mark.parametrize("text, words", [
    ("", "not a checkpoint line"),
    ("hello", "not a checkpoint line"),
    ("shoal-checkpoint/1 5", "malformed"),
    ("shoal-checkpoint/1 -1 " + "0" * 64 + " 2026-01-01T00:00:00.000000Z " + "0" * 128, "malformed"),
    ("shoal-checkpoint/1 05 " + "0" * 64 + " 2026-01-01T00:00:00.000000Z " + "0" * 128, "malformed"),
    ("shoal-checkpoint/1 5 " + "A" * 64 + " 2026-01-01T00:00:00.000000Z " + "0" * 128, "malformed"),
    ("shoal-checkpoint/1 5 " + "0" * 64 + " 2026-01-01T00:00:00Z " + "0" * 128, "malformed"),
    ("shoal-checkpoint/1 5 " + "0" * 64 + " 2026-01-01T00:00:00.000000Z " + "0" * 127, "malformed"),
    ("shoal-checkpoint/1 5 " + "0" * 64 + " 2026-01-01T00:00:00.000000Z " + "0" * 128 + "\nmore\n",
     "exactly one line"),
    ("shoal-checkpoint/1 5 " + "0" * 64 + " 2026-01-01T00:00:00.000000Z " + "0" * 128 + "\n\n", "exactly one line"),
    ("shoal-checkpoint/1 5 " + "0" * 64 + " 2026-01-01T00:00:00.000000Z " + "0" * 128 + " ", "malformed"),
])
def test_log_checkpoint_parse_refuses_anything_but_one_line(text: str, words: str) -> None:
    with pytest.raises(ckpt.CheckpointError, match=words):
        ckpt.parse(text)


@given(st.text(max_size=300))
def test_log_checkpoint_parse_random_text_only_checkpoint_error(text: str) -> None:
    try:
        cp = ckpt.parse(text)
    except ckpt.CheckpointError:
        return
    assert ckpt.parse(cp.line()) == cp


@given(st.binary(min_size=0, max_size=40))
def test_log_checkpoint_key_texts_refuse_junk(raw: bytes) -> None:
    for fn, prefix in ((ckpt.parse_public, ckpt.PUBLIC_PREFIX), (ckpt.parse_private, ckpt.PRIVATE_PREFIX)):
        text = prefix + raw.hex()
        if len(raw) == 32:
            fn(text)  # type: ignore[operator]
        else:
            with pytest.raises(ckpt.CheckpointError):
                fn(text)  # type: ignore[operator]


def test_log_extends_accepts_the_same_or_a_longer_log() -> None:
    log = chain(8)
    cp = ckpt.sign_head(KEY, (5, log[4].hash), NOW)
    assert ckpt.extends(cp, log[4], 5).ok
    v = ckpt.extends(cp, log[4], 8)
    assert v.ok and "extends the checkpoint at seq 5" in v.text() and "8 events" in v.text()
    empty = ckpt.sign_head(KEY, (0, ev.GENESIS), NOW)
    assert ckpt.extends(empty, None, 0).ok and ckpt.extends(empty, None, 8).ok


def test_log_extends_names_a_truncated_tail() -> None:
    log = chain(8)
    cp = ckpt.sign_head(KEY, (8, log[7].hash), NOW)
    v = ckpt.extends(cp, None, 5)
    assert not v.ok
    assert v.reason.startswith("events 6..8 missing: the log ends at seq 5")
    v = ckpt.extends(cp, None, 7)
    assert v.reason.startswith("event 8 missing: the log ends at seq 7")


def test_log_extends_names_a_rewritten_log() -> None:
    log = chain(8)
    cp = ckpt.sign_head(KEY, (6, log[5].hash), NOW)
    # the same kinds of events, a fresh chain: hashes differ from seq 1 on (times differ)
    fresh, prev = [], ev.GENESIS
    for i in range(1, 9):
        r = ev.seal_record(prev, i, ev.rfc3339(NOW + 100 + i), "admin", ev.UserCreated(i, f"u{i}"))
        fresh.append(r)
        prev = r.hash
    v = ckpt.extends(cp, fresh[5], 8)
    assert not v.ok and v.reason.startswith("event 6 changed: its hash is")
    assert "rewritten at or before seq 6" in v.text()
