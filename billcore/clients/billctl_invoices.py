"""``billctl`` commands for invoices, credit notes and statements.

    billctl invoices run [--period-end ISO]          the monthly run now (progress on stderr)
    billctl invoices issue ACCOUNT [--until ISO]     invoice one account up to now (or --until)
    billctl invoices list [--account N] [--since D] [--until D] [--kind invoice|credit_note]
    billctl invoices show ID                         one document with its lines
    billctl invoices credit ID --reason TEXT [--line N=AMOUNT ...]   a credit note (no --line: all)
    billctl statement ACCOUNT --since D --until D    opening, every ledger row, closing

Theory of operation
-------------------
Each command is one call (``invoices.*``, ``statements.get``); the module
registers its parsers into billctl's (``register``, listed in
``billctl.COMMAND_MODULES``) and each parser's ``run`` does the call.  Output
follows billctl's ``--json`` / ``--csv`` / table choice: JSON keeps the
wire's integer micro-units, the table and CSV show money with the one
formatter.  ``invoices run`` prints each committed batch on stderr as it
streams; ``statement`` streams its rows to stdout as they arrive and its
opening and closing balances to stderr, so a CSV or JSON-lines pipe stays
clean.  A date without a time (``--since 2026-03-01``) is midnight UTC
unless it carries a zone (``2026-03-01T00:00+03:00``).
"""

from __future__ import annotations

import argparse
import datetime as dt
import sys
from typing import Any

from urfa.client import Client

from billcore.common.money import format_money
from billcore.clients.exits import UsageError
from billcore.clients.subcommands import actions_of

__all__ = ["register"]

SUMMARY_MONEY = frozenset({"total"})
DOCUMENT_MONEY = frozenset({"net", "vat", "total"})


def _int(name: str, text: str) -> int:
    try:
        value = int(text, 10)
    except ValueError:
        raise UsageError(f"{name} must be an integer, got {text!r}") from None
    if value <= 0:
        raise UsageError(f"{name} must be positive")
    return value


def _moment(name: str, text: str) -> dt.datetime:
    try:
        value = dt.datetime.fromisoformat(text)
    except ValueError:
        raise UsageError(f"{name}: an ISO 8601 date or time, got {text!r}") from None
    return value if value.tzinfo else value.replace(tzinfo=dt.timezone.utc)


def _money(text: str) -> int:
    from billcore.common.errors import BillingError
    from billcore.common.money import parse_money

    try:
        return parse_money(text)
    except BillingError as exc:
        raise UsageError(f"amount: {exc}") from None


def _shown(args: argparse.Namespace, value: dict[str, Any], money: frozenset[str]) -> dict[str, Any]:
    """Money formatted for a person (table, CSV); JSON keeps micro-units."""
    if args.json:
        return value
    return {k: format_money(v) if k in money and type(v) is int else v for k, v in value.items()}


async def run_cmd(client: Client, args: argparse.Namespace) -> Any:
    call: dict[str, Any] = {}
    if args.period_end:
        call["period_end"] = _moment("--period-end", args.period_end)
    stream = client.stream("invoices.run", call)
    async for chunk in stream:
        for last, accounts, issued, total in chunk:
            print(f"invoices: up to account {last}: {accounts} account(s) closed, {issued} invoice(s),"
                  f" {format_money(total)}", file=sys.stderr, flush=True)
    return _shown(args, dict(stream.result), SUMMARY_MONEY)


async def issue_cmd(client: Client, args: argparse.Namespace) -> Any:
    call: dict[str, Any] = {"account_id": _int("account", args.account)}
    if args.until:
        call["until"] = _moment("--until", args.until)
    return _document(args, await client.call("invoices.issue", call))


async def list_cmd(client: Client, args: argparse.Namespace) -> Any:
    call: dict[str, Any] = {"limit": args.limit, "offset": args.offset}
    if args.account:
        call["account_id"] = _int("account", args.account)
    for key, arg in (("since", "since"), ("until", "until"), ("kind", "doc_kind")):
        if getattr(args, arg):
            call[key] = getattr(args, arg)
    result = await client.call("invoices.list", call)
    print(f"invoices: {len(result['invoices'])} of {result['total']}", file=sys.stderr)
    return [_shown(args, row, SUMMARY_MONEY) for row in result["invoices"]]


def _document(args: argparse.Namespace, doc: dict[str, Any]) -> Any:
    if args.json:
        return doc
    # the lines as the table; the header on stderr
    who = doc.get("customer") or {}
    credits = f", credits {doc['credits']['number']}" if doc.get("credits") else ""
    print(f"{doc['kind']} {doc['number']}{credits}: account {doc['account_id']} ({who.get('login', '')}),"
          f" {doc['period_start']} .. {doc['period_end']}, issued {doc['issued_at']};"
          f" net {format_money(doc['net'])}, VAT {format_money(doc['vat'])} ({doc['vat_bp'] / 100:g}%),"
          f" total {format_money(doc['total'])} {doc.get('currency', '')}", file=sys.stderr)
    for note in doc.get("credited_by") or []:
        print(f"  credited by {note['number']}: {format_money(note['total'])}", file=sys.stderr)
    return [_shown(args, line, DOCUMENT_MONEY) for line in doc["lines"]]


async def show_cmd(client: Client, args: argparse.Namespace) -> Any:
    return _document(args, await client.call("invoices.get", {"invoice_id": _int("id", args.id)}))


async def credit_cmd(client: Client, args: argparse.Namespace) -> Any:
    call: dict[str, Any] = {"invoice_id": _int("id", args.id), "reason": args.reason}
    if args.line:
        lines = []
        for item in args.line:
            no, sep, amount = item.partition("=")
            if not sep:
                raise UsageError(f"--line takes LINE_NO=AMOUNT (e.g. 2=150.00), got {item!r}")
            lines.append({"line_no": _int("line", no), "total": _money(amount)})
        call["lines"] = lines
    return _document(args, await client.call("invoices.credit", call))


async def statement_cmd(client: Client, args: argparse.Namespace) -> Any:
    from billcore.clients.billctl import RowPrinter

    since, until = _moment("--since", args.since), _moment("--until", args.until)
    fmt = "json" if args.json else "csv" if args.csv else "table"
    printer = RowPrinter(["ledger_id", "created_at", "kind", "amount", "balance_after", "reference"],
                         frozenset({"amount", "balance_after"}), fmt, sys.stdout)
    stream = client.stream("statements.get", {"account_id": _int("account", args.account), "since": since,
                                              "until": until})
    async for chunk in stream:
        for row in chunk:
            printer.add(row)
    printer.finish()
    result = stream.result
    who = result.get("customer") or {}
    print(f"statement of account {result['account_id']} ({who.get('login', '')}) {result['since']} .. "
          f"{result['until']}: opening {format_money(result['opening'])}, {result['entries']} entries,"
          f" closing {format_money(result['closing'])} {result.get('currency', '')}", file=sys.stderr)
    args.printed = True
    return result


def register(sub: Any) -> None:
    """Add ``invoices run|issue|list|show|credit`` and ``statement`` to billctl's sub-parsers."""
    invoices = actions_of(sub, "invoices", "invoices and credit notes")
    c = invoices.add_parser("run", help="the monthly invoice run now (idempotent; progress on stderr)")
    c.add_argument("--period-end", help="invoice periods ending by then at the latest (ISO 8601)")
    c.set_defaults(run=run_cmd)
    c = invoices.add_parser("issue", help="invoice one account from its last invoice up to now")
    c.add_argument("account")
    c.add_argument("--until", help="end of the range (ISO 8601; default now)")
    c.set_defaults(run=issue_cmd)
    c = invoices.add_parser("list", help="invoices and credit notes, newest first")
    c.add_argument("--account")
    c.add_argument("--since", help="issued on or after this local date (YYYY-MM-DD)")
    c.add_argument("--until", help="issued before this local date (YYYY-MM-DD)")
    c.add_argument("--kind", dest="doc_kind", choices=["invoice", "credit_note"])   # billctl's --kind: the login's
    c.add_argument("--limit", type=int, default=100)
    c.add_argument("--offset", type=int, default=0)
    c.set_defaults(run=list_cmd)
    c = invoices.add_parser("show", help="one invoice or credit note: its lines (header on stderr)")
    c.add_argument("id")
    c.set_defaults(run=show_cmd)
    c = invoices.add_parser("credit", help="a credit note for an invoice (no --line: all that is left)")
    c.add_argument("id")
    c.add_argument("--reason", required=True)
    c.add_argument("--line", action="append", metavar="N=AMOUNT", help="credit AMOUNT of line N (repeat)")
    c.set_defaults(run=credit_cmd)
    c = sub.add_parser("statement", help="an account's statement: opening, every ledger row, closing")
    c.add_argument("account")
    c.add_argument("--since", required=True, help="first moment, ISO 8601")
    c.add_argument("--until", required=True, help="end of the range (excluded), ISO 8601")
    c.set_defaults(run=statement_cmd)
