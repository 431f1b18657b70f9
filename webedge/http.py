"""The HTTP pieces every web edge shares: security headers, cookies' values,
the browser's address, safe redirects, TLS and the aiohttp runner.

Each edge's own middleware (``portal.app``, ``console.app``) maps its
errors to its pages; what it sends on *every* answer comes from here, so the
office and the console cannot drift apart on a header:

* a CSP without inline script or style (``connect-src 'self'`` only for an
  edge whose script talks to it: the console's login and live updates), no
  framing, no caching of personal pages, no referrer;
* HSTS when the edge is reached over HTTPS.

``serve`` bounds a connection: a request line and each header field at
8 KiB, the body at the application's ``client_max_size``, and a
connection that has not finished its first request's headers within the
keep-alive timeout (aiohttp arms it when the connection opens) is closed,
so a slowloris client holds a connection at most that long.
"""

from __future__ import annotations

import asyncio
import base64
import binascii
import logging
import re
import signal
import ssl
from pathlib import Path
from typing import Any
from urllib.parse import urlencode

from aiohttp import web
from aiohttp.http_exceptions import HttpProcessingError

from .i18n import LANGUAGES

SHARED_STATIC = Path(__file__).parent / "static"

__all__ = ["security_headers", "b64", "unb64", "client_ip", "ascii_int", "local_path", "see_other",
           "language_chosen", "add_shared_static", "tls_context", "serve", "stop_on_signals", "serve_until"]

_CSP = ("default-src 'none'; style-src 'self'; img-src 'self' data:; script-src 'self';{connect}"
        " form-action 'self'; frame-ancestors 'none'; base-uri 'none'")
_HEADERS = {
    "X-Content-Type-Options": "nosniff",
    "X-Frame-Options": "DENY",
    "Referrer-Policy": "no-referrer",
    "Cache-Control": "no-store",
    "Cross-Origin-Opener-Policy": "same-origin",
    "Cross-Origin-Resource-Policy": "same-origin",
    "Permissions-Policy": "camera=(), microphone=(), geolocation=(), payment=(), usb=()",
}
# Sent only when the edge is reached over HTTPS (its own TLS, or a TLS proxy
# in front); over plain HTTP a browser ignores it anyway.
_HSTS = ("Strict-Transport-Security", "max-age=31536000")


def security_headers(response: web.StreamResponse, *, https: bool, connect_self: bool = False) -> None:
    """Add the headers every answer carries (a header the page set itself wins)."""
    response.headers.setdefault("Content-Security-Policy",
                                _CSP.format(connect=" connect-src 'self';" if connect_self else ""))
    for name, value in _HEADERS.items():
        response.headers.setdefault(name, value)
    if https:
        response.headers.setdefault(*_HSTS)


def b64(raw: bytes) -> str:
    """Bytes for a cookie or a JSON field: URL-safe base64 without padding."""
    return base64.urlsafe_b64encode(raw).decode().rstrip("=")


def unb64(text: object, max_len: int = 64) -> bytes | None:
    """``b64``'s bytes back, None when ``text`` is not 1..max_len of them."""
    if type(text) is not str or not text or len(text) > max_len * 2:
        return None
    try:
        raw = base64.urlsafe_b64decode(text + "=" * (-len(text) % 4))
    except (binascii.Error, ValueError):
        return None
    return raw if 0 < len(raw) <= max_len else None


def client_ip(request: web.Request, trust_forwarded: bool) -> str:
    """The browser's address (the last X-Forwarded-For hop only behind our own proxy)."""
    if trust_forwarded:
        forwarded = request.headers.get("X-Forwarded-For", "")
        if forwarded:
            return forwarded.split(",")[-1].strip()
    return request.remote or "0.0.0.0"


def ascii_int(raw: str, max_digits: int) -> int | None:
    """``raw`` as an int when it is 1..max_digits ASCII digits, else None.
    (``str.isdigit`` also accepts '²' or '١', which ``int`` refuses or reads.)"""
    if not raw or len(raw) > max_digits or not raw.isascii() or not raw.isdecimal():
        return None
    return int(raw)


# A path of this site: "/" then URL-safe characters only.  Browsers drop tabs
# and newlines from a Location ("/\t/evil" becomes "//evil", another host) and
# read "\\" as "/", so anything but these characters is refused outright.
_LOCAL_PATH = re.compile(r"/(?![/\\])[A-Za-z0-9._~!$&'()*+,;=:@%/?-]{0,511}")


def local_path(wanted: str) -> str:
    """``wanted`` when it is a path on this site, else "/" (no open redirect)."""
    return wanted if _LOCAL_PATH.fullmatch(wanted) else "/"


def see_other(location: str, **query: Any) -> web.Response:
    """A 303 to ``location`` with ``query`` (None values left out)."""
    values = {key: value for key, value in query.items() if value is not None}
    return web.Response(status=303, headers={"Location": location + ("?" + urlencode(values) if values else "")})


def language_chosen(request: web.Request, cookie: str, *, secure: bool) -> web.Response | None:
    """``/lang/{lang}?next=…``: back to ``next`` with the choice in ``cookie`` for a year; None: no such language."""
    lang = request.match_info["lang"]
    if lang not in LANGUAGES:
        return None
    response = see_other(local_path(request.query.get("next", "/")))
    response.set_cookie(cookie, lang, httponly=True, samesite="Strict", path="/", max_age=365 * 86400, secure=secure)
    return response


def add_shared_static(app: web.Application) -> None:
    """``/edge/…``: the stylesheet every edge's pages load before their own."""
    app.router.add_static("/edge", SHARED_STATIC, append_version=True)


def tls_context(cert: str, key: str) -> ssl.SSLContext | None:
    if not cert:
        return None
    ctx = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    ctx.minimum_version = ssl.TLSVersion.TLSv1_2
    ctx.load_cert_chain(cert, key)
    return ctx


class _ClientErrorsInOneLine(logging.Filter):
    """aiohttp logs a malformed request (a header over the cap, bad framing)
    as ERROR with a traceback: a log any client can flood.  It is the
    client's mistake, answered with a 400: keep one INFO line."""

    def filter(self, record: logging.LogRecord) -> bool:
        exc = record.exc_info[1] if record.exc_info else None
        if isinstance(exc, HttpProcessingError):
            record.exc_info = None
            record.exc_text = None
            record.levelno, record.levelname = logging.INFO, "INFO"
            record.msg, record.args = "malformed request refused: %s", (str(exc.message)[:120],)
        return True


async def serve(app: web.Application, *, host: str, port: int, tls_cert: str = "", tls_key: str = "",
                logger_name: str, keepalive_timeout: float = 15.0) -> web.AppRunner:
    """Start ``app`` on ``host:port``; returns the runner (``cleanup()`` stops it)."""
    http_log = logging.getLogger(logger_name)
    if not any(isinstance(f, _ClientErrorsInOneLine) for f in http_log.filters):
        http_log.addFilter(_ClientErrorsInOneLine())
    runner = web.AppRunner(app, access_log=None, handler_cancellation=True,
                           keepalive_timeout=keepalive_timeout, max_line_size=8190, max_field_size=8190,
                           shutdown_timeout=2.0, logger=http_log)
    await runner.setup()
    site = web.TCPSite(runner, host, port, ssl_context=tls_context(tls_cert, tls_key), backlog=512)
    await site.start()
    return runner


def stop_on_signals() -> asyncio.Event:
    """An event SIGTERM and SIGINT set (for an edge run by hand, ``python -m …``)."""
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    return stop


async def serve_until(stop: asyncio.Event, runner: web.AppRunner, link: Any) -> None:
    """Serve until ``stop`` is set; then close the site and the edge's link to the core."""
    try:
        await stop.wait()
    finally:
        await runner.cleanup()
        await link.close()
