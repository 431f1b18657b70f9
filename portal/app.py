"""The subscriber's virtual office: a small server-rendered aiohttp app.

Theory of operation
-------------------
The office has no database and no state of its own beyond one signing key:
a browser's only credential is the core SID in an HttpOnly, SameSite=Strict
(and, outside plain-HTTP tests, Secure) cookie.  Every page is a few URFA
calls made *as* that SID from the browser's address (``CoreLink.call``), so
what a subscriber can see is exactly what the core's subscriber call table
allows: an ``account_id`` in the URL is handed to the core, which refuses
one that is not the subscriber's (``accounts.unknown`` → 404 page).

One middleware (``_guard``) owns the cross-cutting rules, so no route can
forget them:

* every POST carries a CSRF token bound to the SID (the login form: to a
  random pre-session cookie), else 403;
* each request is bounded in body size (``client_max_size``) and time;
* the core being down or slow → a friendly 503 page; the subscriber's core
  session gone (logout elsewhere, idle timeout, core restart) → back to the
  login form with "log in again"; anything unexpected → a plain 500 page
  (the traceback goes to the log, never to the browser);
* security headers on every answer (CSP without inline script, no framing,
  no caching of personal pages).
"""

from __future__ import annotations

import asyncio
import logging
import secrets
import time
from datetime import datetime, timedelta, timezone
from pathlib import Path
from typing import Any

import jinja2
from aiohttp import web

from billcore.common.config import PortalSection
from webedge import http
from webedge.chart import traffic_chart, traffic_table
from webedge.core_link import BadLogin, CoreDown, CoreLink, Refused, SessionGone
from webedge.guard import LoginLimiter, csrf_ok, csrf_token
from webedge.http import ascii_int, b64, unb64
from webedge.i18n import LANGUAGES, Translator, pick_language
from webedge.render import FILTERS, Currency
from webedge.settings import EdgeSettings, read_or_make_secret

from .i18n import translator as office_words
from .pay import PAY, PayOnline, add_routes as add_pay_routes, pay_online_of

__all__ = ["build_app", "run", "serve", "SID_COOKIE"]

log = logging.getLogger("portal")

HERE = Path(__file__).parent
SID_COOKIE = "billcore_sid"
PRE_COOKIE = "billcore_pre"
LANG_COOKIE = "billcore_lang"
MESSAGES = frozenset({"off", "on", "promised", "password"})
LOGIN_MESSAGES = frozenset({"expired", "out"})

LINK: web.AppKey[CoreLink] = web.AppKey("link", CoreLink)
SECTION: web.AppKey[PortalSection] = web.AppKey("section", PortalSection)
STATE: web.AppKey[dict[str, Any]] = web.AppKey("state", dict)
CURRENCY: web.AppKey[Currency] = web.AppKey("currency", Currency)
SID: web.RequestKey[bytes | None] = web.RequestKey("sid", object)  # type: ignore[arg-type]
FORM: web.RequestKey[dict[str, str]] = web.RequestKey("form", dict)
TR: web.RequestKey[Translator] = web.RequestKey("t", Translator)

_env = jinja2.Environment(
    loader=jinja2.FileSystemLoader(HERE / "templates"), autoescape=True,
    undefined=jinja2.StrictUndefined, trim_blocks=True, lstrip_blocks=True,
)
_env.filters.update(FILTERS)


class PageError(Exception):
    """Answer with the error page ``key`` and HTTP ``status``."""

    def __init__(self, status: int, key: str, **values: Any) -> None:
        super().__init__(key)
        self.status = status
        self.key = key
        self.values = values


# -- request helpers ----------------------------------------------------------

def client_ip(request: web.Request) -> str:
    return http.client_ip(request, request.app[SECTION].trust_forwarded)


def sid_of(request: web.Request) -> bytes | None:
    return unb64(request.cookies.get(SID_COOKIE))


def translator(request: web.Request) -> Translator:
    t = request.get(TR)
    if t is None:
        lang = pick_language(request.headers.get("Accept-Language", ""), request.cookies.get(LANG_COOKIE),
                             request.app[SECTION].language)
        t = request[TR] = office_words(lang)
    return t


def page(request: web.Request, template: str, status: int = 200, **values: Any) -> web.Response:
    t = translator(request)
    sid = request.get(SID)
    values.setdefault("csrf", csrf_token(request.app[STATE]["key"], sid) if sid else "")
    html = _env.get_template(template).render(
        t=t, lang=t.lang, languages=LANGUAGES, path=request.path, logged_in=sid is not None,
        pay_online=PAY in request.app, currency=request.app[CURRENCY], **values)
    return web.Response(text=html, status=status, content_type="text/html", charset="utf-8")


def _account_arg(request: web.Request) -> dict[str, Any]:
    raw = request.query.get("account_id") or request.get(FORM, {}).get("account_id")
    if not raw:
        return {}
    account_id = ascii_int(raw, 18)
    if account_id is None:
        raise PageError(404, "error.404")
    return {"account_id": account_id}


async def ask(request: web.Request, fn: str, **args: Any) -> Any:
    """Call ``fn`` as the browser's subscriber session."""
    sid = request.get(SID)
    if sid is None:
        raise SessionGone("no cookie")
    try:
        return await request.app[LINK].call(sid, client_ip(request), fn, args)
    except Refused as exc:
        if exc.code in ("accounts.unknown", "users.unknown", "invoices.unknown"):
            raise PageError(404, "error.404") from None
        if exc.code in ("not_in_table", "deleted", "forbidden"):
            raise PageError(403, "error.403", code=exc.code) from None
        raise PageError(409, "error.refused", reason=exc.message or exc.code) from None


async def ask_optional(request: web.Request, fn: str, **args: Any) -> Any:
    """Like ``ask``, but None when this core does not offer ``fn`` (an older core)."""
    try:
        return await ask(request, fn, **args)
    except PageError as exc:
        if exc.values.get("code") in ("not_in_table", "deleted"):
            return None
        raise


redirect = http.see_other


def _internet_state(blocks: list[str]) -> str:
    if not blocks:
        return "on"
    return "off" if set(blocks) == {"user"} else "blocked"


# -- middleware ------------------------------------------------------------------

@web.middleware
async def _guard(request: web.Request, handler: Any) -> web.StreamResponse:
    section = request.app[SECTION]
    request[SID] = sid_of(request)
    try:
        response = await asyncio.wait_for(_checked(request, handler), section.request_timeout)
    except SessionGone:
        if request[SID] is None:     # never logged in (a first visit): a plain login page
            response = redirect("/login")
        else:                        # a session that existed has ended: say so
            response = redirect("/login", m="expired")
            response.del_cookie(SID_COOKIE, path="/")
    except PageError as exc:
        values = {k: v for k, v in exc.values.items() if k != "code"}
        response = page(request, "error.html", exc.status, message=translator(request)(exc.key, **values))
    except CoreDown as exc:
        log.warning("core unavailable: %s", exc)
        response = page(request, "error.html", 503, message=translator(request)("error.503"))
        response.headers["Retry-After"] = "30"
    except asyncio.TimeoutError:
        log.warning("request timed out: %s %s", request.method, request.path)
        response = page(request, "error.html", 503, message=translator(request)("error.503"))
    except web.HTTPRequestEntityTooLarge:
        response = page(request, "error.html", 413, message=translator(request)("error.413"))
    except web.HTTPNotFound:
        response = page(request, "error.html", 404, message=translator(request)("error.404"))
    except web.HTTPMethodNotAllowed:
        response = page(request, "error.html", 405, message=translator(request)("error.403"))
    except web.HTTPException as exc:
        response = web.Response(status=exc.status, text=exc.text, headers=exc.headers)
    except Exception:
        log.exception("unexpected error on %s %s", request.method, request.path)
        response = page(request, "error.html", 500, message=translator(request)("error.500"))
    # HTTPS: its own TLS, or a TLS proxy in front (``cookie_secure``)
    http.security_headers(response, https=section.cookie_secure or bool(section.tls_cert))
    return response


async def _checked(request: web.Request, handler: Any) -> web.StreamResponse:
    if request.method == "POST":
        form = await request.post()
        request[FORM] = {k: v for k, v in form.items() if isinstance(v, str)}
        key = request.app[STATE]["key"]
        if request.path == "/login":
            ok = csrf_ok(key, unb64(request.cookies.get(PRE_COOKIE)), form.get("csrf"), "login")
        else:
            ok = csrf_ok(key, request[SID], form.get("csrf"))
        if not ok:
            raise PageError(403, "error.csrf")
    return await handler(request)  # type: ignore[no-any-return]


# -- pages -----------------------------------------------------------------------------

async def login_form(request: web.Request, status: int = 200, error: str = "") -> web.Response:
    known = unb64(request.cookies.get(PRE_COOKIE))
    fresh = known is None
    pre = secrets.token_bytes(16) if known is None else known
    message = request.query.get("m", "")
    t = translator(request)
    resp = page(request, "login.html", status, csrf=csrf_token(request.app[STATE]["key"], pre, "login"),
                error=error, notice=t("login." + message) if message in LOGIN_MESSAGES else "",
                login_value=request.get(FORM, {}).get("login", "")[:64])
    if fresh:
        resp.set_cookie(PRE_COOKIE, b64(pre), httponly=True, samesite="Strict", path="/",
                        secure=request.app[SECTION].cookie_secure)
    return resp


async def login_get(request: web.Request) -> web.StreamResponse:
    if request[SID] is not None and "m" not in request.query:
        return redirect("/")
    return await login_form(request)


async def login_post(request: web.Request) -> web.StreamResponse:
    form = request[FORM]
    ip = client_ip(request)
    limiter: LoginLimiter = request.app[STATE]["limiter"]
    t = translator(request)
    if limiter.blocked(ip, time.monotonic()):
        return await login_form(request, 429, t("login.limited"))
    login, password = form.get("login", "").strip(), form.get("password", "")
    if not login or not password or len(login) > 128 or len(password) > 1024:
        limiter.failed(ip, time.monotonic())
        return await login_form(request, 401, t("login.wrong"))
    try:
        info = await request.app[LINK].proxy_login(login, password, ip)
    except BadLogin as exc:
        limiter.failed(ip, time.monotonic())
        key = "login.limited" if exc.code == "rate_limited" else "login.wrong"
        return await login_form(request, 429 if exc.code == "rate_limited" else 401, t(key))
    except Refused:
        limiter.failed(ip, time.monotonic())
        return await login_form(request, 401, t("login.wrong"))
    limiter.succeeded(ip)
    old = request[SID]
    if old is not None and old != info.sid:   # a second login in this browser: end the first session
        try:
            await request.app[LINK].logout(old, ip)
        except (CoreDown, Refused):
            pass
    resp = redirect("/")
    resp.set_cookie(SID_COOKIE, b64(info.sid), httponly=True, samesite="Strict", path="/",
                    secure=request.app[SECTION].cookie_secure)
    log.info("subscriber logged in", extra={"login": login, "ip": ip})
    return resp


async def logout(request: web.Request) -> web.StreamResponse:
    sid = request[SID]
    if sid is not None:
        await request.app[LINK].logout(sid, client_ip(request))
    resp = redirect("/login", m="out")
    resp.del_cookie(SID_COOKIE, path="/")
    return resp


def _tariff_view(entry: dict[str, Any] | None, class_names: dict[int, str]) -> dict[str, Any] | None:
    """``me.tariff``'s entry for one account, with names on the prepaid rows."""
    if entry is None:
        return None
    services = {linked["id"]: linked for linked in entry.get("services", [])}
    prepaid = []
    for row in entry.get("prepaid", []):
        service = services.get(row["service_id"], {})
        total, left = int(row["prepaid"]), int(row["prepaid_left"])
        class_id = row.get("class_id", -1)
        prepaid.append({
            "name": class_names.get(class_id, service.get("name", "")) if class_id != -1 else service.get("name", ""),
            "kind": service.get("kind", "traffic" if class_id != -1 else "time"),
            "prepaid": total, "left": left, "used": max(0, total - left),
        })
    return {**entry, "prepaid": prepaid}


async def _class_names(request: web.Request) -> dict[int, str]:
    rows = await ask_optional(request, "me.classes")
    return {row["id"]: row["name"] for row in rows or []}


async def overview(request: web.Request) -> web.StreamResponse:
    which = _account_arg(request)
    from .dunning import banner   # dunning and fair-usage restrictions (portal/dunning.py)

    accounts, tariffs, names, restriction = await asyncio.gather(
        ask(request, "me.accounts"), ask_optional(request, "me.tariff", **which), _class_names(request),
        banner(request, which))
    if not accounts:
        raise PageError(404, "error.404")
    wanted = which.get("account_id", accounts[0]["id"])
    account = next((candidate for candidate in accounts if candidate["id"] == wanted), None)
    if account is None:      # the core answered for it, so it is ours; a race with a deletion
        raise PageError(404, "error.404")
    entry = next((candidate for candidate in tariffs or [] if candidate["account_id"] == wanted), None)
    t = translator(request)
    message = request.query.get("m", "")
    notice = {"off": t("internet.changed_off"), "on": t("internet.changed_on"),
              "promised": t("promised.taken"), "password": t("password.changed")}.get(message, "")
    return page(request, "overview.html", accounts=accounts, account=account,
                tariff=_tariff_view(entry, names), internet=_internet_state(account["blocks"]), notice=notice,
                restriction=restriction,
                available=account["balance"] + account["credit"] + account["promised"])


async def internet(request: web.Request) -> web.StreamResponse:
    form = request[FORM]
    action = form.get("action")
    if action not in ("off", "on"):
        raise PageError(400, "error.403")
    which = _account_arg(request)
    result = await ask(request, "me.block", on=action == "off", **which)
    return redirect("/", account_id=result["account_id"] if which else None, m=action)


async def promised(request: web.Request) -> web.StreamResponse:
    which = _account_arg(request)
    result = await ask(request, "me.promised", **which)
    return redirect("/", account_id=result["account_id"] if which else None, m="promised")


async def traffic(request: web.Request) -> web.StreamResponse:
    which = _account_arg(request)
    asked = ascii_int(request.query.get("days", ""), 3)
    days = asked if asked is not None and 1 <= asked <= 366 else 31
    if not which:   # me.traffic without an account mixes them all: show the basic one
        accounts = await ask(request, "me.accounts")
        if not accounts:
            raise PageError(404, "error.404")
        which = {"account_id": accounts[0]["id"]}
    # usage days are the operator's local days: ask one day either side of UTC "today"
    today = datetime.now(timezone.utc).date()
    first = today - timedelta(days=days - 1)
    data, names = await asyncio.gather(
        ask_optional(request, "me.traffic", since=(first - timedelta(days=1)).isoformat(),
                     until=(today + timedelta(days=2)).isoformat(), **which),
        _class_names(request))
    chart = table = None
    if data is not None:
        rows = [{"day": str(row["day"]), "class_id": row["class_id"],
                 "class": names.get(row["class_id"], f"#{row['class_id']}"),
                 "bytes": int(row["quantity"]), "amount": int(row["amount"])} for row in data if row["class_id"] != -1]
        last = max([today.isoformat(), *(row["day"] for row in rows)])
        rows = [row for row in rows if first.isoformat() <= row["day"] <= last]
        shaped = {"first": first.isoformat(), "last": last, "rows": rows}
        chart = traffic_chart(shaped, translator(request)("traffic.title"))
        table = traffic_table(shaped)
    return page(request, "traffic.html", days=days, chart=chart, table=table, which=which,
                choices=(7, 31, 92))


async def history(request: web.Request) -> web.StreamResponse:
    which = _account_arg(request)
    charges, payments = await asyncio.gather(ask(request, "me.history", limit=100, **which),
                                             ask(request, "me.payments", limit=100, **which))
    return page(request, "history.html", charges=charges, payments=payments)


async def sessions(request: web.Request) -> web.StreamResponse:
    which = _account_arg(request)
    rows = await ask_optional(request, "me.sessions", limit=100, **which)
    return page(request, "sessions.html", rows=rows)


async def password_get(request: web.Request) -> web.StreamResponse:
    if request[SID] is None:
        raise SessionGone("no cookie")
    return page(request, "password.html", error="")


async def password_post(request: web.Request) -> web.StreamResponse:
    form = request[FORM]
    t = translator(request)
    if form.get("new_password", "") != form.get("again", ""):
        return page(request, "password.html", 400, error=t("password.differ"))
    try:
        await ask(request, "me.password", old_password=form.get("old_password", ""),
                  new_password=form.get("new_password", ""))
    except PageError as exc:
        if exc.status != 409:
            raise
        return page(request, "password.html", 400, error=t("password.refused", **exc.values))
    return redirect("/", m="password")


async def language(request: web.Request) -> web.StreamResponse:
    response = http.language_chosen(request, LANG_COOKIE, secure=request.app[SECTION].cookie_secure)
    if response is None:
        raise PageError(404, "error.404")
    return response


async def healthz(request: web.Request) -> web.StreamResponse:
    return web.Response(text="ok\n")


def build_app(section: PortalSection, link: CoreLink, key: bytes, pay: PayOnline | None = None,
              currency: Currency | None = None, issuer: Any = None) -> web.Application:
    """The office; ``currency`` ([billing]) shows every amount, ``issuer`` (``documents.view.Issuer`` of
    [documents]) signs the invoices and statements the Documents page renders."""
    app = web.Application(middlewares=[_guard], client_max_size=section.max_body)
    app[SECTION] = section
    app[CURRENCY] = currency or Currency()
    app[LINK] = link
    app[STATE] = {"key": key, "limiter": LoginLimiter(section.login_failures_per_minute)}
    app.router.add_get("/login", login_get)
    app.router.add_post("/login", login_post)
    app.router.add_post("/logout", logout)
    app.router.add_get("/", overview)
    app.router.add_post("/internet", internet)
    app.router.add_post("/promised", promised)
    app.router.add_get("/traffic", traffic)
    app.router.add_get("/history", history)
    app.router.add_get("/sessions", sessions)
    app.router.add_get("/password", password_get)
    app.router.add_post("/password", password_post)
    app.router.add_get("/lang/{lang}", language)
    app.router.add_get("/healthz", healthz)
    if pay is not None:
        add_pay_routes(app, pay)
    from . import documents, notifications   # (they import this module's helpers)

    notifications.add_routes(app)
    documents.add_routes(app, issuer)
    app.router.add_static("/static", HERE / "static", append_version=True)
    http.add_shared_static(app)
    return app


async def serve(section: PortalSection, link: CoreLink, key: bytes,
                keepalive_timeout: float = 15.0, pay: PayOnline | None = None, currency: Currency | None = None,
                issuer: Any = None) -> web.AppRunner:
    """Start the office on ``section.host:port``; returns the runner (``cleanup()`` stops it)."""
    return await http.serve(build_app(section, link, key, pay, currency, issuer), host=section.host, port=section.port,
                            tls_cert=section.tls_cert, tls_key=section.tls_key, logger_name="portal.http",
                            keepalive_timeout=keepalive_timeout)


async def run(config: Any, dsn: str, index: int, stop: asyncio.Event) -> None:
    """The ``portal`` role (``dsn`` is unused: the office has no database access)."""
    settings = EdgeSettings.of(config, "portal", config.portal)
    link = CoreLink.for_endpoint(
        host=settings.core_host, port=settings.core_port, unix=settings.core_unix, login=settings.login,
        password=lambda: settings.password_file.read_text().strip(), timeout=settings.section.core_timeout)
    from documents.view import Issuer

    runner = await serve(settings.section, link, read_or_make_secret(settings.secret_file),
                         pay=pay_online_of(config), currency=Currency.of(config), issuer=Issuer.of(config))
    s = settings.section
    log.info("portal serving", extra={"http": f"{s.host}:{s.port}", "tls": bool(s.tls_cert)})
    await http.serve_until(stop, runner, link)
