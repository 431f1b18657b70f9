"""A plugin's database facade: its own schema, and nothing to configure.

Theory of operation
-------------------
Each plugin owns one PostgreSQL schema, ``plugin_<name>``.  Its
``migrations/*.sql`` files (from the verified bundle) run in file-name order
inside that schema, each in its own transaction, once: applied names and
their SHA-256 are kept in ``plugin_<name>._migrations``; an applied
migration whose bytes changed in a later version is refused rather than
silently skipped.  An advisory lock serialises two loaders of one plugin.

``PluginDB`` is what ``api.db`` is: ``execute``/``fetch``/``fetchrow``/
``fetchval`` and ``transaction()``, each running with ``search_path`` set to
the plugin's schema so unqualified names are the plugin's own tables.  It is
a narrow *interface*, not a sandbox: plugin code is trusted once signed (it
runs in the core's process), and the signature is the trust boundary.
Rows come back as plain dicts so plugins do not depend on asyncpg.
"""

from __future__ import annotations

import hashlib
from collections.abc import AsyncIterator, Sequence
from contextlib import asynccontextmanager
from typing import Any

import asyncpg

from billcore.db.rows import DbConnection
from billcore.plugins.errors import PluginDatabaseError

__all__ = ["PluginDB", "run_migrations", "schema_of"]


def schema_of(plugin: str) -> str:
    return f"plugin_{plugin}"


def _ident(name: str) -> str:
    return '"' + name.replace('"', '""') + '"'


class PluginConnection:
    """Queries on one connection inside one transaction (see ``PluginDB.transaction``)."""

    __slots__ = ("_conn",)

    def __init__(self, conn: DbConnection) -> None:
        self._conn = conn

    async def execute(self, sql: str, *args: Any) -> str:
        return str(await self._conn.execute(sql, *args))

    async def fetch(self, sql: str, *args: Any) -> list[dict[str, Any]]:
        return [dict(row) for row in await self._conn.fetch(sql, *args)]

    async def fetchrow(self, sql: str, *args: Any) -> dict[str, Any] | None:
        row = await self._conn.fetchrow(sql, *args)
        return None if row is None else dict(row)

    async def fetchval(self, sql: str, *args: Any) -> Any:
        return await self._conn.fetchval(sql, *args)


class PluginDB:
    """``api.db``: the plugin's own schema on the core's pool."""

    __slots__ = ("_pool", "schema", "_closed")

    def __init__(self, pool: asyncpg.Pool, schema: str) -> None:
        self._pool = pool
        self.schema = schema
        self._closed = False

    def close(self) -> None:
        """After teardown, a leftover task of the plugin gets an error, not the pool."""
        self._closed = True

    @asynccontextmanager
    async def transaction(self) -> AsyncIterator[PluginConnection]:
        if self._closed:
            raise PluginDatabaseError(f"{self.schema}: the plugin was unloaded")
        async with self._pool.acquire() as conn, conn.transaction():
            await conn.execute("SELECT set_config('search_path', $1, true)", _ident(self.schema))
            yield PluginConnection(conn)

    async def execute(self, sql: str, *args: Any) -> str:
        async with self.transaction() as tx:
            return await tx.execute(sql, *args)

    async def fetch(self, sql: str, *args: Any) -> list[dict[str, Any]]:
        async with self.transaction() as tx:
            return await tx.fetch(sql, *args)

    async def fetchrow(self, sql: str, *args: Any) -> dict[str, Any] | None:
        async with self.transaction() as tx:
            return await tx.fetchrow(sql, *args)

    async def fetchval(self, sql: str, *args: Any) -> Any:
        async with self.transaction() as tx:
            return await tx.fetchval(sql, *args)


async def run_migrations(pool: asyncpg.Pool, schema: str,
                         migrations: Sequence[tuple[str, bytes]]) -> list[str]:
    """Apply the not-yet-applied migrations; return the names applied now."""
    applied_now: list[str] = []
    s = _ident(schema)
    try:
        async with pool.acquire() as conn:
            async with conn.transaction():
                await conn.execute("SELECT pg_advisory_xact_lock(hashtext($1))", schema)
                await conn.execute(f"CREATE SCHEMA IF NOT EXISTS {s}")
                await conn.execute(
                    f"CREATE TABLE IF NOT EXISTS {s}._migrations ("
                    " name text PRIMARY KEY, sha256 bytea NOT NULL,"
                    " applied_at timestamptz NOT NULL DEFAULT now())")
            for name, body in sorted(migrations):
                digest = hashlib.sha256(body).digest()
                async with conn.transaction():
                    await conn.execute("SELECT pg_advisory_xact_lock(hashtext($1))", schema)
                    done = await conn.fetchval(f"SELECT sha256 FROM {s}._migrations WHERE name = $1", name)
                    if done is not None:
                        if bytes(done) != digest:
                            raise PluginDatabaseError(
                                f"{schema}: migration {name} was changed after it was applied; "
                                "add a new migration instead")
                        continue
                    await conn.execute("SELECT set_config('search_path', $1, true)", s)
                    await conn.execute(body.decode("utf-8"))
                    await conn.execute(f"INSERT INTO {s}._migrations (name, sha256) VALUES ($1, $2)",
                                       name, digest)
                    applied_now.append(name)
    except (asyncpg.PostgresError, UnicodeDecodeError) as e:
        raise PluginDatabaseError(f"{schema}: migration failed: {e}") from e
    return applied_now
