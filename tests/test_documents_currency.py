"""One currency per installation, shown with its own minor units on every page ([billing] currency and
minor_units): the money filter, the console's amounts formatted in Python, and a real office page."""

from __future__ import annotations

import dataclasses
from pathlib import Path

import aiohttp
import jinja2

from billcore.common.config import PortalSection, config_from_dict
from console.context import current_currency
from console.page import money_text
from portal.app import serve as serve_office
from tests.conftest import free_port
from tests.test_portal_e2e import http_login
from tests.test_portal_harness import LiveCore, live_core, seed_subscriber  # noqa: F401 - the fixture
from webedge.render import FILTERS, Currency
from webedge.settings import read_or_make_secret

ENV = jinja2.Environment(autoescape=True)
ENV.filters.update(FILTERS)


def shown(template: str, currency: Currency | None, **values: object) -> str:
    context = {"currency": currency} if currency is not None else {}
    return ENV.from_string(template).render(**context, **values)


def test_the_money_filter_takes_the_currencys_decimals_and_code() -> None:
    assert shown("{{ x | money }}", Currency("JPY", 0), x=1_500_000_000) == "1\u202f500"
    assert shown("{{ x | money }}", Currency("JPY", 0), x=1_500_500_000) == "1\u202f500.5"   # exact, never rounded
    assert shown("{{ x | money }}", Currency("KWD", 3), x=12_000_000) == "12.000"
    assert shown("{{ x | money(code=True) }}", Currency("KWD", 3), x=12_345_000) == "12.345\u00a0KWD"
    assert shown("{{ x | money(code=True) }}", Currency("RUB", 2), x=-1) == "-0.000001\u00a0RUB"
    assert shown("{{ x | money }}", None, x=12_500_000) == "12.50"        # a page without one: the defaults


def test_the_currency_comes_from_the_billing_section() -> None:
    config = config_from_dict({"billing": {"currency": "KWD", "minor_units": 3}})
    assert Currency.of(config) == Currency("KWD", 3)


def test_console_amounts_formatted_in_python_take_the_currency() -> None:
    token = current_currency.set(Currency("JPY", 0))
    try:
        assert money_text(1_000_000_000) == "1000" and money_text(1_250_000) == "1.25"
    finally:
        current_currency.reset(token)
    assert money_text(1_000_000_000) == "1000.00"


async def test_the_office_shows_the_installations_currency(live_core: LiveCore, tmp_path: Path) -> None:
    admin = await live_core.admin()
    await seed_subscriber(admin, "kuwait", "kuwait-password-1", balance=12_345_000)
    await admin.close()
    port = free_port()
    section = dataclasses.replace(PortalSection(), enabled=True, port=port, cookie_secure=False)
    runner = await serve_office(section, live_core.link(), read_or_make_secret(tmp_path / "portal.secret"),
                                currency=Currency("KWD", 3))
    url = f"http://127.0.0.1:{port}"
    try:
        async with aiohttp.ClientSession(cookie_jar=aiohttp.CookieJar(unsafe=True)) as http:
            (await http_login(http, url, "kuwait", "kuwait-password-1")).release()
            async with http.get(url + "/") as r:
                html = await r.text()
            assert r.status == 200
            assert '<span id="balance">12.345</span> <span class="currency">KWD</span>' in html
            assert '<dd id="credit">0.000</dd>' in html
            async with http.get(url + "/history") as r:
                assert "12.345" in await r.text()
    finally:
        await runner.cleanup()
