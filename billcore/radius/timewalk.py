"""The time walk: how many seconds from now the money left pays for, priced
exactly the way rating will charge them.

An account whose tariff in force has a time service is time-based; its prices
live in the tariff engine (``service_rates`` per time range, prepaid time,
tiers, accounting periods).  Session-Timeout is what the money left (balance
+ credit + open promised credit; other active sessions are not reserved) buys
from now on (``seconds_affordable``), capped by the link's and the service's
``session_limit`` and by ``MAX_TIME_HORIZON``.  ``time_verdicts`` decides
this for every time-based account of an authorization batch at once.
"""

from __future__ import annotations

import datetime as dt
import logging
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Final

from billcore.billing.periods import period_containing
from billcore.billing.rating import TIME_CLASS, AccountPlan, CounterKey, RatingBook, ServiceTariff
from billcore.billing.tariffs import load_book
from billcore.billing.timeranges import select, split
from billcore.db.rows import DbConnection
from billcore.radius.records import LinkState, Refusal

__all__ = ["MAX_TIME_HORIZON", "TimeVerdict", "seconds_affordable", "time_verdicts"]

log = logging.getLogger(__name__)

MAX_TIME_HORIZON: Final = 7 * 86_400
"""Longest Session-Timeout that money alone gives (seconds): the forward walk
through time ranges stays short, and a richer subscriber is re-authorized
(and re-priced) once a week."""
_MAX_CHUNKS: Final = MAX_TIME_HORIZON // 86_400 + 3
"""Accounting periods the walk may cross: a period is at least a (23-hour) day."""

_TIME_ACCOUNTS: Final = (
    "SELECT a.id, (SELECT count(*) FROM radius_sessions s WHERE s.account_id = a.id AND s.ended_at IS NULL) AS active,"
    " (SELECT coalesce(sum(p.amount), 0)::bigint FROM promised_payments p WHERE p.account_id = a.id"
    "   AND p.closed_at IS NULL AND p.expires_at > $2) AS promised"
    " FROM unnest($1::bigint[]) AS a(id)")


def seconds_affordable(money: int, now: dt.datetime, horizon: int, book: RatingBook, plan: AccountPlan,
                       service: ServiceTariff, counters: Mapping[CounterKey, int]) -> int:
    """Whole seconds from ``now`` that ``money`` (micro-units) pays for on the
    time service ``service``, at most ``horizon``.

    Walks forward piece by piece — ``split`` at time-range borders (DST
    included) inside each accounting period — and prices each piece the way
    rating will charge it: on the cumulative counter of its (range, period),
    starting from ``counters`` (absent: 0), so prepaid time, tiers and the
    floor are the same as the charge.  A piece the money covers is bought
    whole; inside the first one it does not cover, the last affordable second
    is found by bisection (``Meter.charged`` is monotone).  A time range
    without a price ends the walk: time there cannot be sold.  Pure.
    """
    if type(money) is not int or type(horizon) is not int or not 0 <= horizon <= MAX_TIME_HORIZON:
        raise ValueError(f"money is int micro-units and horizon an int in 0..{MAX_TIME_HORIZON}")
    money = max(0, money)
    cursor = now.astimezone(dt.timezone.utc).replace(microsecond=0)
    end = cursor + dt.timedelta(seconds=horizon)
    used: dict[CounterKey, int] = {}
    bought = 0
    for _ in range(_MAX_CHUNKS):
        if cursor >= end:
            return bought
        period = period_containing(plan.period, cursor, book.tz)
        chunk_end = min(period.end, end)
        for piece in split(book.timeranges, cursor, chunk_end, book.tz):
            found = service.meter_for(TIME_CLASS, piece.range_id)
            if found is None:
                return bought
            range_id, meter = found
            key = CounterKey(plan.account_id, service.service_id, TIME_CLASS, range_id, period.start)
            before = counters.get(key, 0) + used.get(key, 0)
            base = meter.charged(before)
            whole = meter.charged(before + piece.seconds) - base
            if whole <= money:
                money -= whole
                used[key] = used.get(key, 0) + piece.seconds
                bought += piece.seconds
                continue
            low, high = 0, piece.seconds  # charged(before + low) - base <= money < … + high
            for _ in range(64):
                if high - low <= 1:
                    break
                middle = (low + high) // 2
                if meter.charged(before + middle) - base <= money:
                    low = middle
                else:
                    high = middle
            assert meter.charged(before + low) - base <= money, "bisection left the affordable side"
            return bought + low
        cursor = chunk_end
    raise AssertionError("the walk crossed more accounting periods than the horizon holds")


@dataclass(frozen=True, slots=True)
class TimeVerdict:
    """An account's time decision for one batch."""

    seconds: int | None         # seconds to allow; None: not limited by money
    refusal: Refusal | None     # why it may not go online
    account_active: int         # the account's active sessions (the service's max_sessions counts them)


def _time_horizon(link: LinkState) -> int:
    limits = [limit for limit in (link.session_limit, link.time_session_limit) if limit]
    return min([MAX_TIME_HORIZON, *limits])


async def _counters(conn: DbConnection, ids: list[int], since: dt.datetime) -> dict[CounterKey, int]:
    rows = await conn.fetch(
        "SELECT account_id, service_id, range_id, period_start, quantity FROM usage_counters"
        " WHERE account_id = ANY($1::bigint[]) AND class_id = $2 AND period_start >= $3", ids, TIME_CLASS, since)
    return {CounterKey(row["account_id"], row["service_id"], TIME_CLASS, row["range_id"], row["period_start"]):
            int(row["quantity"]) for row in rows}


async def time_verdicts(conn: DbConnection, links: Sequence[LinkState], now: dt.datetime,
                        tz: dt.tzinfo) -> dict[int, TimeVerdict]:
    """Decide time for the accounts of ``links`` that have a time service now
    (a few queries for the whole batch), by account id."""
    by_account = {link.account_id: link for link in links if link.time_services}
    if not by_account:
        return {}
    ids = sorted(by_account)
    extra = {row["id"]: row for row in await conn.fetch(_TIME_ACCOUNTS, ids, now)}
    book = await load_book(conn, ids, tz=tz, since=now, until=now)
    starts = [period_containing(plan.period, now, tz).start
              for plan in (book.accounts.get(acc) for acc in ids) if plan is not None]
    counters = await _counters(conn, ids, min(starts)) if starts else {}
    current = select(book.timeranges, now, tz)
    verdicts: dict[int, TimeVerdict] = {}
    for acc, link in by_account.items():
        active = int(extra[acc]["active"])
        services = list(link.time_services or ())
        plan = book.accounts.get(acc)
        service = book.services.get(services[0])
        if len(services) > 1 or plan is None or service is None:
            log.error("account %s: its tariff has %d time services; time cannot be priced", acc, len(services))
            verdicts[acc] = TimeVerdict(None, Refusal.SEVERAL_TIME_SERVICES, active)
            continue
        if link.unlimited:
            verdicts[acc] = TimeVerdict(None, None, active)
            continue
        money = link.balance + link.credit + int(extra[acc]["promised"])
        seconds = seconds_affordable(money, now, _time_horizon(link), book, plan, service, counters)
        if seconds > 0:
            verdicts[acc] = TimeVerdict(seconds, None, active)
        elif service.meter_for(TIME_CLASS, 0 if current is None else current.range_id) is None:
            verdicts[acc] = TimeVerdict(None, Refusal.NO_TIME_PRICE, active)
        else:
            verdicts[acc] = TimeVerdict(None, Refusal.NO_MONEY_FOR_TIME, active)
    return verdicts
