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
"""

from __future__ import annotations

import datetime as dt
from dataclasses import dataclass

import asyncpg

__all__ = ["Problem", "verify"]


@dataclass(frozen=True, slots=True)
class Problem:
    check: str
    account_id: int | None
    detail: str

    def __str__(self) -> str:
        where = f"account {self.account_id}" if self.account_id is not None else "database"
        return f"{self.check}: {where}: {self.detail}"


_BALANCE = """
SELECT a.id, a.balance, coalesce(s.total, 0) AS total FROM accounts a
LEFT JOIN (SELECT account_id, sum(amount) AS total FROM ledger GROUP BY account_id) s
       ON s.account_id = a.id
WHERE a.balance <> coalesce(s.total, 0) ORDER BY a.id"""

_CHAIN = """
SELECT account_id, id, balance_after, running FROM (
    SELECT account_id, id, balance_after,
           sum(amount) OVER (PARTITION BY account_id ORDER BY id) AS running
    FROM ledger) x
WHERE balance_after <> running ORDER BY account_id, id"""

_SYSTEM_BLOCK = """
SELECT a.id, a.balance, a.credit, coalesce(p.amount, 0) AS promised, b.id AS block_id,
       (NOT a.unlimited AND a.balance < -(a.credit + coalesce(p.amount, 0))) AS debt
FROM accounts a
LEFT JOIN (SELECT account_id, sum(amount) AS amount FROM promised_payments
           WHERE closed_at IS NULL AND expires_at > $1 GROUP BY account_id) p ON p.account_id = a.id
LEFT JOIN blocks b ON b.account_id = a.id AND b.kind = 'system' AND b.lifted_at IS NULL
WHERE (NOT a.unlimited AND a.balance < -(a.credit + coalesce(p.amount, 0))) <> (b.id IS NOT NULL)
ORDER BY a.id"""

_PAYMENT = """
SELECT p.id, p.account_id, p.amount, l.account_id AS l_account, l.amount AS l_amount,
       c.account_id AS c_account, c.amount AS c_amount, c.reverses AS c_reverses
FROM payments p
LEFT JOIN ledger l ON l.id = p.ledger_id
LEFT JOIN ledger c ON c.id = p.cancel_ledger_id
WHERE l.id IS NULL OR l.account_id <> p.account_id OR l.amount <> p.amount OR l.kind <> 'payment'
   OR (p.cancel_ledger_id IS NOT NULL AND (c.account_id <> p.account_id OR c.amount <> -p.amount
       OR c.reverses IS DISTINCT FROM p.ledger_id))
   OR (p.cancel_ledger_id IS NULL AND EXISTS (SELECT 1 FROM ledger r WHERE r.reverses = p.ledger_id))
ORDER BY p.id"""

_REVERSAL = """
SELECT r.id, r.account_id, r.amount, o.account_id AS o_account, o.amount AS o_amount
FROM ledger r JOIN ledger o ON o.id = r.reverses
WHERE r.amount <> -o.amount OR r.account_id <> o.account_id ORDER BY r.id"""


async def _run(conn: asyncpg.Connection, now: dt.datetime) -> list[Problem]:
    problems: list[Problem] = []
    for r in await conn.fetch(_BALANCE):
        problems.append(Problem("balance", r["id"],
                                f"balance {r['balance']} but ledger sum {r['total']}"))
    for r in await conn.fetch(_CHAIN):
        problems.append(Problem("chain", r["account_id"],
                                f"ledger row {r['id']}: balance_after {r['balance_after']},"
                                f" running sum {r['running']} (a row was changed)"))
    present = await conn.fetchval(
        "SELECT count(*) FROM pg_trigger WHERE tgname = 'ledger_no_update_delete' AND tgenabled <> 'D'")
    if not present:
        problems.append(Problem("trigger", None, "the ledger append-only trigger is missing or disabled"))
    for r in await conn.fetch(_SYSTEM_BLOCK, now):
        if r["debt"]:
            detail = (f"balance {r['balance']} < -(credit {r['credit']} + promised {r['promised']})"
                      " but no system block")
        else:
            detail = f"system block {r['block_id']} active but the account is not in debt"
        problems.append(Problem("system_block", r["id"], detail))
    for r in await conn.fetch(_PAYMENT):
        problems.append(Problem("payment", r["account_id"],
                                f"payment {r['id']} ({r['amount']}) does not match its ledger rows"
                                f" (payment row {r['l_account']}/{r['l_amount']},"
                                f" reversal {r['c_account']}/{r['c_amount']})"))
    for r in await conn.fetch(_REVERSAL):
        problems.append(Problem("reversal", r["account_id"],
                                f"ledger row {r['id']} ({r['amount']}) does not reverse"
                                f" {r['o_amount']} exactly"))
    return problems


async def verify(conn: asyncpg.Connection, now: dt.datetime | None = None) -> list[Problem]:
    """Every broken invariant, as ``Problem``s naming the account."""
    now = now or dt.datetime.now(dt.timezone.utc)
    if conn.is_in_transaction():
        return await _run(conn, now)
    async with conn.transaction(isolation="repeatable_read", readonly=True):
        return await _run(conn, now)
