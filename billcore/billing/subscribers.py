"""The operator's subscriber list: search with filters, one row per basic account.

Theory of operation
-------------------
A row is a live user joined to their basic account (the partial unique index
``accounts_one_basic``), with the tariff in force now, whether any block is
active and whether a RADIUS session is open.  A ``SubscriberFilter`` holds
what the operator asked for; it becomes one WHERE clause
over ``users u`` and ``accounts a`` (``probes`` of other tables and
``row_conditions``).

Where a search starts decides its cost at a million subscribers, and the
planner alone gets it wrong: it multiplies the filters' selectivities as if
they were independent, and a LIMIT makes it walk the users in id order
hoping to meet 50 matches early, which for "business tariff and online"
(none) reads every user.  So ``plan_query`` chooses:

* the filters that name a set of accounts through an index of their own
  (``driver_sets``: an open session, ``radius_sessions_active``; an active
  block, ``blocks_one_active``; a tariff now, ``account_tariffs_tariff_account``;
  a text of 3 or more characters, the trigram index of schema 0011, or the
  users an account number or an IP address names) are asked for the
  planner's estimate of their size (an EXPLAIN: a plan, no execution), and
  the smallest, if it holds at most ``DRIVE_MAX`` accounts, is read first
  (a materialized CTE) and joined by primary key to everything else;
* otherwise every filter is broad and the users are walked in id order,
  which stops after a page.

A text is read through the trigram index, up to ``TEXT_DRIVE_MAX`` matches,
asking the index only for the text's rare trigrams (``index_grams``: the
ones ANALYZE did not find in more than ``COMMON_GRAM_SHARE`` of the users):
a rare trigram bounds the read, while the posting lists of the ten trigrams
every address holds cost more than re-checking the rows " 66" finds.  A text
whose every trigram is common is read only when a sample of the users
expects it rare; otherwise the walk checks it row by row.

Balance conditions (debtors, a range) have no index, on purpose: an index
on ``accounts.balance`` would make every charge's balance update write an
index entry (no HOT update), on the hottest row of the core.

Every statement runs with a custom plan, and a search that starts from a
set is held to nested loops by key (``planned``).

The page is picked by ids first and decorated after (tariff name, flags), so
the lookups run for the rows shown, not for every candidate.  ``total``
counts matches up to ``MAX_COUNTED`` (``total_capped``: more), as
``users.search`` does, among the first ``COUNT_WINDOW`` rows the search
starts from; fewer there, and more rows beyond, it is extrapolated from the
window's share (``total_estimated``): a rare match over a broad start (a
narrow balance range) would otherwise cost a read of every account for a
number, while the page of 50 itself stops at its 50th match.  Rows come in basic account id order (the order of
every driver set's index, so a page stops after 50 matches wherever it
starts; a basic account is opened with its user, so it is the users' order
too); ``after`` (an account id) pages by key for the export.
"""

from __future__ import annotations

import contextlib
import datetime as dt
import json
import time
from collections.abc import AsyncIterator, Callable, Mapping
from dataclasses import asdict, dataclass
from typing import Any

from billcore.billing.accounts import check_page, text_match, users_at_ip
from billcore.billing.ledger_errors import AmountError, InvalidValue
from billcore.common.money import MAX_AMOUNT
from billcore.db.rows import DbConnection

__all__ = ["COUNT_WINDOW", "DRIVE_MAX", "TEXT_DRIVE_MAX", "FILTER_ARGS", "MAX_COUNTED", "MAX_TEXT", "ROW_FIELDS", "Query",
           "SubscriberFilter", "Sql", "common_grams", "count_subscribers", "driver_sets", "forget_common_grams", "index_grams",
           "probes", "row_conditions", "find_subscribers", "page_ids", "page_statement", "plan_query", "planned",
           "text_accounts", "text_matches", "subscriber_rows", "search_subscribers"]

MAX_TEXT = 200
# the total is counted up to here (total_capped: more): a page of 50 needs no more, and counting
# every match of a filter that holds half the subscribers costs half a million joined rows
MAX_COUNTED = 1000
# a set the planner expects to hold at most this many accounts is where a search starts
DRIVE_MAX = 100_000
# a text's matches are read (``text_accounts``), up to this many; more, and it is a common text that
# the walk meets often enough ("Lenina st. 66", 3,334 of a million, drives; "smirnov", 83,000, walks)
TEXT_DRIVE_MAX = 10_000
# a text the sample expects to match more than this many times is not read at all
TEXT_SAMPLE_MAX = 3 * TEXT_DRIVE_MAX
# … or, when every trigram of it is common (the index's work is their long posting lists), this many
COMMON_TEXT_READ_MAX = 2_000
SAMPLE_PERCENT = 0.2
SAMPLE_MIN = 500            # sampled users below this (a small database): no verdict, the text is read
# the total is counted over the first this many rows of where the search starts (the accounts, or its
# driver set); past them it is extrapolated (``total_estimated``), so a rare match over a broad start
# (a narrow balance range: 800 of a million) costs a bounded count, not a walk of every account
COUNT_WINDOW = 10_000
# a trigram in more than this share of the users is common: the trigram index is asked only for the
# text's other ones, when it has some (its posting list would cost more than re-checking the few rows
# the rare ones leave); the share comes from the index's statistics, read again after a while
COMMON_GRAM_SHARE = 0.01
COMMON_GRAMS_SECONDS = 600.0
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
        text = text.strip()
        if 0 < len(text) < 3 and not text.isdigit():
            # no index helps a text this short: it would read every subscriber
            raise InvalidValue("text: type at least 3 characters (an account id may be shorter)")
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
        return cls(text, tariff_id, flags["blocked"], flags["debtors"], low, high, flags["online"])

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


def _text_condition(text: str, ids: list[int], sql: Sql, grams: bool | list[str] = True) -> str:
    match = text_match(text, sql.arg, "u.", grams)
    return f"({match} OR u.id = ANY({sql.arg(ids)}::bigint[]))" if ids else match


def probes(wanted: SubscriberFilter, sql: Sql, now: dt.datetime, account: str, skip: str = "") -> list[str]:
    """The conditions on other tables (tariff now, an active block, an open session), each an index
    probe with the account id ``account``; ``skip``: the driver set's own (it holds)."""
    parts = []
    if wanted.tariff_id is not None and skip != "tariff":
        at = sql.arg(now)
        parts.append(f"EXISTS (SELECT 1 FROM account_tariffs t WHERE t.account_id = {account}"
                     f" AND t.tariff_id = {sql.arg(wanted.tariff_id)} AND t.valid_from <= {at}"
                     f" AND (t.valid_to IS NULL OR t.valid_to > {at}))")
    if wanted.blocked is not None and skip != "blocked":
        parts.append(("" if wanted.blocked else "NOT ")
                     + f"EXISTS (SELECT 1 FROM blocks b WHERE b.account_id = {account} AND b.lifted_at IS NULL)")
    if wanted.online is not None and skip != "online":
        parts.append(("" if wanted.online else "NOT ")
                     + f"EXISTS (SELECT 1 FROM radius_sessions s WHERE s.account_id = {account}"
                       " AND s.ended_at IS NULL)")
    return parts


def row_conditions(wanted: SubscriberFilter, ids: list[int], text_accounts: list[int] | None, sql: Sql,
                   skip: str = "") -> list[str]:
    """The conditions on the account and user rows (``accounts a``, ``users u``): a basic account of a
    live user, the text, the balance; ``ids``: the users the text names by account id or address;
    ``text_accounts``: the accounts the text finds, when they were read (``text_accounts``)."""
    parts = ["a.is_basic", "u.deleted_at IS NULL"]
    if wanted.text and skip != "text":
        # on the walk (a common text) each row is checked as it is read, not through the index
        parts.append(_text_condition(wanted.text, ids, sql, grams=False) if text_accounts is None
                     else f"a.id = ANY({sql.arg(text_accounts)}::bigint[])")
    if wanted.debtors is not None:
        parts.append("a.balance < 0" if wanted.debtors else "a.balance >= 0")
    if wanted.balance_min is not None:
        parts.append(f"a.balance >= {sql.arg(wanted.balance_min)}")
    if wanted.balance_max is not None:
        parts.append(f"a.balance <= {sql.arg(wanted.balance_max)}")
    return parts


def driver_sets(wanted: SubscriberFilter, text_accounts: list[int] | None,
                now: dt.datetime) -> dict[str, Callable[[Sql], str]]:
    """The filters that name a set of accounts through an index of their own, each as a SELECT of
    ``account_id`` in account id order (built on a ``Sql``, so it can be planned alone and inside the
    search)."""
    sets: dict[str, Callable[[Sql], str]] = {}
    if wanted.online:
        sets["online"] = lambda sql: ("SELECT DISTINCT account_id FROM radius_sessions WHERE ended_at IS NULL"
                                      " ORDER BY account_id")
    if wanted.blocked:
        sets["blocked"] = lambda sql: ("SELECT DISTINCT account_id FROM blocks WHERE lifted_at IS NULL"
                                       " ORDER BY account_id")
    if wanted.tariff_id is not None:
        def on_tariff(sql: Sql) -> str:
            at = sql.arg(now)
            return (f"SELECT account_id FROM account_tariffs WHERE tariff_id = {sql.arg(wanted.tariff_id)}"
                    f" AND valid_from <= {at} AND (valid_to IS NULL OR valid_to > {at}) ORDER BY account_id")
        sets["tariff"] = on_tariff
    if text_accounts is not None:
        sets["text"] = lambda sql: f"SELECT unnest({sql.arg(text_accounts)}::bigint[]) AS account_id ORDER BY 1"
    return sets


@dataclass(slots=True)
class _GramStats:
    """The trigrams ANALYZE found common in the search index, and when they were read (monotonic)."""

    common: frozenset[str] = frozenset()
    read_at: float | None = None


_GRAM_STATS = _GramStats()


def forget_common_grams() -> None:
    """Read the index's statistics again at the next search (after an ANALYZE, in tests)."""
    _GRAM_STATS.read_at = None


async def common_grams(conn: DbConnection) -> frozenset[str]:
    """The trigrams in more than ``COMMON_GRAM_SHARE`` of the users, from ANALYZE's statistics of the
    expression index ``users_search_grams`` (its most common elements and their shares); read once
    per ``COMMON_GRAMS_SECONDS`` in a process, not per search.  Empty before the first ANALYZE."""
    now = time.monotonic()
    if _GRAM_STATS.read_at is not None and now - _GRAM_STATS.read_at < COMMON_GRAMS_SECONDS:
        return _GRAM_STATS.common
    rows = await conn.fetch("SELECT most_common_elems::text::text[] AS grams, most_common_elem_freqs AS shares"
                            " FROM pg_stats WHERE tablename = 'users_search_grams' AND most_common_elems IS NOT NULL")
    # the shares' list ends with three figures of its own (least, most, null share): zip stops before them
    _GRAM_STATS.common = frozenset(gram for row in rows for gram, share in zip(row["grams"], row["shares"])
                                   if share > COMMON_GRAM_SHARE)
    _GRAM_STATS.read_at = now
    return _GRAM_STATS.common


async def index_grams(conn: DbConnection, text: str) -> tuple[list[str], bool | None]:
    """The trigrams to ask the index for, and whether they are rare: the text's rare ones (True), or
    all of them when every one is common (False: only their intersection narrows, at the cost of
    their long posting lists) or when the index has no statistics yet (None: rarity unknown).
    ``billcore_grams`` makes them, so they are the index's."""
    grams = sorted(set(await conn.fetchval("SELECT billcore_grams($1)", text) or ()))
    common = await common_grams(conn)
    rare = [gram for gram in grams if gram not in common]
    if not common:
        return grams, None
    return (rare, True) if rare else (grams, False)


async def text_accounts(conn: DbConnection, text: str, ids: list[int]) -> list[int] | None:
    """The basic accounts of the live users the text finds, in id order (``text_matches``)."""
    found = await text_matches(conn, text, ids)
    return None if found is None else [account_id for _, account_id in found]


async def text_matches(conn: DbConnection, text: str, ids: list[int]) -> list[tuple[int, int]] | None:
    """(user id, basic account id) of the live users the text finds, in account id order, when there are at most
    ``TEXT_DRIVE_MAX`` (None: more, or a text too short for the trigram index that names no id).

    Read, not estimated: the trigram index's estimates are off by thousands both ways ("smirnov": 12
    expected, 83,000 found).  A text the sample finds common is not read; another stops the read at
    ``TEXT_DRIVE_MAX + 1`` rows.  The index is asked for the text's rare trigrams only
    (``index_grams``): "Lenina st. 66" holds ten trigrams every address has, whose posting lists of a
    million rows each cost more than re-checking the 8,000 rows " 66" alone finds."""
    if len(text) < 3 and not ids:
        return None
    grams, rare = await index_grams(conn, text) if len(text) >= 3 else ([], None)
    # A rare trigram is in at most ``COMMON_GRAM_SHARE`` of the users: reading what it finds is bounded.
    # Any other text may be common ("ivan": 100,000), which a sample tells first (0.2 % of the users'
    # pages, a few milliseconds): reading its matches through the index would cost more than the walk
    # meeting them, and when every trigram is common, so does a text of a few thousand ("Ivan Smirnov",
    # 8,300: ten posting lists of 80,000 to 250,000 rows intersected, a quarter of a second).
    if not rare:
        sql = Sql()
        sample = await conn.fetchrow(
            f"SELECT count(*) AS seen, count(*) FILTER (WHERE {text_match(text, sql.arg, 'u.', grams=False)}) AS hits,"
            " (SELECT reltuples FROM pg_class WHERE oid = 'users'::regclass) AS users"
            f" FROM users u TABLESAMPLE SYSTEM ({SAMPLE_PERCENT}) WHERE u.deleted_at IS NULL", *sql.args)
        most = COMMON_TEXT_READ_MAX if rare is False else TEXT_SAMPLE_MAX
        if sample is not None and sample["seen"] >= SAMPLE_MIN and (
                sample["hits"] / sample["seen"] * float(sample["users"]) > most):
            return None
    sql = Sql()
    condition = _text_condition(text, ids, sql, grams or False)
    # planned for its own trigrams and ids (inside the search's transaction): a generic plan of this
    # prepared statement, chosen after five runs, cannot see that they are rare, and read every user
    await conn.execute("SET LOCAL plan_cache_mode = force_custom_plan")
    rows = await conn.fetch(f"SELECT u.id AS user_id, a.id FROM users u JOIN accounts a ON a.user_id = u.id"
                            f" AND a.is_basic WHERE u.deleted_at IS NULL AND {condition} LIMIT {TEXT_DRIVE_MAX + 1}",
                            *sql.args)
    if len(rows) > TEXT_DRIVE_MAX:
        return None
    return sorted(((row["user_id"], row["id"]) for row in rows), key=lambda pair: pair[1])


@dataclass(frozen=True, slots=True)
class Query:
    """A search's statement parts: the rows to start from, the conditions, their arguments."""

    driver: str             # "walk" (the basic accounts in id order) or the name of the set it starts from
    source: str
    where: str
    args: tuple[Any, ...]
    # the source cut to the first ``COUNT_WINDOW`` rows it starts from (same placeholders), the statement
    # reading that window's size and last account id, and how many rows the whole start holds (estimated)
    window_source: str = ""
    window_extent: tuple[str, tuple[Any, ...]] = ("", ())
    population: float = -1.0
    # every match (user id, account id) in account id order, when they are known already: the text's
    # accounts, when it is the only filter (no statement then)
    matches: tuple[tuple[int, int], ...] | None = None

    def statement(self, select: str, tail: str, *values: Any, windowed: bool = False) -> tuple[str, list[Any]]:
        """``SELECT {select} FROM … WHERE … {tail}``; ``tail``'s placeholders ``{}`` take ``values``;
        ``windowed``: from the window's rows only."""
        source = self.window_source if windowed else self.source
        args = list(self.args)
        marks = []
        for value in values:
            args.append(value)
            marks.append(f"${len(args)}")
        return f"SELECT {select} FROM {source} WHERE {self.where} {tail.format(*marks)}", args


def _most_rows(node: Mapping[str, Any]) -> float:
    return max([float(node["Plan Rows"]), *(_most_rows(child) for child in node.get("Plans", ()))])


async def _estimate(conn: DbConnection, build: Callable[[Sql], str]) -> float:
    """The planner's row estimate of a set (a plan, no execution: about a millisecond): the most rows
    any step of it expects."""
    sql = Sql()
    text = build(sql)
    plan = await conn.fetchval(f"EXPLAIN (FORMAT JSON) {text}", *sql.args)
    return _most_rows(json.loads(plan)[0]["Plan"])


async def plan_query(conn: DbConnection, wanted: SubscriberFilter, now: dt.datetime) -> Query:
    """Where the search starts: from the smallest indexed set the planner expects to hold at most
    ``DRIVE_MAX`` accounts, else by walking the basic accounts in id order (see the module's doc)."""
    ids = await _text_ids(conn, wanted.text) if wanted.text else []
    pairs = await text_matches(conn, wanted.text, ids) if wanted.text else None
    found = None if pairs is None else [account_id for _, account_id in pairs]
    sets = driver_sets(wanted, found, now)
    sizes = {name: float(len(found)) if name == "text" and found is not None else await _estimate(conn, build)
             for name, build in sets.items()}
    sizes = {name: size for name, size in sizes.items() if size <= DRIVE_MAX}
    smallest = min(sizes, key=lambda name: sizes[name], default=None)
    sql = Sql()
    if smallest is None:
        where = [*probes(wanted, sql, now, "a.id"), *row_conditions(wanted, ids, found, sql)]
        accounts = await conn.fetchval("SELECT reltuples FROM pg_class WHERE oid = 'accounts'::regclass")
        return Query("walk", WALK.format("accounts"), " AND ".join(where), tuple(sql.args),
                     WALK.format(f"(SELECT * FROM accounts ORDER BY id LIMIT {COUNT_WINDOW})"),
                     (f"SELECT count(*) AS seen, max(id) AS last FROM"
                      f" (SELECT id FROM accounts ORDER BY id LIMIT {COUNT_WINDOW}) w", ()), float(accounts or -1))
    # The set is read first, in account id order, and the other sets probed with its ids inside the
    # same subquery (OFFSET 0 keeps it one): an id they refuse costs no read of an account or a user.
    start = sets[smallest](sql)
    checks = probes(wanted, sql, now, "x.account_id", skip=smallest)
    # the text's accounts, read already, are one more probe of the set's ids: checked before an
    # account row is read, not as a filter of the rows (there a misestimated set of "1 row" led the
    # planner to rescan every basic account per id: 4 s at 50,000 subscribers, name + tariff + range)
    text_probe = found is not None and smallest != "text"
    if text_probe:
        checks.append(f"x.account_id = ANY({sql.arg(found)}::bigint[])")

    def source(driver: str) -> str:
        if checks:
            driver = f"SELECT account_id FROM ({driver}) x WHERE {' AND '.join(checks)} ORDER BY account_id"
        return DRIVEN.format(driver)

    where = row_conditions(wanted, ids, found, sql, skip="text" if text_probe else smallest)
    extent = Sql()
    # the text's accounts are basic ones of live users that contain it: with no other filter, the matches
    known = tuple(pairs) if pairs is not None and wanted == SubscriberFilter(text=wanted.text) else None
    return Query(smallest, source(start), " AND ".join(where), tuple(sql.args), source(f"{start} LIMIT {COUNT_WINDOW}"),
                 (f"SELECT count(*) AS seen, max(account_id) AS last FROM"
                  f" ({sets[smallest](extent)} LIMIT {COUNT_WINDOW}) w", tuple(extent.args)), sizes[smallest],
                 known)


# the basic accounts in id order (``{}``: the accounts, or the window of them)
WALK = "{} a JOIN users u ON u.id = a.user_id"
DRIVEN = "({} OFFSET 0) d JOIN accounts a ON a.id = d.account_id JOIN users u ON u.id = a.user_id"


# the plan spelled out: from the set or the accounts, by key, in id order (see ``planned``)
_NESTED_LOOPS = ("enable_hashjoin", "enable_mergejoin", "enable_seqscan", "enable_bitmapscan")


@contextlib.asynccontextmanager
async def planned(conn: DbConnection) -> AsyncIterator[None]:
    """Plan the statements inside for their own arguments (asyncpg prepares statements, and a generic
    plan chosen after five runs cannot see that this text is rare or that tariff holds everyone), and
    as ``plan_query`` chose: nested loops by key from the set or the accounts, in account id order, so
    the first matches come first and a page stops there.  Left free, the planner hashes the whole
    accounts table against the other filters (its row estimates assume they are independent), or
    collects a common text's 100,000 matches from the trigram index to sort them.  Inside a
    transaction; the settings are reset after."""
    await conn.execute("SET LOCAL plan_cache_mode = force_custom_plan; "
                       + "".join(f"SET LOCAL {name} = off; " for name in _NESTED_LOOPS))
    try:
        yield
    finally:
        await conn.execute("".join(f"RESET {name}; " for name in ("plan_cache_mode", *_NESTED_LOOPS)))


def page_statement(query: Query, *, limit: int, offset: int = 0, after: int = 0,
                   windowed: bool = False) -> tuple[str, list[Any]]:
    """The statement selecting (user id, account id) of matches in account id order, after the account
    ``after`` (``windowed``: among the window's rows only), and its arguments."""
    return query.statement("u.id AS user_id, a.id AS account_id",
                           "AND a.id > {} ORDER BY a.id LIMIT {} OFFSET {}", after, limit, offset, windowed=windowed)


async def _ids(conn: DbConnection, query: Query, *, limit: int, offset: int = 0,
               after: int = 0, windowed: bool = False) -> list[tuple[int, int]]:
    if query.matches is not None:
        return [pair for pair in query.matches if pair[1] > after][offset:offset + limit]
    statement, args = page_statement(query, limit=limit, offset=offset, after=after, windowed=windowed)
    async with planned(conn):
        rows = await conn.fetch(statement, *args)
    return [(row["user_id"], row["account_id"]) for row in rows]


async def count_subscribers(conn: DbConnection, wanted: SubscriberFilter, now: dt.datetime, *,
                            cap: int) -> int:
    """Matches, counted up to ``cap + 1`` (inside a transaction)."""
    return len(await _ids(conn, await plan_query(conn, wanted, now), limit=cap + 1))


async def page_ids(conn: DbConnection, wanted: SubscriberFilter, now: dt.datetime, *, limit: int,
                   offset: int = 0, after: int = 0) -> list[tuple[int, int]]:
    """(user id, account id) of one page in account id order, after the account ``after``
    (inside a transaction)."""
    return await _ids(conn, await plan_query(conn, wanted, now), limit=limit, offset=offset, after=after)


async def subscriber_rows(conn: DbConnection, account_ids: list[int], now: dt.datetime) -> list[dict[str, Any]]:
    """The list's row of each basic account, in account id order."""
    rows = await conn.fetch(
        "SELECT u.id AS user_id, u.login, u.full_name, u.phone, u.email, u.external_id AS contract,"
        " a.id AS account_id, a.balance, a.credit, t.tariff_id, t.tariff_name,"
        " EXISTS (SELECT 1 FROM blocks b WHERE b.account_id = a.id AND b.lifted_at IS NULL) AS blocked,"
        " EXISTS (SELECT 1 FROM radius_sessions s WHERE s.account_id = a.id AND s.ended_at IS NULL) AS online"
        " FROM accounts a JOIN users u ON u.id = a.user_id"
        " LEFT JOIN LATERAL (SELECT l.tariff_id, f.name AS tariff_name FROM account_tariffs l"
        "   JOIN tariffs f ON f.id = l.tariff_id WHERE l.account_id = a.id AND l.valid_from <= $2"
        "   AND (l.valid_to IS NULL OR l.valid_to > $2) LIMIT 1) t ON true"
        " WHERE a.id = ANY($1::bigint[]) ORDER BY a.id", account_ids, now)
    return [dict(row) for row in rows]


async def find_subscribers(conn: DbConnection, wanted: SubscriberFilter, now: dt.datetime, *, limit: int,
                           offset: int = 0, after: int = 0) -> list[dict[str, Any]]:
    """One page of rows (inside a transaction)."""
    ids = await page_ids(conn, wanted, now, limit=limit, offset=offset, after=after)
    return await subscriber_rows(conn, [account_id for _, account_id in ids], now) if ids else []


async def search_subscribers(conn: DbConnection, wanted: SubscriberFilter, now: dt.datetime, *,
                             limit: int = 50, offset: int = 0) -> dict[str, Any]:
    """``{"total", "total_capped", "total_estimated", "rows"}``: one page in account id order and the
    matches counted up to ``MAX_COUNTED``.

    One statement reads the first ``MAX_COUNTED + 1`` matches among the first ``COUNT_WINDOW`` rows the
    search starts from: their number is the total, and the page is among them unless it lies further
    on.  When fewer matched and the window did not hold every row (a rare match over a broad start),
    the page is read on from the window's end and the total extrapolated from the window's share
    (``total_estimated``), unless that page reached the end, which makes the count exact again."""
    check_page(limit, offset)
    cap = MAX_COUNTED
    async with conn.transaction(readonly=True):
        query = await plan_query(conn, wanted, now)
        matches = await _ids(conn, query, limit=cap + 1, windowed=query.population >= 0)
        seen, last = 0, 0
        if len(matches) <= cap and query.population >= 0 and query.matches is None:
            statement, args = query.window_extent
            extent = await conn.fetchrow(statement, *args)
            seen, last = (int(extent["seen"]), int(extent["last"] or 0)) if extent is not None else (0, 0)
        if seen < COUNT_WINDOW:
            # every match is among those read (the window held the whole start), or more than the cap
            if offset + limit <= len(matches) or len(matches) <= cap:
                shown = matches[offset:offset + limit]
            else:
                shown = await _ids(conn, query, limit=limit, offset=offset)
            total, estimated = len(matches), False
        else:
            start = max(offset, len(matches))
            wanted_beyond = offset + limit - start
            beyond = await _ids(conn, query, limit=wanted_beyond, offset=start - len(matches),
                                after=last) if wanted_beyond > 0 else []
            shown = matches[offset:offset + limit] + beyond
            if offset <= len(matches) and len(beyond) < wanted_beyond:
                total, estimated = len(matches) + len(beyond), False   # the page read on to the end
            else:
                share = seen / max(query.population, float(seen))
                total = max(round(len(matches) / share), offset + len(shown) if shown else len(matches))
                estimated = True
        rows = await subscriber_rows(conn, [account_id for _, account_id in shown], now) if shown else []
    return {"total": min(total, cap), "total_capped": total > cap, "total_estimated": estimated, "rows": rows}
