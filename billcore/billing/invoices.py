"""Invoices and credit notes: documents read from the ledger, numbered without gaps.

Theory of operation
-------------------
An invoice covers one account over ``[start, end)``: its lines are the
ledger's charge rows created in that range (kinds periodic, traffic,
charge, charge_reversal; never a credit note's own row, key
``credit_note:<id>``), grouped by what they charge for
(``ledger_charge_kind/service/class`` of schema 0020, read from the rows'
idempotency keys).  A line's total is minus the sum of its rows, so an
invoice's total is exactly minus the ledger's sum for the range, whatever
the rounding below.

VAT is in the amounts (``accounts.vat_bp`` basis points).  ``vat_of`` is the
one rounding rule: ``total * vat_bp / (10000 + vat_bp)`` rounded half away
from zero to a micro-unit, per line; ``net = total - vat``; a document's
figures are its lines' sums.  The SQL of the run computes the same with
``numeric`` ``round`` (half away from zero, exact for these operands); a
test pins the two together.

Issuing is set-based: any number of (account, start, end) ranges are
issued in two statements — ``_lines`` reads their lines with one grouped
scan of the ledger through ``ledger_account_time``; ``_write`` numbers and
writes the documents, their lines, the chain ends (``invoicing``) and the
``invoice.issued`` outbox events with data-modifying CTEs.  Accounts
without charge rows in their range get no invoice, but their chain end
moves, so the next invoice does not reach back.

Numbers: every issuer locks its (series, year) row of ``invoice_series``
(``_lock_series``), reads the chains under that lock (or checks that the
ones it read before are unchanged), and moves ``last_no`` by the number of
documents it inserts, in the same transaction.  The row lock orders
concurrent issuers (the second sees the chains the first committed, so it
never issues the same range twice), and a rollback — an error, a core
killed mid-run — takes the numbers back with the documents: no gap, no
duplicate.  The exclusion constraint of ``invoices`` is the backstop.

The monthly run (``run``) walks every account in id order, ``batch_size``
per transaction (``run_batch``), ``workers`` batches at once: a batch reads
its lines before it takes the series lock (so batches read in parallel)
and, under the lock, checks that no other issuer moved its chains
meanwhile (if one did, it reads them again there).  An account's range ends at the start of
its accounting period that holds ``now - grace`` and starts at its chain
end, or, never invoiced, at the start of the period before; the periods
are computed once per period signature.  The grace is there because a
ledger row is stamped before it commits: a row stamped just before a
period end may commit after it.

Credit notes (``credit``) correct an issued invoice (documents are never
updated): they carry the invoice's line numbers with negative totals, at
most what is left of each line, and credit the account with one
``charge_reversal`` ledger row (``credit_note:<id>``) posted by
``post_charges`` in the same transaction.
"""

from __future__ import annotations

import asyncio
import datetime as dt
import json
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass
from datetime import date, datetime, timedelta, tzinfo
from typing import Any, ClassVar, Final

from billcore.billing.ledger import Entry, post_charges
from billcore.billing.ledger_errors import InvalidValue, UnknownAccount
from billcore.billing.outbox import OutboxEvent, enqueue
from billcore.billing.periods import PeriodSpec, period_containing
from billcore.billing.tariffs import DEFAULT_ACCOUNT_PERIOD, period_spec
from billcore.common.errors import BillingError, InvariantViolation
from billcore.db.rows import DbConnection

__all__ = [
    "CHARGE_KINDS",
    "CreditRefused",
    "InvoiceError",
    "NothingToInvoice",
    "RunResult",
    "UnknownInvoice",
    "credit",
    "document",
    "issue",
    "number_text",
    "run",
    "run_batch",
    "vat_of",
]

CHARGE_KINDS: Final = ("periodic", "traffic", "charge", "charge_reversal")
CREDIT_KEY: Final = "credit_note:"
MAX_BATCH: Final = 50_000
MAX_REASON: Final = 500
_LINE_ORDER: Final = {"periodic": 1, "once": 2, "traffic": 3, "time": 4, "other": 5}


class InvoiceError(BillingError):
    """Root of the documents' refusals."""

    code: ClassVar[str] = "invoices"


class NothingToInvoice(InvoiceError):
    """The range holds no charge row of the account: there is nothing to invoice."""

    code: ClassVar[str] = "invoices.nothing_to_invoice"


class UnknownInvoice(InvoiceError, LookupError):
    """No such invoice (or not one the caller may see)."""

    code: ClassVar[str] = "invoices.unknown"


class CreditRefused(InvoiceError):
    """The credit note asks for more than is left of a line, names no line, or credits a credit note."""

    code: ClassVar[str] = "invoices.credit_refused"


class RangeRefused(InvoiceError):
    """The range to invoice is empty or overlaps an invoice already issued."""

    code: ClassVar[str] = "invoices.range"


def vat_of(total: int, vat_bp: int) -> int:
    """The VAT inside ``total`` at ``vat_bp`` basis points: ``total * vat_bp / (10000 + vat_bp)``
    rounded half away from zero, in integers (exact for any size)."""
    if type(total) is not int or type(vat_bp) is not int or not 0 <= vat_bp <= 10000:
        raise InvalidValue("vat_of takes int micro-units and a rate of 0..10000 basis points")
    divisor = 10000 + vat_bp
    scaled = abs(total) * vat_bp
    vat = (2 * scaled + divisor) // (2 * divisor)
    return vat if total >= 0 else -vat


def number_text(series: str, year: int, seq: int) -> str:
    return f"{series}-{year}-{seq:06d}"


# The SQL twin of vat_of (numeric round: half away from zero; the quotient is
# exact to far more digits than a tie needs, since a non-tie is at least
# 1/20000 away from .5).
_VAT_SQL: Final = "round({t}::numeric * {bp} / (10000 + {bp}))::bigint"


async def _lock_series(conn: DbConnection, series: str, year: int) -> int:
    """Lock (series, year) for this transaction (created at 0 if new); its last number."""
    await conn.execute("INSERT INTO invoice_series(series, year) VALUES ($1, $2) ON CONFLICT DO NOTHING",
                       series, year)
    last = await conn.fetchval("SELECT last_no FROM invoice_series WHERE series = $1 AND year = $2 FOR UPDATE",
                               series, year)
    return int(last)


async def _take_numbers(conn: DbConnection, series: str, year: int, n: int) -> int:
    """Move (series, year) by ``n`` inside the issuing transaction; the first of the ``n`` numbers."""
    last = await conn.fetchval("UPDATE invoice_series SET last_no = last_no + $3 WHERE series = $1 AND year = $2"
                               " RETURNING last_no", series, year, n)
    if last is None:
        raise InvariantViolation(f"invoice series {series}/{year} vanished")
    return int(last) - n + 1


def _check_series(series: str) -> str:
    if type(series) is not str or not 1 <= len(series) <= 12 or not series.isascii() \
            or not all(c.isupper() or c.isdigit() for c in series):
        raise InvalidValue(f"series must be 1..12 of A-Z and 0-9, got {series!r}")
    return series


# number_text's sequence in SQL: six digits at least, more when it has more.
_SEQ_SQL: Final = "CASE WHEN {n} < 1000000 THEN lpad({n}::text, 6, '0') ELSE {n}::text END"

# A batch is issued in two statements.  _LINES_SQL reads the lines of every
# range from the ledger (the expensive part: it needs no lock, so batches of
# a run compute their lines in parallel); _WRITE_SQL, under the series lock,
# numbers the documents and writes the invoices, their lines, the chains,
# the invoice.issued events and the series counter.
#
# _LINES_SQL: $1..$3 the ranges, $4 and $5 the local first and end day of a
# range of whole local days (NULL: not whole days: no quantities), $6 each
# account's VAT rate, $7 and $8 the lowest and highest account id: the
# BETWEEN lets the planner walk the ledger's index by range where = ANY over
# a large batch could make it scan it whole.  One row of arrays, aligned
# (one aggregate pass), in no particular order: each line carries its
# account and line_no.
_LINES_SQL: Final = f"""
WITH r AS MATERIALIZED (
    SELECT * FROM unnest($1::bigint[], $2::timestamptz[], $3::timestamptz[], $4::date[], $5::date[], $6::int[])
        AS r(account_id, since, until, first_day, end_day, vat_bp)),
g AS (
    SELECT r.account_id, ledger_charge_kind(l.kind, l.idem_key) AS line_kind,
           ledger_charge_service(l.kind, l.idem_key) AS service_id,
           ledger_charge_class(l.kind, l.idem_key) AS class_id, -sum(l.amount)::bigint AS total
      FROM r JOIN ledger l ON l.account_id = r.account_id AND l.created_at >= r.since AND l.created_at < r.until
     WHERE l.account_id BETWEEN $7 AND $8 AND l.kind IN ('periodic', 'traffic', 'charge', 'charge_reversal')
       AND l.idem_key NOT LIKE '{CREDIT_KEY}%'
     GROUP BY 1, 2, 3, 4),
lines AS (
    SELECT g.*, r.vat_bp, {_VAT_SQL.format(t="g.total", bp="r.vat_bp")} AS vat,
           row_number() OVER (PARTITION BY g.account_id ORDER BY
               CASE g.line_kind WHEN 'periodic' THEN 1 WHEN 'once' THEN 2 WHEN 'traffic' THEN 3
                                WHEN 'time' THEN 4 ELSE 5 END, g.service_id NULLS LAST, g.class_id NULLS LAST)
               ::int AS line_no,
           CASE WHEN g.service_id IS NULL THEN 'Other charges'
                ELSE coalesce(s.name, 'Service ' || g.service_id)
                     || CASE WHEN g.line_kind = 'traffic' THEN ' — ' || coalesce(c.name, 'class ' || g.class_id)
                             ELSE '' END END AS description,
           CASE WHEN g.line_kind IN ('traffic', 'time') AND r.first_day IS NOT NULL THEN
               (SELECT coalesce(sum(d.quantity), 0)::bigint FROM usage_daily d
                 WHERE d.account_id = g.account_id AND d.class_id = coalesce(g.class_id, -1)
                   AND d.day >= r.first_day AND d.day < r.end_day) END AS quantity
      FROM g JOIN r ON r.account_id = g.account_id
      LEFT JOIN services s ON s.id = g.service_id LEFT JOIN traffic_classes c ON c.id = g.class_id)
SELECT array_agg(account_id) AS account_id, array_agg(line_no) AS line_no, array_agg(line_kind) AS line_kind,
       array_agg(service_id) AS service_id, array_agg(class_id) AS class_id, array_agg(description) AS description,
       array_agg(quantity) AS quantity, array_agg(total) AS total, array_agg(vat) AS vat, array_agg(vat_bp) AS vat_bp
  FROM lines
"""
_LINE_COLS: Final = ("account_id", "line_no", "line_kind", "service_id", "class_id", "description", "quantity",
                     "total", "vat", "vat_bp")

# _WRITE_SQL: $1..$3 the ranges (every one closes: its chain moves), $4 the
# series, $5 the year, $6 the last number before (the series row is locked),
# $7 issued_at, $8 issued_by, $9..$13 each range's user, login, full name,
# address and email (the customer snapshot, read with the batch), $14..$23
# the lines (_LINE_COLS, from _LINES_SQL).
_WRITE_SQL: Final = f"""
WITH r AS MATERIALIZED (
    SELECT * FROM unnest($1::bigint[], $2::timestamptz[], $3::timestamptz[], $9::bigint[], $10::text[],
                         $11::text[], $12::text[], $13::text[])
        AS r(account_id, since, until, user_id, login, full_name, address, email)),
lines AS MATERIALIZED (
    SELECT * FROM unnest($14::bigint[], $15::int[], $16::text[], $17::bigint[], $18::bigint[], $19::text[],
                         $20::bigint[], $21::bigint[], $22::bigint[], $23::int[])
        AS l(account_id, line_no, line_kind, service_id, class_id, description, quantity, total, vat, vat_bp)),
docs AS MATERIALIZED (
    SELECT x.*, $6::bigint + row_number() OVER (ORDER BY x.account_id) AS number
      FROM (SELECT account_id, min(vat_bp) AS vat_bp, sum(total - vat)::bigint AS net, sum(vat)::bigint AS vat,
                   sum(total)::bigint AS total FROM lines GROUP BY account_id) x),
inv AS (
    INSERT INTO invoices(kind, series, year, number, account_id, period_start, period_end, issued_at, issued_by,
                         vat_bp, net, vat, total, customer)
    SELECT 'invoice', $4, $5, d.number, d.account_id, r.since, r.until, $7, $8, d.vat_bp, d.net, d.vat, d.total,
           jsonb_build_object('user_id', r.user_id, 'login', r.login, 'full_name', r.full_name,
                              'address', r.address, 'email', r.email)
      FROM docs d JOIN r ON r.account_id = d.account_id
     ORDER BY d.number
    RETURNING id, account_id, number, total),
ins_lines AS (
    INSERT INTO invoice_lines(invoice_id, line_no, line_kind, service_id, class_id, description, quantity,
                              net, vat, total)
    SELECT inv.id, l.line_no, l.line_kind, l.service_id, l.class_id, l.description, l.quantity,
           l.total - l.vat, l.vat, l.total
      FROM lines l JOIN inv ON inv.account_id = l.account_id
    RETURNING invoice_id, total),
chain AS (
    INSERT INTO invoicing AS i (account_id, invoiced_until) SELECT account_id, until FROM r
    ON CONFLICT (account_id) DO UPDATE SET invoiced_until = EXCLUDED.invoiced_until
    RETURNING account_id),
events AS (
    INSERT INTO outbox_events(event, account_id, payload, created_at)
    SELECT 'invoice.issued', account_id, jsonb_build_object('invoice_id', id, 'account_id', account_id, 'total', total,
           'number', $4 || '-' || $5 || '-' || {_SEQ_SQL.format(n="number")}), $7
      FROM inv ORDER BY number
    RETURNING id),
series AS (
    UPDATE invoice_series SET last_no = last_no + (SELECT count(*) FROM docs)
     WHERE series = $4 AND year = $5 RETURNING last_no)
SELECT (SELECT array_agg(id ORDER BY number) FROM inv) AS ids,
       (SELECT array_agg(account_id ORDER BY number) FROM inv) AS accounts,
       (SELECT array_agg(number ORDER BY number) FROM inv) AS numbers,
       (SELECT array_agg(total ORDER BY number) FROM inv) AS totals,
       (SELECT coalesce(sum(total), 0)::bigint FROM ins_lines) AS lines_total,
       (SELECT count(*) FROM ins_lines) AS lines,
       (SELECT count(*) FROM chain) AS chained,
       (SELECT count(*) FROM events) AS events,
       (SELECT last_no FROM series) AS last_no
"""


@dataclass(frozen=True, slots=True)
class Issued:
    invoice_id: int
    account_id: int
    number: str
    total: int


@dataclass(frozen=True, slots=True)
class Range:
    account_id: int
    since: datetime
    until: datetime
    account: Any      # the batch read's row: vat_bp, user_id, login, full_name, address, email


_ACCOUNT_COLS: Final = ("a.id, a.vat_bp, a.user_id, u.login, u.full_name, u.address, u.email, p.period_kind,"
                        " p.period_days, p.period_anchor, i.invoiced_until")


def _whole_days(since: datetime, until: datetime, tz: tzinfo) -> tuple[date | None, date | None]:
    a, b = since.astimezone(tz), until.astimezone(tz)
    if a.time() == dt.time(0) and b.time() == dt.time(0):
        return a.date(), b.date()
    return None, None


def issue_year(now: datetime, tz: tzinfo) -> int:
    return now.astimezone(tz).year


Lines = dict[str, list[Any]]

# A plan for each batch's bounds, never the generic one a prepared statement switches to after five runs:
# with the bounds unknown it scans the whole ledger per batch (seen: 3 s a batch instead of 0.5).
_CUSTOM_PLANS: Final = "SET LOCAL plan_cache_mode = force_custom_plan"


async def _lines(conn: DbConnection, ranges: Sequence[Range], tz: tzinfo) -> Lines:
    """The invoice lines of ``ranges`` as columns (``_LINE_COLS``); reads only."""
    if not ranges:
        return {k: [] for k in _LINE_COLS}
    await conn.execute(_CUSTOM_PLANS)
    days = [_whole_days(r.since, r.until, tz) for r in ranges]
    ids = [r.account_id for r in ranges]
    row = await conn.fetchrow(_LINES_SQL, ids, [r.since for r in ranges], [r.until for r in ranges],
                              [d[0] for d in days], [d[1] for d in days], [r.account["vat_bp"] for r in ranges],
                              min(ids), max(ids))
    assert row is not None
    return {k: list(row[k] or ()) for k in _LINE_COLS}


async def _write(conn: DbConnection, ranges: Sequence[Range], lines: Lines, *, series: str, last_no: int,
                 actor: str, now: datetime, tz: tzinfo) -> list[Issued]:
    """Issue the invoices of ``ranges`` with their ``lines`` (the series row locked by the caller, at
    ``last_no``); every range's chain moves to its end, invoiced or not."""
    if not ranges:
        return []
    if not conn.is_in_transaction():
        raise InvariantViolation("invoices are issued inside the caller's transaction")
    year = issue_year(now, tz)
    row = await conn.fetchrow(
        _WRITE_SQL, [r.account_id for r in ranges], [r.since for r in ranges], [r.until for r in ranges],
        series, year, last_no, now, actor,
        *([r.account[k] for r in ranges] for k in ("user_id", "login", "full_name", "address", "email")),
        *(lines[k] for k in _LINE_COLS))
    assert row is not None
    ids, accounts, numbers, totals = (list(row[k] or ()) for k in ("ids", "accounts", "numbers", "totals"))
    # the numbers taken are the next ones, consecutive, and the series moved by exactly them
    if numbers != list(range(last_no + 1, last_no + 1 + len(numbers))) or row["last_no"] != last_no + len(numbers):
        raise InvariantViolation(f"invoice numbers {numbers[:3]}… do not follow {series}/{year} at {last_no}")
    # before the write the lines summed to what the ledger charged; after it, the documents to their lines
    if sum(totals) != row["lines_total"] or row["lines_total"] != sum(lines["total"]) \
            or row["lines"] != len(lines["total"]):
        raise InvariantViolation("invoice totals do not sum to their lines")
    if row["chained"] != len(ranges):
        raise InvariantViolation("not every invoiced account's chain moved")
    if row["events"] != len(ids):
        raise InvariantViolation("not every invoice has its invoice.issued event")
    return [Issued(i, a, number_text(series, year, n), t) for i, a, n, t in zip(ids, accounts, numbers, totals)]


async def issue(conn: DbConnection, account_id: int, since: datetime | None, until: datetime, *, actor: str,
                now: datetime, series: str, tz: tzinfo) -> int:
    """Issue one invoice of ``account_id`` for ``[since, until)`` (``since`` None: from its chain end,
    else — never invoiced — from the start of the accounting period before the one ``until`` ends in);
    its id.  Refused
    ``nothing_to_invoice`` when the range holds no charge row (nothing is written)."""
    _check_series(series)
    if until > now:
        raise RangeRefused("an invoice cannot reach past now")
    async with conn.transaction():
        last_no = await _lock_series(conn, series, issue_year(now, tz))
        row = await conn.fetchrow(
            f"SELECT {_ACCOUNT_COLS} FROM accounts a JOIN users u ON u.id = a.user_id"
            " LEFT JOIN account_periods p ON p.account_id = a.id LEFT JOIN invoicing i ON i.account_id = a.id"
            " WHERE a.id = $1 FOR UPDATE OF a", account_id)
        if row is None:
            raise UnknownAccount(f"account {account_id} does not exist")
        chain_end = row["invoiced_until"]
        if since is None:
            # never invoiced: from the previous period's start, which the run has not invoiced either
            # (starting at the current one would leave the previous period's charges out for good)
            spec = _spec(row)
            current = period_containing(spec, until - timedelta(microseconds=1), tz)
            since = chain_end or period_containing(spec, current.start - timedelta(microseconds=1), tz).start
        if chain_end is not None and since < chain_end:
            raise RangeRefused(f"account {account_id} is invoiced up to {chain_end.isoformat()}")
        if not since < until:
            raise RangeRefused(f"nothing to invoice between {since.isoformat()} and {until.isoformat()}")
        ranges = [Range(account_id, since, until, row)]
        issued = await _write(conn, ranges, await _lines(conn, ranges, tz), series=series, last_no=last_no,
                              actor=actor, now=now, tz=tz)
        if not issued:
            raise NothingToInvoice(f"account {account_id} has no charge between {since.isoformat()}"
                                   f" and {until.isoformat()}")
        return issued[0].invoice_id


def _spec(row: Any) -> PeriodSpec:
    if row["period_kind"] is None:
        return DEFAULT_ACCOUNT_PERIOD
    return period_spec(row["period_kind"], row["period_days"], row["period_anchor"])


@dataclass(frozen=True, slots=True)
class RunResult:
    accounts: int        # accounts whose range closed (invoiced or not)
    issued: int          # invoices issued
    total: int           # their totals' sum


_BATCH_SQL: Final = (f"SELECT {_ACCOUNT_COLS} FROM accounts a JOIN users u ON u.id = a.user_id"
                     " LEFT JOIN account_periods p ON p.account_id = a.id"
                     " LEFT JOIN invoicing i ON i.account_id = a.id"
                     " WHERE a.id = ANY($1::bigint[]) AND a.id BETWEEN $2 AND $3 ORDER BY a.id")


def _ranges(rows: Sequence[Any], target: datetime, tz: tzinfo) -> tuple[list[Range], bool]:
    """Each account's next range towards the start of its accounting period holding ``target`` (periods
    computed once per period signature); accounts already invoiced that far have none.  An account more
    than one period behind (the core was down at month-ends) gets its oldest missing period only — one
    invoice per period, as if each run had happened — and the flag says a further pass is due."""
    bounds: dict[tuple[Any, ...], tuple[PeriodSpec, datetime, datetime]] = {}
    ranges: list[Range] = []
    behind = False
    for row in rows:
        signature = (row["period_kind"], row["period_days"], row["period_anchor"])
        bound = bounds.get(signature)
        if bound is None:
            spec = _spec(row)
            end = period_containing(spec, target, tz).start
            bound = bounds[signature] = (spec, period_containing(spec, end - timedelta(microseconds=1), tz).start,
                                         end)
        spec, start, end = bound
        since = row["invoiced_until"] or start
        if since < end:
            until = end
            if since < start:
                until = min(end, period_containing(spec, since, tz).end)
                behind = behind or until < end
            ranges.append(Range(row["id"], since, until, row))
    return ranges, behind


async def run_batch(conn: DbConnection, account_ids: Sequence[int], now: datetime, grace: timedelta, *,
                    series: str, tz: tzinfo, actor: str = "invoicing",
                    until: datetime | None = None) -> RunResult:
    """The monthly run for ``account_ids`` in one transaction: each account's range up to the start of
    its accounting period holding ``now - grace`` (or ``until``, when earlier) is invoiced.

    The lines are read before the series lock (batches of a run read theirs in parallel); under the
    lock the chains are read again, and a batch whose chains another issuer moved meanwhile reads its
    lines again there.  Accounts that missed month-ends get one invoice per missed period, oldest
    first, numbered in that order, in further passes of the same transaction."""
    _check_series(series)
    if len(account_ids) > MAX_BATCH:
        raise InvalidValue(f"at most {MAX_BATCH} accounts per batch")
    target = now - grace if until is None else min(until, now - grace)
    ids = sorted(set(account_ids))
    if not ids:
        return RunResult(0, 0, 0)
    accounts: set[int] = set()
    issued: list[Issued] = []
    async with conn.transaction():
        await conn.execute(_CUSTOM_PLANS)
        rows = await conn.fetch(_BATCH_SQL, ids, ids[0], ids[-1])
        ranges, behind = _ranges(rows, target, tz)
        lines = await _lines(conn, ranges, tz)
        last_no = await _lock_series(conn, series, issue_year(now, tz))
        chains = {r["account_id"]: r["invoiced_until"] for r in await conn.fetch(
            "SELECT account_id, invoiced_until FROM invoicing WHERE account_id = ANY($1::bigint[])"
            " AND account_id BETWEEN $2 AND $3", ids, ids[0], ids[-1])}
        if any(chains.get(row["id"]) != row["invoiced_until"] for row in rows):
            rows = await conn.fetch(_BATCH_SQL, ids, ids[0], ids[-1])     # another issuer came first
            ranges, behind = _ranges(rows, target, tz)
            lines = await _lines(conn, ranges, tz)
        while True:
            done = await _write(conn, ranges, lines, series=series, last_no=last_no, actor=actor, now=now, tz=tz)
            accounts.update(r.account_id for r in ranges)
            issued.extend(done)
            last_no += len(done)
            if not behind:
                break
            # accounts that missed periods: their next period, in this transaction (the chains moved)
            rows = await conn.fetch(_BATCH_SQL, ids, ids[0], ids[-1])
            ranges, behind = _ranges(rows, target, tz)
            lines = await _lines(conn, ranges, tz)
    return RunResult(len(accounts), len(issued), sum(d.total for d in issued))


async def run(pool: Any, now: datetime, grace: timedelta, *, series: str, tz: tzinfo, batch_size: int = 5000,
              workers: int = 1, until: datetime | None = None,
              progress: Callable[[RunResult, int], Awaitable[None]] | None = None) -> RunResult:
    """The monthly run over every account, ``batch_size`` accounts per transaction (``run_batch``), up to
    ``workers`` batches at once (each on its own connection: their lines are read in parallel, their
    writes take turns on the series lock); ``progress(batch result, its last account id)`` after each
    commit.  Idempotent: a second run, or one after a kill, invoices only what the first did not commit."""
    _check_series(series)
    if not 1 <= batch_size <= MAX_BATCH:
        raise InvalidValue(f"batch_size must be 1..{MAX_BATCH}")
    if not 1 <= workers <= 16:
        raise InvalidValue("workers must be 1..16")
    totals = [0, 0, 0]

    async def one(ids: list[int]) -> tuple[RunResult, int]:
        async with pool.acquire() as conn:
            return await run_batch(conn, ids, now, grace, series=series, tz=tz, until=until), ids[-1]

    async def finish(done: set[asyncio.Task[tuple[RunResult, int]]]) -> None:
        for task in done:
            result, last = task.result()
            totals[0] += result.accounts
            totals[1] += result.issued
            totals[2] += result.total
            if progress is not None:
                await progress(result, last)

    pending: set[asyncio.Task[tuple[RunResult, int]]] = set()
    after = 0
    try:
        while True:
            async with pool.acquire() as conn:
                ids = [r["id"] for r in await conn.fetch(
                    "SELECT id FROM accounts WHERE id > $1 ORDER BY id LIMIT $2", after, batch_size)]
            if not ids:
                break
            after = ids[-1]
            pending.add(asyncio.ensure_future(one(ids)))
            if len(pending) >= workers:
                done, pending = await asyncio.wait(pending, return_when=asyncio.FIRST_COMPLETED)
                await finish(done)
        while pending:
            done, pending = await asyncio.wait(pending, return_when=asyncio.FIRST_COMPLETED)
            await finish(done)
    finally:
        for task in pending:
            task.cancel()
        if pending:
            await asyncio.gather(*pending, return_exceptions=True)
    return RunResult(*totals)


# ---------------------------------------------------------------- credit notes

@dataclass(frozen=True, slots=True)
class CreditLine:
    line_no: int
    total: int      # positive micro-units to credit


def _credit_lines(lines: object) -> list[CreditLine] | None:
    if lines is None:
        return None
    if not isinstance(lines, list) or not lines or len(lines) > 10_000:
        raise InvalidValue("lines must be a non-empty list of {line_no, total}")
    out: list[CreditLine] = []
    for item in lines:
        if isinstance(item, CreditLine):
            out.append(item)
            continue
        if not isinstance(item, dict) or set(item) != {"line_no", "total"}:
            raise InvalidValue("each line is {line_no: int, total: int micro-units}")
        no, total = item["line_no"], item["total"]
        if type(no) is not int or no <= 0 or type(total) is not int or total <= 0:
            raise InvalidValue("line_no and total must be positive ints")
        out.append(CreditLine(no, total))
    if len({c.line_no for c in out}) != len(out):
        raise InvalidValue("a line is named twice")
    return out


async def credit(conn: DbConnection, invoice_id: int, reason: str, lines: Sequence[Any] | None, *, actor: str,
                 now: datetime, series: str, tz: tzinfo) -> int:
    """Issue a credit note for ``invoice_id`` (``lines`` None: all that is left of every line); its id.

    Refused ``credit_refused`` when a line is unknown, asks for more than is left, or nothing is left."""
    _check_series(series)
    if type(reason) is not str or not reason.strip() or len(reason) > MAX_REASON:
        raise InvalidValue(f"reason must be a non-empty text of at most {MAX_REASON} characters")
    wanted = _credit_lines(lines)
    async with conn.transaction():
        # the series row lock orders every credit note: what is left is read after the previous committed
        last_no = await _lock_series(conn, series, issue_year(now, tz))
        inv = await conn.fetchrow("SELECT * FROM invoices WHERE id = $1 FOR KEY SHARE", invoice_id)
        if inv is None:
            raise UnknownInvoice(f"invoice {invoice_id} does not exist")
        if inv["kind"] != "invoice":
            raise CreditRefused("a credit note cannot be credited")
        rows = await conn.fetch(
            "SELECT l.line_no, l.line_kind, l.service_id, l.class_id, l.description, l.quantity, l.total,"
            " l.total + coalesce((SELECT sum(cl.total) FROM invoices c JOIN invoice_lines cl ON cl.invoice_id = c.id"
            "  WHERE c.credits = l.invoice_id AND cl.line_no = l.line_no), 0)::bigint AS left_"
            " FROM invoice_lines l WHERE l.invoice_id = $1 ORDER BY l.line_no", invoice_id)
        by_no = {r["line_no"]: r for r in rows}
        if wanted is None:
            take = [(r, int(r["left_"])) for r in rows if r["left_"] != 0]
        else:
            take = []
            for c in wanted:
                r = by_no.get(c.line_no)
                if r is None:
                    raise CreditRefused(f"invoice {invoice_id} has no line {c.line_no}")
                if c.total > r["left_"]:
                    raise CreditRefused(f"line {c.line_no}: {c.total} asked, {max(0, r['left_'])} left to credit")
                take.append((r, c.total))
        vat_bp = int(inv["vat_bp"])
        out = [(r, -amount, vat_of(-amount, vat_bp)) for r, amount in sorted(take, key=lambda t: t[0]["line_no"])]
        total = sum(t for _, t, _ in out)
        vat = sum(v for _, _, v in out)
        if total >= 0:
            raise CreditRefused(f"nothing is left to credit on invoice {invoice_id}")
        note_id = int(await conn.fetchval("SELECT nextval(pg_get_serial_sequence('invoices', 'id'))"))
        year = issue_year(now, tz)
        number = last_no + 1
        inv_number = number_text(inv["series"], inv["year"], inv["number"])
        posted = await post_charges(conn, [Entry(inv["account_id"], -total, "charge_reversal",
                                                 f"{CREDIT_KEY}{note_id}",
                                                 reference=f"credit note {number_text(series, year, number)}"
                                                           f" for {inv_number}")],
                                    actor=actor, now=now)
        if len(posted.posted) != 1:
            raise InvariantViolation(f"credit note {note_id}: its ledger row was not posted")
        if await _take_numbers(conn, series, year, 1) != number:
            raise InvariantViolation("credit note number moved under the series lock")
        await conn.execute(
            "INSERT INTO invoices(id, kind, series, year, number, account_id, period_start, period_end, credits,"
            " ledger_id, issued_at, issued_by, vat_bp, net, vat, total, reason, customer)"
            " VALUES ($1, 'credit_note', $2, $3, $4, $5, $6, $7, $8, $9, $10, $11, $12, $13, $14, $15, $16, $17)",
            note_id, series, year, number, inv["account_id"], inv["period_start"], inv["period_end"], invoice_id,
            posted.posted[0].ledger_id, now, actor, vat_bp, total - vat, vat, total, reason, inv["customer"])
        await conn.execute(
            "INSERT INTO invoice_lines(invoice_id, line_no, line_kind, service_id, class_id, description, quantity,"
            " net, vat, total) SELECT $1, * FROM unnest($2::int[], $3::text[], $4::bigint[], $5::bigint[],"
            " $6::text[], $7::bigint[], $8::bigint[], $9::bigint[], $10::bigint[])",
            note_id, [r["line_no"] for r, _, _ in out], [r["line_kind"] for r, _, _ in out],
            [r["service_id"] for r, _, _ in out], [r["class_id"] for r, _, _ in out],
            [r["description"] for r, _, _ in out], [None for _ in out],
            [t - v for _, t, v in out], [v for _, _, v in out], [t for _, t, _ in out])
        await enqueue(conn, [OutboxEvent("credit_note.issued", {
            "invoice_id": note_id, "number": number_text(series, year, number), "total": total,
            "account_id": inv["account_id"], "credits": invoice_id}, inv["account_id"],
            f"credit_note.issued:{note_id}")], now)
    return note_id


# ---------------------------------------------------------------- reading

def _customer(value: Any) -> dict[str, Any]:
    return dict(json.loads(value)) if isinstance(value, str) else dict(value)


async def document(conn: DbConnection, invoice_id: int, *, currency: str = "RUB",
                   minor_units: int = 2) -> dict[str, Any]:
    """The DOCUMENT of docs/api.md (``invoices.get``): header, customer, lines, credits."""
    inv = await conn.fetchrow("SELECT * FROM invoices WHERE id = $1", invoice_id)
    if inv is None:
        raise UnknownInvoice(f"invoice {invoice_id} does not exist")
    lines = await conn.fetch(
        "SELECT line_no, line_kind, service_id, class_id, description, quantity, net, vat, total"
        " FROM invoice_lines WHERE invoice_id = $1 ORDER BY line_no", invoice_id)
    credits = None
    if inv["credits"] is not None:
        c = await conn.fetchrow("SELECT id, series, year, number FROM invoices WHERE id = $1", inv["credits"])
        assert c is not None
        credits = {"id": c["id"], "number": number_text(c["series"], c["year"], c["number"])}
    credited_by = [{"id": c["id"], "number": number_text(c["series"], c["year"], c["number"]), "total": c["total"]}
                   for c in await conn.fetch("SELECT id, series, year, number, total FROM invoices"
                                             " WHERE credits = $1 ORDER BY id", invoice_id)]
    return {
        "id": inv["id"], "kind": inv["kind"], "number": number_text(inv["series"], inv["year"], inv["number"]),
        "series": inv["series"], "year": inv["year"], "seq": inv["number"], "account_id": inv["account_id"],
        "period_start": inv["period_start"].isoformat(), "period_end": inv["period_end"].isoformat(),
        "issued_at": inv["issued_at"].isoformat(), "issued_by": inv["issued_by"], "vat_bp": inv["vat_bp"],
        "net": inv["net"], "vat": inv["vat"], "total": inv["total"], "reason": inv["reason"],
        "credits": credits, "credited_by": credited_by, "customer": _customer(inv["customer"]),
        "lines": [dict(line) for line in lines], "currency": currency, "minor_units": minor_units,
    }
