"""Periodic charge runs: fees at period boundaries, once-off fees, period close.

Theory of operation
-------------------
``run_due(pool, now)`` is called by the core's timer (and by tests with a
moved clock).  A run settles every account with a tariff link that overlaps
``[since, now]``, where ``since`` is the previous *finished* run's ``now``
(``periodic_runs``; the first run ever uses ``now``).  Accounts go in id
order, ``batch_size`` per transaction.  Each transaction:

1. locks the batch's accounts (id order), then loads their service links
   and the cumulative amounts already booked per (account, service,
   period) from ``periodic_charges``, locked;
2. computes the charges due with the pure ``periods.due_charges`` (exact
   proration by seconds: a tariff change mid-period is old part + new part);
3. books them through the ledger's ``post_charges`` (one row per charge;
   a negative ``amount`` there is a charge, a refund is positive), which
   applies automatic blocks in a constant number of statements, and stores
   the new cumulative amounts (``revision`` + 1, part of the ledger key;
   new keys inserted, booked ones compare-and-set);
4. books once-off services whose link has started (``once_charges``);
5. closes the accounting periods of the batch's accounts that ended in
   ``(since, now]`` with one ``period_summaries`` row each.

With ``charged_events`` each batch enqueues one ``account.charged``
outbox event per ledger row it booked, inside its own transaction (the core
passes it only while a plugin hook listens: a million-account run writes no
million events nobody reads).  After each commit an optional ``on_charges``
callback gets the same rows as ``ChargeBooked`` values; both are built only
when asked for.  The distinct periods closed are in
``RunResult.closed_periods``, and the transaction that records the finished
run enqueues one ``period.closed`` per period (its dedup key makes a period
closed once, also when an interrupted run is finished by the next).

Idempotency: everything a batch books is keyed — (account, service,
period) with a compare-and-set through the locked ``periodic_charges`` row,
(account, service, link) for once-off fees, (account, period) for
summaries.  A core that dies between batches has committed whole batches
only; the next ``run_due`` with the same or a later ``now`` recomputes
the targets, finds the finished accounts settled, and books the rest.
``since`` only moves when a run finishes, so nothing is skipped.

Clock steps: a run never computes with an earlier ``now`` than any run
before it, finished (``periodic_runs.last_now``) or not (``periodic_clock``,
recorded as a run starts).  A wall clock stepped back would
otherwise make cumulative targets smaller (a refund, charged again once the
clock is past the old time); clamped, a run behind the last one books
nothing new and refunds nothing (``RunResult.clock_behind`` says by how much
``now`` was behind).  A forward step charges what is due at the stepped time,
once; when it is corrected, the clamp keeps those charges.  Periods between
two runs are walked from ``since``, so a step never skips one.

Most accounts of one tariff have identical link shapes, so the batch
computes ``due_charges`` once per distinct (service, link intervals,
amounts already booked) signature and copies the result to each account:
the pure function does not depend on the account id.
"""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable, Mapping, Sequence
from dataclasses import dataclass
from datetime import datetime, timezone, tzinfo
from typing import Any, Final

import asyncpg

from billcore.common.errors import InvariantViolation, PeriodError
from billcore.billing.ledger import Entry, Posted, post_charges
from billcore.billing.outbox import OutboxEvent, enqueue
from billcore.common.money import MAX_AMOUNT
from billcore.billing.periods import (
    PeriodicCharge, PeriodicKey, PeriodicService, ServiceLink, due_charges, period_containing,
)
from billcore.billing.tariffs import DEFAULT_ACCOUNT_PERIOD, load_links, load_periodic, period_spec
from billcore.db.rows import DbConnection

__all__ = ["DEFAULT_BATCH", "MAX_BATCH", "ChargeBooked", "RunProgress", "RunResult", "run_due"]

DEFAULT_BATCH: Final = 5_000
MAX_BATCH: Final = 50_000
MAX_ACCOUNTS: Final = 100_000_000
_ACTOR: Final = "periodic"


@dataclass(frozen=True, slots=True)
class RunProgress:
    """Reported after every committed batch."""

    accounts_done: int
    accounts_total: int
    batches: int
    charges: int
    amount: int           # net micro-units charged so far (refunds subtract)


@dataclass(frozen=True, slots=True)
class ChargeBooked:
    """One ledger row a run booked, as the ``account.charged`` hook reports it."""

    account_id: int
    amount: int           # positive: charged; negative: a refund
    balance: int          # the account's balance just after this row
    reason: str


@dataclass(frozen=True, slots=True)
class RunResult:
    since: datetime
    now: datetime
    accounts: int
    batches: int
    charges: int
    amount: int
    once_charges: int
    periods_closed: int
    block_changes: tuple[Any, ...]
    closed_periods: tuple[tuple[datetime, datetime], ...] = ()   # distinct (start, end), sorted
    clock_behind: float = 0.0     # seconds the given ``now`` was behind the last run's (a clock stepped back)


def _utc(value: datetime, what: str) -> datetime:
    if not isinstance(value, datetime) or value.utcoffset() is None:
        raise PeriodError(f"{what} must be an aware datetime")
    return value.astimezone(timezone.utc)


def periodic_key(charge: PeriodicCharge, revision: int) -> str:
    k = charge.key
    return _periodic_key(k.account_id, k.service_id, int(k.period_start.timestamp()), revision)


def _periodic_key(account_id: int, service_id: int, period_start_ts: int, revision: int) -> str:
    return f"periodic:{account_id}:{service_id}:{period_start_ts}:r{revision}"


def _due_by_signature(services: Mapping[int, PeriodicService], links: Sequence[ServiceLink],
                      booked: Mapping[PeriodicKey, int], now: datetime, since: datetime,
                      tz: tzinfo) -> list[PeriodicCharge]:
    """``due_charges`` over many accounts, computed once per distinct link shape."""
    groups: dict[tuple[int, int], list[ServiceLink]] = {}
    for link in links:
        groups.setdefault((link.account_id, link.service_id), []).append(link)
    by_account_service: dict[tuple[int, int], dict[datetime, int]] = {}
    for key, amount in booked.items():
        by_account_service.setdefault((key.account_id, key.service_id), {})[key.period_start] = amount
    memo: dict[tuple[Any, ...], list[PeriodicCharge]] = {}
    out: list[PeriodicCharge] = []
    for (account_id, service_id), group in sorted(groups.items()):
        done = by_account_service.get((account_id, service_id), {})
        signature = (service_id, tuple((link.active_from, link.active_until) for link in group),
                     tuple(sorted(done.items())) if done else ())
        template = memo.get(signature)
        if template is None:
            shape = [ServiceLink(0, service_id, link.active_from, link.active_until) for link in group]
            last = {PeriodicKey(0, service_id, start): amount for start, amount in done.items()}
            template = due_charges(services, shape, last, now, since=since, tz=tz)
            memo[signature] = template
        for charge in template:
            out.append(PeriodicCharge(PeriodicKey(account_id, service_id, charge.key.period_start),
                                      charge.period_end, charge.previous, charge.cumulative, charge.amount))
    return out


async def _run_state(conn: DbConnection, name: str) -> datetime | None:
    last_now: datetime | None = await conn.fetchval("SELECT last_now FROM periodic_runs WHERE name = $1", name)
    return last_now


@dataclass(slots=True)
class _BatchResult:
    charges: int
    amount: int
    once: int
    closed: int
    block_changes: tuple[Any, ...]
    closed_periods: set[tuple[datetime, datetime]]
    booked: list[ChargeBooked] | None   # only when the run reports charges


def _booked(entries: Sequence[Entry], posted: Sequence[Posted]) -> list[ChargeBooked]:
    if len(entries) != len(posted):
        raise InvariantViolation("periodic batch: posted rows do not match the entries")
    out = []
    for e, p in zip(entries, posted):
        if (p.idem_key, p.account_id, p.amount) != (e.idem_key, e.account_id, e.amount):
            raise InvariantViolation(f"periodic batch: posted row {p.idem_key!r} is not its entry's")
        what = "periodic" if e.kind == "periodic" else "once"
        out.append(ChargeBooked(p.account_id, -p.amount, p.balance_after, f"{what}: {e.reference}"))
    return out


async def _batch(conn: DbConnection, accounts: list[int], services: Mapping[int, PeriodicService],
                 since: datetime, now: datetime, horizon: datetime, tz: tzinfo, *, report: bool,
                 events: bool = False) -> _BatchResult:
    """One transaction's work."""
    # Lock the batch's accounts first, in id order, as every writer does.  The
    # foreign-key checks of the rows written below then find the lock already
    # held instead of taking a KEY SHARE lock per row that post_charges
    # upgrades a moment later.  No rows come back: post_charges reads them.
    ids = sorted(set(accounts))
    status = await conn.execute(
        "SELECT id FROM accounts WHERE id = ANY($1::bigint[]) AND id BETWEEN $2 AND $3"
        " ORDER BY id FOR UPDATE", ids, ids[0], ids[-1])
    if status != f"SELECT {len(ids)}":
        raise InvariantViolation(f"periodic batch: locked {status}, expected {len(ids)} accounts")
    links = await load_links(conn, accounts, horizon, now, kinds=("periodic",))
    rows = await conn.fetch(
        "SELECT account_id, service_id, period_start, charged, revision FROM periodic_charges"
        " WHERE account_id = ANY($1::bigint[]) AND period_start >= $2"
        " ORDER BY account_id, service_id, period_start FOR UPDATE", accounts, horizon)
    keys = [PeriodicKey(row["account_id"], row["service_id"], row["period_start"]) for row in rows]
    booked = {key: row["charged"] for key, row in zip(keys, rows)}
    revisions = {key: row["revision"] for key, row in zip(keys, rows)}
    charges = _due_by_signature(services, links, booked, now, since, tz)

    entries: list[Entry] = []
    references: dict[tuple[int, datetime], tuple[str, int]] = {}   # a few distinct per batch
    for charge in charges:
        if charge.previous != booked.get(charge.key, 0) or charge.cumulative - charge.previous != charge.amount:
            raise InvariantViolation(f"periodic charge {charge} does not continue the booked amount")
        if not 0 <= charge.cumulative <= MAX_AMOUNT:
            raise InvariantViolation(f"cumulative periodic amount {charge.cumulative} out of range")
        revision = revisions.get(charge.key, 0) + 1
        k = charge.key
        ref = references.get((k.service_id, k.period_start))
        if ref is None:
            ref = (f"service {k.service_id} period {k.period_start.isoformat()}", int(k.period_start.timestamp()))
            references[(k.service_id, k.period_start)] = ref
        entries.append(Entry(k.account_id, -charge.amount, "periodic",
                             _periodic_key(k.account_id, k.service_id, ref[1], revision), reference=ref[0]))
    # New keys are a plain INSERT (no speculative insertion per row); keys we
    # hold locked since the SELECT above are an UPDATE that checks the old
    # amount and revision (compare-and-set).  A key that appeared in between
    # can only come from a second run racing this one: refused, nothing booked.
    new = [charge for charge in charges if charge.key not in revisions]
    old = [charge for charge in charges if charge.key in revisions]
    if new:
        try:
            status = await conn.execute(
                "INSERT INTO periodic_charges(account_id, service_id, period_start, period_end,"
                " charged, revision, updated_at)"
                " SELECT a, s, ps, pe, c, 1, $6 FROM unnest($1::bigint[], $2::bigint[], $3::timestamptz[],"
                " $4::timestamptz[], $5::bigint[]) AS t(a, s, ps, pe, c)",
                [charge.key.account_id for charge in new], [charge.key.service_id for charge in new],
                [charge.key.period_start for charge in new], [charge.period_end for charge in new],
                [charge.cumulative for charge in new], now)
        except asyncpg.UniqueViolationError as exc:
            raise InvariantViolation(f"periodic charges booked by another run at once: {exc}") from None
        if status != f"INSERT 0 {len(new)}":
            raise InvariantViolation(f"periodic_charges wrote {status}, expected {len(new)} rows")
    if old:
        status = await conn.execute(
            "UPDATE periodic_charges p SET charged = t.c, revision = p.revision + 1, updated_at = $7"
            " FROM unnest($1::bigint[], $2::bigint[], $3::timestamptz[], $4::bigint[], $5::bigint[],"
            " $6::int[]) AS t(a, s, ps, c, was, rev)"
            " WHERE p.account_id = t.a AND p.service_id = t.s AND p.period_start = t.ps"
            " AND p.charged = t.was AND p.revision = t.rev",
            [charge.key.account_id for charge in old], [charge.key.service_id for charge in old],
            [charge.key.period_start for charge in old], [charge.cumulative for charge in old],
            [charge.previous for charge in old], [revisions[charge.key] for charge in old], now)
        if status != f"UPDATE {len(old)}":
            raise InvariantViolation(f"periodic_charges updated {status}, expected {len(old)} rows")

    once = await conn.fetch(
        "INSERT INTO once_charges(account_id, service_id, link_id, amount, charged_at)"
        " SELECT t.account_id, s.id, t.id, s.fee, $2 FROM account_tariffs t"
        " JOIN tariff_services ts ON ts.tariff_id = t.tariff_id"
        " JOIN services s ON s.id = ts.service_id AND s.kind = 'once' AND s.fee > 0"
        " WHERE t.account_id = ANY($1::bigint[]) AND t.valid_from <= $2"
        " ORDER BY t.account_id, s.id, t.id"
        " ON CONFLICT DO NOTHING RETURNING account_id, service_id, link_id, amount", accounts, now)
    for row in once:
        entries.append(Entry(row["account_id"], -row["amount"], "charge",
                             f"once:{row['account_id']}:{row['service_id']}:{row['link_id']}",
                             reference=f"service {row['service_id']}"))

    changes: tuple[Any, ...] = ()
    booked_now: list[ChargeBooked] | None = [] if report else None
    if entries:
        posted = await post_charges(conn, entries, actor=_ACTOR, now=now)
        if posted.skipped:
            raise InvariantViolation(f"periodic keys already booked: {posted.skipped[:3]}")
        changes = tuple(posted.block_changes)
        if report or events:
            booked_now = _booked(entries, posted.posted)
        if events and booked_now:
            await enqueue(conn, [OutboxEvent("account.charged", {
                "account_id": c.account_id, "amount": c.amount, "balance": c.balance, "reason": c.reason},
                c.account_id) for c in booked_now], now)
    closed, periods = await _close_periods(conn, accounts, since, now, tz)
    amount = sum(charge.amount for charge in charges) + sum(row["amount"] for row in once)
    return _BatchResult(len(charges), amount, len(once), closed, changes, periods, booked_now)


async def _close_periods(conn: DbConnection, accounts: list[int], since: datetime,
                         now: datetime, tz: tzinfo) -> tuple[int, set[tuple[datetime, datetime]]]:
    """Summaries for the accounting periods that ended in ``(since, now]``.

    Returns the rows written and the distinct periods that ended (written
    now or by an earlier, interrupted run).
    """
    # One row per distinct period spec (most accounts share the default),
    # carrying its accounts as an array: no record per account.
    rows = await conn.fetch(
        "SELECT p.period_kind, p.period_days, p.period_anchor, array_agg(a.id ORDER BY a.id) AS ids"
        " FROM accounts a LEFT JOIN account_periods p ON p.account_id = a.id"
        " WHERE a.id = ANY($1::bigint[]) GROUP BY 1, 2, 3", accounts)
    if sum(len(row["ids"]) for row in rows) != len(set(accounts)):
        raise InvariantViolation("period close: accounts and their period specs do not match")
    cache: dict[Any, list[tuple[datetime, datetime]]] = {}
    periods: set[tuple[datetime, datetime]] = set()
    ids, starts, ends = [], [], []
    for row in rows:
        spec = DEFAULT_ACCOUNT_PERIOD if row["period_kind"] is None else period_spec(
            row["period_kind"], row["period_days"], row["period_anchor"])
        ended = cache.get(spec)
        if ended is None:
            ended = []
            period = period_containing(spec, since, tz)
            for _ in range(1_000):  # bounded like due_charges
                if period.end > now:
                    break
                if period.end > since:
                    ended.append((period.start, period.end))
                period = period_containing(spec, period.end, tz)
            cache[spec] = ended
        periods.update(ended)
        for start, end in ended:
            ids.extend(row["ids"])
            starts.extend([start] * len(row["ids"]))
            ends.extend([end] * len(row["ids"]))
    if not ids:
        return 0, periods
    status = await conn.execute(
        "INSERT INTO period_summaries(account_id, period_start, period_end, traffic_bytes,"
        " session_seconds, usage_amount, periodic_amount, closed_at)"
        " SELECT k.a, k.s, k.e,"
        " coalesce((SELECT sum(quantity) FROM usage_counters c WHERE c.account_id = k.a"
        "   AND c.period_start = k.s AND c.class_id <> -1), 0),"
        " coalesce((SELECT sum(quantity) FROM usage_counters c WHERE c.account_id = k.a"
        "   AND c.period_start = k.s AND c.class_id = -1), 0),"
        " coalesce((SELECT sum(charged) FROM usage_counters c WHERE c.account_id = k.a"
        "   AND c.period_start = k.s), 0),"
        " coalesce((SELECT sum(charged) FROM periodic_charges c WHERE c.account_id = k.a"
        "   AND c.period_start >= k.s AND c.period_start < k.e), 0), $4"
        " FROM unnest($1::bigint[], $2::timestamptz[], $3::timestamptz[]) AS k(a, s, e)"
        " ON CONFLICT DO NOTHING", ids, starts, ends, now)
    return int(status.split()[-1]), periods


async def run_due(pool: asyncpg.Pool, now: datetime, *, tz: tzinfo = timezone.utc,
                  batch_size: int = DEFAULT_BATCH, workers: int = 1, name: str = "periodic",
                  progress: Callable[[RunProgress], None] | None = None,
                  on_charges: Callable[[list[ChargeBooked]], Awaitable[None]] | None = None,
                  charged_events: bool = False) -> RunResult:
    """Charge everything due at ``now``; safe to call again after a crash at any point.

    ``workers`` batches run at once, each on its own pooled connection (their
    account sets are disjoint, and every writer locks accounts in id order).
    ``progress`` is called after each committed batch; an exception it raises
    stops the run there (committed batches stay; the next call finishes).
    ``on_charges`` is awaited after each committed batch that booked
    something, with its ledger rows in booking order; an exception it raises
    stops the run the same way.
    """
    wall = now = _utc(now, "now")
    if type(batch_size) is not int or not 1 <= batch_size <= MAX_BATCH:
        raise PeriodError(f"batch_size must be in 1..{MAX_BATCH}")
    if type(workers) is not int or not 1 <= workers <= 16:
        raise PeriodError("workers must be in 1..16")
    async with pool.acquire() as conn:
        last = await _run_state(conn, name)
        # a clock stepped back: nothing due is earlier than what any run (finished or not) settled
        high = await conn.fetchval(
            "INSERT INTO periodic_clock AS c (name, high_now) VALUES ($1, $2) ON CONFLICT (name) DO UPDATE"
            " SET high_now = greatest(c.high_now, EXCLUDED.high_now) RETURNING high_now", name, now)
        now = max(now, high, last or high)
        since = now if last is None else last
        services = await load_periodic(conn)
        # links are needed from the start of the earliest period holding `since`
        horizon = min((period_containing(s.spec, since, tz).start for s in services.values()),
                      default=since)
        horizon = min(horizon, period_containing(DEFAULT_ACCOUNT_PERIOD, since, tz).start)
        total = int(await conn.fetchval(
            "SELECT count(DISTINCT account_id) FROM account_tariffs"
            " WHERE valid_from <= $2 AND (valid_to IS NULL OR valid_to > $1)", horizon, now))
        if total > MAX_ACCOUNTS:
            raise PeriodError(f"more than {MAX_ACCOUNTS} accounts in one run")
        tally = {"done": 0, "batches": 0, "charges": 0, "amount": 0, "once": 0, "closed": 0}
        changes: list[Any] = []
        periods: set[tuple[datetime, datetime]] = set()
        queue: asyncio.Queue[list[int] | None] = asyncio.Queue(maxsize=workers)

        async def work() -> None:
            async with pool.acquire() as wconn:
                for _ in range(total // batch_size + 2):  # bounded by the number of pages
                    accounts = await queue.get()
                    if accounts is None:
                        return
                    async with wconn.transaction():
                        batch = await _batch(wconn, accounts, services, since, now, horizon, tz,
                                             report=on_charges is not None, events=charged_events)
                    tally["done"] += len(accounts)
                    tally["batches"] += 1
                    tally["charges"] += batch.charges
                    tally["amount"] += batch.amount
                    tally["once"] += batch.once
                    tally["closed"] += batch.closed
                    changes.extend(batch.block_changes)
                    periods.update(batch.closed_periods)
                    if on_charges is not None and batch.booked:
                        await on_charges(batch.booked)
                    if progress is not None:
                        progress(RunProgress(tally["done"], total, tally["batches"], tally["charges"],
                                             tally["amount"]))

        async def feed() -> None:
            after = 0
            for _ in range(total // batch_size + 2):  # keyset pages; +2: the partial and the empty one
                accounts = [row[0] for row in await conn.fetch(
                    "SELECT DISTINCT account_id FROM account_tariffs WHERE account_id > $1"
                    " AND valid_from <= $3 AND (valid_to IS NULL OR valid_to > $2)"
                    " ORDER BY account_id LIMIT $4", after, horizon, now, batch_size)]
                if not accounts:
                    break
                await queue.put(accounts)
                after = accounts[-1]
            else:
                raise InvariantViolation("periodic run did not reach the last account page")
            for _ in range(workers):
                await queue.put(None)

        try:
            async with asyncio.TaskGroup() as group:
                group.create_task(feed())
                for _ in range(workers):
                    group.create_task(work())
        except BaseExceptionGroup as failed:  # the first cause; the other tasks were cancelled
            raise failed.exceptions[0] from None
        async with conn.transaction():
            await enqueue(conn, [OutboxEvent("period.closed", {
                "period_start": int(start.timestamp()), "period_end": int(end.timestamp())},
                dedup_key=f"period.closed:{int(start.timestamp())}:{int(end.timestamp())}")
                for start, end in sorted(periods)], now)
            await conn.execute(
                "INSERT INTO periodic_runs(name, last_now, finished_at, accounts, charges, amount)"
                " VALUES ($1, $2, $2, $3, $4, $5) ON CONFLICT (name) DO UPDATE SET last_now ="
                " greatest(periodic_runs.last_now, EXCLUDED.last_now), finished_at = EXCLUDED.finished_at,"
                " accounts = EXCLUDED.accounts, charges = EXCLUDED.charges, amount = EXCLUDED.amount",
                name, now, tally["done"], tally["charges"], tally["amount"])
    return RunResult(since, now, tally["done"], tally["batches"], tally["charges"], tally["amount"],
                     tally["once"], tally["closed"], tuple(changes), tuple(sorted(periods)),
                     (now - wall).total_seconds())
