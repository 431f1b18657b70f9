"""``sys.health``: the processes, NetFlow workers and RADIUS as the core can see them.

Right ``sys.health``.  The figures come from the processes' metrics files
(``billcore.server.health``) and, for what the core commits itself, from the
database: each NetFlow worker's committed journal watermark and the current
classifier version.  A database that does not answer is reported, not
raised: health is what an operator opens when something is wrong.
"""

from __future__ import annotations

import asyncio
import os
from typing import Any

import asyncpg

from billcore.api import ADMIN, handler
from billcore.server.call_context import CallContext
from billcore.server.calls import CallSpec
from billcore.server.context import CoreContext
from billcore.server.health import (
    RateMeter, metrics_dir, netflow_workers, processes, radius_counts, read_samples,
)

__all__ = ["MISSING", "calls"]

DB_TIMEOUT = 2.0
# what the contract asks and the core cannot know (said in the answer too)
MISSING = (
    "netflow.exporters: packets, drops and the last packet per exporter address are counted inside each"
    " worker by worker only; the worker reports no exporter to the core",
    "netflow.classifier_version is the core's current version, not the one a worker has loaded",
    "radius rates are per second since the previous sys.health call (none on the first)",
)


def calls(core: CoreContext) -> list[CallSpec]:
    meter = RateMeter()

    async def committed() -> dict[str, Any]:
        """The NetFlow watermarks and classifier version the core committed."""
        async with core.pool.acquire(timeout=DB_TIMEOUT) as conn:
            rows = await conn.fetch("SELECT source, watermark, updated_at FROM ingest_watermarks"
                                    " WHERE source LIKE 'netflow:%' ORDER BY source LIMIT 1000")
            version = await conn.fetchval("SELECT version FROM classifier_version")
        return {"version": version, "watermarks": {row["source"].removeprefix("netflow:"): row for row in rows}}

    @handler
    async def sys_health(ctx: CallContext) -> dict[str, Any]:
        """The processes (role, pid, state, restarts, started_at), each NetFlow worker (packets, drops,
        journal lag, committed watermark), RADIUS request rates and the database's state, as far as the core
        can know them from the processes' metrics; missing lists what it cannot know."""
        directory = metrics_dir()
        samples = await asyncio.to_thread(read_samples, directory) if directory else []
        database: dict[str, Any] = {"up": True}
        try:
            known = await asyncio.wait_for(committed(), DB_TIMEOUT)
        except (OSError, asyncio.TimeoutError, asyncpg.PostgresError, asyncpg.InterfaceError) as exc:
            database = {"up": False, "error": type(exc).__name__}
            known = {"version": None, "watermarks": {}}
        workers = netflow_workers(samples)
        netflow = []
        for name in sorted(set(workers) | set(known["watermarks"])):
            figures = workers.get(name, {"packets": None, "drops": None, "drops_by_reason": {},
                                         "journal_lag": None, "connected": False})
            mark = known["watermarks"].get(name)
            netflow.append({"worker": name, "exporters": [], "classifier_version": known["version"], **figures,
                            "watermark": mark["watermark"] if mark else None,
                            "watermark_at": mark["updated_at"] if mark else None})
        counts = radius_counts(samples)
        rates = meter.rates(counts)
        return {
            "processes": await asyncio.to_thread(processes, samples, os.getpid()),
            "netflow": netflow,
            "radius": {"access_per_s": rates["access"], "accounting_per_s": rates["accounting"],
                       "rejects_per_s": rates["rejects"], **counts},
            "database": database,
            "metrics": directory is not None,
            "missing": list(MISSING if directory else (
                "no metrics directory (the core runs without the supervisor): only the core is known",
                *MISSING)),
        }

    return [CallSpec("sys.health", sys_health, right="sys.health", kinds=ADMIN, args={}, result="map",
                     doc=sys_health.__doc__ or "", bound="fixed",
                     fields={"processes": "list", "processes.started_at": "time", "netflow": "list",
                             "netflow.watermark_at": "time", "radius": "map", "database": "map",
                             "missing": "list"})]
