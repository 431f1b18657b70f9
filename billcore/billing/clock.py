"""Billing time: the wall clock, except that it never runs backwards.

Theory of operation
-------------------
What is due (periodic fees, whether usage is stamped "in the future") is
computed from the wall clock, and the wall clock can step: an NTP correction,
an operator's ``date -s``, a VM resumed from a snapshot.  A step backwards
would make the core refuse usage as "future" that it accepted a moment ago
(NetFlow rows are then kept in raw storage only, a RADIUS Stop is never
charged) and make cumulative periodic targets smaller (a refund, charged
again later).

``BillingClock.now()`` is ``max(wall, last + elapsed)``, where ``elapsed`` comes
from the monotonic clock, which does not step.  After a backward step billing
time goes on from where it was, so it stays (nearly) right while the wall
clock is wrong.  After a forward step it follows the wall clock (a step
forward is indistinguishable from a long pause); if that step is then
corrected, billing time is ahead of the wall clock and slews back.  While
ahead of the wall clock for either reason it runs at ``1 - SLEW`` of real time:
an hour of difference is gone in about four days, and after a backward step
of an hour billing time lags real time by 36 s at most, well inside rating's
five minutes of tolerated clock skew.

Every step larger than ``STEP`` is counted in ``billcore_clock_steps_total``
(by direction) and logged; ``billcore_clock_behind_seconds`` is how far the wall
clock is behind billing time now (0 in normal operation).

A core restarted while its wall clock is behind starts from ``floor``: the
latest billing time it ever committed (`clock_floor`: the last periodic run,
the last usage commit of any source).  The periodic scheduler and
``commit_usage`` also keep their own persisted floors (the last run's ``now``,
the source's last commit).

Pure apart from the metrics and `clock_floor`: the wall and monotonic clocks
are passed in, so tests drive both.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from datetime import datetime, timedelta, timezone
from typing import Final

import asyncpg
from prometheus_client import Counter, Gauge

__all__ = ["BillingClock", "SLEW", "STEP", "clock_floor"]

log = logging.getLogger("billcore.clock")

STEP: Final = 1.0
"""Seconds of disagreement between the wall and monotonic clocks counted as a step."""
SLEW: Final = 0.01
"""While billing time is ahead of the wall clock it runs this much slower than real time."""

BEHIND = Gauge("billcore_clock_behind_seconds", "Seconds the wall clock is behind billing time (after a "
               "backward step; 0 normally)", multiprocess_mode="livemax")
STEPS = Counter("billcore_clock_steps", "Wall-clock steps larger than a second seen by the core", ["direction"])


class BillingClock:
    """A wall clock that never runs backwards (see the module docstring)."""

    def __init__(self, wall: Callable[[], datetime], monotonic: Callable[[], float] = time.monotonic, *,
                 floor: datetime | None = None) -> None:
        self._wall = wall
        self._monotonic = monotonic
        self._floor = floor
        self._last: datetime | None = None
        self._last_mono = 0.0
        self._last_wall: datetime | None = None

    def now(self) -> datetime:
        wall = self._wall()
        if wall.utcoffset() is None:
            raise ValueError("the wall clock must give aware datetimes")
        wall = wall.astimezone(timezone.utc)
        mono = self._monotonic()
        if self._last is None or self._last_wall is None:
            value = wall if self._floor is None or self._floor <= wall else self._floor
            if value > wall:
                log.error("WALL CLOCK BEHIND the latest committed billing time: billing time starts from it",
                          extra={"wall": wall.isoformat(), "billing": value.isoformat()})
        else:
            elapsed = max(0.0, mono - self._last_mono)
            self._note_step(wall, self._last_wall + timedelta(seconds=elapsed))
            ahead = self._last > self._last_wall  # billing time was ahead of the wall clock: slew
            value = max(wall, self._last + timedelta(seconds=elapsed * (1 - SLEW if ahead else 1)))
        self._last, self._last_mono, self._last_wall = value, mono, wall
        BEHIND.set((value - wall).total_seconds())
        return value

    def _note_step(self, wall: datetime, expected: datetime) -> None:
        step = (wall - expected).total_seconds()
        if abs(step) <= STEP:
            return
        direction = "forward" if step > 0 else "backward"
        STEPS.labels(direction).inc()
        log.error("WALL CLOCK STEPPED: billing time does not go backwards", extra={
            "direction": direction, "seconds": round(step, 3), "wall": wall.isoformat()})


async def clock_floor(pool: asyncpg.Pool) -> datetime | None:
    """The latest billing time the database holds (a periodic run's, a usage commit's); None: none yet."""
    async with pool.acquire() as conn:
        floor: datetime | None = await conn.fetchval(
            "SELECT greatest((SELECT max(last_now) FROM periodic_runs), (SELECT max(high_now) FROM periodic_clock),"
            " (SELECT max(updated_at) FROM ingest_watermarks))")
    return floor
