"""The console's tariff pages against the real core (``tests.console_harness``):
Debian's Chromium (Playwright) for the main flow, plain HTTP for the rest.

What an operator would notice: a tariff with two traffic classes and a night
range is built through the forms alone, with prices typed as money per GB,
and is what the core's own calls then read back (to the micro-unit); the
sample month shows what ``tariffs.quote`` answers; a bad price is refused
with the core's own message beside the price; and a cashier or a support
operator reaches no tariff editing, not even by typing its URLs.
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any

import pytest

from tests.console_harness import ConsoleWorld, chromium, console_world, submit_login  # noqa: F401  (a fixture)
from tests.test_console_network import shots
from tests.test_console_security import inline_parts
from urfa.errors import CallFailed

GB = 10**9
EDITING = [  # (method, path) of every page that changes the catalogue
    ("GET", "/tariffs/new"), ("POST", "/tariffs/new"), ("POST", "/tariffs/1"), ("POST", "/tariffs/1/delete"),
    ("GET", "/services/new"), ("POST", "/services/new"), ("POST", "/services/1/rate"),
    ("POST", "/services/1/delete"), ("POST", "/classes"), ("POST", "/classes/1/rules"),
    ("POST", "/classes/1/delete"), ("POST", "/classes/rules/1/delete"), ("POST", "/timeranges"),
    ("POST", "/timeranges/1/delete"),
]


async def by_name(world: ConsoleWorld, call: str, name: str) -> dict[str, Any]:
    rows = await world.root.call(call, {})
    (row,) = [row for row in rows if row["name"] == name]
    return dict(row)


async def test_a_tariff_with_two_classes_and_a_night_range_in_chromium(console_world: ConsoleWorld) -> None:
    url = console_world.url
    password = await console_world.admin("tamara")

    async def submit(page: Any, form: str, fields: dict[str, str], button: str = "button[type=submit]") -> None:
        for name, value in fields.items():
            await page.fill(f"{form} [name={name}]", value)
        async with page.expect_navigation():
            await page.click(f"{form} {button}")

    async with chromium(locale="en-US") as context:
        page = await context.new_page()
        await submit_login(page, url, "tamara", password)
        await page.wait_for_selector("#operator")

        # two traffic classes: the provider's own network first, then everything else
        await page.goto(url + "/classes")
        await submit(page, "#class-form", {"name": "local", "position": "1"})
        await submit(page, "#class-form", {"name": "internet", "position": "2"})
        local = await by_name(console_world, "classes.list", "local")
        internet = await by_name(console_world, "classes.list", "internet")
        await page.click(f"#class-{local['id']} summary")
        await submit(page, f"#class-{local['id']} form.rule-form", {"remote_net": "10.0.0.0/8"})
        await page.click(f"#class-{internet['id']} summary")
        await submit(page, f"#class-{internet['id']} form.rule-form", {})      # no criteria: everything
        assert await page.locator(f"#class-{local['id']} tr[data-rule]").count() == 1

        # the night
        await page.goto(url + "/timeranges")
        await submit(page, "#range-form", {"name": "night", "days_0": "all", "start_0": "23:00",
                                           "end_0": "07:00"})
        assert "all 23:00-07:00" in await page.inner_text('tr[data-range="night"]')

        # a monthly fee and a traffic service
        await page.goto(url + "/services/new")
        await page.select_option("#service-form [name=kind]", "periodic")
        await submit(page, "#service-form", {"name": "Monthly fee", "fee": "500", "anchor": "2024-01-01"})
        assert await page.inner_text("#service-fee") == "500.00"
        await page.goto(url + "/services/new")
        await page.select_option("#service-form [name=kind]", "traffic")
        await submit(page, "#service-form", {"name": "Traffic", "fee": ""})
        traffic = await by_name(console_world, "services.list", "Traffic")
        assert f"/services/{traffic['id']}?" in page.url

        # prices per GB: a bad one first, refused beside the price with the core's words
        await page.select_option("#rate-form [name=class_id]", str(internet["id"]))
        await submit(page, "#rate-form", {"tier_price_0": "-1.00"})
        error = page.locator('#rate-form .field-error[data-for="tiers"]')
        assert "tier price must be" in await error.inner_text()
        assert await page.get_attribute("#rate-form [name=tier_price_0]", "aria-invalid") == "true"
        assert await page.input_value("#rate-form [name=tier_price_0]") == "-1.00"   # what was typed stays
        await submit(page, "#rate-form", {"tier_price_0": "1.00"})
        night = await by_name(console_world, "timeranges.list", "night")
        await page.select_option("#rate-form [name=class_id]", str(internet["id"]))
        await page.select_option("#rate-form [name=range_id]", str(night["id"]))
        await submit(page, "#rate-form", {"tier_price_0": "0.20"})
        await page.select_option("#rate-form [name=class_id]", str(local["id"]))
        await submit(page, "#rate-form", {"tier_price_0": "0"})
        assert "0.20 / GB" in await page.inner_text("#rates")
        await page.screenshot(path=str(shots() / "console-service.png"), full_page=True)
        await page.goto(url + "/classes")
        await page.screenshot(path=str(shots() / "console-classes.png"), full_page=True)

        # the tariff, with a sample month before saving
        await page.goto(url + "/tariffs/new")
        fee = await by_name(console_world, "services.list", "Monthly fee")
        await page.fill("#tariff-form [name=name]", "Day and night")
        await page.check(f"#tariff-form [name=service_{fee['id']}]")
        await page.check(f"#tariff-form [name=service_{traffic['id']}]")
        await page.fill(f"#tariff-form [name=traffic_{internet['id']}]", "12")
        await page.fill(f"#tariff-form [name=traffic_{local['id']}]", "30")
        expected = await console_world.root.call("tariffs.quote", {
            "service_ids": sorted([fee["id"], traffic["id"]]),
            "traffic": {str(internet["id"]): 12 * GB, str(local["id"]): 30 * GB}})
        # by hand: 12 GB spread over the month's hours, a third of them in the night (23:00-07:00):
        # 8 GB at 1.00 and 4 GB at 0.20, local traffic free, and the 500.00 fee
        assert abs(expected["total"] - 508_800_000) <= 10_000, expected
        shown = money_text(expected["total"])
        await page.wait_for_function(                          # the script asked again as we typed
            "text => (document.getElementById('quote-total') || {}).textContent === text", arg=shown)
        lines = await page.inner_text("#quote-lines")
        assert "Monthly fee" in lines and "500.00" in lines and "Traffic" in lines
        await page.screenshot(path=str(shots() / "console-tariff-form.png"), full_page=True)
        async with page.expect_navigation():
            await page.click("#save-tariff")
        assert "The tariff is saved." in await page.inner_text("#notice")

    # what the core's own calls read back
    made = await by_name(console_world, "tariffs.list", "Day and night")
    assert sorted(made["service_ids"]) == sorted([fee["id"], traffic["id"]])
    fee = await by_name(console_world, "services.list", "Monthly fee")
    assert (fee["kind"], fee["fee"], fee["period_kind"], fee["charge_mode"]) == ("periodic", 500_000_000, "monthly",
                                                                                 "start")
    traffic = await by_name(console_world, "services.list", "Traffic")
    rates = {(rate["class_id"], rate["range_id"]): (rate["unit_size"], rate["tier_starts"], rate["tier_prices"])
             for rate in traffic["rates"]}
    assert rates == {(internet["id"], None): (GB, [0], [1_000_000]),        # 1.00 per GB
                     (internet["id"], night["id"]): (GB, [0], [200_000]),   # 0.20 per GB at night
                     (local["id"], None): (GB, [0], [0])}
    local = await by_name(console_world, "classes.list", "local")
    internet = await by_name(console_world, "classes.list", "internet")
    assert [rule["remote_net"] for rule in local["rules"]] == ["10.0.0.0/8"]
    assert [(rule["remote_net"], rule["local_net"], rule["skip"]) for rule in internet["rules"]] \
        == [(None, None, False)]
    assert night["windows"] == [{"weekdays": [0, 1, 2, 3, 4, 5, 6], "start_minute": 23 * 60, "end_minute": 7 * 60}]


def money_text(micro: int) -> str:
    """How the console shows an amount (its ``money`` filter: thousands grouped by a narrow space)."""
    from webedge.render import money
    return money(micro)


async def test_a_bad_price_gets_the_cores_message_beside_it(console_world: ConsoleWorld) -> None:
    browser = await console_world.operator("boris")
    service = await console_world.root.call("services.add", {"name": "Time", "kind": "time"})
    page = await browser.get(f"/services/{service['id']}")
    assert page.status == 200 and 'id="rate-form"' in page.text
    assert '<option value="hour" selected>' in page.text and '"GB"' not in page.text   # time is priced per hour
    with pytest.raises(CallFailed) as core:
        await console_world.root.call("services.set_rate", {"service_id": service["id"], "unit_size": 3600,
                                                            "tiers": [[0, -500_000]]})
    refused = await browser.post(f"/services/{service['id']}/rate", {"kind": "time", "unit": "hour",
                                                                      "tier_price_0": "-0.50"})
    assert refused.status == 422
    error = re.search(r'<p class="field-error" id="error-tiers" data-for="tiers"[^>]*>([^<]*)</p>', refused.text)
    assert error is not None, refused.text[:4000]
    assert error.group(1) == html_escaped(core.value.message)
    # money the core's parser cannot read is refused by the same parser, beside the same field
    unreadable = await browser.post(f"/services/{service['id']}/rate", {"kind": "time", "unit": "hour",
                                                                         "tier_price_0": "0,50"})
    assert unreadable.status == 422 and 'data-for="tiers"' in unreadable.text
    assert "not a money string" in unreadable.text
    assert (await by_name(console_world, "services.list", "Time"))["rates"] == []
    fine = await browser.post(f"/services/{service['id']}/rate", {"kind": "time", "unit": "hour",
                                                                   "tier_price_0": "0.60", "prepaid": "2"})
    assert fine.status == 303
    (rate,) = (await by_name(console_world, "services.list", "Time"))["rates"]
    assert (rate["class_id"], rate["unit_size"], rate["prepaid"], rate["tier_prices"]) \
        == (None, 3600, 7200, [600_000])
    assert "0.60 / hour" in (await browser.get(f"/services/{service['id']}")).text


def html_escaped(text: str) -> str:
    from html import escape
    return escape(text).replace("&#x27;", "&#39;")


async def test_the_sample_month_is_the_cores_quote(console_world: ConsoleWorld) -> None:
    root = console_world.root
    browser = await console_world.operator("quinn")
    internet = await root.call("classes.add", {"name": "internet"})
    await root.call("classes.add_rule", {"class_id": internet["id"]})
    fee = await root.call("services.add", {"name": "Fee", "kind": "periodic", "fee": 300_000_000,
                                           "period": {"kind": "monthly", "anchor": "2024-01-01"},
                                           "charge_mode": "start"})
    traffic = await root.call("services.add", {"name": "GBs", "kind": "traffic"})
    await root.call("services.set_rate", {"service_id": traffic["id"], "class_id": internet["id"],
                                          "unit_size": GB, "prepaid": 10 * GB, "tiers": [[0, 500_000]]})
    quote = await browser.get(f"/tariffs/quote?service_{fee['id']}=on&service_{traffic['id']}=on"
                              f"&traffic_{internet['id']}=25.5")
    assert quote.status == 200, quote.text[:2000]
    expected = await root.call("tariffs.quote", {"service_ids": [fee["id"], traffic["id"]],
                                                 "traffic": {str(internet["id"]): 25_500_000_000}})
    assert f'id="quote-total">{money_text(expected["total"])}<' in quote.text
    # 300.00 + 15.5 GB beyond the prepaid 10 at 0.50: an oracle by hand, not the core's code
    assert expected["total"] == 300_000_000 + 7_750_000
    bad = await browser.get(f"/tariffs/quote?service_{fee['id']}=on&traffic_{internet['id']}=lots")
    assert bad.status == 200 and 'data-for="traffic_' in bad.text and "quote-total" not in bad.text

    # without script, the button posts the form: a reader may try services on a tariff and save nothing
    tariff = await root.call("tariffs.add", {"name": "Plan", "service_ids": [fee["id"]]})
    await console_world.group("tariff-readers", ["tariffs.read"])
    reader = await console_world.operator("rita", groups=["tariff-readers"])
    page = await reader.get(f"/tariffs/{tariff['id']}")
    assert page.status == 200 and 'id="save-tariff"' not in page.text and 'formaction="/tariffs/quote"' in page.text
    tried = await reader.post("/tariffs/quote", {"tariff_id": str(tariff["id"]), f"service_{fee['id']}": "on",
                                                 f"service_{traffic['id']}": "on",
                                                 f"traffic_{internet['id']}": "25.5"})
    assert tried.status == 200 and f'id="quote-total">{money_text(expected["total"])}<' in tried.text
    assert 'id="tariff-title">Plan<' in tried.text
    assert (await reader.post(f"/tariffs/{tariff['id']}", {f"service_{traffic['id']}": "on"})).status == 403
    assert [row["service_ids"] for row in await root.call("tariffs.list", {})] == [[fee["id"]]]


async def role(world: ConsoleWorld, name: str, rights: list[str]) -> str:
    """The role template ``name`` (the auth branch's), or one made by hand with ``rights`` where it is missing."""
    async with world.core.pool.acquire() as conn:
        if await conn.fetchval("SELECT 1 FROM admin_groups WHERE name = $1", name) is None:
            await world.group(name, rights)
    return name


async def test_cashier_and_support_get_no_tariff_editing(console_world: ConsoleWorld) -> None:
    cashiers = await role(console_world, "cashiers", ["users.read", "accounts.read", "payments.*"])
    support = await role(console_world, "support", ["users.read", "accounts.read", "tariffs.read", "blocks.*",
                                                    "radius.read", "radius.disconnect"])
    for login, group in (("cora", cashiers), ("sam", support)):
        browser = await console_world.operator(login, groups=[group])
        home = await browser.get("/")
        assert home.status == 200
        assert 'href="/tariffs/new"' not in home.text and 'href="/services/new"' not in home.text
        for method, path in EDITING:
            if method == "GET":
                answer = await browser.get(path)
            else:
                answer = await browser.post(path, {"name": "sneaky", "service_1": "on", "tier_price_0": "0"})
            assert answer.status == 403, (login, method, path, answer.status)
        listing = await browser.get("/tariffs")
        if listing.status == 200:                     # support reads tariffs: no editing on the page
            assert 'id="new-tariff"' not in listing.text
        else:
            assert listing.status == 403              # a cashier does not even read them
    assert await console_world.root.call("tariffs.list", {}) == []
    assert await console_world.root.call("services.list", {}) == []


OUR_TEMPLATES = ("tariffs", "network")
KEY_LIKE = re.compile(r"\b(?:tariffs|services|classes|timeranges|quote|nas|online|netflow|radius|health|form)"
                      r"\.[a-z_]+(?:\.[a-z_]+)?\b")


def test_every_message_a_template_names_is_in_both_languages() -> None:
    from console.messages import MESSAGES as FRAME_MESSAGES
    from console.pages import classes, network, tariffs

    known = {**FRAME_MESSAGES, **tariffs.MESSAGES, **classes.MESSAGES, **network.MESSAGES}
    root = Path(__file__).resolve().parent.parent / "console" / "templates"
    named = {key for area in OUR_TEMPLATES for path in (root / area).glob("*.html")
             for key in re.findall(r"""\bt\(["']([a-z_.]+[a-z_])["']""", path.read_text())}
    assert named and named <= set(known), sorted(named - set(known))
    for module in (tariffs, classes, network):
        for key, (english, russian) in module.MESSAGES.items():
            assert english.strip() and russian.strip(), key
            assert set(re.findall(r"{\w+}", english)) == set(re.findall(r"{\w+}", russian)), key


async def test_every_page_reads_in_english_and_russian(console_world: ConsoleWorld) -> None:
    """Each page as a superuser sees it, with every kind of row on it: no message key left untranslated,
    nothing inline that the strict CSP would block."""
    root = console_world.root
    internet = await root.call("classes.add", {"name": "internet"})
    await root.call("classes.add_rule", {"class_id": internet["id"], "remote_ports": [443, 443], "protocol": 6,
                                         "skip": True})
    night = await root.call("timeranges.add", {"name": "night", "windows": [{"days": "all", "time": "23:00-07:00"}],
                                               "dates": ["2024-12-31"]})
    fee = await root.call("services.add", {"name": "Fee", "kind": "periodic", "fee": 100_000_000,
                                           "period": {"kind": "custom", "days": 10, "anchor": "2024-01-01"},
                                           "charge_mode": "daily"})
    traffic = await root.call("services.add", {"name": "GBs", "kind": "traffic"})
    await root.call("services.set_rate", {"service_id": traffic["id"], "class_id": internet["id"],
                                          "range_id": night["id"], "unit_size": GB, "prepaid": GB,
                                          "tiers": [[0, 500_000], [5 * GB, 100_000]]})
    online = await root.call("services.add", {"name": "Hours", "kind": "time", "session_limit": 3600,
                                              "max_sessions": 1})
    tariff = await root.call("tariffs.add", {"name": "Plan", "service_ids": [fee["id"], traffic["id"]]})
    user = await root.call("users.create", {"login": "ivan", "password": "ivan-portal-pw"})
    await root.call("tariffs.link", {"account_id": user["basic_account_id"], "tariff_id": tariff["id"]})
    nas = await root.call("radius.nas_add", {"name": "bras", "address": "192.0.2.9", "secret": "s3cret"})
    paths = ["/tariffs", "/tariffs/new", f"/tariffs/{tariff['id']}",
             f"/tariffs/history?account_id={user['basic_account_id']}", "/services", "/services/new",
             f"/services/{fee['id']}", f"/services/{traffic['id']}", f"/services/{online['id']}", "/classes",
             "/timeranges", "/network/nas", f"/network/nas/{nas['id']}", "/network/online",
             "/network/online?offset=100", "/network/netflow", "/network/radius"]
    browser = await console_world.operator("irina")
    for language, word in (("en", "Tariffs"), ("ru", "Тарифы")):
        for path in paths:
            page = await browser.get(path, headers={"Accept-Language": language})
            assert page.status == 200, (path, page.text[:3000])
            assert inline_parts(page.text) == [], (path, inline_parts(page.text))     # the strict CSP holds
            ours = re.sub(r'<ul class="muted" id="missing">.*?</ul>', "", page.text, flags=re.S)   # the core's words
            text = re.sub(r"<[^>]+>", " ", ours)               # what a person reads, not URLs or names
            assert not KEY_LIKE.findall(text), (language, path, KEY_LIKE.findall(text))
            assert word in text, (language, path)
    services = (await browser.get("/services")).text
    assert "from 5 GB 0.10 / GB" in re.sub(r"\s+", " ", re.sub(r"<[^>]+>", " ", services))


async def test_deleting_and_what_the_core_refuses_to_delete(console_world: ConsoleWorld) -> None:
    root = console_world.root
    browser = await console_world.operator("dora")
    internet = await root.call("classes.add", {"name": "internet"})
    rule = await root.call("classes.add_rule", {"class_id": internet["id"], "remote_net": "0.0.0.0/0"})
    night = await root.call("timeranges.add", {"name": "night", "windows": [{"days": "all", "time": "23:00-07:00"}]})
    traffic = await root.call("services.add", {"name": "GBs", "kind": "traffic"})
    await root.call("services.set_rate", {"service_id": traffic["id"], "class_id": internet["id"],
                                          "range_id": night["id"], "unit_size": GB, "tiers": [[0, 1]]})
    tariff = await root.call("tariffs.add", {"name": "Plan", "service_ids": [traffic["id"]]})

    # a class a price uses is the core's to refuse: its message on a page with the way back
    classes = await browser.get("/classes")
    assert 'data-confirm="Delete this class and its rules?"' in classes.text
    refused = await browser.post(f"/classes/{internet['id']}/delete", {})
    assert refused.status == 409 and 'id="refused"' in refused.text and 'href="/classes"' in refused.text
    with pytest.raises(CallFailed) as core:
        await root.call("classes.delete", {"class_id": internet["id"]})
    assert html_escaped(core.value.message) in refused.text
    assert (await browser.post(f"/services/{traffic['id']}/delete", {})).status == 409   # a tariff holds it

    for path in (f"/tariffs/{tariff['id']}/delete", f"/services/{traffic['id']}/delete",
                 f"/classes/rules/{rule['id']}/delete", f"/classes/{internet['id']}/delete",
                 f"/timeranges/{night['id']}/delete"):
        await browser.get("/classes")                            # a page read: its form token
        assert (await browser.post(path, {})).status == 303, path
    for name in ("tariffs.list", "services.list", "classes.list", "timeranges.list"):
        assert await root.call(name, {}) == [], name
