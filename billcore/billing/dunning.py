"""Dunning: reminders, grace, a speed limit, a block, closing — on the billing clock.

Theory of operation
-------------------
A policy (``dunning_policies``, schema 0017) belongs to a tariff; an account
follows the policy of the tariff in force.  Days count from ``debt_since``,
the first pass that found the account in debt (the debt rule,
``blocks.in_debt``: balance below −(credit + promised credit)).

The steps, as a table (h11-style: every transition is here)::

    not in debt, forecast ≤ reminder_days   → reminder   (balance.runout_soon)
    in debt, no open cycle                  → grace      (cycle + 1; dunning.grace)
    in debt, ≥ grace_days, a throttle profile → throttled (account_throttles, source dunning)
    in debt, ≥ block_after_days              → blocked    (the system block; dunning.blocked)
    in debt, ≥ close_after_days (if set)     → closed     (accounts.status closed; dunning.closed)
    not in debt, open cycle (not closed)     → cleared    (throttle lifted; dunning.cleared)

``dunning_step(conn, now, tz)`` is one pass over the accounts under a policy
(the core's periodic pass calls it; tests drive ``now``).  Every step of one
account is taken in one transaction with the account row locked and the
debt re-read: the step log row (``dunning_steps``, UNIQUE (account, cycle,
step)), the state row, the effect, the audit row and the outbox event (dedup
``dunning:<acct>:<cycle>:<step>``, reminders ``runout:<acct>:reminder:<cycle>``).
A step whose log row exists is not taken again, so a pass repeated, or
interrupted and restarted, takes each step once; a pass that comes late
(the core was down for days) takes every step that is due, in order.

The block is the ordinary ``system`` block: while a policy with
``block_after_days > 0`` holds an open cycle before its block step, the debt
rule's automatic block waits (``blocks.sync_system_blocks`` leaves such
accounts out; see there).  At the block step the state says ``blocked`` and
the debt rule is asked again, so it blocks; a payment that clears the debt
lifts it the usual way, in the payment's transaction.  A payment that clears
the debt cancels the cycle in its own transaction (``add_payment`` calls
``cancel_cleared``; other ways out of debt, such as more credit, at the next
pass): state ``cleared``, the dunning
throttle lifted, ``dunning.cleared`` (a rate event: RADIUS restores the speed).
A closed account stays closed.
"""

from __future__ import annotations

import datetime as dt
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any, Final

import asyncpg

from billcore.billing import audit
from billcore.billing.blocks import BlockChange, in_debt, sync_system_block
from billcore.billing.forecast import burn_rates, forecast
from billcore.billing.fup import add_throttle, lift_throttles
from billcore.billing.ledger_errors import InvalidValue
from billcore.billing.outbox import OutboxEvent, enqueue
from billcore.common.errors import UnknownObject
from billcore.db.rows import DbConnection

__all__ = ["STEPS", "DUNNING_WHO", "Policy", "DunningResult", "dunning_step", "cancel_cleared", "policy_get",
           "policy_set", "policy_delete", "dunning_state", "PASS_BATCH"]

STEPS: Final = ("reminder", "grace", "throttled", "blocked", "closed", "cleared")
DUNNING_WHO: Final = audit.Who("system", 0, "dunning", "")
PASS_BATCH: Final = 5000          # accounts read per statement of a pass
MAX_DAYS: Final = 366
_DAY: Final = dt.timedelta(days=1)


@dataclass(frozen=True, slots=True)
class Policy:
    tariff_id: int
    reminder_days: int = 3
    grace_days: int = 0
    throttle_profile: int | None = None
    block_after_days: int = 0
    close_after_days: int | None = None

    def wire(self) -> dict[str, Any]:
        return {"tariff_id": self.tariff_id, "reminder_days": self.reminder_days, "grace_days": self.grace_days,
                "throttle_profile": self.throttle_profile, "block_after_days": self.block_after_days,
                "close_after_days": self.close_after_days}


@dataclass
class DunningResult:
    accounts: int = 0
    steps: list[tuple[int, int, str]] = field(default_factory=list)   # (account, cycle, step) taken
    block_changes: list[BlockChange] = field(default_factory=list)   # publish after commit (announce)

    def count(self, step: str) -> int:
        return sum(1 for taken in self.steps if taken[2] == step)


# -- policies ----------------------------------------------------------------------------------------------

def _days(name: str, value: object, lo: int = 0, hi: int = MAX_DAYS) -> int:
    if type(value) is not int or not lo <= value <= hi:
        raise InvalidValue(f"{name} must be an int in {lo}..{hi} (days)")
    return value


async def policy_get(conn: DbConnection, tariff_id: int) -> Policy | None:
    row = await conn.fetchrow("SELECT tariff_id, reminder_days, grace_days, throttle_profile, block_after_days,"
                              " close_after_days FROM dunning_policies WHERE tariff_id = $1", tariff_id)
    return None if row is None else Policy(**dict(row))


async def policy_set(conn: DbConnection, policy: Policy, now: dt.datetime) -> Policy:
    """Create or replace the tariff's policy (checked); what is stored."""
    _days("reminder_days", policy.reminder_days)
    _days("grace_days", policy.grace_days)
    _days("block_after_days", policy.block_after_days)
    if policy.block_after_days < policy.grace_days:
        raise InvalidValue("block_after_days must be at least grace_days")
    if policy.close_after_days is not None:
        _days("close_after_days", policy.close_after_days, max(1, policy.block_after_days), 3660)
    if not await conn.fetchval("SELECT true FROM tariffs WHERE id = $1", policy.tariff_id):
        raise UnknownObject(f"tariff {policy.tariff_id} does not exist")
    if policy.throttle_profile is not None and not await conn.fetchval(
            "SELECT true FROM rate_profiles WHERE id = $1", policy.throttle_profile):
        raise UnknownObject(f"rate profile {policy.throttle_profile} does not exist")
    await conn.execute(
        "INSERT INTO dunning_policies (tariff_id, reminder_days, grace_days, throttle_profile, block_after_days,"
        " close_after_days, updated_at) VALUES ($1, $2, $3, $4, $5, $6, $7) ON CONFLICT (tariff_id) DO UPDATE SET"
        " reminder_days = EXCLUDED.reminder_days, grace_days = EXCLUDED.grace_days,"
        " throttle_profile = EXCLUDED.throttle_profile, block_after_days = EXCLUDED.block_after_days,"
        " close_after_days = EXCLUDED.close_after_days, updated_at = EXCLUDED.updated_at",
        policy.tariff_id, policy.reminder_days, policy.grace_days, policy.throttle_profile,
        policy.block_after_days, policy.close_after_days, now)
    return policy


async def policy_delete(conn: DbConnection, tariff_id: int) -> bool:
    return bool(await conn.execute("DELETE FROM dunning_policies WHERE tariff_id = $1", tariff_id) == "DELETE 1")


async def dunning_state(conn: DbConnection, account_id: int) -> dict[str, Any]:
    """The account's dunning state and its step log (newest first), for operators and the subscriber."""
    state = await conn.fetchrow("SELECT cycle, step, debt_since, updated_at FROM dunning_state"
                                " WHERE account_id = $1", account_id)
    steps = await conn.fetch("SELECT cycle, step, balance, at FROM dunning_steps WHERE account_id = $1"
                             " ORDER BY at DESC, cycle DESC LIMIT 50", account_id)
    policy = await conn.fetchrow(
        "SELECT p.* FROM account_tariffs t JOIN dunning_policies p ON p.tariff_id = t.tariff_id"
        " WHERE t.account_id = $1 AND t.valid_to IS NULL ORDER BY t.valid_from DESC LIMIT 1", account_id)
    out: dict[str, Any] = {"account_id": account_id, "cycle": 0, "step": "none", "debt_since": None, "block_on": None,
                           "policy": None if policy is None else Policy(**{k: policy[k] for k in (
                               "tariff_id", "reminder_days", "grace_days", "throttle_profile",
                               "block_after_days", "close_after_days")}).wire()}
    if state is not None:
        out.update(cycle=state["cycle"], step=state["step"], debt_since=state["debt_since"])
        if policy is not None and state["debt_since"] is not None and state["step"] in ("grace", "throttled"):
            out["block_on"] = state["debt_since"] + policy["block_after_days"] * _DAY
    out["steps"] = [dict(row) for row in steps]
    return out


# -- the pass ----------------------------------------------------------------------------------------------

# The accounts a pass must look at: under a policy, active, and -- unless
# this pass also checks reminders ($4) -- past their credit (a superset of
# in_debt: promised credit only lowers a debt) or in an open cycle.  Without
# reminders that is the debtors alone, so the pass that runs every minute
# does not open a transaction per account of a million-subscriber tariff.
_CANDIDATES: Final = (
    "SELECT a.id, p.tariff_id, p.reminder_days, p.grace_days, p.throttle_profile, p.block_after_days,"
    " p.close_after_days, s.cycle, s.step, a.balance, a.credit, a.unlimited"
    " FROM account_tariffs t JOIN dunning_policies p ON p.tariff_id = t.tariff_id"
    " JOIN accounts a ON a.id = t.account_id LEFT JOIN dunning_state s ON s.account_id = a.id"
    " WHERE t.valid_from <= $1 AND (t.valid_to IS NULL OR t.valid_to > $1) AND a.status = 'active'"
    " AND a.id > $2 AND ($4 OR a.balance + a.credit < 0 OR s.step IN ('grace', 'throttled', 'blocked'))"
    " ORDER BY a.id LIMIT $3")


async def dunning_step(conn: DbConnection, now: dt.datetime, tz: dt.tzinfo, *,
                       reminders: bool = True) -> DunningResult:
    """One pass over the accounts under a dunning policy (see the module comment); what it did.

    ``reminders``: also forecast the quiet accounts' run-out (every account
    under a policy is read; the core does it once a local day).  Without it
    only debtors and open cycles are read.  Each account's steps commit in
    their own transaction (only for an account with a step that may be due):
    the caller passes a connection outside any transaction."""
    result = DunningResult()
    after = 0
    today = now.astimezone(tz).date()
    while True:
        rows = await conn.fetch(_CANDIDATES, now, after, PASS_BATCH, reminders)
        if not rows:
            break
        after = rows[-1]["id"]
        result.accounts += len(rows)
        # forecasts only for accounts a reminder could be for: not in an open cycle
        quiet = [row["id"] for row in rows if row["step"] in (None, "cleared")]
        burns = await burn_rates(conn, quiet, now, today) if quiet and reminders else {}
        for row in rows:
            policy = Policy(*(row[k] for k in ("tariff_id", "reminder_days", "grace_days", "throttle_profile",
                                               "block_after_days", "close_after_days")))
            burn = burns.get(row["id"])
            if not _may_act(row, policy, burn, today):
                continue     # nothing can be due: no transaction, no lock
            await _account(conn, int(row["id"]), policy, burn, now, today, result)
        if len(rows) < PASS_BATCH:
            break
    return result


def _may_act(row: asyncpg.Record, policy: Policy, burn: tuple[int, int] | None, today: dt.date) -> bool:
    """Whether a step may be due for this candidate, from its unlocked row: in
    an open cycle, past its credit, or a reminder the forecast calls for.
    ``_account`` decides again under the account's lock."""
    if row["step"] in ("grace", "throttled", "blocked"):
        return True
    if row["unlimited"]:
        return False
    balance, credit = int(row["balance"]), int(row["credit"])
    if balance + credit < 0:
        return True
    if burn is None:
        return False
    seen = forecast(int(row["id"]), balance, credit, burn[0], burn[1], today)
    return seen.days_left is not None and seen.days_left <= policy.reminder_days


async def _lock(conn: DbConnection, account_id: int, now: dt.datetime) -> asyncpg.Record:
    row = await conn.fetchrow(
        "SELECT a.balance, a.credit, a.unlimited, a.status, s.cycle, s.step, s.debt_since,"
        " (SELECT coalesce(sum(amount), 0)::bigint FROM promised_payments pp WHERE pp.account_id = a.id"
        "   AND pp.closed_at IS NULL AND pp.expires_at > $2) AS promised"
        " FROM accounts a LEFT JOIN dunning_state s ON s.account_id = a.id WHERE a.id = $1 FOR UPDATE OF a",
        account_id, now)
    if row is None:
        raise UnknownObject(f"account {account_id} does not exist")
    return row


async def _log(conn: DbConnection, account_id: int, cycle: int, step: str, balance: int, now: dt.datetime) -> bool:
    """The step's log row; False when this (account, cycle, step) was taken before."""
    return await conn.fetchval(
        "INSERT INTO dunning_steps (account_id, cycle, step, balance, at) VALUES ($1, $2, $3, $4, $5)"
        " ON CONFLICT DO NOTHING RETURNING true", account_id, cycle, step, balance, now) is not None


async def _took(conn: DbConnection, account_id: int, cycle: int, step: str, balance: int, now: dt.datetime,
                payload: dict[str, Any], result: DunningResult) -> None:
    """The common tail of a step: audit, outbox event, result."""
    await audit.record(conn, DUNNING_WHO, f"dunning.{step}", f"account:{account_id}",
                       after={"cycle": cycle, "balance": balance, **payload}, now=now)
    event = "balance.runout_soon" if step == "reminder" else f"dunning.{step}"
    key = f"runout:{account_id}:reminder:{cycle}" if step == "reminder" else f"dunning:{account_id}:{cycle}:{step}"
    body = {"account_id": account_id, "balance": balance, **payload}
    if step != "reminder":
        body.update(step=step, cycle=cycle)
    await enqueue(conn, [OutboxEvent(event, body, account_id, key)], now)
    result.steps.append((account_id, cycle, step))


async def _set_state(conn: DbConnection, account_id: int, cycle: int, step: str, debt_since: dt.datetime | None,
                     now: dt.datetime) -> None:
    await conn.execute(
        "INSERT INTO dunning_state (account_id, cycle, step, debt_since, updated_at) VALUES ($1, $2, $3, $4, $5)"
        " ON CONFLICT (account_id) DO UPDATE SET cycle = $2, step = $3, debt_since = $4, updated_at = $5",
        account_id, cycle, step, debt_since, now)


async def _account(conn: DbConnection, account_id: int, policy: Policy, burn: tuple[int, int] | None,
                   now: dt.datetime, today: dt.date, result: DunningResult) -> None:
    async with conn.transaction():
        row = await _lock(conn, account_id, now)
        if row["status"] != "active":
            return
        balance, cycle, step = int(row["balance"]), int(row["cycle"] or 0), row["step"]
        debt = in_debt(balance, int(row["credit"]), int(row["promised"]), bool(row["unlimited"]))
        open_cycle = step in ("grace", "throttled", "blocked")
        if not debt:
            if open_cycle:
                await _cancel(conn, account_id, cycle, balance, now, result)
            elif burn is not None:
                seen = forecast(account_id, balance, int(row["credit"]), burn[0], burn[1], today)
                if seen.days_left is not None and seen.days_left <= policy.reminder_days \
                        and await _log(conn, account_id, cycle + 1, "reminder", balance, now):
                    await _took(conn, account_id, cycle + 1, "reminder", balance, now,
                                {"days_left": seen.days_left, "runs_out_on": seen.runs_out_on}, result)
            return
        debt_since = row["debt_since"]
        if not open_cycle:
            if step == "closed":
                return
            cycle, step, debt_since = cycle + 1, "grace", now
            await _set_state(conn, account_id, cycle, step, debt_since, now)
            if await _log(conn, account_id, cycle, "grace", balance, now):
                await _took(conn, account_id, cycle, "grace", balance, now,
                            {"until": debt_since + policy.grace_days * _DAY}, result)
        elapsed = now - debt_since
        if policy.throttle_profile is not None and elapsed >= policy.grace_days * _DAY and step == "grace":
            step = "throttled"
            await _set_state(conn, account_id, cycle, step, debt_since, now)
            if await _log(conn, account_id, cycle, step, balance, now):
                await add_throttle(conn, account_id, "dunning", f"dunning:{cycle}", policy.throttle_profile, now)
                await _took(conn, account_id, cycle, step, balance, now, {}, result)
        if elapsed >= policy.block_after_days * _DAY and step in ("grace", "throttled"):
            step = "blocked"
            await _set_state(conn, account_id, cycle, step, debt_since, now)   # the debt rule stops waiting
            change = await sync_system_block(conn, account_id, actor=DUNNING_WHO.actor, now=now)
            if change is not None:
                result.block_changes.append(change)
            if await _log(conn, account_id, cycle, step, balance, now):
                await _took(conn, account_id, cycle, step, balance, now, {}, result)
        if policy.close_after_days is not None and elapsed >= policy.close_after_days * _DAY and step == "blocked":
            step = "closed"
            await _set_state(conn, account_id, cycle, step, debt_since, now)
            if await _log(conn, account_id, cycle, step, balance, now):
                await conn.execute("UPDATE accounts SET status = 'closed' WHERE id = $1", account_id)
                await lift_throttles(conn, account_id, "dunning", now)
                await _took(conn, account_id, cycle, step, balance, now, {}, result)


async def _cancel(conn: DbConnection, account_id: int, cycle: int, balance: int, now: dt.datetime,
                  result: DunningResult) -> None:
    await _set_state(conn, account_id, cycle, "cleared", None, now)
    await lift_throttles(conn, account_id, "dunning", now)
    change = await sync_system_block(conn, account_id, actor=DUNNING_WHO.actor, now=now)   # the usual rule
    if change is not None:
        result.block_changes.append(change)
    if await _log(conn, account_id, cycle, "cleared", balance, now):
        await _took(conn, account_id, cycle, "cleared", balance, now, {}, result)


async def cancel_cleared(conn: DbConnection, account_ids: Sequence[int], now: dt.datetime) -> DunningResult:
    """Cancel the open cycles of these accounts that are out of debt now — inside the caller's
    transaction (a payment's), which holds their account rows; a no-op for the rest."""
    result = DunningResult()
    rows = await conn.fetch("SELECT account_id FROM dunning_state WHERE account_id = ANY($1::bigint[])"
                            " AND step IN ('grace', 'throttled', 'blocked') ORDER BY account_id", list(account_ids))
    for found in rows:
        row = await _lock(conn, int(found["account_id"]), now)
        if not in_debt(int(row["balance"]), int(row["credit"]), int(row["promised"]), bool(row["unlimited"])):
            await _cancel(conn, int(found["account_id"]), int(row["cycle"]), int(row["balance"]), now, result)
    return result
