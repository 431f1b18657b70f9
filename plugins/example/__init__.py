"""A minimal billcore plugin: copy it with `billcore plugin new NAME`.

* ``setup(api)`` declares everything the plugin adds; nothing else of the
  core is imported but ``billcore.plugins.api``.
* Import the plugin's own modules relatively (``from . import x``): the
  package is loaded under a private name from its signed bytes.
* ``teardown()`` (optional) runs once after the plugin is unloaded and no
  session uses its calls any more.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from billcore.plugins.api import PAYMENT_ADDED, PluginAPI

from .greeting import greet


def setup(api: PluginAPI) -> None:
    greeting = str(api.config["greeting"])

    async def hello(ctx: Any, name: str = "world") -> str:
        """Say hello; shows a call with one optional argument."""
        return greet(greeting, name)

    async def on_payment(payment: Mapping[str, Any]) -> None:
        if api.db is not None:
            await api.db.execute(
                "INSERT INTO seen_payments (external_id, account_id, amount) VALUES ($1, $2, $3)"
                " ON CONFLICT DO NOTHING",
                str(payment["external_id"]), int(payment["account_id"]), int(payment["amount"]))

    async def heartbeat() -> None:
        api.log.debug("example plugin alive")

    api.register_call("example.hello", hello, right=None, args={"name": "str?"}, result="str")
    api.on(PAYMENT_ADDED, on_payment)
    api.schedule(60, heartbeat)


def teardown() -> None:
    pass
