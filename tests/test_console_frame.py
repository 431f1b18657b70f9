"""The console's frame: login through the real SCRAM relay, the dashboard, navigation by call table."""

from __future__ import annotations

from typing import Any

from tests.console_harness import ConsoleWorld, console_world  # noqa: F401  (a fixture)


async def test_operator_logs_in_and_sees_the_dashboard(console_world: ConsoleWorld) -> None:
    browser = await console_world.operator("carol")
    page = await browser.get("/")
    assert page.status == 200, page.text
    assert 'id="operator">carol<' in page.text
    assert 'id="figure-online"' in page.text   # radius.sessions: a superuser's table has it
