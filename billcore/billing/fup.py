"""Fair usage: quotas, the crossing that throttles, the period end that restores.

Theory of operation
-------------------
A quota (``fup_quotas``, schema 0017) is a number of bytes per accounting
period of one traffic service and one traffic class (``class_id`` NULL: all
classes of the service, summed) with the rate profile the account drops to.

*Crossing* is decided where the bytes are counted: ``commit_usage`` calls
``check_crossings`` after it has written the batch's counters, in the same
transaction.  Every counter the batch moved knows its quantity before and
after (``usage`` holds both), so the deltas per (account, service, class,
period) are known; one statement sums the counters of each quota they touch
and keeps the quotas whose sum went from below the quota to at or above it.
For each, in two more statements, a throttle row (``account_throttles``,
source ``fup``, cause ``<service>:<class|*>:<period start unix>``, until the
period's end) and the event ``fup.quota_reached`` with the dedup key
``fup:<acct>:<service>:<class|*>:<period start unix>``.  Both are
ON CONFLICT DO NOTHING: a batch can only cross once (the watermark refuses a
replay), and the dedup key makes "once" a property of the tables too.

Zero extra statements when no quota names the batch's services: the set of
services with a quota is cached per process (the core is the only writer;
every write here bumps the cache's generation, and the cache is re-read at
most every ``QUOTA_CACHE_TTL`` seconds in case another process wrote).

*Restore*: ``restore_due(conn, now)`` (the core's periodic pass) ends the
``fup`` throttles whose ``until`` has come and enqueues ``fup.restored``
(dedup ``fup-restore:…``).  Access-Accept never waits for it: a throttle is
in force only while ``until`` is in the future (``throttle_profiles``).

After the events in ``RATE_EVENTS`` the RADIUS router (outbox) asks the
radius process to re-apply the account's *current* rate to its sessions
(``radius.rate_state`` + ``radius/rate_apply.py``): idempotent, so a
throttle and its restore delivered in any order end in what is true now.
"""

from __future__ import annotations

import datetime as dt
import json
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any, Final

import asyncpg

from billcore.billing.ledger_errors import InvalidValue
from billcore.billing.outbox import OutboxEvent, enqueue
from billcore.billing.periods import period_containing
from billcore.billing.tariffs import DEFAULT_ACCOUNT_PERIOD, period_spec
from billcore.common.errors import InUse, InvariantViolation, UnknownObject
from billcore.db.rows import DbConnection
from billcore.radius.ratelimit import (
    COA_NAK_ACTIONS, NAS_KINDS, RateProfile, check_attributes, check_policy_name, coa_attributes, link_attributes,
)

__all__ = ["RATE_EVENTS", "QUOTA_CACHE_TTL", "Crossing", "check_crossings", "restore_due", "throttle_profiles",
           "add_throttle", "lift_throttles", "profile_list", "profile_set", "profile_delete", "quota_list",
           "quota_set", "quota_delete", "nas_set", "rate_state", "throttles_of", "fup_dedup_key", "invalidate_quota_cache"]

RATE_EVENTS: Final = ("fup.quota_reached", "fup.restored", "dunning.throttled", "dunning.cleared")
"""Events after which RADIUS re-applies the account's current rate to its open sessions."""

QUOTA_CACHE_TTL: Final = 10.0
QUOTA_SETTLE: Final = 5.0
MAX_KBPS: Final = 100_000_000
MAX_QUOTA: Final = 2**62
MAX_CATALOGUE: Final = 1000   # rate profiles and quotas a list call answers (a catalogue, not per subscriber)

CounterTuple = tuple[int, int, int, int, dt.datetime]   # (account, service, class, range, period start)


@dataclass(frozen=True, slots=True)
class Crossing:
    account_id: int
    service_id: int
    class_id: int | None
    period_start: dt.datetime
    period_end: dt.datetime
    quota: int
    used: int
    profile_id: int


# -- the quota cache ---------------------------------------------------------------------------------------

class _QuotaCache:
    def __init__(self) -> None:
        self.generation = 0
        self.loaded_generation = -1
        self.loaded_at = 0.0
        self.unsettled_until = 0.0   # just after a write: its transaction may not have committed yet
        self.services: frozenset[int] = frozenset()

    async def services_with_quota(self, conn: DbConnection) -> frozenset[int]:
        now = time.monotonic()
        if self.loaded_generation != self.generation or now - self.loaded_at > QUOTA_CACHE_TTL \
                or now < self.unsettled_until:
            generation = self.generation
            rows = await conn.fetch("SELECT DISTINCT service_id FROM fup_quotas")
            self.services = frozenset(int(row[0]) for row in rows)
            self.loaded_generation, self.loaded_at = generation, time.monotonic()
        return self.services


_CACHE = _QuotaCache()


def invalidate_quota_cache() -> None:
    """Quotas changed (here, or by hand): the next commits re-read which services have one — every one
    for ``QUOTA_SETTLE`` seconds, so a read made before the writing transaction commits is not kept."""
    _CACHE.generation += 1
    _CACHE.unsettled_until = time.monotonic() + QUOTA_SETTLE


def fup_dedup_key(account_id: int, service_id: int, class_id: int | None, period_start: dt.datetime) -> str:
    return f"fup:{account_id}:{_cause(service_id, class_id, period_start)}"


def _cause(service_id: int, class_id: int | None, period_start: dt.datetime) -> str:
    return f"{service_id}:{'*' if class_id is None else class_id}:{int(period_start.timestamp())}"


# -- crossing ----------------------------------------------------------------------------------------------

_CROSSED: Final = (
    "WITH d AS (SELECT * FROM unnest($1::bigint[], $2::bigint[], $3::bigint[], $4::timestamptz[], $5::bigint[])"
    "   AS d(a, s, c, p, delta)),"
    " x AS (SELECT d.a, d.s, d.p, q.class_id, q.quota_bytes, q.profile_id, sum(d.delta) AS delta"
    "   FROM d JOIN fup_quotas q ON q.service_id = d.s AND (q.class_id IS NULL OR q.class_id = d.c)"
    "   GROUP BY d.a, d.s, d.p, q.id)"
    " SELECT x.a, x.s, x.p, x.class_id, x.quota_bytes, x.profile_id, u.used FROM x"
    " CROSS JOIN LATERAL (SELECT coalesce(sum(c.quantity), 0)::bigint AS used FROM usage_counters c"
    "   WHERE c.account_id = x.a AND c.service_id = x.s AND c.period_start = x.p"
    "   AND (x.class_id IS NULL OR c.class_id = x.class_id)) u"
    " WHERE u.used >= x.quota_bytes AND u.used - x.delta < x.quota_bytes ORDER BY x.a, x.s, x.class_id")


async def check_crossings(conn: DbConnection, keys: Sequence[CounterTuple], before: Sequence[int],
                          after: Sequence[int], now: dt.datetime, tz: dt.tzinfo) -> list[Crossing]:
    """Throttle the accounts whose quota this batch crossed (inside ``commit_usage``'s transaction,
    after its counters are written); the crossings, in account order."""
    if not (len(keys) == len(before) == len(after)):
        raise InvariantViolation("check_crossings: keys and quantities of different lengths")
    moved = {key[1] for key, old, new in zip(keys, before, after) if new > old}
    if not moved:
        return []
    quota_services = await _CACHE.services_with_quota(conn)
    if not moved & quota_services:
        return []
    deltas: dict[tuple[int, int, int, dt.datetime], int] = {}
    for (account, service, klass, _range, start), old, new in zip(keys, before, after):
        if new > old and service in quota_services:
            group = (account, service, klass, start)
            deltas[group] = deltas.get(group, 0) + new - old
    groups = list(deltas)
    rows = await conn.fetch(_CROSSED, [g[0] for g in groups], [g[1] for g in groups], [g[2] for g in groups],
                            [g[3] for g in groups], [deltas[g] for g in groups])
    if not rows:
        return []
    ends = await _period_ends(conn, [(int(row["a"]), row["p"]) for row in rows], tz)
    crossings = [Crossing(int(row["a"]), int(row["s"]), row["class_id"], row["p"], ends[(int(row["a"]), row["p"])],
                          int(row["quota_bytes"]), int(row["used"]), int(row["profile_id"])) for row in rows]
    await _throttle_crossed(conn, crossings, now)
    return crossings


async def _period_ends(conn: DbConnection, starts: Sequence[tuple[int, dt.datetime]], tz: dt.tzinfo,
                       ) -> dict[tuple[int, dt.datetime], dt.datetime]:
    """The end of each account's accounting period that begins at the given start."""
    accounts = sorted({account for account, _ in starts})
    specs = {row["account_id"]: period_spec(row["period_kind"], row["period_days"], row["period_anchor"])
             for row in await conn.fetch("SELECT account_id, period_kind, period_days, period_anchor"
                                         " FROM account_periods WHERE account_id = ANY($1::bigint[])", accounts)}
    return {(account, start): period_containing(specs.get(account, DEFAULT_ACCOUNT_PERIOD), start, tz).end
            for account, start in starts}


async def _throttle_crossed(conn: DbConnection, crossings: Sequence[Crossing], now: dt.datetime) -> None:
    profiles = {row["id"]: row["name"] for row in await conn.fetch(
        "SELECT id, name FROM rate_profiles WHERE id = ANY($1::bigint[])", sorted({c.profile_id for c in crossings}))}
    await conn.execute(
        "INSERT INTO account_throttles (account_id, source, cause_key, profile_id, since, until)"
        " SELECT a, 'fup', k, p, $5, u FROM unnest($1::bigint[], $2::text[], $3::bigint[], $4::timestamptz[])"
        "   AS t(a, k, p, u) WHERE u > $5"
        " ON CONFLICT (account_id, source, cause_key) DO NOTHING",
        [c.account_id for c in crossings], [_cause(c.service_id, c.class_id, c.period_start) for c in crossings],
        [c.profile_id for c in crossings], [c.period_end for c in crossings], now)
    await enqueue(conn, [OutboxEvent("fup.quota_reached", {
        "account_id": c.account_id, "service_id": c.service_id, "class_id": c.class_id,
        "period_start": int(c.period_start.timestamp()), "quota": c.quota, "used": c.used,
        "profile": profiles.get(c.profile_id, "")}, c.account_id,
        fup_dedup_key(c.account_id, c.service_id, c.class_id, c.period_start)) for c in crossings], now)


# -- restore -----------------------------------------------------------------------------------------------

async def restore_due(conn: DbConnection, now: dt.datetime) -> int:
    """End the ``fup`` throttles whose period is over and enqueue ``fup.restored`` for each
    (one transaction; the core's periodic pass calls it).  How many were restored."""
    async with conn.transaction():
        rows = await conn.fetch(
            "UPDATE account_throttles SET restored_at = $1 WHERE source = 'fup' AND restored_at IS NULL"
            " AND until IS NOT NULL AND until <= $1 RETURNING account_id, cause_key, until", now)
        if rows:
            await enqueue(conn, [OutboxEvent("fup.restored", {"account_id": row["account_id"],
                                                              "cause": row["cause_key"], "until": row["until"]},
                                             int(row["account_id"]), f"fup-restore:{row['account_id']}:{row['cause_key']}")
                                 for row in rows], now)
    return len(rows)


# -- throttles -------------------------------------------------------------------------------------------

_PROFILE_COLUMNS: Final = "p.id, p.name, p.down_kbps, p.up_kbps, p.cisco_in, p.cisco_out, p.attributes"


def _profile(row: Mapping[str, Any] | asyncpg.Record) -> RateProfile:
    attrs = row["attributes"]
    return RateProfile.of({**dict(row), "attributes": json.loads(attrs) if isinstance(attrs, str) else attrs})


async def throttle_profiles(conn: DbConnection, account_ids: Sequence[int], now: dt.datetime,
                            ) -> dict[int, RateProfile]:
    """The profile each throttled account is held to now (the slowest of its throttles in force)."""
    rows = await conn.fetch(
        f"SELECT DISTINCT ON (t.account_id) t.account_id, {_PROFILE_COLUMNS} FROM account_throttles t"
        " JOIN rate_profiles p ON p.id = t.profile_id WHERE t.account_id = ANY($1::bigint[])"
        " AND t.restored_at IS NULL AND t.since <= $2 AND (t.until IS NULL OR t.until > $2)"
        " ORDER BY t.account_id, p.down_kbps, p.id", list(account_ids), now)
    return {int(row["account_id"]): _profile(row) for row in rows}


async def add_throttle(conn: DbConnection, account_id: int, source: str, cause: str, profile_id: int,
                       now: dt.datetime, until: dt.datetime | None = None) -> bool:
    """A throttle (inside the caller's transaction); False when this cause throttled already."""
    value = await conn.fetchval(
        "INSERT INTO account_throttles (account_id, source, cause_key, profile_id, since, until)"
        " VALUES ($1, $2, $3, $4, $5, $6) ON CONFLICT (account_id, source, cause_key) DO NOTHING RETURNING id",
        account_id, source, cause, profile_id, now, until)
    return value is not None


async def lift_throttles(conn: DbConnection, account_id: int, source: str, now: dt.datetime) -> int:
    """End the account's open throttles of ``source``; how many."""
    status = await conn.execute(
        "UPDATE account_throttles SET restored_at = $3 WHERE account_id = $1 AND source = $2"
        " AND restored_at IS NULL", account_id, source, now)
    return int(status.split()[-1])


async def throttles_of(conn: DbConnection, account_id: int, limit: int = 20) -> list[dict[str, Any]]:
    """The account's throttles, newest first (for ``fup.state`` and the console)."""
    rows = await conn.fetch(
        "SELECT t.id, t.source, t.cause_key AS cause, p.name AS profile, p.down_kbps, p.up_kbps, t.since,"
        " t.until, t.restored_at FROM account_throttles t JOIN rate_profiles p ON p.id = t.profile_id"
        " WHERE t.account_id = $1 ORDER BY t.id DESC LIMIT $2", account_id, limit)
    return [dict(row) for row in rows]


# -- profiles and quotas (operators) -----------------------------------------------------------------------

def _kbps(name: str, value: object) -> int:
    if type(value) is not int or not 1 <= value <= MAX_KBPS:
        raise InvalidValue(f"{name} must be an int in 1..{MAX_KBPS} (kbit/s)")
    return value


def _name(value: object) -> str:
    if type(value) is not str or not 1 <= len(value) <= 128 or "\0" in value:
        raise InvalidValue("name must be a string of 1..128 characters")
    return value


async def profile_list(conn: DbConnection) -> list[RateProfile]:
    return [_profile(row) for row in await conn.fetch(
        f"SELECT {_PROFILE_COLUMNS} FROM rate_profiles p ORDER BY p.id LIMIT $1", MAX_CATALOGUE)]


async def profile_set(conn: DbConnection, name: object, down_kbps: object, up_kbps: object, cisco_in: object = "",
                      cisco_out: object = "", attributes: object = ()) -> int:
    """Create or replace the profile called ``name``; its id."""
    attrs = check_attributes(list(attributes) if isinstance(attributes, tuple) else attributes)
    return int(await conn.fetchval(
        "INSERT INTO rate_profiles (name, down_kbps, up_kbps, cisco_in, cisco_out, attributes)"
        " VALUES ($1, $2, $3, $4, $5, $6::jsonb) ON CONFLICT (name) DO UPDATE SET down_kbps = EXCLUDED.down_kbps,"
        " up_kbps = EXCLUDED.up_kbps, cisco_in = EXCLUDED.cisco_in, cisco_out = EXCLUDED.cisco_out,"
        " attributes = EXCLUDED.attributes RETURNING id",
        _name(name), _kbps("down_kbps", down_kbps), _kbps("up_kbps", up_kbps),
        check_policy_name(cisco_in, "cisco_in"), check_policy_name(cisco_out, "cisco_out"),
        json.dumps([list(pair) for pair in attrs])))


async def profile_delete(conn: DbConnection, profile_id: int) -> bool:
    used = await conn.fetchval(
        "SELECT EXISTS (SELECT 1 FROM fup_quotas WHERE profile_id = $1)"
        " OR EXISTS (SELECT 1 FROM dunning_policies WHERE throttle_profile = $1)"
        " OR EXISTS (SELECT 1 FROM account_throttles WHERE profile_id = $1)", profile_id)
    if used:
        raise InUse(f"rate profile {profile_id} is used by a quota, a policy or a throttle")
    return bool(await conn.execute("DELETE FROM rate_profiles WHERE id = $1", profile_id) == "DELETE 1")


async def quota_list(conn: DbConnection) -> list[dict[str, Any]]:
    rows = await conn.fetch(
        "SELECT q.id, q.service_id, s.name AS service, q.class_id, c.name AS class, q.quota_bytes,"
        " q.profile_id, p.name AS profile FROM fup_quotas q JOIN services s ON s.id = q.service_id"
        " JOIN rate_profiles p ON p.id = q.profile_id LEFT JOIN traffic_classes c ON c.id = q.class_id"
        " ORDER BY q.id LIMIT $1", MAX_CATALOGUE)
    return [dict(row) for row in rows]


async def quota_set(conn: DbConnection, service_id: int, class_id: int | None, quota_bytes: object,
                    profile_id: int) -> int:
    """Create or replace the quota of (service, class); its id."""
    if type(quota_bytes) is not int or not 1 <= quota_bytes <= MAX_QUOTA:
        raise InvalidValue(f"quota_bytes must be an int in 1..{MAX_QUOTA}")
    kind = await conn.fetchval("SELECT kind FROM services WHERE id = $1", service_id)
    if kind is None:
        raise UnknownObject(f"service {service_id} does not exist")
    if kind != "traffic":
        raise InvalidValue(f"service {service_id} is a {kind} service; quotas count traffic")
    if class_id is not None and not await conn.fetchval("SELECT true FROM traffic_classes WHERE id = $1", class_id):
        raise UnknownObject(f"traffic class {class_id} does not exist")
    if not await conn.fetchval("SELECT true FROM rate_profiles WHERE id = $1", profile_id):
        raise UnknownObject(f"rate profile {profile_id} does not exist")
    quota_id = await conn.fetchval(
        "UPDATE fup_quotas SET quota_bytes = $3, profile_id = $4 WHERE service_id = $1"
        " AND coalesce(class_id, -1) = coalesce($2::bigint, -1) RETURNING id", service_id, class_id, quota_bytes,
        profile_id)
    if quota_id is None:
        quota_id = await conn.fetchval(
            "INSERT INTO fup_quotas (service_id, class_id, quota_bytes, profile_id) VALUES ($1, $2, $3, $4)"
            " RETURNING id", service_id, class_id, quota_bytes, profile_id)
    invalidate_quota_cache()
    return int(quota_id)


async def nas_set(conn: DbConnection, nas_id: int, kind: object = None, coa_nak_action: object = None) -> bool:
    """Set how a NAS is told a rate (``kind``) and what a refused CoA leads to (``coa_nak_action``)."""
    if kind is not None and kind not in NAS_KINDS:
        raise InvalidValue(f"kind must be one of {', '.join(NAS_KINDS)}")
    if coa_nak_action is not None and coa_nak_action not in COA_NAK_ACTIONS:
        raise InvalidValue(f"coa_nak_action must be one of {', '.join(COA_NAK_ACTIONS)}")
    status = await conn.execute(
        "UPDATE radius_nas SET kind = coalesce($2, kind), coa_nak_action = coalesce($3, coa_nak_action)"
        " WHERE id = $1", nas_id, kind, coa_nak_action)
    if status != "UPDATE 1":
        raise UnknownObject(f"NAS {nas_id} does not exist")
    return True


async def quota_delete(conn: DbConnection, quota_id: int) -> bool:
    done = await conn.execute("DELETE FROM fup_quotas WHERE id = $1", quota_id) == "DELETE 1"
    invalidate_quota_cache()
    return done


# -- what RADIUS applies ----------------------------------------------------------------------------------

MAX_RATE_SESSIONS: Final = 100   # open sessions of one account a rate_state answer lists


async def rate_state(conn: DbConnection, account_id: int, now: dt.datetime) -> list[dict[str, Any]]:
    """Per open session of the account: its NAS (address, CoA port, kind, CoA-NAK action), what names
    the session in a CoA (RFC 5176), and the attributes that apply the account's rate now — the
    throttle's profile, else the link's own rate (``attributes`` empty: the NAS cannot be told the
    link's rate by CoA, so only a new session, through Access-Accept, gets it)."""
    rows = await conn.fetch(
        "SELECT s.id, s.session_id, s.login, host(s.framed_ip) AS framed_ip, host(n.address) AS nas_ip,"
        " n.coa_port, n.kind AS nas_kind, n.coa_nak_action, l.rate_limit, l.cisco_avpairs, th.throttle"
        " FROM radius_sessions s JOIN radius_nas n ON n.id = s.nas_id JOIN radius_links l ON l.id = s.link_id"
        # the throttle in force (as throttle_profiles), once per answer: the same for every session
        " LEFT JOIN LATERAL (SELECT row_to_json(p)::text AS throttle FROM account_throttles t"
        "   JOIN rate_profiles p ON p.id = t.profile_id WHERE t.account_id = $1 AND t.restored_at IS NULL"
        "   AND t.since <= $3 AND (t.until IS NULL OR t.until > $3) ORDER BY p.down_kbps, p.id LIMIT 1) th ON true"
        " WHERE s.account_id = $1 AND s.ended_at IS NULL ORDER BY s.id LIMIT $2", account_id, MAX_RATE_SESSIONS, now)
    throttle = _profile(json.loads(rows[0]["throttle"])) if rows and rows[0]["throttle"] else None
    out = []
    for row in rows:
        attrs = coa_attributes(row["nas_kind"], throttle) if throttle is not None else \
            link_attributes(row["nas_kind"], row["rate_limit"], list(row["cisco_avpairs"]))
        out.append({"id": row["id"], "session_id": row["session_id"], "login": row["login"],
                    "framed_ip": row["framed_ip"], "nas_ip": row["nas_ip"], "coa_port": row["coa_port"],
                    "nas_kind": row["nas_kind"], "coa_nak_action": row["coa_nak_action"],
                    "throttled": throttle is not None, "profile": throttle.name if throttle else "",
                    "attributes": [[name, value] for name, value in attrs]})
    return out
