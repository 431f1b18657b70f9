"""Active sessions: how one ends, the stale sweep, and the list an operator
(or a Disconnect) works from.

A session ends with its IP binding (NetFlow stops charging its address to the
account) and its pool lease; every path that ends sessions (Stop, Accounting-
On/Off, a deleted NAS or link, the stale sweep) goes through ``end_sessions``.
"""

from __future__ import annotations

import datetime as dt
import json
from collections.abc import Iterable
from dataclasses import dataclass
from typing import Final

import asyncpg

from billcore.db.rows import DbConnection
from billcore.radius.records import ActiveSession, DisconnectMode, EndReason

__all__ = ["StoredSession", "SESSION_COLUMNS", "PAGE", "end_sessions", "locked_active", "close_stale",
           "active_sessions", "session_history", "session_ref"]

PAGE: Final = 1000  # rows per page of the list calls (NAS, pools, links, sessions)


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

    @classmethod
    def of(cls, row: asyncpg.Record) -> StoredSession:
        return cls(**dict(row))


SESSION_COLUMNS: Final = ("id, nas_id, session_id, account_id, link_id, host(framed_ip) AS framed_ip, started_at,"
                          " ended_at, updated_at, session_time, input_octets, output_octets")


def session_ref(nas_id: int, session_id: str) -> str:
    """The ``ip_bindings.session_ref`` of a session."""
    return f"radius:{nas_id}:{session_id}"


async def end_sessions(conn: DbConnection, sessions: Iterable[StoredSession], at: dt.datetime,
                       reason: str) -> None:
    """End each session at ``at`` (just after its start, if ``at`` is earlier)
    with its binding and lease."""
    for session in sessions:
        end = max(at, session.started_at + dt.timedelta(microseconds=1))
        await conn.execute("UPDATE radius_sessions SET ended_at = $2, end_reason = $3"
                           " WHERE id = $1 AND ended_at IS NULL", session.id, end, reason)
        await conn.execute("UPDATE ip_bindings SET valid_to = $2 WHERE session_ref = $1 AND valid_to IS NULL",
                           session_ref(session.nas_id, session.session_id), end)
        if session.framed_ip is not None:
            await conn.execute("DELETE FROM radius_leases WHERE address = $1::inet AND link_id = $2",
                               session.framed_ip, session.link_id)


async def locked_active(conn: DbConnection, where: str, *args: object) -> list[StoredSession]:
    """The active sessions matching ``where`` (our text, never a caller's), row-locked."""
    rows = await conn.fetch(f"SELECT {SESSION_COLUMNS} FROM radius_sessions WHERE ended_at IS NULL AND {where}"
                            " FOR UPDATE", *args)
    return [StoredSession.of(row) for row in rows]


async def close_stale(conn: DbConnection, now: dt.datetime, timeout: dt.timedelta) -> int:
    """End sessions whose NAS sent nothing for ``timeout``, each at its last
    update; free expired leases."""
    stale = await locked_active(conn, "updated_at < $1", now - timeout)
    for session in stale:
        await end_sessions(conn, [session], session.updated_at, EndReason.STALE)
    await conn.execute("DELETE FROM radius_leases WHERE expires_at IS NOT NULL AND expires_at <= $1", now)
    return len(stale)


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
