"""Import fences between the three programs, and the sans-IO rule.

- derp/ imports nothing of ours: it ships as a standalone relay.
- node/ may import coord.wire (the control protocol schema) and derp, nothing else of coord.
- coord/ may import derp (the embedded relay), never node.
- Sans-IO modules import no socket, asyncio, sqlite, subprocess or clock, so they can be tested by feeding
  bytes and events with time passed in.
"""

from __future__ import annotations

import ast
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
    "coord/seal.py",
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


def sans_io_files() -> list[Path]:
    out: list[Path] = []
    for pattern in SANS_IO:
        out.extend(sorted(ROOT.glob(pattern)))
    return out


def test_sans_io_list_matches_files() -> None:
    assert sans_io_files(), "no sans-IO modules found"


@pytest.mark.parametrize("path", sans_io_files(), ids=lambda p: str(p.relative_to(ROOT)))
def test_sans_io(path: Path) -> None:
    bad = sorted(n for n in imports_of(path) if n.split(".")[0] in IO_MODULES)
    assert not bad, f"{path.relative_to(ROOT)} is sans-IO but imports {bad}"
