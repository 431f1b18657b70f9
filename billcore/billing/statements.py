"""Account statements: opening balance, every ledger row of a range, closing balance.

Theory of operation
-------------------
A statement of an account over ``[since, until)`` lists its ledger rows
created in the range in ``(created_at, id)`` order.  The opening balance is
the sum of the account's rows created before ``since`` — which is the
``balance_after`` of the last of them whenever rows are stamped in id order,
and stays right when a caller stamped a row with an earlier time than a row
posted before it; the closing balance is opening plus the rows' sum, the
ledger's balance at ``until``.  Rows come through a server-side cursor in
chunks, so a statement of a hundred thousand rows is bounded in memory;
callers run it inside one REPEATABLE READ transaction so the opening and the
rows are of the same snapshot.
"""

from __future__ import annotations

from collections.abc import AsyncIterator
from datetime import datetime
from typing import Any, Final

from billcore.billing.ledger_errors import InvalidValue
from billcore.common.errors import InvariantViolation
from billcore.db.rows import DbConnection

__all__ = ["CHUNK", "Statement", "opening_balance", "statement_rows"]

CHUNK: Final = 1_000


async def opening_balance(conn: DbConnection, account_id: int, since: datetime) -> int:
    """The account's balance just before ``since`` (0 when it has no earlier row)."""
    return int(await conn.fetchval(
        "SELECT coalesce(sum(amount), 0)::bigint FROM ledger WHERE account_id = $1 AND created_at < $2",
        account_id, since))


class Statement:
    """``async for chunk in statement.rows()``; then ``closing`` and ``entries`` are known."""

    def __init__(self, conn: DbConnection, account_id: int, since: datetime, until: datetime, opening: int,
                 chunk: int = CHUNK) -> None:
        if not since < until:
            raise InvalidValue("since must be before until")
        self.conn, self.account_id, self.since, self.until = conn, account_id, since, until
        self.opening = self.closing = opening
        self.entries = 0
        self.chunk = chunk

    async def rows(self) -> AsyncIterator[list[list[Any]]]:
        """Chunks of ``[ledger_id, created_at ISO, kind, amount, balance_after, reference]``."""
        if not self.conn.is_in_transaction():
            raise InvariantViolation("a statement is read inside one transaction")
        out: list[list[Any]] = []
        async for row in self.conn.cursor(
                "SELECT id, created_at, kind, amount, balance_after, reference FROM ledger"
                " WHERE account_id = $1 AND created_at >= $2 AND created_at < $3 ORDER BY created_at, id",
                self.account_id, self.since, self.until, prefetch=self.chunk):
            self.closing += row["amount"]
            self.entries += 1
            out.append([row["id"], row["created_at"].isoformat(), row["kind"], row["amount"],
                        row["balance_after"], row["reference"]])
            if len(out) >= self.chunk:
                yield out
                out = []
        if out:
            yield out

    async def check(self) -> None:
        """After the rows: the closing balance is the ledger's at ``until`` (same snapshot)."""
        at_until = await opening_balance(self.conn, self.account_id, self.until)
        if at_until != self.closing:
            raise InvariantViolation(f"statement of account {self.account_id}: closing {self.closing},"
                                     f" ledger {at_until}")


async def statement_rows(conn: DbConnection, account_id: int, since: datetime,
                         until: datetime) -> Statement:
    """A ``Statement`` with its opening balance read (inside the caller's transaction)."""
    return Statement(conn, account_id, since, until, await opening_balance(conn, account_id, since))
