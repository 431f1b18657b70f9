"""Accounting: applying Accounting-Requests, and charging session time.

Start creates the active session and binds its framed IP and its IPv6
prefixes (Framed-IPv6-Prefix, Delegated-IPv6-Prefix) to the account in
``ip_bindings`` (NetFlow reads them); Interim/Stop update the counters
(64-bit) and commit the session's new seconds with ``commit_usage``: source
``usage_source(nas, Acct-Session-Id)``, watermark = Acct-Session-Time, usage =
the piece of the session between the last committed session time and this
one, cut by tariff links (each piece on its time service) and then by rating
at time-range and period borders.  A retransmitted or older Interim is at or
below the watermark: nothing is charged.  Usage rating cannot place (no rate
for a range, a NAS clock ahead of ours) is not committed at all — the
watermark stays, so the next record, or the close, charges those seconds once
the cause is fixed.

Every second charged, once.  Each path that ends a session first charges it
up to its *last known* session time, then ends it (``end_sessions``):

* Stop: its Acct-Session-Time.
* Accounting-Off (the NAS stops accounting in order, its sessions end with
  it): the Off's time (Event-Timestamp, else arrival minus Acct-Delay-Time)
  minus the session's start, in whole seconds — or the last Interim's
  Acct-Session-Time if that is more.
* Accounting-On (the NAS restarted: its sessions died with it, at an unknown
  moment after their last record): the last Interim's Acct-Session-Time.
  The time the NAS was down is not the subscriber's.
* The stale sweep (``sweep``; nothing heard for the timeout): the last
  Interim's Acct-Session-Time, the last time the NAS vouched for.

"Charge up to T" commits the seconds between ``charged_time`` and T (none if
T is not above it), so what the close adds is exactly the seconds Interims
had not committed yet.  The session row keeps ``charged_time`` (schema 0022);
its ``ingest_watermarks`` row goes when it ends.  A Stop or Interim that
arrives after the close (a NAS that was only cut off, a buffered Stop after a
reboot) updates the session's counters and charges the seconds above
``charged_time`` — never twice, as the watermark for an ended session is
``charged_time``, the higher of it and any watermark row.  The session stays
ended where it ended (its IP bindings too: the address may be someone else's
since).  A record of a session billcore does not have, stamped before now
minus ``WATERMARK_HORIZON``, is ignored and counted
(``billcore_radius_stale_records``): its session's watermark may be pruned.

A close of many sessions (an Accounting-On after a NAS reboot) is
set-based: ``end_sessions`` ends any number in four statements, and
``_charge_many`` books their seconds in one ``commit_usage`` per round of
sessions of distinct accounts (source ``CLOSE_SOURCE``), so each account's
charge in a round is its session's.

Batches (``radius.accounting_many``).  Records applied in order in one
transaction share a ``Prefetch``: four statements read the NAS ids, lock the
batch's session rows in key order, read the links of its logins and which of
its accounts have a time service at all.  A session row then stays in memory
as the batch's records leave it (the lock is held).  An Interim/Stop of an
account with no time service has nothing to charge: its writes are put off
(``_put_off``) and written set-based by ``flush_pending`` — before anything
reads what they change (a row not in memory, an Accounting-On/Off, a Start
on an address a pending write concerns) and before the commit.  A Start's
bindings are put off too and written with the batch's in one statement
(``_BIND_MANY``): each statement on ``ip_bindings`` bumps the one
``classifier_version`` row (a lock held to the commit, a NOTIFY), so a batch
bumps it about twice, not once per Start and Stop.  Time-charged sessions
take the single record's path, second by second.
"""

from __future__ import annotations

import dataclasses
import datetime as dt
import functools
import ipaddress
import logging
from collections import defaultdict
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Final

import asyncpg
from prometheus_client import Counter

from billcore.billing.blocks import BlockChange
from billcore.billing.rating import SessionUsage
from billcore.billing.usage import commit_usage, watermark
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
from billcore.radius.sessions import (
    SESSION_COLUMNS,
    WATERMARK_HORIZON,
    StoredSession,
    end_sessions,
    locked_active,
    prune_watermarks,
    session_ref,
    usage_source,
)

__all__ = ["apply_accounting", "usage_source", "ACTOR", "close_stale", "sweep", "Sweep", "charge_and_end",
           "STALE_RECORDS", "Prefetch", "prefetch", "nas_id_of", "flush_pending"]

log = logging.getLogger(__name__)

ACTOR: Final = "radius"   # who the ledger says booked a time charge
_ONE_SECOND: Final = dt.timedelta(seconds=1)


STALE_RECORDS: Final = Counter(
    "billcore_radius_stale_records", "Accounting records of unknown sessions older than the watermark horizon,"
    " ignored")


_TIME_LINKS: Final = (
    "SELECT t.account_id, t.valid_from, t.valid_to, array_agg(sv.id ORDER BY sv.id) AS services"
    " FROM account_tariffs t JOIN tariff_services ts ON ts.tariff_id = t.tariff_id"
    " JOIN services sv ON sv.id = ts.service_id"
    " WHERE t.account_id = ANY($1::bigint[]) AND sv.kind = 'time' AND t.valid_from < $3"
    " AND (t.valid_to IS NULL OR t.valid_to > $2) GROUP BY t.id ORDER BY t.account_id, t.valid_from")


def _pieces(links: Sequence[asyncpg.Record], account_id: int, start: dt.datetime,
            end: dt.datetime) -> list[SessionUsage]:
    """``[start, end)`` of a session cut by the account's tariff links
    (``_TIME_LINKS`` rows, by valid_from): one piece per link with a time
    service, on that service (a tariff with several time services: no
    service, which rating refuses).  Time outside every such link is not
    time-charged.  Link borders round down to whole seconds (rating's
    resolution; the session start does too), the same way for the link that
    ends and the one that starts there.  Pure."""
    usage = []
    for row in links:
        piece_start = max(start, row["valid_from"].replace(microsecond=0))
        piece_end = end if row["valid_to"] is None else min(end, row["valid_to"].replace(microsecond=0))
        if piece_end > piece_start:
            service = row["services"][0] if len(row["services"]) == 1 else None
            usage.append(SessionUsage(account_id, piece_start, (piece_end - piece_start) // _ONE_SECOND, service))
    return usage


async def _time_usage(conn: DbConnection, account_id: int, start: dt.datetime,
                      end: dt.datetime) -> list[SessionUsage]:
    """``_pieces`` of one session, its links read."""
    return _pieces(await conn.fetch(_TIME_LINKS, [account_id], start, end), account_id, start, end)


class _Unrated(Exception):
    """Rating could not place part of a session's time: nothing is committed."""


async def _charge_time(conn: DbConnection, session: StoredSession, session_time: int, now: dt.datetime,
                       tz: dt.tzinfo) -> tuple[BlockChange, ...]:
    """Commit the session's time up to ``session_time`` through the tariff
    engine, exactly once per second; return the block changes.  The caller
    holds the session's row lock."""
    source = usage_source(session.nas_id, session.session_id)
    done = max(session.charged_time, await watermark(conn, source), 0)
    if done > session.charged_time:  # a kept row (a deleted link's session, replayed): the row learns it
        await conn.execute("UPDATE radius_sessions SET charged_time = $2 WHERE id = $1", session.id, done)
    if session_time <= done:
        return ()  # a retransmission, an older Interim arriving late, or charged by a close
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
    await conn.execute("UPDATE radius_sessions SET charged = charged + $2, charged_time = greatest(charged_time, $3)"
                       " WHERE id = $1", session.id, result.charged, result.watermark)
    return tuple(change for change in result.block_changes if isinstance(change, BlockChange))


def last_known(session: StoredSession, reason: str, at: dt.datetime) -> int:
    """The session time a close charges up to (see the module docstring)."""
    if reason == EndReason.ACCOUNTING_OFF:
        ran = (at - session.started_at) // _ONE_SECOND
        return max(session.session_time, ran)
    return session.session_time


CLOSE_SOURCE: Final = "radius-close:{}"
"""The ``commit_usage`` source of the charges a close books for many sessions
at once (``{}``: the NAS id, or ``sweep``): one row per NAS, never pruned (its
watermark only numbers the close's commits, so ledger keys never repeat)."""


async def _charge_many(conn: DbConnection, owed: Sequence[tuple[StoredSession, int]], tag: str,
                       now: dt.datetime, tz: dt.tzinfo) -> list[BlockChange]:
    """Charge each session up to its target in a few set-based commits: one
    ``commit_usage`` per round of sessions of distinct accounts (so each
    account's charge in a round is its session's), source ``CLOSE_SOURCE``.
    A round that rating cannot place whole is undone and its sessions are
    charged one by one (``_charge_time``: what can be placed is, the rest
    waits for a late record).  The caller holds the sessions' row locks."""
    marks = {row["source"]: int(row["watermark"]) for row in await conn.fetch(
        "SELECT source, watermark FROM ingest_watermarks WHERE source = ANY($1::text[])",
        [usage_source(session.nas_id, session.session_id) for session, _ in owed])}
    todo: list[tuple[StoredSession, int, int]] = []   # (session, done, target)
    for session, target in owed:
        done = max(session.charged_time, marks.get(usage_source(session.nas_id, session.session_id), 0))
        if target > done:
            todo.append((session, done, target))
    if not todo:
        return []
    starts = [session.started_at.replace(microsecond=0) for session, _, _ in todo]
    links: dict[int, list[asyncpg.Record]] = defaultdict(list)
    for row in await conn.fetch(_TIME_LINKS, sorted({session.account_id for session, _, _ in todo}),
                                min(starts), max(start + dt.timedelta(seconds=target)
                                                 for start, (_, _, target) in zip(starts, todo))):
        links[row["account_id"]].append(row)
    rounds: list[list[tuple[StoredSession, int, list[SessionUsage]]]] = []
    seen: dict[int, int] = defaultdict(int)          # account -> rounds it is in so far
    for start, (session, done, target) in zip(starts, todo):
        begin = start + dt.timedelta(seconds=done)
        usage = _pieces(links[session.account_id], session.account_id, begin,
                        begin + dt.timedelta(seconds=target - done))
        if not usage:
            continue  # no time service during these seconds: not time-charged
        n = seen[session.account_id]
        seen[session.account_id] += 1
        if n == len(rounds):
            rounds.append([])
        rounds[n].append((session, target, usage))
    source = CLOSE_SOURCE.format(tag)
    changes: list[BlockChange] = []
    for batch in rounds:
        try:
            async with conn.transaction():  # a savepoint: a round rating cannot place whole is undone
                mark = max(await watermark(conn, source), 0) + 1
                result = await commit_usage(conn, source, mark, [u for _, _, usage in batch for u in usage], now,
                                            tz=tz, actor=ACTOR)
                if result.rejected:
                    raise _Unrated(", ".join(sorted({rejected.reason for rejected in result.rejected})))
        except _Unrated as exc:
            log.warning("close: %d sessions' time not placeable together (%s); charging them one by one",
                        len(batch), exc)
            for session, target, _ in batch:
                changes.extend(await _charge_time(conn, session, target, now, tz))
            continue
        amounts = {account: amount for account, amount, _ in result.charges}
        await conn.execute(
            "UPDATE radius_sessions s SET charged = s.charged + k.amount, charged_time = greatest(s.charged_time, k.t)"
            " FROM unnest($1::bigint[], $2::bigint[], $3::bigint[]) AS k(id, amount, t) WHERE s.id = k.id",
            [session.id for session, _, _ in batch], [amounts.get(session.account_id, 0) for session, _, _ in batch],
            [target for _, target, _ in batch])
        changes.extend(change for change in result.block_changes if isinstance(change, BlockChange))
    return changes


async def charge_and_end(conn: DbConnection, sessions: Sequence[StoredSession], at: dt.datetime, reason: str,
                         now: dt.datetime, tz: dt.tzinfo, tag: str,
                         ends: Sequence[dt.datetime] | None = None) -> tuple[BlockChange, ...]:
    """Charge each (row-locked, open) session up to its last known time, then
    end them all at ``at`` (or at ``ends[i]``), set-based: a few statements
    for any number of sessions, plus one commit per round (``_charge_many``)."""
    owed = [(session, target) for session in sessions
            if (target := last_known(session, reason, at)) > session.charged_time]
    changes = await _charge_many(conn, owed, tag, now, tz) if owed else []
    if ends is None:
        await end_sessions(conn, sessions, at, reason)
    else:
        for end in sorted(set(ends)):
            await end_sessions(conn, [s for s, e in zip(sessions, ends) if e == end], end, reason)
    return tuple(changes)


@dataclass(frozen=True, slots=True)
class Sweep:
    """What a stale sweep did."""

    closed: int                              # sessions ended
    pruned: int                              # leftover watermark rows deleted
    block_changes: tuple[BlockChange, ...]   # for the caller to announce after the commit


async def sweep(conn: DbConnection, now: dt.datetime, timeout: dt.timedelta, *,
                tz: dt.tzinfo = dt.timezone.utc) -> Sweep:
    """End sessions whose NAS sent nothing for ``timeout``, each charged up to
    its last Interim's Acct-Session-Time and ended at its last update; free
    expired leases; prune watermark rows older than the horizon."""
    stale = await locked_active(conn, "updated_at < $1 ORDER BY id", now - timeout)
    changes: tuple[BlockChange, ...] = ()
    if stale:
        changes = await charge_and_end(conn, stale, now, EndReason.STALE, now, tz, "sweep",
                                       ends=[session.updated_at for session in stale])
    await conn.execute("DELETE FROM radius_leases WHERE expires_at IS NOT NULL AND expires_at <= $1", now)
    pruned = await prune_watermarks(conn, now)
    return Sweep(len(stale), pruned, changes)


async def close_stale(conn: DbConnection, now: dt.datetime, timeout: dt.timedelta, *,
                      tz: dt.tzinfo = dt.timezone.utc) -> int:
    """``sweep``, answering how many sessions it ended."""
    return (await sweep(conn, now, timeout, tz=tz)).closed


def _host_prefix(address: str) -> str:
    """The framed address as the prefix bound to the account: a /32, or a /128."""
    return f"{address}/128" if ":" in address else f"{address}/32"


def _not_rebinding(prefix: str, session: str, held_by: int, account_id: int) -> None:
    """A Start's prefix is bound without end to another account: logged, not rebound."""
    log.error("%s of session %s is bound to account %s, not %s: not rebinding", prefix, session, held_by, account_id)


async def _bind(conn: DbConnection, session: StoredSession, prefix: str, at: dt.datetime) -> None:
    """Bind ``prefix`` (the framed IP as a /32, or an IPv6 prefix) to the
    session's account from ``at`` on.  A Start that arrives late
    (Acct-Delay-Time) may find the prefix bound after ``at`` by sessions that
    have ended since: the binding then starts where the last of them ended, as
    bindings never overlap.  A prefix overlapping one bound without end is
    left alone (the same account: already bound; another: logged, not rebound)."""
    later = await conn.fetch(
        "SELECT account_id, valid_to FROM ip_bindings WHERE prefix && $1::cidr"
        " AND (valid_to IS NULL OR valid_to > $2) ORDER BY valid_to DESC NULLS FIRST", prefix, at)
    if later and later[0]["valid_to"] is None:
        if later[0]["account_id"] != session.account_id:
            _not_rebinding(prefix, session.session_id, later[0]["account_id"], session.account_id)
        return
    await conn.execute(
        "INSERT INTO ip_bindings(account_id, prefix, kind, source, session_ref, valid_from)"
        " VALUES ($1, $2::cidr, 'dynamic', 'radius', $3, $4)",
        session.account_id, prefix, session_ref(session.nas_id, session.session_id),
        later[0]["valid_to"] if later else at)


_INSERT_SESSION: Final = (
    "INSERT INTO radius_sessions(nas_id, session_id, account_id, link_id, login, framed_ip, nas_port_id,"
    f" calling_station, started_at, updated_at) VALUES ($1, $2, $3, $4, $5, $6::inet, $7, $8, $9, $10)"
    f" RETURNING {SESSION_COLUMNS}")
_KEEP_LEASE: Final = "lease AS (UPDATE radius_leases SET expires_at = NULL WHERE address = $6::inet AND link_id = $4 RETURNING 1)"

_START_WITH_LEASE: Final = f"WITH s AS ({_INSERT_SESSION}), {_KEEP_LEASE} SELECT * FROM s"

_START_WITH_IP: Final = (
    f"WITH s AS ({_INSERT_SESSION}), {_KEEP_LEASE},"
    " later AS (SELECT account_id, valid_to FROM ip_bindings WHERE prefix && $11::cidr"
    "  AND (valid_to IS NULL OR valid_to > $9) ORDER BY valid_to DESC NULLS FIRST LIMIT 1),"
    " bound AS (INSERT INTO ip_bindings(account_id, prefix, kind, source, session_ref, valid_from)"
    "  SELECT $3, $11::cidr, 'dynamic', 'radius', $12, coalesce((SELECT valid_to FROM later), $9)"
    "  WHERE NOT EXISTS (SELECT 1 FROM later WHERE valid_to IS NULL) RETURNING 1)"
    " SELECT s.*, (SELECT account_id FROM later WHERE valid_to IS NULL) AS held_by FROM s")
"""A Start with a framed IP in one statement: the session row; its pool lease
stops expiring and its /32 (or /128) is bound from the start on, or from
where the last later binding of the address ended (``_bind``'s rule; an
address bound without end is left alone)."""


async def _start(conn: DbConnection, nas_id: int, record: AccountingRecord, session_id: str, at: dt.datetime,
                 now: dt.datetime, pre: Prefetch | None = None) -> StoredSession | None:
    """Create the session a record names (whatever its status: a lost Start
    is made up by the first Interim); None: its login is unknown."""
    login = record.login or ""
    link: asyncpg.Record | None
    if pre is not None and login in pre.links:
        link = pre.links[login]
    else:
        link = await conn.fetchrow("SELECT id, account_id, login FROM radius_links WHERE login = $1", login)
    if link is None:
        log.warning("accounting for unknown login %r from NAS %s ignored", record.login, record.nas)
        return None
    # whole seconds: the session's time is rated from its start second by second
    started = (at - dt.timedelta(seconds=record.session_time)).replace(microsecond=0)
    if record.framed_ip is None:
        row = await conn.fetchrow(_INSERT_SESSION, nas_id, session_id, link["account_id"], link["id"], link["login"],
                                  None, record.nas_port_id, record.calling_station_id, started, now)
        session = StoredSession.of(expect_row(row, "the new session"))
    elif pre is not None:
        # in a batch: the session and its lease in one statement, its bindings with the batch's
        row = await conn.fetchrow(_START_WITH_LEASE, nas_id, session_id, link["account_id"], link["id"], link["login"],
                                  record.framed_ip, record.nas_port_id, record.calling_station_id, started, now)
        session = StoredSession.of(expect_row(row, "the new session"))
    else:
        # one statement (a Start is the costliest record): the session, its lease kept, its /32 bound as _bind does
        ip = record.framed_ip
        row = await conn.fetchrow(_START_WITH_IP, nas_id, session_id, link["account_id"], link["id"], link["login"], ip,
                                  record.nas_port_id, record.calling_station_id, started, now,
                                  _host_prefix(ip), session_ref(nas_id, session_id))
        fields = dict(expect_row(row, "the new session"))
        held_by = fields.pop("held_by")
        session = StoredSession(**fields)
        if held_by is not None and held_by != session.account_id:
            _not_rebinding(ip, session.session_id, held_by, session.account_id)
    if pre is not None:
        ref = session_ref(nas_id, session_id)
        framed = record.framed_ip
        if framed is not None:
            pre.bind(session.account_id, _host_prefix(framed), ref, started, framed)
        for prefix in record.ipv6_prefixes:
            pre.bind(session.account_id, prefix, ref, started)
        return session
    for prefix in record.ipv6_prefixes:
        await _bind(conn, session, prefix, started)
    return session


@dataclass(slots=True)
class Prefetch:
    """What a batch of records needs, read in a few statements before the
    first record is applied (``prefetch``).  Each entry is a hint: a miss
    means the per-record query, never a different outcome.

    ``sessions`` are row-locked (in (NAS, session id) order, so concurrent
    batches take the locks of the sessions they share in one order) and hold the row as it was
    before the batch: a record that changes a session drops it (``taken``), so
    the next record of that session in the batch reads the row afresh.
    ``timed``: the batch's accounts with a time service in some tariff link
    (``None``: not known, charge as for one).  An account outside it has no
    second to charge (``_time_usage`` would find no piece), so its Interims and
    Stops skip the watermark and link queries."""

    nas: dict[str, int]                                  # NAS address (canonical text) -> id
    sessions: dict[tuple[int, str], StoredSession]       # (nas id, Acct-Session-Id) -> locked row
    links: dict[str, asyncpg.Record]                     # login -> (id, account_id, login)
    timed: frozenset[int] | None
    absent: set[tuple[int, str]] = dataclasses.field(default_factory=set)   # no such session (yet)
    # writes put off to ``flush_pending`` (sessions of accounts not time-charged): the
    # counters of Interims/Stops (the row as it will be, by session id) and the Stops' ends
    counters: dict[int, StoredSession] = dataclasses.field(default_factory=dict)
    ends: list[tuple[StoredSession, dt.datetime, str]] = dataclasses.field(default_factory=list)
    ending_ips: set[str] = dataclasses.field(default_factory=set)
    # Starts' bindings: (account, prefix, session_ref, from); written in one statement, so the
    # ``ip_bindings`` trigger (classifier_version, a row every writer of bindings locks) fires
    # once per batch, not once per Start
    binds: list[tuple[int, str, str, dt.datetime]] = dataclasses.field(default_factory=list)

    bound_hosts: set[str] = dataclasses.field(default_factory=set)     # IPv4 framed IPs of ``binds``
    bound_v6: bool = False                                              # ``binds`` has an IPv6 prefix

    def bind(self, account_id: int, prefix: str, ref: str, at: dt.datetime, host: str | None = None) -> None:
        self.binds.append((account_id, prefix, ref, at))
        if host is not None and ":" not in host:
            self.bound_hosts.add(host)
        else:
            self.bound_v6 = True

    def binding(self, framed_ip: str | None, prefixes: Sequence[str]) -> bool:
        """Whether a pending bind or end may concern the Start's addresses: flush first.
        IPv4: the framed IP (a /32) itself; IPv6 (rare): any pending IPv6 bind or any end."""
        if framed_ip is not None and ":" not in framed_ip:
            if framed_ip in self.ending_ips or framed_ip in self.bound_hosts:
                return True
        elif framed_ip is not None and (self.bound_v6 or self.ends):
            return True
        return bool(prefixes) and (self.bound_v6 or bool(self.ends))

    def taken(self, nas_id: int, session_id: str) -> StoredSession | None:
        return self.sessions.pop((nas_id, session_id), None)

    def kept(self, session: StoredSession) -> None:
        """``session`` is the row as it is (or will be, once flushed): the
        next record of it in the batch needs no query."""
        key = (session.nas_id, session.session_id)
        self.sessions[key] = session
        self.absent.discard(key)

    def forget_nas(self, nas_id: int) -> None:
        """An Accounting-On/Off ended the NAS's sessions: their rows changed."""
        for key in [key for key in self.sessions if key[0] == nas_id]:
            del self.sessions[key]

    def charges(self, account_id: int) -> bool:
        return self.timed is None or account_id in self.timed


@functools.lru_cache(maxsize=4096)   # a fleet's NAS addresses, asked for at every record
def _canonical(address: str) -> str:
    return str(ipaddress.ip_address(address))


_LOCK_SESSIONS: Final = (
    "SELECT s.* FROM unnest($1::bigint[], $2::text[]) WITH ORDINALITY AS k(nas, sid, n),"
    f" LATERAL (SELECT {SESSION_COLUMNS} FROM radius_sessions WHERE nas_id = k.nas AND session_id = k.sid"
    " OFFSET 0 FOR UPDATE) AS s ORDER BY k.n")


async def prefetch(conn: DbConnection, records: Sequence[AccountingRecord]) -> Prefetch:
    """Read (and lock) in four statements what applying ``records`` in one
    transaction needs: their NAS ids, their sessions, the links of their
    logins and which of their accounts are time-charged."""
    rows = await conn.fetch("SELECT id, host(address) AS address FROM radius_nas WHERE address = ANY($1::inet[])",
                            sorted({record.nas for record in records}))
    nas = {_canonical(row["address"]): int(row["id"]) for row in rows}
    keys = sorted({(nas[_canonical(r.nas)], r.session_id) for r in records
                   if r.session_id is not None and _canonical(r.nas) in nas})
    sessions: dict[tuple[int, str], StoredSession] = {}
    if keys:
        # one index probe per key (OFFSET 0 keeps the planner from a hash join over the whole
        # history), locked in key order: every batch locks the sessions it shares in one order
        for row in await conn.fetch(_LOCK_SESSIONS, [k[0] for k in keys], [k[1] for k in keys]):
            session = StoredSession.of(row)
            sessions[(session.nas_id, session.session_id)] = session
    logins = sorted({r.login for r in records if r.login is not None})
    links = {row["login"]: row for row in await conn.fetch(
        "SELECT id, account_id, login FROM radius_links WHERE login = ANY($1::text[])", logins)} if logins else {}
    accounts = sorted({s.account_id for s in sessions.values()} | {int(row["account_id"]) for row in links.values()})
    timed = frozenset(int(row["account_id"]) for row in await conn.fetch(
        "SELECT DISTINCT t.account_id FROM account_tariffs t JOIN tariff_services ts ON ts.tariff_id = t.tariff_id"
        " JOIN services sv ON sv.id = ts.service_id WHERE t.account_id = ANY($1::bigint[]) AND sv.kind = 'time'",
        accounts)) if accounts else frozenset[int]()
    return Prefetch(nas, sessions, links, timed, absent={key for key in keys if key not in sessions})


_BIND_MANY: Final = (
    "WITH k AS (SELECT k.a, k.p, k.r, k.at, l.account_id AS held_by, l.valid_to AS after"
    " FROM unnest($1::bigint[], $2::cidr[], $3::text[], $4::timestamptz[]) AS k(a, p, r, at)"
    " LEFT JOIN LATERAL (SELECT account_id, valid_to FROM ip_bindings WHERE prefix && k.p"
    "  AND (valid_to IS NULL OR valid_to > k.at) ORDER BY valid_to DESC NULLS FIRST LIMIT 1) AS l ON true),"
    " bound AS (INSERT INTO ip_bindings(account_id, prefix, kind, source, session_ref, valid_from)"
    "  SELECT a, p, 'dynamic', 'radius', r, coalesce(after, at) FROM k WHERE held_by IS NULL OR after IS NOT NULL"
    "  RETURNING 1)"
    " SELECT a AS account_id, host(p) AS prefix, r AS session_ref, held_by FROM k"
    " WHERE held_by IS NOT NULL AND after IS NULL AND held_by <> a")
"""``_bind`` for many prefixes at once (none overlapping another of the
statement: the caller flushes first); answers the ones bound without end to
another account, left alone."""


async def flush_pending(conn: DbConnection, pre: Prefetch) -> None:
    """Write what records of the batch put off: every Interim's and Stop's
    counters in one statement (``greatest``: the order of the writes to a
    row does not matter), then the Stops' ends (``end_sessions``, one call
    per end time and reason).  Called before anything reads what they
    change (a session row not kept, an Accounting-On/Off, a Start binding an
    address an ending session holds) and before the commit."""
    if pre.counters:
        rows = list(pre.counters.values())
        pre.counters.clear()
        await conn.execute(
            "UPDATE radius_sessions s SET session_time = greatest(s.session_time, k.t),"
            " input_octets = greatest(s.input_octets, k.i), output_octets = greatest(s.output_octets, k.o),"
            " updated_at = k.u FROM unnest($1::bigint[], $2::bigint[], $3::bigint[], $4::bigint[],"
            " $5::timestamptz[]) AS k(id, t, i, o, u) WHERE s.id = k.id",
            [r.id for r in rows], [r.session_time for r in rows], [r.input_octets for r in rows],
            [r.output_octets for r in rows], [r.updated_at for r in rows])
    if pre.binds:
        binds = list(pre.binds)
        pre.binds.clear()
        pre.bound_hosts.clear()
        pre.bound_v6 = False
        for row in await conn.fetch(_BIND_MANY, [b[0] for b in binds], [b[1] for b in binds],
                                    [b[2] for b in binds], [b[3] for b in binds]):
            _not_rebinding(row["prefix"], row["session_ref"], row["held_by"], row["account_id"])
    if pre.ends:
        groups: dict[tuple[dt.datetime, str], list[StoredSession]] = defaultdict(list)
        for session, at, reason in pre.ends:
            groups[(at, reason)].append(session)
        pre.ends.clear()
        pre.ending_ips.clear()
        for (at, reason), sessions in groups.items():
            await end_sessions(conn, sessions, at, reason)


def _put_off(pre: Prefetch, session: StoredSession, record: AccountingRecord, at: dt.datetime,
             now: dt.datetime, hooks: list[SessionHook]) -> AccountingResult:
    """An Interim/Stop of an open session with no second to charge: its
    writes join the batch's (``flush_pending``); the row as they leave it is
    kept for the next record of the session."""
    if record.session_time >= session.session_time:
        session = dataclasses.replace(
            session, session_time=record.session_time, updated_at=now,
            input_octets=max(session.input_octets, record.input_octets),
            output_octets=max(session.output_octets, record.output_octets))
        pre.counters[session.id] = session
    if record.status is AcctStatus.STOP:
        pre.ends.append((session, at, EndReason.stop(record.terminate_cause)))
        if session.framed_ip is not None:
            pre.ending_ips.add(str(session.framed_ip))
        hooks.append(SessionHook("session.stopped", {
            "account_id": session.account_id, "session_id": session.session_id, "ip": session.framed_ip,
            "bytes_in": session.input_octets, "bytes_out": session.output_octets}))
        session = dataclasses.replace(session, ended_at=max(at, session.started_at + dt.timedelta(microseconds=1)))
    pre.kept(session)
    return AccountingResult(session=session.id, hooks=tuple(hooks))


async def nas_id_of(conn: DbConnection, address: str, pre: Prefetch | None = None) -> int:
    """The id of the NAS at ``address``; ``UnknownObject`` if there is none."""
    if pre is not None:
        known = pre.nas.get(_canonical(address))
        if known is not None:
            return known
    nas = await conn.fetchrow("SELECT id FROM radius_nas WHERE address = $1::inet", address)
    if nas is None:
        raise UnknownObject(f"unknown NAS {address}")
    return int(nas["id"])


async def apply_accounting(conn: DbConnection, record: AccountingRecord, now: dt.datetime, *,
                           tz: dt.tzinfo = dt.timezone.utc, pre: Prefetch | None = None) -> AccountingResult:
    """Apply one Accounting-Request.  Idempotent: the same request twice
    changes nothing the second time.  Runs in a transaction; ``tz`` is the
    operator's zone (time ranges, periods).  The result's block changes and
    plugin hooks are for the caller to announce after the commit.  ``pre``:
    what a batch read beforehand (``prefetch``), when the record is one of a
    batch applied in this transaction in order."""
    nas_id = await nas_id_of(conn, record.nas, pre)
    status = record.status
    at = dt.datetime.fromtimestamp(record.event_time or now.timestamp(), dt.timezone.utc)
    if status in (AcctStatus.ON, AcctStatus.OFF):
        if pre is not None:
            await flush_pending(conn, pre)
        sessions = await locked_active(conn, "nas_id = $1 ORDER BY id", nas_id)
        if pre is not None:
            pre.forget_nas(nas_id)
        reason = EndReason.ACCOUNTING_ON if status is AcctStatus.ON else EndReason.ACCOUNTING_OFF
        changes = await charge_and_end(conn, sessions, at, reason, now, tz, str(nas_id))
        return AccountingResult(closed=len(sessions), block_changes=changes)
    if status not in SESSION_STATUSES or record.session_id is None:
        return AccountingResult(ignored=str(status))
    session_id = record.session_id
    hooks: list[SessionHook] = []
    known = pre.taken(nas_id, session_id) if pre is not None else None
    row = None
    if known is None and not (pre is not None and (nas_id, session_id) in pre.absent):
        if pre is not None:
            await flush_pending(conn, pre)   # the row read must be the row as the batch left it
        row = await conn.fetchrow(f"SELECT {SESSION_COLUMNS} FROM radius_sessions WHERE nas_id = $1"
                                  " AND session_id = $2 FOR UPDATE", nas_id, session_id)
    if known is not None:
        session = known
    elif row is not None:
        session = StoredSession.of(row)
    else:
        if at < now - WATERMARK_HORIZON:
            STALE_RECORDS.inc()
            log.warning("%s of unknown session %s from NAS %s stamped %s, before the %s horizon: ignored",
                        status, session_id, record.nas, at.isoformat(), WATERMARK_HORIZON)
            return AccountingResult(ignored="older than the horizon")
        if pre is not None and pre.binding(record.framed_ip, record.ipv6_prefixes):
            await flush_pending(conn, pre)   # an address a record of the batch binds or frees: that first
        started = await _start(conn, nas_id, record, session_id, at, now, pre)
        if started is None:
            return AccountingResult(ignored="unknown login")
        session = started
        if pre is not None and status is AcctStatus.START:
            pre.kept(session)
        hooks.append(SessionHook("session.started", {"account_id": session.account_id, "session_id": session_id,
                                                     "ip": record.framed_ip}))
    block_changes: tuple[BlockChange, ...] = ()
    if (pre is not None and session.ended_at is None and status in (AcctStatus.INTERIM, AcctStatus.STOP)
            and not pre.charges(session.account_id)):
        return _put_off(pre, session, record, at, now, hooks)
    if session.ended_at is not None:
        # a late or repeated Interim/Stop of an ended session: only seconds above what was charged
        if status in (AcctStatus.INTERIM, AcctStatus.STOP):
            await conn.execute(
                "UPDATE radius_sessions SET session_time = greatest(session_time, $2),"
                " input_octets = greatest(input_octets, $3), output_octets = greatest(output_octets, $4)"
                " WHERE id = $1", session.id, record.session_time, record.input_octets, record.output_octets)
        if (status in (AcctStatus.INTERIM, AcctStatus.STOP) and record.session_time > session.charged_time
                and (pre is None or pre.charges(session.account_id))):
            block_changes = await _charge_time(conn, session, record.session_time, now, tz)
            # the commit made a watermark row again: the session row is the watermark of an ended session
            await conn.execute("DELETE FROM ingest_watermarks WHERE source = $1",
                               usage_source(session.nas_id, session.session_id))
        return AccountingResult(session=session.id, ended=True, block_changes=block_changes)
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
