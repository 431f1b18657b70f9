"""The ledger: every balance change is one append-only row.

Theory of operation
-------------------
``post_charges(conn, entries, actor=..., now=...)`` is the one way money
moves.  Inside the CALLER's transaction it:

1. validates every entry (int amounts, non-zero, within ±MAX_AMOUNT, a known
   kind, an idempotency key, no key twice in one batch);
2. locks every touched account with ``SELECT … FOR UPDATE ORDER BY id`` —
   one fixed order for every writer, so concurrent multi-account
   operations cannot deadlock;
3. looks up the idempotency keys already in the ledger: a key posted before
   with the same account and amount is *skipped* (a retry); with a different
   account or amount it is an ``IdempotencyConflict`` and nothing is booked;
4. inserts the new rows with their running ``balance_after`` and updates
   ``accounts.balance`` by the same sums — one statement, two data-modifying
   CTEs — asserting old + sum == new;
5. closes promised payments that a non-negative balance has covered and
   re-syncs the system blocks of the touched accounts (``blocks``).

Every step is one set-based statement over the whole batch (arrays through
``unnest``), so a batch of N entries costs a constant number of round trips,
not O(N): lock, key lookup, insert with balance update, promised close,
block read, block set, block lift.  Running balances are computed here in Python
integers; the sums are checked before the write and after the read.

It returns a ``PostResult`` with the rows posted, the keys skipped, the
final balances and the block changes; the caller publishes the block
changes after its commit.  An exception anywhere leaves the caller's
transaction to roll back: a failed posting books nothing.

Two writers racing on the same *new* key for different accounts both pass
step 3; the UNIQUE index makes the second insert fail, so its transaction
rolls back rather than booking twice.
"""

from __future__ import annotations

import datetime as dt
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import asyncpg

from billcore.billing.blocks import BlockChange, LockedAccount, sync_system_blocks
from billcore.billing.errors import InvariantViolation
from billcore.billing.ledger_errors import (
    AmountError, IdempotencyConflict, InvalidValue, NotInTransaction, UnknownAccount,
)
from billcore.billing.money import MAX_AMOUNT

__all__ = [
    "ENTRY_KINDS",
    "MAX_BATCH",
    "Entry",
    "Posted",
    "PostResult",
    "lock_accounts",
    "post_charges",
    "ledger_history",
    "utcnow",
]

ENTRY_KINDS = frozenset({
    "payment", "payment_cancel", "charge", "charge_reversal", "periodic", "traffic", "correction",
})
MAX_BATCH = 100_000
MAX_KEY = 256
MAX_REFERENCE = 1000


def utcnow() -> dt.datetime:
    return dt.datetime.now(dt.timezone.utc)


@dataclass(frozen=True, slots=True)
class Entry:
    """One ledger row to post.  Negative amounts are charges, positive credits."""

    account_id: int
    amount: int
    kind: str
    idem_key: str
    reference: str = ""
    reverses: int | None = None   # ledger id this row reverses, if any


@dataclass(frozen=True, slots=True)
class Posted:
    ledger_id: int
    account_id: int
    amount: int
    balance_after: int
    idem_key: str


@dataclass(frozen=True, slots=True)
class PostResult:
    posted: tuple[Posted, ...]
    skipped: tuple[str, ...]                 # idempotency keys already in the ledger
    balances: Mapping[int, int]              # account id → balance after, every locked account
    block_changes: tuple[BlockChange, ...]


def _check_entry(e: object) -> Entry:
    if not isinstance(e, Entry):
        raise InvalidValue(f"expected an Entry, got {type(e).__name__}")
    if type(e.account_id) is not int or e.account_id <= 0:
        raise InvalidValue(f"account id must be a positive int, got {e.account_id!r}")
    if type(e.amount) is not int:
        raise AmountError(f"amount must be int micro-units, got {type(e.amount).__name__}")
    if e.amount == 0 or not -MAX_AMOUNT <= e.amount <= MAX_AMOUNT:
        raise AmountError(f"amount must be non-zero and within ±{MAX_AMOUNT}, got {e.amount}")
    if e.kind not in ENTRY_KINDS:
        raise InvalidValue(f"unknown ledger kind {e.kind!r}")
    if type(e.idem_key) is not str or not 1 <= len(e.idem_key) <= MAX_KEY:
        raise InvalidValue(f"idempotency key must be a string of 1..{MAX_KEY} characters")
    if type(e.reference) is not str or len(e.reference) > MAX_REFERENCE:
        raise InvalidValue(f"reference must be a string of at most {MAX_REFERENCE} characters")
    if e.reverses is not None and (type(e.reverses) is not int or e.reverses <= 0):
        raise InvalidValue("reverses must be a ledger id")
    return e


async def lock_accounts(conn: asyncpg.Connection, account_ids: Iterable[int]) -> dict[int, asyncpg.Record]:
    """Lock accounts in ascending id order; raise ``UnknownAccount`` for a missing one."""
    return await _lock(conn, account_ids, "id, user_id, balance, credit, unlimited, status")


_LOCK_SQL = {
    cols: f"SELECT {cols} FROM accounts WHERE id = ANY($1::bigint[]) AND id BETWEEN $2 AND $3"
          " ORDER BY id FOR UPDATE"
    for cols in ("id, user_id, balance, credit, unlimited, status", "id, balance, credit, unlimited")
}


async def _lock(conn: asyncpg.Connection, account_ids: Iterable[int], cols: str) -> dict[int, asyncpg.Record]:
    ids = sorted(set(account_ids))
    if not ids:
        return {}
    # The BETWEEN bounds are redundant for correctness; they let the planner
    # use an index range scan where ``= ANY`` alone of a large batch would
    # make it scan the whole table (batches are mostly id ranges).
    rows = await conn.fetch(_LOCK_SQL[cols], ids, ids[0], ids[-1])
    found = {r["id"]: r for r in rows}
    missing = [i for i in ids if i not in found]
    if missing:
        raise UnknownAccount(f"account {missing[0]} does not exist")
    return found


# The ledger rows and the balance moves in one statement (one round trip, one
# plan): both CTEs run against the accounts this transaction holds locked.
# Ledger rows come back with ledger = true, balance = balance_after.
_POST_SQL = (
    "WITH ins AS ("
    " INSERT INTO ledger(account_id, amount, balance_after, kind, reference, idem_key, reverses, actor,"
    " created_at)"
    " SELECT a, m, b, k, r, i, v, $8, $9 FROM unnest($1::bigint[], $2::bigint[], $3::bigint[],"
    " $4::text[], $5::text[], $6::text[], $7::bigint[]) WITH ORDINALITY AS t(a, m, b, k, r, i, v, n)"
    " ORDER BY n RETURNING id, account_id, amount, balance_after),"
    " upd AS ("
    " UPDATE accounts SET balance = accounts.balance + d.delta"
    " FROM unnest($10::bigint[], $11::bigint[]) AS d(id, delta)"
    " WHERE accounts.id = d.id AND accounts.id BETWEEN $12 AND $13"
    " RETURNING accounts.id, accounts.balance)"
    " SELECT true AS ledger, id, account_id, amount, balance_after AS balance FROM ins"
    " UNION ALL SELECT false, id, NULL, NULL, balance FROM upd"
)


async def post_charges(conn: asyncpg.Connection, entries: Sequence[Entry], *, actor: str,
                       now: dt.datetime | None = None) -> PostResult:
    """Post many ledger rows to many accounts inside the caller's transaction."""
    if not conn.is_in_transaction():
        raise NotInTransaction("post_charges runs inside the caller's transaction")
    if type(actor) is not str or not actor:
        raise InvalidValue("actor must be a non-empty string")
    if len(entries) > MAX_BATCH:
        raise InvalidValue(f"at most {MAX_BATCH} entries per batch, got {len(entries)}")
    now = now or utcnow()
    checked = [_check_entry(e) for e in entries]
    keys = [e.idem_key for e in checked]
    if len(set(keys)) != len(keys):
        raise IdempotencyConflict("the same idempotency key appears twice in one batch")

    accounts = await _lock(conn, (e.account_id for e in checked), "id, balance, credit, unlimited")
    existing = {
        r["idem_key"]: r for r in await conn.fetch(
            "SELECT idem_key, account_id, amount FROM ledger WHERE idem_key = ANY($1::text[])", keys)
    }
    fresh: list[Entry] = []
    skipped: list[str] = []
    for e in checked:
        old = existing.get(e.idem_key)
        if old is None:
            fresh.append(e)
        elif old["account_id"] == e.account_id and old["amount"] == e.amount:
            skipped.append(e.idem_key)
        else:
            raise IdempotencyConflict(
                f"key {e.idem_key!r} was posted as {old['amount']} to account {old['account_id']},"
                f" now {e.amount} to account {e.account_id}")

    before = {i: int(r["balance"]) for i, r in accounts.items()}
    running = dict(before)
    after_col: list[int] = []
    for e in fresh:
        running[e.account_id] += e.amount
        if not -MAX_AMOUNT <= running[e.account_id] <= MAX_AMOUNT:
            raise AmountError(f"account {e.account_id} balance would leave ±{MAX_AMOUNT}")
        after_col.append(running[e.account_id])

    posted: list[Posted] = []
    changes: list[BlockChange] = []
    if fresh:
        changed = sorted({e.account_id for e in fresh})
        deltas = [running[i] - before[i] for i in changed]
        # before the write: the rows we book and the balance moves are the same money
        if sum(e.amount for e in fresh) != sum(deltas):
            raise InvariantViolation("posted amounts and balance changes do not sum to the same total")
        rows = await conn.fetch(
            _POST_SQL,
            [e.account_id for e in fresh], [e.amount for e in fresh], after_col,
            [e.kind for e in fresh], [e.reference for e in fresh], [e.idem_key for e in fresh],
            [e.reverses for e in fresh], actor, now, changed, deltas, changed[0], changed[-1])
        inserted = sorted((r for r in rows if r["ledger"]), key=lambda r: r["id"])
        updated = [r for r in rows if not r["ledger"]]
        # Ids are drawn in insert order (ORDER BY n), so the k-th smallest id
        # is the k-th entry's row.  Every row must carry its entry's account,
        # amount and running balance (unique per account, as amounts are
        # non-zero): a swap cannot pass unnoticed.
        if len(inserted) != len(fresh):
            raise InvariantViolation("ledger insert returned a different number of rows")
        for e, after, r in zip(fresh, after_col, inserted):
            if (r["account_id"], r["amount"], r["balance"]) != (e.account_id, e.amount, after):
                raise InvariantViolation(f"ledger row for key {e.idem_key!r} came back different")
            posted.append(Posted(r["id"], e.account_id, e.amount, after, e.idem_key))
        if sum(p.amount for p in posted) != sum(deltas):
            raise InvariantViolation("posted amounts and balance changes do not sum to the same total")
        for r in updated:
            if r["balance"] != running[r["id"]]:
                raise InvariantViolation(
                    f"account {r['id']}: balance {r['balance']} after posting, expected {running[r['id']]}")
        if len(updated) != len(changed) or len({r["id"] for r in updated}) != len(changed):
            raise InvariantViolation("not every changed account was updated")
        # after the read: what the database now holds moved by exactly what we booked
        if sum(int(r["balance"]) - before[r["id"]] for r in updated) != sum(p.amount for p in posted):
            raise InvariantViolation("balance changes read back do not sum to the posted amounts")

        # promised credit that a non-negative balance has covered closes; then the
        # system blocks of every account that moved follow the debt rule
        covered = [i for i in changed if running[i] >= 0]
        if covered:
            await conn.execute(
                "UPDATE promised_payments SET closed_at = $2, closed_why = 'covered'"
                " WHERE account_id = ANY($1::bigint[]) AND closed_at IS NULL", covered, now)
        changes = await sync_system_blocks(conn, changed, actor=actor, now=now, locked={
            i: LockedAccount(running[i], accounts[i]["credit"], accounts[i]["unlimited"]) for i in changed})
    return PostResult(tuple(posted), tuple(skipped), running, tuple(changes))


async def ledger_history(conn: asyncpg.Connection, account_ids: Sequence[int], *,
                         limit: int = 100, offset: int = 0,
                         since: dt.datetime | None = None, until: dt.datetime | None = None,
                         ) -> list[dict[str, Any]]:
    """Ledger rows of the given accounts, newest first, paged."""
    rows = await conn.fetch(
        "SELECT id, account_id, amount, balance_after, kind, reference, reverses, actor, created_at"
        " FROM ledger WHERE account_id = ANY($1::bigint[])"
        " AND ($2::timestamptz IS NULL OR created_at >= $2)"
        " AND ($3::timestamptz IS NULL OR created_at < $3)"
        " ORDER BY id DESC LIMIT $4 OFFSET $5",
        list(account_ids), since, until, limit, offset)
    return [dict(r) for r in rows]
