"""Account blocks: administrative, user and system.

Theory of operation
-------------------
A block is a row in ``blocks``; it is *active* while ``lifted_at`` is NULL,
and a partial unique index allows one active block of each kind per
account.  An account with any active block is blocked (RADIUS refuses it).

* ``admin``  — set and lifted by an operator.
* ``user``   — the subscriber's own "internet off" switch.
* ``system`` — automatic, for debt.  Never set or lifted by hand: only
  ``sync_system_block`` touches it, and only it.

The debt rule (``in_debt``): an account that is not unlimited is in debt
when ``balance < -(credit + active promised credit)``.  ``sync_system_block``
makes the system block agree with that rule and returns what it changed;
every ledger posting and every credit/unlimited/promised change calls it
with the account row locked (``FOR UPDATE``), so two transactions never race
on the same block.  ``sync_system_blocks`` does the same for a whole batch
of accounts in three statements (read with promised credit, set, lift); the
one-account form is that with a list of one.  Setting or lifting returns a ``BlockChange``; callers
publish it on topic ``blocks`` after their transaction commits (``BlockChange.event()``).

Every change is also enqueued in the outbox (``account.blocked`` /
``account.unblocked``, the hook payload of docs/plugins.md with the balance
the account had under the lock), here, inside the transaction that makes
it: a block that commits is heard of (plugins, RADIUS's Disconnect) even if
the core dies a moment later; one that rolls back is heard of by nobody.
"""

from __future__ import annotations

import datetime as dt
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from typing import Any

import asyncpg

from billcore.billing.outbox import OutboxEvent, enqueue
from billcore.common.errors import InvariantViolation
from billcore.billing.ledger_errors import BlockRefused, InvalidValue, UnknownAccount
from billcore.db.rows import DbConnection

__all__ = [
    "BLOCK_KINDS",
    "MANUAL_KINDS",
    "BlockChange",
    "LockedAccount",
    "active_promised",
    "in_debt",
    "lift_block",
    "list_blocks",
    "outbox_event",
    "set_block",
    "sync_system_block",
    "sync_system_blocks",
]

BLOCK_KINDS = frozenset({"admin", "user", "system"})
MANUAL_KINDS = frozenset({"admin", "user"})
MAX_REASON = 1000


@dataclass(frozen=True, slots=True)
class BlockChange:
    """One block set or lifted: what RADIUS and plugins hear about."""

    account_id: int
    kind: str
    action: str          # "set" | "lifted"
    block_id: int
    reason: str
    at: dt.datetime
    by: str

    def event(self) -> dict[str, Any]:
        return {
            "account_id": self.account_id, "kind": self.kind, "action": self.action,
            "block_id": self.block_id, "reason": self.reason, "at": self.at, "by": self.by,
        }


def in_debt(balance: int, credit: int, promised: int, unlimited: bool) -> bool:
    """THE automatic-blocking rule."""
    return not unlimited and balance < -(credit + promised)


async def active_promised(conn: DbConnection, account_id: int, now: dt.datetime) -> int:
    """Sum of the account's promised credit that is open and not yet expired."""
    value = await conn.fetchval(
        "SELECT coalesce(sum(amount), 0)::bigint FROM promised_payments"
        " WHERE account_id = $1 AND closed_at IS NULL AND expires_at > $2",
        account_id, now)
    return int(value)


def _check_kind(kind: object, allowed: frozenset[str]) -> str:
    if type(kind) is not str or kind not in allowed:
        raise BlockRefused(f"block kind must be one of {sorted(allowed)}, got {kind!r}")
    return kind


def _check_reason(reason: object) -> str:
    if type(reason) is not str or len(reason) > MAX_REASON:
        raise InvalidValue(f"reason must be a string of at most {MAX_REASON} characters")
    return reason


async def _lock_account(conn: DbConnection, account_id: int) -> asyncpg.Record:
    row = await conn.fetchrow(
        "SELECT id, balance, credit, unlimited FROM accounts WHERE id = $1 FOR UPDATE", account_id)
    if row is None:
        raise UnknownAccount(f"account {account_id} does not exist")
    return row


def outbox_event(change: BlockChange, balance: int) -> OutboxEvent:
    """The outbox event of a block change: ``account.blocked`` or ``account.unblocked``."""
    return OutboxEvent("account.blocked" if change.action == "set" else "account.unblocked",
                       {**change.event(), "balance": balance}, change.account_id)


async def _announce(conn: DbConnection, changes: Iterable[BlockChange], balances: Mapping[int, int],
                    now: dt.datetime) -> None:
    await enqueue(conn, [outbox_event(change, balances[change.account_id]) for change in changes], now)


async def _insert(conn: DbConnection, account_id: int, kind: str, reason: str,
                  by: str, now: dt.datetime) -> BlockChange | None:
    block_id = await conn.fetchval(
        "INSERT INTO blocks(account_id, kind, reason, set_at, set_by) VALUES ($1, $2, $3, $4, $5)"
        " ON CONFLICT (account_id, kind) WHERE lifted_at IS NULL DO NOTHING RETURNING id",
        account_id, kind, reason, now, by)
    if block_id is None:
        return None
    return BlockChange(account_id, kind, "set", block_id, reason, now, by)


async def _lift(conn: DbConnection, account_id: int, kind: str, by: str,
                now: dt.datetime) -> BlockChange | None:
    row = await conn.fetchrow(
        "UPDATE blocks SET lifted_at = $3, lifted_by = $4"
        " WHERE account_id = $1 AND kind = $2 AND lifted_at IS NULL RETURNING id, reason",
        account_id, kind, now, by)
    if row is None:
        return None
    return BlockChange(account_id, kind, "lifted", row["id"], row["reason"], now, by)


async def set_block(conn: DbConnection, account_id: int, kind: str, *, actor: str,
                    reason: str = "", now: dt.datetime) -> BlockChange | None:
    """Set an ``admin`` or ``user`` block; ``None`` if one was already active."""
    _check_kind(kind, MANUAL_KINDS)
    _check_reason(reason)
    async with conn.transaction():
        account = await _lock_account(conn, account_id)
        change = await _insert(conn, account_id, kind, reason, actor, now)
        if change is not None:
            await _announce(conn, [change], {account_id: int(account["balance"])}, now)
        return change


async def lift_block(conn: DbConnection, account_id: int, kind: str, *, actor: str,
                     now: dt.datetime) -> BlockChange | None:
    """Lift the active ``admin`` or ``user`` block; ``None`` if there was none."""
    _check_kind(kind, MANUAL_KINDS)
    async with conn.transaction():
        account = await _lock_account(conn, account_id)
        change = await _lift(conn, account_id, kind, actor, now)
        if change is not None:
            await _announce(conn, [change], {account_id: int(account["balance"])}, now)
        return change


MAX_SYNC = 100_000   # accounts per set-based sync: the ledger's batch limit


@dataclass(frozen=True, slots=True)
class LockedAccount:
    """What the debt rule needs of an account row the caller holds ``FOR UPDATE``."""

    balance: int
    credit: int
    unlimited: bool


async def sync_system_blocks(conn: DbConnection, account_ids: Iterable[int], *, actor: str,
                             now: dt.datetime, locked: Mapping[int, LockedAccount] | None = None,
                             ) -> list[BlockChange]:
    """Make the system blocks of many accounts agree with the debt rule, in a
    constant number of statements, inside the caller's transaction.

    Without ``locked`` it locks and reads the accounts (in id order).  With
    ``locked`` the caller vouches that it holds these rows ``FOR UPDATE`` and
    that the values are current (``post_charges`` passes the balances it just
    wrote and read back), which saves re-reading the batch.  Then one read
    finds the open promised credit and the active system blocks — the only
    accounts that can need more than nothing — and at most one INSERT sets
    and one UPDATE lifts.

    Returns one change per account that changed, in ascending account id —
    the order the one-account-at-a-time loop produced — and enqueues their
    outbox events (one statement).
    """
    if not conn.is_in_transaction():
        raise InvariantViolation("sync_system_blocks must run inside the caller's transaction")
    ids = sorted(set(account_ids))
    if not ids:
        return []
    if len(ids) > MAX_SYNC:
        raise InvalidValue(f"at most {MAX_SYNC} accounts per block sync, got {len(ids)}")
    if locked is None:
        rows = await conn.fetch(
            "SELECT id, balance, credit, unlimited FROM accounts WHERE id = ANY($1::bigint[])"
            " AND id BETWEEN $2 AND $3 ORDER BY id FOR UPDATE", ids, ids[0], ids[-1])
        locked = {row["id"]: LockedAccount(row["balance"], row["credit"], row["unlimited"]) for row in rows}
    missing = [i for i in ids if i not in locked]
    if missing:
        raise UnknownAccount(f"account {missing[0]} does not exist")
    # Both sides filter on partial/unique indexes by account: a probe per id,
    # and only accounts with promised credit or a system block come back.
    extra = {row["account_id"]: (int(row["promised"]), row["blocked"]) for row in await conn.fetch(
        "SELECT account_id, coalesce(sum(amount), 0)::bigint AS promised, bool_or(blocked) AS blocked"
        " FROM (SELECT account_id, amount, false AS blocked FROM promised_payments"
        "       WHERE account_id = ANY($1::bigint[]) AND closed_at IS NULL AND expires_at > $2"
        "       UNION ALL SELECT account_id, 0, true FROM blocks"
        "       WHERE account_id = ANY($1::bigint[]) AND kind = 'system' AND lifted_at IS NULL) x"
        " GROUP BY account_id", ids, now)}
    debtors: list[int] = []
    reasons: list[str] = []
    clear: list[int] = []
    for i in ids:
        acc = locked[i]
        promised, blocked = extra.get(i, (0, False))
        if in_debt(acc.balance, acc.credit, promised, acc.unlimited):
            if not blocked:
                debtors.append(i)
                reasons.append(f"balance {acc.balance} below -(credit {acc.credit} + promised {promised})")
        elif blocked:
            clear.append(i)
    changes: dict[int, BlockChange] = {}
    if debtors:
        # ORDER BY n: block ids are drawn in ascending account order, as before.
        for block in await conn.fetch(
                "INSERT INTO blocks(account_id, kind, reason, set_at, set_by)"
                " SELECT a, 'system', r, $3, $4 FROM unnest($1::bigint[], $2::text[])"
                " WITH ORDINALITY AS t(a, r, n) ORDER BY n"
                " ON CONFLICT (account_id, kind) WHERE lifted_at IS NULL DO NOTHING"
                " RETURNING id, account_id, reason", debtors, reasons, now, actor):
            changes[block["account_id"]] = BlockChange(block["account_id"], "system", "set", block["id"],
                                                       block["reason"], now, actor)
    if clear:
        for block in await conn.fetch(
                "UPDATE blocks SET lifted_at = $2, lifted_by = $3 WHERE account_id = ANY($1::bigint[])"
                " AND kind = 'system' AND lifted_at IS NULL RETURNING id, account_id, reason",
                clear, now, actor):
            if block["account_id"] in changes:
                raise InvariantViolation(f"account {block['account_id']}: two system-block changes in one sync")
            changes[block["account_id"]] = BlockChange(block["account_id"], "system", "lifted", block["id"],
                                                       block["reason"], now, actor)
    # We hold every row lock, and only this function touches system blocks:
    # what we read is what we changed.
    if len(changes) != len(debtors) + len(clear):
        raise InvariantViolation(
            f"system blocks moved under the account locks: {len(changes)} changes,"
            f" expected {len(debtors)} set + {len(clear)} lifted")
    ordered = [changes[i] for i in sorted(changes)]
    await _announce(conn, ordered, {i: locked[i].balance for i in changes}, now)
    return ordered


async def sync_system_block(conn: DbConnection, account_id: int, *, actor: str,
                            now: dt.datetime) -> BlockChange | None:
    """``sync_system_blocks`` for one account: its change, or ``None``."""
    changes = await sync_system_blocks(conn, [account_id], actor=actor, now=now)
    if len(changes) > 1:
        raise InvariantViolation(f"account {account_id}: more than one system-block change")
    return changes[0] if changes else None


async def list_blocks(conn: DbConnection, account_ids: list[int], *,
                      active_only: bool = False, limit: int = 100, offset: int = 0) -> list[dict[str, Any]]:
    rows = await conn.fetch(
        "SELECT id, account_id, kind, reason, set_at, set_by, lifted_at, lifted_by FROM blocks"
        " WHERE account_id = ANY($1::bigint[]) AND ($2::bool IS FALSE OR lifted_at IS NULL)"
        " ORDER BY id DESC LIMIT $3 OFFSET $4",
        account_ids, active_only, limit, offset)
    return [dict(row) for row in rows]
