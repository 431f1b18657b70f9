"""``billctl whatif``: what accounts would have paid for a past period under another tariff.

    billctl whatif --month 2026-11 --tariff 7 --all
    billctl whatif --month 2026-09 --until-month 2026-11 --tariff 7 --of-tariff 3 --format csv
    billctl whatif --period-start 2026-11-15 --tariff 7 --account 42 --format json

One ``reports.whatif`` call (nothing is posted).  Its rows stream to stdout
as they arrive — ``account_id, charged, would_pay, difference, note`` — as a
table, CSV with a header, or one JSON object per line with money as integer
micro-units; the totals go to stderr (JSON with ``--format json``), so a
pipe gets the rows alone.  An account the candidate cannot re-rate has an
empty ``would_pay`` and its reason in ``note``.
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import sys
from typing import Any

from urfa.client import Client
from billcore.clients.exits import UsageError

__all__ = ["register", "whatif_args"]

CALL = "reports.whatif"


def whatif_args(args: argparse.Namespace) -> dict[str, Any]:
    """The call's arguments from the command line."""
    out: dict[str, Any] = {"tariff_id": args.tariff}
    if (args.month is None) == (args.period_start is None):
        raise UsageError("whatif needs --month YYYY-MM or --period-start ISO, one of them")
    if args.month is not None:
        out["month"] = args.month
        if args.until_month is not None:
            out["until_month"] = args.until_month
    else:
        if args.until_month is not None:
            raise UsageError("--until-month goes with --month")
        try:
            at = dt.datetime.fromisoformat(args.period_start)
        except ValueError:
            raise UsageError(f"--period-start: an ISO date or time, got {args.period_start!r}") from None
        out["period_start"] = at if at.tzinfo else at.replace(tzinfo=dt.timezone.utc)
    chosen = [k for k in ("account", "of_tariff") if getattr(args, k) is not None] + (["all"] if args.all else [])
    if len(chosen) != 1:
        raise UsageError("whatif needs one of --account N, --of-tariff M or --all")
    if args.account is not None:
        out["account_id"] = args.account
    elif args.of_tariff is not None:
        out["of_tariff"] = args.of_tariff
    else:
        out["all"] = True
    return out


async def run_whatif(client: Client, args: argparse.Namespace) -> Any:
    from billcore.clients.billctl import RowPrinter, _describe, _json_default, render, show_money

    call_args = whatif_args(args)
    described = await _describe(client, CALL)
    fmt = args.format or ("json" if args.json else "csv" if args.csv else "table")
    printer = RowPrinter(described.columns, described.money, fmt, sys.stdout)
    stream = client.stream(CALL, call_args)
    async for chunk in stream:
        for row in chunk:
            printer.add(row)
    printer.finish()
    result = stream.result
    if fmt == "json":
        print(json.dumps(result, default=_json_default, sort_keys=True), file=sys.stderr)
    else:
        print(render(show_money(result, described.money | {"charged_rerated"})), file=sys.stderr)
    args.printed = True
    return result


def register(sub: Any) -> None:
    """``billctl whatif …``."""
    c = sub.add_parser("whatif", help="re-rate a past period under another tariff, posting nothing (rows on"
                                      " stdout, totals on stderr)")
    c.add_argument("--tariff", type=int, required=True, help="the candidate tariff's id")
    c.add_argument("--month", help="the accounting periods starting in this month, YYYY-MM")
    c.add_argument("--until-month", dest="until_month", help="with --month: through this month, YYYY-MM")
    c.add_argument("--period-start", dest="period_start",
                   help="instead of --month: each account's accounting period holding this time (ISO; UTC if no zone)")
    who = c.add_mutually_exclusive_group()
    who.add_argument("--account", type=int, help="one account")
    who.add_argument("--of-tariff", dest="of_tariff", type=int, help="the accounts linked to this tariff then")
    who.add_argument("--all", action="store_true", help="every account with a tariff then")
    c.add_argument("--format", choices=["table", "csv", "json"],
                   help="table (default), csv or json (one object per line); --csv/--json do the same")
    c.set_defaults(run=run_whatif)
