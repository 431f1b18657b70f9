"""Built-in URFA call modules for the money side: users, the subscriber list,
bulk changes, accounts, blocks, payments, audit, and the subscriber's own
``me.*`` calls.

Theory of operation
-------------------
Each module exposes ``calls(core: CoreContext) -> list[CallSpec]``; the
handlers close over ``core`` and get the URFA ``CallContext`` (principal and
client address) as their first argument.  The pieces shared by every
handler live here:

* ``handler(fn)`` — a ``BillingError`` becomes ``CallFailed(code,
  message)`` (codes from ``ledger_errors``/``errors``), so a refused
  operation answers with a clear code and, because it was raised inside the
  transaction, books nothing.  (The URFA service maps the same errors, and
  PostgreSQL's refusals, for every call: ``billcore.server.wire_errors``.)
* ``who(ctx)`` — the audit identity (kind, id, login, ip).
* ``announce(core, changes)`` — after COMMIT, publish every block change on
  topic ``"blocks"`` (a notice for the console's pages).  Never before the
  commit: a rolled-back block must not be announced.  The side effects of a
  block (plugin hooks, RADIUS's Disconnect) do not hang on this notice: the
  block's own transaction enqueued ``account.blocked``/``account.unblocked``
  in the outbox (``billcore.billing.blocks``), delivered at least once.
* argument checks shared by the modules (``need_int``, ``page``).

``money_calls(core)`` returns every call of this package, for the core to
register.
"""

from __future__ import annotations

import functools
from collections.abc import Awaitable, Callable, Iterable
from typing import ParamSpec, TypeVar

from billcore.billing.audit import Who
from billcore.billing.blocks import BlockChange
from billcore.common.errors import BillingError
from billcore.billing.ledger_errors import InvalidValue
from billcore.server.call_context import CallContext
from billcore.server.context import CoreContext
from billcore.server.calls import CallSpec
from urfa.errors import CallFailed

__all__ = ["ADMIN", "ADMIN_SYSTEM", "USER", "announce", "handler", "listened", "money_calls", "need_int",
           "page", "who", "MAX_ID"]

ADMIN = frozenset({"admin"})
ADMIN_SYSTEM = frozenset({"admin", "system"})
USER = frozenset({"user"})
MAX_ID = 2**63 - 1

Args = ParamSpec("Args")
Result = TypeVar("Result")


def handler(fn: Callable[Args, Awaitable[Result]]) -> Callable[Args, Awaitable[Result]]:
    """Turn billing errors into ``CallFailed`` with their stable code."""

    @functools.wraps(fn)
    async def wrapped(*args: Args.args, **kwargs: Args.kwargs) -> Result:
        try:
            return await fn(*args, **kwargs)
        except BillingError as exc:
            raise CallFailed(exc.code, str(exc)) from None

    return wrapped


def who(ctx: CallContext) -> Who:
    principal = ctx.principal
    return Who(principal.kind, principal.id, principal.login, ctx.ip or "")


def listened(core: CoreContext, event: str) -> bool:
    """Whether a plugin hook subscribes to ``event`` now: the events only
    hooks read (``account.charged``, ``batch.rated``, ``session.*``) are
    enqueued only then, so a run nobody listens to writes none."""
    bus = core.extras.get("hooks")
    return bus is not None and bool(bus.owners(event))


async def announce(core: CoreContext, changes: Iterable[BlockChange]) -> None:
    for change in changes:
        core.publish("blocks", change.event())


def need_int(name: str, value: object, lo: int = 1, hi: int = MAX_ID) -> int:
    if type(value) is not int or not lo <= value <= hi:
        raise InvalidValue(f"{name} must be an int in {lo}..{hi}")
    return value


def page(limit: object, offset: object, max_limit: int = 1000) -> tuple[int, int]:
    limit = 100 if limit is None else limit
    offset = 0 if offset is None else offset
    return need_int("limit", limit, 1, max_limit), need_int("offset", offset, 0, 10**9)


def money_calls(core: CoreContext) -> list[CallSpec]:
    """Every call module of this package."""
    from billcore.api import accounts, bulk, me, payments, subscribers, users

    return [*users.calls(core), *accounts.calls(core), *payments.calls(core), *me.calls(core),
            *subscribers.calls(core), *bulk.calls(core)]
