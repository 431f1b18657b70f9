"""The ledger: every balance change is one append-only row.

Theory of operation
-------------------
``post_charges(conn, entries, actor=..., now=...)`` is the one way money
moves (``post_batch``, below, is the same posting fed columns).  Inside the
CALLER's transaction it:

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
   re-syncs the system blocks of the touched accounts (``blocks``);
6. enqueues ``balance.low`` for every account the batch took from at or
   above its low-balance threshold to below it (``notify_lowbalance``: the
   threshold comes with the lock; no statement unless an account crossed).

Every step is one set-based statement over the whole batch (arrays through
``unnest``), so a batch of N entries costs a constant number of round trips,
not O(N): lock, key lookup, insert with balance update, promised close,
block read, block set, block lift.  Running balances are computed here in Python
integers; the sums are checked before the write and after the read.

It returns a ``PostResult`` with the rows posted, the keys skipped, the
final balances and the block changes; the caller publishes the block
changes after its commit.  An exception anywhere leaves the caller's
transaction to roll back: a failed posting books nothing.

``post_batch`` is the same posting for rows given as columns whose keys the
caller knows to be new (a usage batch above its committed watermark): no
step 3, no ``Entry``/``Posted`` object per row, the same checks per row.

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
from billcore.billing.notify_lowbalance import crossings
from billcore.billing.outbox import enqueue
from billcore.common.errors import InvariantViolation
from billcore.billing.ledger_errors import (
    AmountError, IdempotencyConflict, InvalidValue, NotInTransaction, UnknownAccount,
)
from billcore.common.money import MAX_AMOUNT, format_money
from billcore.db.rows import DbConnection, expect_row

__all__ = [
    "ENTRY_KINDS",
    "MAX_BATCH",
    "Entry",
    "Posted",
    "PostedBatch",
    "PostResult",
    "lock_accounts",
    "post_batch",
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


def _check_row(account_id: object, amount: object, kind: object, idem_key: object) -> None:
    """The rules every posted row follows, an ``Entry`` or a row of ``post_batch``'s columns."""
    if type(account_id) is not int or account_id <= 0:
        raise InvalidValue(f"account id must be a positive int, got {account_id!r}")
    if type(amount) is not int:
        raise AmountError(f"amount must be int micro-units, got {type(amount).__name__}")
    if amount == 0 or not -MAX_AMOUNT <= amount <= MAX_AMOUNT:
        raise AmountError(f"amount must be non-zero and within ±{format_money(MAX_AMOUNT)},"
                          f" got {format_money(amount)}")
    if kind not in ENTRY_KINDS:
        raise InvalidValue(f"unknown ledger kind {kind!r}")
    if type(idem_key) is not str or not 1 <= len(idem_key) <= MAX_KEY:
        raise InvalidValue(f"idempotency key must be a string of 1..{MAX_KEY} characters")


def _check_reference(reference: object) -> None:
    if type(reference) is not str or len(reference) > MAX_REFERENCE:
        raise InvalidValue(f"reference must be a string of at most {MAX_REFERENCE} characters")


def _check_entry(entry: object) -> Entry:
    if not isinstance(entry, Entry):
        raise InvalidValue(f"expected an Entry, got {type(entry).__name__}")
    _check_row(entry.account_id, entry.amount, entry.kind, entry.idem_key)
    _check_reference(entry.reference)
    if entry.reverses is not None and (type(entry.reverses) is not int or entry.reverses <= 0):
        raise InvalidValue("reverses must be a ledger id")
    return entry


def _check_call(conn: DbConnection, actor: object, rows: int) -> None:
    if not conn.is_in_transaction():
        raise NotInTransaction("post_charges runs inside the caller's transaction")
    if type(actor) is not str or not actor:
        raise InvalidValue("actor must be a non-empty string")
    if rows > MAX_BATCH:
        raise InvalidValue(f"at most {MAX_BATCH} entries per batch, got {rows}")


async def lock_accounts(conn: DbConnection, account_ids: Iterable[int]) -> dict[int, asyncpg.Record]:
    """Lock accounts in ascending id order; raise ``UnknownAccount`` for a missing one."""
    return await _lock(conn, account_ids, "id, user_id, balance, credit, unlimited, status")


_POST_COLS = "id, balance, credit, unlimited, low_balance"   # low_balance: balance.low's own threshold
_LOCK_SQL = {
    cols: f"SELECT {cols} FROM accounts WHERE id = ANY($1::bigint[]) AND id BETWEEN $2 AND $3"
          " ORDER BY id FOR UPDATE"
    for cols in ("id, user_id, balance, credit, unlimited, status", _POST_COLS)
}


async def _lock(conn: DbConnection, account_ids: Iterable[int], cols: str) -> dict[int, asyncpg.Record]:
    ids = sorted(set(account_ids))
    if not ids:
        return {}
    # The BETWEEN bounds are redundant for correctness; they let the planner
    # use an index range scan where ``= ANY`` alone of a large batch would
    # make it scan the whole table (batches are mostly id ranges).
    rows = await conn.fetch(_LOCK_SQL[cols], ids, ids[0], ids[-1])
    found = {row["id"]: row for row in rows}
    missing = [i for i in ids if i not in found]
    if missing:
        raise UnknownAccount(f"account {missing[0]} does not exist")
    return found


# The ledger rows and the balance moves in one statement (one round trip, one
# plan): both CTEs run against the accounts this transaction holds locked.
# What they wrote comes back as one row of arrays, checked as whole lists:
# the ledger rows' id, account, amount and balance_after in id order, then
# the accounts' id and balance in id order.  Kinds and references repeat
# across a batch: $4 and $5 hold each distinct one once, $14 and $15 every
# row's 1-based index into them (NULL for the whole column when there is
# only one; unnest pads a NULL array with NULLs): encoding the same text for
# every row was a good part of the client's CPU for a usage batch.
_POST_SQL = (
    "WITH ins AS ("
    " INSERT INTO ledger(account_id, amount, balance_after, kind, reference, idem_key, reverses, actor,"
    " created_at)"
    " SELECT a, m, b, ($4::text[])[coalesce(tk, 1)], ($5::text[])[coalesce(tr, 1)], i, v, $8, $9"
    " FROM unnest($1::bigint[], $2::bigint[], $3::bigint[], $14::int[], $15::int[], $6::text[], $7::bigint[])"
    " WITH ORDINALITY AS t(a, m, b, tk, tr, i, v, n)"
    " ORDER BY n RETURNING id, account_id, amount, balance_after),"
    " upd AS ("
    " UPDATE accounts SET balance = accounts.balance + d.delta"
    " FROM unnest($10::bigint[], $11::bigint[]) AS d(id, delta)"
    " WHERE accounts.id = d.id AND accounts.id BETWEEN $12 AND $13"
    " RETURNING accounts.id, accounts.balance)"
    " SELECT l.*, u.* FROM (SELECT array_agg(id ORDER BY id), array_agg(account_id ORDER BY id),"
    " array_agg(amount ORDER BY id), array_agg(balance_after ORDER BY id) FROM ins) l,"
    " (SELECT array_agg(id ORDER BY id), array_agg(balance ORDER BY id) FROM upd) u"
)


def _distinct(values: list[str]) -> tuple[list[str], list[int] | None]:
    """(each distinct value once, every value's 1-based index into them or None
    when there is only one): ``_POST_SQL``'s $4 and $14, $5 and $15."""
    distinct = list(dict.fromkeys(values))
    if len(distinct) == 1:
        return distinct, None
    at = {value: i for i, value in enumerate(distinct, 1)}
    return distinct, [at[value] for value in values]


async def post_charges(conn: DbConnection, entries: Sequence[Entry], *, actor: str,
                       now: dt.datetime | None = None) -> PostResult:
    """Post many ledger rows to many accounts inside the caller's transaction."""
    _check_call(conn, actor, len(entries))
    now = now or utcnow()
    checked = [_check_entry(entry) for entry in entries]
    keys = [entry.idem_key for entry in checked]
    if len(set(keys)) != len(keys):
        raise IdempotencyConflict("the same idempotency key appears twice in one batch")

    accounts = await _lock(conn, [entry.account_id for entry in checked], _POST_COLS)
    existing = {
        row["idem_key"]: row for row in await conn.fetch(
            "SELECT idem_key, account_id, amount FROM ledger WHERE idem_key = ANY($1::text[])", keys)
    }
    fresh: list[Entry] = []
    skipped: list[str] = []
    for entry in checked:
        old = existing.get(entry.idem_key)
        if old is None:
            fresh.append(entry)
        elif old["account_id"] == entry.account_id and old["amount"] == entry.amount:
            skipped.append(entry.idem_key)
        else:
            raise IdempotencyConflict(
                f"key {entry.idem_key!r} was posted as {old['amount']} to account {old['account_id']},"
                f" now {entry.amount} to account {entry.account_id}")

    ids, after_col, running, changes = await _post(
        conn, accounts, [entry.account_id for entry in fresh], [entry.amount for entry in fresh],
        [entry.kind for entry in fresh], [entry.reference for entry in fresh], [entry.idem_key for entry in fresh],
        [entry.reverses for entry in fresh], actor, now)
    posted = tuple(Posted(i, e.account_id, e.amount, after, e.idem_key)
                   for i, e, after in zip(ids, fresh, after_col))
    return PostResult(posted, tuple(skipped), running, tuple(changes))


@dataclass(frozen=True, slots=True)
class PostedBatch:
    """What ``post_batch`` booked."""

    ledger_ids: tuple[int, ...]              # the new rows' ids, in the order of the columns
    balances: Mapping[int, int]              # account id → balance after, every account of the batch
    block_changes: tuple[BlockChange, ...]


async def post_batch(conn: DbConnection, account_ids: Sequence[int], amounts: Sequence[int],
                     kinds: Sequence[str], idem_keys: Sequence[str], *, reference: str, actor: str,
                     now: dt.datetime) -> PostedBatch:
    """``post_charges`` of rows given as columns, for a caller whose keys are all new.

    The caller vouches that no key of ``idem_keys`` is in the ledger yet (usage
    keys name a watermark above the committed one, whose row the caller holds
    locked), so step 3's lookup is skipped: a key that is there all the same
    fails the insert on the UNIQUE index (``asyncpg.UniqueViolationError``) and
    nothing is booked.  Every row is checked by the rules of an ``Entry``;
    locking, the balance checks and blocks are ``post_charges``' own.  No
    object per row: a usage batch posts hundreds of rows many times a second.
    """
    _check_call(conn, actor, len(account_ids))
    _check_reference(reference)
    if not len(amounts) == len(kinds) == len(idem_keys) == len(account_ids):
        raise InvalidValue("post_batch columns differ in length")
    for account_id, amount, kind, idem_key in zip(account_ids, amounts, kinds, idem_keys):
        _check_row(account_id, amount, kind, idem_key)
    if len(set(idem_keys)) != len(idem_keys):
        raise IdempotencyConflict("the same idempotency key appears twice in one batch")
    accounts = await _lock(conn, account_ids, _POST_COLS)
    ids, _, running, changes = await _post(
        conn, accounts, list(account_ids), list(amounts), list(kinds), [reference] * len(account_ids),
        list(idem_keys), None, actor, now)
    return PostedBatch(tuple(ids), running, tuple(changes))


async def _post(conn: DbConnection, accounts: Mapping[int, asyncpg.Record], account_col: list[int],
                amount_col: list[int], kinds: list[str], references: list[str], keys: list[str],
                reverses: list[int | None] | None, actor: str, now: dt.datetime,
                ) -> tuple[list[int], list[int], dict[int, int], list[BlockChange]]:
    """Steps 4 and 5 for checked rows of locked ``accounts``: (ledger ids, balance after each
    row, balance of every locked account, block changes).  ``reverses`` None: none reverses."""
    before = {account_id: int(account["balance"]) for account_id, account in accounts.items()}
    running = dict(before)
    after_col: list[int] = []
    for account_id, amount in zip(account_col, amount_col):
        balance = running[account_id] + amount
        if not -MAX_AMOUNT <= balance <= MAX_AMOUNT:
            raise AmountError(f"account {account_id} balance would leave ±{format_money(MAX_AMOUNT)}")
        running[account_id] = balance
        after_col.append(balance)
    if not account_col:
        return [], [], running, []

    changed = sorted(set(account_col))
    deltas = [running[i] - before[i] for i in changed]
    total = sum(amount_col)
    # before the write: the rows we book and the balance moves are the same money
    if total != sum(deltas):
        raise InvariantViolation("posted amounts and balance changes do not sum to the same total")
    kind_set, kind_index = _distinct(kinds)
    reference_set, reference_index = _distinct(references)
    posted = await conn.fetchrow(
        _POST_SQL, account_col, amount_col, after_col, kind_set, reference_set, keys,
        reverses if reverses is not None and any(reversed_id is not None for reversed_id in reverses) else None,
        actor, now, changed, deltas, changed[0], changed[-1], kind_index, reference_index)
    ids, accounts_back, amounts_back, balances_back, updated_ids, updated_balances = expect_row(posted, "ledger insert")
    # Ids are drawn in insert order (ORDER BY n), so the k-th smallest id
    # is the k-th row's.  Every row must carry its account, amount and
    # running balance (unique per account, as amounts are non-zero): a swap
    # cannot pass unnoticed.
    if ids is None or len(ids) != len(account_col):
        raise InvariantViolation("ledger insert returned a different number of rows")
    if accounts_back != account_col or amounts_back != amount_col or balances_back != after_col:
        raise InvariantViolation("ledger rows came back different from the rows posted")
    if sum(amounts_back) != sum(deltas):
        raise InvariantViolation("posted amounts and balance changes do not sum to the same total")
    updated = dict(zip(updated_ids or (), updated_balances or ()))
    for account_id, balance in updated.items():
        if balance != running[account_id]:
            raise InvariantViolation(
                f"account {account_id}: balance {balance} after posting, expected {running[account_id]}")
    if len(updated) != len(changed) or len(updated_ids or ()) != len(changed):
        raise InvariantViolation("not every changed account was updated")
    # after the read: what the database now holds moved by exactly what we booked
    if sum(int(b) - before[i] for i, b in updated.items()) != total:
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
    # balance.low: arithmetic on what we hold; a statement only when an account crossed
    low = crossings(changed, before, running, {i: accounts[i]["low_balance"] for i in changed})
    if low:
        await enqueue(conn, low, now)
    return ids, after_col, running, changes


async def ledger_history(conn: DbConnection, account_ids: Sequence[int], *,
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
    return [dict(row) for row in rows]
