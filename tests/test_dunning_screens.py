"""Dunning and fair usage where people see them: the console card's section (an operator) and the web office's
banner (the subscriber), against the real core over URFA, after a dunning pass on a driven clock; bad inputs to
the fup/dunning calls answer clear codes, and a subscriber reads only their own status."""

from __future__ import annotations

import datetime as dt
from pathlib import Path
from typing import Any

import aiohttp
import pytest

from billcore.billing import dunning, fup
from billcore.billing.ledger import Entry, post_charges
from billcore.billing.tariffs import link_tariff
from tests.console_harness import ConsoleWorld, console_world  # noqa: F401  (a fixture)
from tests.test_console_subscribers import seed
from tests.test_portal_e2e import http_login
from tests.test_portal_harness import LiveCore, LiveOffice, live_core, seed_subscriber  # noqa: F401  (a fixture)
from urfa import client as uc
from urfa.errors import CallFailed

UNIT = 1_000_000
DAY = dt.timedelta(days=1)


async def in_debt_under_a_policy(root: Any, pool: Any, account_id: int, days_in_debt: int) -> dt.datetime:
    """A tariff with a policy (grace 2 days, throttle, block after 5), the account on it and in debt, and the
    dunning passes of ``days_in_debt`` days; the debt's start."""
    tariff = (await root.call("tariffs.add", {"name": "dunned", "service_ids": []}))["id"]
    profile = await root.call("fup.profiles_set", {"name": "debtor", "down_kbps": 256, "up_kbps": 128})
    policy = await root.call("dunning.policies_set", {"tariff_id": tariff, "grace_days": 2,
                                                      "throttle_profile": profile, "block_after_days": 5})
    assert policy["grace_days"] == 2 and policy["close_after_days"] is None
    since = dt.datetime.now(dt.timezone.utc) - days_in_debt * DAY - dt.timedelta(hours=1)   # the passes end now
    async with pool.acquire() as conn:
        await link_tariff(conn, account_id, tariff, now=since - DAY, tz=dt.timezone.utc, actor="test")
        async with conn.transaction():
            await post_charges(conn, [Entry(account_id, -10 * UNIT, "charge", f"debt-{account_id}")], actor="test",
                               now=since)
        for day in range(days_in_debt + 1):
            await dunning.dunning_step(conn, since + day * DAY, dt.timezone.utc)
    return since


async def test_the_card_shows_the_dunning_step_and_the_speed_limit(console_world: ConsoleWorld) -> None:  # noqa: F811
    made = await seed(console_world.root, "dora")
    since = await in_debt_under_a_policy(console_world.root, console_world.core.pool, made["account_id"], 3)
    state = await console_world.root.call("dunning.state", {"account_id": made["account_id"]})
    assert state["step"] == "throttled" and [s["step"] for s in state["steps"]][::-1] == ["grace", "throttled"]
    browser = await console_world.operator("olga")
    page = await browser.get(f"/subscribers/{made['user_id']}?account={made['account_id']}")
    assert page.status == 200, page.text[:2000]
    assert 'id="dunning-step" data-step="throttled"' in page.text
    assert 'id="block-on"' in page.text and (since + 5 * DAY).strftime("%Y-%m-%d") in page.text
    # fup.state reads the throttle in force on the core's clock: the dunning throttle since the third pass
    assert 'id="fup-rate" data-throttled="yes"' in page.text and "debtor" in page.text


async def test_the_office_shows_the_subscriber_a_banner(live_core: LiveCore, tmp_path: Path) -> None:  # noqa: F811
    admin = await live_core.admin()
    try:
        account = await seed_subscriber(admin, "erin", "erin-password")
        await in_debt_under_a_policy(admin, live_core.pool, account, 0)
        async with LiveOffice(live_core.link(), tmp_path) as office, \
                aiohttp.ClientSession(cookie_jar=aiohttp.CookieJar(unsafe=True)) as http:
            assert (await http_login(http, office.url, "erin", "erin-password")).status == 303
            async with http.get(office.url + "/") as r:
                text = await r.text()
            assert r.status == 200 and 'id="restriction" data-step="grace"' in text and "overdue" in text
            # pays: the payment's own transaction clears the cycle and the banner goes
            await admin.call("payments.add", {"account_id": account, "amount": 20 * UNIT, "method": "cash"})
            async with live_core.pool.acquire() as conn:
                assert account not in await fup.throttle_profiles(conn, [account], dt.datetime.now(dt.timezone.utc))
            async with http.get(office.url + "/") as r:
                assert 'id="restriction"' not in await r.text()
            mine = await admin.call("dunning.state", {"account_id": account})
            assert mine["step"] == "cleared"
    finally:
        await admin.close()


async def test_bad_inputs_answer_clear_codes_and_a_subscriber_sees_only_their_own(
        live_core: LiveCore) -> None:  # noqa: F811
    admin = await live_core.admin()
    try:
        mine = await seed_subscriber(admin, "fay", "fay-password")
        other = await seed_subscriber(admin, "gus", "gus-password")
        periodic = (await admin.call("services.add", {"name": "fee", "kind": "periodic", "fee": UNIT,
                                                      "period": {"kind": "monthly", "anchor": "2025-01-01"},
                                                      "charge_mode": "start"}))["id"]
        tariff = (await admin.call("tariffs.add", {"name": "t", "service_ids": [periodic]}))["id"]
        profile = await admin.call("fup.profiles_set", {"name": "p", "down_kbps": 1000, "up_kbps": 1000})
        refused = {
            "fup.profiles_set": ({"name": "q", "down_kbps": 1, "up_kbps": 1, "attributes": [["No-Such", "x"]]},
                                 "billing.invalid"),
            "fup.quotas_set": ({"service_id": periodic, "quota_bytes": 10, "profile_id": profile}, "billing.invalid"),
            "dunning.policies_set": ({"tariff_id": tariff, "grace_days": 9, "block_after_days": 2},
                                     "billing.invalid"),
            "fup.nas_set": ({"id": 1, "kind": "juniper"}, "billing.invalid"),
        }
        for name, (args, code) in refused.items():
            with pytest.raises(CallFailed) as failed:
                await admin.call(name, args)
            assert failed.value.code == code, (name, failed.value.code, failed.value.message)
        with pytest.raises(CallFailed) as failed:
            await admin.call("dunning.policies_set", {"tariff_id": 10**12})
        assert failed.value.code == "core.unknown"
        with pytest.raises(CallFailed) as failed:
            await admin.call("fup.quotas_set", {"service_id": 10**12, "quota_bytes": 10, "profile_id": profile})
        assert failed.value.code == "core.unknown"

        subscriber = await uc.connect("127.0.0.1", live_core.port)
        try:
            await subscriber.login("user", "fay", "fay-password")
            own = await subscriber.call("me.dunning", {})
            assert own == {"account_id": mine, "step": "none", "debt_since": None, "block_on": None,
                           "throttled": False}
            with pytest.raises(CallFailed) as failed:
                await subscriber.call("me.dunning", {"account_id": other})
            assert failed.value.code == "accounts.unknown"
            with pytest.raises(CallFailed):
                await subscriber.call("dunning.state", {"account_id": mine})
        finally:
            await subscriber.close()
    finally:
        await admin.close()
