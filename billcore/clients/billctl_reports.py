"""``billctl report NAME``: the operator reports on the command line (docs/reports.md).

    billctl report revenue  --since 2024-03-01 --until 2024-04-01 [--group day|service|tariff]
    billctl report payments --since … --until … [--group day|method|operator]
    billctl report debtors  [--as-of 2024-03-31]
    billctl report arpu     --month 2024-03
    billctl report churn    --since 2024-01 --until 2024-07
    billctl report traffic-top --since … --until … [--class-id N] [--limit 20]
    billctl report flows    --account N --since … --until … [--by host|port|proto] [--limit 20]
    … [--format table|csv|json]

The rows stream to stdout as they arrive (a table sized from its first
rows, CSV with a header, or one JSON object per line with money as integer
micro-units); the summary, and progress on a long report, go to stderr, so
a pipe gets the rows alone. Money columns are known from the call's
declared fields (``sys.calls``), as for any call.
"""

from __future__ import annotations

import argparse
import sys
from typing import Any

from urfa.client import Client

__all__ = ["REPORTS", "register", "report_args"]

# command name -> (URFA call, the options it takes)
REPORTS: dict[str, tuple[str, tuple[str, ...]]] = {
    "revenue": ("reports.revenue_daily", ("since", "until", "group")),
    "payments": ("reports.payments", ("since", "until", "group")),
    "debtors": ("reports.debtors", ("as_of",)),
    "arpu": ("reports.arpu", ("month",)),
    "churn": ("reports.churn", ("since", "until")),
    "traffic-top": ("reports.traffic_top", ("since", "until", "class_id", "limit")),
    "flows": ("reports.flows", ("account_id", "since", "until", "by", "limit")),
}
PROGRESS_EVERY = 10_000   # rows between progress lines on stderr


class ReportUsage(Exception):
    """A report's options are wrong; the message says which."""


def report_args(name: str, args: argparse.Namespace) -> dict[str, Any]:
    """The call's arguments from the command line: the options this report takes, those given."""
    _fn, takes = REPORTS[name]
    out: dict[str, Any] = {}
    for key in takes:
        value = getattr(args, key, None)
        if value is not None:
            out[key] = value
    required = {"revenue": ("since", "until"), "payments": ("since", "until"), "arpu": ("month",),
                "churn": ("since", "until"), "traffic-top": ("since", "until"),
                "flows": ("account_id", "since", "until")}.get(name, ())
    missing = [f"--{k.replace('_', '-')}" for k in required if k not in out]
    if missing:
        raise ReportUsage(f"report {name} needs {', '.join(missing)}")
    given = [k for k in ("since", "until", "group", "as_of", "month", "class_id", "account_id", "by", "limit")
             if getattr(args, k, None) is not None and k not in takes]
    if given:
        raise ReportUsage(f"report {name} takes no {', '.join('--' + k.replace('_', '-') for k in given)}")
    return out


async def run_report(client: Client, args: argparse.Namespace) -> Any:
    from billcore.clients.billctl import RowPrinter, _cell, _describe, render, show_money
    from billcore.clients.exits import UsageError

    fn, _takes = REPORTS[args.report]
    try:
        call_args = report_args(args.report, args)
    except ReportUsage as exc:
        raise UsageError(str(exc)) from None
    described = await _describe(client, fn)
    fmt = args.format or ("json" if args.json else "csv" if args.csv else "table")
    printer = RowPrinter(described.columns, described.money, fmt, sys.stdout)
    stream = client.stream(fn, call_args)
    shown = 0
    async for chunk in stream:
        for row in chunk:
            printer.add(row)
        if printer.rows // PROGRESS_EVERY > shown // PROGRESS_EVERY:
            print(f"billctl: {fn}: {printer.rows} rows…", file=sys.stderr, flush=True)
        shown = printer.rows
    printer.finish()
    # the summary's sums carry the rows' names (amount, paid, net…): the same money declaration
    summary = show_money(stream.result, described.money)
    print(render(summary) if isinstance(summary, dict) else _cell(summary), file=sys.stderr)
    args.printed = True
    return stream.result


def register(sub: Any) -> None:
    """``billctl report NAME …``."""
    c = sub.add_parser("report", help="an operator report: " + ", ".join(REPORTS) + " (rows on stdout, the"
                                      " summary on stderr)")
    c.add_argument("report", choices=list(REPORTS))
    c.add_argument("--since", help="first day (ISO date; churn: a month YYYY-MM; flows: a date or time)")
    c.add_argument("--until", help="the day after the last (exclusive), as --since")
    c.add_argument("--group", help="revenue: day|service|tariff; payments: day|method|operator")
    c.add_argument("--as-of", dest="as_of", help="debtors: balances at the end of this day (default now)")
    c.add_argument("--month", help="arpu: the month, YYYY-MM")
    c.add_argument("--class-id", dest="class_id", type=int, help="traffic-top: one traffic class")
    c.add_argument("--account", dest="account_id", type=int, help="flows: the account")
    c.add_argument("--by", help="flows: host|port|proto")
    c.add_argument("--limit", type=int, help="traffic-top: accounts per class; flows: rows (1..1000)")
    c.add_argument("--format", choices=["table", "csv", "json"],
                   help="table (default), csv or json (one object per line); --csv/--json do the same")
    c.set_defaults(run=run_report)
