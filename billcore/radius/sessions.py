"""Active sessions: how one ends, and the list an operator (or a
Disconnect) works from.

A session ends with its IP bindings (NetFlow stops charging its addresses and
prefixes to the account), its pool lease and its time watermark; every path
that ends sessions (Stop, Accounting-On/Off, a deleted NAS or link, the stale
sweep in ``billcore.radius.accounting``) goes through ``end_sessions``, which
does it for any number of sessions in a few set-based statements (an
Accounting-On may end thousands at once).

Watermarks.  An open time-charged session has a row in ``ingest_watermarks``
(source ``usage_source``) that ``commit_usage`` moves; the session row's
``charged_time`` (schema 0022) keeps the same value.  Ending the session
deletes the watermark row: from then on ``charged_time`` is the session's
watermark (``billcore.radius.accounting`` reads both, the higher wins), so the
table holds a row per *open* session, not per session ever charged.
"""

from __future__ import annotations

import datetime as dt
import hashlib
import json
from collections.abc import Iterable
from dataclasses import dataclass
from typing import Final

import asyncpg

from billcore.billing.usage import MAX_SOURCE
from billcore.db.rows import DbConnection
from billcore.radius.records import ActiveSession, DisconnectMode, EndReason

__all__ = ["StoredSession", "SESSION_COLUMNS", "PAGE", "end_sessions", "locked_active", "active_sessions",
           "session_history", "session_ref", "usage_source", "keep_watermarks", "prune_watermarks",
           "WATERMARK_HORIZON"]

PAGE: Final = 1000  # rows per page of the list calls (NAS, pools, links, sessions)
WATERMARK_HORIZON: Final = dt.timedelta(days=31)
"""How long a record of a session billcore no longer has can still be charged
safely: leftover watermark rows (``keep_watermarks``) live that long, and an
Interim/Stop of an unknown session stamped earlier is ignored and counted
(``billcore.radius.accounting``)."""


@dataclass(frozen=True, slots=True)
class StoredSession:
    """A ``radius_sessions`` row, as accounting and the sweeps use it."""

    id: int
    nas_id: int
    session_id: str
    account_id: int
    link_id: int
    framed_ip: str | None
    started_at: dt.datetime
    ended_at: dt.datetime | None
    updated_at: dt.datetime
    session_time: int
    input_octets: int
    output_octets: int
    charged_time: int

    @classmethod
    def of(cls, row: asyncpg.Record) -> StoredSession:
        return cls(**dict(row))


SESSION_COLUMNS: Final = ("id, nas_id, session_id, account_id, link_id, host(framed_ip) AS framed_ip, started_at,"
                          " ended_at, updated_at, session_time, input_octets, output_octets, charged_time")


def session_ref(nas_id: int, session_id: str) -> str:
    """The ``ip_bindings.session_ref`` of a session."""
    return f"radius:{nas_id}:{session_id}"


def usage_source(nas_id: int, session_id: str) -> str:
    """The ``commit_usage`` source of a session: ``radius:<nas id>:<Acct-Session-Id>``
    (a session id too long for a source is replaced by its SHA-256)."""
    source = f"radius:{nas_id}:{session_id}"
    if len(source) <= MAX_SOURCE:
        return source
    return f"radius:{nas_id}:sha256:{hashlib.sha256(session_id.encode()).hexdigest()}"


async def end_sessions(conn: DbConnection, sessions: Iterable[StoredSession], at: dt.datetime,
                       reason: str) -> None:
    """End each session at ``at`` (just after its start, if ``at`` is earlier)
    with its bindings, lease and watermark row, in four statements for all of
    them.  The caller has charged what it charges first (the watermark row goes)."""
    ended = list(sessions)
    if not ended:
        return
    ends = [max(at, session.started_at + dt.timedelta(microseconds=1)) for session in ended]
    await conn.execute(
        "UPDATE radius_sessions s SET ended_at = k.e, end_reason = $3"
        " FROM unnest($1::bigint[], $2::timestamptz[]) AS k(id, e) WHERE s.id = k.id AND s.ended_at IS NULL",
        [session.id for session in ended], ends, reason)
    await conn.execute(
        "UPDATE ip_bindings b SET valid_to = greatest(k.e, b.valid_from + interval '1 microsecond')"
        " FROM unnest($1::text[], $2::timestamptz[]) AS k(r, e) WHERE b.session_ref = k.r AND b.valid_to IS NULL",
        [session_ref(session.nas_id, session.session_id) for session in ended], ends)
    leased = [session for session in ended if session.framed_ip is not None]
    if leased:
        await conn.execute(
            "DELETE FROM radius_leases l USING unnest($1::inet[], $2::bigint[]) AS k(a, link)"
            " WHERE l.address = k.a AND l.link_id = k.link",
            [session.framed_ip for session in leased], [session.link_id for session in leased])
    await conn.execute("DELETE FROM ingest_watermarks WHERE source = ANY($1::text[])",
                       [usage_source(session.nas_id, session.session_id) for session in ended])


async def keep_watermarks(conn: DbConnection, where: str, *args: object) -> None:
    """Before sessions matching ``where`` (our text) are deleted with their
    link: put their charged seconds back as watermark rows, so a replayed
    Interim/Stop of theirs (the login re-added) is not charged again.  Only
    sessions that ended within ``WATERMARK_HORIZON``; the sweep prunes the rows
    after it (``prune_watermarks``)."""
    rows = await conn.fetch(
        f"SELECT nas_id, session_id, charged_time, coalesce(ended_at, updated_at) AS at FROM radius_sessions"
        f" WHERE charged_time > 0 AND {where}", *args)
    if rows:
        await conn.execute(
            "INSERT INTO ingest_watermarks AS w (source, watermark, updated_at)"
            " SELECT * FROM unnest($1::text[], $2::bigint[], $3::timestamptz[])"
            " ON CONFLICT (source) DO UPDATE SET watermark = greatest(w.watermark, EXCLUDED.watermark)",
            [usage_source(row["nas_id"], row["session_id"]) for row in rows],
            [row["charged_time"] for row in rows], [row["at"] for row in rows])


async def prune_watermarks(conn: DbConnection, now: dt.datetime) -> int:
    """Delete RADIUS watermark rows not moved for ``WATERMARK_HORIZON`` whose
    session is not open (rows of deleted sessions, see ``keep_watermarks``)."""
    status = await conn.execute(
        "DELETE FROM ingest_watermarks w WHERE w.source LIKE 'radius:%' AND w.updated_at < $1"
        " AND NOT EXISTS (SELECT 1 FROM radius_sessions s WHERE s.ended_at IS NULL"
        "   AND w.source = 'radius:' || s.nas_id || ':' || s.session_id)", now - WATERMARK_HORIZON)
    return int(status.split()[-1])


async def locked_active(conn: DbConnection, where: str, *args: object) -> list[StoredSession]:
    """The active sessions matching ``where`` (our text, never a caller's), row-locked."""
    rows = await conn.fetch(f"SELECT {SESSION_COLUMNS} FROM radius_sessions WHERE ended_at IS NULL AND {where}"
                            " FOR UPDATE", *args)
    return [StoredSession.of(row) for row in rows]


async def active_sessions(conn: DbConnection, account_id: int | None = None, session_pk: int | None = None,
                          limit: int = PAGE, offset: int = 0) -> list[ActiveSession]:
    """Active sessions (of one account, or one session) with what a
    Disconnect/CoA to their NAS needs."""
    rows = await conn.fetch(
        "SELECT s.id, s.session_id, s.login, host(s.framed_ip) AS framed_ip, s.account_id, s.started_at,"
        " s.session_time, s.input_octets, s.output_octets, host(n.address) AS nas_ip, n.coa_port,"
        " n.disconnect_mode, n.blocked_profile FROM radius_sessions s JOIN radius_nas n ON n.id = s.nas_id"
        " WHERE s.ended_at IS NULL AND ($1::bigint IS NULL OR s.account_id = $1)"
        " AND ($2::bigint IS NULL OR s.id = $2) ORDER BY s.id LIMIT $3 OFFSET $4",
        account_id, session_pk, limit, offset)
    return [ActiveSession(**{**dict(row), "disconnect_mode": DisconnectMode(row["disconnect_mode"]),
                             "blocked_profile": json.loads(row["blocked_profile"])}) for row in rows]


async def session_history(conn: DbConnection, account_id: int, *, limit: int = PAGE,
                          offset: int = 0) -> list[dict[str, object]]:
    """Sessions of an account, ended and open, newest start first (index
    ``radius_sessions_account_started``, schema 0013)."""
    rows = await conn.fetch(
        "SELECT s.id, s.login, n.name AS nas, host(s.framed_ip) AS framed_ip, s.started_at,"
        " s.ended_at AS stopped_at, s.input_octets AS octets_in, s.output_octets AS octets_out,"
        " s.end_reason AS terminate_cause FROM radius_sessions s JOIN radius_nas n ON n.id = s.nas_id"
        " WHERE s.account_id = $1 ORDER BY s.started_at DESC, s.id DESC LIMIT $2 OFFSET $3",
        account_id, limit, offset)
    return [dict(row) for row in rows]
