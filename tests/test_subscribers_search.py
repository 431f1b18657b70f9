"""subscribers.search and subscribers.export on a real database.

The oracle is Python over the raw tables (every user, account, tariff link,
block, session and binding read with a plain SELECT): what an operator
means by "blocked", "online", "on this tariff now", "contains this text",
evaluated row by row, never the SQL under test.
"""

from __future__ import annotations

import datetime as dt
import ipaddress
import random
from collections.abc import AsyncIterator
from dataclasses import dataclass
from types import SimpleNamespace
from typing import Any

import asyncpg
import pytest

from billcore.api import subscribers as subscriber_calls
from billcore.billing import subscribers
from billcore.billing.blocks import lift_block, set_block
from billcore.billing.ledger_errors import InvalidValue
from billcore.billing.tariffs import link_tariff
from billcore.common.config import Config
from billcore.db.rows import DbConnection
from billcore.server.context import CoreContext
from urfa.errors import CallFailed

UTC = dt.timezone.utc
NOW = dt.datetime(2026, 3, 15, 12, tzinfo=UTC)
N = 240
NAMES = ["Ivan Petrov", "Olga Smirnova", "Anna Volkova", "Pavel Ivanov"]


class Ctx:
    def __init__(self) -> None:
        self.principal = SimpleNamespace(kind="admin", id=1, login="admin1")
        self.ip = "127.0.0.1"
        self.chunks: list[Any] = []

    async def stream(self, chunk: Any) -> None:
        self.chunks.append(chunk)


@dataclass
class World:
    pool: asyncpg.Pool
    calls: dict[str, Any]
    tariffs: list[int]


async def build(conn: DbConnection) -> list[int]:
    """N users with basic accounts in every state the filters tell apart; returns the two tariff ids."""
    await conn.execute(
        "INSERT INTO users(login, full_name, email, phone, address, external_id,"
        " scram_salt, scram_iterations, scram_stored_key, scram_server_key)"
        " SELECT 'sub' || lpad(g::text, 6, '0'), ($2::text[])[g % 4 + 1], 'sub' || g || '@example.net',"
        " '+7 912 ' || lpad(g::text, 7, '0'), 'Lenina st. ' || g, CASE WHEN g % 5 = 0 THEN NULL"
        " ELSE 'C-' || lpad(g::text, 7, '0') END, '\\x00', 4096, '\\x00', '\\x00'"
        " FROM generate_series(0, $1 - 1) g", N, NAMES)
    # balances from -3.00 to +3.00 in steps, some exactly zero
    await conn.execute("INSERT INTO accounts(user_id, is_basic, balance, credit)"
                       " SELECT id, true, ((id * 37) % 13 - 6) * 500000, 10000000 FROM users ORDER BY id")
    # a second, non-basic account for every 7th user: still one row per subscriber
    await conn.execute("INSERT INTO accounts(user_id, balance) SELECT id, -1 FROM users WHERE id % 7 = 0")
    await conn.execute("UPDATE users SET deleted_at = $1 WHERE id % 41 = 0", NOW)
    home = await conn.fetchval("INSERT INTO tariffs(name) VALUES ('home') RETURNING id")
    fast = await conn.fetchval("INSERT INTO tariffs(name) VALUES ('fast') RETURNING id")
    basics = [row["id"] for row in await conn.fetch("SELECT id FROM accounts WHERE is_basic ORDER BY id")]
    zone = dt.timezone.utc
    for account in basics:
        kind = account % 6
        if kind in (0, 1, 2):   # home since January; some moved to fast a week ago
            await link_tariff(conn, account, home, now=NOW - dt.timedelta(days=60), tz=zone, actor="test")
            if kind == 1:
                await link_tariff(conn, account, fast, now=NOW - dt.timedelta(days=7), tz=zone, actor="test")
        elif kind == 3:         # fast only from next month: none now
            await link_tariff(conn, account, fast, now=NOW, tz=zone, start="next_period", actor="test")
        elif kind == 4:         # was on fast, now on none
            await link_tariff(conn, account, fast, now=NOW - dt.timedelta(days=60), tz=zone, actor="test")
            await link_tariff(conn, account, None, now=NOW - dt.timedelta(days=1), tz=zone, actor="test")
        if account % 9 == 0:
            await set_block(conn, account, "admin", actor="test", reason="t", now=NOW - dt.timedelta(days=2))
        if account % 9 == 3:    # blocked once, lifted
            await set_block(conn, account, "user", actor="test", reason="t", now=NOW - dt.timedelta(days=2))
            await lift_block(conn, account, "user", actor="test", now=NOW - dt.timedelta(days=1))
    nas = await conn.fetchval("INSERT INTO radius_nas(name, address, secret_enc) VALUES ('nas', '10.9.9.9', '\\x00')"
                              " RETURNING id")
    await conn.execute("INSERT INTO radius_links(account_id, login, password_enc)"
                       " SELECT id, 'r' || id, '\\x00' FROM accounts WHERE is_basic")
    # open sessions for every 4th account, closed ones for every 3rd
    await conn.execute(
        "INSERT INTO radius_sessions(nas_id, session_id, account_id, link_id, login, framed_ip, started_at,"
        " updated_at, ended_at) SELECT $1, 's' || l.id || '-' || k, l.account_id, l.id, l.login, NULL,"
        " $2::timestamptz - k * interval '1 hour', $2, CASE WHEN k = 0 THEN NULL ELSE $2 END"
        " FROM radius_links l, generate_series(0, 1) k"
        " WHERE (k = 0 AND l.account_id % 4 = 0) OR (k = 1 AND l.account_id % 3 = 0)", nas, NOW)
    await conn.execute(
        "INSERT INTO ip_bindings(account_id, prefix, kind, source, valid_from)"
        " SELECT id, ('10.7.' || (id / 256) || '.' || (id % 256) || '/32')::cidr, 'static', 'static', $1"
        " FROM accounts WHERE is_basic", NOW - dt.timedelta(days=90))
    await conn.execute("ANALYZE")
    return [home, fast]


@pytest.fixture
async def world(pool: asyncpg.Pool) -> AsyncIterator[World]:
    async with pool.acquire() as conn:
        tariffs = await build(conn)
    core = CoreContext(pool, Config(), publish=lambda t, p: None, now=lambda: NOW)
    yield World(pool, {spec.name: spec for spec in subscriber_calls.calls(core)}, tariffs)


async def expected_rows(pool: asyncpg.Pool, wanted: dict[str, Any]) -> list[dict[str, Any]]:
    """The rows the filter means, computed in Python from the raw tables."""
    async with pool.acquire() as conn:
        users = {row["id"]: row for row in await conn.fetch("SELECT * FROM users")}
        account_rows = await conn.fetch("SELECT * FROM accounts")
        links = await conn.fetch("SELECT * FROM account_tariffs")
        names = {row["id"]: row["name"] for row in await conn.fetch("SELECT * FROM tariffs")}
        blocks = await conn.fetch("SELECT * FROM blocks")
        sessions = await conn.fetch("SELECT * FROM radius_sessions")
        bindings = await conn.fetch("SELECT account_id, prefix FROM ip_bindings")
    text = (wanted.get("text") or "").strip()
    out = []
    for account in sorted(account_rows, key=lambda row: row["id"]):
        user = users[account["user_id"]]
        if not account["is_basic"] or user["deleted_at"] is not None:
            continue
        now_links = [link for link in links if link["account_id"] == account["id"]
                     and link["valid_from"] <= NOW and (link["valid_to"] is None or link["valid_to"] > NOW)]
        tariff_id = now_links[0]["tariff_id"] if now_links else None
        blocked = any(b["account_id"] == account["id"] and b["lifted_at"] is None for b in blocks)
        online = any(s["account_id"] == account["id"] and s["ended_at"] is None for s in sessions)
        if text:
            fields = [user[name] or "" for name in ("login", "full_name", "email", "phone", "address", "external_id")]
            found = any(text.lower() in value.lower() for value in fields)
            if text.isdigit():
                found = found or int(text) == account["id"] or any(
                    int(text) == other["id"] and other["user_id"] == user["id"] for other in account_rows)
            try:
                address = ipaddress.ip_address(text)
                found = found or any(address in ipaddress.ip_network(b["prefix"]) for b in bindings
                                     if any(a["id"] == b["account_id"] and a["user_id"] == user["id"]
                                            for a in account_rows))
            except ValueError:
                pass
            if not found:
                continue
        if wanted.get("tariff_id") is not None and tariff_id != wanted["tariff_id"]:
            continue
        if wanted.get("blocked") is not None and blocked != wanted["blocked"]:
            continue
        if wanted.get("online") is not None and online != wanted["online"]:
            continue
        if wanted.get("debtors") is not None and (account["balance"] < 0) != wanted["debtors"]:
            continue
        if wanted.get("balance_min") is not None and account["balance"] < wanted["balance_min"]:
            continue
        if wanted.get("balance_max") is not None and account["balance"] > wanted["balance_max"]:
            continue
        out.append({"user_id": user["id"], "login": user["login"], "full_name": user["full_name"],
                    "phone": user["phone"], "email": user["email"], "contract": user["external_id"],
                    "account_id": account["id"], "balance": account["balance"], "credit": account["credit"],
                    "tariff_id": tariff_id, "tariff_name": names.get(tariff_id) if tariff_id else None,
                    "blocked": blocked, "online": online})
    return out


def filters(world: World, rng: random.Random) -> dict[str, Any]:
    texts = ["", "", "", "sub00012", "IVAN", "c-00001", "12", "smirnova", "example.net", "no such one",
             "10.7.0.9", "%%%", "a_b", " 12 "]
    return {
        "text": rng.choice(texts),
        "tariff_id": rng.choice([None, None, *world.tariffs]),
        "blocked": rng.choice([None, True, False]),
        "debtors": rng.choice([None, True, False]),
        "online": rng.choice([None, True, False]),
        "balance_min": rng.choice([None, None, -1_000_000, 0, 1]),
        "balance_max": rng.choice([None, None, 0, 1_500_000]),
    }


@pytest.mark.parametrize("start", ["chosen", "walk"])
async def test_every_filter_combination_finds_what_the_tables_say(world: World, start: str,
                                                                   monkeypatch: pytest.MonkeyPatch) -> None:
    """Whichever side a search starts from (the smallest set, as chosen; or the walk over every account,
    which a million subscribers take for broad filters), it finds the same rows."""
    if start == "walk":
        monkeypatch.setattr(subscribers, "DRIVE_MAX", -1)
        monkeypatch.setattr(subscribers, "TEXT_DRIVE_MAX", -1)
    search = world.calls["subscribers.search"].handler
    rng = random.Random(16)
    seen_nonempty = 0
    for _ in range(150):
        wanted = filters(world, rng)
        if None not in (wanted["balance_min"], wanted["balance_max"]) and wanted["balance_min"] > wanted["balance_max"]:
            wanted["balance_max"] = None
        expected = await expected_rows(world.pool, wanted)
        found = await search(Ctx(), **wanted, limit=1000)
        assert found["rows"] == expected, wanted
        assert (found["total"], found["total_capped"]) == (len(expected), False), wanted
        seen_nonempty += bool(expected)
    assert seen_nonempty > 40   # the combinations did not all come back empty


async def test_each_filter_alone(world: World) -> None:
    search = world.calls["subscribers.search"].handler
    home, fast = world.tariffs
    everyone = await expected_rows(world.pool, {})
    for wanted in ({"blocked": True}, {"online": True}, {"debtors": True}, {"tariff_id": fast},
                   {"balance_min": 0, "balance_max": 0}):
        found = await search(Ctx(), **wanted, limit=1000)
        assert 0 < len(found["rows"]) < len(everyone), wanted
        assert found["rows"] == await expected_rows(world.pool, wanted)
    # an exact account id finds its subscriber, though no text field holds it
    second = await world.pool.fetchval("SELECT min(id) FROM accounts WHERE NOT is_basic")
    user = await world.pool.fetchval("SELECT user_id FROM accounts WHERE id = $1", second)
    assert [row["user_id"] for row in (await search(Ctx(), text=str(second)))["rows"]] == [user]
    # an IP address finds the subscriber bound to it
    found = await search(Ctx(), text="10.7.0.77")
    assert [row["account_id"] for row in found["rows"]] == [77]
    row = found["rows"][0]
    assert row["login"] == "sub000076" and row["tariff_name"] in ("home", "fast", None)


async def test_pages_and_the_capped_total(world: World, monkeypatch: pytest.MonkeyPatch) -> None:
    search = world.calls["subscribers.search"].handler
    everyone = await expected_rows(world.pool, {})
    pages = [await search(Ctx(), limit=50, offset=offset) for offset in range(0, len(everyone), 50)]
    assert [row for page in pages for row in page["rows"]] == everyone
    assert (await search(Ctx()))["rows"] == everyone[:50]   # 50 by default
    monkeypatch.setattr(subscribers, "MAX_COUNTED", 100)
    capped = await search(Ctx(), limit=10)
    assert (capped["total"], capped["total_capped"], len(capped["rows"])) == (100, True, 10)
    few = await search(Ctx(), blocked=True)
    assert few["total_capped"] is False and few["total"] == len(few["rows"])


async def test_export_streams_every_match_in_chunks_that_fit(world: World, monkeypatch: pytest.MonkeyPatch) -> None:
    export = world.calls["subscribers.export"].handler
    monkeypatch.setattr(subscriber_calls, "EXPORT_PAGE", 7)      # many key-paged reads
    monkeypatch.setattr(subscriber_calls, "CHUNK_BYTES", 4000)   # many chunks
    for wanted in ({}, {"online": False, "debtors": True}, {"text": "olga"}):
        ctx = Ctx()
        answer = await export(ctx, **wanted)
        rows = [row for chunk in ctx.chunks for row in chunk]
        assert rows == await expected_rows(world.pool, wanted)
        assert answer == {"rows": len(rows), "truncated": False}
        assert len(ctx.chunks) > 1 or len(rows) < 20
    monkeypatch.setattr(subscriber_calls, "MAX_EXPORT", 30)
    ctx = Ctx()
    assert await export(ctx) == {"rows": 30, "truncated": True}
    assert sum(len(chunk) for chunk in ctx.chunks) == 30


@pytest.mark.parametrize("args, code", [
    ({"limit": 1001}, "billing.invalid"),
    ({"limit": 0}, "billing.invalid"),
    ({"offset": -1}, "billing.invalid"),
    ({"text": "x" * 201}, "billing.invalid"),
    ({"text": "ab"}, "billing.invalid"),          # too short for the index: it would read everyone
    ({"tariff_id": 0}, "billing.invalid"),
    ({"blocked": 1}, "billing.invalid"),
    ({"balance_min": 5, "balance_max": 4}, "billing.amount"),
    ({"balance_max": 10**19}, "billing.amount"),
])
async def test_bad_arguments_are_refused_with_a_code(world: World, args: dict[str, Any], code: str) -> None:
    with pytest.raises(CallFailed) as refused:
        await world.calls["subscribers.search"].handler(Ctx(), **args)
    assert refused.value.code == code


async def test_a_tariff_nobody_has_and_an_unknown_filter(world: World) -> None:
    assert (await world.calls["subscribers.search"].handler(Ctx(), tariff_id=10**9))["rows"] == []
    with pytest.raises(InvalidValue) as refused:
        subscribers.SubscriberFilter.of({"colour": "red"})
    assert "colour" in str(refused.value)


async def test_the_declared_schema(world: World) -> None:
    search, export = world.calls["subscribers.search"], world.calls["subscribers.export"]
    assert search.args["balance_min"] == "money?" and search.fields["rows.balance"] == "money"
    assert (search.right, export.right, search.bound, export.bound) == ("users.read", "users.read", "page:1000",
                                                                         "stream")


async def test_a_search_starts_from_its_smallest_indexed_set(world: World, monkeypatch: pytest.MonkeyPatch) -> None:
    """What a million subscribers make of it (docs/scaling.md): a filter with an index of its own leads
    when the planner expects it small, a text when its matches were few enough to read, else the walk."""
    async with world.pool.acquire() as conn:
        cases: list[tuple[dict[str, Any], str]] = [
            ({"online": True}, "online"), ({"blocked": True, "online": True}, "blocked"),
            ({"debtors": True}, "walk"), ({}, "walk"), ({"online": False}, "walk"),
            ({"text": "sub00012", "online": True}, "text"),
            ({"tariff_id": world.tariffs[1], "debtors": True}, "tariff")]
        for wanted, driver in cases:
            assert (await subscribers.plan_query(conn, subscribers.SubscriberFilter.of(wanted), NOW)).driver == driver
    # a text the sample of users finds common is not read through the index: the walk meets it often
    monkeypatch.setattr(subscribers, "SAMPLE_PERCENT", 100)
    monkeypatch.setattr(subscribers, "SAMPLE_MIN", 100)
    monkeypatch.setattr(subscribers, "TEXT_DRIVE_MAX", 10)
    async with world.pool.acquire() as conn:
        for text, driver in [("ivan", "walk"), ("sub00012", "text")]:
            assert (await subscribers.plan_query(conn, subscribers.SubscriberFilter.of({"text": text}), NOW)).driver == driver


async def test_a_text_asks_the_index_for_its_rare_trigrams_and_finds_what_the_scan_finds(world: World) -> None:
    """Every address here starts "Lenina st. " and four names take turns (a skewed text, as at a million):
    the index is asked only for a text's rare trigrams, and the rows re-checked, so a search finds exactly
    the rows the tables hold, whichever trigrams narrowed it."""
    subscribers.forget_common_grams()
    try:
        async with world.pool.acquire() as conn:
            assert {"len", "eni", "nin", "sub", "exa"} <= await subscribers.common_grams(conn)
            grams, rare = await subscribers.index_grams(conn, "Lenina st. 66")
            every = set(await conn.fetchval("SELECT billcore_grams('Lenina st. 66')"))
            assert rare is True and grams and set(grams) < every and "len" not in grams
            assert (await subscribers.index_grams(conn, "lenina"))[1] is False    # all common: every one asked
            search = world.calls["subscribers.search"].handler
            for text in ("Lenina st. 66", "LENINA ST. 1", "enina st. 20", "lenina", "Smirnova", "sub00014",
                         "example.net", "t. 23", "912 0000", "no such street"):
                expected = await expected_rows(world.pool, {"text": text})
                assert await subscribers.text_accounts(conn, text, []) == [row["account_id"] for row in expected], text
                found = await search(Ctx(), text=text, limit=1000)
                assert found["rows"] == expected, text
                assert (found["total"], found["total_capped"], found["total_estimated"]) == (len(expected), False,
                                                                                               False), text
    finally:
        subscribers.forget_common_grams()


@pytest.mark.parametrize("wanted", [{"debtors": True}, {"balance_min": 0, "balance_max": 0},
                                    {"online": False, "debtors": True}, {"online": True, "debtors": False},
                                    {"text": "smirnova", "balance_max": 0}])
async def test_a_count_past_its_window_is_estimated_and_the_rows_stay_exact(
        world: World, wanted: dict[str, Any], monkeypatch: pytest.MonkeyPatch) -> None:
    """The total is counted among the first COUNT_WINDOW rows a search starts from and extrapolated
    (flagged); every page holds exactly its rows, read on past the window; a page that reads on to the
    last match makes the count exact again."""
    if "text" in wanted:
        monkeypatch.setattr(subscribers, "TEXT_DRIVE_MAX", -1)   # a common text: the walk checks it
    monkeypatch.setattr(subscribers, "COUNT_WINDOW", 40)
    search = world.calls["subscribers.search"].handler
    expected = await expected_rows(world.pool, wanted)
    assert len(expected) > 10
    for offset in (0, 5, 10, 30, 60, len(expected) - 3, len(expected) + 10):
        found = await search(Ctx(), **wanted, limit=10, offset=offset)
        assert found["rows"] == expected[offset:offset + 10], (wanted, offset)
    first = await search(Ctx(), **wanted, limit=10)
    assert first["total_estimated"] is True and first["total_capped"] is False
    assert len(expected) / 3 <= first["total"] <= 3 * len(expected), (first["total"], len(expected))
    whole = await search(Ctx(), **wanted, limit=1000)
    assert (whole["total"], whole["total_estimated"], whole["rows"]) == (len(expected), False, expected)
