"""The console's /system/tokens page: list, create (the token shown once), revoke with confirm — through the
real console login against the real core; and the page is offered only to an operator whose call table has
tokens.*."""

from __future__ import annotations

import html
import re

from tests.console_harness import ConsoleWorld, console_world  # noqa: F401  (console_world is a fixture)

TOKEN = re.compile(r'id="new-token" data-test="new-token">(bct_[A-Za-z0-9_-]{43})<')


async def test_create_show_once_list_and_revoke(console_world: ConsoleWorld) -> None:
    boss = await console_world.operator("boss")
    home = await boss.get("/")
    assert 'href="/system/tokens"' in home.text
    empty = await boss.get("/system/tokens")
    assert empty.status == 200 and "No API tokens yet." in empty.text and 'value="cashiers"' in empty.text

    made = await boss.post("/system/tokens", {"name": "crm", "groups": ["cashiers", "not-a-role"],
                                              "expires": "2031-06-30"})
    assert made.status == 200, made.text
    found = TOKEN.search(made.text)
    assert found, made.text
    token = found.group(1)
    assert "shown this once" in made.text and 'data-test="token-crm"' in made.text
    row = await console_world.core.pool.fetchrow("SELECT groups, expires_at, created_by FROM api_tokens"
                                                 " WHERE name = 'crm'")
    assert list(row["groups"]) == ["cashiers"] and row["expires_at"].isoformat().startswith("2031-06-30T23:59:59")
    assert row["created_by"].startswith("admin:boss")
    # never again: the list shows the token's facts, not the token
    again = await boss.get("/system/tokens")
    assert token not in again.text and token[4:20] not in again.text and 'data-test="token-crm"' in again.text

    # refusals are shown, with the core's words, and keep what was typed
    for fields, words in (({"name": "crm", "groups": "cashiers"}, "exists"),
                          ({"name": "bad name", "groups": "cashiers"}, "token name"),
                          ({"name": "nogroups"}, "groups"),
                          ({"name": "late", "groups": "cashiers", "expires": "2001-01-01"}, "future"),
                          ({"name": "odd", "groups": "cashiers", "expires": "soon"}, "not a date")):
        refused = await boss.post("/system/tokens", fields)
        assert refused.status == 400 and 'data-test="error"' in refused.text, fields
        assert words in html.unescape(refused.text), (fields, refused.text[:2000])
        assert not TOKEN.search(refused.text)

    token_id = await console_world.core.pool.fetchval("SELECT id FROM api_tokens WHERE name = 'crm'")
    listed = await boss.get("/system/tokens")
    assert f'action="/system/tokens/{token_id}/revoke"' in listed.text and "data-confirm=" in listed.text
    revoked = await boss.post(f"/system/tokens/{token_id}/revoke")
    assert revoked.status == 303
    after = await boss.get(revoked.headers["Location"])
    assert "The token is revoked" in after.text and f"/system/tokens/{token_id}/revoke" not in after.text
    assert await console_world.core.pool.fetchval("SELECT revoked_at IS NOT NULL FROM api_tokens"
                                                  " WHERE id = $1", token_id)
    audit = await console_world.core.pool.fetch("SELECT action, principal_login FROM audit_log"
                                                " WHERE action LIKE 'tokens.%' ORDER BY id")
    assert [tuple(r) for r in audit] == [("tokens.create", "boss"), ("tokens.revoke", "boss")]
    assert (await boss.post("/system/tokens/99999999/revoke")).status == 404


async def test_the_page_is_only_for_operators_with_tokens_calls(console_world: ConsoleWorld) -> None:
    cashier = await console_world.operator("cora", ["cashiers"])
    assert 'href="/system/tokens"' not in (await cashier.get("/")).text
    assert (await cashier.get("/system/tokens")).status == 403
    assert (await cashier.post("/system/tokens", {"name": "x", "groups": "superusers"})).status == 403
    # a group that may read tokens but not make them sees the list without the form or revoke buttons
    await console_world.group("token_readers", ["tokens.read"])
    reader = await console_world.operator("rita", ["token_readers"])
    await console_world.root.call("tokens.create", {"name": "seen", "groups": ["support"]})
    page = await reader.get("/system/tokens")
    assert page.status == 200 and 'data-test="token-seen"' in page.text
    assert 'id="token-form"' not in page.text and "/revoke" not in page.text
    assert (await reader.post("/system/tokens", {"name": "x", "groups": "support"})).status == 403
