"""The API console pages are written against.

A page module (``console/pages/<area>.py``, listed in ``console.pages.PAGES``)
collects its routes with ``ROUTES = Page.routes()`` and
``@ROUTES.get(path, needs=(…), nav=…)`` / ``@ROUTES.post(path, needs=(…))``,
and defines ``MESSAGES = {"key": ("English", "Русский")}``.

What a route can count on (the console's middleware and the route's
wrapper do it, so no page can forget it):

* the browser is logged in (else it is sent to the login page), and every
  call of ``needs`` is in the operator's call table (else the 403 page:
  a URL typed by hand reaches no more than the navigation shows);
* a POST carried the CSRF token of the operator's session;
* the request is bounded in body size and time; the core being down is the
  503 page, an unexpected error a plain 500 page (never a traceback).

Inside a handler: ``await call(request, name, **args)`` calls as the
operator (``Refused`` carries any refusal the page should show),
``stream`` reads a streamed call, ``render`` answers a template,
``await form(request)`` is the posted fields, ``redirect`` answers a 303
(``message=`` a key shown once on the next page), ``t(key, **values)`` is
the request's language, ``live(request, topics)`` an SSE stream of
"changed" notices.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Iterable
from dataclasses import dataclass, field
from typing import Any, TypeVar

from aiohttp import web

from webedge.core_link import CoreDown, Refused, SessionGone
from webedge.guard import csrf_token
from webedge.http import client_ip, local_path, security_headers, see_other
from webedge.i18n import LANGUAGES

from billcore.common.money import format_money

from .context import CONSOLE, DEADLINE, FORM, OPERATOR, SID, STREAMED, current_currency, current_words
from .operators_book import Operator

__all__ = ["Page", "Routes", "Route", "call", "stream", "render", "form", "redirect", "Refused", "t", "live",
           "Forbidden", "operator_of", "browser_ip", "money_text", "start_download", "keep_going"]

Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]
# a page handler as written (it may take more, defaulted, arguments for its own re-use)
_Written = TypeVar("_Written", bound=Callable[..., Awaitable[web.StreamResponse]])

# a core refusal that means "this operator may not": the 403 page
_NOT_ALLOWED = frozenset({"not_in_table", "forbidden", "deleted"})


class Forbidden(Exception):
    """The operator may not do this (a route outside their table, or the core said so): the 403 page."""


@dataclass(frozen=True, slots=True)
class Route:
    method: str
    path: str
    handler: Handler
    needs: tuple[str, ...]
    nav: str | None


@dataclass(slots=True)
class Routes:
    """A page module's routes, in the order they were declared."""

    routes: list[Route] = field(default_factory=list)

    def get(self, path: str, *, needs: Iterable[str] = (), nav: str | None = None) -> Callable[[_Written], _Written]:
        return self._add("GET", path, needs, nav)

    def post(self, path: str, *, needs: Iterable[str] = ()) -> Callable[[_Written], _Written]:
        return self._add("POST", path, needs, None)

    def _add(self, method: str, path: str, needs: Iterable[str], nav: str | None) -> Callable[[_Written], _Written]:
        needed = tuple(needs)
        if isinstance(needs, str):
            raise TypeError(f"{path}: needs is a tuple of call names, not the string {needs!r}")

        def register(handler: _Written) -> _Written:
            self.routes.append(Route(method, path, handler, needed, nav))
            return handler
        return register


class Page:
    @staticmethod
    def routes() -> Routes:
        """A module-level collector: ``ROUTES = Page.routes()``."""
        return Routes()


# -- what handlers use ---------------------------------------------------------------

def operator_of(request: web.Request) -> Operator:
    return request[OPERATOR]


def browser_ip(request: web.Request) -> str:
    return client_ip(request, request.app[CONSOLE].section.trust_forwarded)


def _refusal(exc: Refused) -> Exception:
    return Forbidden(exc.code) if exc.code in _NOT_ALLOWED else exc


async def call(request: web.Request, fn: str, /, **args: Any) -> Any:
    """``fn``'s result, called as the operator from the browser's address (``args`` may hold ``name``).

    Raises ``Refused(code, message)`` for the page to show; the rest (403,
    session gone, core down) the middleware answers."""
    operator = request[OPERATOR]
    try:
        return await request.app[CONSOLE].link.call(operator.sid, browser_ip(request), fn, args)
    except Refused as exc:
        raise _refusal(exc) from None
    except SessionGone:
        request.app[CONSOLE].book.drop(operator.sid)
        raise


async def stream(request: web.Request, fn: str, /, **args: Any) -> AsyncIterator[Any]:
    """The chunks of the streamed call ``fn``, as the operator."""
    operator = request[OPERATOR]
    try:
        async for chunk in request.app[CONSOLE].link.stream(operator.sid, browser_ip(request), fn, args):
            yield chunk
    except Refused as exc:
        raise _refusal(exc) from None
    except SessionGone:
        request.app[CONSOLE].book.drop(operator.sid)
        raise


def money_text(micro: int) -> str:
    """An amount as a form field or a CSV cell carries it: the currency's decimals ([billing] minor_units,
    more only where the amount has them), not grouped (pages show amounts with the ``money`` filter)."""
    return format_money(int(micro), min_decimals=current_currency.get().minor_units)


def t(key: str, **values: Any) -> str:
    """``key`` in the language of the request being answered."""
    return current_words.get()(key, **values)


def csrf_of(request: web.Request) -> str:
    sid = request.get(SID)
    return csrf_token(request.app[CONSOLE].key, sid) if sid else ""


def _under(path: str, entry: str) -> bool:
    """Is ``path`` the page of the nav entry ``entry`` or below it ("/" is only itself)?"""
    return path == entry or (entry != "/" and path.startswith(entry.rstrip("/") + "/"))


def render(request: web.Request, template: str, status: int = 200, **values: Any) -> web.Response:
    """``console/templates/<template>`` as the answer; it gets t, can, csrf, operator, nav and the filters."""
    console = request.app[CONSOLE]
    words = current_words.get()
    operator = request.get(OPERATOR)
    calls = operator.calls if operator is not None else frozenset()
    nav = [(entry.path, entry.key, words("nav." + entry.key), _under(request.path, entry.path))
           for entry in console.nav if operator is not None and all(need in calls for need in entry.needs)]
    message = request.query.get("m", "")
    notice = words(message) if message in console.catalogs["en"] else ""    # only our own words, never URL text
    values.setdefault("csrf", csrf_of(request))
    values.setdefault("notice", notice)
    html = console.env.get_template(template).render(
        t=words, lang=words.lang, languages=LANGUAGES, path=request.path, path_qs=request.path_qs, status=status,
        operator=operator.login if operator is not None else "", can=lambda name: name in calls,
        nav=nav, currency=console.currency, **values)
    return web.Response(text=html, status=status, content_type="text/html", charset="utf-8")


async def form(request: web.Request) -> dict[str, str]:
    """The posted fields (text only), already read and CSRF-checked by the middleware."""
    fields = request.get(FORM)
    if fields is None:
        posted = await request.post()
        fields = request[FORM] = {name: value for name, value in posted.items() if isinstance(value, str)}
    return fields


def redirect(request: web.Request, location: str, message: str | None = None, **query: Any) -> web.Response:
    """A 303 to a path of the console; ``message`` a MESSAGES key shown once there."""
    return see_other(local_path(location), m=message, **query)


async def live(request: web.Request, topics: Iterable[str]) -> web.StreamResponse:
    """An SSE stream: ``event: changed`` / ``data: <topic>`` whenever the console hears one of ``topics``.

    Ends when the operator logs out or leaves the pages idle past the session's timeout (checked at
    every keep-alive)."""
    console = request.app[CONSOLE]
    listener = console.live.listen(topics)
    if listener is None:
        raise CoreDown("too many live streams")
    deadline = request.get(DEADLINE)
    if deadline is not None:
        deadline.reschedule(None)       # a stream lives as long as the browser listens
    response = web.StreamResponse(headers={"Content-Type": "text/event-stream", "Cache-Control": "no-store",
                                           "X-Accel-Buffering": "no"})
    security_headers(response, https=console.section.cookie_secure or bool(console.section.tls_cert),
                     connect_self=True)
    await response.prepare(request)
    sid = request[OPERATOR].sid
    try:
        await response.write(b"retry: 5000\n\n")
        # an open stream is not the operator's activity: it ends once their pages have been idle too long
        while console.book.alive(sid, time.monotonic()):
            changed = await listener.changed(console.live.keepalive)
            if not changed:
                await response.write(b": keep-alive\n\n")
            for topic in changed:
                await response.write(f"event: changed\ndata: {topic}\n\n".encode())
    except ConnectionResetError:
        pass          # the browser went away
    finally:
        console.live.leave(listener)
    return response


async def start_download(request: web.Request, response: web.StreamResponse) -> None:
    """Send a streamed download's headers.  From here on ``keep_going`` pushes the request's deadline on
    with each chunk; a deadline that passes all the same (the core stalled) cuts the connection, so the
    browser sees a broken download — never a short file that looks whole, nor one that never ends."""
    request[STREAMED] = response
    await response.prepare(request)


def keep_going(request: web.Request) -> None:
    """Push the request's deadline one request-time past now: a download may run as long as the core
    keeps sending, but one that stalls for a whole request-time still ends."""
    deadline = request.get(DEADLINE)
    if deadline is not None:
        deadline.reschedule(asyncio.get_running_loop().time() + request.app[CONSOLE].section.request_timeout)
