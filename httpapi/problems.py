"""The core's error codes as HTTP statuses and RFC 9457 problem documents.

One table, read top to bottom, decides the status of a wire code
(docs/protocol.md §10 lists the codes):

=========  ==========================================================================
400        the request does not fit the call: ``bad_args``, ``bad_json``,
           ``idempotency.*`` (the edge's own checks, before the core runs anything)
401        no token, a malformed one, ``auth_failed`` (unknown, revoked or expired),
           ``no_session`` (the token's session ended and logging in again failed)
403        ``forbidden``, ``not_in_table`` (a call outside the token's role)
404        an unknown call name (code ``not_in_table``); ``*.not_found``,
           ``*.unknown``, ``core.unknown``: an id that names nothing
409        anything else a billing module refuses: a conflict with what is booked
           (``payments.conflict``, ``core.already_exists``, ``core.in_use``…)
405/408    another method than the path takes; a body that does not arrive within ``call_timeout``
413        the body is larger than ``[httpapi] max_body``
422        the arguments have the right shape but a wrong value: ``billing.invalid``,
           ``billing.money_*``, ``billing.amount`` and the other ``billing.*`` value
           codes, ``*.name``, ``*.expires``, ``*.group``, ``*.unknown_group``
429        ``rate_limited``, ``busy``, the token's own rate (with ``Retry-After``)
500        ``internal`` (no detail: the core's log has it), ``billing.invariant``
502        a non-streamed answer longer than ``[httpapi] max_rows`` rows
503        the core cannot be reached, ``core.db_unavailable``, ``shutdown``
504        the call took longer than ``[httpapi] call_timeout``
=========  ==========================================================================

A problem document is ``{type, title, status, detail, code}``; ``type`` is a
stable URN per code (``urn:billcore:error:<code>``), ``code`` the wire code.
"""

from __future__ import annotations

import json
from typing import Any, Final

__all__ = ["status_of", "problem", "problem_body", "TITLES", "PROBLEM_TYPE", "RETRY_AFTER"]

PROBLEM_TYPE: Final = "application/problem+json"

_EXACT: Final[dict[str, int]] = {
    "bad_args": 400, "bad_json": 400,
    "unauthorized": 401, "auth_failed": 401, "no_session": 401, "expired": 401, "logged_out": 401,
    "forbidden": 403, "not_in_table": 403,
    "unknown_call": 404, "deleted": 404, "not_found": 404, "core.unknown": 404,
    "body_too_large": 413,
    "billing.invalid": 422,
    "rate_limited": 429, "busy": 429, "too_many_requests": 429,
    "internal": 500, "billing.invariant": 500,
    "core.db_unavailable": 503, "core_down": 503, "shutdown": 503, "cancelled": 503,
    "timeout": 504,
}
# dotted codes by their last part: a module's validation codes and its unknown objects
_SUFFIX: Final[dict[str, int]] = {
    "not_found": 404, "unknown": 404,
    "name": 422, "expires": 422, "group": 422, "unknown_group": 422, "invalid": 422, "otp_code": 422,
}
_BILLING_VALUES: Final = frozenset({"billing.money_format", "billing.money_range", "billing.amount",
                                    "billing.period", "billing.timerange", "billing.tariff", "billing.usage"})

TITLES: Final[dict[int, str]] = {
    400: "Bad request", 401: "Unauthorized", 403: "Forbidden", 404: "Not found", 405: "Method not allowed",
    408: "Request body timeout", 409: "Conflict", 413: "Request body too large",
    422: "Unprocessable value", 429: "Too many requests", 500: "Internal error",
    502: "Answer too large", 503: "Service unavailable", 504: "Call timed out",
}
# seconds a client waits after a 429 or 503 that gives no better figure
RETRY_AFTER: Final[dict[int, int]] = {429: 1, 503: 5}


def status_of(code: str) -> int:
    """The HTTP status for the wire code ``code`` (the module's table)."""
    if code in _EXACT:
        return _EXACT[code]
    if code.startswith("idempotency."):
        return 400
    if code in _BILLING_VALUES:
        return 422
    head, dot, last = code.rpartition(".")
    if dot and last in _SUFFIX:
        return _SUFFIX[last]
    return 409


def problem(status: int, code: str, detail: str = "") -> dict[str, Any]:
    """The RFC 9457 document; an internal error carries no detail."""
    doc: dict[str, Any] = {"type": f"urn:billcore:error:{code}", "title": TITLES.get(status, "Error"),
                           "status": status, "code": code}
    if detail and status != 500:
        doc["detail"] = detail[:1000]
    return doc


def problem_body(status: int, code: str, detail: str = "") -> bytes:
    return json.dumps(problem(status, code, detail)).encode()
