"""The console's shared state: one ``Console`` per application, and per request keys.

``console.app`` fills it; ``console.page`` (what pages use) and
``console.login`` read it.  Kept apart so neither imports the app.
"""

from __future__ import annotations

import contextvars
from dataclasses import dataclass, field
from typing import Any

import jinja2
from aiohttp import web

from billcore.common.config import ConsoleSection
from webedge.core_link import CoreLink
from webedge.guard import LoginLimiter
from webedge.i18n import Translator
from webedge.render import Currency

from .live import LiveHub
from .operators_book import Operator, OperatorBook
from .pending_logins import PendingLogins

__all__ = ["Console", "CONSOLE", "SID", "OPERATOR", "FORM", "TR", "DEADLINE", "STREAMED", "NavEntry", "current_words",
           "SID_COOKIE", "PRE_COOKIE", "LANG_COOKIE", "current_currency"]

SID_COOKIE = "console_sid"
PRE_COOKIE = "console_pre"
LANG_COOKIE = "console_lang"


@dataclass(frozen=True, slots=True)
class NavEntry:
    path: str
    key: str                       # the label is t("nav." + key)
    needs: tuple[str, ...]


@dataclass(slots=True)
class Console:
    section: ConsoleSection
    link: CoreLink
    key: bytes                                     # signs CSRF tokens
    env: jinja2.Environment
    catalogs: dict[str, dict[str, str]]
    live: LiveHub
    limiter: LoginLimiter
    book: OperatorBook = field(default_factory=OperatorBook)
    logins: PendingLogins = field(default_factory=PendingLogins)
    nav: list[NavEntry] = field(default_factory=list)
    currency: Currency = field(default_factory=Currency)   # [billing]: every amount's decimals and code
    issuer: Any = None          # documents.view.Issuer ([documents]): the ISP on invoices and statements


CONSOLE: web.AppKey[Console] = web.AppKey("console", Console)
SID: web.RequestKey[bytes | None] = web.RequestKey("sid", object)  # type: ignore[arg-type]
OPERATOR: web.RequestKey[Operator] = web.RequestKey("operator", Operator)
FORM: web.RequestKey[dict[str, str]] = web.RequestKey("form", dict)
TR: web.RequestKey[Translator] = web.RequestKey("t", Translator)
DEADLINE: web.RequestKey[Any] = web.RequestKey("deadline", object)  # the request's asyncio.Timeout
# a download whose headers are out (``console.page.start_download``): past its deadline it is cut, not answered
STREAMED: web.RequestKey[web.StreamResponse] = web.RequestKey("streamed", web.StreamResponse)

# the words of the request being answered, for ``console.page.t``
current_words: contextvars.ContextVar[Translator] = contextvars.ContextVar("console_words")
# the installation's currency ([billing]), for amounts the pages format in Python (``console.page.money_text``)
current_currency: contextvars.ContextVar[Currency] = contextvars.ContextVar("console_currency", default=Currency())
