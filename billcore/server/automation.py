"""The automation steps of the core's periodic pass: FUP restores, the dunning pass, the invoice run.

Theory of operation
-------------------
``billcore.server.core._periodic_pass`` calls ``automation_pass(core)`` once
per pass, before the periodic charges.  Both steps are idempotent and take
``now`` from the core's clock, so a pass repeated or restarted takes each
step once (``billcore.billing.fup.restore_due``,
``billcore.billing.dunning.dunning_step``); their outbox events reach RADIUS,
notifications and hooks through the outbox, and block changes are announced
after their commits like every other block change.

The monthly invoice run (``[invoices] auto``) reads every account, so it
runs once per local day of ``now - grace``: accounting periods end at
local midnights, so that date moves exactly when new period ends come
past their grace.  The run is idempotent (``billcore.billing.invoices``);
a run that failed is logged and tried again on the next pass, and the
pass's periodic charges go on.
"""

from __future__ import annotations

import logging
from datetime import timedelta

from billcore.api import announce
from billcore.billing import invoices
from billcore.billing.dunning import DunningResult, dunning_step
from billcore.billing.fup import restore_due
from billcore.common.errors import BillingError
from billcore.server.context import CoreContext

__all__ = ["automation_pass", "invoice_pass"]

log = logging.getLogger("billcore.server.automation")


async def automation_pass(core: CoreContext) -> tuple[int, DunningResult]:
    """Restore the throttles whose period ended, then advance dunning; (restored, dunning result).

    Debtors and open cycles are looked at every pass; the run-out forecast
    that reminders need reads every account under a policy, so it runs on
    the first pass of each local day (and the first after a start: a
    reminder is once per cycle, a second look sends nothing twice)."""
    now = core.now()
    today = now.astimezone(core.config.zone).date()
    reminders = core.extras.get("dunning_reminders_on") != today
    async with core.pool.acquire() as conn:
        restored = await restore_due(conn, now)
        result = await dunning_step(conn, now, core.config.zone, reminders=reminders)
    if reminders:
        core.extras["dunning_reminders_on"] = today
    await announce(core, result.block_changes)
    await invoice_pass(core)
    return restored, result


async def invoice_pass(core: CoreContext) -> invoices.RunResult | None:
    """The monthly invoice run, once per local day of ``now - grace`` (None: not this pass)."""
    cfg = core.config.invoices
    if not cfg.auto:
        return None
    now = core.now()
    grace = timedelta(seconds=cfg.grace)
    day = (now - grace).astimezone(core.config.zone).date()
    if core.extras.get("invoices_run_on") == day:
        return None
    try:
        result = await invoices.run(core.pool, now, grace, series=cfg.series, tz=core.config.zone,
                                    batch_size=cfg.batch_size, workers=cfg.workers)
    except BillingError as exc:
        # a refused batch rolled back alone (the committed ones stand); the charges of this pass must
        # still run, and the next pass tries the run again
        log.error("invoice run failed, will retry", extra={"code": exc.code, "reason": str(exc)})
        return None
    core.extras["invoices_run_on"] = day
    if result.issued:
        log.info("invoice run", extra={"issued": result.issued, "accounts": result.accounts, "total": result.total})
    return result
