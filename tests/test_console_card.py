"""The subscriber card: what it shows, what it changes, who may do what.

Against the real core and console (``tests.console_harness``): plain HTTP
for each section and each form, Chromium for the cashier's everyday way
(search → card → payment → the same receipt again → a kind message) and
support's block → unblock.  What an operator would notice: the card shows
the money, tariff, addresses, logins, sessions, traffic and audit trail the
core holds; a repeated external id books nothing twice and says so kindly,
marking the earlier payment; a reversal asks first; a refusal is shown
beside the card, never as an error page; a cashier sees and reaches no
block, tariff or binding control; the card's calls go out together.
"""

from __future__ import annotations

import asyncio
import contextlib
import datetime as dt
import re
import shutil
from collections.abc import AsyncIterator
from typing import Any

from console.pages.card import audit_change, tariff_state, traffic_rows
from tests.conftest import need_peer
from tests.console_harness import ConsoleWorld, console_world  # noqa: F401  (a fixture)
from tests.test_console_security import inline_parts
from tests.test_console_subscribers import UNIT, seed, seed_tariff_plan
from tests.test_portal_e2e import CHROMIUM, CHROMIUM_ARGS, DESKTOP, seed_radius_sessions
from tests.test_portal_harness import seed_tariff, seed_usage

NOW = dt.datetime(2026, 3, 15, 12, 0, tzinfo=dt.timezone.utc)


# -- the card's own shaping, without a server ------------------------------------------------

def test_tariff_state_tells_the_current_link_from_a_scheduled_one() -> None:
    day = dt.timedelta(days=1)
    links = [{"tariff_id": 1, "tariff": "Old", "valid_from": NOW - 90 * day, "valid_to": NOW - 30 * day},
             {"tariff_id": 2, "tariff": "Now", "valid_from": NOW - 30 * day, "valid_to": NOW + 17 * day},
             {"tariff_id": 3, "tariff": "Next", "valid_from": (NOW + 17 * day).isoformat(), "valid_to": None}]
    state = tariff_state(links, NOW)
    assert state["current"]["tariff"] == "Now" and [link["tariff"] for link in state["scheduled"]] == ["Next"]
    assert tariff_state([], NOW) == {"current": None, "scheduled": []}


def test_traffic_rows_keep_the_window_and_name_the_classes() -> None:
    first, last = dt.date(2026, 3, 1), dt.date(2026, 3, 30)
    chunks = [[7, 1, "2026-02-28", 5, 0], [7, 1, "2026-03-01", 100, 2], [7, -1, "2026-03-02", 60, 0],
              {"account_id": 7, "class_id": 9, "day": "2026-03-30", "quantity": 300, "amount": 4}]
    rows = traffic_rows(chunks, {1: "Internet"}, first, last)
    assert rows == [{"day": "2026-03-01", "class_id": 1, "class": "Internet", "bytes": 100, "amount": 2},
                    {"day": "2026-03-30", "class_id": 9, "class": "#9", "bytes": 300, "amount": 4}]


def test_audit_change_says_what_differs() -> None:
    assert audit_change({"phone": "1", "email": "a"}, {"phone": "2", "email": "a"}) == "phone: 1 → 2"
    assert audit_change(None, {"amount": 40_000_000, "external_id": None, "payment_id": 5}) == \
        "amount: 40.00; payment_id: 5"
    assert audit_change({"credit": 0}, {"credit": 1}) == "credit: 0.00 → 0.000001"
    assert audit_change(None, "x" * 400).endswith("…") and len(audit_change(None, "x" * 400)) <= 300


# -- a subscriber with everything ---------------------------------------------------------------

async def full_subscriber(world: ConsoleWorld) -> dict[str, Any]:
    root, pool = world.root, world.core.pool
    made = await seed(world.root, "alice", full_name="Алиса Петровна", phone="+7 900", contract="Д-1",
                      balance=250 * UNIT, ip="198.51.100.20")
    account_id = made["account_id"]
    classes = await seed_tariff(root, pool, account_id, prepaid=1 << 30)
    await seed_usage(pool, account_id, classes, world_now=300 << 20)
    await seed_radius_sessions(pool, account_id)
    payment = await root.call("payments.add", {"account_id": account_id, "amount": 40 * UNIT, "method": "cash",
                                               "external_id": "R-100"})
    return {**made, "classes": classes, "payment_id": payment["payment_id"]}


def card_url(made: dict[str, Any]) -> str:
    return f"/subscribers/{made['user_id']}?account={made['account_id']}"


async def test_the_card_shows_what_the_core_holds(console_world: ConsoleWorld) -> None:
    made = await full_subscriber(console_world)
    browser = await console_world.operator("olga")
    page = await browser.get(card_url(made))
    assert page.status == 200, page.text[:2000]
    text = page.text
    assert inline_parts(text) == [] and "default-src 'none'" in page.headers["Content-Security-Policy"]
    assert 'data-test="balance">290.00<' in text                          # 250 + 40
    assert "Алиса Петровна" in text and "Д-1" in text
    assert 'id="tariff-now">Home 100' in text
    assert "198.51.100.20" in text                                          # the IP binding
    assert "alice-pppoe" in text and "100.64.0.9" in text                   # the login and its online session
    assert "Disconnect" in text and "User-Request" in text                  # online, and the past one
    assert "R-100" in text and "40.00" in text                              # the payment
    assert re.search(r'<svg class="chart"', text) and 'data-class="Internet"' in text    # the traffic chart
    assert 'data-test="audit"' in text and "payments.add" in text           # who did it
    assert 'data-test="payment-form"' in text and 'data-test="block-form"' in text
    # the basic account is shown without ?account
    plain = await browser.get(f"/subscribers/{made['user_id']}")
    assert 'data-test="balance">290.00<' in plain.text
    # another subscriber's account under this user's URL is no card
    other = await seed(console_world.root, "bob")
    assert (await browser.get(f"/subscribers/{other['user_id']}?account={made['account_id']}")).status == 404
    assert (await browser.get("/subscribers/999999")).status in (404, 409)
    # a notice is one of the card's own, whatever the URL says
    for forged in ("card.title", "message.nonexistent", "{payment}"):
        shown = await browser.get(card_url(made) + f"&m={forged}&payment=1")
        assert shown.status == 200 and 'id="notice"' not in shown.text, forged


async def test_the_card_asks_its_calls_together(console_world: ConsoleWorld) -> None:
    made = await full_subscriber(console_world)
    browser = await console_world.operator("olga")
    link = console_world.console.link
    in_flight = peak = 0
    real_call = link.call

    async def counted(*args: Any, **kwargs: Any) -> Any:
        nonlocal in_flight, peak
        in_flight += 1
        peak = max(peak, in_flight)
        try:
            return await real_call(*args, **kwargs)
        finally:
            in_flight -= 1

    link.call = counted          # type: ignore[method-assign]
    try:
        assert (await browser.get(card_url(made))).status == 200
    finally:
        link.call = real_call    # type: ignore[method-assign]
    assert peak >= 8, peak       # users.get, accounts.get, blocks, payments, ledger, tariffs, bindings, … at once


async def test_every_subscriber_page_passes_the_csp_check_in_both_languages(console_world: ConsoleWorld) -> None:
    made = await full_subscriber(console_world)
    browser = await console_world.operator("olga")
    card = card_url(made)
    reverse = f"/subscribers/{made['user_id']}/payments/{made['payment_id']}/reverse?account={made['account_id']}"
    pages = {path: await browser.get(path) for path in (
        "/subscribers", "/subscribers?balance_min=bad", "/subscribers/new", card, card + "&ledger=2&audit=2&past=2",
        reverse, "/bulk")}
    pages["bulk preview"] = await browser.post("/bulk/preview", {"q": "alice", "action": "unblock"})
    pages["card refusal"] = await browser.post(f"/subscribers/{made['user_id']}/bindings",
                                               {"account_id": str(made["account_id"]), "ip": "nonsense"})
    for name, page in pages.items():
        assert page.status in (200, 400, 409), (name, page.status)
        assert inline_parts(page.text) == [], (name, inline_parts(page.text))
        csp = page.headers["Content-Security-Policy"]
        assert "default-src 'none'" in csp and "unsafe-inline" not in csp, name
    assert "Accounts to change: 1." in pages["bulk preview"].text

    browser.http.cookie_jar.update_cookies({"console_lang": "ru"})
    russian = {path: (await browser.get(path)).text for path in ("/subscribers?balance_min=bad", card, "/bulk")}
    assert "Введите сумму, например 100 или -12.50." in russian["/subscribers?balance_min=bad"]
    assert "Сторнировать" in russian[card] and "Принять" in russian[card]
    assert "Журнал изменений" in russian[card] and "Массовые действия" in russian["/bulk"]


# -- payments --------------------------------------------------------------------------------------

async def test_a_repeated_external_id_is_answered_kindly(console_world: ConsoleWorld) -> None:
    made = await seed(console_world.root, "carl", balance=10 * UNIT)
    browser = await console_world.operator("olga")
    card = card_url(made)
    await browser.get(card)
    fields = {"account_id": str(made["account_id"]), "amount": "100.50", "method": "cash", "external_id": "CHK-1"}
    taken = await browser.post(f"/subscribers/{made['user_id']}/payments", fields)
    assert taken.status == 303 and "m=message.payment_taken" in taken.headers["Location"]
    first = await browser.get(taken.headers["Location"])
    assert "The payment was taken." in first.text and 'data-test="balance">110.50<' in first.text
    payment_id = int(re.search(r"payment=(\d+)", taken.headers["Location"]).group(1))  # type: ignore[union-attr]

    again = await browser.post(f"/subscribers/{made['user_id']}/payments", fields)
    assert again.status == 303 and "m=message.payment_repeated" in again.headers["Location"]
    second = await browser.get(again.headers["Location"])
    assert second.status == 200
    assert f"This payment was already taken (payment #{payment_id}); nothing was booked twice." in second.text
    assert re.search(rf'class="[^"]*hot[^"]*" data-payment="{payment_id}"', second.text)
    assert 'data-test="balance">110.50<' in second.text                 # booked once
    payments = await console_world.root.call("payments.list", {"account_id": made["account_id"]})
    assert [row["external_id"] for row in payments].count("CHK-1") == 1

    # the same receipt number for another amount is someone else's payment: said beside the form
    other = await browser.post(f"/subscribers/{made['user_id']}/payments", {**fields, "amount": "5"})
    assert other.status == 409 and "This external id belongs to another payment already" in other.text
    assert 'data-test="error"' in other.text and 'value="CHK-1"' in other.text   # what was typed stays
    bad = await browser.post(f"/subscribers/{made['user_id']}/payments", {**fields, "amount": "12.345.6"})
    assert bad.status == 400 and "Type an amount like 100 or 12.50." in bad.text


async def test_a_payment_is_reversed_after_a_confirmation(console_world: ConsoleWorld) -> None:
    made = await seed(console_world.root, "dora", balance=70 * UNIT)
    payments = await console_world.root.call("payments.list", {"account_id": made["account_id"]})
    payment_id = payments[0]["id"]
    browser = await console_world.operator("olga")
    confirm_url = f"/subscribers/{made['user_id']}/payments/{payment_id}/reverse?account={made['account_id']}"
    card = await browser.get(card_url(made))
    assert confirm_url in card.text.replace("&amp;", "&")
    confirm = await browser.get(confirm_url)
    assert confirm.status == 200 and "Reverse payment #" in confirm.text and "70.00" in confirm.text
    done = await browser.post(f"/subscribers/{made['user_id']}/payments/{payment_id}/reverse",
                              {"account_id": str(made["account_id"]), "reason": "wrong account"})
    assert done.status == 303 and "payment_reversed" in done.headers["Location"]
    after = await browser.get(done.headers["Location"])
    assert 'data-test="balance">0.00<' in after.text and "wrong account" in after.text
    unknown = f"/subscribers/{made['user_id']}/payments/987654/reverse?account={made['account_id']}"
    assert (await browser.get(unknown)).status == 404


# -- everything else an operator changes ---------------------------------------------------------

async def test_the_card_s_forms_change_the_core(console_world: ConsoleWorld) -> None:
    root = console_world.root
    made = await seed(root, "erik", balance=5 * UNIT)
    account, user_id = made["account_id"], made["user_id"]
    cheap, dear = await seed_tariff_plan(root, "Cheap", 100 * UNIT), await seed_tariff_plan(root, "Dear", 900 * UNIT)
    browser = await console_world.operator("olga")
    await browser.get(card_url(made))
    base = f"/subscribers/{user_id}"
    acc = {"account_id": str(account)}

    async def posted(path: str, fields: dict[str, str], message: str) -> str:
        answer = await browser.post(base + path, {**acc, **fields})
        assert answer.status == 303, (path, answer.status, answer.text[:3000])
        assert f"m=message.{message}" in answer.headers["Location"], answer.headers["Location"]
        return (await browser.get(answer.headers["Location"])).text

    no_reason = await browser.post(base + "/block", {**acc, "reason": " "})
    assert no_reason.status == 400 and "Say why" in no_reason.text
    text = await posted("/block", {"reason": "asked by phone"}, "blocked")
    assert "asked by phone" in text and 'data-test="blocked"' in text
    assert (await root.call("accounts.get", {"account_id": account}))["blocks"] == ["admin"]
    text = await posted("/unblock", {"kind": "admin"}, "unblocked")
    assert (await root.call("accounts.get", {"account_id": account}))["blocks"] == []

    await posted("/credit", {"credit": "250.75"}, "credit_set")
    assert (await root.call("accounts.get", {"account_id": account}))["credit"] == 250_750_000
    await posted("/promised", {"amount": "", "days": "3", "reason": "till Friday"}, "promised_given")
    assert (await root.call("accounts.get", {"account_id": account}))["promised_taken"] is True

    text = await posted("/tariff", {"tariff_id": str(cheap), "start": "now"}, "tariff_set")
    assert 'id="tariff-now">Cheap' in text
    text = await posted("/tariff", {"tariff_id": str(dear), "start": "next_period"}, "tariff_scheduled")
    assert 'id="tariff-now">Cheap' in text and re.search(r'class="tariff-scheduled">Dear', text)

    text = await posted("/bindings", {"ip": "192.0.2.55"}, "bound")
    binding = (await root.call("bindings.list", {"account_id": account}))[0]
    assert binding["prefix"].startswith("192.0.2.55")
    await posted(f"/bindings/{binding['id']}/end", {}, "unbound")
    assert (await root.call("bindings.list", {"account_id": account}))[0]["valid_to"] is not None
    refused = await browser.post(base + "/bindings", {**acc, "ip": "not an address"})
    assert refused.status == 409 and 'data-test="error"' in refused.text and "Not done:" in refused.text

    await posted("/radius", {"login": "erik-pppoe", "password": "radius-secret"}, "radius_added")
    link = (await root.call("radius.link_list", {"account_id": account}))[0]
    await posted(f"/radius/{link['id']}", {"static_ip": "100.64.1.5", "disabled": "1"}, "radius_saved")
    link = (await root.call("radius.link_list", {"account_id": account}))[0]
    assert link["static_ip"] == "100.64.1.5" and link["disabled"] is True

    await posted("/contacts", {"full_name": "Эрик", "phone": "+7 999", "email": "e@example.org", "address": "",
                               "external_id": "Д-5"}, "contacts_saved")
    user = await root.call("users.get", {"user_id": user_id})
    assert (user["full_name"], user["phone"], user["external_id"]) == ("Эрик", "+7 999", "Д-5")
    short = await browser.post(base + "/password", {**acc, "password": "short"})
    assert short.status == 400
    await posted("/password", {"password": "a-new-password"}, "password_set")

    audit = await browser.get(card_url(made) + "&audit=1")
    for action in ("blocks.set", "blocks.lift", "accounts.set_credit", "payments.promised", "users.edit"):
        assert action in audit.text, action
    assert "olga" in audit.text and "127.0.0.1" in audit.text         # who, and from where


async def test_disconnect_asks_the_radius_side(console_world: ConsoleWorld) -> None:
    made = await seed(console_world.root, "fred")
    await seed_radius_sessions(console_world.core.pool, made["account_id"])
    browser = await console_world.operator("olga")
    card = await browser.get(card_url(made))
    session_id = int(re.search(r'data-session="(\d+)"', card.text).group(1))  # type: ignore[union-attr]
    answer = await browser.post(f"/subscribers/{made['user_id']}/sessions/{session_id}/disconnect",
                                {"account_id": str(made["account_id"])})
    assert answer.status == 303 and "disconnect_sent" in answer.headers["Location"]
    gone = await browser.post(f"/subscribers/{made['user_id']}/sessions/987654/disconnect",
                              {"account_id": str(made["account_id"])})
    assert gone.status == 409 and "Not done:" in gone.text


async def test_a_cashier_takes_payments_and_reaches_nothing_else(console_world: ConsoleWorld) -> None:
    made = await seed(console_world.root, "gina", balance=UNIT)
    tariff = await seed_tariff_plan(console_world.root, "Home")
    cashier = await console_world.operator("kate", groups=["cashiers"])
    card = await cashier.get(card_url(made))
    assert card.status == 200 and 'data-test="payment-form"' in card.text
    for hidden in ('data-test="block-form"', 'data-test="tariff-form"', 'data-test="binding-form"',
                   'action="/subscribers/%d/password"' % made["user_id"], "radius-form"):
        assert hidden not in card.text, hidden
    acc = {"account_id": str(made["account_id"])}
    base = f"/subscribers/{made['user_id']}"
    for path, fields in (("/block", {"reason": "x"}), ("/unblock", {}), ("/tariff", {"tariff_id": str(tariff)}),
                         ("/bindings", {"ip": "192.0.2.1"}), ("/password", {"password": "long-enough"}),
                         ("/radius", {"login": "x", "password": "y"})):
        answer = await cashier.post(base + path, {**acc, **fields})
        assert answer.status == 403, path
    assert (await console_world.root.call("accounts.get", {"account_id": made["account_id"]}))["blocks"] == []
    taken = await cashier.post(base + "/payments", {**acc, "amount": "3", "method": "cash"})
    assert taken.status == 303


async def test_support_blocks_and_disconnects_but_takes_no_payment(console_world: ConsoleWorld) -> None:
    made = await seed(console_world.root, "ivy", balance=UNIT)
    support = await console_world.operator("sam", groups=["support"])
    card = await support.get(card_url(made))
    assert card.status == 200
    assert 'data-test="block-form"' in card.text and 'data-test="payment-form"' not in card.text
    assert "/reverse?" not in card.text
    acc = {"account_id": str(made["account_id"])}
    assert (await support.post(f"/subscribers/{made['user_id']}/payments", {**acc, "amount": "5", "method": "cash"})
            ).status == 403
    blocked = await support.post(f"/subscribers/{made['user_id']}/block", {**acc, "reason": "line check"})
    assert blocked.status == 303


# -- in a real browser ----------------------------------------------------------------------------------

@contextlib.asynccontextmanager
async def operator_in_chromium(world: ConsoleWorld, login: str, groups: list[str], first_path: str
                               ) -> AsyncIterator[Any]:
    """Chromium with an operator logged in through the console's login page, at ``first_path``;
    a confirmation dialog is accepted, and a CSP violation fails the test."""
    need_peer(shutil.which(CHROMIUM) is not None, f"{CHROMIUM} is not installed (apt-get install chromium)")
    from playwright.async_api import ViewportSize, async_playwright

    password = await world.admin(login, groups=groups)
    async with async_playwright() as playwright:
        chromium = await playwright.chromium.launch(executable_path=CHROMIUM, args=CHROMIUM_ARGS)
        try:
            viewport = ViewportSize(width=DESKTOP["width"], height=DESKTOP["height"])
            context = await chromium.new_context(viewport=viewport, locale="en-US")
            page = await context.new_page()
            page.on("dialog", lambda dialog: asyncio.ensure_future(dialog.accept()))
            violations: list[str] = []
            page.on("console", lambda message: violations.append(message.text)
                    if "Content Security Policy" in message.text else None)
            await page.goto(world.url + first_path)
            await page.fill("#login", login)
            await page.fill("#password", password)
            async with page.expect_navigation():
                await page.click("#login-submit")
            yield page
            assert violations == []
        finally:
            await chromium.close()


async def test_search_card_payment_and_the_same_receipt_again_in_chromium(console_world: ConsoleWorld) -> None:
    made = await seed(console_world.root, "harriet", full_name="Harriet Vane", phone="+7 955 000", balance=UNIT)
    await seed(console_world.root, "harold", full_name="Harold Other")
    async with operator_in_chromium(console_world, "sara", ["superusers"], "/subscribers") as page:
        await page.wait_for_selector('[data-test="search"]')
        await page.fill("#filter-q", "Vane")
        await page.click("#search")
        await page.wait_for_selector('[data-test="result"]')
        assert await page.locator('[data-test="result"]').count() == 1
        await page.click('[data-test="result"] a.login')
        await page.wait_for_selector('[data-test="balance"]')
        assert await page.inner_text('[data-test="balance"]') == "1.00"

        for _ in range(2):        # the same receipt twice: booked once, the second time said kindly
            await page.fill("#payment-amount", "25")
            await page.select_option("#payment-method", "cash")
            await page.fill("#payment-external-id", "KASSA-42")
            async with page.expect_navigation():
                await page.click("#take-payment")
        assert "This payment was already taken" in await page.inner_text("#notice")
        assert await page.inner_text('[data-test="balance"]') == "26.00"
        assert await page.locator("#payment-list tr.hot").count() == 1

        # block (the button asks first) and unblock
        await page.fill("#block-form input[name=reason]", "unpaid router")
        async with page.expect_navigation():
            await page.click("#block")
        await page.wait_for_selector('[data-test="blocked"]')
        assert "unpaid router" in await page.inner_text("#blocks")
        async with page.expect_navigation():
            await page.click("#unblock-admin")
        await page.wait_for_selector("#no-blocks")
    assert (await console_world.root.call("accounts.get", {"account_id": made["account_id"]}))["blocks"] == []
