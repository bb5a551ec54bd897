"""Projection snapshots (coord/snapshot.py): exact round trips, start-up from a snapshot plus the tail, retention."""

from __future__ import annotations

import itertools
import random
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from coord import snapshot as snap
from coord.state import State, fold
from tests.coord.logscript import pure_history, scripts


def roundtrip(state: State, time: str = "2027-01-15T08:00:00.000000Z") -> State:
    data = snap.encode(state, time)
    assert snap.encode(state, time) == data  # deterministic
    back = snap.decode(data)
    assert snap.encode(back, time) == data  # order of every dict survives, not only its contents
    return back


@settings(max_examples=150, deadline=None)
@given(scripts(max_size=80), st.data())
def test_log_snapshot_round_trip_and_fold_from_a_snapshot(script: list[tuple[Any, ...]], data: st.DataObject) -> None:
    log = pure_history(script)
    records = log.records
    assert roundtrip(log.state) == log.state
    assert fold(records) == log.state
    # a snapshot at any seq, then the events after it, is the fold of the whole log
    k = data.draw(st.integers(0, len(records)), label="snapshot seq")
    at_k = fold(records[:k])
    resumed = fold(records[k:], roundtrip(at_k))
    assert resumed == log.state
    assert (resumed.last_seq, resumed.last_hash) == (log.state.last_seq, log.state.last_hash)


def test_log_snapshot_of_the_empty_state() -> None:
    assert roundtrip(State()) == State()


def test_log_snapshot_refuses_torn_corrupt_and_foreign_files() -> None:
    log = pure_history([("register", 0, (), "laptop", ("10.0.0.0/8",), b"\x01" * 32, b"\x02" * 32, b"\x03" * 32,
                         False)])
    data = snap.encode(log.state, "2027-01-15T08:00:00.000000Z")
    with pytest.raises(snap.SnapshotError, match="sha256"):
        snap.decode(data[:-3])
    flipped = bytearray(data)
    flipped[-5] ^= 1
    with pytest.raises(snap.SnapshotError, match="sha256"):
        snap.decode(bytes(flipped))
    with pytest.raises(snap.SnapshotError, match="header"):
        snap.decode(b"hello\n" + data)
    with pytest.raises(snap.SnapshotError, match="no snapshot header"):
        snap.decode(b"x" * 300)
    other = data.replace(snap.layout().encode(), b"0" * 16, 1)
    with pytest.raises(snap.SnapshotError, match="layout"):
        snap.decode(other)
    h = snap.header(data)
    assert (h.seq, h.hash) == (log.state.last_seq, log.state.last_hash)


HOUR, DAY = 3600.0, 86400.0


def test_log_retention_thins_with_age_and_is_stable() -> None:
    """Snapshots every 10 minutes for 60 days, pruned about every hour as a server would: bounded, newest kept,
    pruning along the way keeps exactly what pruning once at the end would, and every bucket that ever held a
    snapshot still holds one (no period of the past is lost)."""
    start = 1_800_000_000.0
    rnd = random.Random(1)
    kept: dict[int, float] = {}
    every: dict[int, float] = {}
    seq, t = 0, start
    while t < start + 60 * DAY:
        seq += rnd.randint(1, 5000)
        t += 600 + rnd.uniform(-60, 60)
        kept[seq] = every[seq] = t
        if seq % 6 == 0 or rnd.random() < 1 / 6:
            keep = snap.keep([snap.Stored(s, x) for s, x in kept.items()], t)
            kept = {s: x for s, x in kept.items() if s in keep}
    now = t
    final = snap.keep([snap.Stored(s, x) for s, x in kept.items()], now)
    kept = {s: x for s, x in kept.items() if s in final}
    assert max(kept) == seq
    direct = snap.keep([snap.Stored(s, x) for s, x in every.items()], now)
    assert set(kept) == direct
    had = {snap.bucket(x, now) for x in every.values()}
    assert had == {snap.bucket(x, now) for x in kept.values()}
    # at most: 12 in the last hour, 24 hourly, 30 daily, the weeks before, and the newest
    assert len(kept) <= 12 + 24 + 30 + 10 + 1
    ages = sorted(now - x for x in kept.values())
    assert sum(a < HOUR for a in ages) >= 5 and sum(HOUR <= a < DAY for a in ages) >= 20
    # no gap wider than two buckets of the tier the older side is in
    times = sorted(kept.values())
    for a, b in itertools.pairwise(times):
        width, _ = snap.bucket(a, now)
        assert b - a <= 2 * width + 120


def test_log_nearest() -> None:
    assert snap.nearest([10, 20, 30], 25) == 20
    assert snap.nearest([10, 20, 30], 30) == 30
    assert snap.nearest([10, 20, 30], 9) is None
    assert snap.nearest([], 9) is None
