"""Accounting: applying Accounting-Requests, and charging session time.

Start creates the active session and binds its framed IP to the account in
``ip_bindings`` (NetFlow reads them); Interim/Stop update the counters
(64-bit) and commit the session's new seconds with ``commit_usage``: source
``usage_source(nas, Acct-Session-Id)``, watermark = Acct-Session-Time, usage =
the piece of the session between the last committed session time and this
one, cut by tariff links (each piece on its time service) and then by rating
at time-range and period borders.  A retransmitted or older Interim is at or
below the watermark: nothing is charged.  Usage rating cannot place (no rate
for a range, a NAS clock ahead of ours) is not committed at all — the
watermark stays, so the next Interim/Stop charges those seconds once the
cause is fixed.  Stop and Accounting-On/Off end sessions (``sessions``).
"""

from __future__ import annotations

import datetime as dt
import hashlib
import logging
from typing import Final

from billcore.billing.blocks import BlockChange
from billcore.billing.rating import SessionUsage
from billcore.billing.usage import MAX_SOURCE, commit_usage, watermark
from billcore.common.errors import UnknownObject
from billcore.db.rows import DbConnection, expect_row
from billcore.radius.records import (
    SESSION_STATUSES,
    AccountingRecord,
    AccountingResult,
    AcctStatus,
    EndReason,
    SessionHook,
)
from billcore.radius.sessions import SESSION_COLUMNS, StoredSession, end_sessions, locked_active, session_ref

__all__ = ["apply_accounting", "usage_source", "ACTOR"]

log = logging.getLogger(__name__)

ACTOR: Final = "radius"   # who the ledger says booked a time charge
_ONE_SECOND: Final = dt.timedelta(seconds=1)


def usage_source(nas_id: int, session_id: str) -> str:
    """The ``commit_usage`` source of a session: ``radius:<nas id>:<Acct-Session-Id>``
    (a session id too long for a source is replaced by its SHA-256)."""
    source = f"radius:{nas_id}:{session_id}"
    if len(source) <= MAX_SOURCE:
        return source
    return f"radius:{nas_id}:sha256:{hashlib.sha256(session_id.encode()).hexdigest()}"


async def _time_usage(conn: DbConnection, account_id: int, start: dt.datetime,
                      end: dt.datetime) -> list[SessionUsage]:
    """``[start, end)`` of a session cut by the account's tariff links: one
    piece per link with a time service, on that service (a tariff with
    several time services: no service, which rating refuses).  Time outside
    every such link is not time-charged.  Link borders round down to whole
    seconds (rating's resolution; the session start does too), the same way
    for the link that ends and the one that starts there."""
    rows = await conn.fetch(
        "SELECT t.valid_from, t.valid_to, array_agg(sv.id ORDER BY sv.id) AS services FROM account_tariffs t"
        " JOIN tariff_services ts ON ts.tariff_id = t.tariff_id JOIN services sv ON sv.id = ts.service_id"
        " WHERE t.account_id = $1 AND sv.kind = 'time' AND t.valid_from < $3"
        " AND (t.valid_to IS NULL OR t.valid_to > $2) GROUP BY t.id ORDER BY t.valid_from", account_id, start, end)
    usage = []
    for row in rows:
        piece_start = max(start, row["valid_from"].replace(microsecond=0))
        piece_end = end if row["valid_to"] is None else min(end, row["valid_to"].replace(microsecond=0))
        if piece_end > piece_start:
            service = row["services"][0] if len(row["services"]) == 1 else None
            usage.append(SessionUsage(account_id, piece_start, (piece_end - piece_start) // _ONE_SECOND, service))
    return usage


class _Unrated(Exception):
    """Rating could not place part of a session's time: nothing is committed."""


async def _charge_time(conn: DbConnection, session: StoredSession, session_time: int, now: dt.datetime,
                       tz: dt.tzinfo) -> tuple[BlockChange, ...]:
    """Commit the session's time up to ``session_time`` through the tariff
    engine, exactly once per counter value; return the block changes."""
    source = usage_source(session.nas_id, session.session_id)
    done = max(await watermark(conn, source), 0)
    if session_time <= done:
        return ()  # a retransmission, or an older Interim arriving late
    start = session.started_at.replace(microsecond=0) + dt.timedelta(seconds=done)
    usage = await _time_usage(conn, session.account_id, start, start + dt.timedelta(seconds=session_time - done))
    if not usage:
        return ()  # no time service during these seconds: not time-charged
    try:
        async with conn.transaction():  # a savepoint: an unrated piece undoes the whole commit
            result = await commit_usage(conn, source, session_time, usage, now, tz=tz, actor=ACTOR)
            if result.rejected:
                raise _Unrated(", ".join(sorted({rejected.reason for rejected in result.rejected})))
    except _Unrated as exc:
        log.error("session %s of account %s: %d s not charged yet (%s); retried with the next record",
                  session.session_id, session.account_id, session_time - done, exc)
        return ()
    if result.charged:
        await conn.execute("UPDATE radius_sessions SET charged = charged + $2 WHERE id = $1",
                           session.id, result.charged)
    return tuple(change for change in result.block_changes if isinstance(change, BlockChange))


async def _bind_ip(conn: DbConnection, session: StoredSession, at: dt.datetime) -> None:
    """Bind the session's framed IP to its account from ``at`` on.  A Start
    that arrives late (Acct-Delay-Time) may find the address bound after
    ``at`` by sessions that have ended since: the binding then starts where
    the last of them ended, as bindings never overlap.  An address bound
    without end is left alone (the same account: already bound; another:
    logged, not rebound)."""
    ip = session.framed_ip
    await conn.execute("UPDATE radius_leases SET expires_at = NULL WHERE address = $1::inet AND link_id = $2",
                       ip, session.link_id)
    later = await conn.fetch(
        "SELECT account_id, valid_to FROM ip_bindings WHERE prefix >>= $1::inet"
        " AND (valid_to IS NULL OR valid_to > $2) ORDER BY valid_to DESC NULLS FIRST", ip, at)
    if later and later[0]["valid_to"] is None:
        if later[0]["account_id"] != session.account_id:
            log.error("framed IP %s of session %s is bound to account %s, not %s: not rebinding",
                      ip, session.session_id, later[0]["account_id"], session.account_id)
        return
    await conn.execute(
        "INSERT INTO ip_bindings(account_id, prefix, kind, source, session_ref, valid_from)"
        " VALUES ($1, set_masklen($2::inet, 32)::cidr, 'dynamic', 'radius', $3, $4)",
        session.account_id, ip, session_ref(session.nas_id, session.session_id),
        later[0]["valid_to"] if later else at)


async def _start(conn: DbConnection, nas_id: int, record: AccountingRecord, session_id: str, at: dt.datetime,
                 now: dt.datetime) -> StoredSession | None:
    """Create the session a record names (whatever its status: a lost Start
    is made up by the first Interim); None: its login is unknown."""
    link = await conn.fetchrow("SELECT id, account_id, login FROM radius_links WHERE login = $1", record.login or "")
    if link is None:
        log.warning("accounting for unknown login %r from NAS %s ignored", record.login, record.nas)
        return None
    # whole seconds: the session's time is rated from its start second by second
    started = (at - dt.timedelta(seconds=record.session_time)).replace(microsecond=0)
    row = await conn.fetchrow(
        "INSERT INTO radius_sessions(nas_id, session_id, account_id, link_id, login, framed_ip, nas_port_id,"
        f" calling_station, started_at, updated_at) VALUES ($1, $2, $3, $4, $5, $6::inet, $7, $8, $9, $10)"
        f" RETURNING {SESSION_COLUMNS}",
        nas_id, session_id, link["account_id"], link["id"], link["login"], record.framed_ip,
        record.nas_port_id, record.calling_station_id, started, now)
    session = StoredSession.of(expect_row(row, "the new session"))
    if record.framed_ip:
        await _bind_ip(conn, session, started)
    return session


async def apply_accounting(conn: DbConnection, record: AccountingRecord, now: dt.datetime, *,
                           tz: dt.tzinfo = dt.timezone.utc) -> AccountingResult:
    """Apply one Accounting-Request.  Idempotent: the same request twice
    changes nothing the second time.  Runs in a transaction; ``tz`` is the
    operator's zone (time ranges, periods).  The result's block changes and
    plugin hooks are for the caller to announce after the commit."""
    nas = await conn.fetchrow("SELECT id FROM radius_nas WHERE address = $1::inet", record.nas)
    if nas is None:
        raise UnknownObject(f"unknown NAS {record.nas}")
    nas_id = int(nas["id"])
    status = record.status
    at = dt.datetime.fromtimestamp(record.event_time or now.timestamp(), dt.timezone.utc)
    if status in (AcctStatus.ON, AcctStatus.OFF):
        sessions = await locked_active(conn, "nas_id = $1", nas_id)
        reason = EndReason.ACCOUNTING_ON if status is AcctStatus.ON else EndReason.ACCOUNTING_OFF
        await end_sessions(conn, sessions, at, reason)
        return AccountingResult(closed=len(sessions))
    if status not in SESSION_STATUSES or record.session_id is None:
        return AccountingResult(ignored=str(status))
    session_id = record.session_id
    hooks: list[SessionHook] = []
    row = await conn.fetchrow(f"SELECT {SESSION_COLUMNS} FROM radius_sessions WHERE nas_id = $1 AND session_id = $2"
                              " FOR UPDATE", nas_id, session_id)
    if row is not None:
        session = StoredSession.of(row)
    else:
        started = await _start(conn, nas_id, record, session_id, at, now)
        if started is None:
            return AccountingResult(ignored="unknown login")
        session = started
        hooks.append(SessionHook("session.started", {"account_id": session.account_id, "session_id": session_id,
                                                     "ip": record.framed_ip}))
    if session.ended_at is not None:
        return AccountingResult(session=session.id, ended=True)  # a late or repeated Stop
    block_changes: tuple[BlockChange, ...] = ()
    if status in (AcctStatus.INTERIM, AcctStatus.STOP) and record.session_time >= session.session_time:
        await conn.execute(
            "UPDATE radius_sessions SET session_time = $2, input_octets = greatest(input_octets, $3),"
            " output_octets = greatest(output_octets, $4), updated_at = $5 WHERE id = $1",
            session.id, record.session_time, record.input_octets, record.output_octets, now)
        block_changes = await _charge_time(conn, session, record.session_time, now, tz)
    if status is AcctStatus.STOP:
        row = await conn.fetchrow(f"SELECT {SESSION_COLUMNS} FROM radius_sessions WHERE id = $1", session.id)
        session = StoredSession.of(expect_row(row, "the session locked a moment ago"))
        await end_sessions(conn, [session], at, EndReason.stop(record.terminate_cause))
        hooks.append(SessionHook("session.stopped", {
            "account_id": session.account_id, "session_id": session_id, "ip": session.framed_ip,
            "bytes_in": session.input_octets, "bytes_out": session.output_octets}))
    return AccountingResult(session=session.id, block_changes=block_changes, hooks=tuple(hooks))
