"""The durable outbox: side effects written with the change that causes them.

Theory of operation
-------------------
A side effect (a plugin hook, a CoA or Disconnect to a NAS, an email, a
webhook) must neither happen for a change that rolled back nor be lost for
one that committed.  So the code that makes the change calls ``enqueue``
*on the same connection, inside the same transaction*: the event row
(``outbox_events``, schema 0015) commits or rolls back with the change.
Nothing is sent here: after commit, the core's dispatcher fans each event
out into deliveries (one per channel and target) and the channels' workers
claim, send and acknowledge them, at least once (see
``billcore.billing.outbox_delivery``).

An ``OutboxEvent`` names the event (``payment.added``, ``account.blocked``,
``fup.quota_reached``, …; the catalogue is ``billcore.plugins.hooks`` for
hook events and docs/automation.md for all), the account it concerns (the
subscriber whose preferences and language a notification follows), a JSON
payload (money in integer micro-units; datetimes become ISO 8601 strings)
and, optionally, a ``dedup_key``.  An event with a dedup key that is already
in the table is not enqueued again — whichever transaction tried it — and
``enqueue`` answers ``None`` for it: that is how "a quota crossing fires
once per period, also when its batch is replayed" is a property of the
table, not of the caller's care.

``enqueue`` writes any number of events in one statement (``unnest``), so a
batch that blocks a thousand accounts pays one round trip.
"""

from __future__ import annotations

import datetime as dt
import json
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

from billcore.billing.audit import jsonable
from billcore.common.errors import InvariantViolation
from billcore.db.rows import DbConnection

__all__ = ["OutboxEvent", "enqueue", "enqueue_one", "MAX_EVENTS"]

MAX_EVENTS = 100_000  # per enqueue call: one statement's arrays


@dataclass(frozen=True, slots=True)
class OutboxEvent:
    event: str
    payload: Mapping[str, Any] = field(default_factory=dict)
    account_id: int | None = None
    dedup_key: str | None = None


async def enqueue(conn: DbConnection, events: Sequence[OutboxEvent], now: dt.datetime) -> list[int | None]:
    """Insert ``events`` (inside the caller's transaction); their ids, in order.

    ``None`` for an event whose ``dedup_key`` was already enqueued (by this
    call or any earlier committed or concurrent one)."""
    if not events:
        return []
    if len(events) > MAX_EVENTS:
        raise InvariantViolation(f"at most {MAX_EVENTS} outbox events per enqueue")
    if not conn.is_in_transaction():
        raise InvariantViolation("outbox events are enqueued inside the causing transaction")
    rows = await conn.fetch(
        "INSERT INTO outbox_events AS o (event, account_id, payload, dedup_key, created_at)"
        " SELECT e, a, p::jsonb, k, $5 FROM unnest($1::text[], $2::bigint[], $3::text[], $4::text[])"
        "  WITH ORDINALITY AS u(e, a, p, k, n) ORDER BY n"
        " ON CONFLICT (dedup_key) DO NOTHING RETURNING id, dedup_key",
        [e.event for e in events], [e.account_id for e in events],
        [json.dumps(jsonable(dict(e.payload)), separators=(",", ":")) for e in events],
        [e.dedup_key for e in events], now)
    # ids are handed out in statement order, so rows come back matched by
    # position once the skipped (deduplicated) ones are taken out
    by_key = {row["dedup_key"]: int(row["id"]) for row in rows if row["dedup_key"] is not None}
    plain = iter(sorted(int(row["id"]) for row in rows if row["dedup_key"] is None))
    out: list[int | None] = []
    seen: set[str] = set()
    for e in events:
        if e.dedup_key is None:
            out.append(next(plain))
        elif e.dedup_key in seen:
            out.append(None)         # twice in one call: the first one counts
        else:
            seen.add(e.dedup_key)
            out.append(by_key.get(e.dedup_key))
    return out


async def enqueue_one(conn: DbConnection, event: str, payload: Mapping[str, Any], now: dt.datetime, *,
                      account_id: int | None = None, dedup_key: str | None = None) -> int | None:
    """One event; its id, or ``None`` when its ``dedup_key`` was enqueued before."""
    return (await enqueue(conn, [OutboxEvent(event, payload, account_id, dedup_key)], now))[0]
