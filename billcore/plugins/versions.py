"""The no-rollback record: the highest version of each plugin ever loaded here.

Theory of operation
-------------------
A core refuses to load a plugin version older than one it has loaded
before (an old version may have a hole the new one closed).  The record
must outlive restarts and, with a database, travel with the data: a backup
restored onto a fresh machine still refuses the old version.  So:

* ``DatabaseVersions`` keeps it in the core table ``plugin_versions``
  (schema/0006_plugins.sql).  ``record`` re-checks under a row lock, so two
  loads racing cannot lower it.  A ``plugin-versions.json`` left in the
  state directory by a core without a database is imported once (highest
  version wins) and renamed ``plugin-versions.json.imported``.
* ``FileVersions`` keeps it in ``<statedir>/plugin-versions.json`` (written
  atomically, fsynced) for a manager without a database, as in unit tests.

Both fail closed: a record that cannot be read refuses the load.
"""

from __future__ import annotations

import json
import os
import tempfile
from pathlib import Path
from typing import Protocol

import asyncpg

from billcore.db.rows import DbConnection
from billcore.plugins.errors import PluginError, RollbackRefused
from billcore.plugins.manifest import parse_version

__all__ = ["VersionRecord", "FileVersions", "DatabaseVersions", "STATE_FILE", "refuse_rollback"]

STATE_FILE = "plugin-versions.json"


class VersionRecord(Protocol):
    async def get(self, name: str) -> str | None: ...

    async def record(self, name: str, version: str, signer: str) -> None: ...


def refuse_rollback(name: str, version: str, recorded: str | None) -> None:
    if recorded is not None and parse_version(version) < parse_version(recorded):
        raise RollbackRefused(f"{name} {version} is older than {recorded}, "
                              "already loaded here; rollback is refused")


def _read_file(path: Path) -> dict[str, str]:
    try:
        data = json.loads(path.read_text("utf-8"))
    except FileNotFoundError:
        return {}
    except (OSError, ValueError) as e:
        # Failing closed: without the record, rollback protection is gone.
        raise PluginError(f"{path}: cannot read the plugin version record: {e}") from e
    if not isinstance(data, dict) or not all(isinstance(v, str) for v in data.values()):
        raise PluginError(f"{path}: malformed plugin version record")
    return data


class FileVersions:
    """``<statedir>/plugin-versions.json``: name → version."""

    def __init__(self, statedir: Path) -> None:
        self.statedir = statedir
        self.path = statedir / STATE_FILE

    async def get(self, name: str) -> str | None:
        return _read_file(self.path).get(name)

    async def record(self, name: str, version: str, signer: str) -> None:
        versions = _read_file(self.path)
        old = versions.get(name)
        refuse_rollback(name, version, old)
        if old is not None and parse_version(old) >= parse_version(version):
            return
        versions[name] = version
        self.statedir.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(dir=self.statedir, prefix=".plugin-versions.")
        try:
            with os.fdopen(fd, "w") as f:
                json.dump(versions, f, indent=1, sort_keys=True)
                f.flush()
                os.fsync(f.fileno())
            os.replace(tmp, self.path)
        except BaseException:
            os.unlink(tmp)
            raise
        dirfd = os.open(self.statedir, os.O_RDONLY)
        try:
            os.fsync(dirfd)
        finally:
            os.close(dirfd)


class DatabaseVersions:
    """The ``plugin_versions`` table; imports a legacy state file once."""

    def __init__(self, pool: asyncpg.Pool, statedir: Path) -> None:
        self.pool = pool
        self.legacy = statedir / STATE_FILE
        self._imported = False

    async def _import_legacy(self) -> None:
        if self._imported:
            return
        legacy = _read_file(self.legacy)
        for name, version in sorted(legacy.items()):
            recorded = await self._get(name)
            if recorded is None or parse_version(version) > parse_version(recorded):
                await self._upsert(name, version, "", None)
        if legacy:
            os.replace(self.legacy, self.legacy.with_name(STATE_FILE + ".imported"))
        self._imported = True

    async def _get(self, name: str) -> str | None:
        try:
            value = await self.pool.fetchval("SELECT version FROM plugin_versions WHERE name = $1", name)
        except asyncpg.PostgresError as e:
            raise PluginError(f"cannot read the plugin version record (plugin_versions): {e}") from e
        return None if value is None else str(value)

    async def _upsert(self, name: str, version: str, signer: str, conn: DbConnection | None) -> None:
        await (conn or self.pool).execute(
            "INSERT INTO plugin_versions (name, version, signer) VALUES ($1, $2, $3)"
            " ON CONFLICT (name) DO UPDATE SET version = EXCLUDED.version,"
            " signer = EXCLUDED.signer, loaded_at = now()", name, version, signer)

    async def get(self, name: str) -> str | None:
        await self._import_legacy()
        return await self._get(name)

    async def record(self, name: str, version: str, signer: str) -> None:
        await self._import_legacy()
        try:
            async with self.pool.acquire() as conn, conn.transaction():
                # The lock makes check-and-raise atomic against another loader.
                await conn.execute("SELECT pg_advisory_xact_lock(hashtext('plugin_versions:' || $1))", name)
                old = await conn.fetchval("SELECT version FROM plugin_versions WHERE name = $1", name)
                refuse_rollback(name, version, old)
                if old is None or parse_version(version) > parse_version(old):
                    await self._upsert(name, version, signer, conn)
                elif old == version:
                    await conn.execute("UPDATE plugin_versions SET signer = $2, loaded_at = now()"
                                       " WHERE name = $1", name, signer)
        except asyncpg.PostgresError as e:
            raise PluginError(f"cannot write the plugin version record (plugin_versions): {e}") from e
