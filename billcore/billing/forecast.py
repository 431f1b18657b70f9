"""When will the balance run out?  A forecast for dunning's reminders.

Theory of operation
-------------------
The burn rate of an account is its tariff's periodic fees per day plus the
mean of its usage charges over the last ``USAGE_DAYS`` days (``usage_daily``),
both in integer micro-units per day, rounded down once each
(``daily_fee``).  The money left is ``balance + credit`` (what the debt rule
lets the account spend); the days left are that divided by the burn rate,
rounded down (``days_left``): a forecast that says "3 days" means at least
three whole days of the current burn.  No burn, no forecast (``None``).

``forecast`` is pure; ``burn_rates`` reads the numbers for many accounts in
two statements.
"""

from __future__ import annotations

import datetime as dt
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Final

from billcore.db.rows import DbConnection

__all__ = ["USAGE_DAYS", "Forecast", "daily_fee", "days_left", "forecast", "burn_rates"]

USAGE_DAYS: Final = 7
_DAYS_PER_YEAR: Final = 365


@dataclass(frozen=True, slots=True)
class Forecast:
    account_id: int
    balance: int
    burn_per_day: int          # micro-units
    days_left: int | None      # None: nothing burns
    runs_out_on: dt.date | None


def daily_fee(fee: int, period_kind: str, period_days: int) -> int:
    """A periodic fee per day, in micro-units, rounded down (the one place this rounds)."""
    if period_kind == "daily":
        return fee
    if period_kind == "weekly":
        return fee // 7
    if period_kind == "monthly":
        return fee * 12 // _DAYS_PER_YEAR
    if period_kind == "yearly":
        return fee // _DAYS_PER_YEAR
    if period_kind == "custom" and period_days > 0:
        return fee // period_days
    return 0


def days_left(money_left: int, burn_per_day: int) -> int | None:
    """Whole days the money lasts at the burn rate (0 when nothing is left); None when nothing burns."""
    if burn_per_day <= 0:
        return None
    return max(0, money_left) // burn_per_day


def forecast(account_id: int, balance: int, credit: int, fees_per_day: int, usage_last_days: int,
             today: dt.date) -> Forecast:
    burn = fees_per_day + usage_last_days // USAGE_DAYS
    left = days_left(balance + credit, burn)
    return Forecast(account_id, balance, burn, left, None if left is None else today + dt.timedelta(days=left))


async def burn_rates(conn: DbConnection, account_ids: Sequence[int], now: dt.datetime, today: dt.date,
                     ) -> dict[int, tuple[int, int]]:
    """(periodic fees per day, usage charges of the last USAGE_DAYS days) per account."""
    fees: dict[int, int] = {}
    for row in await conn.fetch(
            "SELECT t.account_id, s.fee, s.period_kind, s.period_days FROM account_tariffs t"
            " JOIN tariff_services ts ON ts.tariff_id = t.tariff_id JOIN services s ON s.id = ts.service_id"
            " WHERE t.account_id = ANY($1::bigint[]) AND s.kind = 'periodic' AND t.valid_from <= $2"
            " AND (t.valid_to IS NULL OR t.valid_to > $2)", list(account_ids), now):
        fees[row["account_id"]] = fees.get(row["account_id"], 0) + daily_fee(
            int(row["fee"]), row["period_kind"], int(row["period_days"]))
    usage = {row["account_id"]: int(row["amount"]) for row in await conn.fetch(
        "SELECT account_id, coalesce(sum(amount), 0)::bigint AS amount FROM usage_daily"
        " WHERE account_id = ANY($1::bigint[]) AND day > $2 AND day <= $3 GROUP BY account_id",
        list(account_ids), today - dt.timedelta(days=USAGE_DAYS), today)}
    return {account: (fees.get(account, 0), usage.get(account, 0)) for account in account_ids}
