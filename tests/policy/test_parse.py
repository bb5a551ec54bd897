# ruff: noqa: E501
"""Parser errors carry file, line, column, JSON path and the expectation; hypothesis fuzzes the parser."""

from __future__ import annotations

import contextlib

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from coord.policy import PolicyError, check, parse

from . import corpus

SAMPLES = corpus.NAMES[:12]


@pytest.mark.parametrize(
    "text,where,reason",
    [
        (
            '{\n  "acls": [\n    {"action": "accept", "src": ["*"], "dst": ["tag:nope:22"]},\n  ],\n}',
            "p:3:48: acls[0].dst[0]",
            "tag 'tag:nope' is not defined in 'tagOwners'",
        ),
        (
            '{"acls": [{"action": "accept", "src": ["group:x"], "dst": ["*:*"]}]}',
            "p:1:40: acls[0].src[0]",
            "group 'group:x' is not defined",
        ),
        ('{"acls": [{"action": "drop", "src": ["*"], "dst": ["*:*"]}]}', "p:1:22: acls[0].action", 'expected "accept"'),
        ('{"acls": [{"action": "accept", "src": ["*"], "dst": ["*:99999"]}]}', "p:1:54: acls[0].dst[0]", "bad ports"),
        (
            '{"acls": [{"action": "accept", "src": ["*"], "dst": ["*:*"], "proto": "tcpp"}]}',
            "p:1:71: acls[0].proto",
            "unknown protocol",
        ),
        ('{"aclz": []}', "p:1:2: aclz", "unknown key 'aclz'"),
        ('{"hosts": {"a": "1.2.3.4"}, "hosts": {}}', "p:1:29: hosts", "duplicate key"),
        ("{'acls': []}", "p:1:2", "double-quoted key"),
        ('{"acls": [1,,]}', "p:1:13", "expected a value"),
        ('{"tests": [{"src": "nobody", "accept": ["*:22"]}]}', "p:1:20: tests[0].src", "not a user, group, tag"),
        (
            '{"grants": [{"src": ["tag:a"], "dst": ["autogroup:self"], "ip": ["*"]}], "tagOwners": {"tag:a": []}}',
            "p:1:22: grants[0].src[0]",
            "cannot be a source for autogroup:self",
        ),
        ("", "p", "empty document"),
        ('{"acls": [] /* open', "p:1:13", "unterminated"),
    ],
)
def test_precise_errors(text: str, where: str, reason: str) -> None:
    with pytest.raises(PolicyError) as e:
        parse(text, "p")
    assert str(e.value).startswith(where), str(e.value)
    assert reason in str(e.value)


def test_legacy_keys_and_hujson() -> None:
    p = parse(
        '{"tagOwners": {"tag:a": []}, // c\n "acls": [{"action": "accept", "users": ["*"], "ports": ["tag:a:22,80"],},]}'
    )
    assert p.rules[0].dst[0].ports == ((22, 22), (80, 80))


def test_check_reports_failure_shape() -> None:
    text = """{"tagOwners": {"tag:web": []},
      "acls": [{"action": "accept", "src": ["alice@example.com"], "dst": ["tag:web:22"]}],
      "tests": [{"src": "alice@example.com", "accept": ["tag:web:22", "tag:web:80"], "deny": ["tag:web:443"]}]}"""
    r = check(text)
    assert r == {
        "ok": False,
        "tests": 1,
        "assertions": 3,
        "passed": 2,
        "failed": [{"test": 0, "src": "alice@example.com", "dst": "tag:web:80", "expected": "accept"}],
        "skipped": [],
        "errors": [],
        "ssh_tests": 0,
        "ssh_assertions": 0,
        "ssh_passed": 0,
        "ssh_failed": [],
        "ssh_skipped": [],
        "node_attrs": [],
    }
    bad = check('{"acls": [}')
    assert not bad["ok"] and bad["errors"] and "policy.hujson:1:11" in bad["errors"][0]


def test_check_skips_what_needs_state_and_uses_tailnet() -> None:
    text = """{"tagOwners": {"tag:web": []},
      "acls": [{"action": "accept", "src": ["autogroup:admin"], "dst": ["tag:web:22"]}],
      "tests": [{"src": "alice@example.com", "deny": ["tag:web:22"]}]}"""
    r = check(text)
    assert r["ok"] and r["skipped"][0]["reason"] == "the roles of alice@example.com (admin?) are not known"
    assert check(text, {"users": {"alice@example.com": {"roles": []}}})["passed"] == 1
    assert not check(text, {"users": {"alice@example.com": {"roles": ["admin"]}}})["ok"]


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(st.one_of(st.text(max_size=300), st.binary(max_size=300)))
def test_fuzz_random_input(data: str | bytes) -> None:
    with contextlib.suppress(PolicyError):
        parse(data)


@pytest.mark.corpus
@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(st.sampled_from(SAMPLES), st.integers(min_value=0, max_value=20000), st.integers(0, 40), st.text(max_size=8))
def test_fuzz_mutated_corpus(name: str, at: int, cut: int, insert: str) -> None:
    path = corpus.path(name)
    text = path.read_text()
    at %= max(len(text), 1)
    mutated = text[:at] + insert + text[at + cut :]
    try:
        parse(mutated, path.name)
    except PolicyError:
        return
    check(mutated)  # a mutated file that still parses must also check without crashing
