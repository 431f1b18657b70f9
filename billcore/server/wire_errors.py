"""The core's error boundary: what a failed call answers on the wire.

Theory of operation
-------------------
A handler ends in one of three ways when it cannot do what was asked:

* it raises ``CallFailed(code, message)`` itself;
* the domain code under it raises a ``BillingError`` (every class carries
  its stable dotted ``code``: ``billing.invalid``, ``accounts.unknown``...);
* PostgreSQL refuses a statement because of the data it was given: a
  unique, foreign-key, check or not-null rule, or a value out of a
  column's range.

``to_call_failed`` turns each into the documented code (docs/protocol.md
§10) with a message written for the client.  PostgreSQL's own text names
tables, columns and constraints and may quote other rows: it never reaches
the client, only the name of the offending field where one can be read
off the constraint.  Anything else is a bug: the caller logs it with its
traceback and answers ``internal``.
"""

from __future__ import annotations


import asyncpg

from billcore.common.errors import AlreadyExists, BillingError, InUse, UnknownObject
from billcore.billing.ledger_errors import InvalidValue
from billcore.db.constraints import constraint_field
from urfa.errors import CallFailed
from urfa.messages import MAX_TEXT

__all__ = [
    "ALREADY_EXISTS", "IN_USE", "INVALID", "UNKNOWN", "WIRE_CODES", "to_call_failed",
]

ALREADY_EXISTS = AlreadyExists.code
IN_USE = InUse.code
UNKNOWN = UnknownObject.code
INVALID = InvalidValue.code

WIRE_CODES: dict[str, str] = {
    ALREADY_EXISTS: "another object already has this name, login, address or key",
    IN_USE: "the object is still referred to by others; remove those first",
    UNKNOWN: "an id or name in the arguments names no existing object",
    INVALID: "a value is outside its allowed set or range",
}

def _database_refusal(exc: asyncpg.PostgresError) -> CallFailed | None:
    field = constraint_field(exc)
    about = f" ({field})" if field else ""
    if isinstance(exc, asyncpg.UniqueViolationError | asyncpg.ExclusionViolationError):
        return CallFailed(ALREADY_EXISTS, f"already exists: another object has the same{' ' + field if field else ' key'}")
    if isinstance(exc, asyncpg.ForeignKeyViolationError):
        if "still referenced" in (getattr(exc, "detail", None) or ""):
            return CallFailed(IN_USE, "the object is still in use; remove what refers to it first")
        return CallFailed(UNKNOWN, f"a referenced object does not exist{about}")
    if isinstance(exc, asyncpg.NotNullViolationError):
        return CallFailed(INVALID, f"a value is required{about}")
    if isinstance(exc, asyncpg.CheckViolationError):
        return CallFailed(INVALID, f"a value is outside its allowed set or range{about}")
    if isinstance(exc, asyncpg.DataError):   # out of a column's range (asyncpg's own encoding check too)...
        return CallFailed(INVALID, "a value is out of range or malformed for what it names")
    return None


def to_call_failed(exc: BaseException) -> CallFailed | None:
    """The wire error for ``exc``, or ``None`` when it is a bug (answer ``internal``)."""
    if isinstance(exc, CallFailed):
        failed = exc
    elif isinstance(exc, BillingError):
        failed = CallFailed(exc.code, str(exc))
    elif isinstance(exc, asyncpg.PostgresError):
        mapped = _database_refusal(exc)
        if mapped is None:
            return None
        failed = mapped
    else:
        return None
    if len(failed.message) > MAX_TEXT:   # a message longer than this is a malformed frame to the client
        failed = CallFailed(failed.code, failed.message[: MAX_TEXT - 1] + "…")
    return failed
