from __future__ import annotations

import os
from collections.abc import Iterator

import pytest
from hypothesis import HealthCheck, settings

from tests import pgcluster
from tests.policy import corpus

settings.register_profile(
    "ci", max_examples=200, deadline=None, suppress_health_check=[HealthCheck.too_slow]
)
settings.register_profile("dev", max_examples=100, deadline=None)
settings.load_profile("ci" if os.environ.get("CI") else "dev")

_CORPUS_NOTE = pytest.StashKey[str]()


def pytest_configure(config: pytest.Config) -> None:
    config.addinivalue_line("markers", "corpus: reads the external policy corpus (tests/policy/corpus.py)")


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    # The corpus is external data: a plain clone runs everything else; CI must have it (the tests then fail).
    if corpus.present():
        return
    needs = [it for it in items if it.get_closest_marker("corpus")]
    if not needs:
        return
    where = corpus.location()
    if os.environ.get("CI") == "true":
        config.stash[_CORPUS_NOTE] = f"policy corpus not found at {where}: CI=true, so its {len(needs)} tests fail"
        return
    config.stash[_CORPUS_NOTE] = f"policy corpus not found at {where}: {len(needs)} corpus tests not run"
    config.hook.pytest_deselected(items=needs)
    items[:] = [it for it in items if not it.get_closest_marker("corpus")]


def pytest_runtest_setup(item: pytest.Item) -> None:
    # Reached for a corpus test only when the corpus is there or CI=true; fail before the test body runs.
    if item.get_closest_marker("corpus") and not corpus.present():
        pytest.fail(f"policy corpus not found at {corpus.location()} (CI=true requires it; see SHOAL_POLICY_CORPUS)")


def pytest_terminal_summary(terminalreporter: pytest.TerminalReporter, config: pytest.Config) -> None:
    note = config.stash.get(_CORPUS_NOTE, None)
    if note:
        terminalreporter.write_line(note, yellow=True, bold=True)


@pytest.fixture
def anyio_backend() -> str:
    return "asyncio"


@pytest.fixture(scope="session")
def pg_cluster() -> Iterator[pgcluster.Cluster]:
    """One throw-away PostgreSQL for the session (tests/pgcluster.py), removed even when tests fail."""
    c = pgcluster.create()
    try:
        yield c
    finally:
        c.remove()


@pytest.fixture
def pg_dsn(pg_cluster: pgcluster.Cluster) -> str:
    """A fresh, empty database on the session's cluster."""
    return pg_cluster.dsn(pg_cluster.new_database())
