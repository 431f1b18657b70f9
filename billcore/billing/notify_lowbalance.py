"""``balance.low``: a posting took an account's balance from at or above its threshold to below it.

Theory of operation
-------------------
The threshold is the account's own ``accounts.low_balance`` or, when that is
NULL, the installation's ``[notify] low_balance`` (none: only accounts with
their own).  The ledger reads the account's column with the lock it takes
anyway, and calls ``crossings`` with the balances before and after the
posting: pure arithmetic, no statement.  Only when an account crossed does
the ledger enqueue (one statement for the whole batch), so a usage batch
where nobody crossed costs nothing more.  A crossing is an edge: staying
below does not fire again; rising to the threshold or above and falling
again does.

The installation default is process state set once at start
(``set_default`` from the core's config, see billcore/api/notify_calls.py):
the ledger has no configuration of its own, and passing it through every
caller of every posting function would touch every writer of money.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping

from billcore.billing.outbox import OutboxEvent

__all__ = ["EVENT", "crossings", "default", "set_default"]

EVENT = "balance.low"
_default: list[int | None] = [None]


def set_default(threshold: int | None) -> None:
    """The installation's threshold in micro-units (``None``: only accounts' own)."""
    if threshold is not None and type(threshold) is not int:
        raise TypeError("a threshold is int micro-units")
    _default[0] = threshold


def default() -> int | None:
    return _default[0]


def crossings(account_ids: Iterable[int], before: Mapping[int, int], after: Mapping[int, int],
              own: Mapping[int, int | None]) -> list[OutboxEvent]:
    """One ``balance.low`` event per account that went from ≥ threshold to < threshold."""
    fallback = _default[0]
    out: list[OutboxEvent] = []
    for account_id in account_ids:
        threshold = own.get(account_id)
        if threshold is None:
            threshold = fallback
            if threshold is None:
                continue
        balance = after[account_id]
        if balance < threshold <= before[account_id]:
            out.append(OutboxEvent(EVENT, {"account_id": account_id, "balance": balance, "threshold": threshold},
                                   account_id))
    return out
