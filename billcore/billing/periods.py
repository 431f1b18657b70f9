"""Periods, proration and periodic charges.

Theory of operation
-------------------
A ``PeriodSpec`` (kind + anchor date) cuts time into periods that start at
local midnight in the operator's zone: daily, weekly, every ``days`` days,
monthly on the anchor's day of month, yearly on the anchor's date.  Boundary
``k`` is computed from the anchor directly, never from boundary ``k − 1``, so
a month anchored on Jan 31 ends on Feb 28/29, Mar 31, Apr 30 ... and never
drifts to the 28th.  Periods are half-open ``[start, end)`` in UTC; a local
day is 23 or 25 hours long across DST and the period says so.

Proration is by exact seconds on a *cumulative* rule: the fee owed for
``[period.start, t)`` is ``floor(fee × elapsed_seconds / period_seconds)``,
and any piece ``[a, b)`` costs ``cum(b) − cum(a)``.  The pieces of a period
telescope to ``cum(end) − cum(start) = fee`` exactly, so a tariff change
mid-period charges old part + new part with no drift, and spreading a fee
over days sums to the fee to the micro-unit.

Periodic charges are idempotent the same way traffic is: for each
``(account, service, period_start)`` the scheduler knows what was already
charged (``last_charged``), computes what *should* have been charged by
``now`` (the target), and emits the difference.  Running ``due_charges``
twice on the same state emits the same charge; after it is booked, nothing.
The booking side stores the new cumulative with a compare-and-set on the old.

Targets by ``ChargeMode`` (``A`` = the link's active intervals in the period
that have already begun):

* ``START``  — at the start of activity in a period, the fee for ``A`` up to
  the known end of the link (open links: to the period end).  A link that is
  ended mid-period later lowers the target: a refund (negative amount).
* ``END``    — once the period is over, the fee for ``A``.
* ``DAILY``  — spread: at the start of each local day, the fee for ``A`` up to
  that day's end.  The daily pieces of a full period sum to the fee.
"""

from __future__ import annotations

import calendar
import enum
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from datetime import date, datetime, time, timedelta, timezone, tzinfo
from typing import Final

from billcore.common.errors import InvariantViolation, PeriodError
from billcore.common.money import check_amount, floor_div, format_money

__all__ = [
    "ChargeMode",
    "Interval",
    "MAX_PERIODS_PER_RUN",
    "Period",
    "PeriodKind",
    "PeriodSpec",
    "PeriodicCharge",
    "PeriodicKey",
    "PeriodicService",
    "ServiceLink",
    "cumulative_fee",
    "due_charges",
    "next_boundary",
    "period_containing",
    "period_fee",
    "prorate",
]

MAX_PERIODS_PER_RUN: Final = 1_000
"""Most periods ``due_charges`` walks per (account, service) in one run."""
MAX_INTERVALS: Final = 1_000
"""Most active intervals one proration accepts."""

_ONE_SECOND: Final = timedelta(seconds=1)
_ANY_DATE: Final = date(2000, 1, 3)
Interval = tuple[datetime, datetime]
"""A half-open ``[start, end)`` of aware datetimes."""


class PeriodKind(enum.Enum):
    DAILY = "daily"
    WEEKLY = "weekly"
    MONTHLY = "monthly"
    YEARLY = "yearly"
    CUSTOM = "custom"


class ChargeMode(enum.Enum):
    START = "start"
    END = "end"
    DAILY = "daily"


def _utc(instant: datetime, what: str) -> datetime:
    if instant.tzinfo is None or instant.utcoffset() is None:
        raise PeriodError(f"{what} must be an aware datetime")
    return instant.astimezone(timezone.utc)


@dataclass(frozen=True, slots=True)
class PeriodSpec:
    """Periods of ``kind`` anchored on local midnight of ``anchor``; ``days`` for CUSTOM."""

    kind: PeriodKind
    anchor: date
    days: int = 0

    def __post_init__(self) -> None:
        if self.kind is PeriodKind.CUSTOM:
            if type(self.days) is not int or not 1 <= self.days <= 3_660:
                raise PeriodError("a custom period is 1..3660 days long")
        elif self.days != 0:
            raise PeriodError("days is only for CUSTOM periods")

    def _index_estimate(self, local_day: date) -> int:
        kind = self.kind
        if kind is PeriodKind.MONTHLY:
            return (local_day.year - self.anchor.year) * 12 + local_day.month - self.anchor.month
        if kind is PeriodKind.YEARLY:
            return local_day.year - self.anchor.year
        return (local_day - self.anchor).days // self._step_days()

    def _step_days(self) -> int:
        return {PeriodKind.DAILY: 1, PeriodKind.WEEKLY: 7}.get(self.kind, self.days)

    def start_date(self, index: int) -> date:
        """Local date on whose midnight period ``index`` starts (0 = the anchor's)."""
        anchor = self.anchor
        try:
            if self.kind is PeriodKind.MONTHLY:
                year, month0 = divmod(anchor.year * 12 + anchor.month - 1 + index, 12)
                month = month0 + 1
                return date(year, month, min(anchor.day, calendar.monthrange(year, month)[1]))
            if self.kind is PeriodKind.YEARLY:
                year = anchor.year + index
                day = min(anchor.day, calendar.monthrange(year, anchor.month)[1])
                return date(year, anchor.month, day)
            return anchor + timedelta(days=index * self._step_days())
        except (ValueError, OverflowError) as exc:
            raise PeriodError(f"period {index} of {self} is outside the calendar") from exc


@dataclass(frozen=True, slots=True)
class Period:
    """A half-open ``[start, end)`` in UTC; ``index`` counts periods from the anchor."""

    start: datetime
    end: datetime
    index: int

    @property
    def seconds(self) -> int:
        return (self.end - self.start) // _ONE_SECOND


def _boundary(spec: PeriodSpec, index: int, tz: tzinfo) -> datetime:
    # A midnight that falls in a DST gap (fold=0) maps to the transition instant.
    local = datetime.combine(spec.start_date(index), time(0), tzinfo=tz)
    return local.astimezone(timezone.utc)


def period_containing(spec: PeriodSpec, instant: datetime, tz: tzinfo) -> Period:
    """The period of ``spec`` (periods start at local midnight in ``tz``) holding ``instant``."""
    instant = _utc(instant, "instant")
    index = spec._index_estimate(instant.astimezone(tz).date())
    for _ in range(4):  # the estimate is off by at most one period either way
        if _boundary(spec, index, tz) > instant:
            index -= 1
        elif _boundary(spec, index + 1, tz) <= instant:
            index += 1
        else:
            return Period(_boundary(spec, index, tz), _boundary(spec, index + 1, tz), index)
    raise InvariantViolation(f"no period of {spec} holds {instant}")  # pragma: no cover


def next_boundary(spec: PeriodSpec, instant: datetime, tz: tzinfo) -> datetime:
    """The first period boundary strictly after ``instant``."""
    return period_containing(spec, instant, tz).end


def cumulative_fee(fee: int, period: Period, instant: datetime) -> int:
    """Fee owed for ``[period.start, instant)``: floor(fee × elapsed s / period s)."""
    check_amount(fee)
    instant = min(max(_utc(instant, "instant"), period.start), period.end)
    elapsed = (instant - period.start) // _ONE_SECOND
    return floor_div(fee * elapsed, period.seconds)


def _clip_merge(period: Period, intervals: Iterable[Interval]) -> list[Interval]:
    clipped: list[Interval] = []
    for count, (start, end) in enumerate(intervals):
        if count >= MAX_INTERVALS:
            raise PeriodError(f"at most {MAX_INTERVALS} intervals per proration")
        start, end = _utc(start, "interval start"), _utc(end, "interval end")
        if end < start:
            raise PeriodError(f"interval ends before it starts: {start} > {end}")
        start, end = max(start, period.start), min(end, period.end)
        if start < end:
            clipped.append((start, end))
    clipped.sort()
    merged: list[Interval] = []
    for start, end in clipped:
        if merged and start <= merged[-1][1]:
            merged[-1] = (merged[-1][0], max(merged[-1][1], end))
        else:
            merged.append((start, end))
    return merged


def prorate(fee: int, period: Period, active_intervals: Iterable[Interval]) -> int:
    """The part of ``fee`` owed for the (clipped, merged) intervals of ``period``."""
    total = 0
    for start, end in _clip_merge(period, active_intervals):
        total += cumulative_fee(fee, period, end) - cumulative_fee(fee, period, start)
    if not min(0, fee) <= total <= max(0, fee):
        raise InvariantViolation(f"prorated {format_money(total)} outside 0..{format_money(fee)}")
    return check_amount(total)


@dataclass(frozen=True, slots=True)
class PeriodicService:
    """A service charging ``fee`` micro-units per period of ``spec``, booked per ``mode``."""

    service_id: int
    fee: int
    spec: PeriodSpec
    mode: ChargeMode

    def __post_init__(self) -> None:
        check_amount(self.fee)


@dataclass(frozen=True, slots=True)
class ServiceLink:
    """Account ``account_id`` has ``service_id`` active in ``[active_from, active_until)``."""

    account_id: int
    service_id: int
    active_from: datetime
    active_until: datetime | None = None

    def __post_init__(self) -> None:
        start = _utc(self.active_from, "active_from")
        if self.active_until is not None and _utc(self.active_until, "active_until") < start:
            raise PeriodError("a link cannot end before it starts")


@dataclass(frozen=True, slots=True)
class PeriodicKey:
    """Idempotency key of periodic charges: one cumulative amount per key."""

    account_id: int
    service_id: int
    period_start: datetime


@dataclass(frozen=True, slots=True)
class PeriodicCharge:
    """Book ``amount`` (= ``cumulative − previous``; negative is a refund) under ``key``."""

    key: PeriodicKey
    period_end: datetime
    previous: int
    cumulative: int
    amount: int


def _intervals(links: Sequence[ServiceLink], period: Period, now: datetime) -> list[Interval]:
    """Active intervals in ``period`` that have begun by ``now``; open ends run to period end."""
    out: list[Interval] = []
    for link in links:
        start = max(_utc(link.active_from, "active_from"), period.start)
        until = period.end if link.active_until is None else _utc(link.active_until, "until")
        end = min(until, period.end)
        if start < end and start <= now:
            out.append((start, end))
    return out


def period_fee(service: PeriodicService, period: Period, links: Sequence[ServiceLink]) -> int:
    """What one account's links to ``service`` owe for all of ``period``, scheduled changes included.

    Links to other services are ignored; links of several accounts are refused.
    """
    mine = [link for link in links if link.service_id == service.service_id]
    if len({link.account_id for link in mine}) > 1:
        raise PeriodError("period_fee prorates the links of one account")
    return prorate(service.fee, period, _intervals(mine, period, period.end))


def _target(
    service: PeriodicService,
    period: Period,
    links: Sequence[ServiceLink],
    now: datetime,
    tz: tzinfo,
) -> int | None:
    """What should be charged for ``period`` by ``now``; None if nothing is due yet."""
    intervals = _intervals(links, period, now)
    if service.mode is ChargeMode.START:
        return prorate(service.fee, period, intervals)
    if service.mode is ChargeMode.END:
        return prorate(service.fee, period, intervals) if now >= period.end else None
    day_end = next_boundary(PeriodSpec(PeriodKind.DAILY, _ANY_DATE), now, tz)
    horizon = min(day_end, period.end)
    return prorate(service.fee, period, [(s, min(e, horizon)) for s, e in intervals if s < horizon])


def due_charges(
    services: Mapping[int, PeriodicService],
    links: Sequence[ServiceLink],
    last_charged: Mapping[PeriodicKey, int],
    now: datetime,
    *,
    since: datetime,
    tz: tzinfo,
) -> list[PeriodicCharge]:
    """Charges due at ``now`` for periods overlapping ``[since, now]``, sorted by key.

    ``last_charged`` holds the cumulative amount already booked per key (absent
    = 0).  ``since`` is the previous run's ``now``: periods that ended before it
    were settled by earlier runs (pass an older ``since`` to re-settle them).
    """
    now, since = _utc(now, "now"), _utc(since, "since")
    if since > now:
        raise PeriodError("since must not be after now")
    grouped: dict[tuple[int, int], list[ServiceLink]] = {}
    for link in links:
        grouped.setdefault((link.account_id, link.service_id), []).append(link)
    charges: list[PeriodicCharge] = []
    for (account_id, service_id), group in sorted(grouped.items()):
        service = services.get(service_id)
        if service is None:
            raise PeriodError(f"link to unknown periodic service {service_id}")
        period = period_containing(service.spec, since, tz)
        for _ in range(MAX_PERIODS_PER_RUN):
            if period.start > now:
                break
            key = PeriodicKey(account_id, service_id, period.start)
            target = _target(service, period, group, now, tz)
            previous = check_amount(last_charged.get(key, 0))
            if target is not None and target != previous:
                charges.append(
                    PeriodicCharge(key, period.end, previous, target, target - previous)
                )
            period = period_containing(service.spec, period.end, tz)
        else:
            raise PeriodError(f"more than {MAX_PERIODS_PER_RUN} periods between since and now")
    return charges
