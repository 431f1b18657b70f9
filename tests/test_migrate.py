from pathlib import Path

import asyncpg
import pytest

from billcore.db.migrate import Migration, MigrationError, discover, migrate


async def test_migrate_applies_all_then_is_a_noop(empty_db_dsn: str) -> None:
    conn = await asyncpg.connect(empty_db_dsn)
    try:
        first = await migrate(conn)
        assert [m.version for m in first] == [m.version for m in discover()]
        assert await conn.fetchval("SELECT count(*) FROM admin_groups") >= 1
        assert await migrate(conn) == []
        rows = await conn.fetch("SELECT version FROM schema_migrations ORDER BY version")
        assert [r["version"] for r in rows] == [m.version for m in discover()]
    finally:
        await conn.close()


async def test_failed_migration_leaves_nothing_behind(empty_db_dsn: str) -> None:
    conn = await asyncpg.connect(empty_db_dsn)
    try:
        good = Migration(1, "good", "CREATE TABLE a (x int)")
        bad = Migration(2, "bad", "CREATE TABLE b (x int); SELECT no_such_function()")
        with pytest.raises(asyncpg.PostgresError):
            await migrate(conn, [good, bad])
        assert await conn.fetchval("SELECT to_regclass('a') IS NOT NULL")
        assert await conn.fetchval("SELECT to_regclass('b') IS NULL")
        assert await conn.fetchval("SELECT max(version) FROM schema_migrations") == 1
    finally:
        await conn.close()


async def test_changed_migration_is_refused(empty_db_dsn: str) -> None:
    conn = await asyncpg.connect(empty_db_dsn)
    try:
        await migrate(conn, [Migration(1, "a", "CREATE TABLE a (x int)")])
        with pytest.raises(MigrationError, match="changed after it was applied"):
            await migrate(conn, [Migration(1, "a", "CREATE TABLE a (x bigint)")])
    finally:
        await conn.close()


def test_misnamed_file_is_refused(tmp_path: Path) -> None:
    (tmp_path / "1_x.sql").write_text("select 1")
    with pytest.raises(MigrationError, match="NNNN_name.sql"):
        discover(tmp_path)


def test_cli_migrate_twice(tmp_path: Path, pg_server_dsn: str, empty_db_dsn: str, capsys: pytest.CaptureFixture[str]) -> None:
    from billcore.cli import main

    cfg = tmp_path / "c.toml"
    cfg.write_text(f'[database]\ndsn = "{empty_db_dsn}"\n')
    assert main(["-c", str(cfg), "migrate"]) == 0
    assert "applied 0001_principals" in capsys.readouterr().out
    assert main(["-c", str(cfg), "migrate"]) == 0
    assert "up to date" in capsys.readouterr().out
