from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.oidc.idp import Idp, free_port


@pytest.fixture
def server_port() -> int:
    return free_port()


@pytest.fixture
def idp(tmp_path: Path, server_port: int) -> Iterator[Idp]:
    """oidc-provider on loopback, its client redirecting to the Shoal server on ``server_port``."""
    p = Idp(tmp_path / "idp", "127.0.0.1", free_port(), [f"http://127.0.0.1:{server_port}/oidc/callback"])
    p.start()
    try:
        yield p
    finally:
        p.stop()
