"""The console's network pages against the real core (``tests.console_harness``):
plain HTTP for behaviour, Debian's Chromium (Playwright) for the live list.

What an operator would notice: a NAS's shared secret, once typed (in a
form, in Chromium too), is never shown again (not in the list, the edit
form, nor a form sent back with an error) and an empty secret field keeps it; the sessions online appear and go
without reloading the page as the NAS reports them (a session is started the
way the radius process starts one: ``radius.accounting`` over a system
session with the radius role's rights); Disconnect reaches the radius
process's topic; the health pages show what ``sys.health`` knows; and an
operator without the NAS calls gets the 403 page by URL.
"""

from __future__ import annotations

import asyncio
import re
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

from billcore.server.principals import SERVICE_RIGHTS, create_system_login
from tests.console_harness import ConsoleWorld, chromium, console_world, submit_login  # noqa: F401  (a fixture)
from tests.test_portal_e2e import SHOTS
from urfa import client as uc

SECRET = "nas-shared-secret-7f3a"
RADIUS_PASSWORD = "radius-test-password"
NAS_ADDRESS = "192.0.2.77"


async def radius_process(world: ConsoleWorld) -> uc.Client:
    """A system session with the radius role's rights: what the radius process calls the core as."""
    async with world.core.pool.acquire() as conn:
        await create_system_login(conn, "radius-test", RADIUS_PASSWORD, SERVICE_RIGHTS["radius"])
    client = await uc.connect("127.0.0.1", world.core.port)
    await client.login("system", "radius-test", RADIUS_PASSWORD)
    return client


async def secrets_of(radius: uc.Client) -> dict[str, bytes]:
    """NAS secrets as the radius process reads them (the only reader there is)."""
    return {device["name"]: device["secret"] for device in await radius.call("radius.nas_list", {})}


async def test_a_nas_secret_is_written_never_shown(console_world: ConsoleWorld) -> None:
    browser = await console_world.operator("nina")
    radius = await radius_process(console_world)
    try:
        page = await browser.get("/network/nas")
        assert page.status == 200 and 'id="nas-form"' in page.text, page.text[:2000]

        # an error sends the form back: the typed secret is not in it
        refused = await browser.post("/network/nas", {"name": "bras-1", "address": "not-an-address",
                                                      "secret": SECRET, "coa_port": "3799"})
        assert refused.status == 422 and 'data-for="address"' in refused.text, refused.text[:3000]
        assert SECRET not in refused.text and 'value="bras-1"' in refused.text

        added = await browser.post("/network/nas", {"name": "bras-1", "address": NAS_ADDRESS, "secret": SECRET,
                                                    "coa_port": "3799", "disconnect_mode": "disconnect",
                                                    "require_message_authenticator": "on"})
        assert added.status == 303, added.text[:2000]
        assert (await secrets_of(radius))["bras-1"] == SECRET.encode()
        listed = await browser.get("/network/nas")
        assert 'data-nas="bras-1"' in listed.text and NAS_ADDRESS in listed.text
        assert "Message-Authenticator" in listed.text
        (device,) = await console_world.root.call("radius.nas_show", {})
        edit = await browser.get(f"/network/nas/{device['id']}")
        assert edit.status == 200 and 'value="bras-1"' in edit.text
        for shown in (listed, edit):
            assert SECRET not in shown.text

        # an empty secret keeps the old one; a typed one replaces it
        kept = await browser.post(f"/network/nas/{device['id']}", {
            "name": "bras-1", "address": NAS_ADDRESS, "secret": "", "coa_port": "1700",
            "disconnect_mode": "coa"})
        assert kept.status == 303, kept.text[:2000]
        (device,) = await console_world.root.call("radius.nas_show", {})
        assert device["coa_port"] == 1700 and device["disconnect_mode"] == "coa"
        assert device["require_message_authenticator"] is False
        assert (await secrets_of(radius))["bras-1"] == SECRET.encode()
        replaced = await browser.post(f"/network/nas/{device['id']}", {
            "name": "bras-1", "address": NAS_ADDRESS, "secret": "a-new-secret", "coa_port": "1700"})
        assert replaced.status == 303
        assert (await secrets_of(radius))["bras-1"] == b"a-new-secret"
        assert "a-new-secret" not in (await browser.get(f"/network/nas/{device['id']}")).text

        # deleting it, after the confirmation the page asks for
        edit = await browser.get(f"/network/nas/{device['id']}")
        assert 'data-confirm="Delete this NAS' in edit.text
        gone = await browser.post(f"/network/nas/{device['id']}/delete", {})
        assert gone.status == 303
        assert await console_world.root.call("radius.nas_show", {}) == []
    finally:
        await radius.close()


async def test_without_the_nas_calls_the_pages_are_forbidden(console_world: ConsoleWorld) -> None:
    await console_world.group("readers-of-sessions", ["radius.read"])
    browser = await console_world.operator("olga", groups=["readers-of-sessions"])
    assert (await browser.get("/network/online")).status == 200
    assert (await browser.get("/network/nas")).status == 200          # radius.nas_show is radius.read
    page = await browser.get("/network/nas")
    assert 'id="nas-form"' not in page.text and "/network/nas/" not in page.text   # no add, no edit links
    for path in ("/network/nas", "/network/nas/1", "/network/nas/1/delete", "/network/online/1/disconnect"):
        assert (await browser.post(path, {"name": "x", "address": NAS_ADDRESS, "secret": "s"})).status == 403, path
    assert (await browser.get("/network/nas/1")).status == 403


async def seed_radius_subscriber(world: ConsoleWorld) -> int:
    """A subscriber with a RADIUS login, through admin calls; the account id."""
    root = world.root
    user = await root.call("users.create", {"login": "pavel", "password": "pavel-portal-pw"})
    account_id = int(user["basic_account_id"])
    await root.call("radius.link_add", {"account_id": account_id, "login": "pavel-pppoe", "password": "pw"})
    return account_id


async def accounting(radius: uc.Client, status: str, session_id: str, **extra: Any) -> dict[str, Any]:
    record = {"nas": NAS_ADDRESS, "status": status, "session_id": session_id, "login": "pavel-pppoe", **extra}
    answer: dict[str, Any] = await radius.call("radius.accounting", {"record": record})
    return answer


async def test_a_nas_then_sessions_live_and_disconnect_in_chromium(console_world: ConsoleWorld) -> None:
    account_id = await seed_radius_subscriber(console_world)
    radius = await radius_process(console_world)
    await radius.subscribe("radius.disconnect")        # as the radius process listens for it
    password = await console_world.admin("vera")
    try:
        async with chromium(locale="en-US") as context:
            page = await context.new_page()
            await submit_login(page, console_world.url, "vera", password)
            await page.wait_for_selector("#operator")
            dialogs: list[str] = []

            async def accept(dialog: Any) -> None:
                dialogs.append(dialog.message)
                await dialog.accept()
            page.on("dialog", accept)

            # the NAS, through its form: the secret typed once is in no page after
            await page.goto(console_world.url + "/network/nas")
            for name, value in (("name", "bras-live"), ("address", NAS_ADDRESS), ("secret", SECRET)):
                await page.fill(f"#nas-form [name={name}]", value)
            async with page.expect_navigation():
                await page.click("#add-nas")
            await page.wait_for_selector('tr[data-nas="bras-live"]')
            assert SECRET not in await page.content()
            async with page.expect_navigation():
                await page.click('tr[data-nas="bras-live"] a')
            assert await page.input_value("#nas-form [name=secret]") == ""
            assert SECRET not in await page.content()
            assert (await secrets_of(radius))["bras-live"] == SECRET.encode()

            await page.goto(console_world.url + "/network/online")
            await page.wait_for_selector("#sessions-none")
            await page.evaluate("window.stillTheSamePage = true")

            await accounting(radius, "start", "LIVE-1", framed_ip="100.64.3.9")
            row = page.locator('tr[data-session="LIVE-1"]')
            await row.wait_for()                              # no reload: the SSE said "changed"
            assert await page.evaluate("window.stillTheSamePage") is True
            assert "100.64.3.9" in await row.inner_text() and "pavel-pppoe" in await row.inner_text()
            assert str(account_id) in await row.inner_text()
            await page.screenshot(path=str(shots() / "console-online.png"), full_page=True)

            async with page.expect_navigation():
                await row.locator("button", has_text="Disconnect").click()
            assert dialogs == ["Disconnect this session?"]
            await page.wait_for_selector("text=Disconnect is sent to the NAS.")
            event = await radius.next_event(timeout=10)
            assert event.topic == "radius.disconnect"
            assert [session["session_id"] for session in event.payload["sessions"]] == ["LIVE-1"]

            # the NAS says it ended: the row goes, again without a reload
            await page.evaluate("window.stillTheSamePage = true")
            await accounting(radius, "stop", "LIVE-1", session_time=30)
            await page.wait_for_selector("#sessions-none")
            assert await page.evaluate("window.stillTheSamePage") is True

            # sessions coming and going while the page reads them (a slow network: the answer is read
            # at once, then held back): it still ends showing what is so, not what it first read
            read = asyncio.Event()

            async def slow(route: Any) -> None:
                answer = await route.fetch()
                read.set()
                await asyncio.sleep(0.5)
                await route.fulfill(response=answer)
            await page.route(lambda address: urlsplit(address).path == "/network/online", slow)
            await accounting(radius, "start", "BURST-1", framed_ip="100.64.4.1")
            await asyncio.wait_for(read.wait(), 15)             # the page has read the table once
            await accounting(radius, "stop", "BURST-1", session_time=1)
            for number in range(2, 6):
                await accounting(radius, "start", f"BURST-{number}", framed_ip=f"100.64.4.{number}")
                if number % 2:
                    await accounting(radius, "stop", f"BURST-{number}", session_time=1)
            await page.wait_for_function(
                "() => [...document.querySelectorAll('#sessions tr[data-session]')]"
                ".map(row => row.dataset.session).join() === 'BURST-2,BURST-4'", timeout=15_000)
            assert await page.evaluate("window.stillTheSamePage") is True
    finally:
        await radius.close()


def shots() -> Path:
    """Where screenshots go (docs/screenshots/ with BILLCORE_UPDATE_SCREENSHOTS=1, as the office's)."""
    SHOTS.mkdir(parents=True, exist_ok=True)
    return SHOTS


async def test_health_pages_show_what_the_core_knows(console_world: ConsoleWorld) -> None:
    browser = await console_world.operator("hugo")
    async with console_world.core.pool.acquire() as conn:   # a worker's watermark, as netflow.submit commits it
        await conn.execute("INSERT INTO ingest_watermarks(source, watermark, updated_at)"
                           " VALUES ('netflow:nf-test-1', 4096, now())")
    health = await console_world.root.call("sys.health", {})
    netflow = await browser.get("/network/netflow")
    assert netflow.status == 200, netflow.text[:2000]
    (worker,) = [row for row in health["netflow"] if row["worker"] == "nf-test-1"]
    row = re.search(r'<tr data-worker="nf-test-1">(.*?)</tr>', netflow.text, re.S)
    assert row is not None, netflow.text[:3000]
    cells = [re.sub(r"<[^>]+>|\s+", " ", cell).strip()
             for cell in re.findall(r"<td[^>]*>(.*?)</td>", row.group(1), re.S)]
    assert cells[0] == "nf-test-1" and cells[5] == "4096" and cells[7] == str(worker["classifier_version"])
    rates = await browser.get("/network/radius")
    assert rates.status == 200 and 'id="radius-rates"' in rates.text
    for name in ("access", "accounting", "rejects"):
        assert f'data-rate="{name}"' in rates.text
    # what the core says it cannot know is said on the page, not hidden
    assert any(line in rates.text or line in netflow.text for line in health["missing"])
    await console_world.group("no-health", ["radius.read"])
    without = await console_world.operator("ursula", groups=["no-health"])
    assert (await without.get("/network/netflow")).status == 403
    assert 'href="/network/radius"' not in (await without.get("/")).text
