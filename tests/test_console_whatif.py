"""The console's what-if page against the real core (``tests.console_harness``): plain HTTP for the figures
and refusals, Debian's Chromium (Playwright) for the form an operator fills in.

What an operator would notice: the month re-rated under the tariff the accounts were on shows what they
were charged and a zero difference; a cheaper tariff shows the hand-computed figures; a month not over yet
is refused in words above the form; an operator without ``reports.read`` neither sees the page in the
navigation nor reaches it by URL."""

from __future__ import annotations

from typing import Any

from billcore.common.money import format_money
from tests.console_harness import ConsoleWorld, chromium, console_world, submit_login  # noqa: F401  (a fixture)
from tests.test_whatif import booked_in_november, history


async def seeded(world: ConsoleWorld) -> dict[str, Any]:
    h = await history(world.core.pool)
    async with world.core.pool.acquire() as conn:
        h["posted"] = {acc: await booked_in_november(conn, h[acc]) for acc in ("a1", "a2", "a3")}
    return h


def money(micro: int) -> str:
    return format_money(micro, group="\u202f")


async def test_whatif_page_figures_and_refusals(console_world: ConsoleWorld) -> None:
    h = await seeded(console_world)
    posted = h["posted"]
    browser = await console_world.operator("wanda")
    page = await browser.get("/whatif")
    assert page.status == 200 and 'id="whatif-form"' in page.text and 'data-test="nav-whatif"' in page.text
    assert 'id="whatif-totals"' not in page.text

    own = await browser.get(f"/whatif?tariff={h['home']}&month=2026-11&who=of_tariff&of_tariff={h['home']}")
    assert own.status == 200, own.text[:2000]
    assert f'data-test="whatif-{h["a1"]}"' in own.text and f'data-test="whatif-{h["a3"]}"' not in own.text
    assert f'data-test="total-charged">{money(posted["a1"] + posted["a2"])}<' in own.text
    assert f'data-test="total-difference">{money(0)}<' in own.text

    cheap = await browser.get(f"/whatif?tariff={h['cheap']}&month=2026-11&who=account&account={h['a1']}")
    assert cheap.status == 200
    assert f'data-test="total-would-pay">{money(5_064_000)}<' in cheap.text
    assert f'data-test="total-difference">{money(5_064_000 - posted["a1"])}<' in cheap.text

    for query, words in ((f"tariff={h['home']}&month=2099-01&who=all", "future"),
                         (f"tariff={h['home']}&month=11.2026&who=all", "YYYY-MM")):
        refused = await browser.get(f"/whatif?{query}")
        assert refused.status == 400 and 'data-test="error"' in refused.text and words in refused.text, refused.text[:3000]
        assert 'id="whatif-totals"' not in refused.text

    await console_world.group("cashiers-only", ["payments.read", "users.read"])
    cashier = await console_world.operator("carl", ["cashiers-only"])
    home = await cashier.get("/")
    assert 'data-test="nav-whatif"' not in home.text
    assert (await cashier.get(f"/whatif?tariff={h['home']}&month=2026-11&who=all")).status == 403


async def test_whatif_form_in_chromium(console_world: ConsoleWorld) -> None:
    h = await seeded(console_world)
    password = await console_world.admin("vera")
    async with chromium(locale="en-US") as context:
        page = await context.new_page()
        await submit_login(page, console_world.url, "vera", password)
        await page.wait_for_selector("#operator")
        await page.click('[data-test="nav-whatif"]')
        await page.select_option("#tariff", str(h["dear"]))
        await page.fill("#month", "2026-11")
        await page.check('input[name="who"][value="all"]')
        await page.click("#run-whatif")
        await page.wait_for_selector("#whatif-totals")
        assert await page.locator("#whatif-rows tbody tr").count() == 3
        assert (await page.inner_text('[data-test="total-would-pay"]')).strip() == money(
            20_252_000 + 14_060_000 + 20_000_000)
        assert (await page.inner_text('[data-test="total-accounts"]')).strip() == "3"
