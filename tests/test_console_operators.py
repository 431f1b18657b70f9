"""The console's own pages for people: operators (create with roles, edit roles, disable and
enable, set a password, reset 2FA) and an operator's own second factor at /me/otp, with the
login that then asks for a code — through the real login, against the real core."""

from __future__ import annotations

import html
import re
import time

import pytest

from billcore.common.totp import parse_b32, totp
from tests.console_harness import (  # noqa: F401  (console_world is a fixture)
    ConsoleBrowser, ConsoleWorld, LoginRefused, chromium, console_world, submit_login,
)


def _operator_id(location: str) -> int:
    found = re.fullmatch(r"/operators/(\d+)(\?.*)?", location)
    assert found, location
    return int(found.group(1))


async def test_create_edit_disable_enable_and_set_password(console_world: ConsoleWorld) -> None:
    boss = await console_world.operator("boss")
    listed = await boss.get("/operators")
    assert listed.status == 200 and 'data-test="operator-boss"' in listed.text
    form = await boss.get("/operators/new")
    assert 'value="cashiers"' in form.text and 'value="tariff_managers"' in form.text

    differ = await boss.post("/operators/new", {"login": "cora", "password": "cora-password-1",
                                                "password_again": "typo", "groups": "cashiers"})
    assert differ.status == 400 and "The two passwords differ." in differ.text
    made = await boss.post("/operators/new", {"login": "cora", "full_name": "Cora Cash",
                                              "password": "cora-password-1", "password_again": "cora-password-1",
                                              "groups": ["cashiers", "not-a-role"]})
    assert made.status == 303, made.text
    operator_id = _operator_id(made.headers["Location"])
    card = await boss.get(made.headers["Location"])
    assert "The operator is created." in card.text
    assert 'id="operator-groups">cashiers<' in card.text
    twice = await boss.post("/operators/new", {"login": "cora", "password": "cora-password-1",
                                               "password_again": "cora-password-1", "groups": "cashiers"})
    assert twice.status == 400 and 'data-test="error"' in twice.text

    # cora logs in: a cashier's table, a cashier's navigation
    cora = console_world.browser()
    await cora.login("cora", "cora-password-1")
    assert ">Operators</a>" not in (await cora.get("/")).text
    assert (await cora.get("/operators")).status == 403

    # new roles end her sessions (a call table is fixed at login)
    await boss.get(f"/operators/{operator_id}")
    saved = await boss.post(f"/operators/{operator_id}/edit", {"full_name": "Cora", "groups": ["support"]})
    assert saved.status == 303
    assert 'id="operator-groups">support<' in (await boss.get(f"/operators/{operator_id}")).text
    assert "/login" in (await cora.get("/")).url

    await boss.post(f"/operators/{operator_id}/disable")
    assert 'id="operator-state">disabled<' in (await boss.get(f"/operators/{operator_id}")).text
    with pytest.raises(LoginRefused):
        await cora.login("cora", "cora-password-1")
    await boss.post(f"/operators/{operator_id}/enable")
    await boss.get(f"/operators/{operator_id}")
    differ = await boss.post(f"/operators/{operator_id}/password", {"new_operator_password": "a-new-one-22",
                                                                     "new_operator_password_again": "other"})
    assert differ.status == 400
    done = await boss.post(f"/operators/{operator_id}/password", {"new_operator_password": "a-new-one-22",
                                                                   "new_operator_password_again": "a-new-one-22"})
    assert done.status == 303
    fresh = console_world.browser()
    await fresh.login("cora", "a-new-one-22")
    assert (await fresh.get("/")).status == 200
    # the audit log says who did it
    audit = await boss.get("/system/audit?login=boss")
    assert "operators.create" in audit.text or "operator" in audit.text
    assert (await boss.get("/operators/999999")).status == 404


async def _enroll(browser: ConsoleBrowser) -> tuple[bytes, list[str]]:
    page = await browser.get("/me/otp")
    assert page.status == 200
    setup = await browser.post("/me/otp/begin")
    assert setup.status == 200 and '<svg' in setup.text and "qr-code" in setup.text
    shown = re.search(r'data-test="otp-secret">([A-Z2-7=]+)<', setup.text)
    uri = re.search(r'name="uri" value="([^"]+)"', setup.text)
    assert shown and uri
    secret = parse_b32(html.unescape(shown.group(1)))
    browser.last_csrf = setup.csrf
    not_now = "000000" if totp(secret, time.time()) != "000000" else "111111"
    wrong = await browser.post("/me/otp/confirm", {"code": not_now, "uri": html.unescape(uri.group(1))})
    assert wrong.status == 400 and "<svg" in wrong.text            # the code again, with the QR code
    done = await browser.post("/me/otp/confirm", {"code": totp(secret, time.time())})
    assert done.status == 200, done.text
    codes = re.findall(r"<li>([^<]+)</li>", done.text.split('data-test="recovery-codes"')[1].split("</ol>")[0])
    assert len(codes) == 10
    return secret, codes


async def test_own_second_factor_then_login_asks_for_a_code(console_world: ConsoleWorld) -> None:
    nina = await console_world.operator("nina", groups=["cashiers"])      # any operator, whatever the role
    secret, codes = await _enroll(nina)

    again = console_world.browser()
    answer = await again.login("nina", "nina-password")
    assert answer.get("otp_required") is True
    assert (await again.get("/")).url.endswith("/login")                  # no session before the code
    with pytest.raises(LoginRefused) as wrong:
        await again._step("/login/otp", {"code": "12345"}, (await again.get("/login")).csrf)
    assert wrong.value.status in (400, 401)
    await again.otp(totp(secret, time.time() + 30))                        # a code counts once: the next step's
    assert 'id="operator">nina<' in (await again.get("/")).text

    third = console_world.browser()
    await third.login("nina", "nina-password", otp=codes[0])               # a recovery code instead
    assert 'id="operator">nina<' in (await third.get("/")).text

    # the superuser resets it: the password alone logs in again
    boss = await console_world.operator("boss")
    listed = await boss.get("/operators")
    nina_id = int(re.search(r'href="/operators/(\d+)">nina<', listed.text).group(1))  # type: ignore[union-attr]
    card = await boss.get(f"/operators/{nina_id}")
    assert 'id="operator-otp">on<' in card.text
    assert (await boss.post(f"/operators/{nina_id}/reset_otp")).status == 303
    plain = console_world.browser()
    assert (await plain.login("nina", "nina-password")).get("otp_required") is None


async def test_browser_login_with_totp_in_chromium(console_world: ConsoleWorld) -> None:
    olive = await console_world.operator("olive")
    secret, _ = await _enroll(olive)
    async with chromium(locale="ru-RU") as context:
        page = await context.new_page()
        await submit_login(page, console_world.url, "olive", "olive-password")
        assert "Вход в консоль" in await page.inner_text("h1")
        await page.wait_for_selector("#otp-form:not(.hidden)")
        await page.fill("input[name=code]", "000000" if totp(secret, time.time() + 30) != "000000" else "111111")
        await page.click("#otp-submit")
        await page.wait_for_selector("#login-error:not(.hidden)")
        assert "Неверный код." in await page.inner_text("#login-error")
        await page.fill("input[name=code]", totp(secret, time.time() + 30))
        async with page.expect_navigation():
            await page.click("#otp-submit")
        await page.wait_for_selector("#operator")
        assert await page.inner_text("#operator") == "olive"
