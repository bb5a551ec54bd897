"""Migrations: an empty database migrated in order ends up with exactly migrations/schema.sql."""

from __future__ import annotations

import sqlite3
from importlib import resources
from pathlib import Path

import pytest

from coord.store import sqlite as db

pytestmark = pytest.mark.anyio


def schema_of(conn: sqlite3.Connection) -> list[tuple[str, str, str, str]]:
    rows = conn.execute(
        "SELECT type, name, tbl_name, sql FROM sqlite_master "
        "WHERE name NOT LIKE 'sqlite_%' AND tbl_name != 'schema_migrations' ORDER BY type, name"
    ).fetchall()
    # SQLite keeps the CREATE text as written; compare it with whitespace normalised.
    return [(t, n, tbl, " ".join((sql or "").split())) for t, n, tbl, sql in rows]


async def test_migrated_schema_equals_schema_sql(tmp_path: Path) -> None:
    conn = await db.connect(tmp_path / "m.db")
    applied = [v for v, _, _ in db.migration_files()]
    async with conn.execute("SELECT version FROM schema_migrations ORDER BY version") as cur:
        assert [r[0] for r in await cur.fetchall()] == applied
    await conn.close()
    migrated = sqlite3.connect(tmp_path / "m.db")
    fresh = sqlite3.connect(":memory:")
    fresh.executescript(resources.files("migrations").joinpath("schema.sql").read_text())
    got, want = schema_of(migrated), schema_of(fresh)
    assert [r[:3] for r in got] == [r[:3] for r in want]
    assert got == want
    # sqlite_autoindex_* entries (UNIQUE constraints) must match too.
    auto = "SELECT name FROM sqlite_master WHERE name LIKE 'sqlite_autoindex%' ORDER BY name"
    assert migrated.execute(auto).fetchall() == fresh.execute(auto).fetchall()
    migrated.close()
    fresh.close()


async def test_migrating_twice_is_a_no_op(tmp_path: Path) -> None:
    conn = await db.connect(tmp_path / "m.db")
    assert await db.migrate(conn) == []
    await conn.execute("INSERT INTO users (id, name, created) VALUES (1, 'kept', 0)")
    await conn.close()
    conn = await db.connect(tmp_path / "m.db")
    assert await db.migrate(conn) == []
    async with conn.execute("SELECT name FROM users") as cur:
        assert [r[0] for r in await cur.fetchall()] == ["kept"]
    async with conn.execute("SELECT count(*) FROM schema_migrations") as cur:
        row = await cur.fetchone()
    assert row is not None and row[0] == len(db.migration_files())
    async with conn.execute("PRAGMA journal_mode") as cur:
        row = await cur.fetchone()
    assert row is not None and row[0] == "wal"
    await conn.close()


def test_migration_files_are_numbered_without_gaps() -> None:
    versions = [v for v, _, _ in db.migration_files()]
    assert versions == list(range(1, len(versions) + 1))
    names = [e.name for e in resources.files("migrations").iterdir() if e.name.endswith(".sql")]
    stray = [n for n in names if n != "schema.sql" and not db.MIGRATION_NAME.match(n)]
    assert stray == [], f"migration files not named NNNN_name.sql: {stray}"
