"""The operators' console: a server-rendered aiohttp app over URFA.

Theory of operation
-------------------
The console has no database and no state of its own beyond one signing
key and what it remembers in memory of each logged-in operator (their call
table, ``operators_book``).  A browser's only credential is the core SID of
the operator's proxied admin session, in an HttpOnly, SameSite=Strict (and,
outside plain-HTTP tests, Secure) cookie; the login that opens it is SCRAM
computed in the browser (``console.login``), so the console never sees a
password.  Every page is a few URFA calls made *as* that SID from the
browser's address, so what an operator can see and do is exactly what the
core's call table for their groups allows; the console's navigation and
its 403 pages only keep them from asking for what the core would refuse.

One middleware (``_guard``) owns the cross-cutting rules, so no page can
forget them: a CSRF token on every POST (bound to the SID; the login's to
the pre-session cookie), a bound on each request's body and time, the
operator's session gone → the login page, the core down → 503, an
operator outside a route's ``needs`` → 403, anything unexpected → a plain
500 page (the traceback goes to the log), and the security headers on
every answer.  The page API is ``console.page``; the pages are
``console.pages.PAGES``.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Sequence
from pathlib import Path
from types import ModuleType
from typing import Any

import jinja2
from aiohttp import web

from billcore.common.config import ConsoleSection
from webedge import http
from webedge.core_link import CoreDown, CoreLink, Refused, SessionGone
from webedge.guard import LoginLimiter, csrf_ok
from webedge.http import local_path, see_other, unb64
from webedge.i18n import Translator, catalogs_of, pick_language
from webedge.render import FILTERS, Currency
from webedge.settings import EdgeSettings, read_or_make_secret

from . import login, messages
from .context import (CONSOLE, DEADLINE, FORM, LANG_COOKIE, OPERATOR, PRE_COOKIE, SID, SID_COOKIE, STREAMED, TR,
                      Console, NavEntry, current_currency, current_words)
from .live import LiveHub
from .operators_book import Operator
from .page import Forbidden, Handler, Route, browser_ip, render
from .pages import PAGES

__all__ = ["build_app", "serve", "run", "console_link"]

log = logging.getLogger("console")

HERE = Path(__file__).parent
STATIC = HERE / "static"


class _CsrfRefused(Exception):
    pass


def _words(request: web.Request) -> Translator:
    console = request.app[CONSOLE]
    lang = pick_language(request.headers.get("Accept-Language", ""), request.cookies.get(LANG_COOKIE),
                         console.section.language)
    words = request[TR] = Translator(console.catalogs, lang)
    return words


def _error_page(request: web.Request, status: int, key: str, **values: Any) -> web.Response:
    return render(request, "error.html", status, message=current_words.get()(key, **values))


@web.middleware
async def _guard(request: web.Request, handler: Any) -> web.StreamResponse:
    console = request.app[CONSOLE]
    request[SID] = unb64(request.cookies.get(SID_COOKIE), 16)
    token = current_words.set(_words(request))
    money_token = current_currency.set(console.currency)
    try:
        response = await _answer(request, handler)
    finally:
        current_currency.reset(money_token)
        current_words.reset(token)
    if not response.prepared:
        http.security_headers(response, https=console.section.cookie_secure or bool(console.section.tls_cert),
                              connect_self=True)
    return response


async def _answer(request: web.Request, handler: Any) -> web.StreamResponse:
    console = request.app[CONSOLE]
    try:
        async with asyncio.timeout(console.section.request_timeout) as deadline:
            request[DEADLINE] = deadline
            return await _checked(request, handler)
    except SessionGone:
        sid = request[SID]
        wanted = local_path(request.path_qs) if request.method == "GET" else "/"
        if sid is None:     # never logged in (a first visit): a plain login page
            return see_other("/login", next=wanted if wanted != "/" else None)
        console.book.drop(sid)
        response = see_other("/login", m="login.expired", next=wanted if wanted != "/" else None)
        response.del_cookie(SID_COOKIE, path="/")
        return response
    except Forbidden:
        return _error_page(request, 403, "error.403")
    except _CsrfRefused:
        return _error_page(request, 403, "error.csrf")
    except CoreDown as exc:
        log.warning("core unavailable: %s", exc)
        response = _error_page(request, 503, "error.503")
        response.headers["Retry-After"] = "30"
        return response
    except TimeoutError:
        log.warning("request timed out: %s %s", request.method, request.path)
        started: web.StreamResponse | None = request.get(STREAMED)
        if started is not None:         # the headers are out: cut the download, do not end it as if whole
            if request.transport is not None:
                request.transport.close()
            return started
        return _error_page(request, 503, "error.503")
    except Refused as exc:          # a refusal the page did not show itself
        return _error_page(request, 409, "error.refused", code=exc.code, message=exc.message)
    except web.HTTPRequestEntityTooLarge:
        return _error_page(request, 413, "error.413")
    except web.HTTPNotFound:
        return _error_page(request, 404, "error.404")
    except web.HTTPMethodNotAllowed:
        return _error_page(request, 405, "error.405")
    except web.HTTPException as exc:
        return web.Response(status=exc.status, text=exc.text, headers=exc.headers)
    except Exception:
        log.exception("unexpected error on %s %s", request.method, request.path)
        return _error_page(request, 500, "error.500")


async def _checked(request: web.Request, handler: Any) -> web.StreamResponse:
    """CSRF on every POST: a form's ``csrf`` field or the ``X-CSRF-Token`` header (the scripts')."""
    if request.method == "POST":
        given: object = request.headers.get("X-CSRF-Token")
        if given is None and request.content_type in ("application/x-www-form-urlencoded", "multipart/form-data"):
            posted = await request.post()
            request[FORM] = {name: value for name, value in posted.items() if isinstance(value, str)}
            given = request[FORM].get("csrf")
        console = request.app[CONSOLE]
        if request.path in login.LOGIN_PATHS:
            ok = csrf_ok(console.key, unb64(request.cookies.get(PRE_COOKIE), 16), given, "login")
        else:
            ok = csrf_ok(console.key, request[SID], given)
        if not ok:
            raise _CsrfRefused()
    return await handler(request)  # type: ignore[no-any-return]


async def _operator(request: web.Request) -> Operator:
    console = request.app[CONSOLE]
    sid = request[SID]
    if sid is None:
        raise SessionGone("no cookie")
    operator = console.book.get(sid, time.monotonic())
    if operator is None:     # a console restart, or forgotten: the core still knows the session
        operator = await login.load_operator(console, sid, browser_ip(request))
        console.book.put(operator, time.monotonic())
    else:
        # Is the session still there?  A page may call nothing, and the core ends sessions on its own
        # (new roles, a disabled operator, a logout elsewhere): one cheap call also keeps it alive.
        try:
            await console.link.call(sid, browser_ip(request), "sys.ping")
        except SessionGone:
            console.book.drop(sid)
            raise
        except Refused as exc:
            console.book.drop(sid)
            raise SessionGone(exc.code) from None
    return operator


def _guarded(route: Route) -> Handler:
    """The route's handler behind the login and its ``needs``."""
    async def answer(request: web.Request) -> web.StreamResponse:
        operator = await _operator(request)
        request[OPERATOR] = operator
        if not all(need in operator.calls for need in route.needs):
            raise Forbidden(route.path)
        return await route.handler(request)
    return answer


async def language(request: web.Request) -> web.StreamResponse:
    response = http.language_chosen(request, LANG_COOKIE, secure=request.app[CONSOLE].section.cookie_secure)
    if response is None:
        raise web.HTTPNotFound()
    return response


async def healthz(request: web.Request) -> web.StreamResponse:
    return web.Response(text="ok\n")


def build_app(section: ConsoleSection, link: CoreLink, key: bytes, live: LiveHub | None = None,
              pages: Sequence[ModuleType] = PAGES, currency: Currency | None = None,
              issuer: Any = None) -> web.Application:
    """The console; ``currency`` ([billing]) shows every amount, ``issuer`` (``documents.view.Issuer`` of
    [documents]) is the ISP on the invoices and statements it renders."""
    from documents.view import Issuer

    catalogs = catalogs_of([("console.messages", messages.MESSAGES),
                            *((page.__name__, page.MESSAGES) for page in pages)])
    env = jinja2.Environment(loader=jinja2.FileSystemLoader(HERE / "templates"), autoescape=True,
                             undefined=jinja2.StrictUndefined, trim_blocks=True, lstrip_blocks=True)
    env.filters.update(FILTERS)
    console = Console(section=section, link=link, key=key, env=env, catalogs=catalogs,
                      live=live or LiveHub(), limiter=LoginLimiter(section.login_failures_per_minute),
                      currency=currency or Currency(), issuer=issuer or Issuer())
    app = web.Application(middlewares=[_guard], client_max_size=section.max_body)
    app[CONSOLE] = console
    login.add_routes(app)
    app.router.add_get("/lang/{lang}", language)
    app.router.add_get("/healthz", healthz)
    app.router.add_static("/static", STATIC, append_version=True)
    http.add_shared_static(app)
    for page in pages:
        for route in page.ROUTES.routes:
            app.router.add_route(route.method, route.path, _guarded(route))
            if route.nav is not None:
                console.nav.append(NavEntry(route.path, route.nav, route.needs))
    return app


def console_link(settings: EdgeSettings[ConsoleSection], live: LiveHub) -> CoreLink:
    """The console's system link: calls as operators, and the event topics of ``live``."""
    return CoreLink.for_endpoint(
        host=settings.core_host, port=settings.core_port, unix=settings.core_unix, login=settings.login,
        password=lambda: settings.password_file.read_text().strip(), timeout=settings.section.core_timeout,
        logger_name="console.core", on_connected=live.on_connected, on_event=live.on_event, on_missed=live.missed)


async def serve(section: ConsoleSection, link: CoreLink, key: bytes, live: LiveHub | None = None,
                keepalive_timeout: float = 15.0, currency: Currency | None = None,
                issuer: Any = None) -> web.AppRunner:
    """Start the console on ``section.host:port``; returns the runner (``cleanup()`` stops it)."""
    return await http.serve(build_app(section, link, key, live, currency=currency, issuer=issuer), host=section.host, port=section.port,
                            tls_cert=section.tls_cert, tls_key=section.tls_key, logger_name="console.http",
                            keepalive_timeout=keepalive_timeout)


async def run(config: Any, dsn: str, index: int, stop: asyncio.Event) -> None:
    """The ``console`` role (``dsn`` is unused: the console has no database access)."""
    settings = EdgeSettings.of(config, "console", config.console)
    live = LiveHub()
    link = console_link(settings, live)
    from documents.view import Issuer

    runner = await serve(settings.section, link, read_or_make_secret(settings.secret_file), live,
                         currency=Currency.of(config), issuer=Issuer.of(config))
    section = settings.section
    log.info("console serving", extra={"http": f"{section.host}:{section.port}", "tls": bool(section.tls_cert)})
    await http.serve_until(stop, runner, link)
