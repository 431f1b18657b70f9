"""``payments.lookup``: which account a payment's reference names.

Theory of operation
-------------------
Money arrives naming its account the way a payer knows it: a bank
statement line's purpose text ("по договору A-1042"), a payment gateway's
``account`` field, a subscriber's contract number.  The edges that book it
(the ``paygate`` callback edge, ``billctl payments import-statement``)
hold no database, so they ask here: for contract numbers, the basic
account of the (not deleted) subscriber whose contract number it is; for
account ids, whether that account exists (of a subscriber not deleted).

A contract number is the subscriber's ``users.external_id`` — the field
the console and ``subscribers.search`` show as "contract".  The answer
says nothing else about the subscriber (no name, no balance): the
``paygate`` system login holds just this right and ``payments.add``.
Inputs are bounded (``MAX_REFS`` of each per call): a long statement asks
in pages.
"""

from __future__ import annotations

from typing import Any

from billcore.api import ADMIN_SYSTEM, MAX_ID, handler
from billcore.billing.ledger_errors import InvalidValue
from billcore.server.call_context import CallContext
from billcore.server.calls import CallSpec
from billcore.server.context import CoreContext

__all__ = ["calls", "MAX_REFS"]

MAX_REFS = 1000          # contract numbers, and account ids, per call
MAX_CONTRACT = 128       # users.external_id's own limit


def _contracts(value: object) -> list[str]:
    if not isinstance(value, list) or len(value) > MAX_REFS:
        raise InvalidValue(f"contracts is a list of at most {MAX_REFS} strings")
    for item in value:
        if type(item) is not str or not 1 <= len(item) <= MAX_CONTRACT:
            raise InvalidValue(f"a contract number is a string of 1 to {MAX_CONTRACT} characters")
    return sorted(set(value))


def _account_ids(value: object) -> list[int]:
    if not isinstance(value, list) or len(value) > MAX_REFS:
        raise InvalidValue(f"account_ids is a list of at most {MAX_REFS} ints")
    for item in value:
        if type(item) is not int or not 1 <= item <= MAX_ID:
            raise InvalidValue(f"an account id is an int in 1..{MAX_ID}")
    return sorted(set(value))


def calls(core: CoreContext) -> list[CallSpec]:
    @handler
    async def payments_lookup(ctx: CallContext, contracts: list[str] | None = None,
                              account_ids: list[int] | None = None) -> dict[str, Any]:
        """The accounts that contract numbers and account ids name, for booking a payment.

        Answers {contracts: [{contract, account_id}], accounts: [account_id]}: each known contract number (a subscriber's external id) with its subscriber's basic account, and the account ids that exist; unknown ones are left out. At most 1000 of each per call."""
        wanted_contracts = _contracts(contracts or [])
        wanted_ids = _account_ids(account_ids or [])
        async with core.pool.acquire() as conn:
            by_contract = await conn.fetch(
                "SELECT u.external_id AS contract, a.id AS account_id FROM users u"
                " JOIN accounts a ON a.user_id = u.id AND a.is_basic"
                " WHERE u.external_id = ANY($1::text[]) AND u.deleted_at IS NULL ORDER BY 1",
                wanted_contracts) if wanted_contracts else []
            known = await conn.fetch(
                "SELECT a.id FROM accounts a JOIN users u ON u.id = a.user_id"
                " WHERE a.id = ANY($1::bigint[]) AND u.deleted_at IS NULL ORDER BY 1",
                wanted_ids) if wanted_ids else []
        return {"contracts": [{"contract": row["contract"], "account_id": row["account_id"]} for row in by_contract],
                "accounts": [row["id"] for row in known]}

    return [
        CallSpec("payments.lookup", payments_lookup, right="payments.lookup", kinds=ADMIN_SYSTEM,
                 args={"contracts": "list?", "account_ids": "list?"}, result="map",
                 doc=payments_lookup.__doc__ or "", bound="fixed",
                 fields={"contracts": "list", "accounts": "list"}),
    ]
