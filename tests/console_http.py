"""Logging in to the console with a plain HTTP client, as the login page's script does.

The console's login (console/login.py) relays SCRAM steps: the browser
computes the proof from the password, the console never receives it. This
is the same client side in Python, for the tests that tamper with URLs and
for benchmarks/console_pages.py: ``GET /login`` (the pre-session cookie and
the CSRF token), ``POST /login/start``, ``POST /login/proof`` (checking the
core's signature, as the script does) and, when asked, ``POST /login/otp``.
"""

from __future__ import annotations

import base64
import hmac
import re
import secrets
from collections.abc import Callable
from typing import Any

import aiohttp

from urfa import scram

__all__ = ["LoginRefused", "csrf_in", "http_login"]

_CSRF = (re.compile(r'name="csrf"[^>]*value="([^"]+)"'), re.compile(r'value="([^"]+)"[^>]*name="csrf"'),
         re.compile(r'name="csrf-token"[^>]*content="([^"]+)"'))


class LoginRefused(Exception):
    def __init__(self, status: int, answer: dict[str, Any]) -> None:
        super().__init__(f"HTTP {status}: {answer}")
        self.status = status
        self.answer = answer


def csrf_in(html: str) -> str:
    """The CSRF token a console page carries (a form's hidden field or the page's meta tag)."""
    for pattern in _CSRF:
        found = pattern.search(html)
        if found:
            return found.group(1)
    raise AssertionError(f"no CSRF token in the page: {html[:1500]}")


def _b64(raw: bytes) -> str:
    return base64.urlsafe_b64encode(raw).decode().rstrip("=")


def _bytes(text: str) -> bytes:
    return base64.b64decode(text + "=" * (-len(text) % 4))


async def _step(http: aiohttp.ClientSession, url: str, csrf: str, body: dict[str, Any]) -> dict[str, Any]:
    async with http.post(url, json={**body, "csrf": csrf}, headers={"X-CSRF-Token": csrf}) as response:
        answer = await response.json(content_type=None)
        if response.status != 200:
            raise LoginRefused(response.status, answer)
        return dict(answer)


async def http_login(http: aiohttp.ClientSession, url: str, login: str, password: str,
                     code: Callable[[], str] | None = None) -> dict[str, Any]:
    """Log ``login`` in; ``http`` keeps the session cookie. ``code`` gives the TOTP code when one is asked."""
    async with http.get(url + "/login") as response:
        csrf = csrf_in(await response.text())
    cnonce = secrets.token_bytes(16)
    started = await _step(http, url + "/login/start", csrf, {"login": login, "cnonce": _b64(cnonce)})
    salt, nonce, iterations = _bytes(started["salt"]), _bytes(started["nonce"]), int(started["iter"])
    keys = scram.client_keys(password, salt, iterations)
    message = scram.auth_message("admin", login, cnonce, nonce, salt, iterations)
    proved = await _step(http, url + "/login/proof", csrf, {"proof": _b64(scram.client_proof(keys, message))})
    # only the core, holding the verifier, can sign this: the script checks it, so do we
    if not hmac.compare_digest(_bytes(proved["sig"]), scram.server_signature(keys.server_key, message)):
        raise LoginRefused(200, {"error": "the server's signature is wrong"})
    if proved.get("otp_required"):
        if code is None:
            raise LoginRefused(200, proved)
        return await _step(http, url + "/login/otp", csrf, {"code": code()})
    return proved
