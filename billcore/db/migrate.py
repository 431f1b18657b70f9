"""Numbered SQL migrations from ``schema/``.

Files are named ``NNNN_what.sql``.  ``migrate`` takes a transaction-scoped
advisory lock (two processes starting at once apply each migration once),
applies every pending file in its own transaction in number order, and
records (version, name, sha256) in ``schema_migrations``.  A recorded
migration whose file changed afterwards is refused: the schema on disk and
the schema in the database would no longer agree.
"""

from __future__ import annotations

import hashlib
import importlib.resources
import logging
import re
from dataclasses import dataclass
from pathlib import Path

from billcore.db.rows import DbConnection

__all__ = ["Migration", "MigrationError", "discover", "migrate", "applied_versions"]

log = logging.getLogger(__name__)

_NAME = re.compile(r"^(\d{4})_([a-z0-9_]+)\.sql$")
_LOCK_KEY = 0x62696C6C  # "bill"


class MigrationError(Exception):
    """The migrations on disk and in the database do not agree."""


@dataclass(frozen=True, slots=True)
class Migration:
    version: int
    name: str
    sql: str

    @property
    def checksum(self) -> str:
        return hashlib.sha256(self.sql.encode()).hexdigest()


def schema_dir() -> Path:
    return Path(str(importlib.resources.files("schema")))


def discover(directory: Path | None = None) -> list[Migration]:
    directory = directory or schema_dir()
    found: dict[int, Migration] = {}
    for path in sorted(directory.glob("*.sql")):
        migration = _NAME.match(path.name)
        if not migration:
            raise MigrationError(f"{path.name}: migration files are named NNNN_name.sql")
        version = int(migration.group(1))
        if version in found:
            raise MigrationError(f"{path.name}: version {version} is used twice")
        found[version] = Migration(version, migration.group(2), path.read_text())
    return [found[v] for v in sorted(found)]


_BOOKKEEPING = """
CREATE TABLE IF NOT EXISTS schema_migrations (
    version    integer PRIMARY KEY,
    name       text NOT NULL,
    checksum   text NOT NULL,
    applied_at timestamptz NOT NULL DEFAULT now()
)
"""


async def applied_versions(conn: DbConnection) -> dict[int, str]:
    await conn.execute(_BOOKKEEPING)
    rows = await conn.fetch("SELECT version, checksum FROM schema_migrations")
    return {row["version"]: row["checksum"] for row in rows}


async def migrate(conn: DbConnection, migrations: list[Migration] | None = None) -> list[Migration]:
    """Apply the pending migrations; return those applied (empty: no-op)."""
    migrations = discover() if migrations is None else migrations
    applied: list[Migration] = []
    async with conn.transaction():
        await conn.execute("SELECT pg_advisory_xact_lock($1)", _LOCK_KEY)
        done = await applied_versions(conn)
    for migration in migrations:
        if migration.version in done:
            if done[migration.version] != migration.checksum:
                raise MigrationError(
                    f"migration {migration.version:04d}_{migration.name} was changed after it was applied"
                )
            continue
        async with conn.transaction():
            await conn.execute("SELECT pg_advisory_xact_lock($1)", _LOCK_KEY)
            if await conn.fetchval("SELECT 1 FROM schema_migrations WHERE version=$1", migration.version):
                continue  # another process applied it meanwhile
            await conn.execute(migration.sql)
            await conn.execute(
                "INSERT INTO schema_migrations(version, name, checksum) VALUES ($1, $2, $3)",
                migration.version, migration.name, migration.checksum,
            )
        log.info("migration applied", extra={"version": migration.version, "migration": migration.name})
        applied.append(migration)
    unknown = set(done) - {migration.version for migration in migrations}
    if unknown:
        log.warning("database has migrations this code does not know", extra={"versions": sorted(unknown)})
    return applied
