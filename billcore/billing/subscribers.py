"""The operator's subscriber list: search with filters, one row per basic account.

Theory of operation
-------------------
A row is a live user joined to their basic account (the partial unique index
``accounts_one_basic``), with the tariff in force now, whether any block is
active and whether a RADIUS session is open.  A ``SubscriberFilter`` holds
what the operator asked for; ``where_sql`` turns it into one WHERE clause
over ``users u JOIN accounts a``, every filter an independent condition, so
PostgreSQL's planner chooses the side to start from:

* the selective filters have an index of their own and are written as
  ``EXISTS`` so the planner can drive from them: an open session
  (``radius_sessions_active``), an active block (``blocks_one_active``), a
  tariff (``account_tariffs_tariff``), a text (the trigram index of schema
  0011, or the ids an account number or an IP address resolves to);
* balance conditions (debtors, a range) have no index: an index on
  ``accounts.balance`` would make every charge's balance update write an
  index entry (no HOT update), on the hottest row of the core.  They filter
  while the users are walked in id order, which stops after a page.

Every statement runs with ``plan_cache_mode = force_custom_plan``: asyncpg
prepares statements, and a generic plan chosen after five runs cannot see
that this text is rare or that tariff holds everyone.

The page is picked by ids first and decorated after (tariff name, flags), so
the lookups run for the rows shown, not for every candidate.  ``total``
counts matches up to ``MAX_COUNTED`` (``total_capped``: more), as
``users.search`` does: counting a million matches tells the operator nothing
and costs a scan.  ``after`` (a user id) pages by key for the export.
"""

from __future__ import annotations

import datetime as dt
from collections.abc import Mapping
from dataclasses import asdict, dataclass
from typing import Any

from billcore.billing.accounts import MAX_COUNTED, check_page, text_match, users_at_ip
from billcore.billing.ledger_errors import AmountError, InvalidValue
from billcore.common.money import MAX_AMOUNT
from billcore.db.rows import DbConnection

__all__ = ["FILTER_ARGS", "MAX_COUNTED", "MAX_TEXT", "ROW_FIELDS", "SubscriberFilter", "Sql",
           "count_subscribers", "find_subscribers", "page_ids", "subscriber_rows", "search_subscribers"]

MAX_TEXT = 200
# the filters as the call schemas declare them (subscribers.search/export, bulk.preview's filter)
FILTER_ARGS = {"text": "str?", "tariff_id": "int?", "blocked": "bool?", "debtors": "bool?",
               "balance_min": "money?", "balance_max": "money?", "online": "bool?"}
# a row of the list, in order, with its type words (money declared as money: clients format it from this)
ROW_FIELDS = {"user_id": "int", "login": "str", "full_name": "str", "phone": "str", "email": "str",
              "contract": "str", "account_id": "int", "balance": "money", "credit": "money", "tariff_id": "int",
              "tariff_name": "str", "blocked": "bool", "online": "bool"}


@dataclass(frozen=True, slots=True)
class SubscriberFilter:
    """What to list; ``None`` (or ``""``) is "any"."""

    text: str = ""
    tariff_id: int | None = None
    blocked: bool | None = None
    debtors: bool | None = None
    balance_min: int | None = None
    balance_max: int | None = None
    online: bool | None = None

    @classmethod
    def of(cls, values: Mapping[str, Any]) -> SubscriberFilter:
        """Checked filter from call arguments (a key sent as nil means "any"); unknown keys are refused."""
        unknown = sorted(set(values) - set(FILTER_ARGS))
        if unknown:
            raise InvalidValue(f"unknown filter {', '.join(map(str, unknown))} (known: {', '.join(FILTER_ARGS)})")
        text = values.get("text") or ""
        if type(text) is not str or len(text) > MAX_TEXT:
            raise InvalidValue(f"text must be a string of at most {MAX_TEXT} characters")
        tariff_id = values.get("tariff_id")
        if tariff_id is not None and (type(tariff_id) is not int or not 1 <= tariff_id < 2**63):
            raise InvalidValue("tariff_id must be a positive int")
        flags = {}
        for name in ("blocked", "debtors", "online"):
            flag = values.get(name)
            if flag is not None and type(flag) is not bool:
                raise InvalidValue(f"{name} must be a bool")
            flags[name] = flag
        low, high = _amount(values, "balance_min"), _amount(values, "balance_max")
        if low is not None and high is not None and low > high:
            raise AmountError("balance_min is above balance_max")
        return cls(text.strip(), tariff_id, flags["blocked"], flags["debtors"], low, high, flags["online"])

    def as_dict(self) -> dict[str, Any]:
        """The filter as call arguments, "any" left out (what a bulk token binds)."""
        return {name: value for name, value in asdict(self).items() if value not in (None, "")}


def _amount(values: Mapping[str, Any], name: str) -> int | None:
    amount = values.get(name)
    if amount is not None and (type(amount) is not int or not -MAX_AMOUNT <= amount <= MAX_AMOUNT):
        raise AmountError(f"{name} must be an amount (micro-units) within ±{MAX_AMOUNT}")
    return amount


class Sql:
    """Collects a statement's arguments; ``arg(value)`` is the placeholder of the next."""

    def __init__(self) -> None:
        self.args: list[Any] = []

    def arg(self, value: Any) -> str:
        self.args.append(value)
        return f"${len(self.args)}"


async def _text_ids(conn: DbConnection, text: str) -> list[int]:
    """The users an exact account id or an IP address in ``text`` names (binding at any time)."""
    if text.isdigit() and len(text) <= 18:
        return [row["user_id"] for row in await conn.fetch("SELECT user_id FROM accounts WHERE id = $1", int(text))]
    return await users_at_ip(conn, text) or []


async def where_sql(conn: DbConnection, wanted: SubscriberFilter, sql: Sql, now: dt.datetime) -> str:
    """The WHERE clause over ``users u JOIN accounts a`` (basic accounts of live users)."""
    parts = ["u.deleted_at IS NULL"]
    if wanted.text:
        match = text_match(wanted.text, sql.arg, "u.")
        ids = await _text_ids(conn, wanted.text)
        if ids:
            match = f"({match} OR u.id = ANY({sql.arg(ids)}::bigint[]))"
        parts.append(match)
    if wanted.tariff_id is not None:
        at = sql.arg(now)
        parts.append(f"EXISTS (SELECT 1 FROM account_tariffs t WHERE t.account_id = a.id"
                     f" AND t.tariff_id = {sql.arg(wanted.tariff_id)} AND t.valid_from <= {at}"
                     f" AND (t.valid_to IS NULL OR t.valid_to > {at}))")
    if wanted.blocked is not None:
        parts.append(("" if wanted.blocked else "NOT ")
                     + "EXISTS (SELECT 1 FROM blocks b WHERE b.account_id = a.id AND b.lifted_at IS NULL)")
    if wanted.online is not None:
        parts.append(("" if wanted.online else "NOT ")
                     + "EXISTS (SELECT 1 FROM radius_sessions s WHERE s.account_id = a.id AND s.ended_at IS NULL)")
    if wanted.debtors is not None:
        parts.append("a.balance < 0" if wanted.debtors else "a.balance >= 0")
    if wanted.balance_min is not None:
        parts.append(f"a.balance >= {sql.arg(wanted.balance_min)}")
    if wanted.balance_max is not None:
        parts.append(f"a.balance <= {sql.arg(wanted.balance_max)}")
    return " AND ".join(parts)


FROM = "users u JOIN accounts a ON a.user_id = u.id AND a.is_basic"


async def _custom_plans(conn: DbConnection) -> None:
    """Plan every statement of this transaction for its own arguments (see the module's doc)."""
    await conn.execute("SET LOCAL plan_cache_mode = force_custom_plan")


async def count_subscribers(conn: DbConnection, wanted: SubscriberFilter, now: dt.datetime) -> int:
    """Matches, counted up to ``MAX_COUNTED + 1`` (inside a transaction)."""
    sql = Sql()
    where = await where_sql(conn, wanted, sql, now)
    await _custom_plans(conn)
    return int(await conn.fetchval(
        f"SELECT count(*) FROM (SELECT 1 FROM {FROM} WHERE {where} LIMIT {MAX_COUNTED + 1}) m", *sql.args))


async def page_ids(conn: DbConnection, wanted: SubscriberFilter, now: dt.datetime, *, limit: int,
                   offset: int = 0, after: int = 0) -> list[tuple[int, int]]:
    """(user id, account id) of one page in user id order, after the user id ``after``
    (inside a transaction)."""
    sql = Sql()
    where = await where_sql(conn, wanted, sql, now)
    await _custom_plans(conn)
    rows = await conn.fetch(
        f"SELECT u.id AS user_id, a.id AS account_id FROM {FROM} WHERE {where} AND u.id > {sql.arg(after)}"
        f" ORDER BY u.id LIMIT {sql.arg(limit)} OFFSET {sql.arg(offset)}", *sql.args)
    return [(row["user_id"], row["account_id"]) for row in rows]


async def subscriber_rows(conn: DbConnection, account_ids: list[int], now: dt.datetime) -> list[dict[str, Any]]:
    """The list's row of each basic account, in user id order."""
    rows = await conn.fetch(
        "SELECT u.id AS user_id, u.login, u.full_name, u.phone, u.email, u.external_id AS contract,"
        " a.id AS account_id, a.balance, a.credit, t.tariff_id, t.tariff_name,"
        " EXISTS (SELECT 1 FROM blocks b WHERE b.account_id = a.id AND b.lifted_at IS NULL) AS blocked,"
        " EXISTS (SELECT 1 FROM radius_sessions s WHERE s.account_id = a.id AND s.ended_at IS NULL) AS online"
        " FROM accounts a JOIN users u ON u.id = a.user_id"
        " LEFT JOIN LATERAL (SELECT l.tariff_id, f.name AS tariff_name FROM account_tariffs l"
        "   JOIN tariffs f ON f.id = l.tariff_id WHERE l.account_id = a.id AND l.valid_from <= $2"
        "   AND (l.valid_to IS NULL OR l.valid_to > $2) LIMIT 1) t ON true"
        " WHERE a.id = ANY($1::bigint[]) ORDER BY u.id", account_ids, now)
    return [dict(row) for row in rows]


async def find_subscribers(conn: DbConnection, wanted: SubscriberFilter, now: dt.datetime, *, limit: int,
                           offset: int = 0, after: int = 0) -> list[dict[str, Any]]:
    """One page of rows (inside a transaction)."""
    ids = await page_ids(conn, wanted, now, limit=limit, offset=offset, after=after)
    return await subscriber_rows(conn, [account_id for _, account_id in ids], now) if ids else []


async def search_subscribers(conn: DbConnection, wanted: SubscriberFilter, now: dt.datetime, *,
                             limit: int = 50, offset: int = 0) -> dict[str, Any]:
    """``{"total", "total_capped", "rows"}``: one page in user id order and the matches counted up to
    ``MAX_COUNTED``."""
    check_page(limit, offset)
    async with conn.transaction(readonly=True):
        total = await count_subscribers(conn, wanted, now)
        rows = await find_subscribers(conn, wanted, now, limit=limit, offset=offset)
    return {"total": min(total, MAX_COUNTED), "total_capped": total > MAX_COUNTED, "rows": rows}
