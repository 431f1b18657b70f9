"""Exactly-once commit of rated usage: counters, ledger rows and watermark together.

Theory of operation
-------------------
Every usage source (a NetFlow worker's journal, a RADIUS server's
accounting stream) numbers its input with a monotone *watermark* (the
journal offset just past the batch).  ``commit_usage`` does, in ONE
transaction:

1. lock the source's row in ``ingest_watermarks`` (created at −1 on first
   use); if the batch's watermark is ``<=`` the committed one the batch was
   already charged: nothing else happens (``CommitResult.duplicate``);
2. load the tariffs of the batch's accounts (``tariffs.load_book``) and
   resolve the batch to the counters it moves (``rating.resolve``: no
   counter values needed yet);
3. create the missing counters at zero (``INSERT … ON CONFLICT DO NOTHING``,
   so a concurrent creator is waited for, not overwritten), lock them all
   (``SELECT … FOR UPDATE``, key order) and rate once against their locked
   values (``rating.settle``, the second half of the pure ``rate``);
4. write the new counters, the per-day totals, and post the charges through
   the ledger's ``post_batch`` (which locks the accounts in id order and
   applies automatic blocks) with idempotency keys derived from
   (source, watermark, counter key), which no committed batch can have used;
5. advance the watermark.

An exception anywhere rolls all of it back.  A restarted source asks
``watermark(conn, source)`` and re-sends from there; a re-sent batch at or
below the watermark is ignored as a whole.

Counters are cumulative (see ``rating``), so the sum of charges does not
depend on how the usage was cut into batches.

The usage records (from ``billcore.billing.rating``):

* ``TrafficUsage(account_id, klass, at, bytes, service_id=None)`` — bytes of
  traffic class ``klass`` (a ``traffic_classes.id``), ``at`` = the aware
  start of the worker's aggregation bucket (its hour); the NetFlow workers
  send one per (account, class, direction, hour) — direction is not a
  rating dimension, so in and out of one class add up unless the operator
  defines separate classes for them.
* ``SessionUsage(account_id, start, seconds, service_id=None)`` — RADIUS
  session time, whole seconds from an aware ``start``; a session piece is
  cut at period and time-range borders by rating.

Usage rating cannot place (unknown account, no linked service of the kind,
no rate for the class, stamped in the future) comes back in
``CommitResult.rejected``; the watermark still advances, so the caller owns
keeping those records (they are never silently dropped here).

Journal epochs.  A NetFlow worker's watermark is an offset in *one* journal;
the row keeps that journal's identity (``epoch``, schema 0010).  A worker
that finds another journal (wiped, moved, truncated below the watermark)
begins a new epoch with ``begin_epoch`` (compare-and-set on the old one,
recorded in ``ingest_epochs``), and its journal's offsets continue above the
watermark (``netflow.journal``), so the watermark stays monotone and no
idempotency key repeats.  ``commit_usage(…, epoch=E)`` refuses a batch of any
other epoch (``EpochMismatch``): a stale worker cannot charge into the new one.

Billing time never runs backwards per source: ``commit_usage`` uses
``max(now, the source's last commit time)``, so after a backward step of the
wall clock usage that was on time is not refused as "future", and counters and
ledger rows of one source keep their order.

Per-day totals (``usage_daily``) get each record's quantity on its local day;
a counter's charge in this batch goes to the day of the batch's latest
record on that counter (the days of one hourly batch are one or two).
"""

from __future__ import annotations

import hashlib
from collections.abc import Sequence
from dataclasses import dataclass
from datetime import date, datetime, timezone, tzinfo
from typing import ClassVar, Final

import asyncpg

from billcore.billing.outbox import enqueue_one
from billcore.common.errors import InvariantViolation, UsageError
from billcore.billing.ledger import post_batch
from billcore.common.money import MAX_AMOUNT
from billcore.billing.rating import (
    MAX_BATCH, TIME_CLASS, CounterKey, CounterTuple, Move, Rejected, ServiceKind, SessionUsage,
    TrafficUsage, resolve, settle,
)
from billcore.billing.tariffs import load_book
from billcore.db.rows import DbConnection, expect_row

__all__ = ["CommitResult", "EPOCH_REASONS", "EpochMismatch", "JournalMark", "MAX_SOURCE", "NO_WATERMARK",
           "begin_epoch", "commit_usage", "journal_mark", "usage_key", "watermark"]

NO_WATERMARK: Final = -1
"""``watermark()`` of a source that never committed."""
MAX_SOURCE: Final = 128
_MAX_IDEM: Final = 256

MAX_EPOCH: Final = 64
EPOCH_REASONS: Final = ("first", "adopted", "replaced", "truncated")
"""Why a source begins an epoch: its first journal; a journal from before epochs taken over;
a journal that is not the counted one (wiped, moved, new); the counted one cut below the watermark."""

Usage = TrafficUsage | SessionUsage


class EpochMismatch(UsageError):
    """A batch of another journal epoch than the source's current one (a stale or second worker)."""

    code: ClassVar[str] = "billing.epoch_mismatch"


@dataclass(frozen=True, slots=True)
class JournalMark:
    """A source's committed watermark and the journal epoch it counts (None: no epoch yet)."""

    watermark: int
    epoch: str | None


@dataclass(frozen=True, slots=True)
class CommitResult:
    """What ``commit_usage`` did."""

    source: str
    watermark: int            # the committed watermark after the call
    duplicate: bool           # True: the batch was at or below it and was ignored
    charged: int              # micro-units booked by this call (>= 0)
    entries: int              # ledger rows posted
    counters: int             # counters written
    rejected: tuple[Rejected, ...]
    block_changes: tuple[object, ...] = ()   # ledger BlockChange values, to publish after commit
    # per account charged: (account_id, micro-units charged, balance after), for the batch.rated hook
    charges: tuple[tuple[int, int, int], ...] = ()


def _check_source(source: object) -> str:
    if type(source) is not str or not 1 <= len(source) <= MAX_SOURCE:
        raise UsageError(f"source must be a string of 1..{MAX_SOURCE} characters")
    return source


def usage_key(source: str, mark: int, key: CounterKey) -> str:
    """The ledger idempotency key of one counter's charge in one batch."""
    return _usage_keys(source, mark, [(key.account_id, key.service_id, key.klass, key.range_id,
                                       key.period_start)])[0]


def _usage_keys(source: str, mark: int, keys: Sequence[CounterTuple]) -> list[str]:
    """``usage_key`` of many counters of one batch (period epochs computed once each)."""
    prefix = f"usage:{source}:{mark}:"
    epochs: dict[datetime, int] = {}
    out = []
    for account, service, klass, range_id, start in keys:
        epoch = epochs.get(start)
        if epoch is None:
            epoch = epochs[start] = int(start.timestamp())
        text = f"{prefix}{account}:{service}:{klass}:{range_id}:{epoch}"
        out.append(text if len(text) <= _MAX_IDEM else "usage:sha256:" + hashlib.sha256(text.encode()).hexdigest())
    return out


async def watermark(conn: DbConnection, source: str) -> int:
    """The source's committed watermark, ``NO_WATERMARK`` (−1) if it never committed."""
    value = await conn.fetchval("SELECT watermark FROM ingest_watermarks WHERE source = $1",
                                _check_source(source))
    return NO_WATERMARK if value is None else int(value)


def _check_epoch(epoch: object) -> str:
    if type(epoch) is not str or not 1 <= len(epoch) <= MAX_EPOCH or not epoch.isalnum() or not epoch.isascii():
        raise UsageError(f"epoch must be 1..{MAX_EPOCH} ASCII letters and digits")
    return epoch


async def journal_mark(conn: DbConnection, source: str) -> JournalMark:
    """The source's watermark (``NO_WATERMARK`` if it never committed) and its journal epoch."""
    row = await conn.fetchrow("SELECT watermark, epoch FROM ingest_watermarks WHERE source = $1",
                              _check_source(source))
    return JournalMark(NO_WATERMARK, None) if row is None else JournalMark(int(row[0]), row[1])


async def _locked_row(conn: DbConnection, source: str, now: datetime) -> asyncpg.Record:
    """The source's watermark row, created at ``NO_WATERMARK`` on first use, locked (inside a transaction)."""
    query = "SELECT watermark, epoch, updated_at FROM ingest_watermarks WHERE source = $1 FOR UPDATE"
    row = await conn.fetchrow(query, source)
    if row is None:  # first batch of this source
        await conn.execute(
            "INSERT INTO ingest_watermarks(source, watermark, updated_at) VALUES ($1, $2, $3)"
            " ON CONFLICT (source) DO NOTHING", source, NO_WATERMARK, now)
        row = expect_row(await conn.fetchrow(query, source), f"watermark of {source}")
    return row


async def begin_epoch(conn: DbConnection, source: str, epoch: str, *, expect: str | None, reason: str,
                      journal_end: int, now: datetime) -> JournalMark | None:
    """Make ``epoch`` the source's journal epoch if it is ``expect`` now; None if it is not.

    Idempotent: a repeated call for the epoch already in place answers its mark.
    The watermark does not move (the worker's journal continues above it).
    """
    _check_source(source)
    _check_epoch(epoch)
    if expect is not None:
        _check_epoch(expect)
    if reason not in EPOCH_REASONS:
        raise UsageError(f"reason must be one of {', '.join(EPOCH_REASONS)}")
    if type(journal_end) is not int or not 0 <= journal_end <= 2**63 - 1:
        raise UsageError("journal_end must be a non-negative int (a BIGINT)")
    now = _aware(now)
    async with conn.transaction():
        row = await _locked_row(conn, source, now)
        mark, current = int(row["watermark"]), row["epoch"]
        if current == epoch:
            return JournalMark(mark, epoch)
        if current != expect:
            return None
        await conn.execute("UPDATE ingest_watermarks SET epoch = $2 WHERE source = $1", source, epoch)
        await conn.execute(
            "INSERT INTO ingest_epochs(source, epoch, previous, reason, watermark, journal_end, began_at)"
            " VALUES ($1, $2, $3, $4, $5, $6, $7)", source, epoch, current, reason, mark, journal_end, now)
    return JournalMark(mark, epoch)


def _aware(now: object) -> datetime:
    if not isinstance(now, datetime) or now.utcoffset() is None:
        raise UsageError("now must be an aware datetime")
    return now.astimezone(timezone.utc)


def _span(usage: Sequence[Usage], now: datetime) -> tuple[datetime, datetime]:
    earliest = now
    seen: set[datetime] = set()  # a batch has few distinct stamps (one per hour bucket)
    for record in usage:  # bounded by MAX_BATCH
        at = record.at if isinstance(record, TrafficUsage) else record.start
        if not isinstance(at, datetime):
            raise UsageError("usage timestamps must be aware datetimes")
        if at in seen:
            continue
        if at.utcoffset() is None:
            raise UsageError("usage timestamps must be aware datetimes")
        seen.add(at)
        earliest = min(earliest, at.astimezone(timezone.utc))
    return earliest, now


def _daily(usage: Sequence[Usage], rejected: Sequence[Rejected], moves: Sequence[Move], tz: tzinfo,
           ) -> dict[tuple[int, date, int], list[int]]:
    """(account, local day, class) -> [quantity, amount] of the rated records."""
    skip = {id(refused.usage) for refused in rejected}
    days: dict[tuple[int, date, int], list[int]] = {}
    latest: dict[tuple[int, int], tuple[datetime, date]] = {}
    local: dict[datetime, date] = {}
    for record in usage:
        if skip and id(record) in skip:
            continue
        if isinstance(record, TrafficUsage):
            at, klass, quantity = record.at, record.klass, record.bytes
        else:
            at, klass, quantity = record.start, TIME_CLASS, record.seconds
        day = local.get(at)
        if day is None:
            day = local[at] = at.astimezone(tz).date()
        slot = days.get((record.account_id, day, klass))
        if slot is None:
            days[(record.account_id, day, klass)] = [quantity, 0]
        else:
            slot[0] += quantity
        seen = latest.get((record.account_id, klass))
        if seen is None or at > seen[0]:
            latest[(record.account_id, klass)] = (at, day)
    for key, _, _, amount, _ in moves:
        if amount:
            account, klass = key[0], key[2]
            _, day = latest[(account, klass)]
            days.setdefault((account, day, klass), [0, 0])[1] += amount
    return days


# Counter keys travel as columns: the account id and, per key, the 1-based
# index ``t`` of its (service, class, range, period start) among the few
# distinct ones of the batch, which travel once each.  A timestamp per key
# would cost the core more CPU than the rest of the statement: asyncpg
# encodes every datetime in Python.
_KEYS = "unnest($1::bigint[], $2::int[]) WITH ORDINALITY AS k(a, t, n)"
_TAIL = "($3::bigint[])[k.t], ($4::bigint[])[k.t], ($5::bigint[])[k.t], ($6::timestamptz[])[k.t]"


def _key_columns(keys: Sequence[CounterTuple]) -> tuple[list[int], list[int], list[int], list[int],
                                                          list[int], list[datetime]]:
    """The parameters $1..$6 of ``_KEYS``/``_TAIL`` for ``keys``, in their order."""
    tails: dict[tuple[int, int, int, datetime], int] = {}
    index = [tails.setdefault(key[1:], len(tails) + 1) for key in keys]
    return ([key[0] for key in keys], index, [tail[0] for tail in tails], [tail[1] for tail in tails],
            [tail[2] for tail in tails], [tail[3] for tail in tails])


async def _lock_counters(conn: DbConnection, keys: Sequence[CounterTuple],
                         columns: tuple[list[int], list[int], list[int], list[int], list[int], list[datetime]],
                         now: datetime) -> tuple[list[int], list[int]]:
    """Create the missing counters of ``keys`` (sorted; ``columns`` = ``_key_columns(keys)``)
    at zero, lock them all, read them.

    Returns (quantities, charged), aligned with ``keys``.

    The create comes first: without it, two sources creating the same counter
    at once both find no row to lock, both insert, and the second's quantity
    overwrites the first's while the ledger keeps both charges.  ``ON CONFLICT
    DO NOTHING`` waits for a concurrent inserter to finish, so afterwards the
    row is there to lock.  Both statements go in key order (``ORDER BY n`` of
    the sorted keys), so two batches cannot deadlock.
    """
    if not keys:
        return [], []
    await conn.execute(
        "INSERT INTO usage_counters (account_id, service_id, class_id, range_id, period_start,"
        f" quantity, charged, updated_at) SELECT k.a, {_TAIL}, 0, 0, $7::timestamptz FROM {_KEYS}"
        " ORDER BY k.n ON CONFLICT (account_id, service_id, class_id, range_id, period_start) DO NOTHING",
        *columns, now)
    rows = await conn.fetch(
        f"SELECT k.n, c.quantity, c.charged FROM {_KEYS} JOIN usage_counters c"
        f" ON (c.account_id, c.service_id, c.class_id, c.range_id, c.period_start) = (k.a, {_TAIL})"
        " ORDER BY k.n FOR UPDATE OF c", *columns)
    if len(rows) != len(keys):
        raise InvariantViolation(f"locked {len(rows)} of {len(keys)} usage counters after creating them")
    quantities = [0] * len(keys)
    charged = [0] * len(keys)
    for n, quantity, amount in rows:
        quantities[n - 1] = quantity
        charged[n - 1] = amount
    return quantities, charged


async def commit_usage(conn: DbConnection, source: str, watermark: int,
                       usage: Sequence[Usage], now: datetime, *, tz: tzinfo = timezone.utc,
                       actor: str = "rating", epoch: str | None = None,
                       rated_event: bool = False) -> CommitResult:
    """Rate ``usage`` and commit charges, counters and ``watermark`` in one transaction.

    ``rated_event``: enqueue ``batch.rated`` (per account: amount and balance)
    in the outbox with the charges, when the batch charged anything (the
    caller asks only while a plugin hook listens).

    ``epoch``: the journal epoch the watermark belongs to (NetFlow); a batch of
    another epoch than the source's is refused (`EpochMismatch`), nothing booked.
    """
    _check_source(source)
    if type(watermark) is not int or not 0 <= watermark <= 2**63 - 1:
        raise UsageError("watermark must be a non-negative int (a BIGINT)")
    if len(usage) > MAX_BATCH:
        raise UsageError(f"at most {MAX_BATCH} usage records per commit")
    if epoch is not None:
        _check_epoch(epoch)
    now = _aware(now)
    async with conn.transaction():
        row = await _locked_row(conn, source, now)
        committed = int(row["watermark"])
        if epoch is not None and row["epoch"] != epoch:
            raise EpochMismatch(f"{source}: batch of journal epoch {epoch}, the source counts {row['epoch']}")
        if watermark <= committed:
            return CommitResult(source, committed, True, 0, 0, 0, ())
        # billing time never runs backwards per source: a wall clock stepped back
        # must not refuse as "future" what it accepted a moment ago
        now = max(now, row["updated_at"])

        accounts = sorted({record.account_id for record in usage})
        since, until = _span(usage, now)
        book = await load_book(conn, accounts, tz=tz, since=since, until=until)
        resolved = resolve(usage, book, now)
        keys = sorted(resolved.deltas)  # tuple order is the lock order
        columns = _key_columns(keys)
        before_q, before_c = await _lock_counters(conn, keys, columns, now)
        moves = settle(resolved, dict(zip(keys, before_q)))  # in the batch's order

        moved = {move[0]: move for move in moves}
        if len(moved) != len(keys):
            raise InvariantViolation("rating moved other counters than the ones it resolved")
        quantities, charged = [], []
        for key, old_q, old_c in zip(keys, before_q, before_c):
            _, rated_q, new_q, amount, _ = moved[key]
            new_c = old_c + amount
            if rated_q != old_q or new_q < old_q or not 0 <= new_c <= MAX_AMOUNT:
                raise InvariantViolation(f"counter {key} would move {old_q}->{new_q}, {old_c}->{new_c}")
            quantities.append(new_q)
            charged.append(new_c)
        if keys:
            # every row exists and is locked (``_lock_counters``): a plain UPDATE
            status = await conn.execute(
                "UPDATE usage_counters c SET quantity = k.q, charged = k.c, updated_at = $9::timestamptz"
                " FROM unnest($1::bigint[], $2::int[], $7::bigint[], $8::bigint[]) WITH ORDINALITY AS k(a, t, q, c, n)"
                f" WHERE (c.account_id, c.service_id, c.class_id, c.range_id, c.period_start) = (k.a, {_TAIL})",
                *columns, quantities, charged, now)
            if status != f"UPDATE {len(keys)}":
                raise InvariantViolation(f"{status} of {len(keys)} locked usage counters")

        days = _daily(usage, resolved.rejected, moves, tz)
        if days:
            ordered = sorted(days)
            totals = [days[key] for key in ordered]
            tails: dict[tuple[date, int], int] = {}
            index = [tails.setdefault(key[1:], len(tails) + 1) for key in ordered]
            await conn.execute(
                "INSERT INTO usage_daily AS d (account_id, day, class_id, quantity, amount)"
                " SELECT k.a, ($3::date[])[k.t], ($4::bigint[])[k.t], k.q, k.m"
                " FROM unnest($1::bigint[], $2::int[], $5::bigint[], $6::bigint[]) WITH ORDINALITY AS k(a, t, q, m, n)"
                " ORDER BY k.n ON CONFLICT (account_id, day, class_id) DO UPDATE"
                " SET quantity = d.quantity + EXCLUDED.quantity, amount = d.amount + EXCLUDED.amount",
                [key[0] for key in ordered], index, [tail[0] for tail in tails], [tail[1] for tail in tails],
                [total[0] for total in totals], [total[1] for total in totals])

        charging = [move for move in moves if move[3]]  # a ledger row each, in the batch's order
        block_changes: tuple[object, ...] = ()
        charges: tuple[tuple[int, int, int], ...] = ()
        if charging:
            account_col = [key[0] for key, *_ in charging]
            amount_col = [-amount for _, _, _, amount, _ in charging]
            kinds = ["traffic" if kind is ServiceKind.TRAFFIC else "charge" for *_, kind in charging]
            # a key is (source, watermark, counter): it can only exist if this
            # watermark was committed, which the locked row just denied
            try:
                keys_booked = _usage_keys(source, watermark, [move[0] for move in charging])
                posted = await post_batch(conn, account_col, amount_col, kinds, keys_booked,
                                          reference=f"usage {source}@{watermark}", actor=actor, now=now)
            except asyncpg.UniqueViolationError as exc:
                raise InvariantViolation(f"usage keys already booked: {exc.detail or exc}") from exc
            block_changes = tuple(posted.block_changes)
            per_account: dict[int, int] = {}
            for account_id, amount in zip(account_col, amount_col):
                per_account[account_id] = per_account.get(account_id, 0) - amount
            charges = tuple((account_id, amount, posted.balances[account_id])
                            for account_id, amount in sorted(per_account.items()))
            if rated_event:
                await enqueue_one(conn, "batch.rated", {"batch_id": f"{source}@{watermark}", "charges": [
                    {"account_id": a, "amount": m, "balance": b} for a, m, b in charges]}, now)
        status = await conn.execute(
            "UPDATE ingest_watermarks SET watermark = $2, updated_at = $3 WHERE source = $1 AND watermark = $4",
            source, watermark, now, committed)
        if status != "UPDATE 1":
            raise InvariantViolation(f"watermark of {source} moved under its row lock")
    total = sum(move[3] for move in charging)
    return CommitResult(source, watermark, False, total, len(charging), len(keys), resolved.rejected,
                        block_changes, charges)
