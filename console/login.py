"""The console's login: SCRAM computed in the browser, relayed step by step.

Theory of operation
-------------------
The console never sees an operator's password, so it can neither store
nor replay one.  The login page's script (``static/login.js``) runs the
client side of SCRAM-SHA-256 (docs/protocol.md §6.1, §7) with WebCrypto;
the console only relays each step to the core over its system link and
keeps the core's login handle server-side, bound to the browser's random
pre-session cookie (never sent to the browser):

1. ``POST /login/start {login, cnonce}`` → ``session.proxy_login {login,
   cnonce, ip, kind: "admin"}`` → ``{nonce, salt, iter}`` to the browser;
2. ``POST /login/proof {proof}`` → ``session.proxy_proof`` → ``{sig}`` (the
   browser checks it: only the core holding the verifier can make it),
   and either the session or ``otp_required``;
3. ``POST /login/otp {code}`` → ``session.proxy_otp`` → the session.

On the wire (what ``static/login.js`` sends; ``tests/console_harness.py``'s
``ConsoleBrowser.login`` does the same from Python):

* ``GET /login`` sets the ``console_pre`` cookie; the page's
  ``<input name="csrf">`` holds the token bound to it;
* each step is ``POST`` with ``Content-Type: application/json`` and the
  header ``X-CSRF-Token: <that token>``; ``?next=/path`` is where the answer's
  ``next`` sends the browser afterwards;
* ``/login/start`` ``{"login": str, "cnonce": base64 of 16 random bytes}`` →
  ``{"nonce": base64, "salt": base64, "iter": int}`` (standard base64);
* ``/login/proof`` ``{"proof": base64 of 32 bytes}`` (kind ``admin`` in the
  AuthMessage) → ``{"sig": base64, "next": path, "csrf": the session's form
  token}`` and the ``console_sid`` cookie, or ``{"sig": base64, "otp_required": true}``;
* ``/login/otp`` ``{"code": str}`` → ``{"next": path, "csrf": …}`` and the cookie;
* a refusal is ``{"error": key, "message": text}`` with 400 (unreadable or a
  stale login: start again), 401 (wrong), 429 (limited) or 503 (core down).

With the SID the console asks ``sys.calls`` and ``sys.whoami`` once (the
operator's call table, kept in memory per SID) and sets the SID cookie
(HttpOnly, SameSite=Strict, Secure outside plain-HTTP tests).  Each POST
carries a CSRF token bound to the pre-session cookie.  Failed steps count
against the browser's address in the console's limiter (the core counts
per address and per login as well); pending logins are bounded in number
and age.
"""

from __future__ import annotations

import base64
import logging
import secrets
import time
from collections.abc import Awaitable, Callable
from typing import Any

from aiohttp import web

from webedge.core_link import BadLogin, CoreDown, Refused, SessionGone
from webedge.guard import csrf_token
from webedge.http import b64, local_path, see_other, unb64

from .context import CONSOLE, PRE_COOKIE, SID, SID_COOKIE, Console, current_words
from .pending_logins import PendingLogin
from .operators_book import Operator
from .page import browser_ip, render

__all__ = ["load_operator", "add_routes", "LOGIN_PATHS"]

log = logging.getLogger("console.login")

LOGIN_PATHS = frozenset({"/login/start", "/login/proof", "/login/otp"})
SYS_CALLS_PAGE = 500          # the core's page of sys.calls
MAX_CALL_PAGES = 40           # 20,000 calls: far past any real table
DEFAULT_TIMEOUT = 1800.0      # the core's idle timeout when the login did not say (a console restart)
NONCE_BYTES = 16
MAX_ITERATIONS = 10_000_000


async def load_operator(console: Console, sid: bytes, ip: str, timeout: float = DEFAULT_TIMEOUT) -> Operator:
    """The operator of ``sid``: login and call table, asked of the core as that session."""
    try:
        who = await console.link.call(sid, ip, "sys.whoami")
    except Refused as exc:                  # e.g. forbidden: a subscriber's SID, which the console may not use
        raise SessionGone(exc.code) from None
    if who.get("kind") != "admin":          # a console cookie holds an operator's session, nothing else
        raise SessionGone("not an operator's session")
    names: list[str] = []
    offset = 0
    for _ in range(MAX_CALL_PAGES):
        page = await console.link.call(sid, ip, "sys.calls", {"limit": SYS_CALLS_PAGE, "offset": offset})
        offset += len(page)
        # a plugin's call being unloaded stays in the table but answers "deleted": not offered
        names += [entry["name"] for entry in page if not entry.get("deleted")]
        if len(page) < SYS_CALLS_PAGE:
            break
    return Operator(sid=sid, login=str(who["login"]), calls=frozenset(names), timeout=timeout)


def _std64(raw: bytes) -> str:
    return base64.b64encode(raw).decode()


def _answer(status: int, key: str) -> web.Response:
    return web.json_response({"error": key, "message": current_words.get()(key)}, status=status)


async def _body(request: web.Request) -> dict[str, Any]:
    try:
        body = await request.json()
    except ValueError:
        return {}
    return body if isinstance(body, dict) else {}


def _pre(request: web.Request) -> bytes | None:
    return unb64(request.cookies.get(PRE_COOKIE), 16)


async def login_page(request: web.Request) -> web.StreamResponse:
    console = request.app[CONSOLE]
    known = _pre(request)
    pre = secrets.token_bytes(16) if known is None else known
    message = request.query.get("m", "")
    words = current_words.get()
    response = render(request, "login.html", csrf=csrf_token(console.key, pre, "login"),
                      notice=words(message) if message in ("login.expired", "login.out") else "",
                      next=local_path(request.query.get("next", "/")))
    if known is None:
        response.set_cookie(PRE_COOKIE, b64(pre), httponly=True, samesite="Strict", path="/",
                            secure=console.section.cookie_secure)
    return response


async def login_start(request: web.Request) -> web.StreamResponse:
    console = request.app[CONSOLE]
    pre = _pre(request)
    ip = browser_ip(request)
    now = time.monotonic()
    if pre is None:
        return _answer(400, "login.stale")
    if console.limiter.blocked(ip, now):
        return _answer(429, "login.limited")
    body = await _body(request)
    login, cnonce = body.get("login"), unb64(body.get("cnonce"), NONCE_BYTES)
    if type(login) is not str or not 0 < len(login.strip()) <= 128 or cnonce is None or len(cnonce) != NONCE_BYTES:
        console.limiter.failed(ip, now)
        return _answer(400, "login.wrong")
    login = login.strip()
    try:
        started = await console.link.proxy_start(login, cnonce, ip, "admin")
    except BadLogin as exc:
        console.limiter.failed(ip, now)
        return _answer(429, "login.limited") if exc.code == "rate_limited" else _answer(401, "login.wrong")
    except Refused as exc:
        log.warning("the core refused an operator's login start", extra={"reason": exc.code})
        return _answer(503, "error.503")
    except CoreDown:
        return _answer(503, "error.503")
    iterations = int(started["iter"])
    if not 1 <= iterations <= MAX_ITERATIONS:
        return _answer(503, "error.503")
    console.logins.put(pre, PendingLogin(started["handle"], login, now, "proof"))
    return web.json_response({"nonce": _std64(started["nonce"]), "salt": _std64(started["salt"]),
                              "iter": iterations})


class _Unreadable(Exception):
    """The browser's step is not what the script sends."""


Ask = Callable[[Console, PendingLogin, dict[str, Any]], Awaitable[dict[str, Any]]]


async def _relay(request: web.Request, stage: str, wrong: str, ask: Ask) -> web.Response:
    """One step after the start: the pending login of this browser, the core's answer, the session."""
    console = request.app[CONSOLE]
    pre = _pre(request)
    ip = browser_ip(request)
    now = time.monotonic()
    pending = console.logins.get(pre, stage, now) if pre is not None else None
    if pre is None or pending is None:
        return _answer(400, "login.stale")
    if console.limiter.blocked(ip, now):
        return _answer(429, "login.limited")
    try:
        answer = await ask(console, pending, await _body(request))
    except _Unreadable:
        console.limiter.failed(ip, now)
        return _answer(400, wrong)
    except BadLogin as exc:
        console.limiter.failed(ip, now)
        return _answer(429, "login.limited") if exc.code == "rate_limited" else _answer(401, wrong)
    except Refused as exc:
        console.limiter.failed(ip, now)
        log.info("operator login refused", extra={"login": pending.login, "step": stage, "reason": exc.code})
        return _answer(401, wrong)
    except CoreDown:
        return _answer(503, "error.503")
    body: dict[str, Any] = {"next": _next(request)}
    if "sig" in answer:
        body["sig"] = _std64(answer["sig"])
    if answer.get("otp_required"):       # the same handle takes the code next
        pending.stage = "otp"
        return web.json_response({"sig": body["sig"], "otp_required": True})
    console.logins.drop(pre)
    return await _logged_in(request, answer, pending.login, body)


async def _proof(console: Console, pending: PendingLogin, body: dict[str, Any]) -> dict[str, Any]:
    proof = unb64(body.get("proof"), 32)
    if proof is None or len(proof) != 32:
        raise _Unreadable()
    pending.stage = "used"               # one proof per handle, right or wrong
    return await console.link.proxy_proof(pending.handle, proof)


async def _otp(console: Console, pending: PendingLogin, body: dict[str, Any]) -> dict[str, Any]:
    code = body.get("code")
    if type(code) is not str or not 0 < len(code.strip()) <= 64:
        raise _Unreadable()
    return await console.link.proxy_otp(pending.handle, code.strip().replace(" ", ""))


async def login_proof(request: web.Request) -> web.StreamResponse:
    return await _relay(request, "proof", "login.wrong", _proof)


async def login_otp(request: web.Request) -> web.StreamResponse:
    return await _relay(request, "otp", "login.otp_wrong", _otp)


def _next(request: web.Request) -> str:
    return local_path(request.query.get("next", "/"))


async def _logged_in(request: web.Request, answer: dict[str, Any], login: str,
                     body: dict[str, Any]) -> web.Response:
    """The operator's session is open: remember their table, set the cookie, end an older session."""
    console = request.app[CONSOLE]
    ip = browser_ip(request)
    sid: bytes = answer["sid"]
    operator = await load_operator(console, sid, ip, float(answer.get("timeout") or DEFAULT_TIMEOUT))
    console.book.put(operator, time.monotonic())
    console.limiter.succeeded(ip)
    old = request.get(SID)
    if old is not None and old != sid:     # a second login in this browser: end the first session
        console.book.drop(old)
        try:
            await console.link.logout(old, ip)
        except (CoreDown, Refused):
            pass
    # the session's form token: the script ends the session with it when the core's signature is wrong
    response = web.json_response({**body, "csrf": csrf_token(console.key, sid)})
    response.set_cookie(SID_COOKIE, b64(sid), httponly=True, samesite="Strict", path="/",
                        secure=console.section.cookie_secure)
    log.info("operator logged in", extra={"login": login, "ip": ip})
    return response


async def logout(request: web.Request) -> web.StreamResponse:
    console = request.app[CONSOLE]
    sid = request.get(SID)
    if sid is not None:
        console.book.drop(sid)
        await console.link.logout(sid, browser_ip(request))
    response = see_other("/login", m="login.out")
    response.del_cookie(SID_COOKIE, path="/")
    return response


def add_routes(app: web.Application) -> None:
    app.router.add_get("/login", login_page)
    app.router.add_post("/login/start", login_start)
    app.router.add_post("/login/proof", login_proof)
    app.router.add_post("/login/otp", login_otp)
    app.router.add_post("/logout", logout)
