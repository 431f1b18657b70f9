"""The console's subscriber list: search, filters, pages, the CSV export, a new subscriber.

Against the real core and console (``tests.console_harness``), with plain
HTTP for what a page answers and Chromium for the operator's way through
search → card → payment (in ``test_console_card``).  What an operator would
notice: every kind of search text finds its subscriber; filters narrow the
list; a bad amount is the form's error, not a 500; 50 rows a page and the
total ("1,000+" past the core's count, the pages going on); the CSV opens in a spreadsheet with
the same rows, money as decimals and Cyrillic intact; a cashier sees no
"new subscriber" and no bulk action.
"""

from __future__ import annotations

import asyncio
import csv
import io
import re
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any
from urllib.parse import parse_qs

import asyncpg
import aiohttp
import pytest

from billcore.billing import subscribers
from billcore.billing.subscribers import MAX_COUNTED
from console.pages.subscriber_filter import MAX_OFFSET, PAGE_SIZE, read_filter, read_page
from console.pages.subscribers import CSV_COLUMNS, csv_lines
from tests.console_harness import ConsoleWorld, console_world, console_world_of  # noqa: F401  (a fixture)
from tests.test_console_security import inline_parts
from urfa import client as uc

UNIT = 1_000_000

# -- the filter and the CSV, without a server ----------------------------------------------

def test_filter_reads_what_an_operator_types() -> None:
    chosen = read_filter({"q": "  Иванов ", "tariff": "7", "blocked": "yes", "debtors": "on",
                          "balance_min": "-12,50", "balance_max": "1 000", "online": ""})
    assert chosen.errors == {}
    assert chosen.args == {"text": "Иванов", "tariff_id": 7, "blocked": True, "debtors": True,
                           "balance_min": -12_500_000, "balance_max": 1_000_000_000}
    assert read_filter({}).args == {} and read_filter({}).empty


def test_filter_refuses_bad_values_as_form_errors() -> None:
    chosen = read_filter({"balance_min": "12.5.0", "balance_max": "1e3", "tariff": "٣", "blocked": "maybe"})
    assert chosen.errors == {"balance_min": "filter.bad_amount", "balance_max": "filter.bad_amount",
                             "tariff": "filter.bad_tariff", "blocked": "filter.bad_choice"}
    assert "balance_min" not in chosen.args
    assert read_filter({"balance_min": "10", "balance_max": "5"}).errors == {"balance_max": "filter.bad_range"}
    assert read_filter({"balance_min": "0.0000001"}).errors   # finer than a micro-unit: refused, not rounded


def test_filter_query_keeps_the_filter_for_links() -> None:
    chosen = read_filter({"q": "a&b=c", "debtors": "1", "page": "3"})
    assert parse_qs(chosen.query(page=4)) == {"q": ["a&b=c"], "debtors": ["1"], "page": ["4"]}


def test_page_numbers_are_bounded() -> None:
    assert [read_page(raw) for raw in (None, "", "0", "2", "x", "99999999")] == [1, 1, 1, 2, 1, MAX_OFFSET // PAGE_SIZE]


def test_csv_is_read_back_by_the_csv_module() -> None:
    rows = [{"user_id": 1, "login": "ivanov", "full_name": "Иванов, Иван \"Ваня\"", "phone": "+7 900",
             "email": "i@example.org", "contract": "Д-1", "account_id": 10, "balance": -12_500_000,
             "credit": 1, "tariff_id": None, "tariff_name": None, "blocked": True, "online": False},
            {"user_id": 2, "login": "evil", "full_name": "=HYPERLINK(\"http://x\")", "phone": "", "email": "",
             "contract": None, "account_id": 11, "balance": 0, "credit": 0, "tariff_id": 3,
             "tariff_name": "Home", "blocked": False, "online": True}]
    text = csv_lines(rows[:1], header=True) + csv_lines(rows[1:])
    read = list(csv.DictReader(io.StringIO(text, newline="")))
    assert [list(row) for row in read][0] == list(CSV_COLUMNS)
    assert read[0]["full_name"] == "Иванов, Иван \"Ваня\"" and read[0]["balance"] == "-12.50"
    assert read[0]["credit"] == "0.000001" and read[0]["blocked"] == "1" and read[0]["tariff_id"] == ""
    assert read[1]["full_name"].startswith("'=")        # a spreadsheet shows it, never runs it
    assert read[1]["phone"] == "" and read[1]["contract"] == "" and read[1]["online"] == "1"


# -- seeding ---------------------------------------------------------------------------------

async def seed(root: uc.Client, login: str, *, full_name: str = "", phone: str = "", contract: str | None = None,
               balance: int = 0, ip: str | None = None) -> dict[str, int]:
    """A subscriber made by admin calls: {user_id, account_id}."""
    args: dict[str, Any] = {"login": login, "password": f"{login}-password", "full_name": full_name or login.title(),
                            "phone": phone}
    if contract is not None:
        args["external_id"] = contract
    user = await root.call("users.create", args)
    account_id = int(user["basic_account_id"])
    if balance:
        await root.call("payments.add", {"account_id": account_id, "amount": balance,
                                         "method": "bank" if balance > 0 else "correction"})
    if ip is not None:
        await root.call("bindings.add", {"account_id": account_id, "prefix": ip})
    return {"user_id": int(user["id"]), "account_id": account_id}


async def seed_many(pool: asyncpg.Pool, count: int, prefix: str) -> None:
    """``count`` plain subscribers straight into the tables (a users.create each would take minutes)."""
    async with pool.acquire() as conn, conn.transaction():
        await conn.execute(
            "WITH made AS (INSERT INTO users(login, full_name, scram_salt, scram_iterations, scram_stored_key,"
            " scram_server_key) SELECT $1 || n, 'Many ' || n, '\\x00', 4096, '\\x00', '\\x00'"
            " FROM generate_series(1, $2) n RETURNING id)"
            " INSERT INTO accounts(user_id, is_basic) SELECT id, true FROM made", prefix, count)


async def seed_tariff_plan(root: uc.Client, name: str, fee: int = 300 * UNIT) -> int:
    """A tariff of one monthly fee; its id."""
    service = await root.call("services.add", {"name": f"{name} fee", "kind": "periodic", "fee": fee,
                                               "period": {"kind": "monthly", "anchor": "2024-01-01"},
                                               "charge_mode": "start"})
    tariff = await root.call("tariffs.add", {"name": name, "service_ids": [service["id"]]})
    return int(tariff["id"])


def logins(page_text: str) -> list[str]:
    return re.findall(r'class="login">([^<]+)</a>', page_text)


async def world_of_four(world: ConsoleWorld) -> dict[str, dict[str, int]]:
    root = world.root
    return {
        "ivanov": await seed(root, "ivanov", full_name="Иванов Иван", phone="+7 900 111-22-33", contract="Д-2024-17",
                             balance=-150 * UNIT, ip="198.51.100.7"),
        "petrov": await seed(root, "petrov", full_name="Петров Пётр", phone="+7 900 444-55-66", balance=20 * UNIT),
        "smith": await seed(root, "smith", full_name="John Smith", balance=500 * UNIT, contract="C-9"),
        "zero": await seed(root, "zero", full_name="Zero Balance"),
    }


# -- the list ----------------------------------------------------------------------------------

async def test_every_kind_of_search_text_finds_its_subscriber(console_world: ConsoleWorld) -> None:
    seeded = await world_of_four(console_world)
    browser = await console_world.operator("olga")
    searches = {"ivan": ["ivanov"], "Иванов": ["ivanov"], "111-22": ["ivanov"], "Д-2024": ["ivanov"],
                "198.51.100.7": ["ivanov"], "Smith": ["smith"]}
    for text, expected in searches.items():
        page = await browser.get("/subscribers?" + read_filter({"q": text}).query())
        assert page.status == 200, (text, page.text[:500])
        assert logins(page.text) == expected, text
    # an account id is a short number: it finds the account (and whatever else holds those digits)
    by_account = await browser.get(f"/subscribers?q={seeded['smith']['account_id']}")
    assert "smith" in logins(by_account.text)
    everyone = await browser.get("/subscribers")
    assert logins(everyone.text) == ["ivanov", "petrov", "smith", "zero"]
    assert "Found: 4" in everyone.text
    row_link = f'/subscribers/{seeded["ivanov"]["user_id"]}?account={seeded["ivanov"]["account_id"]}'
    assert row_link in everyone.text
    assert inline_parts(everyone.text) == []
    assert "default-src 'none'" in everyone.headers["Content-Security-Policy"]


async def test_filters_narrow_the_list_and_a_bad_amount_is_the_form_s_error(console_world: ConsoleWorld) -> None:
    seeded = await world_of_four(console_world)
    # petrov by an operator; ivanov, in debt, by the core itself
    await console_world.root.call("blocks.set", {"account_id": seeded["petrov"]["account_id"], "reason": "test"})
    browser = await console_world.operator("olga")
    cases = {"debtors=1": ["ivanov"], "balance_min=0": ["petrov", "smith", "zero"],
             "balance_min=10&balance_max=100.5": ["petrov"], "balance_max=-150": ["ivanov"],
             "blocked=yes": ["ivanov", "petrov"], "blocked=no": ["smith", "zero"],
             "q=%2B7+900&balance_min=1": ["petrov"]}
    for query, expected in cases.items():
        page = await browser.get("/subscribers?" + query)
        assert page.status == 200 and logins(page.text) == expected, (query, logins(page.text))
    bad = await browser.get("/subscribers?balance_min=12,5,0&q=x")
    assert bad.status == 400
    assert "Type an amount like 100 or -12.50." in bad.text and 'value="12,5,0"' in bad.text
    russian = await browser.get("/subscribers?balance_max=abc", headers={"Cookie": "console_lang=ru"})
    assert "Введите сумму" in russian.text or russian.status == 400


async def test_fifty_a_page_and_a_capped_total(console_world: ConsoleWorld) -> None:
    await seed_many(console_world.core.pool, 120, "many")
    browser = await console_world.operator("olga")
    first = await browser.get("/subscribers?q=many")
    assert len(logins(first.text)) == PAGE_SIZE and "Found: 120" in first.text
    third = await browser.get("/subscribers?q=many&page=3")
    assert len(logins(third.text)) == 20 and 'rel="prev"' in third.text and 'rel="next"' not in third.text
    assert set(logins(first.text)).isdisjoint(logins(third.text))
    await seed_many(console_world.core.pool, MAX_COUNTED + 1, "lots")
    capped = await browser.get("/subscribers?q=lots")
    assert f"Found: {MAX_COUNTED:,}+" in capped.text and 'rel="next"' in capped.text
    past_the_count = await browser.get(f"/subscribers?q=lots&page={MAX_COUNTED // PAGE_SIZE + 1}")
    assert logins(past_the_count.text) == [f"lots{MAX_COUNTED + 1}"]      # the pages go on past the count
    before_it = await browser.get(f"/subscribers?q=lots&page={MAX_COUNTED // PAGE_SIZE}")
    assert 'rel="next"' in before_it.text and 'rel="next"' not in past_the_count.text


async def test_an_estimated_total_is_shown_as_about_and_the_pages_go_on(console_world: ConsoleWorld,
                                                                        monkeypatch: pytest.MonkeyPatch) -> None:
    """A rare match over a broad start (a balance range) is counted among the first rows and
    extrapolated: the page says "about", and a next page is offered while pages are full."""
    await seed_many(console_world.core.pool, 120, "many")
    await console_world.core.pool.execute("ANALYZE accounts")       # the walk's share needs the table's size
    monkeypatch.setattr(subscribers, "COUNT_WINDOW", 40)
    browser = await console_world.operator("olga")
    first = await browser.get("/subscribers?balance_max=0")
    assert len(logins(first.text)) == PAGE_SIZE and 'rel="next"' in first.text
    found = re.search(r"Found: about ([0-9,]+)", first.text)
    assert found is not None and 40 <= int(found.group(1).replace(",", "")) <= 360, first.text[:2000]
    third = await browser.get("/subscribers?balance_max=0&page=3")
    assert logins(third.text) == [f"many{n}" for n in range(101, 121)]


# -- the CSV ---------------------------------------------------------------------------------------

async def test_csv_export_is_the_filtered_list_in_a_spreadsheet_s_format(console_world: ConsoleWorld) -> None:
    seeded = await world_of_four(console_world)
    browser = await console_world.operator("olga")
    page = await browser.get("/subscribers?balance_max=100")
    link = re.search(r'href="(/subscribers/export\.csv\?[^"]*)"', page.text)
    assert link is not None and "balance_max=100" in link.group(1)
    async with browser.http.get(browser.url + link.group(1).replace("&amp;", "&")) as response:
        assert response.status == 200
        assert response.headers["Content-Type"] == "text/csv; charset=utf-8"
        disposition = response.headers["Content-Disposition"]
        assert re.fullmatch(r'attachment; filename="subscribers-\d{8}-\d{4}\.csv"', disposition)
        body = await response.read()
    assert body.startswith(b"\xef\xbb\xbf")                 # the BOM: Excel reads UTF-8 only so
    rows = list(csv.DictReader(io.StringIO(body[3:].decode("utf-8"), newline="")))
    assert [row["login"] for row in rows] == ["ivanov", "petrov", "zero"]
    ivanov = rows[0]
    assert ivanov["full_name"] == "Иванов Иван" and ivanov["contract"] == "Д-2024-17"
    assert ivanov["balance"] == "-150.00" and ivanov["account_id"] == str(seeded["ivanov"]["account_id"])
    assert rows[1]["balance"] == "20.00" and rows[2]["balance"] == "0.00"

    everything = await browser.get("/subscribers/export.csv")
    assert len(list(csv.reader(io.StringIO(everything.text.lstrip("\ufeff"), newline="")))) == 1 + 4
    bad = await browser.get("/subscribers/export.csv?balance_min=lots")
    assert bad.status == 400 and "Type an amount" in bad.text


async def test_csv_export_streams_a_large_list_whole(console_world: ConsoleWorld) -> None:
    await seed_many(console_world.core.pool, 3000, "bulkrow")
    browser = await console_world.operator("olga")
    async with browser.http.get(browser.url + "/subscribers/export.csv?q=bulkrow") as response:
        body = await response.read()
    rows = list(csv.reader(io.StringIO(body.decode("utf-8-sig"), newline="")))
    assert rows[0] == list(CSV_COLUMNS) and len(rows) == 3001
    assert len({row[1] for row in rows[1:]}) == 3000


async def test_an_export_longer_than_a_request_time_is_whole_while_the_core_keeps_sending(
        db_dsn: str, tmp_path: Path) -> None:
    """The request deadline bounds a stall, not a long export: each chunk pushes it on."""
    async with console_world_of(db_dsn, tmp_path, request_timeout=2.0) as world:
        await seed_many(world.core.pool, 4000, "slow")
        browser = await world.operator("olga")
        link = world.console.link
        real_stream = link.stream

        async def slow_stream(*args: Any, **kwargs: Any) -> AsyncIterator[Any]:
            async for chunk in real_stream(*args, **kwargs):
                await asyncio.sleep(0.8)          # each chunk well within the deadline, all of them past it
                yield chunk

        link.stream = slow_stream  # type: ignore[method-assign]
        async with browser.http.get(browser.url + "/subscribers/export.csv?q=slow") as response:
            assert response.status == 200
            assert "default-src 'none'" in response.headers["Content-Security-Policy"]
            body = await response.read()
        rows = list(csv.reader(io.StringIO(body.decode("utf-8-sig"), newline="")))
        assert len(rows) == 4001


async def test_a_download_whose_core_stalls_after_its_headers_is_cut_not_left_hanging(
        db_dsn: str, tmp_path: Path) -> None:
    """Headers out, then the core stalls past a request-time: the connection is cut, so the browser sees a
    broken download at once — not a short CSV that looks whole, nor one that never ends."""
    async with console_world_of(db_dsn, tmp_path, request_timeout=1.0) as world:
        await seed_many(world.core.pool, 3000, "stall")
        browser = await world.operator("olga")
        link = world.console.link
        real_stream = link.stream

        async def stalling_stream(*args: Any, **kwargs: Any) -> AsyncIterator[Any]:
            n = 0
            async for chunk in real_stream(*args, **kwargs):
                n += 1
                if n == 2:
                    await asyncio.sleep(30)       # far past the request time
                yield chunk

        link.stream = stalling_stream  # type: ignore[method-assign]
        started = asyncio.get_running_loop().time()
        with pytest.raises(aiohttp.ClientPayloadError):
            async with browser.http.get(browser.url + "/subscribers/export.csv?q=stall") as response:
                assert response.status == 200
                await response.read()
        assert asyncio.get_running_loop().time() - started < 15


# -- a new subscriber --------------------------------------------------------------------------------

async def test_new_subscriber_with_an_address_and_a_tariff(console_world: ConsoleWorld) -> None:
    tariff_id = await seed_tariff_plan(console_world.root, "Home 100")
    browser = await console_world.operator("olga")
    form = await browser.get("/subscribers/new")
    assert form.status == 200 and 'data-test="subscriber-form"' in form.text and "Home 100" in form.text
    short = await browser.post("/subscribers/new", {"login": "nina", "password": "short"})
    assert short.status == 400 and "8 characters" in short.text
    made = await browser.post("/subscribers/new", {
        "login": "nina", "password": "nina-password", "full_name": "Нина Сергеевна", "phone": "+7 901",
        "contract": "Д-77", "ip": "203.0.113.9", "tariff_id": str(tariff_id)})
    assert made.status == 303
    location = made.headers["Location"]
    assert re.match(r"/subscribers/\d+\?", location) and "m=message.created" in location
    card = await browser.get(location)
    assert card.status == 200
    assert "The subscriber was created." in card.text and "Нина Сергеевна" in card.text
    assert "203.0.113.9" in card.text and 'id="tariff-now">Home 100' in card.text
    again = await browser.post("/subscribers/new", {"login": "nina", "password": "nina-password"})
    assert again.status == 409 and "not created" in again.text          # the login is taken: said on the form


async def test_a_cashier_sees_no_new_subscriber_and_no_bulk(console_world: ConsoleWorld) -> None:
    await world_of_four(console_world)
    cashier = await console_world.operator("kate", groups=["cashiers"])
    page = await cashier.get("/subscribers")
    assert page.status == 200 and logins(page.text)
    assert 'href="/subscribers/new"' not in page.text and 'href="/bulk"' not in page.text
    assert (await cashier.get("/subscribers/new")).status == 403
    assert (await cashier.post("/subscribers/new", {"login": "x", "password": "x-password"})).status == 403
    assert (await cashier.get("/bulk")).status == 403
