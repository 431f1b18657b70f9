"""``billcore verify``: check every money invariant on a live database.

Each check is one SQL query that returns the offending rows; ``verify``
runs them all (in one REPEATABLE READ snapshot when the caller has no
transaction open) and returns a ``Problem`` per offence, naming the
account.  An empty list means the books are consistent.

Checks:
* ``balance``        accounts.balance == sum(ledger.amount) of the account
* ``chain``          each row's balance_after == running sum up to it
                     (catches an UPDATEd amount even without the trigger)
* ``trigger``        the append-only trigger on ledger is present
* ``system_block``   an active system block exactly when the debt rule says so
* ``payment``        each payment has its ledger row with the same account
                     and amount; a cancelled one has a reversal of -amount
* ``reversal``       every reversal row is exactly minus the row it reverses
* ``invoice``        each invoice's total is minus the sum of the ledger's
                     charge rows of its account and range (schema 0020)
* ``invoice_lines``  a document's net, VAT and total are its lines' sums,
                     and each line's VAT follows the rounding rule
* ``credit_note``    each credit note's ledger row is its account's
                     charge_reversal of exactly -total, key credit_note:<id>
* ``credit_excess``  the credit notes of an invoice line never credit more
                     than the line (nor a line the invoice does not have)
* ``numbering``      per (series, year): count = max(number) = last_no

At a million accounts and a hundred million ledger rows every check must
stay set-based: ``balance`` and ``chain`` share one sorted pass over the
ledger (no per-account loop, no per-row subplan), ``payment`` is a hash
join, ``reversal`` walks only the reversal rows through their index, and
each reports at most ``MAX_REPORTED`` offences.  docs/scaling.md has the
measured times.
"""

from __future__ import annotations

import contextlib
import datetime as dt
import time
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass

from billcore.db.rows import DbConnection

__all__ = ["CHECK_TIMEOUT", "CheckTimer", "MAX_REPORTED", "Problem", "WORK_MEM", "verify"]

# work_mem of a verify transaction (SET LOCAL): the ledger pass sorts every row
WORK_MEM = "256MB"
# A check's statement reads the whole ledger: minutes at a hundred million
# rows.  The pool's command_timeout (60 s, for the serving core) would cancel
# it halfway, so each check's statement has this limit instead.
CHECK_TIMEOUT = 6 * 3600.0


@dataclass(frozen=True, slots=True)
class Problem:
    check: str
    account_id: int | None
    detail: str

    def __str__(self) -> str:
        where = f"account {self.account_id}" if self.account_id is not None else "database"
        return f"{self.check}: {where}: {self.detail}"


# One pass over the ledger, in (account, id) order: each row's balance_after
# must be the previous row's plus its amount (the first row's: its amount),
# which by induction is the running sum; the per-account total comes out of
# the same pass.  A sort of the whole ledger is the price (no index order is
# cheaper: rows of one account are spread over the heap by time), paid once
# instead of once per check.
_LEDGER_PASS = """
SELECT x.account_id, count(*) FILTER (WHERE x.balance_after <> x.prev + x.amount) AS broken,
       min(x.id) FILTER (WHERE x.balance_after <> x.prev + x.amount) AS first_broken,
       sum(x.amount) AS total
FROM (SELECT account_id, id, amount, balance_after,
             lag(balance_after, 1, 0::bigint) OVER (PARTITION BY account_id ORDER BY id) AS prev
      FROM ledger) x
GROUP BY x.account_id
"""

_BALANCE_AND_CHAIN = f"""
WITH pass AS MATERIALIZED ({_LEDGER_PASS})
SELECT coalesce(a.id, p.account_id) AS id, a.balance, coalesce(p.total, 0) AS total,
       coalesce(p.broken, 0) AS broken, p.first_broken,
       (SELECT l.balance_after FROM ledger l WHERE l.id = p.first_broken) AS balance_after,
       (SELECT sum(l.amount) FROM ledger l WHERE l.account_id = p.account_id AND l.id <= p.first_broken)
           AS running
FROM accounts a FULL JOIN pass p ON p.account_id = a.id
WHERE a.balance IS DISTINCT FROM coalesce(p.total, 0) OR p.broken > 0
ORDER BY 1 LIMIT $1"""

_SYSTEM_BLOCK = """
SELECT a.id, a.balance, a.credit, coalesce(p.amount, 0) AS promised, b.id AS block_id,
       (NOT a.unlimited AND a.balance < -(a.credit + coalesce(p.amount, 0))) AS debt
FROM accounts a
LEFT JOIN (SELECT account_id, sum(amount) AS amount FROM promised_payments
           WHERE closed_at IS NULL AND expires_at > $1 GROUP BY account_id) p ON p.account_id = a.id
LEFT JOIN blocks b ON b.account_id = a.id AND b.kind = 'system' AND b.lifted_at IS NULL
WHERE (NOT a.unlimited AND a.balance < -(a.credit + coalesce(p.amount, 0))) <> (b.id IS NOT NULL)
ORDER BY a.id LIMIT $2"""

# Payments against their ledger rows: a hash join of two scans.  Reversal
# rows are few; the unique index on ``reverses`` finds them without a scan.
_PAYMENT = """
WITH reversed AS MATERIALIZED (SELECT reverses FROM ledger WHERE reverses IS NOT NULL)
SELECT p.id, p.account_id, p.amount, l.account_id AS l_account, l.amount AS l_amount,
       c.account_id AS c_account, c.amount AS c_amount, c.reverses AS c_reverses
FROM payments p
LEFT JOIN ledger l ON l.id = p.ledger_id
LEFT JOIN ledger c ON c.id = p.cancel_ledger_id
WHERE l.id IS NULL OR l.account_id <> p.account_id OR l.amount <> p.amount OR l.kind <> 'payment'
   OR (p.cancel_ledger_id IS NOT NULL AND (c.account_id <> p.account_id OR c.amount <> -p.amount
       OR c.reverses IS DISTINCT FROM p.ledger_id))
   OR (p.cancel_ledger_id IS NULL AND p.ledger_id IN (SELECT reverses FROM reversed))
ORDER BY p.id LIMIT $1"""

_REVERSAL = """
SELECT r.id, r.account_id, r.amount, o.account_id AS o_account, o.amount AS o_amount
FROM ledger r JOIN ledger o ON o.id = r.reverses
WHERE r.reverses IS NOT NULL AND (r.amount <> -o.amount OR r.account_id <> o.account_id)
ORDER BY r.id LIMIT $1"""

# Invoices against the ledger: each invoice's range walks the account's rows
# through ledger_account_time (an index range per invoice, no ledger scan).
_INVOICE = """
SELECT i.id, i.account_id, i.total, coalesce(-s.amount, 0) AS ledger
FROM invoices i
LEFT JOIN LATERAL (SELECT sum(l.amount) AS amount FROM ledger l
                   WHERE l.account_id = i.account_id AND l.created_at >= i.period_start
                     AND l.created_at < i.period_end
                     AND l.kind IN ('periodic', 'traffic', 'charge', 'charge_reversal')
                     AND l.idem_key NOT LIKE 'credit_note:%') s ON true
WHERE i.kind = 'invoice' AND i.total <> coalesce(-s.amount, 0)
ORDER BY i.id LIMIT $1"""

# One grouped pass over the lines joined to their documents.
_INVOICE_LINES = """
SELECT i.id, i.account_id, i.net, i.vat, i.total, x.net AS l_net, x.vat AS l_vat, x.total AS l_total, x.bad_vat
FROM invoices i
LEFT JOIN (SELECT l.invoice_id, sum(l.net) AS net, sum(l.vat) AS vat, sum(l.total) AS total,
                  count(*) FILTER (WHERE l.vat <> round(l.total::numeric * d.vat_bp / (10000 + d.vat_bp))) AS bad_vat
           FROM invoice_lines l JOIN invoices d ON d.id = l.invoice_id GROUP BY l.invoice_id) x
       ON x.invoice_id = i.id
WHERE x.invoice_id IS NULL OR x.net <> i.net OR x.vat <> i.vat OR x.total <> i.total OR x.bad_vat > 0
ORDER BY i.id LIMIT $1"""

_CREDIT_NOTE = """
SELECT c.id, c.account_id, c.total, l.account_id AS l_account, l.amount AS l_amount, l.kind AS l_kind,
       l.idem_key AS l_key
FROM invoices c LEFT JOIN ledger l ON l.id = c.ledger_id
WHERE c.kind = 'credit_note' AND (l.id IS NULL OR l.account_id <> c.account_id OR l.amount <> -c.total
      OR l.kind <> 'charge_reversal' OR l.idem_key <> 'credit_note:' || c.id)
ORDER BY c.id LIMIT $1"""

_CREDIT_EXCESS = """
SELECT c.credits AS invoice_id, cl.line_no, max(c.account_id) AS account_id, -sum(cl.total) AS credited,
       max(il.total) AS line_total, bool_or(il.invoice_id IS NULL) AS no_line
FROM invoices c JOIN invoice_lines cl ON cl.invoice_id = c.id
LEFT JOIN invoice_lines il ON il.invoice_id = c.credits AND il.line_no = cl.line_no
WHERE c.kind = 'credit_note'
GROUP BY c.credits, cl.line_no
HAVING bool_or(il.invoice_id IS NULL)
    OR -sum(cl.total) NOT BETWEEN least(0, max(il.total)) AND greatest(0, max(il.total))
ORDER BY 1, 2 LIMIT $1"""

_NUMBERING = """
SELECT s.series, s.year, s.last_no, coalesce(n.count, 0) AS count, coalesce(n.max, 0) AS max
FROM invoice_series s
FULL JOIN (SELECT series, year, count(*) AS count, max(number) AS max FROM invoices GROUP BY 1, 2) n
       ON n.series = s.series AND n.year = s.year
WHERE s.series IS NULL OR coalesce(n.count, 0) <> coalesce(n.max, 0) OR coalesce(n.max, 0) <> s.last_no
ORDER BY 1, 2 LIMIT $1"""

# Each check reports at most this many offences: a broken invariant is found
# by the first; a million lines help no operator.
MAX_REPORTED = 1000

Progress = Callable[[str, float], None]


async def _run(conn: DbConnection, now: dt.datetime, progress: Progress | None) -> list[Problem]:
    problems: list[Problem] = []
    timer = CheckTimer(progress)
    # sorts and hashes over millions of rows: memory instead of temporary files
    await conn.execute(f"SET LOCAL work_mem = '{WORK_MEM}'")
    async with timer("balance and chain"):
        for row in await conn.fetch(_BALANCE_AND_CHAIN, MAX_REPORTED, timeout=CHECK_TIMEOUT):
            if row["balance"] is None or row["balance"] != row["total"]:
                problems.append(Problem("balance", row["id"],
                                        f"balance {row['balance']} but ledger sum {row['total']}"))
            if row["broken"]:
                problems.append(Problem("chain", row["id"],
                                        f"ledger row {row['first_broken']}: balance_after {row['balance_after']},"
                                        f" running sum {row['running']} (a row was changed;"
                                        f" {row['broken']} row(s) of this account disagree)"))
    async with timer("trigger"):
        present = await conn.fetchval(
            "SELECT count(*) FROM pg_trigger WHERE tgname = 'ledger_no_update_delete' AND tgenabled <> 'D'")
        if not present:
            problems.append(Problem("trigger", None, "the ledger append-only trigger is missing or disabled"))
    async with timer("system_block"):
        for row in await conn.fetch(_SYSTEM_BLOCK, now, MAX_REPORTED, timeout=CHECK_TIMEOUT):
            if row["debt"]:
                detail = (f"balance {row['balance']} < -(credit {row['credit']} + promised {row['promised']})"
                          " but no system block")
            else:
                detail = f"system block {row['block_id']} active but the account is not in debt"
            problems.append(Problem("system_block", row["id"], detail))
    async with timer("payment"):
        for row in await conn.fetch(_PAYMENT, MAX_REPORTED, timeout=CHECK_TIMEOUT):
            problems.append(Problem("payment", row["account_id"],
                                    f"payment {row['id']} ({row['amount']}) does not match its ledger rows"
                                    f" (payment row {row['l_account']}/{row['l_amount']},"
                                    f" reversal {row['c_account']}/{row['c_amount']})"))
    async with timer("reversal"):
        for row in await conn.fetch(_REVERSAL, MAX_REPORTED, timeout=CHECK_TIMEOUT):
            problems.append(Problem("reversal", row["account_id"],
                                    f"ledger row {row['id']} ({row['amount']}) does not reverse"
                                    f" {row['o_amount']} exactly"))
    await _documents(conn, problems, timer)
    return problems


async def _documents(conn: DbConnection, problems: list[Problem], timer: "CheckTimer") -> None:
    """The checks of invoices and credit notes (schema 0020)."""
    async with timer("invoice"):
        for row in await conn.fetch(_INVOICE, MAX_REPORTED, timeout=CHECK_TIMEOUT):
            problems.append(Problem("invoice", row["account_id"],
                                    f"invoice {row['id']} totals {row['total']} but the ledger charged"
                                    f" {row['ledger']} in its range"))
    async with timer("invoice_lines"):
        for row in await conn.fetch(_INVOICE_LINES, MAX_REPORTED, timeout=CHECK_TIMEOUT):
            detail = (f"document {row['id']} has no lines" if row["l_total"] is None else
                      f"document {row['id']}: net/vat/total {row['net']}/{row['vat']}/{row['total']},"
                      f" lines {row['l_net']}/{row['l_vat']}/{row['l_total']},"
                      f" {row['bad_vat']} line(s) off the VAT rule")
            problems.append(Problem("invoice_lines", row["account_id"], detail))
    async with timer("credit_note"):
        for row in await conn.fetch(_CREDIT_NOTE, MAX_REPORTED, timeout=CHECK_TIMEOUT):
            problems.append(Problem("credit_note", row["account_id"],
                                    f"credit note {row['id']} ({row['total']}) does not match its ledger row"
                                    f" ({row['l_account']}/{row['l_amount']}/{row['l_kind']}/{row['l_key']})"))
    async with timer("credit_excess"):
        for row in await conn.fetch(_CREDIT_EXCESS, MAX_REPORTED, timeout=CHECK_TIMEOUT):
            detail = (f"invoice {row['invoice_id']} has no line {row['line_no']} that a credit note credits"
                      if row["no_line"] else
                      f"invoice {row['invoice_id']} line {row['line_no']}: {row['credited']} credited of"
                      f" {row['line_total']}")
            problems.append(Problem("credit_excess", row["account_id"], detail))
    async with timer("numbering"):
        for row in await conn.fetch(_NUMBERING, MAX_REPORTED, timeout=CHECK_TIMEOUT):
            problems.append(Problem("numbering", None,
                                    f"series {row['series']}/{row['year']}: {row['count']} documents, highest"
                                    f" number {row['max']}, last_no {row['last_no']} (a gap or a duplicate)"))


async def verify(conn: DbConnection, now: dt.datetime | None = None, *,
                 progress: Progress | None = None) -> list[Problem]:
    """Every broken invariant (at most ``MAX_REPORTED`` per check), as
    ``Problem``s naming the account; ``progress(check, seconds)`` after each check."""
    now = now or dt.datetime.now(dt.timezone.utc)
    if conn.is_in_transaction():  # the caller's snapshot (its work_mem is raised till its end)
        return await _run(conn, now, progress)
    async with conn.transaction(isolation="repeatable_read", readonly=True):
        return await _run(conn, now, progress)


class CheckTimer:
    """``async with timer(name):`` reports each check's time to ``progress``."""

    def __init__(self, progress: Progress | None) -> None:
        self.progress = progress

    def __call__(self, name: str) -> contextlib.AbstractAsyncContextManager[None]:
        return self._timed(name)

    @contextlib.asynccontextmanager
    async def _timed(self, name: str) -> AsyncIterator[None]:
        start = time.monotonic()
        yield
        if self.progress is not None:
            self.progress(name, time.monotonic() - start)
