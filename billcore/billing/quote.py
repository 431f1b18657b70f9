"""What a sample month would cost with a set of services: ``tariffs.quote``.

Theory of operation
-------------------
A quote is charging done on paper: a made-up account (id 0) on the default
monthly period holds the services for the first ``days`` days of the month
that holds ``now`` (the whole month by default), and the very functions that
charge real accounts price it:

* traffic goes through ``rating.rate`` — the classifier's byte totals per
  class, spread evenly over the hours of the active days (so time ranges
  take their share of the day as they would of real traffic), resolved to
  services, rules and tiers exactly as a NetFlow batch is; what rating would
  not charge (no rule for the class, two traffic services) is returned as
  ``unrated`` with rating's own reason;
* periodic fees go through ``periods.period_fee`` for each of the service's
  periods the sample overlaps, prorated to the second like the scheduler;
* a once-off service costs its fee (booked once per link).

No second pricing formula exists here: change how charging prices, and the
quote follows.
"""

from __future__ import annotations

import datetime as dt
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from billcore.billing.ledger_errors import InvalidValue
from billcore.billing.periods import Period, PeriodicService, ServiceLink, period_containing, period_fee
from billcore.billing.rating import AccountPlan, RatingBook, ServiceTariff, TrafficUsage, rate
from billcore.billing.tariffs import (
    DEFAULT_ACCOUNT_PERIOD, TariffNotFound, load_metered, load_periodic, load_timeranges,
)
from billcore.billing.timeranges import TimeRange
from billcore.common.money import MAX_QUANTITY, check_amount
from billcore.db.rows import DbConnection

__all__ = ["MAX_CLASSES", "MAX_DAYS", "MAX_SERVICES", "QuoteLine", "Quote", "check_traffic", "quote",
           "quote_services", "sample_span"]

MAX_SERVICES = 64
MAX_CLASSES = 64
MAX_DAYS = 31
SAMPLE_ACCOUNT = 0
_HOUR = dt.timedelta(hours=1)


@dataclass(frozen=True, slots=True)
class QuoteLine:
    service_id: int
    name: str
    kind: str
    amount: int


@dataclass(frozen=True, slots=True)
class Quote:
    start: dt.datetime
    end: dt.datetime
    lines: tuple[QuoteLine, ...]
    total: int
    unrated: tuple[tuple[int, int, str], ...]     # (class id, bytes, rating's reason)


def sample_span(now: dt.datetime, days: object, tz: dt.tzinfo) -> tuple[dt.datetime, dt.datetime]:
    """[start, end) of the sample: the first ``days`` local days of the month holding ``now`` (all of it)."""
    month = period_containing(DEFAULT_ACCOUNT_PERIOD, now, tz)
    if days is None:
        return month.start, month.end
    if type(days) is not int or not 1 <= days <= MAX_DAYS:
        raise InvalidValue(f"days must be an int in 1..{MAX_DAYS}")
    local = month.start.astimezone(tz).date() + dt.timedelta(days=days)
    end = dt.datetime.combine(local, dt.time(), tzinfo=tz).astimezone(dt.timezone.utc)
    return month.start, min(end, month.end)


def check_traffic(traffic: object) -> dict[int, int]:
    """``{class id (decimal text): bytes}`` as ints."""
    if traffic is None:
        return {}
    if type(traffic) is not dict or len(traffic) > MAX_CLASSES:
        raise InvalidValue(f"traffic must be a map of at most {MAX_CLASSES} class ids to bytes")
    out = {}
    for key, value in traffic.items():
        if type(key) is not str or not key.isdigit() or len(key) > 18:
            raise InvalidValue("traffic's keys are traffic class ids, as decimal text")
        if type(value) is not int or not 0 <= value <= MAX_QUANTITY:
            raise InvalidValue(f"traffic[{key!r}] must be a byte count (an int ≥ 0)")
        out[int(key)] = value
    return out


def _spread(traffic: Mapping[int, int], start: dt.datetime, end: dt.datetime) -> list[TrafficUsage]:
    """Each class's bytes over the hours of [start, end), the remainder on the first hours."""
    hours = [start + k * _HOUR for k in range((end - start) // _HOUR)] or [start]
    usage: list[TrafficUsage] = []
    for klass, total in sorted(traffic.items()):
        share, extra = divmod(total, len(hours))
        usage.extend(TrafficUsage(SAMPLE_ACCOUNT, klass, at, share + (1 if k < extra else 0))
                     for k, at in enumerate(hours) if share or k < extra)
    return usage


def _periodic_amount(service: PeriodicService, start: dt.datetime, end: dt.datetime, tz: dt.tzinfo) -> int:
    """The scheduler's fee for a link active over [start, end), summed over the service's periods."""
    link = [ServiceLink(SAMPLE_ACCOUNT, service.service_id, start, end)]
    amount = 0
    period: Period = period_containing(service.spec, start, tz)
    for _ in range(MAX_DAYS + 2):          # a daily service has at most this many periods in a month
        if period.start >= end:
            break
        amount += period_fee(service, period, link)
        period = period_containing(service.spec, period.end, tz)
    return check_amount(amount)


def quote(services: Sequence[Mapping[str, Any]], metered: Mapping[int, ServiceTariff],
          periodic: Mapping[int, PeriodicService], timeranges: tuple[TimeRange, ...],
          traffic: Mapping[int, int], start: dt.datetime, end: dt.datetime, tz: dt.tzinfo) -> Quote:
    """Price ``services`` (rows with id, name, kind, fee) over [start, end) with ``traffic``."""
    plan = AccountPlan(SAMPLE_ACCOUNT, DEFAULT_ACCOUNT_PERIOD, tuple(sorted(metered)))
    book = RatingBook(tz, timeranges, metered, {SAMPLE_ACCOUNT: plan})
    rated = rate(_spread(traffic, start, end), {}, book, now=end)
    usage_amounts: dict[int, int] = {}
    for entry in rated.entries:
        usage_amounts[entry.key.service_id] = usage_amounts.get(entry.key.service_id, 0) + entry.amount
    unrated: dict[tuple[int, str], int] = {}
    for rejected in rated.rejected:
        assert isinstance(rejected.usage, TrafficUsage)
        where = (rejected.usage.klass, rejected.reason)
        unrated[where] = unrated.get(where, 0) + rejected.usage.bytes
    lines = []
    for service in services:
        kind, service_id = service["kind"], service["id"]
        if kind == "periodic":
            amount = _periodic_amount(periodic[service_id], start, end, tz)
        elif kind == "once":
            amount = service["fee"]
        else:
            amount = usage_amounts.get(service_id, 0)
        lines.append(QuoteLine(service_id, service["name"], kind, check_amount(amount)))
    total = check_amount(sum(line.amount for line in lines))
    return Quote(start, end, tuple(lines), total,
                 tuple((klass, quantity, reason) for (klass, reason), quantity in sorted(unrated.items())))


async def quote_services(conn: DbConnection, service_ids: object, traffic: object, days: object,
                         now: dt.datetime, tz: dt.tzinfo) -> Quote:
    """Check the arguments, load the services' prices and quote them."""
    if type(service_ids) is not list or not 1 <= len(service_ids) <= MAX_SERVICES or any(
            type(service_id) is not int or not 1 <= service_id < 2**63 for service_id in service_ids):
        raise InvalidValue(f"service_ids must be a list of 1..{MAX_SERVICES} service ids")
    if len(set(service_ids)) != len(service_ids):
        raise InvalidValue("service_ids names a service twice")
    usage = check_traffic(traffic)
    start, end = sample_span(now, days, tz)
    rows = await conn.fetch("SELECT id, name, kind, fee FROM services WHERE id = ANY($1::bigint[])", service_ids)
    found = {row["id"]: dict(row) for row in rows}
    missing = [service_id for service_id in service_ids if service_id not in found]
    if missing:
        raise TariffNotFound(f"no service {', '.join(map(str, missing))}")
    metered = await load_metered(conn, [sid for sid in service_ids if found[sid]["kind"] in ("traffic", "time")])
    periodic = await load_periodic(conn)
    return quote([found[sid] for sid in service_ids], metered, periodic, await load_timeranges(conn), usage,
                 start, end, tz)
