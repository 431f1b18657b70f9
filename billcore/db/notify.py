"""Relaying PostgreSQL NOTIFY to the core's listeners.

A trigger that calls ``pg_notify(channel, payload)`` tells every listener
when its transaction commits — whichever code path made the change.  The
relay keeps one dedicated connection LISTENing (outside the pool, since a
listening connection must stay open), reconnects with backoff when the
database goes away, and on every (re)connect calls ``on_notify(None)``
once so the listener can catch up on what it missed while deaf.

A listening connection is otherwise silent, so a server that vanished
without closing the socket (a host or network failure) would leave it deaf
for ever: every ``keepalive`` seconds it runs ``SELECT 1``.  The backoff is
short (a reconnect is cheap), so the relay hears again within ``max_backoff``
seconds of the database's return.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable

import asyncpg

from billcore.db.pool import DB_GONE

__all__ = ["relay_notifications"]

log = logging.getLogger(__name__)


async def relay_notifications(dsn: str, channel: str, on_notify: Callable[[str | None], None],
                              *, max_backoff: float = 2.0, keepalive: float = 5.0) -> None:
    """Run until cancelled: ``on_notify(payload)`` for each NOTIFY on ``channel``."""
    delay = 0.5
    while True:
        conn: asyncpg.Connection | None = None
        try:
            conn = await asyncpg.connect(dsn, timeout=10)
            lost = asyncio.Event()
            conn.add_termination_listener(lambda _c: lost.set())
            await conn.add_listener(channel, lambda _c, _pid, _ch, payload: on_notify(payload))
            if delay > 0.5:
                log.info("listening for notifications again", extra={"channel": channel})
            delay = 0.5
            on_notify(None)  # whatever changed while we were not listening
            while not lost.is_set():
                try:
                    await asyncio.wait_for(lost.wait(), keepalive)
                except asyncio.TimeoutError:
                    await conn.execute("SELECT 1", timeout=keepalive)
            log.warning("notification connection lost; reconnecting", extra={"channel": channel})
        except DB_GONE as exc:
            if delay == 0.5:  # once per outage; the core's probe reports the outage itself
                log.warning("cannot listen for notifications; retrying",
                            extra={"channel": channel, "reason": f"{type(exc).__name__}: {exc}", "retry_in": delay})
            await asyncio.sleep(delay)
            delay = min(delay * 2, max_backoff)
        finally:
            if conn is not None and not conn.is_closed():
                conn.terminate()
