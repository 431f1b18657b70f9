"""What-if re-rating: a past period's usage rated again under another tariff, posting nothing.

Theory of operation
-------------------
For each selected account and each of its accounting periods that *start*
in the asked window, two figures:

* **charged** — what the ledger holds for the period: the cumulative
  ``periodic_charges`` of the service periods starting in it, the
  ``usage_counters.charged`` of its counters (each the sum of the ledger rows
  that moved the counter), and the once-off fees of tariff links that began
  in it (``once_charges`` through their link).
* **would pay** — the same three under the *candidate* tariff, computed by
  the live charging code fed with a book in which every tariff link of the
  account (same ``valid_from``/``valid_to``) points at the candidate:

  - periodic fees: the scheduler's ``_due_by_signature`` (``due_charges``
    per distinct link shape) with nothing booked, evaluated once every
    service period of interest has ended, so each target is final whatever
    the charge mode;
  - usage: the period's counters re-keyed onto the candidate's metered
    services and settled from zero by ``rating.settle`` — the booking rule
    of live rating (``Meter.charged`` of the period's total, 0 for an
    unlimited account).  A counter of class ``k`` in time range ``r`` maps to
    the candidate's ``meter_for(k, r)``, the lookup live rating does (the
    range is chosen globally, so a ranged counter is exactly the usage whose
    instant selected ``r``).  A counter in "any range" (0) holds the usage
    whose range the *original* service did not price on its own; if the
    candidate prices ``k`` in a range the original did not, that usage cannot
    be split by range: the account's row says ``cannot_rerate`` with the
    reason, never a guessed figure;
  - once-off fees: the candidate's once services for each link that began
    in the period.

So the what-if of the tariff an account was on equals what was charged, to
the micro-unit, as long as its prices were not edited after the period.

Nothing is written: the caller runs this in a READ ONLY transaction (one
snapshot, ``repeatable_read``).  Accounts go in id order in batches
(``batch_size``, keyset paging), so memory is bounded by a batch however
many accounts there are.
"""

from __future__ import annotations

from collections.abc import AsyncIterator, Mapping, Sequence
from dataclasses import dataclass, field
from datetime import date, datetime, time, timedelta, timezone, tzinfo
from typing import Any, ClassVar, Final

from billcore.common.errors import BillingError, InvariantViolation
from billcore.common.money import check_amount
from billcore.billing.periods import Period, PeriodicService, PeriodSpec, ServiceLink, period_containing
from billcore.billing.rating import (
    ANY_RANGE, TIME_CLASS, AccountPlan, CounterTuple, Meter, Resolved, ServiceKind, ServiceTariff, settle,
)
from billcore.billing.scheduler import _due_by_signature
from billcore.billing.tariffs import DEFAULT_ACCOUNT_PERIOD, load_metered, load_periodic, period_spec
from billcore.db.rows import DbConnection

__all__ = ["DEFAULT_BATCH", "MAX_MONTHS", "Selection", "Totals", "WhatIfError", "WhatIfRow", "WhatIfUnknown",
           "Window", "month_window", "rerate"]

DEFAULT_BATCH: Final = 2_000
MAX_BATCH: Final = 20_000
MAX_MONTHS: Final = 12
MAX_PERIODS: Final = 400
"""Accounting periods of one account in one what-if at most (a daily period over a year)."""
_EPSILON: Final = timedelta(microseconds=1)
# = ANY with the batch's BETWEEN bounds: an index range scan on the account, never a scan of the
# whole period (usage_counters_period) probing a 2 000-element array per row (10x slower at 100k)
_IDS: Final = "account_id BETWEEN $4 AND $5"


class WhatIfError(BillingError, ValueError):
    """A what-if that cannot be asked: a period not over yet, a bad window or selection."""

    code: ClassVar[str] = "whatif.invalid"


class WhatIfUnknown(WhatIfError, LookupError):
    """The candidate tariff, the tariff of ``of_tariff`` or the account does not exist."""

    code: ClassVar[str] = "whatif.unknown"


@dataclass(frozen=True, slots=True)
class Window:
    """Accounting periods starting in ``[since, until)``, or (``at``) the one holding ``at``."""

    since: datetime
    until: datetime
    at: bool = False

    def periods(self, spec: PeriodSpec, tz: tzinfo) -> list[Period]:
        if self.at:
            return [period_containing(spec, self.since, tz)]
        out: list[Period] = []
        period = period_containing(spec, self.since, tz)
        for _ in range(MAX_PERIODS + 1):
            if period.start >= self.until:
                return out
            if period.start >= self.since:
                out.append(period)
            period = period_containing(spec, period.end, tz)
        raise WhatIfError(f"more than {MAX_PERIODS} accounting periods in the window")


def month_window(first: str, last: str | None, tz: tzinfo) -> Window:
    """The accounting periods starting in months ``first``..``last`` ("YYYY-MM", local time)."""
    def month(text: str) -> date:
        try:
            if type(text) is not str or len(text) != 7:
                raise ValueError(text)
            return date.fromisoformat(text + "-01")
        except ValueError:
            raise WhatIfError(f"a month is YYYY-MM, got {text!r}") from None

    start = month(first)
    end = month(last) if last is not None else start
    if end < start:
        raise WhatIfError("the last month is before the first")
    after = date(end.year + end.month // 12, end.month % 12 + 1, 1)
    since = datetime.combine(start, time(0), tzinfo=tz).astimezone(timezone.utc)
    until = datetime.combine(after, time(0), tzinfo=tz).astimezone(timezone.utc)
    if (end.year - start.year) * 12 + end.month - start.month >= MAX_MONTHS:
        raise WhatIfError(f"a what-if covers at most {MAX_MONTHS} months")
    return Window(since, until)


@dataclass(frozen=True, slots=True)
class Selection:
    """Which accounts: one, those with a link to a tariff in the window, or all with a link in it."""

    account_id: int | None = None
    of_tariff: int | None = None

    def __post_init__(self) -> None:
        if self.account_id is not None and self.of_tariff is not None:
            raise WhatIfError("give account_id, of_tariff or all, one of them")


@dataclass(frozen=True, slots=True)
class WhatIfRow:
    """One account over the window's periods; ``would_pay`` None with a ``note`` when it cannot be re-rated."""

    account_id: int
    periods: int
    charged: int
    would_pay: int | None
    note: str = ""

    @property
    def difference(self) -> int | None:
        return None if self.would_pay is None else self.would_pay - self.charged


@dataclass(slots=True)
class Totals:
    """Sums over the rows; ``difference`` = ``would_pay`` − ``charged_rerated`` (re-rated accounts only)."""

    accounts: int = 0
    rerated: int = 0
    cannot_rerate: int = 0
    charged: int = 0
    charged_rerated: int = 0
    would_pay: int = 0

    def add(self, row: WhatIfRow) -> None:
        self.accounts += 1
        self.charged += row.charged
        if row.would_pay is None:
            self.cannot_rerate += 1
            return
        self.rerated += 1
        self.charged_rerated += row.charged
        self.would_pay += row.would_pay

    @property
    def difference(self) -> int:
        return self.would_pay - self.charged_rerated

    def as_dict(self) -> dict[str, int]:
        return {"accounts": self.accounts, "rerated": self.rerated, "cannot_rerate": self.cannot_rerate,
                "charged": self.charged, "charged_rerated": self.charged_rerated, "would_pay": self.would_pay,
                "difference": self.difference}


@dataclass(frozen=True, slots=True)
class _Candidate:
    tariff_id: int
    periodic: Mapping[int, PeriodicService]
    metered: Mapping[int, ServiceTariff]
    once_fee: int                      # the candidate's once-off fees, summed: per link that begins
    by_kind: Mapping[ServiceKind, tuple[ServiceTariff, ...]] = field(default_factory=dict)


async def _candidate(conn: DbConnection, tariff_id: int) -> _Candidate:
    if await conn.fetchval("SELECT 1 FROM tariffs WHERE id = $1", tariff_id) is None:
        raise WhatIfUnknown(f"tariff {tariff_id} does not exist")
    rows = await conn.fetch(
        "SELECT s.id, s.kind, s.fee FROM tariff_services ts JOIN services s ON s.id = ts.service_id"
        " WHERE ts.tariff_id = $1 ORDER BY s.id", tariff_id)
    all_periodic = await load_periodic(conn)
    periodic = {row["id"]: all_periodic[row["id"]] for row in rows if row["kind"] == "periodic"}
    metered = await load_metered(conn, [row["id"] for row in rows if row["kind"] in ("traffic", "time")])
    once_fee = sum(row["fee"] for row in rows if row["kind"] == "once")
    by_kind = {kind: tuple(s for _, s in sorted(metered.items()) if s.kind is kind) for kind in ServiceKind}
    return _Candidate(tariff_id, periodic, metered, check_amount(once_fee), by_kind)


def _ranged(service: ServiceTariff | None, klass: int) -> frozenset[int]:
    if service is None:
        return frozenset()
    return frozenset(rule.range_id for rule in service.rules if rule.klass == klass and rule.range_id != ANY_RANGE)


def _map_counter(candidate: _Candidate, original: ServiceTariff | None, klass: int, range_id: int
                 ) -> tuple[ServiceTariff, int, Meter] | str:
    """(candidate service, counter range, meter) for a counter of ``klass`` in ``range_id``, or why not."""
    kind = ServiceKind.TIME if klass == TIME_CLASS else ServiceKind.TRAFFIC
    what = "time" if kind is ServiceKind.TIME else f"class {klass}"
    services = candidate.by_kind.get(kind, ())
    if len(services) != 1:
        return f"the candidate has {'no' if not services else 'more than one'} {kind.value} service"
    service = services[0]
    if range_id == ANY_RANGE:
        # the counter holds usage of every range the original service did not price on its own
        split = _ranged(service, klass) - _ranged(original, klass)
        if split:
            return (f"the candidate prices {what} in time range(s) {sorted(split)}, which the counters"
                    " of the period do not separate")
    found = service.meter_for(klass, range_id)
    if found is None:
        return f"the candidate has no price for {what}" + (f" in time range {range_id}" if range_id else "")
    return service, found[0], found[1]


@dataclass(slots=True)
class _Account:
    plan_spec: PeriodSpec
    unlimited: bool
    blocked: bool
    periods: list[Period]
    charged: int = 0
    would_pay: int = 0
    note: str = ""

    def period_of(self, instant: datetime) -> Period | None:
        for period in self.periods:   # a handful
            if period.start <= instant < period.end:
                return period
        return None


async def _accounts(conn: DbConnection, ids: Sequence[int], window: Window, tz: tzinfo) -> dict[int, _Account]:
    rows = await conn.fetch(
        "SELECT a.id, a.unlimited, p.period_kind, p.period_days, p.period_anchor,"
        " EXISTS (SELECT 1 FROM blocks b WHERE b.account_id = a.id AND b.lifted_at IS NULL) AS blocked"
        " FROM accounts a LEFT JOIN account_periods p ON p.account_id = a.id"
        " WHERE a.id = ANY($1::bigint[]) ORDER BY a.id", list(ids))
    specs: dict[Any, tuple[PeriodSpec, list[Period]]] = {}
    out = {}
    for row in rows:
        shape = (row["period_kind"], row["period_days"], row["period_anchor"])
        known = specs.get(shape)
        if known is None:
            spec = DEFAULT_ACCOUNT_PERIOD if row["period_kind"] is None else period_spec(*shape)
            known = specs[shape] = (spec, window.periods(spec, tz))
        out[row["id"]] = _Account(known[0], row["unlimited"], row["blocked"], list(known[1]))
    return out


async def _batch(conn: DbConnection, ids: Sequence[int], candidate: _Candidate, window: Window,
                 now: datetime, tz: tzinfo) -> list[WhatIfRow]:
    accounts = await _accounts(conn, ids, window, tz)
    periods = [p for a in accounts.values() for p in a.periods]
    if not periods:
        return [WhatIfRow(i, 0, 0, 0) for i in sorted(accounts)]
    span_start = min(p.start for p in periods)
    span_end = max(p.end for p in periods)
    for acc in accounts.values():
        if any(p.end > now for p in acc.periods):
            acc.note = "period_open: the accounting period has not ended yet"
    # every service period starting in the span ends by `horizon` (or now, when later is not known yet)
    horizon = max([span_end, *(period_containing(s.spec, span_end - _EPSILON, tz).end
                               for s in candidate.periodic.values())])
    horizon = min(horizon, now)
    keyed = sorted(accounts)
    bounds = (keyed[0], keyed[-1])

    # -- charged: what the ledger holds for each period ----------------------
    for row in await conn.fetch(
            "SELECT account_id, period_start, charged FROM periodic_charges WHERE account_id = ANY($1::bigint[])"
            f" AND {_IDS} AND period_start >= $2 AND period_start < $3", keyed, span_start, span_end, *bounds):
        acc = accounts[row["account_id"]]
        if acc.period_of(row["period_start"]) is not None:
            acc.charged += row["charged"]
    counters = await conn.fetch(
        "SELECT account_id, service_id, class_id, range_id, period_start, quantity, charged FROM usage_counters"
        f" WHERE account_id = ANY($1::bigint[]) AND {_IDS} AND period_start >= $2 AND period_start < $3"
        " ORDER BY account_id, service_id, class_id, range_id, period_start", keyed, span_start, span_end, *bounds)
    for row in counters:
        acc = accounts[row["account_id"]]
        if any(p.start == row["period_start"] for p in acc.periods):
            acc.charged += row["charged"]
    for row in await conn.fetch(
            "SELECT o.account_id, o.amount, t.valid_from FROM once_charges o JOIN account_tariffs t ON t.id = o.link_id"
            " WHERE o.account_id = ANY($1::bigint[]) AND o.account_id BETWEEN $4 AND $5"
            " AND t.valid_from >= $2 AND t.valid_from < $3", keyed, span_start, span_end, *bounds):
        acc = accounts[row["account_id"]]
        if acc.period_of(row["valid_from"]) is not None:
            acc.charged += row["amount"]

    # -- would pay: the live charging code over links pointing at the candidate
    links = await conn.fetch(
        "SELECT account_id, valid_from, valid_to FROM account_tariffs WHERE account_id = ANY($1::bigint[])"
        f" AND {_IDS} AND valid_from < $3 AND (valid_to IS NULL OR valid_to > $2) ORDER BY account_id, valid_from",
        keyed, span_start, horizon, *bounds)
    service_links: list[ServiceLink] = []
    for row in links:
        acc = accounts[row["account_id"]]
        service_links.extend(ServiceLink(row["account_id"], service_id, row["valid_from"], row["valid_to"])
                             for service_id in candidate.periodic)
        if candidate.once_fee and acc.period_of(row["valid_from"]) is not None:
            acc.would_pay += candidate.once_fee
    if service_links and horizon > span_start:
        for charge in _due_by_signature(candidate.periodic, service_links, {}, horizon, span_start, tz):
            acc = accounts[charge.key.account_id]
            if acc.period_of(charge.key.period_start) is not None:
                acc.would_pay += charge.cumulative

    originals = await load_metered(conn, {row["service_id"] for row in counters})
    deltas: dict[CounterTuple, int] = {}
    meters: dict[CounterTuple, tuple[Meter, AccountPlan, ServiceKind]] = {}
    plans: dict[int, AccountPlan] = {}
    service_ids = tuple(sorted(candidate.metered))
    for row in counters:
        acc = accounts[row["account_id"]]
        if acc.note or not any(p.start == row["period_start"] for p in acc.periods) or not row["quantity"]:
            continue
        mapped = _map_counter(candidate, originals.get(row["service_id"]), row["class_id"], row["range_id"])
        if isinstance(mapped, str):
            acc.note = "cannot_rerate: " + mapped
            continue
        service, range_id, meter = mapped
        plan = plans.get(row["account_id"])
        if plan is None:
            plan = plans[row["account_id"]] = AccountPlan(row["account_id"], acc.plan_spec, service_ids,
                                                          unlimited=acc.unlimited, blocked=acc.blocked)
        key = (row["account_id"], service.service_id, row["class_id"], range_id, row["period_start"])
        deltas[key] = deltas.get(key, 0) + row["quantity"]
        meters[key] = (meter, plan, service.kind)
    for key, _, after, amount, _ in settle(Resolved(deltas, meters, ()), {}):
        if after != deltas[key]:
            raise InvariantViolation(f"what-if counter {key} settled to {after}, not {deltas[key]}")
        accounts[key[0]].would_pay += amount

    out = []
    for account_id in keyed:
        acc = accounts[account_id]
        would = None if acc.note else check_amount(acc.would_pay)
        out.append(WhatIfRow(account_id, len(acc.periods), acc.charged, would, acc.note))
    return out


async def rerate(conn: DbConnection, tariff_id: int, window: Window, selection: Selection, *,
                 now: datetime, tz: tzinfo, batch_size: int = DEFAULT_BATCH) -> AsyncIterator[list[WhatIfRow]]:
    """Rows per batch of accounts (id order), for the caller to stream; run inside a READ ONLY transaction."""
    if type(tariff_id) is not int or tariff_id < 1:
        raise WhatIfError("tariff_id must be a positive int")
    if type(batch_size) is not int or not 1 <= batch_size <= MAX_BATCH:
        raise WhatIfError(f"batch_size must be in 1..{MAX_BATCH}")
    now = now.astimezone(timezone.utc)
    if window.since >= now:
        raise WhatIfError("the period is in the future: a what-if re-rates a past period")
    if not window.at and window.until > now:
        raise WhatIfError("the window has not ended yet: a what-if re-rates past periods only")
    candidate = await _candidate(conn, tariff_id)
    if selection.account_id is not None:
        if await conn.fetchval("SELECT 1 FROM accounts WHERE id = $1", selection.account_id) is None:
            raise WhatIfUnknown(f"account {selection.account_id} does not exist")
        yield await _batch(conn, [selection.account_id], candidate, window, now, tz)
        return
    if selection.of_tariff is not None and await conn.fetchval(
            "SELECT 1 FROM tariffs WHERE id = $1", selection.of_tariff) is None:
        raise WhatIfUnknown(f"tariff {selection.of_tariff} does not exist")
    # accounts with a tariff link (to the tariff asked) in the window; for the period holding an
    # instant: a link in the day from that instant on
    lo = window.since
    hi = window.since + timedelta(days=1) if window.at else window.until
    after = 0
    while True:
        ids = [row[0] for row in await conn.fetch(
            "SELECT DISTINCT account_id FROM account_tariffs WHERE account_id > $1 AND valid_from < $3"
            " AND (valid_to IS NULL OR valid_to > $2) AND ($4::bigint IS NULL OR tariff_id = $4)"
            " ORDER BY account_id LIMIT $5", after, lo, hi, selection.of_tariff, batch_size)]
        if not ids:
            return
        rows = await _batch(conn, ids, candidate, window, now, tz)
        yield [row for row in rows if row.periods]   # no accounting period of the account starts in the window
        after = ids[-1]
