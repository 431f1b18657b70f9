"""The office's Notifications page against a real URFA core: a subscriber sees their language and opt-outs,
unchecks an event, and cannot opt out of an essential one."""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any

import aiohttp

from tests.test_portal_e2e import _csrf, http_login
from tests.test_portal_harness import LiveCore, LiveOffice, live_core, seed_subscriber  # noqa: F401 - the fixture


async def test_subscriber_sets_notifications_in_the_office(live_core: LiveCore, tmp_path: Path) -> None:
    admin = await live_core.admin()
    await seed_subscriber(admin, "vera", "vera-password")
    async with live_core.pool.acquire() as conn:
        await conn.execute("UPDATE users SET email = 'vera@example.test' WHERE login = 'vera'")
    await admin.close()
    async with LiveOffice(live_core.link(), tmp_path) as office:
        async with aiohttp.ClientSession(cookie_jar=aiohttp.CookieJar(unsafe=True),
                                         headers={"Accept-Language": "ru"}) as http:
            (await http_login(http, office.url, "vera", "vera-password")).release()
            async with http.get(office.url + "/notifications") as r:
                html = await r.text()
            assert r.status == 200 and "vera@example.test" in html and "Уведомления" in html
            assert 'href="/notifications"' in html
            assert re.search(r'name="send\.payment\.added" checked', html)
            assert 'name="send.account.blocked"' not in html          # essential: no checkbox to uncheck
            form: dict[str, Any] = {"csrf": _csrf(html), "language": "ru",
                                    "send.balance.low": "on", "send.account.blocked": ""}
            async with http.post(office.url + "/notifications", data=form) as r:
                html = await r.text()
            assert r.status == 200 and "Настройки уведомлений сохранены" in html
            assert re.search(r'name="send\.balance\.low" checked', html)
            assert not re.search(r'name="send\.payment\.added" checked', html)
            assert '<option value="ru" selected>' in html
            async with http.post(office.url + "/notifications", data={"language": "ru"}) as r:
                assert r.status == 403                                # no CSRF token
    rows = await live_core.pool.fetch("SELECT o.event FROM notify_optouts o JOIN users u ON u.id = o.user_id"
                                      " WHERE u.login = 'vera' ORDER BY 1")
    assert "payment.added" in [r["event"] for r in rows] and "account.blocked" not in [r["event"] for r in rows]
    assert "balance.low" not in [r["event"] for r in rows]
    assert await live_core.pool.fetchval("SELECT language FROM users WHERE login = 'vera'") == "ru"
