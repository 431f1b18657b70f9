"""Opening the database: retry with backoff while it is unreachable.

A database that is down when billcore starts is an operational state, not a
bug: we log one clear line per attempt (where, why, when the next try is)
and keep trying with exponential backoff, instead of dying with a traceback.
"""

from __future__ import annotations

import asyncio
import functools
import logging
import time
from collections.abc import Callable
from typing import Any
from urllib.parse import urlsplit

import asyncpg
from asyncpg.exceptions import InternalClientError

from billcore.common.config import DatabaseSection
from urfa.reconnect import DB_UNAVAILABLE   # the wire code; the link's retry table knows it as "retry later"

__all__ = ["open_pool", "describe_dsn", "DatabaseUnavailable", "DB_UNAVAILABLE", "DATABASE_GONE", "guard_database",
           "DB_GONE", "DatabaseHealth", "watch_database"]

log = logging.getLogger(__name__)

_UNREACHABLE = (OSError, asyncio.TimeoutError, asyncpg.CannotConnectNowError,
                asyncpg.TooManyConnectionsError, asyncpg.InvalidCatalogNameError)


class DatabaseUnavailable(Exception):
    """The database did not answer within the allowed attempts."""


# What a call sees when the database went away under it (connection lost,
# server shutting down or restarting, statement timed out, pool closed).
_GONE = (asyncpg.PostgresConnectionError, asyncpg.exceptions.OperatorInterventionError, asyncpg.InterfaceError)
# What a background task sees when the database goes away: it waits and tries
# again instead of dying (a dead task would stop its work for good).
DB_GONE = (asyncpg.PostgresError, asyncpg.InterfaceError, InternalClientError, OSError, asyncio.TimeoutError)
DATABASE_GONE = _GONE   # for code outside a call handler that must tell "down" from "bug"


def _raised_in_asyncpg(exc: BaseException) -> bool:
    """An OSError or timeout counts only when asyncpg raised it (a refused or
    vanished socket), not when a handler's own file or network I/O did."""
    tb = exc.__traceback__
    while tb is not None:
        if str(tb.tb_frame.f_globals.get("__name__", "")).startswith("asyncpg"):
            return True
        tb = tb.tb_next
    return False


def guard_database(handler: Callable[..., Any],
                   on_gone: Callable[[str], None] | None = None) -> Callable[..., Any]:
    """Wrap a URFA handler: a database that went away answers the call with
    ``core.db_unavailable`` (retry later) instead of an internal error.  The
    transaction it was in rolled back, so nothing was half done.  ``on_gone``
    hears the reason (the core's health: a restart of the embedded server can
    be shorter than the probe's interval, and monitoring must still see it)."""
    from urfa.errors import CallFailed

    @functools.wraps(handler)
    async def guarded(ctx: Any, **args: Any) -> Any:
        try:
            return await handler(ctx, **args)
        except (*_GONE, OSError) as exc:
            if isinstance(exc, OSError) and not _raised_in_asyncpg(exc):
                raise
            reason = f"{type(exc).__name__}: {exc}"
            log.warning("database unavailable during a call", extra={"reason": reason})
            if on_gone is not None:
                on_gone(reason)
            raise CallFailed(DB_UNAVAILABLE, "the database is unavailable; nothing was changed, retry later") from None
        except InternalClientError as exc:
            # asyncpg trips over its own state when the server dies under a
            # connection: the pool's reset on release fails.  When the body had
            # failed first (its error is the context), its transaction rolled
            # back.  When the body had finished, a backend that outlived its
            # killed postmaster may have committed: we cannot say "nothing was
            # changed" — but every billing input carries its idempotency key,
            # so a retry is safe.
            reason = f"{type(exc).__name__}: {exc}"
            log.warning("database connection broke during a call", extra={"reason": reason})
            if on_gone is not None:
                on_gone(reason)
            if isinstance(exc.__context__, _GONE):
                raise CallFailed(DB_UNAVAILABLE, "the database is unavailable; nothing was changed, retry later") from None
            raise CallFailed(DB_UNAVAILABLE, "the database connection broke; the call may or may not have been "
                                             "applied; retry later with the same key") from None

    return guarded


def describe_dsn(dsn: str) -> str:
    """Where a DSN points, without its password."""
    parts = urlsplit(dsn)
    host = parts.hostname or ""
    if not host and "host=" in parts.query:
        host = parts.query.split("host=", 1)[1].split("&", 1)[0]
    port = f":{parts.port}" if parts.port else ""
    return f"{host or 'localhost'}{port}{parts.path}"


async def open_pool(
    dsn: str,
    section: DatabaseSection,
    *,
    deadline: float | None = None,
    clock: Callable[[], float] = time.monotonic,
) -> asyncpg.Pool:
    """Create the pool, retrying while the server is unreachable.

    ``deadline`` (seconds) bounds the whole wait; ``None`` waits for ever.
    """
    start = clock()
    delay = 0.25
    attempt = 0
    while True:
        attempt += 1
        try:
            pool = await asyncpg.create_pool(
                dsn,
                min_size=section.pool_min,
                max_size=section.pool_max,
                timeout=section.connect_timeout,
                command_timeout=section.command_timeout,
            )
            if attempt > 1:
                log.info("database reachable again", extra={"db": describe_dsn(dsn), "attempts": attempt})
            return pool
        except _UNREACHABLE as exc:
            reason = f"{type(exc).__name__}: {exc}".strip()
            if deadline is not None and clock() - start + delay > deadline:
                raise DatabaseUnavailable(f"database {describe_dsn(dsn)} unreachable: {reason}") from exc
            log.warning(
                "database unreachable, retrying",
                extra={"db": describe_dsn(dsn), "reason": reason, "retry_in": round(delay, 2), "attempt": attempt},
            )
            await asyncio.sleep(delay)
            delay = min(delay * 2, section.retry_max_backoff)


class DatabaseHealth:
    """Is the database answering?  Fed one probe result at a time, with ``now``
    passed in; tells its listener only of changes."""

    def __init__(self, on_change: Callable[[bool, float, str], None]) -> None:
        self.up: bool | None = None  # unknown until the first probe
        self.since = 0.0
        self._on_change = on_change

    def observe(self, ok: bool, now: float, reason: str = "") -> None:
        """``now``: when the observation began (a probe's start).  A probe that
        began before a failure was seen cannot clear it: the failure stands
        until a later probe answers."""
        if ok == self.up or (ok and self.up is False and now < self.since):
            return
        was = self.since
        self.up, self.since = ok, now
        self._on_change(ok, now - was if was else 0.0, reason)


async def watch_database(pool: asyncpg.Pool, health: DatabaseHealth, *, interval: float = 1.0,
                         timeout: float = 3.0, clock: Callable[[], float] = time.monotonic) -> None:
    """Probe the database every ``interval`` seconds (``SELECT 1`` through the
    pool, bounded by ``timeout``) until cancelled.  The pool replaces the
    connections that died with the server, so the first probe after it comes
    back succeeds."""
    while True:
        started = clock()
        try:
            async with asyncio.timeout(timeout):
                await pool.fetchval("SELECT 1")
        except DB_GONE as exc:
            health.observe(False, clock(), f"{type(exc).__name__}: {exc}".strip())
        else:
            health.observe(True, started)
        await asyncio.sleep(interval)
