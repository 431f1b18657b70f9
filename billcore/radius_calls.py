"""The core side of RADIUS: the URFA calls the radius process (and admins)
make, and the decisions behind them.

Theory of operation
-------------------
The radius process is an edge: it turns datagrams into ``radius.authorize``
and ``radius.accounting`` calls and sends back what these return.  Every
rule lives here, next to the database:

* **authorize** — the account's service link by login; the password is
  decrypted (SecretBox, key file outside the database) and compared (PAP)
  or used to compute MD5(id + password + challenge) (CHAP).  Rejected when
  the link is disabled, the account has any active block, the link is at
  its simultaneous-session limit or the account at its time service's
  ``max_sessions``, or the money left buys no second of time.  Accepted
  with Framed-IP-Address (static, or a lease from the link's pool: one row
  per address, so no two links collide), Session-Timeout, Acct-Interim-
  Interval and the rate limit (Mikrotik-Rate-Limit, Cisco-AVPair).
* **time** — an account whose tariff (in force now) has a time service is
  time-based; its prices live in the tariff engine (``service_rates`` per
  time range, prepaid time, tiers, accounting periods).  Session-Timeout is
  what the money left (balance + credit + open promised credit; other
  active sessions are not reserved) buys from now on, walking forward
  through time ranges and periods exactly as rating will charge it
  (``seconds_affordable``), capped by the link's and the service's
  ``session_limit`` and by ``MAX_TIME_HORIZON``.
* **accounting** — Start creates the active session and binds its framed IP
  to the account in ``ip_bindings`` (NetFlow reads them); Interim/Stop
  update the counters (64-bit) and commit the session's new seconds with
  ``commit_usage``: source ``radius:<nas id>:<Acct-Session-Id>``, watermark
  = Acct-Session-Time, usage = the piece of the session between the last
  committed session time and this one, cut by tariff links (each piece on
  its time service) and then by rating at time-range and period borders.
  A retransmitted or older Interim is at or below the watermark: nothing
  is charged.  Usage rating cannot place (no rate for a range, a NAS clock
  ahead of ours) is not committed at all — the watermark stays, so the
  next Interim/Stop charges those seconds once the cause is fixed.  Stop,
  Accounting-On/Off and the stale sweep end sessions, bindings and leases.

Every handler does its work in one transaction; block changes caused by a
charge are published on the ``blocks`` topic after it commits.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import datetime as dt
import hashlib
import hmac
import ipaddress
import json
import logging
import os
import zoneinfo
from collections.abc import AsyncIterator, Mapping, Sequence
from pathlib import Path
from typing import Any, Final

import asyncpg
import nacl.exceptions
import nacl.secret
import nacl.utils

from billcore.common.errors import InUse, UnknownObject
from billcore.billing.ledger_errors import InvalidValue
from billcore.billing.periods import period_containing
from billcore.billing.rating import TIME_CLASS, AccountPlan, CounterKey, RatingBook, ServiceTariff, SessionUsage
from billcore.billing.tariffs import load_book
from billcore.billing.timeranges import select, split
from billcore.billing.usage import MAX_SOURCE, commit_usage, watermark
from billcore.server.calls import CallSpec
from billcore.common.config import Config
from billcore.server.context import CoreContext

__all__ = [
    "SecretStore",
    "authorize",
    "account",
    "close_stale",
    "nas_list",
    "add_nas",
    "add_pool",
    "add_link",
    "edit_nas",
    "delete_nas",
    "edit_pool",
    "delete_pool",
    "pool_list",
    "edit_link",
    "delete_link",
    "link_list",
    "authorize_many",
    "account_sessions",
    "calls",
    "seconds_affordable",
    "usage_source",
    "MAX_TIME_HORIZON",
]

log = logging.getLogger(__name__)

SYSTEM = frozenset({"system"})
ADMIN = frozenset({"admin", "system"})
ACTOR = "radius"
PAGE: Final = 1000  # rows per page of the list calls (NAS, pools, links, sessions)


class SecretStore:
    """Encrypts recoverable secrets with a key kept in a 0600 file."""

    def __init__(self, key: bytes) -> None:
        self._box = nacl.secret.SecretBox(key)

    @classmethod
    def from_config(cls, config: Config) -> SecretStore:
        return cls(cls.load_or_create_key(config.secret_key_path))

    @staticmethod
    def load_or_create_key(path: Path) -> bytes:
        try:
            fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        except FileExistsError:
            key = path.read_bytes()
            if len(key) != nacl.secret.SecretBox.KEY_SIZE:
                raise ValueError(f"{path}: a secret key file holds exactly 32 bytes") from None
            return key
        key = nacl.utils.random(nacl.secret.SecretBox.KEY_SIZE)
        try:
            os.write(fd, key)
            os.fsync(fd)
        finally:
            os.close(fd)
        return key

    def seal(self, secret: bytes) -> bytes:
        return bytes(self._box.encrypt(secret))

    def open(self, sealed: bytes) -> bytes:
        try:
            return bytes(self._box.decrypt(bytes(sealed)))
        except nacl.exceptions.CryptoError as exc:
            raise ValueError("a stored secret does not open with this key (wrong core.secret_key_file?)") from exc


# -- admin: NAS devices, pools, links ------------------------------------------


async def add_nas(conn: asyncpg.Connection, store: SecretStore, *, name: str, address: str, secret: str,
                  require_message_authenticator: bool = True, coa_port: int = 3799,
                  disconnect_mode: str = "disconnect", blocked_profile: list[list[Any]] | None = None) -> int:
    if not secret:
        raise InvalidValue("a NAS needs a shared secret")
    return int(await conn.fetchval(
        "INSERT INTO radius_nas(name, address, secret_enc, require_message_authenticator, coa_port,"
        " disconnect_mode, blocked_profile) VALUES ($1, $2::inet, $3, $4, $5, $6, $7::jsonb) RETURNING id",
        name, address, store.seal(secret.encode()), require_message_authenticator, coa_port,
        disconnect_mode, json.dumps(blocked_profile or [])))


async def nas_list(conn: asyncpg.Connection, store: SecretStore, *, with_secrets: bool, limit: int = PAGE,
                   offset: int = 0) -> list[dict[str, Any]]:
    rows = await conn.fetch("SELECT *, host(address) AS host FROM radius_nas ORDER BY id LIMIT $1 OFFSET $2",
                            limit, offset)
    out = []
    for r in rows:
        rec = {
            "id": r["id"], "name": r["name"], "address": r["host"],
            "require_message_authenticator": r["require_message_authenticator"], "coa_port": r["coa_port"],
            "disconnect_mode": r["disconnect_mode"], "blocked_profile": json.loads(r["blocked_profile"]),
        }
        if with_secrets:
            rec["secret"] = store.open(r["secret_enc"])
        out.append(rec)
    return out


async def edit_nas(conn: asyncpg.Connection, store: SecretStore, nas_id: int, **changes: Any) -> bool:
    """Change the given fields of a NAS (the secret is sealed again)."""
    sets: dict[str, Any] = {}
    for name, value in changes.items():
        if value is None:
            continue
        if name == "secret":
            if not value:
                raise InvalidValue("a NAS needs a shared secret")
            sets["secret_enc"] = store.seal(str(value).encode())
        elif name == "blocked_profile":
            sets["blocked_profile"] = json.dumps(value)
        elif name in _NAS_FIELDS:
            sets[name] = value
        else:
            raise InvalidValue(f"a NAS has no field {name!r}")
    return await _update(conn, "radius_nas", nas_id, sets, _NAS_CASTS)


_NAS_FIELDS = frozenset({"name", "address", "require_message_authenticator", "coa_port", "disconnect_mode"})
_NAS_CASTS = {"address": "::inet", "blocked_profile": "::jsonb"}
_LINK_FIELDS = frozenset({"login", "static_ip", "max_sessions", "session_limit",
                          "interim_interval", "rate_limit", "cisco_avpairs", "disabled"})
_LINK_CASTS = {"static_ip": "::inet"}
_POOL_CASTS = {"first": "::inet", "last": "::inet"}


async def _update(conn: asyncpg.Connection, table: str, row_id: int, sets: dict[str, Any],
                  casts: dict[str, str]) -> bool:
    """UPDATE one row by id with the given column values (names are ours, never the caller's)."""
    if not sets:
        return bool(await conn.fetchval(f"SELECT true FROM {table} WHERE id = $1", row_id))
    cols = ", ".join(f"{c} = ${i + 2}{casts.get(c, '')}" for i, c in enumerate(sets))
    return await conn.execute(f"UPDATE {table} SET {cols} WHERE id = $1", row_id, *sets.values()) != "UPDATE 0"


async def delete_nas(conn: asyncpg.Connection, nas_id: int, now: dt.datetime, force: bool = False) -> bool:
    """Delete a NAS and its session history.  Refused while it has active
    sessions, unless ``force``: then they are ended first (bindings, leases)."""
    active = await conn.fetch("SELECT * FROM radius_sessions WHERE nas_id = $1 AND ended_at IS NULL FOR UPDATE",
                              nas_id)
    if active and not force:
        raise InUse(f"NAS {nas_id} has {len(active)} active session(s); pass force to end them")
    await _end_sessions(conn, list(active), now, "nas-deleted")
    # NAS ids are never reused: the time watermarks of its sessions are dead
    await conn.execute("DELETE FROM ingest_watermarks WHERE starts_with(source, $1)", f"radius:{nas_id}:")
    return await conn.execute("DELETE FROM radius_nas WHERE id = $1", nas_id) != "DELETE 0"


async def add_pool(conn: asyncpg.Connection, *, name: str, first: str, last: str) -> int:
    return int(await conn.fetchval(
        "INSERT INTO radius_pools(name, first, last) VALUES ($1, $2::inet, $3::inet) RETURNING id", name, first, last))


async def edit_pool(conn: asyncpg.Connection, pool_id: int, *, name: str | None = None, first: str | None = None,
                    last: str | None = None) -> bool:
    """Rename or resize a pool; leases outside the new range are refused."""
    sets = {k: v for k, v in (("name", name), ("first", first), ("last", last)) if v is not None}
    done = await _update(conn, "radius_pools", pool_id, sets, _POOL_CASTS)
    outside = await conn.fetchval(
        "SELECT count(*) FROM radius_leases l JOIN radius_pools p ON p.id = l.pool_id"
        " WHERE p.id = $1 AND (l.address < p.first OR l.address > p.last)", pool_id)
    if outside:
        raise InUse(f"{outside} leased address(es) would fall outside the pool")
    return done


async def delete_pool(conn: asyncpg.Connection, pool_id: int) -> bool:
    users = await conn.fetchval("SELECT count(*) FROM radius_links WHERE pool_id = $1", pool_id)
    if users:
        raise InUse(f"pool {pool_id} is used by {users} link(s)")
    return await conn.execute("DELETE FROM radius_pools WHERE id = $1", pool_id) != "DELETE 0"


async def pool_list(conn: asyncpg.Connection, limit: int = PAGE, offset: int = 0) -> list[dict[str, Any]]:
    rows = await conn.fetch(
        "SELECT p.id, p.name, host(p.first) AS first, host(p.last) AS last, p.last - p.first + 1 AS size,"
        " (SELECT count(*) FROM radius_leases l WHERE l.pool_id = p.id) AS leased FROM radius_pools p ORDER BY id"
        " LIMIT $1 OFFSET $2", limit, offset)
    return [dict(r) for r in rows]


async def add_link(conn: asyncpg.Connection, store: SecretStore, *, account_id: int, login: str, password: str,
                   static_ip: str | None = None, pool: str | None = None, max_sessions: int = 1,
                   session_limit: int | None = None, interim_interval: int = 300,
                   rate_limit: str = "", cisco_avpairs: list[str] | None = None) -> int:
    """An account's RADIUS login.  Time is priced by the account's tariff
    (a time service), not by the link."""
    pool_id = await _pool_id(conn, pool) if pool is not None else None
    return int(await conn.fetchval(
        "INSERT INTO radius_links(account_id, login, password_enc, static_ip, pool_id, max_sessions,"
        " session_limit, interim_interval, rate_limit, cisco_avpairs)"
        " VALUES ($1, $2, $3, $4::inet, $5, $6, $7, $8, $9, $10) RETURNING id",
        account_id, login, store.seal(password.encode()), static_ip, pool_id, max_sessions,
        session_limit, interim_interval, rate_limit, cisco_avpairs or []))


async def _pool_id(conn: asyncpg.Connection, name: str) -> int:
    pool_id = await conn.fetchval("SELECT id FROM radius_pools WHERE name = $1", name)
    if pool_id is None:
        raise UnknownObject(f"no IP pool named {name!r}")
    return int(pool_id)


async def edit_link(conn: asyncpg.Connection, store: SecretStore, link_id: int, **changes: Any) -> bool:
    """Change the given fields of a link.  ``password`` is sealed again;
    ``pool`` names a pool ("" for none) and clears a static IP, a
    ``static_ip`` ("" for none) clears the pool; ``session_limit`` 0 removes the limit."""
    sets: dict[str, Any] = {}
    for name, value in changes.items():
        if value is None:
            continue
        if name == "password":
            sets["password_enc"] = store.seal(str(value).encode())
        elif name == "pool":
            sets["pool_id"] = await _pool_id(conn, value) if value else None
            if value:
                sets["static_ip"] = None
        elif name == "static_ip":
            sets["static_ip"] = value or None
            if value:
                sets["pool_id"] = None
        elif name == "session_limit":
            sets["session_limit"] = value or None
        elif name in _LINK_FIELDS:
            sets[name] = value
        else:
            raise InvalidValue(f"a link has no field {name!r}")
    done = await _update(conn, "radius_links", link_id, sets, _LINK_CASTS)
    if "pool_id" in sets:  # leases of the old pool go; active sessions keep their address until they end
        await conn.execute("DELETE FROM radius_leases WHERE link_id = $1 AND expires_at IS NOT NULL"
                           " AND pool_id IS DISTINCT FROM $2", link_id, sets["pool_id"])
    return done


async def delete_link(conn: asyncpg.Connection, link_id: int, now: dt.datetime, force: bool = False) -> bool:
    """Delete a link, its leases and session history.  Refused while it has
    active sessions, unless ``force``: then they are ended first.  Time
    charges already booked stay in the ledger, and so do the sessions' time
    watermarks: a late Interim of a deleted session, should the login come
    back, is never charged twice."""
    active = await conn.fetch("SELECT * FROM radius_sessions WHERE link_id = $1 AND ended_at IS NULL FOR UPDATE",
                              link_id)
    if active and not force:
        raise InUse(f"link {link_id} has {len(active)} active session(s); pass force to end them")
    await _end_sessions(conn, list(active), now, "link-deleted")
    return await conn.execute("DELETE FROM radius_links WHERE id = $1", link_id) != "DELETE 0"


async def link_list(conn: asyncpg.Connection, account_id: int | None = None, login: str | None = None,
                    limit: int = PAGE, offset: int = 0) -> list[dict[str, Any]]:
    """Links (without passwords), of one account, one login, or all."""
    rows = await conn.fetch(
        "SELECT l.id, l.account_id, l.login, host(l.static_ip) AS static_ip, p.name AS pool, l.max_sessions,"
        " l.session_limit, l.interim_interval, l.rate_limit, l.cisco_avpairs, l.disabled"
        " FROM radius_links l LEFT JOIN radius_pools p ON p.id = l.pool_id"
        " WHERE ($1::bigint IS NULL OR l.account_id = $1) AND ($2::text IS NULL OR l.login = $2) ORDER BY l.id"
        " LIMIT $3 OFFSET $4", account_id, login, limit, offset)
    return [dict(r) for r in rows]


# -- authorization --------------------------------------------------------------


def _reject(why: str) -> dict[str, Any]:
    return {"accept": False, "reason": why, "reply": [["Reply-Message", why]]}


MAX_LOGIN: Final = 253  # the longest User-Name an attribute can carry


def _malformed(req: dict[str, Any]) -> str | None:
    """Why this request cannot be decided, checked before the batch's query
    so one bad request is refused alone instead of failing its batch (a NUL
    in a login makes PostgreSQL refuse the whole query); None: well formed."""
    login = req.get("login")
    if not isinstance(login, str) or not login:
        return "no login"
    if "\0" in login or len(login) > MAX_LOGIN:
        return "malformed login"
    method = req.get("method")
    if method == "pap":
        if not isinstance(req.get("password"), bytes):
            return "malformed password"
    elif method == "chap":
        chap = req.get("chap")
        if not (isinstance(chap, dict) and isinstance(chap.get("id"), int)
                and isinstance(chap.get("challenge"), bytes) and len(chap["challenge"]) >= 5
                and isinstance(chap.get("response"), bytes) and len(chap["response"]) == 16):
            return "malformed CHAP"
    return None


_RECORD_TEXT = ("login", "nas_port_id", "calling_station_id", "multi_session_id")
_RECORD_COUNTS = ("session_time", "input_octets", "output_octets", "input_packets", "output_packets",
                  "terminate_cause")
MAX_EVENT_TIME = 2**40   # seconds since 1970: far beyond any clock, inside a datetime


def _check_record(req: dict[str, Any]) -> None:
    """Refuse an accounting record the radius process could not have built
    (``radius.requests.accounting_record``) before it reaches a query."""
    def ip(value: object) -> bool:
        try:
            ipaddress.ip_address(value)  # type: ignore[arg-type]
        except ValueError:
            return False
        return True

    if not isinstance(req.get("nas"), str) or not ip(req["nas"]):
        raise InvalidValue("record.nas must be the NAS's IP address")
    if not isinstance(req.get("status"), str) or not 1 <= len(req["status"]) <= 32:
        raise InvalidValue("record.status must be an accounting status (start, interim, stop, on, off)")
    session_id = req.get("session_id")
    if session_id is not None and (not isinstance(session_id, str) or len(session_id) > 253):
        raise InvalidValue("record.session_id must be text of at most 253 characters")
    if req["status"] in ("start", "interim", "stop") and not session_id:
        raise InvalidValue("record.session_id is required for start, interim and stop")
    for name in _RECORD_TEXT:
        value = req.get(name)
        if value is not None and (not isinstance(value, str) or len(value) > 253):
            raise InvalidValue(f"record.{name} must be text of at most 253 characters")
    for name in _RECORD_COUNTS:
        value = req.get(name)
        if value is not None and (type(value) is not int or not 0 <= value < 2**63):
            raise InvalidValue(f"record.{name} must be a non-negative int")
    event_time = req.get("event_time")
    if event_time is not None and (type(event_time) not in (int, float) or not 0 <= event_time <= MAX_EVENT_TIME):
        raise InvalidValue("record.event_time must be seconds since 1970")
    framed_ip = req.get("framed_ip")
    if framed_ip is not None and (not isinstance(framed_ip, str) or not ip(framed_ip)):
        raise InvalidValue("record.framed_ip must be an IP address")


def _password_ok(req: dict[str, Any], password: bytes) -> bool:
    if req.get("method") == "pap":
        return hmac.compare_digest(bytes(req.get("password") or b""), password)
    if req.get("method") == "chap":
        chap = req.get("chap") or {}
        # RFC 1994: MD5(Identifier + secret + Challenge)
        expected = hashlib.md5(bytes([int(chap["id"]) & 0xFF]) + password + bytes(chap["challenge"])).digest()
        return hmac.compare_digest(expected, bytes(chap["response"]))
    return False


async def _lease(conn: asyncpg.Connection, link: asyncpg.Record, now: dt.datetime, hold: dt.timedelta) -> str | None:
    """A pool address for the link: its current lease, else the lowest free one."""
    held = await conn.fetchval("SELECT host(address) FROM radius_leases WHERE link_id = $1 AND pool_id = $2",
                               link["id"], link["pool_id"])
    if held is not None:
        await conn.execute("UPDATE radius_leases SET expires_at = $2 WHERE address = $1::inet AND expires_at IS NOT NULL",
                           held, now + hold)
        return str(held)
    return await conn.fetchval(
        "WITH p AS (SELECT first, last FROM radius_pools WHERE id = $1),"
        " cand AS (SELECT p.first + g AS a FROM p, generate_series(0, p.last - p.first) AS g"
        "   WHERE NOT EXISTS (SELECT 1 FROM radius_leases l WHERE l.address = p.first + g"
        "                     AND (l.expires_at IS NULL OR l.expires_at > $3))"
        "     AND NOT EXISTS (SELECT 1 FROM ip_bindings b WHERE b.prefix >>= p.first + g"
        "                     AND b.valid_from <= $3 AND (b.valid_to IS NULL OR b.valid_to > $3))"
        "   ORDER BY g LIMIT 1)"
        " INSERT INTO radius_leases(address, pool_id, link_id, expires_at) SELECT a, $1, $2, $4 FROM cand"
        " ON CONFLICT (address) DO UPDATE SET link_id = EXCLUDED.link_id, expires_at = EXCLUDED.expires_at"
        "   WHERE radius_leases.expires_at IS NOT NULL AND radius_leases.expires_at <= $3"
        " RETURNING host(address)",
        link["pool_id"], link["id"], now, now + hold)


_LINKS_BY_LOGIN = (
    "SELECT l.id, l.account_id, l.login, l.password_enc, host(l.static_ip) AS static_ip, l.pool_id,"
    " l.max_sessions, l.session_limit, l.interim_interval, l.rate_limit, l.cisco_avpairs,"
    " l.disabled, a.balance, a.credit, a.unlimited, a.status,"
    " EXISTS (SELECT 1 FROM blocks b WHERE b.account_id = l.account_id AND b.lifted_at IS NULL) AS blocked,"
    " (SELECT count(*) FROM radius_sessions s WHERE s.link_id = l.id AND s.ended_at IS NULL) AS active,"
    " tv.services AS time_services, tv.max_sessions AS time_max_sessions, tv.session_limit AS time_session_limit"
    " FROM radius_links l JOIN accounts a ON a.id = l.account_id"
    # the time services of the tariff in force now (normally none or one)
    " LEFT JOIN LATERAL (SELECT array_agg(sv.id ORDER BY sv.id) AS services, min(sv.max_sessions) AS max_sessions,"
    "   min(sv.session_limit) AS session_limit FROM account_tariffs t"
    "   JOIN tariff_services ts ON ts.tariff_id = t.tariff_id JOIN services sv ON sv.id = ts.service_id"
    "   WHERE t.account_id = l.account_id AND sv.kind = 'time' AND t.valid_from <= $2"
    "   AND (t.valid_to IS NULL OR t.valid_to > $2)) tv ON true"
    " WHERE l.login = ANY($1::text[])")

_TIME_ACCOUNTS = (
    "SELECT a.id, (SELECT count(*) FROM radius_sessions s WHERE s.account_id = a.id AND s.ended_at IS NULL) AS active,"
    " (SELECT coalesce(sum(p.amount), 0)::bigint FROM promised_payments p WHERE p.account_id = a.id"
    "   AND p.closed_at IS NULL AND p.expires_at > $2) AS promised"
    " FROM unnest($1::bigint[]) AS a(id)")

MAX_TIME_HORIZON: Final = 7 * 86_400
"""Longest Session-Timeout that money alone gives (seconds): the forward walk
through time ranges stays short, and a richer subscriber is re-authorized
(and re-priced) once a week."""
_MAX_CHUNKS: Final = MAX_TIME_HORIZON // 86_400 + 3
"""Accounting periods the walk may cross: a period is at least a (23-hour) day."""
_ONE_SECOND: Final = dt.timedelta(seconds=1)


def seconds_affordable(money: int, now: dt.datetime, horizon: int, book: RatingBook, plan: AccountPlan,
                       service: ServiceTariff, counters: Mapping[CounterKey, int]) -> int:
    """Whole seconds from ``now`` that ``money`` (micro-units) pays for on the
    time service ``service``, at most ``horizon``.

    Walks forward piece by piece — ``split`` at time-range borders (DST
    included) inside each accounting period — and prices each piece the way
    rating will charge it: on the cumulative counter of its (range, period),
    starting from ``counters`` (absent: 0), so prepaid time, tiers and the
    floor are the same as the charge.  A piece the money covers is bought
    whole; inside the first one it does not cover, the last affordable second
    is found by bisection (``Meter.charged`` is monotone).  A time range
    without a price ends the walk: time there cannot be sold.  Pure.
    """
    if type(money) is not int or type(horizon) is not int or not 0 <= horizon <= MAX_TIME_HORIZON:
        raise ValueError(f"money is int micro-units and horizon an int in 0..{MAX_TIME_HORIZON}")
    money = max(0, money)
    cursor = now.astimezone(dt.timezone.utc).replace(microsecond=0)
    end = cursor + dt.timedelta(seconds=horizon)
    used: dict[CounterKey, int] = {}
    bought = 0
    for _ in range(_MAX_CHUNKS):
        if cursor >= end:
            return bought
        period = period_containing(plan.period, cursor, book.tz)
        chunk_end = min(period.end, end)
        for piece in split(book.timeranges, cursor, chunk_end, book.tz):
            found = service.meter_for(TIME_CLASS, piece.range_id)
            if found is None:
                return bought
            range_id, meter = found
            key = CounterKey(plan.account_id, service.service_id, TIME_CLASS, range_id, period.start)
            before = counters.get(key, 0) + used.get(key, 0)
            base = meter.charged(before)
            whole = meter.charged(before + piece.seconds) - base
            if whole <= money:
                money -= whole
                used[key] = used.get(key, 0) + piece.seconds
                bought += piece.seconds
                continue
            low, high = 0, piece.seconds  # charged(before + low) - base <= money < … + high
            for _ in range(64):
                if high - low <= 1:
                    break
                middle = (low + high) // 2
                if meter.charged(before + middle) - base <= money:
                    low = middle
                else:
                    high = middle
            assert meter.charged(before + low) - base <= money, "bisection left the affordable side"
            return bought + low
        cursor = chunk_end
    raise AssertionError("the walk crossed more accounting periods than the horizon holds")


class _TimeVerdict:
    """An account's time decision for one batch: seconds to allow (None: not
    limited by money) or the reason to refuse."""

    __slots__ = ("seconds", "refusal", "account_active")

    def __init__(self, seconds: int | None, refusal: str | None, account_active: int) -> None:
        self.seconds = seconds
        self.refusal = refusal
        self.account_active = account_active


def _time_horizon(link: asyncpg.Record) -> int:
    limits = [v for v in (link["session_limit"], link["time_session_limit"]) if v]
    return min([MAX_TIME_HORIZON, *limits])


async def _time_verdicts(conn: asyncpg.Connection, links: Sequence[asyncpg.Record], now: dt.datetime,
                         tz: dt.tzinfo) -> dict[int, _TimeVerdict]:
    """Decide time for the accounts of ``links`` that have a time service now
    (a few queries for the whole batch)."""
    by_account = {link["account_id"]: link for link in links if link["time_services"]}
    if not by_account:
        return {}
    ids = sorted(by_account)
    extra = {r["id"]: r for r in await conn.fetch(_TIME_ACCOUNTS, ids, now)}
    book = await load_book(conn, ids, tz=tz, since=now, until=now)
    starts = {}
    for acc in ids:
        plan = book.accounts.get(acc)
        if plan is not None:
            starts[acc] = period_containing(plan.period, now, tz).start
    counters: dict[CounterKey, int] = {}
    if starts:
        for r in await conn.fetch(
                "SELECT account_id, service_id, range_id, period_start, quantity FROM usage_counters"
                " WHERE account_id = ANY($1::bigint[]) AND class_id = $2 AND period_start >= $3",
                ids, TIME_CLASS, min(starts.values())):
            counters[CounterKey(r["account_id"], r["service_id"], TIME_CLASS, r["range_id"], r["period_start"])] = \
                int(r["quantity"])
    current = select(book.timeranges, now, tz)
    verdicts: dict[int, _TimeVerdict] = {}
    for acc, link in by_account.items():
        active = int(extra[acc]["active"])
        services = list(link["time_services"])
        plan = book.accounts.get(acc)
        service = book.services.get(services[0])
        if len(services) > 1 or plan is None or service is None:
            log.error("account %s: its tariff has %d time services; time cannot be priced", acc, len(services))
            verdicts[acc] = _TimeVerdict(None, "tariff has several time services", active)
            continue
        if link["unlimited"]:
            verdicts[acc] = _TimeVerdict(None, None, active)
            continue
        money = int(link["balance"]) + int(link["credit"]) + int(extra[acc]["promised"])
        seconds = seconds_affordable(money, now, _time_horizon(link), book, plan, service, counters)
        if seconds > 0:
            verdicts[acc] = _TimeVerdict(seconds, None, active)
        elif service.meter_for(TIME_CLASS, 0 if current is None else current.range_id) is None:
            verdicts[acc] = _TimeVerdict(None, "no time price now", active)
        else:
            verdicts[acc] = _TimeVerdict(None, "no money left for time", active)
    return verdicts


def _decide(req: dict[str, Any], link: asyncpg.Record | None, store: SecretStore) -> dict[str, Any] | None:
    """Every rule that needs no further query; None: not refused (yet)."""
    if link is None or not _password_ok(req, store.open(link["password_enc"])):
        return _reject("wrong login or password")
    if link["disabled"] or link["status"] != "active":
        return _reject("service disabled")
    if link["blocked"]:
        return _reject("account blocked")
    if link["active"] >= link["max_sessions"]:
        return _reject("too many sessions")
    return None


def _decide_time(link: asyncpg.Record, verdict: _TimeVerdict | None) -> dict[str, Any] | None:
    """The time service's rules: its max_sessions (over all the account's
    sessions) and the money left."""
    if verdict is None:
        return None
    if link["time_max_sessions"] is not None and verdict.account_active >= link["time_max_sessions"]:
        return _reject("too many sessions")
    if verdict.refusal is not None:
        return _reject(verdict.refusal)
    return None


def _accept(link: asyncpg.Record, address: str | None, verdict: _TimeVerdict | None) -> dict[str, Any]:
    reply: list[list[Any]] = []
    limits = [v for v in (link["session_limit"], link["time_session_limit"] if verdict else None) if v]
    if verdict is not None and verdict.seconds is not None:
        assert verdict.seconds > 0, "a time-based account with no time left is refused before"
        limits.append(verdict.seconds)
    if address is not None:
        reply.append(["Framed-IP-Address", address])
    if limits:
        reply.append(["Session-Timeout", min(min(limits), 2**32 - 1)])
    reply.append(["Acct-Interim-Interval", link["interim_interval"]])
    if link["rate_limit"]:
        reply.append(["Mikrotik-Rate-Limit", link["rate_limit"]])
    for pair in link["cisco_avpairs"]:
        reply.append(["Cisco-AVPair", pair])
    return {"accept": True, "account_id": link["account_id"], "reply": reply}


async def authorize_many(conn: asyncpg.Connection, store: SecretStore, requests: list[dict[str, Any]],
                         now: dt.datetime, lease_hold: dt.timedelta = dt.timedelta(seconds=120), *,
                         tz: dt.tzinfo = dt.timezone.utc) -> list[dict[str, Any]]:
    """Decide a batch of Access-Requests (see the module comment), in order.

    One query reads every link of the batch with its account, block flag,
    active-session count and the time services in force; accounts with a
    time service need a few more queries for the whole batch (sessions,
    promised credit, tariff book, counters), and pool links each take their
    lease under their link's row lock (a savepoint, so one failure stays its
    own).  A malformed request (``_malformed``) is rejected alone, before
    the query.  ``tz`` is the operator's zone (time ranges, periods)."""
    malformed = [_malformed(r) for r in requests]
    logins = sorted({r["login"] for r, bad in zip(requests, malformed) if bad is None})
    links = {r["login"]: r for r in await conn.fetch(_LINKS_BY_LOGIN, logins, now)} if logins else {}
    # per request: its refusal, or the link that passed the rules needing no further query
    first: list[dict[str, Any] | asyncpg.Record] = []
    for req, bad in zip(requests, malformed):
        refused = _reject(bad) if bad is not None else _decide(req, links.get(req["login"]), store)
        first.append(refused if refused is not None else links[req["login"]])
    passed = [x for x in first if not isinstance(x, dict)]
    verdicts = await _time_verdicts(conn, passed, now, tz) if passed else {}
    out: list[dict[str, Any]] = []
    for item in first:
        if isinstance(item, dict):
            out.append(item)
            continue
        link = item
        verdict = verdicts.get(link["account_id"])
        refused = _decide_time(link, verdict)
        if refused is not None:
            out.append(refused)
            continue
        if link["static_ip"] is not None:
            address: str | None = link["static_ip"]
        elif link["pool_id"] is not None:
            async with conn.transaction():
                await conn.execute("SELECT 1 FROM radius_links WHERE id = $1 FOR UPDATE", link["id"])
                address = await _lease(conn, link, now, lease_hold)
            if address is None:
                out.append(_reject("IP pool exhausted"))
                continue
        else:
            address = None
        out.append(_accept(link, address, verdict))
    return out


class Authorizer:
    """Decides batches one after the other on a connection it keeps while
    batches are waiting: under load that saves the pool's per-release reset
    round trip, and a queue of batches needs no more than one connection
    (each batch is one query).  Idle, the connection goes back to the pool."""

    def __init__(self, pool: asyncpg.Pool, store: SecretStore, tz: dt.tzinfo = dt.timezone.utc) -> None:
        self._pool = pool
        self._store = store
        self._tz = tz
        self._lock = asyncio.Lock()
        self._waiting = 0
        self._conn: asyncpg.Connection | None = None

    async def decide(self, requests: list[dict[str, Any]], now: dt.datetime) -> list[dict[str, Any]]:
        self._waiting += 1
        async with self._lock:
            self._waiting -= 1
            if self._conn is None:
                self._conn = await self._pool.acquire()
            conn = self._conn
            try:
                return await authorize_many(conn, self._store, requests, now, tz=self._tz)
            except BaseException:
                self._conn = None  # a failed connection is not kept
                await self._pool.release(conn)
                raise
            finally:
                if self._conn is not None and self._waiting == 0:
                    self._conn = None
                    await self._pool.release(conn)


async def authorize(conn: asyncpg.Connection, store: SecretStore, req: dict[str, Any], now: dt.datetime,
                    lease_hold: dt.timedelta = dt.timedelta(seconds=120), *,
                    tz: dt.tzinfo = dt.timezone.utc) -> dict[str, Any]:
    """Decide one Access-Request."""
    return (await authorize_many(conn, store, [req], now, lease_hold, tz=tz))[0]


# -- accounting ------------------------------------------------------------------


def _session_ref(nas_id: int, session_id: str) -> str:
    return f"radius:{nas_id}:{session_id}"


async def _end_sessions(conn: asyncpg.Connection, rows: list[asyncpg.Record], at: dt.datetime, reason: str) -> None:
    for s in rows:
        end = max(at, s["started_at"] + dt.timedelta(microseconds=1))
        await conn.execute("UPDATE radius_sessions SET ended_at = $2, end_reason = $3 WHERE id = $1 AND ended_at IS NULL",
                           s["id"], end, reason)
        await conn.execute("UPDATE ip_bindings SET valid_to = $2 WHERE session_ref = $1 AND valid_to IS NULL",
                           _session_ref(s["nas_id"], s["session_id"]), end)
        if s["framed_ip"] is not None:
            await conn.execute("DELETE FROM radius_leases WHERE address = $1 AND link_id = $2", s["framed_ip"], s["link_id"])


def usage_source(nas_id: int, session_id: str) -> str:
    """The ``commit_usage`` source of a session: ``radius:<nas id>:<Acct-Session-Id>``
    (a session id too long for a source is replaced by its SHA-256)."""
    source = f"radius:{nas_id}:{session_id}"
    if len(source) <= MAX_SOURCE:
        return source
    return f"radius:{nas_id}:sha256:{hashlib.sha256(session_id.encode()).hexdigest()}"


async def _time_usage(conn: asyncpg.Connection, account_id: int, start: dt.datetime,
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
    for r in rows:
        piece_start = max(start, r["valid_from"].replace(microsecond=0))
        piece_end = end if r["valid_to"] is None else min(end, r["valid_to"].replace(microsecond=0))
        if piece_end > piece_start:
            service = r["services"][0] if len(r["services"]) == 1 else None
            usage.append(SessionUsage(account_id, piece_start, (piece_end - piece_start) // _ONE_SECOND, service))
    return usage


class _Unrated(Exception):
    """Rating could not place part of a session's time: nothing is committed."""


async def _charge_time(conn: asyncpg.Connection, s: asyncpg.Record, session_time: int, now: dt.datetime,
                       tz: dt.tzinfo) -> list[dict[str, Any]]:
    """Commit the session's time up to ``session_time`` through the tariff
    engine, exactly once per counter value; return block events."""
    source = usage_source(s["nas_id"], s["session_id"])
    done = max(await watermark(conn, source), 0)
    if session_time <= done:
        return []  # a retransmission, or an older Interim arriving late
    start = s["started_at"].replace(microsecond=0) + dt.timedelta(seconds=done)
    usage = await _time_usage(conn, s["account_id"], start, start + dt.timedelta(seconds=session_time - done))
    if not usage:
        return []  # no time service during these seconds: not time-charged
    try:
        async with conn.transaction():  # a savepoint: an unrated piece undoes the whole commit
            result = await commit_usage(conn, source, session_time, usage, now, tz=tz, actor=ACTOR)
            if result.rejected:
                raise _Unrated(", ".join(sorted({r.reason for r in result.rejected})))
    except _Unrated as exc:
        log.error("session %s of account %s: %d s not charged yet (%s); retried with the next record",
                  s["session_id"], s["account_id"], session_time - done, exc)
        return []
    if result.charged:
        await conn.execute("UPDATE radius_sessions SET charged = charged + $2 WHERE id = $1", s["id"], result.charged)
    return [c.event() for c in result.block_changes]  # type: ignore[attr-defined]


async def account(conn: asyncpg.Connection, req: dict[str, Any], now: dt.datetime, *,
                  tz: dt.tzinfo = dt.timezone.utc) -> dict[str, Any]:
    """Apply one Accounting-Request.  Idempotent: the same request twice
    changes nothing the second time.  Runs in a transaction; ``tz`` is the
    operator's zone (time ranges, periods)."""
    _check_record(req)
    nas = await conn.fetchrow("SELECT id FROM radius_nas WHERE address = $1::inet", req["nas"])
    if nas is None:
        raise UnknownObject(f"unknown NAS {req['nas']}")
    nas_id = nas["id"]
    status = req["status"]
    at = dt.datetime.fromtimestamp(float(req.get("event_time") or now.timestamp()), dt.timezone.utc)
    if status in ("on", "off"):
        rows = await conn.fetch("SELECT * FROM radius_sessions WHERE nas_id = $1 AND ended_at IS NULL FOR UPDATE", nas_id)
        await _end_sessions(conn, rows, at, f"accounting-{status}")
        return {"closed": len(rows), "events": []}
    if status not in ("start", "interim", "stop"):
        return {"ignored": status, "events": []}
    session_id = req["session_id"]
    hooks: list[tuple[str, dict[str, Any]]] = []
    s = await conn.fetchrow("SELECT * FROM radius_sessions WHERE nas_id = $1 AND session_id = $2 FOR UPDATE",
                            nas_id, session_id)
    if s is None:
        link = await conn.fetchrow("SELECT id, account_id, login FROM radius_links WHERE login = $1", req.get("login") or "")
        if link is None:
            log.warning("accounting for unknown login %r from NAS %s ignored", req.get("login"), req["nas"])
            return {"ignored": "unknown login", "events": []}
        # whole seconds: the session's time is rated from its start second by second
        started = (at - dt.timedelta(seconds=int(req.get("session_time") or 0))).replace(microsecond=0)
        s = await conn.fetchrow(
            "INSERT INTO radius_sessions(nas_id, session_id, account_id, link_id, login, framed_ip, nas_port_id,"
            " calling_station, started_at, updated_at) VALUES ($1, $2, $3, $4, $5, $6::inet, $7, $8, $9, $10)"
            " RETURNING *",
            nas_id, session_id, link["account_id"], link["id"], link["login"], req.get("framed_ip"),
            req.get("nas_port_id"), req.get("calling_station_id"), started, now)
        if req.get("framed_ip"):
            await _bind_ip(conn, s, started)
        hooks.append(("session.started", {"account_id": s["account_id"], "session_id": session_id,
                                          "ip": req.get("framed_ip")}))
    if s["ended_at"] is not None:
        return {"session": s["id"], "ended": True, "events": []}  # a late or repeated Stop
    events: list[dict[str, Any]] = []
    session_time = int(req.get("session_time") or 0)
    if status in ("interim", "stop") and session_time >= int(s["session_time"]):
        await conn.execute(
            "UPDATE radius_sessions SET session_time = $2, input_octets = greatest(input_octets, $3),"
            " output_octets = greatest(output_octets, $4), updated_at = $5 WHERE id = $1",
            s["id"], session_time, int(req.get("input_octets") or 0), int(req.get("output_octets") or 0), now)
        events = await _charge_time(conn, s, session_time, now, tz)
    if status == "stop":
        s = await conn.fetchrow("SELECT * FROM radius_sessions WHERE id = $1", s["id"])
        await _end_sessions(conn, [s], at, f"stop:{req.get('terminate_cause') or 0}")
        ip = s["framed_ip"]
        hooks.append(("session.stopped", {"account_id": s["account_id"], "session_id": session_id,
                                          "ip": str(ip) if ip is not None else None, "bytes_in": int(s["input_octets"]),
                                          "bytes_out": int(s["output_octets"])}))
    result = {"session": s["id"], "events": events}
    if hooks:
        result["hooks"] = hooks  # plugin events, fired by the caller after the commit
    return result


async def _bind_ip(conn: asyncpg.Connection, s: asyncpg.Record, at: dt.datetime) -> None:
    """Bind the session's framed IP to its account from ``at`` on.  A Start
    that arrives late (Acct-Delay-Time) may find the address bound after
    ``at`` by sessions that have ended since: the binding then starts where
    the last of them ended, as bindings never overlap.  An address bound
    without end is left alone (the same account: already bound; another:
    logged, not rebound)."""
    ip = s["framed_ip"]
    await conn.execute("UPDATE radius_leases SET expires_at = NULL WHERE address = $1 AND link_id = $2", ip, s["link_id"])
    later = await conn.fetch(
        "SELECT account_id, valid_to FROM ip_bindings WHERE prefix >>= $1::inet"
        " AND (valid_to IS NULL OR valid_to > $2) ORDER BY valid_to DESC NULLS FIRST", ip, at)
    if later and later[0]["valid_to"] is None:
        if later[0]["account_id"] != s["account_id"]:
            log.error("framed IP %s of session %s is bound to account %s, not %s: not rebinding",
                      ip, s["session_id"], later[0]["account_id"], s["account_id"])
        return
    await conn.execute(
        "INSERT INTO ip_bindings(account_id, prefix, kind, source, session_ref, valid_from)"
        " VALUES ($1, set_masklen($2::inet, 32)::cidr, 'dynamic', 'radius', $3, $4)",
        s["account_id"], ip, _session_ref(s["nas_id"], s["session_id"]), later[0]["valid_to"] if later else at)


async def close_stale(conn: asyncpg.Connection, now: dt.datetime, timeout: dt.timedelta) -> int:
    """End sessions whose NAS sent nothing for ``timeout``; free their leases."""
    rows = await conn.fetch("SELECT * FROM radius_sessions WHERE ended_at IS NULL AND updated_at < $1 FOR UPDATE",
                            now - timeout)
    for s in rows:
        await _end_sessions(conn, [s], s["updated_at"], "stale")
    await conn.execute("DELETE FROM radius_leases WHERE expires_at IS NOT NULL AND expires_at <= $1", now)
    return len(rows)


async def account_sessions(conn: asyncpg.Connection, store: SecretStore, account_id: int | None = None,
                           session_pk: int | None = None, limit: int = PAGE, offset: int = 0) -> list[dict[str, Any]]:
    """Active sessions (of one account, or one session) with what a
    Disconnect/CoA to their NAS needs."""
    rows = await conn.fetch(
        "SELECT s.id, s.session_id, s.login, host(s.framed_ip) AS framed_ip, s.account_id, s.started_at,"
        " s.session_time, s.input_octets, s.output_octets, host(n.address) AS nas_ip, n.coa_port,"
        " n.disconnect_mode, n.blocked_profile FROM radius_sessions s JOIN radius_nas n ON n.id = s.nas_id"
        " WHERE s.ended_at IS NULL AND ($1::bigint IS NULL OR s.account_id = $1)"
        " AND ($2::bigint IS NULL OR s.id = $2) ORDER BY s.id LIMIT $3 OFFSET $4", account_id, session_pk, limit, offset)
    return [{**dict(r), "blocked_profile": json.loads(r["blocked_profile"])} for r in rows]


# -- URFA registration -------------------------------------------------------------


MAX_BATCH = 1024
MA_NOTICE = ("require_message_authenticator is on (the default, BlastRADIUS protection): Access-Requests"
             " from this NAS without a Message-Authenticator attribute are dropped unanswered, and the radius"
             " log says so once a minute. Configure the NAS to send it; only for a NAS that cannot, use"
             " radius.nas_edit require_message_authenticator=false.")


def calls(core: CoreContext) -> list[CallSpec]:
    from billcore.api import handler, need_int, page, who
    from billcore.billing import audit

    tz = zoneinfo.ZoneInfo(core.config.core.timezone)
    store: SecretStore = core.extras.get("secret_store") or SecretStore.from_config(core.config)
    core.extras["secret_store"] = store
    pool = core.pool

    def publish_events(events: list[dict[str, Any]]) -> None:
        for e in events:
            core.publish("blocks", e)

    @contextlib.asynccontextmanager
    async def admin_tx(ctx: Any, action: str, obj: str, after: Any) -> AsyncIterator[asyncpg.Connection]:
        """One transaction for an admin write and its audit row.  A database
        refusal (duplicate name, bad range) rolls both back and answers its
        documented code (``billcore.server.wire_errors``), never PostgreSQL's text."""
        async with pool.acquire() as conn, conn.transaction():
            yield conn
            await audit.record(conn, who(ctx), action, obj, after=after, now=core.now())

    def redacted(args: dict[str, Any]) -> dict[str, Any]:
        return {k: ("<changed>" if k in ("secret", "password") else v) for k, v in args.items() if v is not None}

    async def h_authorize(ctx: Any, request: dict[str, Any]) -> dict[str, Any]:
        async with pool.acquire() as conn:
            return (await authorize_many(conn, store, [request], core.now(), tz=tz))[0]

    authorizer = Authorizer(pool, store, tz)

    async def h_authorize_many(ctx: Any, requests: list[dict[str, Any]]) -> list[dict[str, Any]]:
        if not 1 <= len(requests) <= MAX_BATCH or not all(isinstance(r, dict) for r in requests):
            raise InvalidValue(f"requests: a list of 1..{MAX_BATCH} maps")
        return await authorizer.decide(requests, core.now())

    async def h_accounting(ctx: Any, record: dict[str, Any]) -> dict[str, Any]:
        async with pool.acquire() as conn, conn.transaction():
            result = await account(conn, record, core.now(), tz=tz)
        publish_events(result.pop("events", []))
        for event, payload in result.pop("hooks", []):
            await core.fire(event, payload)
        return result

    @handler  # a bad page answers billing.invalid, not internal
    async def h_nas_list(ctx: Any, limit: int = PAGE, offset: int = 0) -> list[dict[str, Any]]:
        limit, offset = page(limit, offset, PAGE)
        async with pool.acquire() as conn:
            return await nas_list(conn, store, with_secrets=True, limit=limit, offset=offset)

    @handler  # a bad page answers billing.invalid, not internal
    async def h_nas_show(ctx: Any, limit: int = PAGE, offset: int = 0) -> list[dict[str, Any]]:
        limit, offset = page(limit, offset, PAGE)
        async with pool.acquire() as conn:
            return await nas_list(conn, store, with_secrets=False, limit=limit, offset=offset)

    def given(args: dict[str, Any]) -> dict[str, Any]:
        """An optional argument sent as nil means its default."""
        return {k: v for k, v in args.items() if v is not None}

    async def h_nas_add(ctx: Any, **args: Any) -> dict[str, Any]:
        args = given(args)
        async with admin_tx(ctx, "radius.nas_add", f"nas:{args.get('name')}", redacted(args)) as conn:
            nas_id = await add_nas(conn, store, **args)
        core.publish("radius.nas", {"changed": nas_id})
        required = args.get("require_message_authenticator", True)
        return {"id": nas_id, "require_message_authenticator": required,
                "notice": MA_NOTICE if required else ""}

    async def h_nas_edit(ctx: Any, id: int, **args: Any) -> bool:
        async with admin_tx(ctx, "radius.nas_edit", f"nas:{id}", redacted(args)) as conn:
            done = await edit_nas(conn, store, id, **args)
        core.publish("radius.nas", {"changed": id})
        return done

    async def h_nas_delete(ctx: Any, id: int, force: bool = False) -> bool:
        async with admin_tx(ctx, "radius.nas_delete", f"nas:{id}", {"force": bool(force)}) as conn:
            done = await delete_nas(conn, id, core.now(), bool(force))
        core.publish("radius.nas", {"deleted": id})
        return done

    async def h_pool_add(ctx: Any, **args: Any) -> int:
        args = given(args)
        async with admin_tx(ctx, "radius.pool_add", f"pool:{args.get('name')}", args) as conn:
            return await add_pool(conn, **args)

    async def h_pool_edit(ctx: Any, id: int, **args: Any) -> bool:
        async with admin_tx(ctx, "radius.pool_edit", f"pool:{id}", redacted(args)) as conn:
            return await edit_pool(conn, id, **args)

    async def h_pool_delete(ctx: Any, id: int) -> bool:
        async with admin_tx(ctx, "radius.pool_delete", f"pool:{id}", None) as conn:
            return await delete_pool(conn, id)

    @handler  # a bad page answers billing.invalid, not internal
    async def h_pool_list(ctx: Any, limit: int = PAGE, offset: int = 0) -> list[dict[str, Any]]:
        limit, offset = page(limit, offset, PAGE)
        async with pool.acquire() as conn:
            return await pool_list(conn, limit, offset)

    async def h_link_add(ctx: Any, **args: Any) -> int:
        args = given(args)
        async with admin_tx(ctx, "radius.link_add", f"account:{args.get('account_id')}", redacted(args)) as conn:
            return await add_link(conn, store, **args)

    async def h_link_edit(ctx: Any, id: int, **args: Any) -> bool:
        async with admin_tx(ctx, "radius.link_edit", f"radius_link:{id}", redacted(args)) as conn:
            return await edit_link(conn, store, id, **args)

    async def h_link_delete(ctx: Any, id: int, force: bool = False) -> bool:
        async with admin_tx(ctx, "radius.link_delete", f"radius_link:{id}", {"force": bool(force)}) as conn:
            return await delete_link(conn, id, core.now(), bool(force))

    @handler  # a bad page answers billing.invalid, not internal
    async def h_link_list(ctx: Any, account_id: int | None = None, login: str | None = None, limit: int = PAGE,
                          offset: int = 0) -> list[dict[str, Any]]:
        limit, offset = page(limit, offset, PAGE)
        async with pool.acquire() as conn:
            return await link_list(conn, account_id, login, limit, offset)

    @handler  # a bad page answers billing.invalid, not internal
    async def h_sessions(ctx: Any, account_id: int | None = None, limit: int = PAGE, offset: int = 0
                         ) -> list[dict[str, Any]]:
        limit, offset = page(limit, offset, PAGE)
        async with pool.acquire() as conn:
            return await account_sessions(conn, store, account_id, limit=limit, offset=offset)

    async def h_close_stale(ctx: Any, timeout: int) -> int:
        need_int("timeout", timeout, 1, 10 * 366 * 86400)   # seconds; a timedelta of 2^63 s overflows
        async with pool.acquire() as conn, conn.transaction():
            return await close_stale(conn, core.now(), dt.timedelta(seconds=timeout))

    async def h_disconnect(ctx: Any, session: int) -> dict[str, Any]:
        async with pool.acquire() as conn:
            found = await account_sessions(conn, store, None, session)
        if not found:
            raise UnknownObject(f"no active session {session}")
        core.publish("radius.disconnect", {"sessions": found})
        return {"requested": True, "session": found[0]["id"]}

    nas_fields = {"name": "str?", "address": "ip?", "secret": "str?", "require_message_authenticator": "bool?",
                  "coa_port": "int?", "disconnect_mode": "str?", "blocked_profile": "list?"}
    link_fields = {"static_ip": "ip?", "pool": "str?", "max_sessions": "int?",
                   "session_limit": "int?", "interim_interval": "int?", "rate_limit": "str?", "cisco_avpairs": "list?"}
    specs = [
        CallSpec("radius.authorize", h_authorize, right="radius.serve", kinds=SYSTEM, args={"request": "map"},
                 result="map", doc="Decide an Access-Request: {accept, reply: [[attribute, value]…]}."),
        CallSpec("radius.authorize_many", h_authorize_many, right="radius.serve", kinds=SYSTEM,
                 args={"requests": "list"}, result="list",
                 doc=f"Decide up to {MAX_BATCH} Access-Requests at once; the decisions in the same order."),
        CallSpec("radius.accounting", h_accounting, right="radius.serve", kinds=SYSTEM, args={"record": "map"},
                 result="map", doc="Apply an Accounting-Request (idempotent)."),
        CallSpec("radius.nas_list", h_nas_list, right="radius.serve", kinds=SYSTEM, result="list",
                 doc="NAS devices with their shared secrets (for the radius process)."),
        CallSpec("radius.close_stale", h_close_stale, right="radius.serve", kinds=SYSTEM, args={"timeout": "int"},
                 result="int", doc="End sessions silent for `timeout` seconds; return how many."),
        CallSpec("radius.nas_show", h_nas_show, right="radius.read", kinds=ADMIN, result="list",
                 doc="NAS devices, without secrets."),
        CallSpec("radius.nas_add", h_nas_add, right="radius.nas", kinds=ADMIN,
                 args={**nas_fields, "name": "str", "address": "ip", "secret": "str"},
                 result="map", doc="Add a NAS device; returns {id, require_message_authenticator, notice}:"
                 " notice is non-empty when Access-Requests without Message-Authenticator will be dropped."),
        CallSpec("radius.nas_edit", h_nas_edit, right="radius.nas", kinds=ADMIN, args={"id": "int", **nas_fields},
                 result="bool", doc="Change fields of a NAS device (the radius process reloads its table)."),
        CallSpec("radius.nas_delete", h_nas_delete, right="radius.nas", kinds=ADMIN, args={"id": "int", "force": "bool?"},
                 result="bool", doc="Delete a NAS device and its session history (force: end its active sessions)."),
        CallSpec("radius.pool_add", h_pool_add, right="radius.pools", kinds=ADMIN,
                 args={"name": "str", "first": "ip", "last": "ip"}, result="int", doc="Add an IPv4 pool."),
        CallSpec("radius.pool_edit", h_pool_edit, right="radius.pools", kinds=ADMIN,
                 args={"id": "int", "name": "str?", "first": "ip?", "last": "ip?"}, result="bool",
                 doc="Rename or resize a pool (refused if a lease would fall outside)."),
        CallSpec("radius.pool_delete", h_pool_delete, right="radius.pools", kinds=ADMIN, args={"id": "int"},
                 result="bool", doc="Delete a pool no link uses."),
        CallSpec("radius.pool_list", h_pool_list, right="radius.read", kinds=ADMIN, result="list",
                 doc="Pools with their size and leased count."),
        CallSpec("radius.link_add", h_link_add, right="radius.links", kinds=ADMIN,
                 args={"account_id": "int", "login": "str", "password": "str", **link_fields},
                 result="int", doc="Give an account a RADIUS login (password stored encrypted)."),
        CallSpec("radius.link_edit", h_link_edit, right="radius.links", kinds=ADMIN,
                 args={"id": "int", "login": "str?", "password": "str?", "disabled": "bool?", **link_fields},
                 result="bool", doc="Change fields of a RADIUS login (pool \"\" or static_ip \"\" removes it)."),
        CallSpec("radius.link_delete", h_link_delete, right="radius.links", kinds=ADMIN,
                 args={"id": "int", "force": "bool?"}, result="bool",
                 doc="Delete a RADIUS login and its session history (force: end its active sessions)."),
        CallSpec("radius.link_list", h_link_list, right="radius.read", kinds=ADMIN,
                 args={"account_id": "int?", "login": "str?"}, result="list",
                 doc="RADIUS logins (without passwords), of one account, one login, or all."),
        CallSpec("radius.sessions", h_sessions, right="radius.read", kinds=ADMIN, args={"account_id": "int?"},
                 result="list", doc="Active sessions, of one account or all."),
        CallSpec("radius.disconnect", h_disconnect, right="radius.disconnect", kinds=ADMIN, args={"session": "int"},
                 result="map", doc="Ask the radius process to disconnect an active session."),
    ]
    # the lists grow with NAS devices, pools, logins and sessions: paged; the rest is one record
    # (radius.authorize_many answers as many decisions as it was given, at most MAX_BATCH)
    paged = {"radius.nas_list", "radius.nas_show", "radius.pool_list", "radius.link_list", "radius.sessions"}
    return [dataclasses.replace(s, args={**s.args, "limit": "int?", "offset": "int?"}, bound=f"page:{PAGE}")
            if s.name in paged else dataclasses.replace(s, bound="fixed") for s in specs]
