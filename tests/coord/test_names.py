"""MagicDNS labels: sanitising as Tailscale's SanitizeHostname does, collisions as laptop, laptop-1, laptop-2."""

from __future__ import annotations

import pytest
from hypothesis import given
from hypothesis import strategies as st

from coord import names


@pytest.mark.parametrize(
    ("hostname", "label"),
    [
        ("laptop", "laptop"),
        ("Laptop", "laptop"),
        ("laptop.local", "laptop"),
        ("build.localdomain", "build"),
        ("nas.lan", "nas"),
        ("My MacBook Pro", "my-macbook-pro"),
        ("host.example.com", "host-example-com"),
        ("user@box", "user-box"),
        ("under_score", "under-score"),
        ("--edge--", "edge"),
        ("a  b", "a-b"),
        ("café", "caf"),
        ("x!y#z", "xyz"),
        ("", "node"),
        ("   ", "node"),
        ("!!!", "node"),
        ("a" * 80, "a" * 63),
    ],
)
def test_sanitize(hostname: str, label: str) -> None:
    assert names.sanitize_hostname(hostname) == label


@given(st.text(max_size=300))
def test_sanitized_is_always_a_valid_label(hostname: str) -> None:
    assert names.valid_label(names.sanitize_hostname(hostname))


def test_collisions_take_the_first_free_suffix() -> None:
    taken: set[str] = set()
    got = []
    for _ in range(4):
        label = names.unique_label("laptop", taken)
        taken.add(label)
        got.append(label)
    assert got == ["laptop", "laptop-1", "laptop-2", "laptop-3"]
    taken.discard("laptop-1")
    assert names.unique_label("laptop", taken) == "laptop-1"


def test_collision_suffix_keeps_63_characters() -> None:
    long = "a" * 63
    label = names.unique_label(long, {long})
    assert label == "a" * 61 + "-1" and names.valid_label(label)


@pytest.mark.parametrize(
    ("fn", "ok", "bad"),
    [
        (names.valid_label, ["a", "a-b", "x1", "1x"], ["", "-a", "a-", "A", "a_b", "a" * 64]),
        (names.valid_user_name, ["alice", "bob@example.com", "a.b+c_d-e", "1"], ["", ".x", "a b", "a" * 65]),
        (names.valid_tag, ["tag:server", "tag:a-b_c", "tag:1"], ["server", "tag:", "tag:-x", "tag:a b", "TAG:x"]),
    ],
)
def test_validators(fn: object, ok: list[str], bad: list[str]) -> None:
    assert callable(fn)
    assert all(fn(x) for x in ok)
    assert not any(fn(x) for x in bad)
