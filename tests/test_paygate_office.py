"""Pay online end to end: a real ``billcore serve`` with the web office and the ``paygate`` edge on,
the gateway simulator (tests/gateway_sim.py) in this process, and a subscriber in headless Chromium
(Debian's, through Playwright) and, the same round trip, in a plain HTTP client.

What a subscriber would notice: from the office they enter an amount, land on the gateway's pay page
for exactly that amount and account, pay, and come back to a page that shows the payment booked and
their new balance; the gateway's repeated callback books nothing more.  A forged order is refused by
the gateway, an amount the currency cannot carry by the office, a forged return link shows nothing.
"""

from __future__ import annotations

import re
import shutil
from collections.abc import AsyncIterator
from dataclasses import dataclass
from pathlib import Path
from urllib.parse import parse_qsl, urlsplit

import aiohttp
import pytest

from tests.conftest import free_port, need_peer
from tests.gateway_sim import GatewaySim
from tests.running import serving_with_root
from tests.test_portal_e2e import CHROMIUM, CHROMIUM_ARGS, DESKTOP, SHOTS, _csrf, http_login
from urfa.client import Client

SECRET = b"office-sim-secret-0123456789abcdef"
ROOT_PW = "root-payonline-pw-1"
UNIT = 1_000_000


@dataclass
class Office:
    url: str
    admin: Client
    sim: GatewaySim
    account: int


@pytest.fixture
async def office(tmp_path: Path, db_dsn: str) -> AsyncIterator[Office]:
    secret_file = tmp_path / "sim.secret"
    secret_file.write_text(SECRET.decode())
    secret_file.chmod(0o600)
    portal_port, paygate_port, sim_port = free_port(), free_port(), free_port()
    paygate = {"enabled": True, "port": paygate_port, "office_gateway": "sim",
               "gateways": [{"name": "sim", "secret_file": str(secret_file),
                             "pay_url": f"http://127.0.0.1:{sim_port}/pay"}]}
    portal = {"enabled": True, "port": portal_port, "cookie_secure": False}
    sim = await GatewaySim("sim", SECRET, f"http://127.0.0.1:{paygate_port}/callback/sim").start(sim_port)
    try:
        async with serving_with_root("payonline", "portal", ROOT_PW, db_dsn, paygate=paygate,
                                     portal=portal) as (bc, admin):
            bc.wait_for(r'role=paygate .*msg="paygate serving"', timeout=60)
            user = await admin.call("users.create", {"login": "alice", "password": "alice-password-1"})
            account = int(user["basic_account_id"])
            await admin.call("payments.add", {"account_id": account, "amount": 10 * UNIT, "method": "cash"})
            yield Office(f"http://127.0.0.1:{portal_port}", admin, sim, account)
    finally:
        await sim.stop()


async def gateway_payments(admin: Client, account: int) -> list[tuple[int, str]]:
    rows = await admin.call("payments.list", {"account_id": account})
    return [(row["amount"], row["method"]) for row in rows if row["method"].startswith("gateway:")]


def callbacks_said_once(sim: GatewaySim) -> None:
    """The callback and the gateway's retry of it: both 200, one payment, the second a duplicate."""
    assert [c["status"] for c in sim.callbacks] == [200, 200], sim.callbacks
    first, again = (c["answer"] for c in sim.callbacks)
    assert first["payment_id"] == again["payment_id"] and (first["duplicate"], again["duplicate"]) == (False, True)


async def test_pay_online_in_chromium(office: Office) -> None:
    need_peer(shutil.which(CHROMIUM) is not None, f"{CHROMIUM} is not installed (apt-get install chromium)")
    from playwright.async_api import async_playwright

    SHOTS.mkdir(parents=True, exist_ok=True)
    async with async_playwright() as p:
        browser = await p.chromium.launch(executable_path=CHROMIUM, args=CHROMIUM_ARGS)
        try:
            page = await (await browser.new_context(viewport=DESKTOP, locale="en-US")).new_page()
            await page.goto(office.url + "/login")
            await page.fill("input[name=login]", "alice")
            await page.fill("input[name=password]", "alice-password-1")
            await page.click("button[type=submit]")
            await page.wait_for_selector("#balance")
            await page.click("#nav-pay")
            await page.wait_for_selector("#pay-form")
            await page.fill("input[name=amount]", "250,5")          # a decimal comma is fine
            await page.screenshot(path=str(SHOTS / "pay-online-desktop.png"))
            async with page.expect_navigation():
                await page.click("#pay-submit")
            assert page.url.startswith(office.sim.url + "/pay?"), page.url
            assert "Pay 250.50 RUB" in await page.inner_text("h1")
            assert await page.inner_text("#account") == f"Account {office.account}"
            await page.click("#pay")                                 # the gateway calls back, then sends us home
            await page.wait_for_selector("#pay-booked", timeout=20_000)
            assert "250.50" in await page.inner_text("#pay-booked")
            assert await page.inner_text("#pay-balance") == "260.50"
            assert page.url.startswith(office.url + "/pay/return?")
            await page.screenshot(path=str(SHOTS / "pay-online-booked-desktop.png"))
        finally:
            await browser.close()
    callbacks_said_once(office.sim)
    assert await gateway_payments(office.admin, office.account) == [(250_500_000, "gateway:sim")]


async def test_pay_online_over_plain_http(office: Office) -> None:
    jar = aiohttp.CookieJar(unsafe=True)        # cookies for 127.0.0.1, as a browser keeps them
    async with aiohttp.ClientSession(cookie_jar=jar) as http:
        answer = await http_login(http, office.url, "alice", "alice-password-1")
        assert answer.status == 303
        async with http.get(office.url + "/pay") as r:
            html = await r.text()
            assert "form-action 'self' " + office.sim.url in r.headers["Content-Security-Policy"]
        token = _csrf(html)
        # an amount the currency cannot carry is the form again, with a message
        async with http.post(office.url + "/pay", data={"csrf": token, "amount": "1.005"},
                             allow_redirects=False) as r:
            assert r.status == 400 and 'id="pay-error"' in await r.text()
        async with http.post(office.url + "/pay", data={"csrf": token, "amount": "99.90"},
                             allow_redirects=False) as r:
            assert r.status == 303
            to_gateway = r.headers["Location"]
        order = dict(parse_qsl(urlsplit(to_gateway).query))
        assert (order["account"], order["amount"], order["currency"]) == (str(office.account), "99.90", "RUB")
        # a forged order (another amount, the same signature) is refused by the gateway
        forged = to_gateway.replace("amount=99.90", "amount=0.01")
        async with http.get(forged) as r:
            assert r.status == 403
        async with http.get(to_gateway) as r:
            page = await r.text()
        fields = dict(re.findall(r'name="([a-z_]+)" value="([^"]*)"', page))
        fields = {k: v.replace("&amp;", "&") for k, v in fields.items()}
        async with http.post(office.sim.url + "/pay/confirm", data=fields, allow_redirects=False) as r:
            assert r.status == 303
            back = r.headers["Location"]
        assert back.startswith(office.url + "/pay/return?")
        async with http.get(back) as r:
            text = await r.text()
            assert r.status == 200 and 'id="pay-booked"' in text, text[:3000]
            assert "99.90" in text
        # a return link whose amount was edited shows nothing
        async with http.get(back.replace("amount=99900000", "amount=1000000000")) as r:
            assert r.status == 404
    callbacks_said_once(office.sim)
    assert await gateway_payments(office.admin, office.account) == [(99_900_000, "gateway:sim")]

