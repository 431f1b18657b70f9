"""Operator commands: ``billcore backup``, ``billcore restore``, ``billcore import``.

Registered by appending ``add_commands`` to ``billcore.cli._EXTENSIONS``.
Each command works on the configured database: the ``[database] dsn``, or
the embedded server in ``<data_dir>/pg`` (started, or attached to while
``billcore serve`` runs, and reached through its Unix socket).
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import datetime as dt
import sys
from collections.abc import AsyncIterator, Callable
from pathlib import Path
from typing import Any

from billcore.common.config import Config

__all__ = ["add_commands", "cmd_backup", "cmd_restore", "cmd_import", "database_dsn"]


@contextlib.asynccontextmanager
async def database_dsn(config: Config) -> AsyncIterator[str]:
    """The DSN of the configured database, starting the embedded one if needed."""
    if config.database.dsn:
        yield config.database.dsn
        return
    from billcore.db.embedded import EmbeddedPostgres

    embedded = EmbeddedPostgres(config.data_dir)
    dsn = await asyncio.to_thread(embedded.start)
    try:
        yield dsn
    finally:
        await asyncio.to_thread(embedded.stop)


def _progress(line: str) -> None:
    """pg_dump's and pg_restore's table-by-table lines, on stderr."""
    print(line, file=sys.stderr, flush=True)


def _fail(message: str) -> int:
    print(f"billcore: {message}", file=sys.stderr)
    return 1


def cmd_backup(args: argparse.Namespace, config: Config) -> int:
    from billcore.ops.backup import BackupError, backup, default_backup_name

    now = dt.datetime.now(dt.timezone.utc)
    out = Path(args.out) if args.out else Path.cwd() / default_backup_name(now)
    config_file = Path(config.source) if config.source else None

    async def work() -> int:
        import asyncpg

        async with database_dsn(config) as dsn:
            try:
                manifest = await backup(dsn, out, config_file=config_file, now=now, progress=_progress)
            except (BackupError, OSError, asyncpg.PostgresError) as exc:
                return _fail(f"backup failed: {exc}")
        print(f"backup written to {out} (schema {manifest.schema_version},"
              f" {len(manifest.watermarks)} watermark(s), config {'included' if manifest.has_config else 'none'})")
        return 0

    return asyncio.run(work())


def cmd_restore(args: argparse.Namespace, config: Config) -> int:
    from billcore.ops.backup import BackupError, restore

    async def work() -> int:
        import asyncpg

        async with database_dsn(config) as dsn:
            try:
                manifest = await restore(dsn, Path(args.file), force=args.force, progress=_progress)
            except (BackupError, OSError, asyncpg.PostgresError) as exc:
                return _fail(f"restore refused: {exc}" if isinstance(exc, BackupError) else f"restore failed: {exc}")
        print(f"restored {args.file}: schema {manifest.schema_version}, made {manifest.created_at}"
              f" by billcore {manifest.billcore_version}; {len(manifest.watermarks)} watermark(s)")
        for mark in manifest.watermarks:
            print(f"  watermark {mark['source']} = {mark['watermark']}")
        print("next: `billcore migrate` (if this billcore is newer), then `billcore verify`")
        return 0

    return asyncio.run(work())


def cmd_import(args: argparse.Namespace, config: Config) -> int:
    from billcore.ops.import_parse import ImportFailed
    from billcore.ops.importer import import_file

    async def work() -> int:
        import asyncpg

        from billcore.db.migrate import migrate

        async with database_dsn(config) as dsn:
            conn = await asyncpg.connect(dsn)
            try:
                await migrate(conn)
                report = await import_file(conn, Path(args.file), fmt=args.format, dry_run=args.dry_run,
                                           workers=args.workers, progress_stream=sys.stderr)
            except ImportFailed as exc:
                for error in exc.errors:
                    print(error, file=sys.stderr)
                return _fail(f"import refused: {len(exc.errors)} error(s), nothing was imported")
            except (OSError, asyncpg.PostgresError) as exc:
                return _fail(f"import failed, nothing was imported: {exc}")
            finally:
                await conn.close()
        print(report.summary())
        return 0

    return asyncio.run(work())


def add_commands(subparsers: Any, commands: dict[str, Callable[[argparse.Namespace, Config], int]]) -> None:
    p = subparsers.add_parser("backup", help="back up the database, ingest watermarks and config into one tar file")
    p.add_argument("--out", metavar="FILE", help="the tar file to write (default: ./billcore-backup-<time>.tar)")
    p = subparsers.add_parser("restore", help="restore a backup into an empty database")
    p.add_argument("file", help="a tar file made by `billcore backup`")
    p.add_argument("--force", action="store_true", help="drop the database's schema first if it is not empty")
    p = subparsers.add_parser("import", help="import subscribers, balances, tariffs and IPs from another billing system")
    p.add_argument("file", help="CSV or JSON file (docs/import.md)")
    p.add_argument("--format", choices=["csv", "json"], help="default: from the file name's extension")
    p.add_argument("--dry-run", action="store_true", help="validate everything, report errors by line, change nothing")
    p.add_argument("--workers", type=int, default=0, help="processes computing password verifiers (0: one per core)")
    commands.update(backup=cmd_backup, restore=cmd_restore)
    commands["import"] = cmd_import
