"""The console's /reports pages against a real core: a form per report, an inline SVG chart, the table and a CSV
download; offered only to an operator whose call table has the reports; and in headless Chromium."""

from __future__ import annotations

import csv
import os
import io
import re
from typing import Any

from tests.console_harness import ConsoleWorld, chromium, console_world, submit_login  # noqa: F401  (a fixture)


async def seed_payments(world: ConsoleWorld) -> int:
    """A subscriber who paid 12.50 in cash and 7.25 by card today (the card payment then cancelled)."""
    user = await world.root.call("users.create", {"login": "zoya", "password": "zoya-portal-pw", "full_name": "Зоя"})
    account = user["basic_account_id"]
    await world.root.call("payments.add", {"account_id": account, "amount": 12_500_000, "method": "cash"})
    card = await world.root.call("payments.add", {"account_id": account, "amount": 7_250_000, "method": "card"})
    await world.root.call("payments.cancel", {"payment_id": card["payment_id"], "reason": "twice"})
    return int(account)


async def test_payments_report_page_chart_table_and_csv(console_world: ConsoleWorld) -> None:
    await seed_payments(console_world)
    reader = await console_world.operator("lena", groups=["accountants"])
    home = await reader.get("/")
    assert 'href="/reports"' in home.text
    index = await reader.get("/reports")
    assert index.status == 200 and 'data-test="report-payments"' in index.text and 'data-test="report-flows"' in index.text

    page = await reader.get("/reports/payments?group=method")       # this month, by default
    assert page.status == 200, page.text[:2000]
    assert '<svg' in page.text and 'data-test="chart"' in page.text and 'data-label="cash"' in page.text
    cells = re.findall(r"<tr>((?:<td>[^<]*</td>)+)</tr>", page.text)
    rows = [re.findall(r"<td>([^<]*)</td>", row) for row in cells]
    assert ["card", "1", "7.25", "1", "7.25", "0.00"] in rows and ["cash", "1", "12.50", "0", "0.00", "12.50"] in rows

    link = re.search(r'href="(/reports/payments\.csv\?[^"]+)"', page.text)
    assert link, page.text[:3000]
    download = await reader.get(link.group(1).replace("&amp;", "&"))
    assert download.status == 200
    got = list(csv.reader(io.StringIO(download.text.lstrip("\ufeff"))))
    assert got[0] == ["key", "payments", "paid", "cancellations", "cancelled", "net"]
    assert ["cash", "1", "12.50", "0", "0.00", "12.50"] in got

    # the core's refusal is shown on the form, not a 500
    bad = await reader.get("/reports/payments?since=2024-05-01&until=2024-01-01")
    assert bad.status == 400 and 'data-test="error"' in bad.text and "since must be before until" in bad.text
    debtors = await reader.get("/reports/debtors")
    assert debtors.status == 200 and ("report-empty" in debtors.text or "<svg" in debtors.text)


async def test_reports_are_not_offered_without_the_right(console_world: ConsoleWorld) -> None:
    cashier = await console_world.operator("kira", groups=["cashiers"])
    home = await cashier.get("/")
    assert 'href="/reports"' not in home.text
    assert (await cashier.get("/reports")).status == 403
    assert (await cashier.get("/reports/payments")).status == 403
    assert (await cashier.get("/reports/payments.csv")).status == 403


async def test_a_report_in_chromium(console_world: ConsoleWorld) -> None:
    await seed_payments(console_world)
    password = await console_world.admin("mila", groups=["accountants"])
    async with chromium(locale="en-US") as context:
        page: Any = await context.new_page()
        await submit_login(page, console_world.url, "mila", password)
        await page.wait_for_selector("#operator")
        await page.click('[data-test="nav-reports"]')
        await page.click('[data-test="report-payments"]')
        await page.select_option("#opt-group", "method")
        await page.click("#report-run")
        await page.wait_for_selector("#chart svg")
        bars = await page.locator('#chart svg rect[data-label="cash"]').count()
        assert bars >= 1
        box = await page.locator('#chart svg rect[data-label="cash"]').first.bounding_box()
        assert box is not None and box["height"] > 10             # drawn, and tall: the biggest net of the two
        table = await page.inner_text("#report-table")
        assert "12.50" in table and "cash" in table
        assert "group=method" in page.url
        if os.environ.get("REPORTS_SHOT"):
            await page.screenshot(path=os.environ["REPORTS_SHOT"], full_page=True)
