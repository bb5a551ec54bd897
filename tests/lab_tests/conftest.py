from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.lab import Lab
from tests.lab.fixtures import lab, lab_sweep
from tests.lab_tests.tailnet import Tailnet

__all__ = ["lab", "lab_sweep", "tailnet"]


@pytest.fixture
def tailnet(lab: Lab, tmp_path: Path) -> Iterator[Tailnet]:
    tn = Tailnet(lab, tmp_path)
    try:
        yield tn
    finally:
        # on failure the logs are what tells why; pytest shows this captured output
        for name in list(tn.agents):
            print(f"--- shoald {name} ---\n{tn.log(name)[-3000:]}")
        server_log = tmp_path / "server.log"
        if server_log.exists():
            print(f"--- server ---\n{server_log.read_text(errors='replace')[-4000:]}")
