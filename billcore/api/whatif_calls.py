"""``reports.whatif``: a past period re-rated under another tariff, per account and in total.

Admin call (kinds ``{"admin"}``, right ``reports.read``), streaming: chunks of
rows ``[account_id, charged, would_pay, difference, note]`` (money in
micro-units; ``would_pay`` and ``difference`` are None and ``note`` says why
when an account cannot be re-rated), then the totals as the result.  The
work is ``billcore.billing.whatif.rerate`` inside one READ ONLY,
repeatable-read transaction: nothing is posted, and every batch sees the
same snapshot.
"""

from __future__ import annotations

from datetime import datetime, timezone
from typing import Any, Final

from billcore.api import ADMIN, handler, need_int
from billcore.billing.whatif import Selection, Totals, WhatIfError, Window, month_window, rerate
from billcore.server.call_context import CallContext
from billcore.server.calls import CallSpec
from billcore.server.context import CoreContext

__all__ = ["calls", "whatif_window"]

CHUNK: Final = 1_000


def whatif_window(month: object, until_month: object, period_start: object, tz: Any) -> Window:
    """The window of a call's arguments: ``month`` [``until_month``], or ``period_start`` (an instant)."""
    if (month is None) == (period_start is None):
        raise WhatIfError("give month (\"YYYY-MM\") or period_start (an ISO time), one of them")
    if period_start is not None:
        if until_month is not None:
            raise WhatIfError("until_month goes with month")
        if not isinstance(period_start, datetime) or period_start.utcoffset() is None:
            raise WhatIfError("period_start must be a time with its zone")
        at = period_start.astimezone(timezone.utc)
        return Window(at, at, at=True)
    if type(month) is not str or (until_month is not None and type(until_month) is not str):
        raise WhatIfError("month and until_month are \"YYYY-MM\" strings")
    return month_window(month, until_month, tz)


def calls(core: CoreContext) -> list[CallSpec]:
    tz = core.config.zone

    @handler
    async def reports_whatif(ctx: CallContext, tariff_id: int, month: str | None = None,
                             until_month: str | None = None, period_start: datetime | None = None,
                             account_id: int | None = None, of_tariff: int | None = None,
                             all: bool | None = None) -> dict[str, Any]:
        """What the accounts would have paid for a past period under tariff tariff_id, posting nothing:
        rows [account_id, charged, would_pay, difference, note] streamed, totals as the result. The
        period: month "YYYY-MM" (the accounting periods starting in it; until_month "YYYY-MM" for a
        range of months) or period_start (each account's accounting period holding that time). The
        accounts: account_id, of_tariff (those with a link to that tariff in the period) or all=true.
        charged is what the ledger holds for the period (periodic fees, usage, once-off fees);
        would_pay rates the same usage and links under the candidate with the live charging code; an
        account whose usage the candidate prices by time ranges the counters do not separate gets
        note "cannot_rerate: ..." and no figure."""
        need_int("tariff_id", tariff_id)
        chosen = [name for name, value in (("account_id", account_id), ("of_tariff", of_tariff),
                                            ("all", all or None)) if value is not None]
        if len(chosen) != 1:
            raise WhatIfError("give exactly one of account_id, of_tariff or all=true")
        if all is not None and type(all) is not bool:
            raise WhatIfError("all is true or false")
        selection = Selection(None if account_id is None else need_int("account_id", account_id),
                              None if of_tariff is None else need_int("of_tariff", of_tariff))
        window = whatif_window(month, until_month, period_start, tz)
        totals = Totals()
        async with core.pool.acquire() as conn, conn.transaction(readonly=True, isolation="repeatable_read"):
            async for rows in rerate(conn, tariff_id, window, selection, now=core.now(), tz=tz):
                for row in rows:
                    totals.add(row)
                for first in range(0, len(rows), CHUNK):
                    await ctx.stream([[row.account_id, row.charged, row.would_pay, row.difference, row.note]
                                      for row in rows[first:first + CHUNK]])
        return {"tariff_id": tariff_id, "since": window.since, "until": window.until if not window.at else None,
                **totals.as_dict()}

    return [
        CallSpec("reports.whatif", reports_whatif, right="reports.read", kinds=ADMIN, streaming=True,
                 args={"tariff_id": "int", "month": "str?", "until_month": "str?", "period_start": "time?",
                       "account_id": "int?", "of_tariff": "int?", "all": "bool?"},
                 doc=reports_whatif.__doc__ or "", result="map",
                 fields={"account_id": "int", "charged": "money", "would_pay": "money", "difference": "money",
                         "note": "str"}, bound="stream"),
    ]
