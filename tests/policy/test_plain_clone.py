"""A plain `git clone`, with no `shared/` beside it, collects and passes its tests; under CI=true the missing
corpus is a failure. The clone is of the committed tree (HEAD), as a new user or CI gets it."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

from . import corpus

CORPUS_TESTS = ["tests/policy/test_corpus.py", "tests/policy/test_parse.py"]


def run(repo: Path, *args: str, ci: bool = False, corpus_at: Path | None = None) -> subprocess.CompletedProcess[str]:
    env = {k: v for k, v in os.environ.items() if k not in ("CI", "SHOAL_POLICY_CORPUS", "PYTEST_ADDOPTS")}
    if ci:
        env["CI"] = "true"
    if corpus_at is not None:
        env["SHOAL_POLICY_CORPUS"] = str(corpus_at)
    cmd = [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", *args]
    return subprocess.run(cmd, cwd=repo, env=env, capture_output=True, text=True, timeout=240, check=False)


def test_sec_plain_clone_runs_without_corpus(tmp_path: Path) -> None:
    assert shutil.which("git"), "git is needed to clone the repository"
    top = subprocess.run(
        ["git", "-C", str(corpus.ROOT), "rev-parse", "--show-toplevel"], capture_output=True, text=True, check=True
    ).stdout.strip()
    repo = tmp_path / "newuser" / "shoal"
    subprocess.run(["git", "clone", "-q", top, str(repo)], check=True, capture_output=True)
    missing = repo.parent / "shared" / "testdata" / "policies"
    assert not missing.exists()
    line = f"policy corpus not found at {missing}: "

    # The whole suite collects.
    r = run(repo, "--collect-only", "tests")
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    assert "error" not in r.stdout.splitlines()[-1], r.stdout[-3000:]

    # The corpus tests are left out with one line; the rest of the same files run and pass.
    r = run(repo, *CORPUS_TESTS)
    out = r.stdout
    assert r.returncode == 0, out[-3000:] + r.stderr[-3000:]
    n = len(corpus.NAMES) + 5  # per file, plus completeness, tests, sshTests, nodeAttrs and test_parse.py's
    assert f"{line}{n} corpus tests not run" in out, out[-3000:]
    last = out.splitlines()[-1]
    assert f"{n} deselected" in last and " passed" in last and "failed" not in last and "error" not in last, last

    # CI must have the corpus: the same run fails, saying why.
    r = run(repo, *CORPUS_TESTS, ci=True)
    assert r.returncode == 1, r.stdout[-3000:] + r.stderr[-3000:]
    assert f"{line}CI=true, so its {n} tests fail" in r.stdout, r.stdout[-3000:]
    assert f"{n} errors" in r.stdout.splitlines()[-1], r.stdout[-2000:]

    # $SHOAL_POLICY_CORPUS is honoured (where this machine has the corpus).
    if corpus.present():
        r = run(repo, "tests/policy/test_corpus.py::test_corpus_is_complete", ci=True, corpus_at=corpus.location())
        assert r.returncode == 0, r.stdout[-3000:]
        assert "1 passed" in r.stdout and "not found" not in r.stdout, r.stdout[-2000:]
