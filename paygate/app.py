"""The payment gateways' callback edge: ``POST /callback/{gateway}``.

Theory of operation
-------------------
A gateway tells billcore that a subscriber paid by POSTing a signed JSON
body (``paygate.callback`` says which fields; ``webedge.paysign`` how it is
signed).  The edge holds no database: it asks the core over URFA, logged in
as the system login ``paygate``, which holds exactly ``payments.lookup``
(which account does the callback name) and ``payments.add``.

One callback, one decision, in this order (the first that fails answers):

1. the gateway is configured (else 404 ``unknown_gateway``);
2. the body arrives within ``max_body`` bytes (413) and ``read_timeout``
   seconds (408);
3. the signature is good (401 ``bad_signature``) and the timestamp within
   ``window`` seconds (401 ``stale_timestamp``);
4. the fields are good (400 ``bad_field`` naming the field; 400
   ``wrong_currency``);
5. a status other than ``paid`` is acknowledged (200 ``ignored``) and
   books nothing;
6. the account is known (404 ``unknown_account``; 400 ``ambiguous_account``
   when the text is one account's id and another subscriber's contract
   number);
7. ``payments.add`` with external id ``"<gateway>:<txn_id>"`` and method
   ``"gateway:<gateway>"``: 200 with the payment (``duplicate: true`` when
   it was booked before — gateways retry until they see a 2xx, so a
   repeated callback must succeed without booking twice); the same
   transaction id with another amount or account is 409 ``conflict``.

The core being unreachable (or the database away) is 503 with
``Retry-After``: the gateway retries, and the retry is idempotent.  No
answer carries the core's or the database's text, and every decision is
logged (gateway, transaction, account, amount, decision) without the
secret, the signature or the body.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from aiohttp import web

from billcore.common.config import BillingSection, GatewaySection, PaygateSection
from webedge import http
from webedge.core_link import CoreDown, CoreLink, Refused, SessionGone
from webedge.paysign import check_callback
from billcore.common.sysfiles import service_password_file
from webedge.settings import core_address, read_gateway_secret

from .callback import PAID, BadField, Callback, parse_callback

__all__ = ["Gateway", "build_app", "gateways_of", "paygate_link", "resolve_account", "run", "serve"]

log = logging.getLogger("paygate")

GATEWAYS: web.AppKey[dict[str, Gateway]] = web.AppKey("gateways", dict)
LINK: web.AppKey[CoreLink] = web.AppKey("link", CoreLink)
SECTION: web.AppKey[PaygateSection] = web.AppKey("section", PaygateSection)
CLOCK: web.AppKey[Callable[[], float]] = web.AppKey("clock", object)  # type: ignore[arg-type]
RETRY_AFTER = "30"


@dataclass(frozen=True, slots=True)
class Gateway:
    name: str
    secret: bytes
    currency: str
    amount_format: str
    minor_units: int


def gateways_of(section: PaygateSection, billing: BillingSection) -> dict[str, Gateway]:
    """The configured gateways with their secrets read (``ValueError`` naming a file that cannot be);
    they speak the installation's currency (``[billing]``)."""
    return {gw.name: _gateway(billing, gw) for gw in section.gateways}


def _gateway(billing: BillingSection, gw: GatewaySection) -> Gateway:
    return Gateway(gw.name, read_gateway_secret(Path(gw.secret_file)), gw.currency or billing.currency,
                   gw.amount_format, billing.minor_units)


class Unresolved(Exception):
    def __init__(self, status: int, error: str) -> None:
        super().__init__(error)
        self.status = status
        self.error = error


def resolve_account(text: str, found: Mapping[str, Any]) -> int:
    """The account ``text`` names, from ``payments.lookup``'s answer for it as a contract and as an id."""
    by_contract = {row["contract"]: int(row["account_id"]) for row in found.get("contracts", [])}
    contract = by_contract.get(text)
    by_id = int(text) if text.isascii() and text.isdecimal() and int(text) in found.get("accounts", []) else None
    if contract is not None and by_id is not None and contract != by_id:
        raise Unresolved(400, "ambiguous_account")
    account = contract if contract is not None else by_id
    if account is None:
        raise Unresolved(404, "unknown_account")
    return account


def _answer(status: int, **body: Any) -> web.Response:
    response = web.json_response(body, status=status)
    if status == 503:
        response.headers["Retry-After"] = RETRY_AFTER
    response.headers["Cache-Control"] = "no-store"
    return response


async def _read_body(request: web.Request, limit: int, timeout: float) -> bytes:
    if request.content_length is not None and request.content_length > limit:
        raise web.HTTPRequestEntityTooLarge(max_size=limit, actual_size=request.content_length)

    async def read() -> bytes:
        chunks: list[bytes] = []
        size = 0
        while True:
            chunk = await request.content.read(min(65536, limit + 1 - size))
            if not chunk:
                return b"".join(chunks)
            chunks.append(chunk)
            size += len(chunk)
            if size > limit:
                raise web.HTTPRequestEntityTooLarge(max_size=limit, actual_size=size)

    return await asyncio.wait_for(read(), timeout)


async def callback(request: web.Request) -> web.StreamResponse:
    name = request.match_info["gateway"]
    section = request.app[SECTION]
    gateway = request.app[GATEWAYS].get(name)
    peer = request.remote or ""
    decided: dict[str, Any] = {"gateway": name[:32], "peer": peer}

    def decide(status: int, decision: str, **body: Any) -> web.Response:
        level = logging.INFO if status < 500 else logging.WARNING
        log.log(level, "callback decided", extra={**decided, "decision": decision, "http": status})
        return _answer(status, **body)

    if gateway is None:
        return decide(404, "unknown_gateway", error="unknown_gateway")
    try:
        body = await _read_body(request, section.max_body, section.read_timeout)
    except web.HTTPRequestEntityTooLarge:
        return decide(413, "too_large", error="too_large")
    except asyncio.TimeoutError:
        return decide(408, "slow_body", error="timeout")
    refused = check_callback(gateway.secret, request.headers.get("X-Billcore-Timestamp"),
                             request.headers.get("X-Billcore-Signature"), body, request.app[CLOCK](),
                             section.window)
    if refused is not None:
        return decide(401, refused, error=refused)
    try:
        cb = parse_callback(body, gateway.amount_format, gateway.currency, gateway.minor_units)
    except BadField as exc:
        decided["field"] = exc.field
        return decide(400, exc.error, error=exc.error, field=exc.field, detail=exc.why)
    decided.update(txn_id=cb.txn_id, account=cb.account, amount=cb.amount, status=cb.status)
    if cb.status != PAID:
        return decide(200, "ignored", result="ignored", payment_status=cb.status, txn_id=cb.txn_id)
    try:
        return await _book(request, gateway, cb, decide, decided)
    except (CoreDown, SessionGone) as exc:
        decided["reason"] = str(exc)[:80]
        return decide(503, "core_unavailable", error="unavailable")


async def _book(request: web.Request, gateway: Gateway, cb: Callback,
                decide: Callable[..., web.Response], decided: dict[str, Any]) -> web.Response:
    link = request.app[LINK]
    ids = [int(cb.account)] if cb.account.isdecimal() and 0 < int(cb.account) < 2**63 else []
    try:
        found = await link.call_own("payments.lookup", {"contracts": [cb.account], "account_ids": ids})
        account_id = resolve_account(cb.account, found)
    except Unresolved as exc:
        return decide(exc.status, exc.error, error=exc.error)
    except Refused as exc:
        decided["code"] = exc.code
        return decide(400, "refused", error="bad_field", field="account")
    decided["account_id"] = account_id
    try:
        paid = await link.call_own("payments.add", {
            "account_id": account_id, "amount": cb.amount, "method": f"gateway:{gateway.name}",
            "external_id": f"{gateway.name}:{cb.txn_id}",
            "comment": f"order {cb.order_id}" if cb.order_id else ""})
    except Refused as exc:
        decided["code"] = exc.code
        if exc.code == "payments.conflict":
            return decide(409, "conflict", error="conflict", txn_id=cb.txn_id)
        if exc.code == "accounts.unknown":
            return decide(404, "unknown_account", error="unknown_account")
        return decide(400, "refused", error="refused", code=exc.code)
    created = bool(paid["created"])
    decided["payment_id"] = paid["payment_id"]
    return decide(200, "booked" if created else "duplicate", result="ok", txn_id=cb.txn_id,
                  payment_id=paid["payment_id"], account_id=account_id, duplicate=not created)


async def healthz(request: web.Request) -> web.StreamResponse:
    return web.Response(text="ok\n")


@web.middleware
async def _errors(request: web.Request, handler: Any) -> web.StreamResponse:
    try:
        response: web.StreamResponse = await handler(request)
    except web.HTTPNotFound:
        response = _answer(404, error="not_found")
    except web.HTTPMethodNotAllowed:
        response = _answer(405, error="method_not_allowed")
    except Exception:   # a bug: the traceback to the log, a plain answer to the gateway (it retries)
        log.exception("unexpected error on %s %s", request.method, request.path)
        response = _answer(500, error="internal")
    response.headers.setdefault("X-Content-Type-Options", "nosniff")
    return response


def build_app(section: PaygateSection, link: CoreLink, gateways: dict[str, Gateway],
              clock: Callable[[], float] = time.time) -> web.Application:
    app = web.Application(middlewares=[_errors], client_max_size=section.max_body)
    app[SECTION] = section
    app[LINK] = link
    app[GATEWAYS] = gateways
    app[CLOCK] = clock
    app.router.add_post("/callback/{gateway}", callback)
    app.router.add_get("/healthz", healthz)
    return app


async def serve(section: PaygateSection, link: CoreLink, gateways: dict[str, Gateway],
                clock: Callable[[], float] = time.time) -> web.AppRunner:
    """Start the edge on ``section.host:port``; returns the runner (``cleanup()`` stops it)."""
    return await http.serve(build_app(section, link, gateways, clock), host=section.host, port=section.port,
                            tls_cert=section.tls_cert, tls_key=section.tls_key, logger_name="paygate.http",
                            keepalive_timeout=section.read_timeout)


def paygate_link(*, host: str | None, port: int, unix: str | None, login: str, password_file: Path,
                 timeout: float) -> CoreLink:
    """The edge's one link to the core, as its system login (password from the file the core provisions)."""
    return CoreLink.for_endpoint(host=host, port=port, unix=unix, login=login,
                                 password=lambda: password_file.read_text().strip(), timeout=timeout,
                                 logger_name="paygate.core")


async def run(config: Any, dsn: str, index: int, stop: asyncio.Event) -> None:
    """The ``paygate`` role (``dsn`` is unused: the edge has no database access)."""
    s: PaygateSection = config.paygate
    host, port, unix = core_address(config)
    gateways = gateways_of(s, config.billing)
    link = paygate_link(host=host, port=port, unix=unix, login="paygate",
                        password_file=service_password_file(Path(config.data_dir), "paygate"), timeout=s.core_timeout)
    runner = await serve(s, link, gateways)
    log.info("paygate serving", extra={"http": f"{s.host}:{s.port}", "tls": bool(s.tls_cert),
                                       "gateways": ",".join(sorted(gateways)) or "none"})
    await http.serve_until(stop, runner, link)

