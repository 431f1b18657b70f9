"""Rating: traffic and session time in, ledger entries and new counters out.

Theory of operation
-------------------
Usage is charged on *cumulative counters*, one per ``CounterKey`` =
(account, service, traffic class, time range, accounting-period start).  A
``Meter`` turns a counter's total into the amount owed for it:

    charged(total) = floor(Σ_tiers segment_bytes × price),  segments of max(0, total − prepaid)

The sum is exact (one common denominator, one ``floor_div``).  A batch that
moves a counter from ``old`` to ``new`` charges ``charged(new) − charged(old)``.
Those differences telescope, so the charges for a period add up to
``charged(final total)`` however the traffic was cut into batches: no drift,
and ``charged`` is monotone, so no batch ever has a negative charge.

Tier borders count bytes *beyond the prepaid volume* ("the first 10 GB over
the prepaid amount at 0.50/GB, the rest at 0.30/GB").  Prepaid and tiers are
per counter, i.e. per (class, time range) rule of the tariff: a tariff whose
rule for a class has no time range (``ANY_RANGE``) shares one prepaid volume
across all time ranges.  Counters are per service, so a new tariff (a new
service link) starts with its own prepaid volume.

Resolution, done here so every caller resolves the same way:

* a ``TrafficUsage`` is assigned to the accounting period and time range of
  its timestamp ``at`` (the worker's aggregation bucket, so the bucket width is
  the time-range resolution);
* a ``SessionUsage`` (RADIUS time) is cut at accounting-period boundaries and
  time-range changes to the exact second, each piece on its own counter, with
  prices per hour (``Price(micro, HOUR)``);
* the service is ``usage.service_id`` or else the account's only linked
  service of the matching kind.

Rules (what a user notices):

* **unlimited** accounts: counters advance, the charge is 0 and no entry is
  written.  If the flag is removed mid-period, only later traffic is charged,
  but it is rated at the tier position the whole period's traffic reached.
* **blocked** accounts: usage still counts and is charged: traffic that reached
  us was delivered.  Blocking is an access decision, not a rating one.
* Usage that cannot be rated (unknown account, no matching service or rule,
  timestamp in the future) is *returned* in ``rejected``, never dropped, so the
  caller can keep it for re-rating.  Malformed input (negative bytes, naive
  datetimes) raises ``UsageError``: it is a bug upstream.
"""

from __future__ import annotations

import enum
import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from datetime import datetime, timedelta, timezone, tzinfo
from typing import Final

from billcore.common.errors import InvariantViolation, TariffError, UsageError
from billcore.common.money import MAX_QUANTITY, Price, check_amount, floor_div, format_money
from billcore.billing.periods import (
    Period,
    PeriodicService,
    ServiceLink,
    PeriodSpec,
    period_containing,
    period_fee,
)
from billcore.billing.timeranges import TimeRange, select, split

__all__ = [
    "ANY_RANGE",
    "AccountPlan",
    "CounterKey",
    "CounterTuple",
    "LedgerEntry",
    "MAX_BATCH",
    "Meter",
    "MeterRule",
    "Move",
    "Preview",
    "PreviewLine",
    "RatingBook",
    "RatingResult",
    "Rejected",
    "Resolved",
    "ServiceKind",
    "ServiceTariff",
    "SessionUsage",
    "TIME_CLASS",
    "Tier",
    "TrafficUsage",
    "preview",
    "rate",
    "resolve",
    "settle",
]

ANY_RANGE: Final = 0
"""Time-range id of a rule (and its counters) that applies in every time range."""
TIME_CLASS: Final = -1
"""Traffic-class id used by the counters of time-based services."""
MAX_TIERS: Final = 16
MAX_RULES: Final = 4_096
MAX_BATCH: Final = 1_000_000
MAX_SESSION: Final = timedelta(days=366)
CLOCK_SKEW: Final = timedelta(minutes=5)
"""Usage stamped later than ``now + CLOCK_SKEW`` is rejected as 'future'."""

_ONE_SECOND: Final = timedelta(seconds=1)


class ServiceKind(enum.Enum):
    TRAFFIC = "traffic"
    TIME = "time"


@dataclass(frozen=True, slots=True)
class Tier:
    """From ``start`` units beyond the prepaid volume on, ``price`` applies."""

    start: int
    price: Price


@dataclass(frozen=True, slots=True)
class Meter:
    """Prepaid volume plus tiered prices; ``charged(total)`` is exact and monotone."""

    prepaid: int
    tiers: tuple[Tier, ...]
    _scale: int = field(init=False, repr=False, compare=False)
    _weights: tuple[int, ...] = field(init=False, repr=False, compare=False)
    # (start, next tier's start or None, weight) per tier: charged's loop, precomputed
    _segments: tuple[tuple[int, int | None, int], ...] = field(init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        if type(self.prepaid) is not int or not 0 <= self.prepaid <= MAX_QUANTITY:
            raise TariffError(f"prepaid must be an int in 0..{MAX_QUANTITY}")
        if not 1 <= len(self.tiers) <= MAX_TIERS:
            raise TariffError(f"a meter has 1..{MAX_TIERS} tiers")
        starts = [tier.start for tier in self.tiers]
        if starts[0] != 0 or any(type(s) is not int for s in starts):
            raise TariffError("the first tier starts at 0 and borders are ints")
        if any(b <= a for a, b in zip(starts, starts[1:])):
            raise TariffError(f"tier borders must increase strictly: {starts}")
        scale = math.lcm(*(tier.price.unit_size for tier in self.tiers))
        weights = tuple(tier.price.micro_per_unit * (scale // tier.price.unit_size) for tier in self.tiers)
        object.__setattr__(self, "_scale", scale)
        object.__setattr__(self, "_weights", weights)
        ends = (*starts[1:], None)
        object.__setattr__(self, "_segments", tuple(zip(starts, ends, weights)))

    @classmethod
    def flat(cls, price: Price, prepaid: int = 0) -> Meter:
        return cls(prepaid, (Tier(0, price),))

    def charged(self, total: int) -> int:
        """Amount owed for a cumulative ``total``: floor of the exact tiered sum."""
        if type(total) is not int or not 0 <= total <= MAX_QUANTITY:
            raise UsageError(f"counter total must be an int in 0..{MAX_QUANTITY}, got {total!r}")
        billable = total - self.prepaid
        if billable <= 0:
            return 0
        numerator = 0
        for start, end, weight in self._segments:  # bounded by MAX_TIERS
            if billable <= start:
                break
            numerator += ((billable if end is None or billable < end else end) - start) * weight
        return check_amount(floor_div(numerator, self._scale))


@dataclass(frozen=True, slots=True)
class MeterRule:
    """The meter for ``klass`` in time range ``range_id`` (``ANY_RANGE``: every range)."""

    klass: int
    range_id: int
    meter: Meter


@dataclass(frozen=True, slots=True, eq=False)
class ServiceTariff:
    """A metered service: rules looked up by (class, range), then (class, ANY_RANGE)."""

    service_id: int
    kind: ServiceKind
    rules: tuple[MeterRule, ...]
    _lookup: dict[tuple[int, int], Meter] = field(init=False, repr=False)

    def __post_init__(self) -> None:
        if len(self.rules) > MAX_RULES:
            raise TariffError(f"at most {MAX_RULES} rules per service")
        lookup: dict[tuple[int, int], Meter] = {}
        for rule in self.rules:
            if self.kind is ServiceKind.TIME and rule.klass != TIME_CLASS:
                raise TariffError("rules of a time service use klass=TIME_CLASS")
            if (rule.klass, rule.range_id) in lookup:
                raise TariffError(f"duplicate rule for {(rule.klass, rule.range_id)}")
            lookup[(rule.klass, rule.range_id)] = rule.meter
        object.__setattr__(self, "_lookup", lookup)

    def meter_for(self, klass: int, range_id: int) -> tuple[int, Meter] | None:
        """(counter range id, meter) for usage of ``klass`` in ``range_id``, or None."""
        meter = self._lookup.get((klass, range_id))
        if meter is not None:
            return range_id, meter
        meter = self._lookup.get((klass, ANY_RANGE))
        return None if meter is None else (ANY_RANGE, meter)


@dataclass(frozen=True, slots=True)
class AccountPlan:
    """What rating needs of an account: its accounting period, services and flags."""

    account_id: int
    period: PeriodSpec
    service_ids: tuple[int, ...]
    unlimited: bool = False
    blocked: bool = False


@dataclass(frozen=True, slots=True, eq=False)
class RatingBook:
    """The tariffs side of rating: zone, time ranges, metered services, accounts."""

    tz: tzinfo
    timeranges: tuple[TimeRange, ...]
    services: Mapping[int, ServiceTariff]
    accounts: Mapping[int, AccountPlan]


@dataclass(frozen=True, slots=True)
class TrafficUsage:
    """``bytes`` of class ``klass`` for an account, stamped ``at`` (its bucket start)."""

    account_id: int
    klass: int
    at: datetime
    bytes: int
    service_id: int | None = None


@dataclass(frozen=True, slots=True)
class SessionUsage:
    """``seconds`` of session time from ``start`` (whole seconds) for an account."""

    account_id: int
    start: datetime
    seconds: int
    service_id: int | None = None


Usage = TrafficUsage | SessionUsage


@dataclass(frozen=True, slots=True)
class CounterKey:
    """One cumulative counter (bytes or seconds)."""

    account_id: int
    service_id: int
    klass: int
    range_id: int
    period_start: datetime


@dataclass(frozen=True, slots=True)
class LedgerEntry:
    """A charge of ``amount`` micro-units (> 0), moving ``key`` from before to after.

    (key, counter_before) is the idempotency reference: the booking side stores
    ``counter_after`` with a compare-and-set on ``counter_before``.
    """

    account_id: int
    amount: int
    kind: ServiceKind
    key: CounterKey
    counter_before: int
    counter_after: int


@dataclass(frozen=True, slots=True)
class Rejected:
    usage: Usage
    reason: str


@dataclass(frozen=True, slots=True)
class RatingResult:
    """Entries to book, new values of every touched counter, usage that was not rated."""

    entries: tuple[LedgerEntry, ...]
    counters: Mapping[CounterKey, int]
    rejected: tuple[Rejected, ...]

    @property
    def total(self) -> int:
        return sum(entry.amount for entry in self.entries)


def _aware_utc(instant: datetime, what: str) -> datetime:
    if not isinstance(instant, datetime) or instant.utcoffset() is None:
        raise UsageError(f"{what} must be an aware datetime")
    return instant.astimezone(timezone.utc)


def _check_quantity(value: int, what: str) -> int:
    if type(value) is not int or not 0 <= value <= MAX_QUANTITY:
        raise UsageError(f"{what} must be an int in 0..{MAX_QUANTITY}, got {value!r}")
    return value


CounterTuple = tuple[int, int, int, int, datetime]
"""A ``CounterKey``'s fields as a plain tuple: C-level hash, eq and order (key
order is the counters' lock order), for the hot loops."""


class _Resolver:
    """Per-call caches of the pure lookups that rating repeats for every aggregate.

    A batch has few distinct bucket timestamps and each account many
    aggregates, so resolving once per distinct input is most of the speed.
    Periods are cached by the spec's identity: equal specs that are distinct
    objects only miss the cache, they never share a wrong entry.
    """

    def __init__(self, book: RatingBook) -> None:
        self.book = book
        self._periods: dict[tuple[int, datetime], Period] = {}
        self._instants: dict[datetime, tuple[datetime, int]] = {}
        self._routes: dict[tuple[int, int | None, bool], tuple[AccountPlan, ServiceTariff] | str] = {}

    def period(self, spec: PeriodSpec, at: datetime) -> Period:
        found = self._periods.get((id(spec), at))
        if found is None:
            found = period_containing(spec, at, self.book.tz)
            self._periods[(id(spec), at)] = found
        return found

    def instant(self, at: datetime) -> tuple[datetime, int]:
        """(UTC instant, selected range id or ANY_RANGE) of a usage timestamp."""
        found = self._instants.get(at)
        if found is None:
            utc = _aware_utc(at, "at")
            chosen = select(self.book.timeranges, utc, self.book.tz)
            found = (utc, ANY_RANGE if chosen is None else chosen.range_id)
            self._instants[at] = found
        return found

    def route(
        self, account_id: int, wanted: int | None, kind: ServiceKind
    ) -> tuple[AccountPlan, ServiceTariff] | str:
        """The account's plan and metered service for usage of ``kind``, or a reject reason."""
        cache_key = (account_id, wanted, kind is ServiceKind.TRAFFIC)  # Enum.__hash__ is slow
        found = self._routes.get(cache_key)
        if found is None:
            found = self._route(account_id, wanted, kind)
            self._routes[cache_key] = found
        return found

    def _route(
        self, account_id: int, wanted: int | None, kind: ServiceKind
    ) -> tuple[AccountPlan, ServiceTariff] | str:
        plan = self.book.accounts.get(account_id)
        if plan is None:
            return "unknown_account"
        services = self.book.services
        if wanted is not None:
            tariff = services.get(wanted)
            if tariff is None or wanted not in plan.service_ids or tariff.kind is not kind:
                return "no_service"
            return plan, tariff
        matches = [services[service_id] for service_id in plan.service_ids
                   if service_id in services and services[service_id].kind is kind]
        if len(matches) != 1:
            return "no_service" if not matches else "ambiguous_service"
        return plan, matches[0]


def _session_pieces(
    usage: SessionUsage, plan: AccountPlan, tariff: ServiceTariff, resolver: _Resolver
) -> list[tuple[CounterTuple, int, Meter]] | str:
    start = usage.start.astimezone(timezone.utc)
    end = start + timedelta(seconds=usage.seconds)
    pieces: list[tuple[CounterTuple, int, Meter]] = []
    cursor = start
    for _ in range(MAX_SESSION.days + 2):  # at most one accounting period per day
        if cursor >= end:
            break
        period = resolver.period(plan.period, cursor)
        piece_end = min(period.end, end)
        for piece in split(resolver.book.timeranges, cursor, piece_end, resolver.book.tz):
            found = tariff.meter_for(TIME_CLASS, piece.range_id)
            if found is None:
                return "no_rate"
            key = (plan.account_id, tariff.service_id, TIME_CLASS, found[0], period.start)
            pieces.append((key, piece.seconds, found[1]))
        cursor = piece_end
    if sum(seconds for _, seconds, _ in pieces) != usage.seconds:
        raise InvariantViolation("session pieces do not add up to the session")
    return pieces


@dataclass(frozen=True, slots=True, eq=False)
class Resolved:
    """A batch resolved to the counters it moves, before their values are known.

    ``deltas`` maps each counter the batch touches (its ``CounterTuple``) to
    the quantity the batch adds, in order of first appearance.  ``rate`` is
    ``resolve`` then the booking half; the database path (``usage``) resolves
    once, locks exactly ``sorted(deltas)`` and ``settle``s against what it
    read, instead of rating twice.
    """

    deltas: Mapping[CounterTuple, int]
    meters: Mapping[CounterTuple, tuple[Meter, AccountPlan, ServiceKind]]
    rejected: tuple[Rejected, ...]


def rate(
    batch: Sequence[Usage],
    counters: Mapping[CounterKey, int],
    tariffs: RatingBook,
    now: datetime,
) -> RatingResult:
    """Rate ``batch`` against the current ``counters`` (absent key = 0) at ``now``."""
    resolved = resolve(batch, tariffs, now)
    entries: list[LedgerEntry] = []
    new_counters: dict[CounterKey, int] = {}
    meters = resolved.meters
    for raw_key, delta in resolved.deltas.items():
        meter, plan, kind = meters[raw_key]
        key = CounterKey(*raw_key)
        before = counters.get(key, 0)
        after, amount = _move(meter, plan, before, delta, key)
        new_counters[key] = after
        if amount:
            entries.append(LedgerEntry(key.account_id, amount, kind, key, before, after))
    return RatingResult(tuple(entries), new_counters, resolved.rejected)


Move = tuple[CounterTuple, int, int, int, ServiceKind]
"""(key, before, after, amount, kind) of one counter: ``settle``'s rows."""


def settle(resolved: Resolved, counters: Mapping[CounterTuple, int]) -> list[Move]:
    """``rate``'s booking half over plain keys, for the database path.

    One ``Move`` per counter of ``resolved.deltas``, in its order, against
    ``counters`` (absent key = 0): ``amount`` is what ``rate`` books as the
    counter's ``LedgerEntry`` (0: no entry), ``after`` its new value.  No
    ``CounterKey``/``LedgerEntry`` objects: this runs per usage batch.
    """
    meters = resolved.meters
    moves: list[Move] = []
    for key, delta in resolved.deltas.items():
        meter, plan, kind = meters[key]
        before = counters.get(key, 0)
        after, amount = _move(meter, plan, before, delta, key)
        moves.append((key, before, after, amount, kind))
    return moves


def _move(meter: Meter, plan: AccountPlan, before: int, delta: int, key: object) -> tuple[int, int]:
    """(after, amount owed) of a counter moving from ``before`` by ``delta``: the one booking rule."""
    _check_quantity(before, "counter")
    after = _check_quantity(before + delta, "counter after usage")
    if plan.unlimited:
        return after, 0
    amount = meter.charged(after) - meter.charged(before)
    if amount < 0:
        raise InvariantViolation(f"negative charge {format_money(amount)} for {key}")
    return after, check_amount(amount)


def resolve(batch: Sequence[Usage], tariffs: RatingBook, now: datetime) -> Resolved:
    """Which counters ``batch`` moves at ``now``, by how much, and what cannot be rated."""
    now = _aware_utc(now, "now")
    if len(batch) > MAX_BATCH:
        raise UsageError(f"at most {MAX_BATCH} usage records per batch")
    resolver = _Resolver(tariffs)
    # Keyed by plain tuples (C-level hash and eq); CounterKeys are built once per key.
    deltas: dict[CounterTuple, int] = {}
    meters: dict[CounterTuple, tuple[Meter, AccountPlan, ServiceKind]] = {}
    rejected: list[Rejected] = []
    latest = now + CLOCK_SKEW
    traffic, time = ServiceKind.TRAFFIC, ServiceKind.TIME
    instants, routes = resolver._instants, resolver._routes
    for usage in batch:
        if isinstance(usage, TrafficUsage):
            quantity = usage.bytes
            if type(quantity) is not int or not 0 <= quantity <= MAX_QUANTITY:
                _check_quantity(quantity, "bytes")  # raises with the message
            # the resolver's caches, inlined: this branch runs once per aggregate
            instant = instants.get(usage.at)
            at, range_id = instant if instant is not None else resolver.instant(usage.at)
            route = routes.get((usage.account_id, usage.service_id, True))
            if route is None:
                route = resolver.route(usage.account_id, usage.service_id, traffic)
            if isinstance(route, str) or at > latest:
                rejected.append(Rejected(usage, route if isinstance(route, str) else "future"))
                continue
            plan, tariff = route
            found = tariff.meter_for(usage.klass, range_id)
            if found is None:
                rejected.append(Rejected(usage, "no_rate"))
                continue
            period = resolver.period(plan.period, at)
            key = (plan.account_id, tariff.service_id, usage.klass, found[0], period.start)
            total = deltas.get(key)
            if total is None:
                deltas[key] = quantity
                meters[key] = (found[1], plan, tariff.kind)
            else:
                deltas[key] = total + quantity
            continue
        if not isinstance(usage, SessionUsage):
            raise UsageError(f"not a usage record: {type(usage).__name__}")
        quantity = _check_quantity(usage.seconds, "seconds")
        start = _aware_utc(usage.start, "start")
        if start.microsecond or timedelta(seconds=quantity) > MAX_SESSION:
            raise UsageError("a session piece starts on a whole second and is at most a year")
        route = resolver.route(usage.account_id, usage.service_id, time)
        if isinstance(route, str) or start + timedelta(seconds=quantity) > latest:
            rejected.append(Rejected(usage, route if isinstance(route, str) else "future"))
            continue
        plan, tariff = route
        pieces = _session_pieces(usage, plan, tariff, resolver)
        if isinstance(pieces, str):
            rejected.append(Rejected(usage, pieces))
            continue
        for key, amount, meter in pieces:
            total = deltas.get(key)
            if total is None:
                deltas[key] = amount
                meters[key] = (meter, plan, tariff.kind)
            else:
                deltas[key] = total + amount
    return Resolved(deltas, meters, tuple(rejected))


@dataclass(frozen=True, slots=True)
class PreviewLine:
    """One line of a period preview: a counter's charge or a periodic fee."""

    service_id: int
    kind: str  # "traffic", "time" or "periodic"
    klass: int | None
    range_id: int | None
    quantity: int
    amount: int


@dataclass(frozen=True, slots=True)
class Preview:
    """What the account owes for the accounting period holding ``now``."""

    account_id: int
    period: Period
    lines: tuple[PreviewLine, ...]
    total: int


def preview(
    account_id: int,
    book: RatingBook,
    counters: Mapping[CounterKey, int],
    periodic: Mapping[int, PeriodicService],
    links: Sequence[ServiceLink],
    now: datetime,
) -> Preview:
    """Usage so far this period (at current tariffs) plus the period's periodic fees.

    Metered lines rate the period's counters as they stand; periodic lines are
    each service's fee for its period holding ``now``, prorated over the known
    links (open links run to the period end, scheduled changes included).
    Unlimited accounts show their usage with amount 0.
    """
    now = _aware_utc(now, "now")
    plan = book.accounts.get(account_id)
    if plan is None:
        raise UsageError(f"unknown account {account_id}")
    period = period_containing(plan.period, now, book.tz)
    lines: list[PreviewLine] = []
    for key, total in counters.items():
        if key.account_id != account_id or key.period_start != period.start:
            continue
        tariff = book.services.get(key.service_id)
        found = None if tariff is None else tariff.meter_for(key.klass, key.range_id)
        if tariff is None or found is None:
            raise UsageError(f"counter {key} has no rule in the current tariffs")
        amount = 0 if plan.unlimited else found[1].charged(_check_quantity(total, "counter"))
        is_time = tariff.kind is ServiceKind.TIME
        lines.append(PreviewLine(key.service_id, tariff.kind.value, None if is_time else key.klass,
                                 key.range_id, total, amount))
    mine: dict[int, list[ServiceLink]] = {}
    for link in links:
        if link.account_id == account_id and link.service_id in periodic:
            mine.setdefault(link.service_id, []).append(link)
    for service_id, service_links in sorted(mine.items()):
        service = periodic[service_id]
        service_period = period_containing(service.spec, now, book.tz)
        amount = period_fee(service, service_period, service_links)
        lines.append(PreviewLine(service_id, "periodic", None, None, service_period.seconds, amount))
    total = check_amount(sum(line.amount for line in lines))
    return Preview(account_id, period, tuple(lines), total)

