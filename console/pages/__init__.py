"""The console's page modules, in navigation order.

A module here has ``ROUTES`` (``console.page.Page.routes()``) and
``MESSAGES`` (``{key: (English, Russian)}``); a new area is one more line.
"""

from __future__ import annotations

from types import ModuleType

from . import automation, bulk, card, classes, dashboard, documents, me, network, notify, operators, reports, subscribers, system, tariffs, tokens
from . import whatif

__all__ = ["PAGES"]

PAGES: list[ModuleType] = [dashboard, subscribers, card, bulk, tariffs, classes, network, operators, system, tokens,
                           notify, me, automation, whatif, documents]
PAGES.insert(PAGES.index(tariffs) + 1, reports)   # the reports, after the tariffs they count by
