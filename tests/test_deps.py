"""Import fences between the three programs, and the sans-IO rule.

- derp/ imports nothing of ours: it ships as a standalone relay.
- node/ may import coord.wire (the control protocol schema) and derp, nothing else of coord.
- coord/ may import derp (the embedded relay), never node.
- Sans-IO modules import no socket, asyncio, sqlite, subprocess or clock, and call no clock or randomness
  (``datetime.now``, ``time.time``, ``os.urandom``, ``random``, ``secrets``): time and randomness are passed in,
  so they can be tested by feeding bytes and events.
- Every entry of the sans-IO list names files that exist: a stale entry would check nothing.
"""

from __future__ import annotations

import ast
import itertools
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
OURS = {"coord", "derp", "node"}

ALLOWED = {
    "derp": set[str](),
    "node": {"coord.wire", "derp"},
    "coord": {"derp"},
}

# Modules that must stay free of I/O. Add each new sans-IO module here.
SANS_IO = [
    "coord/wire/*.py",
    "coord/events.py",
    "coord/state.py",
    "coord/decide.py",
    "coord/change.py",
    "coord/netmap.py",
    "coord/ipam.py",
    "coord/names.py",
    "coord/limits.py",
    "coord/fanout.py",
    "coord/views.py",
    "coord/authkey.py",
    "coord/store/__init__.py",
    "coord/policy/*.py",
    "derp/frames.py",
    "derp/protocol.py",
    "derp/registry.py",
    "derp/stun.py",
    "derp/errors.py",
    "derp/metrics.py",
    "node/mapsession.py",
    "node/compile.py",
    "node/login.py",
    "node/handshake.py",
    "node/status.py",
    "node/endpoints.py",
    "node/disco.py",
    "node/paths.py",
    "node/render/*.py",
    "node/wg/config.py",
    "node/wg/uapi.py",
    "node/bpf.py",
    "node/metrics.py",
    "coord/nodehistory.py",
    "derp/http.py",
    "derp/scan.py",
]
IO_MODULES = {"socket", "asyncio", "sqlite3", "aiosqlite", "subprocess", "time", "selectors", "threading"}


def imports_of(path: Path) -> set[str]:
    tree = ast.parse(path.read_text(), filename=str(path))
    names: set[str] = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            names.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            names.add(node.module)
            names.update(f"{node.module}.{alias.name}" for alias in node.names)
    return names


def allowed(pkg: str, name: str) -> bool:
    return any(name == a or name.startswith(a + ".") for a in ALLOWED[pkg])


@pytest.mark.parametrize("pkg", sorted(OURS))
def test_fences(pkg: str) -> None:
    bad = []
    for path in sorted((ROOT / pkg).rglob("*.py")):
        for name in imports_of(path):
            top = name.split(".")[0]
            if top in OURS and top != pkg and not allowed(pkg, name):
                # `from coord import wire` shows up as both "coord" and "coord.wire"
                if name == top and any(n.startswith(top + ".") and allowed(pkg, n) for n in imports_of(path)):
                    continue
                bad.append(f"{path.relative_to(ROOT)} imports {name}")
    assert not bad, "\n".join(bad)


# Clocks and randomness a sans-IO module may not reach for: (module, attribute); attribute None = anything of it.
IMPURE = {
    ("datetime", "now"), ("datetime", "utcnow"), ("datetime", "today"), ("date", "today"),
    ("time", None), ("os", "urandom"), ("os", "getrandom"), ("random", None), ("secrets", None), ("uuid", "uuid1"),
    ("uuid", "uuid4"),
}
IMPURE_MODULES = {"random", "secrets"}


def sans_io_files() -> list[Path]:
    out: list[Path] = []
    for pattern in SANS_IO:
        out.extend(sorted(ROOT.glob(pattern)))
    return out


def _dotted(node: ast.expr) -> list[str] | None:
    parts: list[str] = []
    while isinstance(node, ast.Attribute):
        parts.append(node.attr)
        node = node.value
    if not isinstance(node, ast.Name):
        return None
    return [node.id, *reversed(parts)]


def _impure(qualified: list[str]) -> bool:
    """``["datetime", "datetime", "now"]``, ``["time", "time"]``, ``["os", "urandom"]``: a clock or randomness?"""
    if qualified[0] in IMPURE_MODULES or (qualified[0], None) in IMPURE:
        return True
    return any((a, b) in IMPURE for a, b in itertools.pairwise(qualified))


def impure_calls(path: Path) -> list[str]:
    """References to a clock or randomness, found in the AST: ``time.time()``, ``datetime.now()``,
    ``os.urandom(n)``, anything of ``random`` or ``secrets``, also through ``from m import name [as alias]``."""
    tree = ast.parse(path.read_text(), filename=str(path))
    bound: dict[str, list[str]] = {}  # local name -> the qualified name it stands for
    out: list[str] = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            for alias in node.names:
                if alias.asname:
                    bound[alias.asname] = alias.name.split(".")
                else:
                    bound[alias.name.split(".")[0]] = [alias.name.split(".")[0]]
                if _impure(alias.name.split(".")):
                    out.append(f"line {node.lineno}: import {alias.name}")
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            for alias in node.names:
                qualified = [*node.module.split("."), alias.name]
                bound[alias.asname or alias.name] = qualified
                if _impure(qualified):
                    out.append(f"line {node.lineno}: from {node.module} import {alias.name}")
    for node in ast.walk(tree):
        if isinstance(node, ast.Attribute):
            chain = _dotted(node)
            if chain is None or chain[0] not in bound:
                continue
            qualified = [*bound[chain[0]], *chain[1:]]
            if _impure(qualified) and not _impure(bound[chain[0]]):
                out.append(f"line {node.lineno}: {'.'.join(chain)}")
    return sorted(set(out))


def test_sans_io_list_matches_files() -> None:
    assert sans_io_files(), "no sans-IO modules found"


def test_sec_sans_io_list_names_existing_files() -> None:
    missing = [pattern for pattern in SANS_IO if not list(ROOT.glob(pattern))]
    assert not missing, f"the sans-IO list names files that do not exist: {missing}"


@pytest.mark.parametrize("path", sans_io_files(), ids=lambda p: str(p.relative_to(ROOT)))
def test_sans_io(path: Path) -> None:
    bad = sorted(n for n in imports_of(path) if n.split(".")[0] in IO_MODULES)
    assert not bad, f"{path.relative_to(ROOT)} is sans-IO but imports {bad}"


@pytest.mark.parametrize("path", sans_io_files(), ids=lambda p: str(p.relative_to(ROOT)))
def test_sec_sans_io_takes_time_and_randomness(path: Path) -> None:
    bad = impure_calls(path)
    assert not bad, f"{path.relative_to(ROOT)} is sans-IO but reads a clock or randomness: {bad}"


@pytest.mark.parametrize("source, found", [
    ("import time\nx = time.time()", ["line 1: import time"]),
    ("import time as t\nx = t.monotonic()", ["line 1: import time"]),
    ("from time import time\n", ["line 1: from time import time"]),
    ("from datetime import datetime\nx = datetime.now()", ["line 2: datetime.now"]),
    ("import datetime\nx = datetime.datetime.now()", ["line 2: datetime.datetime.now"]),
    ("import datetime as dt\nx = dt.date.today()", ["line 2: dt.date.today"]),
    ("from datetime import UTC, datetime\nx = datetime.fromtimestamp(0, UTC)", []),
    ("import os\nx = os.urandom(8)", ["line 2: os.urandom"]),
    ("from os import urandom\n", ["line 1: from os import urandom"]),
    ("import os\nx = os.path.join('a')", []),
    ("import random\n", ["line 1: import random"]),
    ("from random import choice\n", ["line 1: from random import choice"]),
    ("import secrets\n", ["line 1: import secrets"]),
])
def test_sec_impure_calls_detector(tmp_path: Path, source: str, found: list[str]) -> None:
    f = tmp_path / "m.py"
    f.write_text(source)
    assert impure_calls(f) == found

