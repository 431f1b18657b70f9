"""The core process: the only writer of billing state.

Start-up: open the pool (waiting while the database is unreachable), apply
pending migrations, build the call registry, serve URFA and metrics.  Stop:
close the listeners, let calls in flight finish, close the pool.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging

import asyncpg

from . import metrics
from .calls import CallRegistry
from .config import Config
from .db.migrate import migrate
from .db.pool import describe_dsn, open_pool

__all__ = ["run"]

log = logging.getLogger(__name__)


async def _watch_pool(pool: asyncpg.Pool) -> None:
    while True:
        metrics.DB_POOL_SIZE.set(pool.get_size())
        metrics.DB_POOL_IDLE.set(pool.get_idle_size())
        await asyncio.sleep(5)


async def run(config: Config, dsn: str, index: int, stop: asyncio.Event) -> None:
    metrics.PROCESS_UP.labels("core").set(1)
    pool = await _open(config, dsn, stop)
    if pool is None:
        return
    try:
        async with pool.acquire() as conn:
            await migrate(conn)
        registry = CallRegistry()
        if config.metrics.enabled:
            metrics.serve(config.metrics.host, config.metrics.port)
        watcher = asyncio.create_task(_watch_pool(pool))
        log.info("core serving", extra={"db": describe_dsn(dsn), "calls": len(registry.symbols())})
        await stop.wait()
        watcher.cancel()
    finally:
        with contextlib.suppress(asyncio.TimeoutError):
            await asyncio.wait_for(pool.close(), timeout=5)


async def _open(config: Config, dsn: str, stop: asyncio.Event) -> asyncpg.Pool | None:
    """Open the pool, or give up quietly when asked to stop meanwhile."""
    opening = asyncio.create_task(open_pool(dsn, config.database))
    stopping = asyncio.create_task(stop.wait())
    await asyncio.wait({opening, stopping}, return_when=asyncio.FIRST_COMPLETED)
    if opening.done():
        stopping.cancel()
        return opening.result()
    opening.cancel()
    with contextlib.suppress(asyncio.CancelledError):
        await opening
    return None
