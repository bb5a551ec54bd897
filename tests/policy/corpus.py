"""Where the external corpus of real policy files is, and which files it must hold.

The corpus is data outside the repository: `$SHOAL_POLICY_CORPUS` if set, else `../shared/testdata/policies`
beside the repo root. `corpus.sha256` (sha256sum format) names the files and pins their bytes, so the corpus
tests have the same ids, and the same count, whether the corpus is present or not.

Tests that read it carry `@pytest.mark.corpus`. tests/conftest.py deselects them, with one line in the summary,
when the corpus is absent and `CI` is not `true`; under `CI=true` they run and `path()` fails them.
"""

from __future__ import annotations

import os
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
MANIFEST = Path(__file__).resolve().with_name("corpus.sha256")


def location() -> Path:
    env = os.environ.get("SHOAL_POLICY_CORPUS")
    return Path(env) if env else ROOT.parent / "shared" / "testdata" / "policies"


def present() -> bool:
    return location().is_dir()


def manifest() -> dict[str, str]:
    """File name -> sha256 hex."""
    out: dict[str, str] = {}
    for line in MANIFEST.read_text().splitlines():
        digest, name = line.split(maxsplit=1)
        out[name.lstrip("*")] = digest
    return out


NAMES = sorted(manifest())


def path(name: str) -> Path:
    """The corpus file `name`; fails the calling test if the corpus is missing (only reachable under CI=true)."""
    if not present():
        pytest.fail(f"policy corpus not found at {location()} (set SHOAL_POLICY_CORPUS; CI=true requires it)")
    return location() / name


def stem(name: str) -> str:
    return name.removesuffix(".hujson")
