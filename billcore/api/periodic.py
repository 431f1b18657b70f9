"""Run the periodic charges now: ``periodic.run`` (URFA) and the lock every run takes.

Theory of operation
-------------------
The scheduler runs ``billcore.server.core.periodic_once`` every
``[periodic] interval``; an operator who cannot wait (a tariff changed, the
core was down over midnight) runs the very same pass now, over URFA
(``periodic.run``, right ``periodic.run``, via ``billctl periodic-run``) or
from the shell (``billcore periodic run-now``).  A run is idempotent per
(account, service, period), so "now" and the scheduler never charge twice;
two runs at once would fight over the same rows, so every run — the
scheduler's, the call's, the shell's, in any process — holds one
PostgreSQL advisory lock while it works and the second one waits.

``periodic.run`` streams one progress map per committed batch
(``accounts_done``, ``accounts_total``, ``batches``, ``charges``,
``amount``) and answers the run's summary.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
from collections.abc import AsyncIterator, Callable
from typing import Any, Final

import asyncpg

from billcore.api import ADMIN, handler, who
from billcore.billing import audit
from billcore.server.call_context import CallContext
from billcore.server.calls import CallSpec
from billcore.server.context import CoreContext

__all__ = ["PERIODIC_LOCK", "RUN_FIELDS", "calls", "periodic_lock", "summary"]

PERIODIC_LOCK: Final = 0x62696C6C_70657231   # "billper1": pg advisory lock key of periodic runs
RUN_FIELDS: Final = {"accounts": "int", "batches": "int", "charges": "int", "amount": "money",
                     "once_charges": "int", "periods_closed": "int", "blocks_changed": "int",
                     "accounts_done": "int", "accounts_total": "int"}


@contextlib.asynccontextmanager
async def periodic_lock(pool: asyncpg.Pool, waiting: Callable[[], None] | None = None) -> AsyncIterator[None]:
    """Hold the periodic-run lock (one pooled connection) for the ``with`` body;
    ``waiting()`` is called once when another run holds it and we wait.  With
    the run's own two connections that is three (``[database] pool_max`` ≥ 3)."""
    async with pool.acquire() as conn:
        if not await conn.fetchval("SELECT pg_try_advisory_lock($1)", PERIODIC_LOCK):
            if waiting is not None:
                waiting()
            await conn.execute("SELECT pg_advisory_lock($1)", PERIODIC_LOCK)
        try:
            yield
        finally:
            with contextlib.suppress(Exception):   # a dropped connection has released it already
                await conn.execute("SELECT pg_advisory_unlock($1)", PERIODIC_LOCK)


def summary(result: Any) -> dict[str, Any]:
    """A ``RunResult`` as plain values."""
    return {"since": result.since, "now": result.now, "accounts": result.accounts, "batches": result.batches,
            "charges": result.charges, "amount": result.amount, "once_charges": result.once_charges,
            "periods_closed": result.periods_closed, "blocks_changed": len(result.block_changes)}


def calls(core: CoreContext) -> list[CallSpec]:
    @handler
    async def periodic_run(ctx: CallContext) -> dict[str, Any]:
        """Run the periodic charges due now, as the scheduler does (idempotent); streams progress."""
        from billcore.server.core import periodic_once

        progress: asyncio.Queue[Any] = asyncio.Queue()   # one item per committed batch: bounded by the run
        run = asyncio.ensure_future(periodic_once(core, progress=progress.put_nowait))
        try:
            while not run.done() or not progress.empty():
                getter = asyncio.ensure_future(progress.get())
                await asyncio.wait({getter, run}, return_when=asyncio.FIRST_COMPLETED)
                if not getter.done():
                    getter.cancel()
                    continue
                await ctx.stream([dataclasses.asdict(getter.result())])
            result = summary(run.result())
        finally:
            run.cancel()   # the caller went away: committed batches stay, the next run finishes
        async with core.pool.acquire() as conn:
            await audit.record(conn, who(ctx), "periodic.run", "periodic", before=None, after=result,
                               now=core.now())
        return result

    return [CallSpec("periodic.run", periodic_run, right="periodic.run", kinds=ADMIN, streaming=True,
                     result="map", fields=RUN_FIELDS, doc=periodic_run.__doc__ or "", bound="stream")]
