"""The outbox's second stage: fan-out, claims with leases, acknowledgements.

Theory of operation
-------------------
``billcore.billing.outbox.enqueue`` writes an event inside the transaction
that causes it.  From there, three steps, each one transaction:

1. **dispatch** (the core's dispatcher): take undispatched events in id
   order (``FOR UPDATE SKIP LOCKED``, so two dispatchers never split one
   event), ask every *router* which (channel, target) must hear each one,
   insert those deliveries (``ON CONFLICT DO NOTHING``: a router asked twice
   about one event adds nothing) and mark the events dispatched.  A router
   is a function of the events and the database *at dispatch time* (which
   plugin subscribes, which address a subscriber prefers).
2. **claim** (a channel's deliverer): take due pending deliveries of one
   channel and lease them: ``next_at`` moves to the lease's end and
   ``attempts`` grows by one.  A deliverer that dies holding a lease loses
   nothing: when the lease runs out the row is due again.
3. **done** / **failed**: delivered rows are kept (for the operator) until
   ``prune``; a failure is retried after ``backoff(attempt)``, and after
   ``max_attempts`` tries (or at once when the failure is permanent) the row
   is *dead*, kept until an operator retries it.

So every committed event reaches every channel that routed it **at least
once**; receivers de-duplicate on the event id, which never changes.  There
is no order across events: a retried delivery may arrive after a later one.

Everything here takes ``now`` as an argument (tests drive the clock), and
the backoff schedule is a pure function.
"""

from __future__ import annotations

import datetime as dt
import json
from collections.abc import Awaitable, Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

from billcore.billing.audit import jsonable
from billcore.common.errors import InvariantViolation
from billcore.db.rows import DbConnection

__all__ = [
    "StoredEvent", "NewDelivery", "Router", "Claimed", "DeliveryPolicy", "DispatchResult", "FailResult",
    "ChannelStats", "OutboxStats", "PruneResult", "STATES", "MAX_CLAIM", "MAX_LEASE",
    "backoff", "dispatch", "claim", "done", "failed", "retry", "stats", "list_deliveries", "prune",
]

STATES = ("pending", "delivered", "dead")
MAX_CLAIM = 1000          # deliveries per claim
MAX_LEASE = 3600          # seconds a claim may hold its rows
MAX_ERROR = 1000          # characters of last_error (the column's bound)


@dataclass(frozen=True, slots=True)
class StoredEvent:
    id: int
    event: str
    account_id: int | None
    payload: dict[str, Any]
    created_at: dt.datetime


@dataclass(frozen=True, slots=True)
class NewDelivery:
    event_id: int
    channel: str
    target: str = ""
    message: Mapping[str, Any] = field(default_factory=dict)


Router = Callable[[DbConnection, Sequence[StoredEvent], dt.datetime], Awaitable[list[NewDelivery]]]


@dataclass(frozen=True, slots=True)
class DeliveryPolicy:
    """``[outbox]``: how often and how far apart a failed delivery is tried."""

    max_attempts: int = 10
    backoff_base: float = 10.0
    backoff_cap: float = 3600.0


def backoff(attempt: int, base: float, cap: float) -> float:
    """Seconds before try ``attempt + 1`` after try ``attempt`` (1-based) failed:
    ``base``, then doubling, never more than ``cap``."""
    if attempt < 1:
        raise InvariantViolation(f"backoff after attempt {attempt}")
    return float(min(cap, base * 2 ** min(attempt - 1, 60)))


# -- dispatch --------------------------------------------------------------

@dataclass(frozen=True, slots=True)
class DispatchResult:
    events: int
    deliveries: int
    channels: tuple[str, ...]          # channels that got at least one new delivery
    oldest: dt.datetime | None         # created_at of the oldest event dispatched (for the lag)


def _payload(value: Any) -> dict[str, Any]:
    data = json.loads(value) if isinstance(value, str) else value
    return dict(data) if isinstance(data, Mapping) else {}


async def dispatch(conn: DbConnection, routers: Sequence[Router], now: dt.datetime,
                   limit: int = 500) -> DispatchResult:
    """Fan out up to ``limit`` undispatched events, in one transaction."""
    async with conn.transaction():
        rows = await conn.fetch(
            "SELECT id, event, account_id, payload::text AS payload, created_at FROM outbox_events"
            " WHERE dispatched_at IS NULL ORDER BY id LIMIT $1 FOR UPDATE SKIP LOCKED", limit)
        if not rows:
            return DispatchResult(0, 0, (), None)
        events = [StoredEvent(int(r["id"]), r["event"], r["account_id"], _payload(r["payload"]), r["created_at"])
                  for r in rows]
        wanted: dict[tuple[int, str, str], NewDelivery] = {}
        known = {e.id for e in events}
        for router in routers:
            for d in await router(conn, events, now):
                if d.event_id not in known:
                    raise InvariantViolation(f"a router answered for event {d.event_id}, not in its batch")
                wanted.setdefault((d.event_id, d.channel, d.target), d)
        inserted: list[str] = []
        if wanted:
            ds = list(wanted.values())
            got = await conn.fetch(
                "INSERT INTO outbox_deliveries (event_id, channel, target, message, next_at)"
                " SELECT e, c, t, m::jsonb, $5 FROM unnest($1::bigint[], $2::text[], $3::text[], $4::text[])"
                "  AS u(e, c, t, m)"
                " ON CONFLICT (event_id, channel, target) DO NOTHING RETURNING channel",
                [d.event_id for d in ds], [d.channel for d in ds], [d.target for d in ds],
                [json.dumps(jsonable(dict(d.message)), separators=(",", ":")) for d in ds], now)
            inserted = [r["channel"] for r in got]
        await conn.execute("UPDATE outbox_events SET dispatched_at = $2 WHERE id = ANY($1::bigint[])",
                           [e.id for e in events], now)
    return DispatchResult(len(events), len(inserted), tuple(sorted(set(inserted))),
                          min(e.created_at for e in events))


# -- claim, done, failed ---------------------------------------------------

@dataclass(frozen=True, slots=True)
class Claimed:
    id: int
    event_id: int
    event: str
    channel: str
    target: str
    attempt: int
    account_id: int | None
    created_at: dt.datetime
    message: dict[str, Any]
    payload: dict[str, Any]

    def as_dict(self) -> dict[str, Any]:
        return {"id": self.id, "event_id": self.event_id, "event": self.event, "channel": self.channel,
                "target": self.target, "attempt": self.attempt, "account_id": self.account_id,
                "created_at": self.created_at, "message": self.message, "payload": self.payload}


async def claim(conn: DbConnection, channel: str, limit: int, lease: float, now: dt.datetime) -> list[Claimed]:
    """Lease up to ``limit`` due deliveries of ``channel`` for ``lease`` seconds.

    A claimed row is due again at the lease's end (``next_at``), so a
    deliverer that never answers is retried as if it had failed."""
    if not 1 <= limit <= MAX_CLAIM or not 0 < lease <= MAX_LEASE:
        raise InvariantViolation("claim: limit or lease out of range")
    until = now + dt.timedelta(seconds=lease)
    rows = await conn.fetch(
        "WITH due AS (SELECT id FROM outbox_deliveries WHERE channel = $1 AND state = 'pending' AND next_at <= $3"
        "              ORDER BY next_at, id LIMIT $2 FOR UPDATE SKIP LOCKED)"
        " UPDATE outbox_deliveries d SET attempts = d.attempts + 1, claimed_until = $4, next_at = $4"
        " FROM due, outbox_events e WHERE d.id = due.id AND e.id = d.event_id"
        " RETURNING d.id, d.event_id, e.event, d.channel, d.target, d.attempts, e.account_id, e.created_at,"
        "  d.message::text AS message, e.payload::text AS payload",
        channel, limit, now, until)
    out = [Claimed(int(r["id"]), int(r["event_id"]), r["event"], r["channel"], r["target"], int(r["attempts"]),
                   r["account_id"], r["created_at"], _payload(r["message"]), _payload(r["payload"]))
           for r in rows]
    out.sort(key=lambda c: c.id)
    return out


def _channels(channels: Iterable[str] | None) -> list[str] | None:
    return None if channels is None else sorted(set(channels))


async def done(conn: DbConnection, ids: Sequence[int], now: dt.datetime,
               channels: Iterable[str] | None = None) -> int:
    """Mark pending deliveries delivered; how many were.  ``channels`` (when
    given) limits which rows the caller may acknowledge."""
    status = await conn.execute(
        "UPDATE outbox_deliveries SET state = 'delivered', delivered_at = $2, claimed_until = NULL"
        " WHERE id = ANY($1::bigint[]) AND state = 'pending' AND ($3::text[] IS NULL OR channel = ANY($3::text[]))",
        list(ids), now, _channels(channels))
    return int(status.split()[-1])


@dataclass(frozen=True, slots=True)
class FailResult:
    id: int
    state: str                 # pending (will be retried) or dead
    attempts: int
    next_at: dt.datetime | None


async def failed(conn: DbConnection, delivery_id: int, error: str, now: dt.datetime, policy: DeliveryPolicy,
                 *, permanent: bool = False, channels: Iterable[str] | None = None) -> FailResult | None:
    """Record a failed try; ``None`` when there is no such pending delivery (or not in ``channels``)."""
    async with conn.transaction():
        row = await conn.fetchrow(
            "SELECT attempts FROM outbox_deliveries WHERE id = $1 AND state = 'pending'"
            " AND ($2::text[] IS NULL OR channel = ANY($2::text[])) FOR UPDATE",
            delivery_id, _channels(channels))
        if row is None:
            return None
        attempts = max(1, int(row["attempts"]))
        dead = permanent or attempts >= policy.max_attempts
        next_at = now if dead else now + dt.timedelta(seconds=backoff(attempts, policy.backoff_base,
                                                                      policy.backoff_cap))
        await conn.execute(
            "UPDATE outbox_deliveries SET state = $2, next_at = $3, claimed_until = NULL, last_error = $4"
            " WHERE id = $1", delivery_id, "dead" if dead else "pending", next_at, error[:MAX_ERROR])
    return FailResult(delivery_id, "dead" if dead else "pending", attempts, None if dead else next_at)


async def retry(conn: DbConnection, ids: Sequence[int], now: dt.datetime) -> list[int]:
    """Dead deliveries become pending and due now, their tries counted afresh; the ids that did."""
    rows = await conn.fetch(
        "UPDATE outbox_deliveries SET state = 'pending', attempts = 0, next_at = $2, claimed_until = NULL"
        " WHERE id = ANY($1::bigint[]) AND state = 'dead' RETURNING id", list(ids), now)
    return sorted(int(r["id"]) for r in rows)


# -- for operators ---------------------------------------------------------

@dataclass(frozen=True, slots=True)
class ChannelStats:
    channel: str
    state: str
    count: int
    oldest_age: float | None   # seconds since the oldest such delivery's event was created (pending only)


@dataclass(frozen=True, slots=True)
class OutboxStats:
    undispatched: int
    oldest_undispatched_age: float | None   # the dispatch lag, seconds
    channels: tuple[ChannelStats, ...]


async def stats(conn: DbConnection, now: dt.datetime) -> OutboxStats:
    ev = await conn.fetchrow("SELECT count(*) AS n, min(created_at) AS oldest FROM outbox_events"
                             " WHERE dispatched_at IS NULL")
    rows = await conn.fetch(
        "SELECT d.channel, d.state, count(*) AS n,"
        "  min(e.created_at) FILTER (WHERE d.state = 'pending') AS oldest"
        " FROM outbox_deliveries d JOIN outbox_events e ON e.id = d.event_id"
        " GROUP BY d.channel, d.state ORDER BY d.channel, d.state")

    def age(t: dt.datetime | None) -> float | None:
        return None if t is None else max(0.0, (now - t).total_seconds())

    return OutboxStats(int(ev["n"]) if ev else 0, age(ev["oldest"]) if ev else None,
                       tuple(ChannelStats(r["channel"], r["state"], int(r["n"]), age(r["oldest"])) for r in rows))


async def list_deliveries(conn: DbConnection, *, state: str | None = None, channel: str | None = None,
                          event: str | None = None, account_id: int | None = None,
                          limit: int = 100, offset: int = 0) -> list[dict[str, Any]]:
    """Deliveries, newest first, filtered by whatever is given."""
    rows = await conn.fetch(
        "SELECT d.id, d.event_id, e.event, d.channel, d.target, d.state, d.attempts, d.next_at,"
        "  d.claimed_until, d.last_error, d.delivered_at, e.account_id, e.created_at"
        " FROM outbox_deliveries d JOIN outbox_events e ON e.id = d.event_id"
        " WHERE ($1::text IS NULL OR d.state = $1) AND ($2::text IS NULL OR d.channel = $2)"
        "  AND ($3::text IS NULL OR e.event = $3) AND ($4::bigint IS NULL OR e.account_id = $4)"
        " ORDER BY d.id DESC LIMIT $5 OFFSET $6",
        state, channel, event, account_id, limit, offset)
    return [dict(r) for r in rows]


@dataclass(frozen=True, slots=True)
class PruneResult:
    deliveries: int
    events: int


async def prune(conn: DbConnection, now: dt.datetime, keep_days: int) -> PruneResult:
    """Forget delivered deliveries, and dispatched events with no delivery left,
    older than ``keep_days``.  Dead and pending deliveries (and their events) stay."""
    cutoff = now - dt.timedelta(days=keep_days)
    async with conn.transaction():
        d = await conn.execute("DELETE FROM outbox_deliveries WHERE state = 'delivered' AND delivered_at < $1",
                               cutoff)
        e = await conn.execute(
            "DELETE FROM outbox_events o WHERE dispatched_at < $1"
            " AND NOT EXISTS (SELECT 1 FROM outbox_deliveries d WHERE d.event_id = o.id)", cutoff)
    return PruneResult(int(d.split()[-1]), int(e.split()[-1]))
