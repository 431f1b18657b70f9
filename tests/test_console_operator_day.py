"""An operator's whole day in the console, end to end.

One ``billcore serve`` (supervisor, core, console, RADIUS, NetFlow, the
embedded PostgreSQL), a NAS simulator that answers RFC 5176 Disconnects,
and headless Chromium (Debian's, through Playwright) as the operator's
browser. Nothing reaches into the processes: the operator works only in
the console's pages; the test checks what the operator would see on the
next page, and what the outside world sees (a Disconnect-Request on the
NAS, the core's answers over URFA).

The day: root makes the operator; she enrolls TOTP and logs in with it;
makes a tariff with two traffic classes and a night range; a subscriber
with an IP; takes a payment (a repeated external id is refused kindly);
sees the traffic NetFlow brings on the card; blocks (the NAS gets the
Disconnect) and unblocks; changes the tariff from the next period; loads
and unloads a signed plugin; finds the day's changes in the audit log,
under her name and the browser's address, the plugin's load and unload
among them.

Screenshots of the main pages are taken on every run, into a temporary
folder, or into docs/screenshots/ with BILLCORE_UPDATE_SCREENSHOTS=1
(README and docs/console.md show them).
"""

from __future__ import annotations

import os
import re
import shutil
import socket
import tempfile
import time
from pathlib import Path
from typing import Any

import pytest

from billcore.common.money import format_money
from netflow.exporter import ExportClock, FlowSpec, build_v5, build_v9
from radius.nas_sim import NasSimulator
from radius.server import load_dictionary
from tests.conftest import free_port, need_peer
from tests.console_harness import chromium, submit_login
from tests.console_stack import ROOT_PASSWORD, ConsoleStack, console_stack, need_chromium, signed_example_plugin
from tests.test_radius_e2e import radclient
from tests.waiting import eventually_awaited

ROOT = Path(__file__).resolve().parent.parent
SHOTS = (ROOT / "docs" / "screenshots" if os.environ.get("BILLCORE_UPDATE_SCREENSHOTS")
         else Path(tempfile.mkdtemp(prefix="billcore-console-shots-")))
NAS_SECRET = "day-nas-secret"
OPERATOR, OPERATOR_PASSWORD = "olga", "olga-console-pw-7"
SUBSCRIBER_IP = "100.64.5.7"          # the static address given on the new-subscriber form
SESSION_IP = "100.64.5.8"             # the address of the PPPoE session the NAS reports
LOCAL_NET, LOCAL_PEER = "198.51.100.0/24", "198.51.100.20"
INTERNET_PEER = "203.0.113.9"
LOCAL_PER_MB, INTERNET_PER_MB = "0.02", "0.10"        # per 10^6 bytes; the night range costs the same
PAID = "500.00"
CUSTOMERS = [("Ivan Smirnov", 350_000_000), ("Maria Ivanova", 1_200_500_000), ("Olga Kuznetsova", 0),
             ("Petr Popov", 75_250_000), ("Anna Sokolova", 410_000_000), ("Sergei Lebedev", 12_990_000),
             ("Elena Kozlova", 0), ("Dmitri Novikov", 999_000_000), ("Irina Morozova", 150_000_000),
             ("Pavel Volkov", 48_000_000), ("Fox Mulder", 600_000_000)]


def plain(text: str) -> str:
    """A figure as shown, without the grouping spaces (thin, no-break or plain)."""
    return re.sub(r"[\s\u00a0\u202f]", "", text)


class Operator:
    """The browser page and the few gestures every form takes."""

    def __init__(self, page: Any, url: str) -> None:
        self.page = page
        self.url = url

    async def goto(self, path: str) -> Any:
        response = await self.page.goto(self.url + path)
        assert response is not None and response.status == 200, (path, response and response.status)
        return response

    async def submit(self, form: str, fields: dict[str, str] | None = None, choose: dict[str, str] | None = None,
                     check: list[str] | None = None, button: str = "button[type=submit]") -> Any:
        """Fill the form ``form`` (a CSS selector) and send it; the response of the page it leads to."""
        scope = self.page.locator(form)
        for name, value in (fields or {}).items():
            await scope.locator(f'[name="{name}"]').first.fill(value)
        for name, value in (choose or {}).items():
            await scope.locator(f'select[name="{name}"]').select_option(value)
        for selector in check or []:
            await scope.locator(selector).check()
        async with self.page.expect_navigation() as navigation:
            await scope.locator(button).first.click()
        response = await navigation.value
        assert response is not None and response.status < 500, (form, response and response.status)
        assert "Traceback" not in await self.page.content()
        return response

    async def text(self, selector: str) -> str:
        return str(await self.page.locator(selector).first.inner_text())

    async def shot(self, name: str) -> None:
        await self.page.screenshot(path=str(SHOTS / f"console-{name}.png"), full_page=True)

    async def login(self, login: str, password: str, code: str | None = None) -> None:
        """The login page: its script runs SCRAM with the password; the code step when the core asks."""
        await submit_login(self.page, self.url, login, password)
        if code is None:
            await self.page.wait_for_selector('[data-test="logout"]')      # the script went on to the console
            return
        await self.page.wait_for_selector("#otp-code", state="visible")
        await self.page.fill("#otp-code", code)
        async with self.page.expect_navigation():
            await self.page.click("#otp-submit")

    async def logout(self) -> None:
        async with self.page.expect_navigation():
            await self.page.click("#logout")
        assert "/login" in self.page.url


class Authenticator:
    """The operator's TOTP app. The core takes a code once (its time step must be newer than the
    last one accepted) and within one step either side of now, so the next code may be tomorrow's."""

    def __init__(self, secret_b32: str) -> None:
        from billcore.common.totp import parse_b32

        self.secret = parse_b32(secret_b32)
        self.last_step = 0

    def code(self) -> str:
        from billcore.common.totp import totp

        while True:
            now_step = int(time.time()) // 30
            step = max(now_step, self.last_step + 1)
            if step <= now_step + 1:
                self.last_step = step
                return totp(self.secret, step * 30)
            time.sleep(0.5)               # two logins within one step: wait for the clock, not a fixed time

    def wrong(self) -> str:
        from billcore.common.totp import totp

        now = int(time.time())
        valid = {totp(self.secret, now + delta) for delta in (-30, 0, 30)}
        return next(code for code in ("000000", "111111", "222222") if code not in valid)


@pytest.fixture
async def day(tmp_path: Path) -> Any:
    need_chromium()
    need_peer(shutil.which("radclient") is not None, "radclient (Debian freeradius-utils) is not installed")
    plugin_dir, trusted = signed_example_plugin(tmp_path / "signing")
    auth_port, acct_port = free_port(socket.SOCK_DGRAM), free_port(socket.SOCK_DGRAM)
    flow_port = free_port(socket.SOCK_DGRAM)
    nas = NasSimulator(NAS_SECRET.encode(), load_dictionary())
    nas_port = await nas.start("127.0.0.1", 0)
    try:
        async with console_stack(
            tmp_path,
            radius={"enabled": True, "host": "127.0.0.1", "auth_port": auth_port, "acct_port": acct_port,
                    "coa_timeout": 1.0},
            netflow={"enabled": True, "host": "127.0.0.1", "port": flow_port, "workers": 1,
                     "fsync_interval": 0.05, "ship_interval": 0.2},
            plugins={"dir": str(plugin_dir), "key_dir": str(trusted)},
        ) as stack:
            stack.bc.wait_for(r'role=radius .*msg="core connected"', timeout=60)
            stack.bc.wait_for(r'role=netflow .*msg="netflow serving"', timeout=60)
            # the network is the installer's, not this operator's day: the NAS is there already
            await stack.admin.call("radius.nas_add", {"name": "bras-1", "address": "127.0.0.1",
                                                      "secret": NAS_SECRET, "coa_port": nas_port,
                                                      "require_message_authenticator": False})
            for n, (name, paid) in enumerate(CUSTOMERS):          # the ISP's customers of yesterday
                made = await stack.admin.call("users.create", {"login": f"c{n:03d}", "password": f"pw-c{n:03d}-x",
                                                               "full_name": name, "phone": f"+7 905 400 {n:04d}"})
                if paid:
                    await stack.admin.call("payments.add", {"account_id": made["basic_account_id"], "amount": paid,
                                                            "method": "bank", "external_id": f"day-0-{n}"})
            stack.extra.update(nas=nas, auth_port=auth_port, acct_port=acct_port, flow_port=flow_port)
            yield stack
    finally:
        nas.close()


@pytest.mark.timeout(900)
async def test_an_operators_day(day: ConsoleStack) -> None:
    SHOTS.mkdir(parents=True, exist_ok=True)
    async with chromium(locale="en-US") as context:
        page = await context.new_page()
        page.on("dialog", lambda dialog: dialog.accept())      # the confirmations the pages ask
        op = Operator(page, day.url)
        await operator_made_and_enrolled(day, op)
        ids = await tariff_built(day, op)
        user_id, account_id = await subscriber_made(day, op, ids)
        await payment_taken(day, op, user_id, account_id)
        await traffic_seen(day, op, user_id, account_id, ids)
        await blocked_and_disconnected(day, op, user_id, account_id)
        await tariff_changed_next_period(day, op, user_id, account_id, ids)
        await plugin_loaded_and_unloaded(day, op)
        await audit_found(day, op, user_id, account_id)
    assert "Traceback" not in day.bc.log()


async def operator_made_and_enrolled(day: ConsoleStack, op: Operator) -> None:
    """root makes olga a superuser; she enrolls TOTP and from then on logs in with a code."""
    await op.page.goto(day.url + "/")
    assert "/login" in op.page.url                                    # no session: the login page
    await op.shot("login")
    await op.login("root", ROOT_PASSWORD)
    await op.goto("/operators/new")
    await op.submit('[data-test="operator-form"]', {"login": OPERATOR, "full_name": "Olga Petrova",
                                                   "password": OPERATOR_PASSWORD, "password_again": OPERATOR_PASSWORD},
                    check=['input[name="groups"][value="superusers"]'])
    made = {row["login"]: row for row in await day.admin.call("operators.list", {})}
    assert made[OPERATOR]["groups"] == ["superusers"] and not made[OPERATOR]["otp_enrolled"]
    await op.logout()

    await op.login(OPERATOR, OPERATOR_PASSWORD)
    await op.goto("/me/otp")
    await op.submit("#otp-begin")
    app = Authenticator(await op.text("#otp-secret"))
    await op.shot("otp")
    await op.submit("#otp-confirm", {"code": app.code()})
    assert await op.page.locator("#recovery-codes li").count() == 10
    await op.logout()

    # a wrong code is refused on the login page; the right one, typed again, opens the console
    await submit_login(op.page, day.url, OPERATOR, OPERATOR_PASSWORD)
    await op.page.wait_for_selector("#otp-code", state="visible")
    await op.page.fill("#otp-code", app.wrong())
    await op.page.click("#otp-submit")
    await op.page.wait_for_selector("#login-error", state="visible")
    assert "/login" in op.page.url
    await op.page.fill("#otp-code", app.code())
    async with op.page.expect_navigation():
        await op.page.click("#otp-submit")
    assert await op.text("#operator") == OPERATOR
    enrolled = {row["login"]: row["otp_enrolled"] for row in await day.admin.call("operators.list", {})}
    assert enrolled[OPERATOR] is True
    await op.goto("/operators")
    assert await op.page.locator(f'tr[data-login="{OPERATOR}"]').count() == 1
    await op.shot("operators")


async def tariff_built(day: ConsoleStack, op: Operator) -> dict[str, int]:
    """Two traffic classes, a night range, a per-MB traffic service priced for both, a tariff."""
    for name, remote in (("local", LOCAL_NET), ("internet", "0.0.0.0/0")):
        await op.goto("/classes")
        await op.submit("#class-form", {"name": name})
        article = op.page.locator(f'article[data-class="{name}"]')
        await article.locator("summary").click()                      # the rule form folds away
        await op.submit(f'article[data-class="{name}"] form.rule-form', {"remote_net": remote})
    await op.goto("/timeranges")
    await op.submit("#range-form", {"name": "night", "days_0": "mon-sun", "start_0": "23:00", "end_0": "07:00"})
    classes = {row["name"]: row["id"] for row in await day.admin.call("classes.list", {})}
    ranges = {row["name"]: row["id"] for row in await day.admin.call("timeranges.list", {})}
    assert {"local", "internet"} <= classes.keys() and "night" in ranges, (classes, ranges)
    rules = {row["name"]: row.get("rules", []) for row in await day.admin.call("classes.list", {})}
    assert rules["local"] and rules["internet"], rules

    await op.goto("/services/new")
    await op.submit("#service-form", {"name": "traffic"}, choose={"kind": "traffic"})
    match = re.search(r"/services/(\d+)", op.page.url)
    assert match, op.page.url
    service = int(match.group(1))
    # a rate per class, the same in and out of the night range (the bill must not depend on
    # the hour the test runs)
    for name, price in (("local", LOCAL_PER_MB), ("internet", INTERNET_PER_MB)):
        for period in ("", str(ranges["night"])):
            await op.submit("#rate-form", {"tier_price_0": price},
                            choose={"class_id": str(classes[name]), "range_id": period, "unit": "MB"})
    rates = {(rate["class_id"], rate["range_id"]) for row in await day.admin.call("services.list", {})
             if row["id"] == service for rate in row["rates"]}
    assert len(rates) == 4, rates

    await op.goto("/tariffs/new")
    await op.page.fill('#tariff-form [name="name"]', "Home 100")
    await op.page.check(f'#tariff-form [name="service_{service}"]')
    await op.submit("#tariff-form", button="#show-quote")              # what a sample month would cost
    assert await op.text("#quote-total")
    await op.shot("tariff-form")
    await op.submit("#tariff-form", button="#save-tariff")
    tariffs = {row["name"]: row["id"] for row in await day.admin.call("tariffs.list", {})}
    assert "Home 100" in tariffs
    return {"service": service, "tariff": tariffs["Home 100"]}


async def subscriber_made(day: ConsoleStack, op: Operator, ids: dict[str, int]) -> tuple[int, int]:
    """A new subscriber with a static IP and the new tariff, found again by name, IP and account id."""
    await op.goto("/subscribers/new")
    await op.submit('[data-test="subscriber-form"]',
                    {"login": "dana", "password": "dana-office-pw", "full_name": "Dana Scully",
                     "phone": "+7 903 555 0101", "email": "dana@example.net", "ip": SUBSCRIBER_IP},
                    choose={"tariff_id": str(ids["tariff"])})
    match = re.search(r"/subscribers/(\d+)", op.page.url)
    assert match, op.page.url
    user_id = int(match.group(1))
    user = await day.admin.call("users.get", {"user_id": user_id})
    account_id = int(user["accounts"][0]["id"])
    assert SUBSCRIBER_IP in await op.text('[data-test="bindings"]')
    assert "Home 100" in await op.text("#tariff-now")
    for text in ("Scully", SUBSCRIBER_IP, str(account_id)):
        await op.goto("/subscribers?q=" + text)
        rows = op.page.locator('[data-test="result"]')
        assert await rows.count() == 1, text
        assert "dana" in await rows.first.inner_text()
    await op.goto("/subscribers")
    assert await op.page.locator('[data-test="result"]').count() == len(CUSTOMERS) + 1
    await op.shot("subscribers")
    return user_id, account_id


async def payment_taken(day: ConsoleStack, op: Operator, user_id: int, account_id: int) -> None:
    """A payment; the same bank transfer typed again with another amount is refused in words, nothing booked."""
    await op.goto(f"/subscribers/{user_id}")
    await op.submit('[data-test="payment-form"]', {"amount": PAID, "external_id": "bank-2026-0001"})
    assert plain(await op.text('[data-test="balance"]')) == PAID
    response = await op.submit('[data-test="payment-form"]', {"amount": "50.00", "external_id": "bank-2026-0001"})
    assert response.status == 409
    error = await op.text('[data-test="error"]')
    assert error.strip() and "payments.conflict" not in error, error          # words, not a code
    assert (await day.admin.call("accounts.get", {"account_id": account_id}))["balance"] == 500_000_000
    # the same transfer sent twice (a double click, a retried file): booked once, and said so
    await op.goto(f"/subscribers/{user_id}")
    response = await op.submit('[data-test="payment-form"]', {"amount": PAID, "external_id": "bank-2026-0001"})
    assert response.status == 200 and await op.text("#notice")
    assert plain(await op.text('[data-test="balance"]')) == PAID
    assert (await day.admin.call("accounts.get", {"account_id": account_id}))["balance"] == 500_000_000


async def traffic_seen(day: ConsoleStack, op: Operator, user_id: int, account_id: int,
                       ids: dict[str, int]) -> None:
    """The router exports the subscriber's flows (v5 and v9); the card shows the traffic and the charge."""
    now_ms = int(time.time() * 1000)
    local = [FlowSpec(SUBSCRIBER_IP, LOCAL_PEER, 40000 + i, 80, 6, 3_000_000 + i, 2000, now_ms - 400, now_ms - 100)
             for i in range(10)]
    internet = [FlowSpec(INTERNET_PEER, SUBSCRIBER_IP, 443, 50000 + i, 6, 7_000_000 + 13 * i, 5000,
                         now_ms - 400, now_ms - 100) for i in range(10)]
    clock = ExportClock(now_ms - 3_600_000, now_ms)
    packets = build_v5(local, clock) + build_v9(internet, clock, source_id=7)
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as sock:
        for packet in packets:
            sock.sendto(packet, ("127.0.0.1", day.extra["flow_port"]))
    local_bytes, internet_bytes = sum(f.bytes for f in local), sum(f.bytes for f in internet)
    charge = local_bytes * 20_000 // 1_000_000 + internet_bytes * 100_000 // 1_000_000
    expected = format_money(500_000_000 - charge)

    async def card_shows_the_charge() -> bool:
        await op.page.goto(f"{day.url}/subscribers/{user_id}")
        return plain(await op.text('[data-test="balance"]')) == expected

    await eventually_awaited(card_shows_the_charge, timeout=90, every=1.0, what="the charge on the card")
    for name in ("local", "internet"):                                 # a row per class, with bytes
        assert await op.page.locator(f'[data-test="traffic"] tr[data-class="{name}"]').count() == 1, name
    await op.shot("card")


async def blocked_and_disconnected(day: ConsoleStack, op: Operator, user_id: int, account_id: int) -> None:
    """A live session on the NAS; blocking from the card sends it a Disconnect-Request."""
    nas: NasSimulator = day.extra["nas"]
    await day.admin.call("radius.link_add", {"account_id": account_id, "login": "dana", "password": "trustno1"})
    _, out = await radclient(day.extra["acct_port"], "acct", f'User-Name = "dana", Acct-Session-Id = "DAY-1",'
                                                          f' Acct-Status-Type = Start,'
                                                          f' Framed-IP-Address = {SESSION_IP}',
                             secret=NAS_SECRET)
    assert "Accounting-Response" in out, out
    nas.sessions["DAY-1"] = "dana"
    await op.goto("/network/online")
    await op.page.wait_for_selector('tr[data-session="DAY-1"]')
    await op.shot("online")
    seen = len(nas.received)

    await op.goto(f"/subscribers/{user_id}")
    await op.submit('[data-test="block-form"]', {"reason": "unpaid router rent"})
    assert await op.page.locator('[data-test="blocked"]').count() == 1

    async def disconnected() -> bool:
        return "DAY-1" not in nas.sessions

    await eventually_awaited(disconnected, timeout=20, what="the Disconnect-Request at the NAS")
    code, attrs = nas.received[seen]
    assert code == 40 and attrs[44] == [b"DAY-1"], (code, attrs)
    _, out = await radclient(day.extra["auth_port"], "auth", 'User-Name = "dana", User-Password = "trustno1"',
                             secret=NAS_SECRET)
    assert "Access-Reject" in out, out
    await radclient(day.extra["acct_port"], "acct", 'User-Name = "dana", Acct-Session-Id = "DAY-1",'
                                                    ' Acct-Status-Type = Stop, Acct-Session-Time = 5,'
                                                    ' Acct-Terminate-Cause = Admin-Reset', secret=NAS_SECRET)

    await op.submit('[data-test="unblock-form"]')
    assert await op.page.locator('[data-test="blocked"]').count() == 0
    assert (await day.admin.call("accounts.get", {"account_id": account_id}))["blocks"] == []


async def tariff_changed_next_period(day: ConsoleStack, op: Operator, user_id: int, account_id: int,
                                     ids: dict[str, int]) -> None:
    await op.goto("/tariffs/new")
    await op.page.fill('#tariff-form [name="name"]', "Home 200")
    await op.page.check(f'#tariff-form [name="service_{ids["service"]}"]')
    await op.submit("#tariff-form", button="#save-tariff")
    tariffs = {row["name"]: row["id"] for row in await day.admin.call("tariffs.list", {})}
    await op.goto(f"/subscribers/{user_id}")
    await op.submit('[data-test="tariff-form"]', choose={"tariff_id": str(tariffs["Home 200"]), "start": "next_period"})
    assert await op.text("#tariff-now") == "Home 100"                  # until the period ends
    assert await op.text(".tariff-scheduled") == "Home 200"            # and from the next one
    history = await day.admin.call("tariffs.history", {"account_id": account_id})
    later = [row for row in history if row["tariff_id"] == tariffs["Home 200"]]
    assert later, history


async def plugin_loaded_and_unloaded(day: ConsoleStack, op: Operator) -> None:
    await op.goto("/system/plugins")
    await op.submit('[data-test="plugin-load"]', {"path": "example"})
    assert await op.text('[data-test="plugin-example"] td.state') == "loaded"
    listed = {row["name"]: row for row in await day.admin.call("plugins.list", {})}
    assert listed["example"]["state"] == "loaded"
    await op.shot("plugins")
    await op.submit('[data-test="plugin-example"] form', button='[data-test="unload-example"]')   # confirmed
    listed = {row["name"]: row for row in await day.admin.call("plugins.list", {})}
    assert "example" not in listed or listed["example"]["state"] != "loaded", listed


async def audit_found(day: ConsoleStack, op: Operator, user_id: int, account_id: int) -> None:
    """Every change of the day is in the audit log, under olga's name and from the browser's address."""
    await op.goto(f"/system/audit?login={OPERATOR}")
    actions = {text.strip() for text in await op.page.locator('[data-test="audit-row"] td.action').all_inner_texts()}
    for action in ("plugins.load", "plugins.unload", "users.create", "bindings.add", "payments.add", "blocks.set", "blocks.lift", "tariffs.link",
                   "tariffs.add", "services.add", "services.set_rate", "classes.add", "classes.add_rule",
                   "timeranges.add", "self.otp_confirm"):
        assert action in actions, f"{action} not among {', '.join(sorted(actions))}"
    await op.shot("audit")
    await op.goto(f"/subscribers/{user_id}")
    trail = await op.text('[data-test="audit"]')
    assert "payments.add" in trail and OPERATOR in trail, trail
