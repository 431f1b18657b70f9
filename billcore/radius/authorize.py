"""Authorization: deciding Access-Requests, a batch at a time.

The account's service link is found by login; the password is opened
(``SecretStore``) and compared (PAP), used to compute MD5(id + password +
challenge) (CHAP) or the NT-Response (MS-CHAPv2, ``billcore.radius.mschap``).
Rejected when the link is disabled, the account has any active block, the
link is at its simultaneous-session limit or the account at its time
service's ``max_sessions``, or the money left buys no second of time
(``timewalk``).  Accepted with Framed-IP-Address (static, or a lease from the
link's pool: one row per address, so no two links collide), Session-Timeout,
Acct-Interim-Interval and the rate limit (Mikrotik-Rate-Limit, Cisco-AVPair) — the
link's own, or, for an account throttled now (fair usage or dunning, schema 0017),
its rate profile's (``billcore.radius.ratelimit.accept_attributes``).

An MS-CHAPv2 decision carries more (``_mschap_decision``): an accept proves the
server back (MS-CHAP2-Success) and hands the NAS the MPPE keys in clear (the
radius edge encrypts them with the NAS secret, which the core never sees); a
reject says why in MS-CHAP-Error with a Windows error code (``MSCHAP_ERRORS``).
"""

from __future__ import annotations

import asyncio
import dataclasses
import datetime as dt
import hashlib
import hmac
import json
import secrets
from collections.abc import Sequence
from typing import Final

import asyncpg
from asyncpg.pool import PoolConnectionProxy

from billcore.db.rows import DbConnection
from billcore.radius import mschap
from billcore.radius.records import AccessRequest, AuthMethod, Decision, LinkState, Malformed, Refusal, ReplyValue
from billcore.radius.ratelimit import RateProfile, accept_attributes
from billcore.radius.secrets import SecretStore
from billcore.radius.timewalk import TimeVerdict, time_verdicts

__all__ = ["Authorizer", "authorize", "authorize_many", "LEASE_HOLD", "MSCHAP_ERRORS"]

LEASE_HOLD: Final = dt.timedelta(seconds=120)   # a pool address waits this long for its session's Start
_MAX_SESSION_TIMEOUT: Final = 2**32 - 1         # Session-Timeout is a 32-bit integer

_LINKS_BY_LOGIN: Final = (
    "SELECT l.id, l.account_id, l.login, l.password_enc, host(l.static_ip) AS static_ip, l.pool_id,"
    " l.max_sessions, l.session_limit, l.interim_interval, l.rate_limit, l.cisco_avpairs,"
    " l.disabled, a.balance, a.credit, a.unlimited, a.status,"
    " EXISTS (SELECT 1 FROM blocks b WHERE b.account_id = l.account_id AND b.lifted_at IS NULL) AS blocked,"
    " (SELECT count(*) FROM radius_sessions s WHERE s.link_id = l.id AND s.ended_at IS NULL) AS active,"
    " tv.services AS time_services, tv.max_sessions AS time_max_sessions, tv.session_limit AS time_session_limit,"
    # the rate profile of a throttle in force now (FUP or dunning; the slowest), as JSON text
    " (SELECT row_to_json(p)::text FROM account_throttles th JOIN rate_profiles p ON p.id = th.profile_id"
    "   WHERE th.account_id = l.account_id AND th.restored_at IS NULL AND th.since <= $2"
    "   AND (th.until IS NULL OR th.until > $2) ORDER BY p.down_kbps, p.id LIMIT 1) AS throttle"
    " FROM radius_links l JOIN accounts a ON a.id = l.account_id"
    # the time services of the tariff in force now (normally none or one)
    " LEFT JOIN LATERAL (SELECT array_agg(sv.id ORDER BY sv.id) AS services, min(sv.max_sessions) AS max_sessions,"
    "   min(sv.session_limit) AS session_limit FROM account_tariffs t"
    "   JOIN tariff_services ts ON ts.tariff_id = t.tariff_id JOIN services sv ON sv.id = ts.service_id"
    "   WHERE t.account_id = l.account_id AND sv.kind = 'time' AND t.valid_from <= $2"
    "   AND (t.valid_to IS NULL OR t.valid_to > $2)) tv ON true"
    " WHERE l.login = ANY($1::text[])")


def _password_ok(request: AccessRequest, password: bytes) -> bool:
    if request.method is AuthMethod.PAP:
        return hmac.compare_digest(request.password, password)
    if request.method is AuthMethod.CHAP and request.chap is not None:
        chap = request.chap
        # RFC 1994: MD5(Identifier + secret + Challenge)
        expected = hashlib.md5(bytes([chap.ident & 0xFF]) + password + chap.challenge).digest()
        return hmac.compare_digest(expected, chap.response)
    if request.method is AuthMethod.MSCHAPV2:
        return mschap.check_nt_response(request.mschap_challenge, mschap.parse_response(request.mschap_response),
                                        request.login.encode(), password)
    return False


# MS-CHAP-Error codes (RFC 2759 s.6; the Windows RAS error numbers a dialler shows):
# 691 ERROR_AUTHENTICATION_FAILURE, 647 ERROR_ACCOUNT_DISABLED, 646 ERROR_RESTRICTED_LOGON_HOURS,
# 649 ERROR_NO_DIALIN_PERMISSION.  A refusal not listed answers 691.
MSCHAP_ERRORS: Final = {
    Refusal.WRONG_PASSWORD: 691,
    Refusal.DISABLED: 647,
    Refusal.BLOCKED: 647,
    Refusal.NO_TIME_PRICE: 646,
    Refusal.TOO_MANY_SESSIONS: 649,
    Refusal.NO_MONEY_FOR_TIME: 649,
    Refusal.SEVERAL_TIME_SERVICES: 649,
    Refusal.POOL_EXHAUSTED: 649,
}


def _mschap_decision(decision: Decision, request: AccessRequest, link: LinkState | None,
                     store: SecretStore) -> Decision:
    """An MS-CHAPv2 request's decision with its MS-CHAP replies (RFC 2548 s.2.3).

    Reject: MS-CHAP-Error = Ident "E=<code> R=0 C=<fresh challenge> V=3 M=<refusal>".
    R=0: a retry would answer the C= challenge, which the NAS never forwards —
    the peer authenticates afresh instead.  Accept: MS-CHAP2-Success = Ident
    "S=<authenticator response>" and the 128-bit MPPE keys (RFC 3079) in clear,
    with MS-MPPE-Encryption-Policy 1 (allowed) and -Types 6 (40 or 128 bits)."""
    ident = request.mschap_response[0]
    if not decision.accept:
        assert decision.reason is not None, "a rejection says why"
        code = MSCHAP_ERRORS.get(decision.reason, 691)
        text = f"E={code} R=0 C={secrets.token_hex(16).upper()} V=3 M={decision.reason.value}"
        error = bytes([ident]) + text.encode()
        return dataclasses.replace(decision, reply=decision.reply + (("MS-CHAP-Error", error),))
    assert link is not None, "an accepted request has its link"
    password = store.open(link.password_enc)
    response = mschap.parse_response(request.mschap_response)
    proof = mschap.generate_authenticator_response(password, response.nt_response, response.peer_challenge,
                                                   request.mschap_challenge, request.login.encode())
    send_key, recv_key = mschap.server_mppe_keys(password, response.nt_response)
    extra: tuple[tuple[str, ReplyValue], ...] = (
        ("MS-CHAP2-Success", bytes([ident]) + proof), ("MS-MPPE-Send-Key", send_key),
        ("MS-MPPE-Recv-Key", recv_key), ("MS-MPPE-Encryption-Policy", 1), ("MS-MPPE-Encryption-Types", 6))
    return dataclasses.replace(decision, reply=decision.reply + extra)


async def _lease(conn: DbConnection, link: LinkState, now: dt.datetime, hold: dt.timedelta) -> str | None:
    """A pool address for the link: a lease it holds that no session is using
    (expiring: a NAS retrying gets the same address), else the lowest free one."""
    held = await conn.fetchval("SELECT host(address) FROM radius_leases WHERE link_id = $1 AND pool_id = $2"
                               " AND expires_at IS NOT NULL ORDER BY address LIMIT 1", link.id, link.pool_id)
    if held is not None:
        await conn.execute("UPDATE radius_leases SET expires_at = $2 WHERE address = $1::inet", held, now + hold)
        return str(held)
    address = await conn.fetchval(
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
        link.pool_id, link.id, now, now + hold)
    return None if address is None else str(address)


def _decide(request: AccessRequest, link: LinkState | None, store: SecretStore) -> Refusal | LinkState:
    """Every rule that needs no further query: the refusal, or the link that
    passed them (not refused yet)."""
    if link is None or not _password_ok(request, store.open(link.password_enc)):
        return Refusal.WRONG_PASSWORD
    if link.disabled or link.status != "active":
        return Refusal.DISABLED
    if link.blocked:
        return Refusal.BLOCKED
    if link.active >= link.max_sessions:
        return Refusal.TOO_MANY_SESSIONS
    return link


def _decide_time(link: LinkState, verdict: TimeVerdict | None) -> Refusal | None:
    """The time service's rules: its max_sessions (over all the account's
    sessions) and the money left."""
    if verdict is None:
        return None
    if link.time_max_sessions is not None and verdict.account_active >= link.time_max_sessions:
        return Refusal.TOO_MANY_SESSIONS
    return verdict.refusal


def _accept(link: LinkState, address: str | None, verdict: TimeVerdict | None,
            throttle: RateProfile | None = None) -> Decision:
    reply: list[tuple[str, ReplyValue]] = []
    limits = [limit for limit in (link.session_limit, link.time_session_limit if verdict else None) if limit]
    if verdict is not None and verdict.seconds is not None:
        assert verdict.seconds > 0, "a time-based account with no time left is refused before"
        limits.append(verdict.seconds)
    if address is not None:
        reply.append(("Framed-IP-Address", address))
    if limits:
        reply.append(("Session-Timeout", min(min(limits), _MAX_SESSION_TIMEOUT)))
    reply.append(("Acct-Interim-Interval", link.interim_interval))
    if throttle is not None:   # a throttled account gets its profile's rate instead of the link's own
        reply.extend(accept_attributes(throttle))
    else:
        if link.rate_limit:
            reply.append(("Mikrotik-Rate-Limit", link.rate_limit))
        reply.extend(("Cisco-AVPair", pair) for pair in link.cisco_avpairs)
    return Decision(True, tuple(reply), account_id=link.account_id)


async def _address(conn: DbConnection, link: LinkState, now: dt.datetime,
                   lease_hold: dt.timedelta) -> str | None | Refusal:
    """The link's Framed-IP-Address (None: none to give), or the pool's refusal."""
    if link.static_ip is not None:
        return link.static_ip
    if link.pool_id is None:
        return None
    async with conn.transaction():   # the link's row lock orders two requests for one pool lease
        await conn.execute("SELECT 1 FROM radius_links WHERE id = $1 FOR UPDATE", link.id)
        address = await _lease(conn, link, now, lease_hold)
    return Refusal.POOL_EXHAUSTED if address is None else address


async def authorize_many(conn: DbConnection, store: SecretStore, requests: Sequence[AccessRequest | Malformed],
                         now: dt.datetime, lease_hold: dt.timedelta = LEASE_HOLD, *,
                         tz: dt.tzinfo = dt.timezone.utc) -> list[Decision]:
    """Decide a batch of Access-Requests (see the module comment), in order.

    One query reads every link of the batch with its account, block flag,
    active-session count and the time services in force; accounts with a
    time service need a few more queries for the whole batch (sessions,
    promised credit, tariff book, counters), and pool links each take their
    lease under their link's row lock (a savepoint, so one failure stays its
    own).  A ``Malformed`` request is rejected alone, before the query.
    ``tz`` is the operator's zone (time ranges, periods)."""
    logins = sorted({request.login for request in requests if isinstance(request, AccessRequest)})
    links: dict[str, LinkState] = {}
    throttles: dict[int, RateProfile] = {}
    for row in await conn.fetch(_LINKS_BY_LOGIN, logins, now) if logins else []:
        fields = dict(row)
        throttle = fields.pop("throttle")
        links[row["login"]] = LinkState(**fields)
        if throttle is not None:
            throttles[row["account_id"]] = RateProfile.of(json.loads(throttle))
    # per request: its refusal, or the link that passed the rules needing no further query
    first = [request.refusal if isinstance(request, Malformed) else _decide(request, links.get(request.login), store)
             for request in requests]
    passed = [item for item in first if isinstance(item, LinkState)]
    verdicts = await time_verdicts(conn, passed, now, tz) if passed else {}
    out: list[Decision] = []
    for item in first:
        if isinstance(item, Refusal):
            out.append(Decision.reject(item))
            continue
        verdict = verdicts.get(item.account_id)
        refused = _decide_time(item, verdict)
        address = await _address(conn, item, now, lease_hold) if refused is None else refused
        out.append(Decision.reject(address) if isinstance(address, Refusal)
                   else _accept(item, address, verdict, throttles.get(item.account_id)))
    return [_mschap_decision(decision, request, links.get(request.login), store)
            if isinstance(request, AccessRequest) and request.method is AuthMethod.MSCHAPV2 else decision
            for request, decision in zip(requests, out)]


async def authorize(conn: DbConnection, store: SecretStore, request: AccessRequest | Malformed,
                    now: dt.datetime, lease_hold: dt.timedelta = LEASE_HOLD, *,
                    tz: dt.tzinfo = dt.timezone.utc) -> Decision:
    """Decide one Access-Request."""
    return (await authorize_many(conn, store, [request], now, lease_hold, tz=tz))[0]


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
        self._conn: PoolConnectionProxy | None = None

    async def decide(self, requests: Sequence[AccessRequest | Malformed], now: dt.datetime) -> list[Decision]:
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
