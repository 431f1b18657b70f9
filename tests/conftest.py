"""Shared fixtures: one real PostgreSQL for the whole run, a fresh database
for each test.

The server is the embedded one (pgserver) in a temporary directory, or the
server named by ``BILLCORE_TEST_DSN``.  A template database gets every
migration once; each test that asks for ``db_dsn`` gets its own copy
(``CREATE DATABASE … TEMPLATE``, a file copy: fast), dropped afterwards.
"""

from __future__ import annotations

import asyncio
import os
import shutil
import socket
import tempfile
import uuid
from collections.abc import AsyncIterator, Iterator
from pathlib import Path
from urllib.parse import urlsplit, urlunsplit

import asyncpg
import pytest

from billcore.db.migrate import migrate

TEMPLATE = "billcore_test_template"
IN_CI = os.environ.get("CI", "").lower() in ("1", "true", "yes")


def need_peer(ok: bool, reason: str) -> None:
    """Skip a test whose real peer is missing, but fail in CI, where the
    peer must have been installed by .ci/run."""
    if ok:
        return
    if IN_CI:
        pytest.fail(f"CI=true and {reason}")
    pytest.skip(reason)


def with_database(dsn: str, name: str) -> str:
    parts = urlsplit(dsn)
    return urlunsplit(parts._replace(path="/" + name))


def free_port(kind: int = socket.SOCK_STREAM) -> int:
    with socket.socket(socket.AF_INET, kind) as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@pytest.fixture(scope="session")
def pg_server_dsn() -> Iterator[str]:
    """DSN of the server (its maintenance database)."""
    external = os.environ.get("BILLCORE_TEST_DSN")
    if external:
        yield external
        return
    from billcore.db.embedded import EmbeddedPostgres

    tmp = Path(tempfile.mkdtemp(prefix="billcore-pg-"))
    embedded = EmbeddedPostgres(tmp)
    dsn = embedded.start()
    try:
        yield dsn
    finally:
        embedded.stop()
        shutil.rmtree(tmp, ignore_errors=True)


@pytest.fixture(scope="session")
def template_dsn(pg_server_dsn: str) -> str:
    async def build() -> None:
        conn = await asyncpg.connect(pg_server_dsn)
        try:
            await conn.execute(f"DROP DATABASE IF EXISTS {TEMPLATE}")
            await conn.execute(f"CREATE DATABASE {TEMPLATE}")
        finally:
            await conn.close()
        conn = await asyncpg.connect(with_database(pg_server_dsn, TEMPLATE))
        try:
            await migrate(conn)
        finally:
            await conn.close()

    asyncio.run(build())
    return with_database(pg_server_dsn, TEMPLATE)


async def _create_db(server_dsn: str, template: str | None) -> str:
    name = "t_" + uuid.uuid4().hex[:16]
    conn = await asyncpg.connect(server_dsn)
    try:
        clause = f" TEMPLATE {template}" if template else ""
        await conn.execute(f"CREATE DATABASE {name}{clause}")
    finally:
        await conn.close()
    return name


async def _drop_db(server_dsn: str, name: str) -> None:
    conn = await asyncpg.connect(server_dsn)
    try:
        await conn.execute(f"DROP DATABASE IF EXISTS {name} WITH (FORCE)")
    finally:
        await conn.close()


@pytest.fixture
async def db_dsn(pg_server_dsn: str, template_dsn: str) -> AsyncIterator[str]:
    """A fresh database with every migration applied, for this test only."""
    name = await _create_db(pg_server_dsn, TEMPLATE)
    yield with_database(pg_server_dsn, name)
    await _drop_db(pg_server_dsn, name)


@pytest.fixture
async def empty_db_dsn(pg_server_dsn: str) -> AsyncIterator[str]:
    """A fresh database with no migration applied."""
    name = await _create_db(pg_server_dsn, None)
    yield with_database(pg_server_dsn, name)
    await _drop_db(pg_server_dsn, name)


@pytest.fixture
async def pool(db_dsn: str) -> AsyncIterator[asyncpg.Pool]:
    p = await asyncpg.create_pool(db_dsn, min_size=1, max_size=8)
    try:
        yield p
    finally:
        await p.close()
