"""Console pages: operators (being written)."""

from __future__ import annotations

from console.page import Page

ROUTES = Page.routes()

MESSAGES: dict[str, tuple[str, str]] = {}
