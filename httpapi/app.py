"""The HTTP/JSON API: an aiohttp app that maps ``POST /api/v1/calls/{name}`` onto URFA calls.

Theory of operation
-------------------
Nothing here names a billing call.  A request carries a bearer token;
``tokens.TokenDesk`` turns it into the token's own core session, whose
``sys.calls`` is the API: ``GET /api/v1/openapi.json`` is
``openapi.document`` of it, and ``POST /api/v1/calls/{name}`` looks the
call up there, converts the JSON body with the call's declared argument
types (``values``), calls the core as the token's session from the
client's address, and converts the result with the declared result fields.
A streaming call answers ``application/x-ndjson``: one object per row as
the core sends it, then ``{"_result": …}``; an error after the first line
has gone out cannot change the status any more, so it is the last line,
``{"_error": <problem>}``.

One middleware (``_guard``) owns what every request gets: the body bound
(413), the token's rate (429 + ``Retry-After``), every failure as an RFC
9457 problem (the status table is ``problems``), the security headers and
one access-log line (``httpapi.access``: client address, token name, call,
status, milliseconds).  ``Idempotency-Key`` fills a call's ``external_id``
argument, the key the core de-duplicates on (a payment retried with the
same key is booked once and answered with the same booking); a call
without one refuses the header.

All requests share the edge's one URFA connection; past the core's
in-flight cap they wait for a slot (``tokens.TokenDesk``) rather than fail.
"""

from __future__ import annotations

import asyncio
import json
import logging
import re
import time
from collections.abc import AsyncGenerator, Awaitable, Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Final, TypeVar

from aiohttp import web

from billcore.common.api_token import hash_token, well_formed
from billcore.common.config import HttpapiSection
from billcore.common.sysfiles import service_password_file
from webedge import http
from webedge.core_link import CoreLink
from webedge.settings import core_address

from . import openapi, problems
from .limits import RateLimiter
from .tokens import DELETED, CoreDown, CoreRefused, SessionGone, Summary, TokenDesk, TokenSession
from .values import ArgError, args_from_json, result_to_json, row_columns, row_to_json

__all__ = ["Api", "ApiSettings", "build_app", "serve", "run", "api_link"]

log = logging.getLogger("httpapi")
access_log = logging.getLogger("httpapi.access")

_CALL_NAME: Final = re.compile(r"[a-z][a-z0-9_]{0,63}(\.[a-z0-9_]{1,64}){1,4}")
_MAX_KEY: Final = 256
_T = TypeVar("_T")


@dataclass(frozen=True, slots=True)
class ApiSettings:
    """Where the API finds the core and its own password (``of``: from billcore's config)."""

    section: HttpapiSection
    core_host: str
    core_port: int
    core_unix: str | None
    password_file: Path
    login: str = "httpapi"

    @classmethod
    def of(cls, config: Any) -> ApiSettings:
        host, port, unix = core_address(config)
        return cls(section=config.httpapi, core_host=host, core_port=port, core_unix=unix,
                   password_file=service_password_file(Path(config.data_dir), "httpapi"))


class Problem(Exception):
    """An answer the edge gives itself: ``status`` and the wire-style ``code``."""

    def __init__(self, status: int, code: str, detail: str = "", retry_after: int | None = None) -> None:
        super().__init__(f"{status} {code}: {detail}")
        self.status = status
        self.code = code
        self.detail = detail
        self.retry_after = retry_after


@dataclass(slots=True)
class Api:
    section: HttpapiSection
    desk: TokenDesk
    limiter: RateLimiter


API: Final = web.AppKey("api", Api)
# what the access log says about a request, filled in as the request goes
_WHO: Final = "httpapi.who"
_CALL: Final = "httpapi.call"


def _problem_response(status: int, code: str, detail: str = "", retry_after: int | None = None) -> web.Response:
    response = web.Response(status=status, body=problems.problem_body(status, code, detail),
                            content_type=problems.PROBLEM_TYPE)
    wait = retry_after if retry_after is not None else problems.RETRY_AFTER.get(status)
    if wait is not None:
        response.headers["Retry-After"] = str(wait)
    return response


def _from_core(exc: CoreRefused) -> Problem:
    status = problems.status_of(exc.code)
    return Problem(status, exc.code, exc.message)


@web.middleware
async def _guard(request: web.Request, handler: Any) -> web.StreamResponse:
    api = request.app[API]
    started = time.monotonic()
    request[_WHO] = "-"
    request[_CALL] = "-"
    try:
        response: web.StreamResponse = await handler(request)
    except Problem as exc:
        response = _problem_response(exc.status, exc.code, exc.detail, exc.retry_after)
    except CoreRefused as exc:
        problem = _from_core(exc)
        response = _problem_response(problem.status, problem.code, problem.detail)
    except CoreDown as exc:
        log.warning("core unavailable: %s", exc)
        response = _problem_response(503, "core_down", "the billing core cannot be reached; retry later")
    except asyncio.TimeoutError:
        response = _problem_response(504, "timeout", f"the call took longer than {api.section.call_timeout:g} s")
    except web.HTTPRequestEntityTooLarge:
        response = _problem_response(413, "body_too_large", f"the body is larger than {api.section.max_body} bytes")
    except web.HTTPNotFound:
        response = _problem_response(404, "not_found", "no such path; calls are POST /api/v1/calls/{name}")
    except web.HTTPMethodNotAllowed as exc:
        response = _problem_response(405, "method_not_allowed", f"use {', '.join(sorted(exc.allowed_methods))}")
        response.headers["Allow"] = ", ".join(sorted(exc.allowed_methods))
    except web.HTTPException as exc:
        response = _problem_response(exc.status, "http", exc.reason)
    except Exception:
        log.exception("unexpected error on %s %s", request.method, request.path)
        response = _problem_response(500, "internal")
    if not response.prepared:
        http.security_headers(response, https=bool(api.section.tls_cert))
    access_log.info("%s %s %s %s %d %.1fms", http.client_ip(request, api.section.trust_forwarded),
                    request[_WHO], request.method, request[_CALL], response.status,
                    (time.monotonic() - started) * 1000)
    return response


def _bearer(request: web.Request) -> str:
    header = request.headers.get("Authorization", "")
    scheme, _, token = header.partition(" ")
    if not header:
        raise Problem(401, "unauthorized", "an API token is needed: Authorization: Bearer bct_…")
    if scheme.lower() != "bearer" or not well_formed(token.strip()):
        raise Problem(401, "unauthorized", "the Authorization header is not 'Bearer bct_…' with a well-formed token")
    return token.strip()


class _Caller:
    """One request's token session: held while the request runs, logged in again once when the core
    has forgotten it, renewed when its call table may be stale (``tokens`` explains when)."""

    def __init__(self, request: web.Request) -> None:
        api = request.app[API]
        self.api = api
        self.desk = api.desk
        self.request = request
        self.token = _bearer(request)
        self.ip = http.client_ip(request, api.section.trust_forwarded)
        wait = api.limiter.take(hash_token(self.token), time.monotonic())
        if wait > 0:
            raise Problem(429, "too_many_requests", f"this token is limited to {api.section.rate:g} requests/s",
                          retry_after=RateLimiter.retry_after(wait))
        self.session: TokenSession | None = None

    async def __aenter__(self) -> _Caller:
        return self

    async def __aexit__(self, *exc: object) -> None:
        self._let_go()

    def _let_go(self) -> None:
        if self.session is not None:
            self.desk.release(self.session)
            self.session = None

    async def login(self, gone: bool = False) -> TokenSession:
        """The token's session (a new one when ``gone``: the core no longer knows the current one)."""
        if gone and self.session is not None:
            self.desk.forget(self.session)
        self._let_go()
        try:
            session = await self.desk.session(self.token, self.ip)
        except CoreRefused as exc:
            if exc.code == "auth_failed":
                raise Problem(401, "auth_failed", "the token is unknown, revoked or expired") from None
            raise
        self.desk.hold(session)
        self.session = session
        self.request[_WHO] = session.name
        return session

    async def renew(self) -> TokenSession:
        """A session logged in now, whose table is the registry of now."""
        old = self.session
        self._let_go()
        if old is not None:
            self.desk.renew(old)
        return await self.login()

    async def again_if_gone(self, step: Callable[[TokenSession], Awaitable[_T]]) -> _T:
        session = self.session or await self.login()
        try:
            return await step(session)
        except SessionGone:
            pass
        session = await self.login(gone=True)
        try:
            return await step(session)
        except SessionGone:
            raise Problem(401, "no_session", "the token's session ended; try again") from None

    async def table(self, fresh: bool = False) -> dict[str, dict[str, Any]]:
        return await self.again_if_gone(lambda session: self.desk.table(session, fresh))

    async def entry(self, name: str) -> dict[str, Any] | None:
        """``name``'s ``sys.calls`` entry in the token's table, None when it is not there."""
        entry = (await self.table()).get(name)
        session = self.session
        assert session is not None
        if entry is None and self.desk.stale(session, asyncio.get_running_loop().time()):
            await self.renew()            # a plugin may have added it since this session's login
            entry = (await self.table()).get(name)
        return entry if entry is not None and not entry.get("deleted") else None

    async def call(self, fn: str, args: dict[str, Any]) -> Any:
        try:
            return await self.again_if_gone(lambda session: self.desk.call(session, fn, args))
        except CoreRefused as exc:
            if exc.code == DELETED:       # unloaded: the next request gets a table without it
                await self.renew()
            raise


async def openapi_json(request: web.Request) -> web.StreamResponse:
    request[_CALL] = "openapi.json"
    async with _Caller(request) as caller:
        session = await caller.login()
        if caller.desk.stale(session, asyncio.get_running_loop().time()):
            await caller.renew()
        table = await caller.table(fresh=True)
        if any(entry.get("deleted") for entry in table.values()):
            await caller.renew()
            table = await caller.table()
        return web.json_response(openapi.document(table.values()))


async def _body(request: web.Request, api: Api) -> object:
    if request.content_length is not None and request.content_length > api.section.max_body:
        raise web.HTTPRequestEntityTooLarge(max_size=api.section.max_body, actual_size=request.content_length)
    try:
        async with asyncio.timeout(api.section.call_timeout):
            raw = await request.read()
    except TimeoutError:
        raise Problem(408, "body_timeout", "the request body did not arrive in time") from None
    if not raw.strip():
        return None
    # the body is JSON whatever Content-Type says (curl -d sends a form type); no cookie authorises
    # a request here, so a browser's cross-site form gains nothing from that
    try:
        return json.loads(raw)
    except (ValueError, RecursionError):
        raise Problem(400, "bad_json", "the body is not valid JSON") from None


def _idempotent(request: web.Request, entry: dict[str, Any], body: object) -> object:
    key = request.headers.get(openapi.IDEMPOTENCY_HEADER)
    if key is None:
        return body
    if not 1 <= len(key) <= _MAX_KEY:
        raise Problem(400, "idempotency.key", f"Idempotency-Key is 1..{_MAX_KEY} characters")
    if "external_id" not in (entry.get("args") or {}):
        raise Problem(400, "idempotency.unsupported",
                      f"{entry['name']} has no idempotency key of its own (no external_id argument)")
    if body is None:
        body = {}
    if isinstance(body, dict):
        given = body.get("external_id")
        if given is not None and given != key:
            raise Problem(400, "idempotency.mismatch", "the body's external_id differs from the Idempotency-Key header")
        body = {**body, "external_id": key}
    return body


async def call(request: web.Request) -> web.StreamResponse:
    api = request.app[API]
    name = request.match_info["name"]
    request[_CALL] = name[:80]
    async with _Caller(request) as caller:
        if not _CALL_NAME.fullmatch(name):
            raise Problem(404, "not_in_table", "no call has this name")
        body = await _body(request, api)
        entry = await caller.entry(name)
        if entry is None:
            raise Problem(403, "not_in_table", f"{name} is not in this token's call table")
        body = _idempotent(request, entry, body)
        try:
            args = args_from_json(entry.get("args") or {}, body)
        except ArgError as exc:
            raise Problem(400, exc.code, exc.message) from None
        if entry.get("streaming"):
            return await _streamed(request, caller, entry, args)
        result = await caller.call(name, args)
    if isinstance(result, list) and len(result) > api.section.max_rows:
        raise Problem(502, "too_many_rows", f"the answer has more than {api.section.max_rows} rows")
    return web.json_response(result_to_json(result, str(entry.get("result") or "any"), entry.get("fields") or {}))


async def _streamed(request: web.Request, caller: _Caller, entry: dict[str, Any],
                    args: dict[str, Any]) -> web.StreamResponse:
    """The rows as JSON lines; the first chunk is awaited before the status goes out."""
    fields: dict[str, str] = entry.get("fields") or {}
    columns = row_columns(fields)
    name = str(entry["name"])
    async def opened(session: TokenSession) -> tuple[AsyncGenerator[Any, None], Any]:
        chunks = caller.desk.stream(session, name, args)
        return chunks, await chunks.__anext__()

    chunks, first = await caller.again_if_gone(opened)
    response = web.StreamResponse(status=200, headers={"Content-Type": "application/x-ndjson"})
    http.security_headers(response, https=bool(caller.api.section.tls_cert))
    await response.prepare(request)
    item: Any = first
    try:
        while True:
            if isinstance(item, Summary):
                # the summary's keys that are also row columns (periodic.run's totals) are typed as those
                line = {"_result": result_to_json(item.result, str(entry.get("result") or "any"), fields)}
                await response.write(json.dumps(line).encode() + b"\n")
                break
            rows = item if isinstance(item, list) else [item]
            await response.write(b"".join(json.dumps(row_to_json(row, columns, fields)).encode() + b"\n"
                                          for row in rows))
            item = await chunks.__anext__()
    except (CoreRefused, CoreDown, SessionGone, asyncio.TimeoutError) as exc:
        if isinstance(exc, CoreRefused):
            status, code, detail = problems.status_of(exc.code), exc.code, exc.message
        elif isinstance(exc, asyncio.TimeoutError):
            status, code, detail = 504, "timeout", "the core sent no row in time"
        else:
            status, code, detail = 503, "core_down", "the core went away during the stream"
        await response.write(json.dumps({"_error": problems.problem(status, code, detail)}).encode() + b"\n")
    finally:
        await chunks.aclose()
    await response.write_eof()
    return response


async def healthz(request: web.Request) -> web.StreamResponse:
    return web.Response(text="ok\n")


def build_app(section: HttpapiSection, desk: TokenDesk) -> web.Application:
    app = web.Application(middlewares=[_guard], client_max_size=section.max_body)
    app[API] = Api(section=section, desk=desk, limiter=RateLimiter(section.rate, section.burst))
    app.router.add_get(f"{openapi.PREFIX}/openapi.json", openapi_json)
    app.router.add_post(f"{openapi.PREFIX}/calls/{{name}}", call)
    app.router.add_get("/healthz", healthz)
    return app


def api_link(settings: ApiSettings) -> CoreLink:
    """The API's system link (login ``httpapi``, right ``session.proxy_token``)."""
    return CoreLink.for_endpoint(
        host=settings.core_host, port=settings.core_port, unix=settings.core_unix, login=settings.login,
        password=lambda: settings.password_file.read_text().strip(), timeout=settings.section.core_timeout,
        logger_name="httpapi.core")


async def serve(section: HttpapiSection, link: CoreLink, keepalive_timeout: float = 15.0,
                core_inflight: int = 64) -> web.AppRunner:
    """Start the API on ``section.host:port``; returns the runner (``cleanup()`` stops it).
    ``core_inflight``: the core's ``urfa.max_inflight`` (calls one connection may have in flight)."""
    desk = TokenDesk(link.link, call_timeout=section.call_timeout, login_timeout=section.core_timeout,
                     inflight=max(1, core_inflight - 8))
    return await http.serve(build_app(section, desk), host=section.host, port=section.port,
                            tls_cert=section.tls_cert, tls_key=section.tls_key, logger_name="httpapi.http",
                            keepalive_timeout=keepalive_timeout)


async def run(config: Any, dsn: str, index: int, stop: asyncio.Event) -> None:
    """The ``httpapi`` role (``dsn`` is unused: the API has no database access)."""
    settings = ApiSettings.of(config)
    link = api_link(settings)
    runner = await serve(settings.section, link, core_inflight=config.urfa.max_inflight)
    section = settings.section
    log.info("httpapi serving", extra={"http": f"{section.host}:{section.port}", "tls": bool(section.tls_cert)})
    await http.serve_until(stop, runner, link)
