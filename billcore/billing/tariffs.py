"""Tariffs in PostgreSQL: load them into the pure rating types, save them back.

Theory of operation
-------------------
Schema 0003 holds the tariff model; this module is the only code that maps
its rows to ``billcore.billing.rating`` / ``periods`` / ``timeranges`` values
and back.  Loading is per call and by account set (``load_book``), so the
same code serves one usage batch, a 10 000-account periodic batch, and a
preview.

Identifiers in the rating types are the database ids: a traffic class id is
``klass``, a time-range id is ``range_id`` (0 = any range), time services use
``TIME_CLASS`` (−1), exactly the values stored in ``usage_counters``.

Service links: an account's tariff history (``account_tariffs``) times the
tariff's services gives ``ServiceLink(account, service, valid_from,
valid_to)``.  Rating uses the services of the links that overlap the
batch's time span; the scheduler uses every link that overlaps the periods
it settles.

Writes validate by building the pure value first (a bad tier schedule fails
as ``TariffError`` before SQL), and map constraint violations to
``TariffConflict`` (overlapping binding or tariff link, a name taken, a row
still in use).  Traffic classes, their rules and IP bindings (what the
NetFlow classifier sees) are in ``billcore.billing.classification``.
"""

from __future__ import annotations

import functools
import json
from collections.abc import Iterable, Mapping, Sequence
from datetime import date, datetime, timezone, tzinfo
from typing import Any, ClassVar, Final

import asyncpg

from billcore.common.errors import TariffError
from billcore.common.money import MAX_AMOUNT, MAX_QUANTITY, Price
from billcore.billing.periods import (
    ChargeMode, PeriodicService, PeriodKind, PeriodSpec, ServiceLink, next_boundary,
)
from billcore.billing.rating import (
    ANY_RANGE, TIME_CLASS, AccountPlan, Meter, MeterRule, RatingBook,
    ServiceKind, ServiceTariff, Tier,
)
from billcore.billing.timeranges import TimeRange, Window, window_from_spec
from billcore.db.rows import DbConnection
from billcore.db.constraints import constraint_field

__all__ = [
    "DEFAULT_ACCOUNT_PERIOD",
    "SERVICE_KINDS",
    "TariffConflict",
    "TariffNotFound",
    "Conflicts",
    "account_links",
    "aware_utc",
    "checked_int",
    "checked_name",
    "create_service",
    "create_tariff",
    "create_time_range",
    "link_tariff",
    "list_services",
    "list_tariffs",
    "list_time_ranges",
    "load_book",
    "load_links",
    "load_periodic",
    "set_rate",
    "set_tariff_services",
    "tariff_history",
]

DEFAULT_ACCOUNT_PERIOD: Final = PeriodSpec(PeriodKind.MONTHLY, date(2000, 1, 1))
"""An account without an ``account_periods`` row: calendar months."""
SERVICE_KINDS: Final = frozenset({"once", "periodic", "traffic", "time"})
MAX_NAME: Final = 128
MAX_PAGE: Final = 1000
"""Rows per page of a list call at most (the URFA frame is 1 MB; see docs/protocol.md)."""
MAX_WINDOWS: Final = 64
MAX_DATES: Final = 1_024


class TariffNotFound(TariffError, LookupError):
    """No such service, tariff, class, rule, time range, binding or account."""

    code: ClassVar[str] = "tariffs.unknown"


class TariffConflict(TariffError):
    """The change contradicts existing rows: overlap, a name taken, a row in use."""

    code: ClassVar[str] = "tariffs.conflict"


def aware_utc(value: datetime, what: str) -> datetime:
    if not isinstance(value, datetime) or value.utcoffset() is None:
        raise TariffError(f"{what} must be an aware datetime")
    return value.astimezone(timezone.utc)


def checked_name(value: object) -> str:
    if type(value) is not str or not 1 <= len(value) <= MAX_NAME:
        raise TariffError(f"a name is a string of 1..{MAX_NAME} characters")
    return value


def checked_int(value: object, what: str, lo: int = 0, hi: int = MAX_QUANTITY) -> int:
    if type(value) is not int or not lo <= value <= hi:
        raise TariffError(f"{what} must be an int in {lo}..{hi}, got {value!r}")
    return value


def period_spec(kind: str, days: int, anchor: date) -> PeriodSpec:
    if type(anchor) is not date:
        raise TariffError("bad period: anchor must be a date")
    try:
        return PeriodSpec(PeriodKind(kind), anchor, days)
    except ValueError as exc:
        raise TariffError(f"bad period: {exc}") from exc


def _charge_mode(value: object) -> ChargeMode:
    try:
        return ChargeMode(value)
    except ValueError:
        raise TariffError(f"charge_mode must be one of {sorted(m.value for m in ChargeMode)}") from None


def _about(exc: asyncpg.PostgresError) -> str:
    field = constraint_field(exc)
    return f" ({field})" if field else ""


class Conflicts:
    """Turn constraint violations into ``TariffConflict`` with a readable message."""

    def __init__(self, what: str) -> None:
        self.what = what

    def __enter__(self) -> None:
        return None

    def __exit__(self, kind: Any, exc: BaseException | None, tb: Any) -> None:
        if isinstance(exc, asyncpg.ExclusionViolationError):
            raise TariffConflict(f"{self.what} overlaps an existing one in time") from exc
        if isinstance(exc, asyncpg.UniqueViolationError):
            raise TariffConflict(f"{self.what}: name or key already taken") from exc
        if isinstance(exc, asyncpg.ForeignKeyViolationError):
            raise TariffConflict(f"{self.what}: refers to a missing row or is still in use") from exc
        if isinstance(exc, asyncpg.CheckViolationError):   # PostgreSQL's text names tables: not for clients
            raise TariffError(f"{self.what}: a value is outside its allowed range{_about(exc)}") from exc


# -- loading ----------------------------------------------------------------

async def load_timeranges(conn: DbConnection) -> tuple[TimeRange, ...]:
    rows = await conn.fetch(
        "SELECT r.id, r.priority,"
        " coalesce((SELECT array_agg(array[w.weekdays, w.start_minute, w.end_minute] ORDER BY w.id)"
        "   FROM time_range_windows w WHERE w.range_id = r.id), '{}') AS windows,"
        " coalesce((SELECT array_agg(d.day ORDER BY d.day) FROM time_range_dates d"
        "   WHERE d.range_id = r.id), '{}') AS dates"
        " FROM time_ranges r ORDER BY r.id")
    out = []
    for row in rows:
        windows = tuple(
            Window(frozenset(i for i in range(7) if window[0] >> i & 1), window[1], window[2])
            for window in row["windows"])
        out.append(TimeRange(row["id"], row["priority"], windows, frozenset(row["dates"])))
    return tuple(out)


def _meter(prepaid: int, unit_size: int, starts: Sequence[int], prices: Sequence[int]) -> Meter:
    return Meter(prepaid, tuple(Tier(start, Price(price, unit_size)) for start, price in zip(starts, prices)))


async def load_metered(conn: DbConnection,
                       service_ids: Iterable[int] | None = None) -> dict[int, ServiceTariff]:
    """Traffic and time services with their rates."""
    ids = None if service_ids is None else sorted(set(service_ids))
    rows = await conn.fetch(
        "SELECT s.id, s.kind, r.class_id, r.range_id, r.prepaid, r.unit_size, r.tier_starts,"
        " r.tier_prices FROM services s LEFT JOIN service_rates r ON r.service_id = s.id"
        " WHERE s.kind IN ('traffic', 'time') AND ($1::bigint[] IS NULL OR s.id = ANY($1))"
        " ORDER BY s.id, r.id", ids)
    kinds: dict[int, ServiceKind] = {}
    rules: dict[int, list[MeterRule]] = {}
    for row in rows:
        kind = ServiceKind(row["kind"])
        kinds[row["id"]] = kind
        rules.setdefault(row["id"], [])
        if row["unit_size"] is None:
            continue  # a service without rates yet
        klass = TIME_CLASS if kind is ServiceKind.TIME else row["class_id"]
        if klass is None:
            raise TariffError(f"traffic service {row['id']} has a rate without a class")
        meter = _meter(row["prepaid"], row["unit_size"], row["tier_starts"], row["tier_prices"])
        rules[row["id"]].append(MeterRule(klass, row["range_id"] or ANY_RANGE, meter))
    return {sid: ServiceTariff(sid, kinds[sid], tuple(rules[sid])) for sid in kinds}


async def load_periodic(conn: DbConnection) -> dict[int, PeriodicService]:
    rows = await conn.fetch(
        "SELECT id, fee, period_kind, period_days, period_anchor, charge_mode FROM services"
        " WHERE kind = 'periodic' ORDER BY id")
    return {
        row["id"]: PeriodicService(
            row["id"], row["fee"], period_spec(row["period_kind"], row["period_days"], row["period_anchor"]),
            ChargeMode(row["charge_mode"]))
        for row in rows
    }


async def load_links(conn: DbConnection, account_ids: Sequence[int] | None,
                     since: datetime, until: datetime, *,
                     kinds: Sequence[str] = ("once", "periodic", "traffic", "time"),
                     ) -> list[ServiceLink]:
    """Service links overlapping ``[since, until]`` of the given accounts (None: all)."""
    # Two statements, not one with "$1 IS NULL OR account_id = ANY($1)": after
    # five runs PostgreSQL may cache a generic plan for a prepared statement,
    # and no generic plan of that OR can use the account index.
    select = ("SELECT t.account_id, ts.service_id, t.valid_from, t.valid_to FROM account_tariffs t"
              " JOIN tariff_services ts ON ts.tariff_id = t.tariff_id"
              " JOIN services s ON s.id = ts.service_id"
              " WHERE s.kind = ANY($3::text[]) AND t.valid_from <= $2 AND (t.valid_to IS NULL OR t.valid_to > $1)")
    order = " ORDER BY t.account_id, ts.service_id, t.valid_from"
    if account_ids is None:
        rows = await conn.fetch(select + order, since, until, list(kinds))
    else:
        rows = await conn.fetch(select + " AND t.account_id = ANY($4::bigint[])" + order,
                                since, until, list(kinds), list(account_ids))
    return [ServiceLink(row["account_id"], row["service_id"], row["valid_from"], row["valid_to"]) for row in rows]


@functools.lru_cache(maxsize=1 << 15)
def _plan(account_id: int, unlimited: bool, blocked: bool, kind: str | None, days: Any, anchor: Any,
          service_ids: tuple[int, ...]) -> AccountPlan:
    """The ``AccountPlan`` of these column values (``kind`` None: no ``account_periods`` row).

    Memoized: a plan is an immutable value of exactly these arguments, which
    every caller has just read from the database, so a hit is the object this
    call would build; it is built once instead of for every usage batch.
    """
    spec = DEFAULT_ACCOUNT_PERIOD if kind is None else period_spec(kind, days, anchor)
    return AccountPlan(account_id, spec, service_ids, unlimited=unlimited, blocked=blocked)


async def load_book(conn: DbConnection, account_ids: Sequence[int], *, tz: tzinfo,
                    since: datetime, until: datetime) -> RatingBook:
    """Everything ``rate``/``preview`` need for these accounts over ``[since, until]``.

    An account's plan carries the traffic and time services of its tariff
    links overlapping the span (``load_links``' selection, read as bare
    (account, service) pairs: this runs for every usage batch); accounts that
    do not exist are left out.  Accounts and links come in one statement of
    two branches (a link row has NULL flags), each planned as on its own.
    """
    rows = await conn.fetch(
        "SELECT a.id, a.unlimited, p.period_kind, p.period_days, p.period_anchor,"
        " EXISTS (SELECT 1 FROM blocks b WHERE b.account_id = a.id AND b.lifted_at IS NULL) AS blocked,"
        " NULL::bigint AS service_id FROM accounts a LEFT JOIN account_periods p ON p.account_id = a.id"
        " WHERE a.id = ANY($1::bigint[])"
        " UNION ALL SELECT t.account_id, NULL, NULL, NULL, NULL, NULL, ts.service_id FROM account_tariffs t"
        " JOIN tariff_services ts ON ts.tariff_id = t.tariff_id JOIN services s ON s.id = ts.service_id"
        " WHERE s.kind IN ('traffic', 'time') AND t.valid_from <= $3 AND (t.valid_to IS NULL OR t.valid_to > $2)"
        " AND t.account_id = ANY($1::bigint[])", list(account_ids), since, until)
    accounts = []
    linked: dict[int, set[int]] = {}
    for row in rows:
        if row[1] is None:  # accounts.unlimited is NOT NULL: a link row
            linked.setdefault(row[0], set()).add(row[6])
        else:
            accounts.append(row)
    plans = {}
    for account_id, unlimited, kind, days, anchor, blocked, _ in accounts:
        services = linked.get(account_id, ())
        plans[account_id] = _plan(account_id, unlimited, blocked, kind, days, anchor,
                                  tuple(sorted(services)) if len(services) > 1 else tuple(services))
    metered = await load_metered(conn, {service_id for services in linked.values() for service_id in services})
    return RatingBook(tz, await load_timeranges(conn), metered, plans)


# -- services and tariffs ---------------------------------------------------

async def create_service(conn: DbConnection, name: str, kind: str, *, fee: int = 0,
                         period: Mapping[str, Any] | None = None, charge_mode: str | None = None,
                         session_limit: int | None = None, max_sessions: int | None = None,
                         comment: str = "", row_id: int | None = None) -> int:
    """A service; ``period`` = {"kind", "anchor" (date), "days"} for periodic ones. ``row_id``: the id to
    use instead of the next of the sequence (a rehearsal that is rolled back must not consume ids)."""
    checked_name(name)
    if kind not in SERVICE_KINDS:
        raise TariffError(f"service kind must be one of {sorted(SERVICE_KINDS)}")
    checked_int(fee, "fee", 0, MAX_AMOUNT)
    p_kind = p_anchor = None
    p_days = 0
    if kind == "periodic":
        if period is None or charge_mode is None:
            raise TariffError("a periodic service needs a period and a charge mode")
        spec = period_spec(period.get("kind", ""), period.get("days", 0), period.get("anchor"))  # type: ignore[arg-type]
        _charge_mode(charge_mode)
        p_kind, p_days, p_anchor = spec.kind.value, spec.days, spec.anchor
    elif period is not None or charge_mode is not None:
        raise TariffError("only periodic services have a period and a charge mode")
    with Conflicts("service"):
        return int(await conn.fetchval(
            "INSERT INTO services(id, name, kind, fee, period_kind, period_days, period_anchor,"
            " charge_mode, session_limit, max_sessions, comment)"
            " VALUES (coalesce($11::bigint, nextval('services_id_seq')), $1, $2, $3, $4, $5, $6, $7, $8, $9, $10)"
            " RETURNING id",
            name, kind, fee, p_kind, p_days, p_anchor, charge_mode, session_limit, max_sessions, comment, row_id))


async def list_services(conn: DbConnection, *, limit: int = MAX_PAGE, offset: int = 0) -> list[dict[str, Any]]:
    rows = await conn.fetch(
        "SELECT s.*, coalesce((SELECT jsonb_agg(jsonb_build_object('class_id', r.class_id,"
        " 'range_id', r.range_id, 'prepaid', r.prepaid, 'unit_size', r.unit_size,"
        " 'tier_starts', r.tier_starts, 'tier_prices', r.tier_prices) ORDER BY r.id)"
        " FROM service_rates r WHERE r.service_id = s.id), '[]')::text AS rates"
        " FROM services s ORDER BY s.id LIMIT $1 OFFSET $2", limit, offset)
    return [{**dict(row), "rates": json.loads(row["rates"])} for row in rows]


async def delete_service(conn: DbConnection, service_id: int) -> None:
    with Conflicts("service"):
        if await conn.execute("DELETE FROM services WHERE id = $1", service_id) == "DELETE 0":
            raise TariffNotFound(f"service {service_id} does not exist")


async def set_rate(conn: DbConnection, service_id: int, *, class_id: int | None,
                   range_id: int | None, prepaid: int, unit_size: int,
                   tiers: Sequence[tuple[int, int]]) -> None:
    """Set the price of a traffic class (or of time, class None) in a range (None: any)."""
    starts = [checked_int(start, "tier start") for start, _ in tiers]
    prices = [checked_int(p, "tier price", 0, MAX_AMOUNT) for _, p in tiers]
    _meter(checked_int(prepaid, "prepaid"), checked_int(unit_size, "unit_size", 1), starts, prices)  # validates
    kind = await conn.fetchval("SELECT kind FROM services WHERE id = $1", service_id)
    if kind is None:
        raise TariffNotFound(f"service {service_id} does not exist")
    if kind not in ("traffic", "time") or (kind == "traffic") != (class_id is not None):
        raise TariffError("traffic services price a class; time services price time (class None)")
    async with conn.transaction():
        await conn.execute(
            "DELETE FROM service_rates WHERE service_id = $1 AND coalesce(class_id, -1) = $2"
            " AND coalesce(range_id, 0) = $3", service_id, class_id or -1, range_id or 0)
        with Conflicts("rate"):
            await conn.execute(
                "INSERT INTO service_rates(service_id, class_id, range_id, prepaid, unit_size,"
                " tier_starts, tier_prices) VALUES ($1, $2, $3, $4, $5, $6, $7)",
                service_id, class_id, range_id, prepaid, unit_size, starts, prices)


async def create_tariff(conn: DbConnection, name: str, service_ids: Sequence[int],
                        comment: str = "", row_id: int | None = None) -> int:
    """``row_id`` as in `create_service`."""
    async with conn.transaction():
        with Conflicts("tariff"):
            tariff_id = int(await conn.fetchval(
                "INSERT INTO tariffs(id, name, comment) VALUES (coalesce($3::bigint, nextval('tariffs_id_seq')),"
                " $1, $2) RETURNING id", checked_name(name), comment, row_id))
        await set_tariff_services(conn, tariff_id, service_ids)
    return tariff_id


async def set_tariff_services(conn: DbConnection, tariff_id: int, service_ids: Sequence[int]) -> None:
    """Replace the tariff's services (effective for every link, past periods are settled)."""
    if not isinstance(service_ids, (list, tuple)):
        raise TariffError("service_ids must be a list of service ids")
    # any bigint: an import's rehearsal links the negative ids of the services it rehearsed
    wanted = sorted({checked_int(service_id, "a service id", -2**63, 2**63 - 1) for service_id in service_ids})
    async with conn.transaction():
        if await conn.fetchval("SELECT 1 FROM tariffs WHERE id = $1 FOR UPDATE", tariff_id) is None:
            raise TariffNotFound(f"tariff {tariff_id} does not exist")
        await conn.execute("DELETE FROM tariff_services WHERE tariff_id = $1", tariff_id)
        with Conflicts("tariff service"):
            await conn.execute(
                "INSERT INTO tariff_services(tariff_id, service_id) SELECT $1, unnest($2::bigint[])",
                tariff_id, wanted)


async def list_tariffs(conn: DbConnection, *, limit: int = MAX_PAGE, offset: int = 0) -> list[dict[str, Any]]:
    rows = await conn.fetch(
        "SELECT t.id, t.name, t.comment, coalesce(array_agg(ts.service_id ORDER BY ts.service_id)"
        " FILTER (WHERE ts.service_id IS NOT NULL), '{}') AS service_ids"
        " FROM tariffs t LEFT JOIN tariff_services ts ON ts.tariff_id = t.id"
        " GROUP BY t.id ORDER BY t.id LIMIT $1 OFFSET $2", limit, offset)
    return [dict(row) for row in rows]


async def delete_tariff(conn: DbConnection, tariff_id: int) -> None:
    with Conflicts("tariff"):
        if await conn.execute("DELETE FROM tariffs WHERE id = $1", tariff_id) == "DELETE 0":
            raise TariffNotFound(f"tariff {tariff_id} does not exist")


# -- account links ----------------------------------------------------------

async def account_period(conn: DbConnection, account_id: int) -> PeriodSpec:
    row = await conn.fetchrow(
        "SELECT period_kind, period_days, period_anchor FROM account_periods WHERE account_id = $1",
        account_id)
    if row is None:
        return DEFAULT_ACCOUNT_PERIOD
    return period_spec(row["period_kind"], row["period_days"], row["period_anchor"])


async def link_tariff(conn: DbConnection, account_id: int, tariff_id: int | None, *,
                      now: datetime, tz: tzinfo, start: str = "now", actor: str) -> dict[str, Any]:
    """Switch the account to ``tariff_id`` (None: no tariff) from now or its next period.

    The link in force at the switch instant is closed there; a link that
    would start after the switch (a scheduled change) is replaced.  History
    rows are never deleted except such not-yet-started ones.
    """
    now = aware_utc(now, "now")
    if start not in ("now", "next_period"):
        raise TariffError("start is 'now' or 'next_period'")
    async with conn.transaction():
        if await conn.fetchval("SELECT 1 FROM accounts WHERE id = $1 FOR UPDATE", account_id) is None:
            raise TariffNotFound(f"account {account_id} does not exist")
        at = now if start == "now" else next_boundary(await account_period(conn, account_id), now, tz)
        await conn.execute("DELETE FROM account_tariffs WHERE account_id = $1 AND valid_from >= $2",
                           account_id, at)
        await conn.execute(
            "UPDATE account_tariffs SET valid_to = $2 WHERE account_id = $1 AND valid_from < $2"
            " AND (valid_to IS NULL OR valid_to > $2)", account_id, at)
        link_id = None
        if tariff_id is not None:
            with Conflicts("tariff link"):
                link_id = await conn.fetchval(
                    "INSERT INTO account_tariffs(account_id, tariff_id, valid_from, created_at, created_by)"
                    " VALUES ($1, $2, $3, $4, $5) RETURNING id", account_id, tariff_id, at, now, actor)
    return {"account_id": account_id, "tariff_id": tariff_id, "link_id": link_id, "valid_from": at}


async def tariff_history(conn: DbConnection, account_id: int, *, limit: int = MAX_PAGE,
                         offset: int = 0) -> list[dict[str, Any]]:
    rows = await conn.fetch(
        "SELECT t.id, t.tariff_id, f.name AS tariff, t.valid_from, t.valid_to, t.created_at,"
        " t.created_by FROM account_tariffs t JOIN tariffs f ON f.id = t.tariff_id"
        " WHERE t.account_id = $1 ORDER BY t.valid_from LIMIT $2 OFFSET $3", account_id, limit, offset)
    return [dict(row) for row in rows]


async def account_links(conn: DbConnection, account_id: int, now: datetime) -> list[dict[str, Any]]:
    """The tariff in force at ``now`` with its services (empty list: none)."""
    rows = await conn.fetch(
        "SELECT t.tariff_id, f.name AS tariff, t.valid_from, t.valid_to, s.id AS service_id,"
        " s.name AS service, s.kind, s.fee FROM account_tariffs t JOIN tariffs f ON f.id = t.tariff_id"
        " JOIN tariff_services ts ON ts.tariff_id = t.tariff_id JOIN services s ON s.id = ts.service_id"
        " WHERE t.account_id = $1 AND t.valid_from <= $2 AND (t.valid_to IS NULL OR t.valid_to > $2)"
        " ORDER BY s.id", account_id, aware_utc(now, "now"))
    return [dict(row) for row in rows]


# -- time ranges -------------------------------------------------------------

async def create_time_range(conn: DbConnection, name: str, *, priority: int = 0,
                            windows: Sequence[Mapping[str, Any]] = (),
                            dates: Sequence[date] = ()) -> int:
    """``windows``: [{"days": "mon-fri", "time": "08:00-24:00"}] or [{"weekdays": [0..6], "start_minute",
    "end_minute"}], 0 = Monday (`timeranges.window_from_spec`)."""
    if len(windows) > MAX_WINDOWS or len(dates) > MAX_DATES:
        raise TariffError("too many windows or dates")
    parsed = [window_from_spec(window) for window in windows]
    TimeRange(1, priority, tuple(parsed), frozenset(dates))  # validates
    async with conn.transaction():
        with Conflicts("time range"):
            range_id = int(await conn.fetchval(
                "INSERT INTO time_ranges(name, priority) VALUES ($1, $2) RETURNING id", checked_name(name), priority))
        await conn.executemany(
            "INSERT INTO time_range_windows(range_id, weekdays, start_minute, end_minute) VALUES ($1, $2, $3, $4)",
            [(range_id, sum(1 << day for day in window.weekdays), window.start_minute, window.end_minute)
             for window in parsed])
        await conn.executemany("INSERT INTO time_range_dates(range_id, day) VALUES ($1, $2)",
                               [(range_id, day) for day in sorted(set(dates))])
    return range_id


async def list_time_ranges(conn: DbConnection, *, limit: int = MAX_PAGE, offset: int = 0
                           ) -> list[dict[str, Any]]:
    names = {row["id"]: row["name"] for row in await conn.fetch("SELECT id, name FROM time_ranges")}
    ranges = sorted(await load_timeranges(conn), key=lambda tr: tr.range_id)[offset:offset + limit]
    return [{
        "id": tr.range_id, "name": names[tr.range_id], "priority": tr.priority,
        "windows": [{"weekdays": sorted(window.weekdays), "start_minute": window.start_minute,
                     "end_minute": window.end_minute} for window in tr.windows],
        "dates": sorted(tr.dates),
    } for tr in ranges]


async def delete_time_range(conn: DbConnection, range_id: int) -> None:
    with Conflicts("time range"):
        if await conn.execute("DELETE FROM time_ranges WHERE id = $1", range_id) == "DELETE 0":
            raise TariffNotFound(f"time range {range_id} does not exist")


