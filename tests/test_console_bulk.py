"""Bulk actions in the console: filter, action, preview, confirm, and a count that changed meanwhile.

Against the real core and console (``tests.console_harness``); the preview →
confirm way once more in Chromium.  What an operator would notice: the
preview counts the accounts the filter finds and shows some of them; the
confirmation changes exactly those, in the core; when the set changed
between preview and confirmation nothing is changed and the page says why
and offers a fresh preview; a missing reason or tariff is the form's error;
a cashier reaches none of it.
"""

from __future__ import annotations

import re
from typing import Any

from console.pages.bulk import read_action
from tests.console_harness import ConsoleBrowser, ConsoleWorld, console_world  # noqa: F401  (a fixture)
from tests.test_console_card import operator_in_chromium
from tests.test_console_security import inline_parts
from tests.test_console_subscribers import UNIT, seed, seed_tariff_plan


def test_read_action_takes_only_offered_actions_and_their_arguments() -> None:
    offered = ["set_tariff", "block", "unblock"]
    assert read_action({"action": "block", "reason": " late "}, offered) == ({"action": "block", "reason": "late"}, {})
    assert read_action({"action": "block"}, offered)[1] == {"reason": "bulk.need_reason"}
    assert read_action({"action": "set_tariff", "tariff_id": "4", "start": "next_period"}, offered) == (
        {"action": "set_tariff", "tariff_id": 4, "start": "next_period"}, {})
    assert read_action({"action": "set_tariff", "tariff_id": "x"}, offered)[1] == {"tariff_id": "bulk.need_tariff"}
    assert read_action({"action": "unblock"}, ["block"]) == ({}, {"action": "bulk.need_action"})


async def debtors_and_payers(world: ConsoleWorld) -> dict[str, dict[str, int]]:
    root = world.root
    return {"d1": await seed(root, "debtor1", balance=-10 * UNIT),
            "d2": await seed(root, "debtor2", balance=-20 * UNIT),
            "p1": await seed(root, "payer1", balance=30 * UNIT),
            "p2": await seed(root, "payer2", balance=40 * UNIT)}


async def blocks_of(world: ConsoleWorld, made: dict[str, int]) -> list[str]:
    return list((await world.root.call("accounts.get", {"account_id": made["account_id"]}))["blocks"])


async def preview(browser: ConsoleBrowser, fields: dict[str, str]) -> tuple[Any, dict[str, str]]:
    page = await browser.post("/bulk/preview", fields)
    hidden = dict(re.findall(r'<input type="hidden" name="(token|expect_count)" value="([^"]*)">', page.text))
    return page, hidden


async def test_block_the_payers_after_a_preview(console_world: ConsoleWorld) -> None:
    made = await debtors_and_payers(console_world)
    browser = await console_world.operator("olga")
    form = await browser.get("/bulk")
    assert form.status == 200 and inline_parts(form.text) == []
    assert all(f'id="action-{action}"' in form.text for action in ("set_tariff", "block", "unblock"))
    page, hidden = await preview(browser, {"balance_min": "0", "q": "payer", "action": "block", "reason": "audit"})
    assert page.status == 200, page.text[:3000]
    assert "Accounts to change: 2." in page.text and "payer1" in page.text and "debtor1" not in page.text
    assert hidden["expect_count"] == "2" and hidden["token"]
    assert await blocks_of(console_world, made["p1"]) == []             # a preview changes nothing
    done = await browser.post("/bulk/apply", {**hidden, "q": "payer", "balance_min": "0", "action": "block"})
    assert done.status == 200 and 'data-test="flash"' in done.text and "Done: accounts changed: 2 " in done.text
    assert await blocks_of(console_world, made["p1"]) == ["admin"]
    assert await blocks_of(console_world, made["p2"]) == ["admin"]
    assert await blocks_of(console_world, made["d1"]) == ["system"]
    again = await browser.post("/bulk/apply", hidden)                    # the same confirmation twice
    assert again.status == 409 and "confirmed already" in again.text

    # and unblock them the same way
    page, hidden = await preview(browser, {"q": "payer", "action": "unblock"})
    done = await browser.post("/bulk/apply", hidden)
    assert "Done: accounts changed: 2 " in done.text and await blocks_of(console_world, made["p2"]) == []


async def test_a_count_that_changed_meanwhile_is_explained_and_nothing_changes(console_world: ConsoleWorld) -> None:
    made = await debtors_and_payers(console_world)
    browser = await console_world.operator("olga")
    await browser.get("/bulk")
    page, hidden = await preview(browser, {"debtors": "1", "action": "block", "reason": "debt"})
    assert hidden["expect_count"] == "2"
    await seed(console_world.root, "debtor3", balance=-5 * UNIT)        # one more debtor since the preview
    answer = await browser.post("/bulk/apply", {**hidden, "debtors": "1", "action": "block", "reason": "debt"})
    assert answer.status == 409 and 'data-test="error"' in answer.text
    assert "Nothing was changed: the filter now finds a different number of accounts than the preview showed (2)" \
        in answer.text
    assert 'id="bulk-preview">Preview again<' in answer.text and 'name="debtors" value="1" checked' in answer.text
    assert "admin" not in await blocks_of(console_world, made["d1"])
    fresh, hidden = await preview(browser, {"debtors": "1", "action": "block", "reason": "debt"})
    assert hidden["expect_count"] == "3"


async def test_set_a_tariff_from_the_next_period(console_world: ConsoleWorld) -> None:
    made = await debtors_and_payers(console_world)
    tariff = await seed_tariff_plan(console_world.root, "Winter")
    browser = await console_world.operator("olga")
    await browser.get("/bulk")
    _, hidden = await preview(browser, {"q": "payer", "action": "set_tariff", "tariff_id": str(tariff),
                                        "start": "next_period"})
    done = await browser.post("/bulk/apply", hidden)
    assert "Done: accounts changed: 2 " in done.text
    links = await console_world.root.call("tariffs.history", {"account_id": made["p1"]["account_id"]})
    assert [link["tariff"] for link in links] == ["Winter"]
    card = await browser.get(f"/subscribers/{made['p1']['user_id']}?account={made['p1']['account_id']}")
    assert re.search(r'class="tariff-scheduled">Winter', card.text)


async def test_the_form_s_own_errors(console_world: ConsoleWorld) -> None:
    browser = await console_world.operator("olga")
    await browser.get("/bulk")
    no_reason = await browser.post("/bulk/preview", {"action": "block", "reason": ""})
    assert no_reason.status == 400 and "Say why" in no_reason.text
    no_tariff = await browser.post("/bulk/preview", {"action": "set_tariff"})
    assert no_tariff.status == 400 and "Choose the tariff." in no_tariff.text
    bad_amount = await browser.post("/bulk/preview", {"action": "unblock", "balance_max": "ten"})
    assert bad_amount.status == 400 and "Type an amount" in bad_amount.text
    no_action = await browser.post("/bulk/preview", {})
    assert no_action.status == 400 and "Choose what to do." in no_action.text


async def test_a_cashier_reaches_no_bulk_action(console_world: ConsoleWorld) -> None:
    cashier = await console_world.operator("kate", groups=["cashiers"])
    await cashier.get("/subscribers")
    assert (await cashier.get("/bulk")).status == 403
    assert (await cashier.post("/bulk/preview", {"action": "block", "reason": "x"})).status == 403
    assert (await cashier.post("/bulk/apply", {"token": "x", "expect_count": "1"})).status == 403


async def test_preview_then_confirm_in_chromium(console_world: ConsoleWorld) -> None:
    made = await debtors_and_payers(console_world)
    async with operator_in_chromium(console_world, "sara", ["superusers"], "/bulk") as page:
        await page.wait_for_selector("#bulk-form")
        await page.check("#filter-debtors")
        await page.check("#action-block")
        await page.fill("#bulk-reason", "debt over 10")
        async with page.expect_navigation():
            await page.click("#bulk-preview")
        assert await page.inner_text("#preview-count") == "Accounts to change: 2."
        assert await page.locator("#preview-sample tbody tr").count() == 2
        async with page.expect_navigation():
            await page.click("#bulk-confirm")
        assert "Done: accounts changed: 2 " in await page.inner_text("#bulk-done")
    assert "admin" in await blocks_of(console_world, made["d2"])
    assert await blocks_of(console_world, made["p1"]) == []
