"""``billcore backup`` / ``billcore restore``: one tar file per backup.

Theory of operation
-------------------
A backup is a tar file holding

* ``manifest.json`` — format, billcore version, schema version (highest
  applied migration), time, and the ``ingest_watermarks`` rows: the NetFlow
  journals' and RADIUS streams' committed offsets.  After a restore the
  workers replay their journals from exactly these offsets;
* ``database.dump`` — ``pg_dump -Fc`` (custom format) of the database;
* ``billcore.toml`` — the config file, when one is in use.

Consistency: the manifest and the dump come from the *same* snapshot.  A
REPEATABLE READ transaction exports its snapshot (``pg_export_snapshot``),
reads the watermarks and schema version, and stays open while ``pg_dump
--snapshot`` dumps the database as of that instant — so the watermarks in
the manifest are exactly those inside the dump, even while the core keeps
committing.

The secret key that encrypts RADIUS secrets at rest is deliberately *not*
in the backup (it lives outside the database and outside backups' default
path); docs/operations.md says to keep it separately.

Restore goes into an empty database.  A database with any table in the
``public`` schema is refused unless ``force``; with ``force`` the schema is
dropped and recreated first.  ``pg_restore --single-transaction
--exit-on-error`` makes a failed restore leave nothing behind; an
``ANALYZE`` after it gives the planner its statistics back.

Both take minutes on a million subscribers (docs/scaling.md); with a
``progress`` callback the tools run ``--verbose`` and each table and index
is reported as it is dumped or restored.
"""

from __future__ import annotations

import datetime as dt
import io
import json
import os
import subprocess
import tarfile
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any
from urllib.parse import unquote, urlsplit, urlunsplit

import asyncpg

from billcore.db.rows import DbConnection

__all__ = [
    "BACKUP_FORMAT",
    "BackupError",
    "Manifest",
    "backup",
    "read_manifest",
    "restore",
    "default_backup_name",
]

BACKUP_FORMAT = "billcore-backup/1"
MANIFEST = "manifest.json"
DUMP = "database.dump"
CONFIG = "billcore.toml"
MAX_MANIFEST = 16 * 1024 * 1024
_TIMEOUT = 6 * 3600  # a pg_dump/pg_restore running longer than this is stuck


class BackupError(Exception):
    """The backup or restore cannot be done; the message says why."""


@dataclass(frozen=True, slots=True)
class Manifest:
    format: str
    billcore_version: str
    schema_version: int
    created_at: str
    database: str
    watermarks: list[dict[str, Any]]
    has_config: bool

    def to_json(self) -> bytes:
        return json.dumps({
            "format": self.format, "billcore_version": self.billcore_version,
            "schema_version": self.schema_version, "created_at": self.created_at,
            "database": self.database, "watermarks": self.watermarks, "has_config": self.has_config,
        }, indent=2, sort_keys=True).encode() + b"\n"


def billcore_version() -> str:
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version("billcore")
    except PackageNotFoundError:
        return "unknown"


def default_backup_name(now: dt.datetime) -> str:
    return f"billcore-backup-{now.strftime('%Y%m%dT%H%M%SZ')}.tar"


def _tool(name: str) -> str:
    from billcore.db.embedded import pg_binaries

    directory = pg_binaries()
    if directory is None or not (directory / name).exists():
        raise BackupError(f"{name} not found (neither the embedded server's nor on PATH)")
    return str(directory / name)


def libpq_target(dsn: str) -> tuple[str, dict[str, str]]:
    """The DSN for a libpq tool without its password (which would show in
    the process list), and the environment that carries the password."""
    env = dict(os.environ)
    parts = urlsplit(dsn)
    if parts.scheme not in ("postgres", "postgresql") or parts.password is None:
        return dsn, env
    if parts.password:
        env["PGPASSWORD"] = unquote(parts.password)
    user = parts.username or ""
    host = parts.hostname or ""
    if ":" in host:
        host = f"[{host}]"
    netloc = (f"{user}@" if user else "") + host + (f":{parts.port}" if parts.port else "")
    return urlunsplit(parts._replace(netloc=netloc)), env


Progress = Callable[[str], None]
_KEPT_OUTPUT = 4000  # of a tool's stderr, for the error message


def _run(argv: list[str], env: dict[str, str], what: str, progress: Progress | None = None) -> None:
    """Run a PostgreSQL tool; with ``progress``, pass ``--verbose`` and hand it
    each line the tool prints (table by table, index by index)."""
    if progress is not None:
        argv = [argv[0], "--verbose", *argv[1:]]
    deadline = time.monotonic() + _TIMEOUT
    try:
        proc = subprocess.Popen(argv, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    except OSError as exc:
        raise BackupError(f"{what}: {exc}") from None
    tail = b""
    assert proc.stderr is not None
    with proc:
        for raw in proc.stderr:  # the tool's own lines, so the read is bounded by its output
            tail = (tail + raw)[-_KEPT_OUTPUT:]
            if progress is not None:
                progress(raw.decode(errors="replace").rstrip())
            if time.monotonic() > deadline:
                proc.kill()
                raise BackupError(f"{what}: still running after {_TIMEOUT} s, stopped")
        try:
            code = proc.wait(timeout=max(1.0, deadline - time.monotonic()))
        except subprocess.TimeoutExpired:
            proc.kill()
            raise BackupError(f"{what}: still running after {_TIMEOUT} s, stopped") from None
    if code != 0:
        detail = tail.decode(errors="replace").strip()[-2000:]
        raise BackupError(f"{what} failed (exit {code}): {detail}")


async def _schema_version(conn: DbConnection) -> int:
    exists = await conn.fetchval("SELECT to_regclass('public.schema_migrations') IS NOT NULL")
    if not exists:
        return 0
    return int(await conn.fetchval("SELECT coalesce(max(version), 0) FROM schema_migrations"))


async def _watermarks(conn: DbConnection) -> list[dict[str, Any]]:
    if not await conn.fetchval("SELECT to_regclass('public.ingest_watermarks') IS NOT NULL"):
        return []
    rows = await conn.fetch("SELECT source, watermark, updated_at FROM ingest_watermarks ORDER BY source")
    return [{"source": row["source"], "watermark": row["watermark"], "updated_at": row["updated_at"].isoformat()}
            for row in rows]


async def backup(dsn: str, out: Path, *, config_file: Path | None = None,
                 now: dt.datetime | None = None, progress: Progress | None = None) -> Manifest:
    """Write a backup of the database at ``dsn`` (and the config file) to ``out``;
    ``progress`` gets pg_dump's lines as it goes."""
    now = now or dt.datetime.now(dt.timezone.utc)
    pg_dump = _tool("pg_dump")
    target, env = libpq_target(dsn)
    out = out.absolute()
    out.parent.mkdir(parents=True, exist_ok=True)
    conn = await asyncpg.connect(dsn)
    try:
        async with conn.transaction(isolation="repeatable_read", readonly=True):
            snapshot = await conn.fetchval("SELECT pg_export_snapshot()")
            version = await _schema_version(conn)
            watermarks = await _watermarks(conn)
            database = await conn.fetchval("SELECT current_database()")
            with tempfile.TemporaryDirectory(prefix="billcore-backup-", dir=out.parent) as tmp:
                dump = Path(tmp) / DUMP
                # the snapshot lives as long as this transaction: pg_dump sees
                # exactly what the manifest was read from
                await _to_thread(_run, [pg_dump, "-Fc", "--no-owner", "--no-privileges",
                                        f"--snapshot={snapshot}", "-f", str(dump), "-d", target],
                                 env, "pg_dump", progress)
                manifest = Manifest(BACKUP_FORMAT, billcore_version(), version, now.isoformat(),
                                    database, watermarks, config_file is not None)
                partial = Path(tmp) / "partial.tar"
                with tarfile.open(partial, "w") as tar:
                    _add_bytes(tar, MANIFEST, manifest.to_json(), now)
                    tar.add(dump, arcname=DUMP)
                    if config_file is not None:
                        tar.add(config_file, arcname=CONFIG)
                os.chmod(partial, 0o600)  # the dump holds verifiers and encrypted secrets
                os.replace(partial, out)
    finally:
        await conn.close()
    return manifest


async def _to_thread(fn: Any, *args: Any) -> Any:
    import asyncio

    return await asyncio.to_thread(fn, *args)


def _add_bytes(tar: tarfile.TarFile, name: str, data: bytes, now: dt.datetime) -> None:
    info = tarfile.TarInfo(name)
    info.size = len(data)
    info.mtime = int(now.timestamp())
    info.mode = 0o600
    tar.addfile(info, io.BytesIO(data))


def read_manifest(path: Path) -> Manifest:
    try:
        with tarfile.open(path, "r") as tar:
            member = tar.getmember(MANIFEST)
            if member.size > MAX_MANIFEST:
                raise BackupError(f"{path}: manifest too large")
            handle = tar.extractfile(member)
            if handle is None:
                raise BackupError(f"{path}: manifest is not a file")
            data = json.loads(handle.read())
            names = set(tar.getnames())
    except (OSError, tarfile.TarError, KeyError, json.JSONDecodeError) as exc:
        raise BackupError(f"{path}: not a billcore backup ({exc})") from None
    if not isinstance(data, dict) or data.get("format") != BACKUP_FORMAT:
        raise BackupError(f"{path}: unknown backup format {data.get('format') if isinstance(data, dict) else data!r}")
    if DUMP not in names:
        raise BackupError(f"{path}: no {DUMP} inside")
    try:
        return Manifest(data["format"], str(data["billcore_version"]), int(data["schema_version"]),
                        str(data["created_at"]), str(data["database"]), list(data["watermarks"]),
                        bool(data["has_config"]))
    except (KeyError, TypeError, ValueError) as exc:
        raise BackupError(f"{path}: manifest field missing or wrong: {exc}") from None


async def user_tables(conn: DbConnection) -> list[str]:
    rows = await conn.fetch(
        "SELECT c.relname FROM pg_class c JOIN pg_namespace n ON n.oid = c.relnamespace"
        " WHERE n.nspname = 'public' AND c.relkind IN ('r', 'p', 'v', 'm', 'S', 'f')"
        " ORDER BY c.relname")
    return [row["relname"] for row in rows]


async def restore(dsn: str, path: Path, *, force: bool = False, progress: Progress | None = None) -> Manifest:
    """Restore the backup at ``path`` into the database at ``dsn``, then
    gather planner statistics; ``progress`` gets pg_restore's lines."""
    from billcore.db.migrate import discover

    manifest = read_manifest(path)
    known = max((migration.version for migration in discover()), default=0)
    if manifest.schema_version > known:
        raise BackupError(f"the backup has schema version {manifest.schema_version}; this billcore"
                          f" knows up to {known}: restore with the billcore version that made it"
                          f" ({manifest.billcore_version}) or newer")
    pg_restore = _tool("pg_restore")
    target, env = libpq_target(dsn)
    conn = await asyncpg.connect(dsn)
    try:
        present = await user_tables(conn)
        if present and not force:
            raise BackupError(
                f"the database is not empty ({len(present)} objects, e.g. {', '.join(present[:3])});"
                " restore into an empty database, or pass --force to drop its schema first")
        if present:
            async with conn.transaction():
                await conn.execute("DROP SCHEMA public CASCADE")
                await conn.execute("CREATE SCHEMA public")
    finally:
        await conn.close()
    with tempfile.TemporaryDirectory(prefix="billcore-restore-") as tmp:
        try:
            with tarfile.open(path, "r") as tar:
                tar.extract(DUMP, tmp, filter="data")
        except (OSError, tarfile.TarError, KeyError) as exc:
            raise BackupError(f"{path}: cannot read the dump: {exc}") from None
        await _to_thread(_run, [pg_restore, "--no-owner", "--no-privileges", "--single-transaction",
                                "--exit-on-error", "-d", target, str(Path(tmp) / DUMP)],
                         env, "pg_restore", progress)
    # a restored database has no planner statistics: until autovacuum gets
    # to a million-row table, its look-ups may scan it whole
    if progress is not None:
        progress("analyzing the restored tables (planner statistics)")
    conn = await asyncpg.connect(dsn)
    try:
        await conn.execute("ANALYZE")
    finally:
        await conn.close()
    return manifest


def extract_config(path: Path, dest: Path) -> bool:
    """Write the backed-up config file to ``dest``; False if the backup has none."""
    with tarfile.open(path, "r") as tar:
        try:
            member = tar.getmember(CONFIG)
        except KeyError:
            return False
        handle = tar.extractfile(member)
        if handle is None:
            return False
        dest.write_bytes(handle.read())
    return True
