"""Small things a subscriber notices in the office, in headless Chromium (Debian's, through
Playwright) against the real core call layer on a real PostgreSQL: a first visit is a plain
login page, and the promised-payment button goes once this month's is taken — by the
subscriber or granted by an administrator."""

from __future__ import annotations

import shutil
from typing import Any

import aiohttp

from tests.conftest import need_peer
from tests.test_portal_e2e import CHROMIUM, CHROMIUM_ARGS, DESKTOP, world  # noqa: F401  (world is a fixture)
from tests.test_portal_harness import live_core  # noqa: F401  (a fixture world needs)


async def test_first_visit_is_a_plain_login_page(world: dict[str, Any]) -> None:  # noqa: F811
    url = world["office"].url
    async with aiohttp.ClientSession(cookie_jar=aiohttp.CookieJar(unsafe=True)) as http:
        for path in ("/", "/traffic", "/history"):
            async with http.get(url + path, allow_redirects=False) as r:
                assert r.status == 303 and r.headers["Location"] == "/login", path
        async with http.get(url + "/login") as r:
            assert "Your session has ended" not in await r.text()
    need_peer(shutil.which(CHROMIUM) is not None, f"{CHROMIUM} is not installed (apt-get install chromium)")
    from playwright.async_api import async_playwright

    async with async_playwright() as p:
        browser = await p.chromium.launch(executable_path=CHROMIUM, args=CHROMIUM_ARGS)
        try:
            page = await (await browser.new_context(viewport=DESKTOP, locale="en-US")).new_page()
            await page.goto(url + "/")
            assert page.url == url + "/login"
            assert await page.locator(".notice").count() == 0
            assert "Your session has ended" not in await page.inner_text("main")
            assert await page.locator("input[name=login]").count() == 1
        finally:
            await browser.close()


async def test_promised_button_goes_once_taken(world: dict[str, Any]) -> None:  # noqa: F811
    need_peer(shutil.which(CHROMIUM) is not None, f"{CHROMIUM} is not installed (apt-get install chromium)")
    from playwright.async_api import async_playwright

    url = world["office"].url
    # an administrator grants bob his promised payment on the phone (payments.promised)
    granted = await world["admin"].call("payments.promised", {"account_id": world["bob"], "amount": 40_000_000,
                                                              "reason": "phoned in"})
    assert granted["amount"] == 40_000_000
    async with async_playwright() as p:
        browser = await p.chromium.launch(executable_path=CHROMIUM, args=CHROMIUM_ARGS)
        try:
            async def office(login: str, password: str) -> Any:
                page = await (await browser.new_context(viewport=DESKTOP, locale="en-US")).new_page()
                await page.goto(url + "/login")
                await page.fill("input[name=login]", login)
                await page.fill("input[name=password]", password)
                await page.click("button[type=submit]")
                await page.wait_for_selector("#balance")
                return page

            alice = await office("alice", "alice-password")
            assert await alice.locator("#take-promised").count() == 1
            assert await alice.inner_text("#promised") == "0.00"
            await alice.click("#take-promised")
            await alice.wait_for_selector("text=A promised payment is credited to your account.")
            assert await alice.inner_text("#promised") == "100.00"
            assert await alice.locator("#take-promised").count() == 0
            assert await alice.inner_text("#promised-used") == "This month's promised payment has been taken."
            await alice.reload()
            assert await alice.locator("#take-promised").count() == 0

            bob = await office("bob", "bob-password")
            assert await bob.inner_text("#promised") == "40.00"
            assert await bob.locator("#take-promised").count() == 0
            assert await bob.locator("#promised-used").count() == 1
        finally:
            await browser.close()
