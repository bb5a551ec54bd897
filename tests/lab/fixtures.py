"""pytest fixtures for the lab. In a conftest: `from tests.lab.fixtures import lab, lab_sweep`."""

from __future__ import annotations

from collections.abc import Iterator

import pytest

from tests.lab.lab import Lab, require_tools, sweep


@pytest.fixture(scope="session")
def lab_sweep() -> list[str]:
    """Once per run, before the first lab: removes leftovers of crashed runs (dead owners, our prefix)."""
    require_tools()
    return sweep()


@pytest.fixture
def lab(lab_sweep: list[str]) -> Iterator[Lab]:
    """An empty Lab; call `lab.build(topology)`. Torn down after the test, pass or fail."""
    the_lab = Lab()
    try:
        yield the_lab
    finally:
        the_lab.teardown()
