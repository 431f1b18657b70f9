"""The console's notification pages against a real core: templates edited and previewed, webhooks added with
their secret shown once, and pages shown only to operators whose call table has their calls."""

from __future__ import annotations

import html
import re

from tests.console_harness import ConsoleWorld, console_world  # noqa: F401  (console_world is a fixture)

SECRET = re.compile(r'id="new-secret" data-test="new-secret">(whsec_[A-Za-z0-9_-]{43})<')


async def test_templates_edit_preview_save_reset(console_world: ConsoleWorld) -> None:
    boss = await console_world.operator("boss")
    assert 'href="/notify/templates"' in (await boss.get("/")).text
    listed = await boss.get("/notify/templates")
    assert listed.status == 200 and 'data-test="template-balance.low-ru"' in listed.text
    page = await boss.get("/notify/templates/balance.low/en")
    assert page.status == 200 and "Your balance is low" in html.unescape(page.text)
    shown = await boss.post("/notify/templates/balance.low/en", {
        "action": "preview", "subject": "Low: {{ data.balance|money }}", "body": "Hi {{ login }}"})
    assert shown.status == 200 and "Low: 4.50" in shown.text and "Hi subscriber" in shown.text
    evil = await boss.post("/notify/templates/balance.low/en", {
        "action": "save", "subject": "x", "body": "{{ ''.__class__.__mro__ }}"})
    assert evil.status == 400 and "sandbox" in html.unescape(evil.text)
    saved = await boss.post("/notify/templates/balance.low/en", {
        "action": "save", "subject": "Low: {{ data.balance|money }}", "body": "Hi {{ login }}"})
    assert saved.status == 303
    assert await console_world.core.pool.fetchval(
        "SELECT subject FROM notify_templates WHERE event = 'balance.low' AND lang = 'en'") == \
        "Low: {{ data.balance|money }}"
    reset = await boss.post("/notify/templates/balance.low/en", {"action": "reset"})
    assert reset.status == 303
    assert await console_world.core.pool.fetchval("SELECT count(*) FROM notify_templates") == 0
    assert (await boss.get("/notify/templates/no.such/en")).status == 404


async def test_webhooks_secret_once_and_rights(console_world: ConsoleWorld) -> None:
    boss = await console_world.operator("boss")
    made = await boss.post("/notify/webhooks", {"name": "crm", "url": "https://crm.example.test/hook",
                                                "events": "payment.added, balance.low"})
    assert made.status == 200, made.text
    found = SECRET.search(made.text)
    assert found and 'data-test="webhook-crm"' in made.text
    again = await boss.get("/notify/webhooks")
    assert found.group(1) not in again.text
    bad = await boss.post("/notify/webhooks", {"name": "x", "url": "ftp://nope", "events": "*"})
    assert bad.status == 400 and 'data-test="error"' in bad.text and not SECRET.search(bad.text)
    hook_id = await console_world.core.pool.fetchval("SELECT id FROM webhooks WHERE name = 'crm'")
    tested = await boss.post(f"/notify/webhooks/{hook_id}/test")
    assert tested.status == 200 and "test event" in tested.text
    assert (await boss.post(f"/notify/webhooks/{hook_id}/disable")).status == 303
    assert await console_world.core.pool.fetchval("SELECT enabled FROM webhooks WHERE id = $1", hook_id) is False
    assert (await boss.post(f"/notify/webhooks/{hook_id}/delete")).status == 303
    assert (await boss.post(f"/notify/webhooks/{hook_id}/delete")).status == 404
    # a cashier's table has none of these calls: no links, 403 pages
    cashier = await console_world.operator("cora", ["cashiers"])
    home = (await cashier.get("/")).text
    assert 'href="/notify/templates"' not in home and 'href="/notify/webhooks"' not in home
    assert (await cashier.get("/notify/webhooks")).status == 403
    assert (await cashier.get("/notify/templates")).status == 403
    # readers see lists without forms
    await console_world.group("hook_readers", ["webhooks.read", "notify.read"])
    reader = await console_world.operator("rita", ["hook_readers"])
    page = await reader.get("/notify/webhooks")
    assert page.status == 200 and 'id="webhook-form"' not in page.text
    edit = await reader.get("/notify/templates/balance.low/en")
    assert edit.status == 200 and 'id="save"' not in edit.text
    assert (await reader.post("/notify/webhooks", {"name": "x", "url": "http://x.test/", "events": "*"})).status == 403
