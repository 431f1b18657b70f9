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
2. load the tariffs of the batch's accounts (``tariffs.load_book``) and rate
   once without counters to learn which counters the batch touches;
3. create the missing ones at zero (``INSERT … ON CONFLICT DO NOTHING``, so
   a concurrent creator is waited for, not overwritten), lock them all
   (``SELECT … FOR UPDATE``, key order) and rate again against their real
   values (the pure ``rating.rate``);
4. write the new counters, the per-day totals, and post the charges through
   the ledger's ``post_charges`` (which locks the accounts in id order and
   applies automatic blocks) with idempotency keys derived from
   (source, watermark, counter key);
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

Per-day totals (``usage_daily``) get each record's quantity on its local day;
a counter's charge in this batch goes to the day of the batch's latest
record on that counter (the days of one hourly batch are one or two).
"""

from __future__ import annotations

import hashlib
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from datetime import date, datetime, timezone, tzinfo
from typing import Final

import asyncpg

from billcore.billing.errors import InvariantViolation, UsageError
from billcore.billing.ledger import Entry, post_charges
from billcore.billing.money import MAX_AMOUNT
from billcore.billing.rating import (
    MAX_BATCH, TIME_CLASS, CounterKey, RatingResult, Rejected, ServiceKind, SessionUsage,
    TrafficUsage, rate,
)
from billcore.billing.tariffs import load_book, load_counters

__all__ = ["CommitResult", "MAX_SOURCE", "NO_WATERMARK", "commit_usage", "usage_key", "watermark"]

NO_WATERMARK: Final = -1
"""``watermark()`` of a source that never committed."""
MAX_SOURCE: Final = 128
_MAX_IDEM: Final = 256

Usage = TrafficUsage | SessionUsage


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
    epoch = int(key.period_start.timestamp())
    text = f"usage:{source}:{mark}:{key.account_id}:{key.service_id}:{key.klass}:{key.range_id}:{epoch}"
    if len(text) <= _MAX_IDEM:
        return text
    return "usage:sha256:" + hashlib.sha256(text.encode()).hexdigest()


async def watermark(conn: asyncpg.Connection, source: str) -> int:
    """The source's committed watermark, ``NO_WATERMARK`` (−1) if it never committed."""
    value = await conn.fetchval("SELECT watermark FROM ingest_watermarks WHERE source = $1",
                                _check_source(source))
    return NO_WATERMARK if value is None else int(value)


def _span(usage: Sequence[Usage], now: datetime) -> tuple[datetime, datetime]:
    earliest = now
    for u in usage:  # bounded by MAX_BATCH
        at = u.at if isinstance(u, TrafficUsage) else u.start
        if not isinstance(at, datetime) or at.utcoffset() is None:
            raise UsageError("usage timestamps must be aware datetimes")
        earliest = min(earliest, at.astimezone(timezone.utc))
    return earliest, now


def _daily(usage: Sequence[Usage], result: RatingResult, tz: tzinfo,
           ) -> dict[tuple[int, date, int], list[int]]:
    """(account, local day, class) -> [quantity, amount] of the rated records."""
    rejected = {id(r.usage) for r in result.rejected}
    days: dict[tuple[int, date, int], list[int]] = {}
    latest: dict[tuple[int, int], tuple[datetime, date]] = {}
    for u in usage:
        if id(u) in rejected:
            continue
        if isinstance(u, TrafficUsage):
            at, klass, quantity = u.at, u.klass, u.bytes
        else:
            at, klass, quantity = u.start, TIME_CLASS, u.seconds
        day = at.astimezone(tz).date()
        slot = days.setdefault((u.account_id, day, klass), [0, 0])
        slot[0] += quantity
        seen = latest.get((u.account_id, klass))
        if seen is None or at > seen[0]:
            latest[(u.account_id, klass)] = (at, day)
    for entry in result.entries:
        _, day = latest[(entry.account_id, entry.key.klass)]
        days.setdefault((entry.account_id, day, entry.key.klass), [0, 0])[1] += entry.amount
    return days


async def _create_counters(conn: asyncpg.Connection, keys: Iterable[CounterKey], now: datetime) -> None:
    """Make every counter of ``keys`` exist (zero) so that ``FOR UPDATE`` can lock it.

    Without this, two sources creating the same counter at once both find no
    row to lock, both insert, and the second's quantity overwrites the first's
    while the ledger keeps both charges.  ``ON CONFLICT DO NOTHING`` waits for
    a concurrent inserter to finish, so afterwards the row is there to lock.
    Keys go in lock order, like ``load_counters``, so two batches cannot deadlock.
    """
    ordered = sorted(set(keys), key=lambda k: (k.account_id, k.service_id, k.klass, k.range_id, k.period_start))
    if not ordered:
        return
    await conn.execute(
        "INSERT INTO usage_counters (account_id, service_id, class_id, range_id, period_start,"
        " quantity, charged, updated_at)"
        " SELECT a, s, c, r, p, 0, 0, $6::timestamptz FROM unnest($1::bigint[], $2::bigint[], $3::bigint[],"
        " $4::bigint[], $5::timestamptz[]) WITH ORDINALITY AS k(a, s, c, r, p, n) ORDER BY n"
        " ON CONFLICT (account_id, service_id, class_id, range_id, period_start) DO NOTHING",
        [k.account_id for k in ordered], [k.service_id for k in ordered], [k.klass for k in ordered],
        [k.range_id for k in ordered], [k.period_start for k in ordered], now)


async def commit_usage(conn: asyncpg.Connection, source: str, watermark: int,
                       usage: Sequence[Usage], now: datetime, *, tz: tzinfo = timezone.utc,
                       actor: str = "rating") -> CommitResult:
    """Rate ``usage`` and commit charges, counters and ``watermark`` in one transaction."""
    _check_source(source)
    if type(watermark) is not int or not 0 <= watermark <= 2**63 - 1:
        raise UsageError("watermark must be a non-negative int (a BIGINT)")
    if len(usage) > MAX_BATCH:
        raise UsageError(f"at most {MAX_BATCH} usage records per commit")
    if not isinstance(now, datetime) or now.utcoffset() is None:
        raise UsageError("now must be an aware datetime")
    now = now.astimezone(timezone.utc)
    async with conn.transaction():
        await conn.execute(
            "INSERT INTO ingest_watermarks(source, watermark, updated_at) VALUES ($1, $2, $3)"
            " ON CONFLICT (source) DO NOTHING", source, NO_WATERMARK, now)
        committed = int(await conn.fetchval(
            "SELECT watermark FROM ingest_watermarks WHERE source = $1 FOR UPDATE", source))
        if watermark <= committed:
            return CommitResult(source, committed, True, 0, 0, 0, ())

        accounts = sorted({u.account_id for u in usage})
        since, until = _span(usage, now)
        book = await load_book(conn, accounts, tz=tz, since=since, until=until)
        probe = rate(usage, {}, book, now)
        await _create_counters(conn, probe.counters.keys(), now)
        stored = await load_counters(conn, probe.counters.keys(), lock=True)
        result = rate(usage, {k: q for k, (q, _) in stored.items()}, book, now)
        if result.counters.keys() != probe.counters.keys():
            raise InvariantViolation("rating touched other counters on the second pass")

        charge = {e.key: e.amount for e in result.entries}
        keys = sorted(result.counters, key=lambda k: (k.account_id, k.service_id, k.klass,
                                                      k.range_id, k.period_start))
        quantities, charged = [], []
        for key in keys:
            before_q, before_c = stored.get(key, (0, 0))
            after_q = result.counters[key]
            after_c = before_c + charge.get(key, 0)
            if after_q < before_q or not 0 <= after_c <= MAX_AMOUNT:
                raise InvariantViolation(f"counter {key} would move {before_q}->{after_q}, {before_c}->{after_c}")
            quantities.append(after_q)
            charged.append(after_c)
        if keys:
            await conn.execute(
                "INSERT INTO usage_counters AS c (account_id, service_id, class_id, range_id,"
                " period_start, quantity, charged, updated_at)"
                " SELECT *, $8::timestamptz FROM unnest($1::bigint[], $2::bigint[], $3::bigint[],"
                " $4::bigint[], $5::timestamptz[], $6::bigint[], $7::bigint[])"
                " ON CONFLICT (account_id, service_id, class_id, range_id, period_start) DO UPDATE"
                " SET quantity = EXCLUDED.quantity, charged = EXCLUDED.charged, updated_at = EXCLUDED.updated_at",
                [k.account_id for k in keys], [k.service_id for k in keys], [k.klass for k in keys],
                [k.range_id for k in keys], [k.period_start for k in keys], quantities, charged, now)

        days = _daily(usage, result, tz)
        if days:
            ordered = sorted(days)
            await conn.execute(
                "INSERT INTO usage_daily AS d (account_id, day, class_id, quantity, amount)"
                " SELECT * FROM unnest($1::bigint[], $2::date[], $3::bigint[], $4::bigint[], $5::bigint[])"
                " ON CONFLICT (account_id, day, class_id) DO UPDATE"
                " SET quantity = d.quantity + EXCLUDED.quantity, amount = d.amount + EXCLUDED.amount",
                [k[0] for k in ordered], [k[1] for k in ordered], [k[2] for k in ordered],
                [days[k][0] for k in ordered], [days[k][1] for k in ordered])

        entries = [
            Entry(e.account_id, -e.amount, "traffic" if e.kind is ServiceKind.TRAFFIC else "charge",
                  usage_key(source, watermark, e.key), reference=f"usage {source}@{watermark}")
            for e in result.entries
        ]
        block_changes: tuple[object, ...] = ()
        charges: tuple[tuple[int, int, int], ...] = ()
        if entries:
            posted = await post_charges(conn, entries, actor=actor, now=now)
            if posted.skipped:
                # a key is (source, watermark, counter): it can only exist if this
                # watermark was committed, which the locked row just denied
                raise InvariantViolation(f"usage keys already booked: {posted.skipped[:3]}")
            block_changes = tuple(posted.block_changes)
            per_account: dict[int, int] = {}
            for p in posted.posted:
                per_account[p.account_id] = per_account.get(p.account_id, 0) - p.amount
            charges = tuple((a, amount, posted.balances[a]) for a, amount in sorted(per_account.items()))
        status = await conn.execute(
            "UPDATE ingest_watermarks SET watermark = $2, updated_at = $3 WHERE source = $1 AND watermark = $4",
            source, watermark, now, committed)
        if status != "UPDATE 1":
            raise InvariantViolation(f"watermark of {source} moved under its row lock")
    total = result.total
    return CommitResult(source, watermark, False, total, len(entries), len(keys), result.rejected,
                        block_changes, charges)
