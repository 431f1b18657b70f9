"""``billctl``: the administrator's command-line URFA client.

    billctl calls                         what this session may call, with arguments
    billctl call FN [key=value …]         call any function
    billctl pay ACCOUNT AMOUNT [--method cash] [--external-id ID]
    billctl users [TEXT]                  search subscribers
    billctl account ID                    one account with its balance and blocks
    billctl block ID [--reason …] / unblock ID
    billctl promised ACCOUNT [--amount 50.00] [--days 5]   grant this month's promised payment
    billctl periodic-run                  run the periodic charges due now (progress on stderr)
    billctl payments import-statement FILE --bank NAME [--dry-run] [--encoding auto|utf-8|cp1251]
                                          book a bank statement (CSV), each line once (docs/automation/payments.md)
    billctl otp enroll / otp disable      your own TOTP second factor (operators.*: billctl call)
    billctl invoices run|issue|list|show|credit, billctl statement ACCOUNT --since --until
                                          invoices, credit notes, statements (billctl_invoices)

Arguments are converted by the function's own schema (``sys.calls``): a
``money`` argument takes ``12.50`` (decimal currency) and sends integer
micro-units, ``int``/``bool`` are parsed strictly, ``list``/``map`` take
JSON.  Output is a human table by default, JSON with ``--json`` and CSV
with ``--csv``.  Money in the output is known from the function's declared
result fields (``sys.calls`` ``fields``), never from a key's name, and shown
by the one money formatter (``format_money``); ``--json`` keeps the wire's
integer micro-units.  A streaming function (``reports.traffic``…) prints
every row as it arrives: a table, one JSON object per line (``--json``) or
CSV rows; its summary (``rows N``) goes to stderr.
The password comes from ``$BILLCTL_PASSWORD`` or a prompt; it never crosses
the wire (SCRAM).  An operator with a second factor gives its code with
``--otp CODE`` (or ``$BILLCTL_OTP``); without it, billctl asks on the
terminal when the core wants one.
"""

from __future__ import annotations

import argparse
import asyncio
import csv
import datetime as dt
import getpass
import importlib
import json
import os
import ssl
import sys
from collections.abc import Callable, Mapping, Sequence
from typing import Any, TextIO

from urfa.client import Client
from urfa.errors import URFAError
from urfa.link import Address, Link

from billcore.common.csvcell import safe_text
from billcore.common.money import format_money, parse_money
from billcore.common.errors import BillingError
from billcore.clients.exits import USAGE, UsageError, report

__all__ = ["main", "convert_args", "render", "show_money"]

_TABLE_SAMPLE = 200       # streamed rows looked at to size the table's columns

# Modules adding commands: each has ``register(sub)`` adding its parsers, and each parser sets
# ``run`` (an async (client, args) → result, printed like any call's).  A new module is one more line.
COMMAND_MODULES: tuple[str, ...] = (
    "billcore.clients.billctl_invoices",
    "billcore.clients.billctl_reports",
    "billcore.clients.billctl_whatif",
    "billcore.clients.billctl_export",
    "billcore.clients.billctl_documents",
)


def _convert(name: str, kind: str, text: str) -> Any:
    base = kind.rstrip("?")
    try:
        if base == "int":
            return int(text, 10)
        if base == "money":
            return parse_money(text)
        if base == "bool":
            if text.lower() in ("true", "yes", "on", "1"):
                return True
            if text.lower() in ("false", "no", "off", "0"):
                return False
            raise ValueError(text)
        if base in ("list", "map", "any"):
            return json.loads(text)
        if base == "time":
            value = dt.datetime.fromisoformat(text)
            return value if value.tzinfo else value.replace(tzinfo=dt.timezone.utc)
        if base == "bytes":
            return bytes.fromhex(text)
        return text
    except (ValueError, BillingError, json.JSONDecodeError) as exc:
        raise UsageError(f"{name}: not a valid {base}: {text!r} ({exc})") from None


def convert_args(pairs: Sequence[str], schema: dict[str, str] | None) -> dict[str, Any]:
    """``key=value`` words → call arguments, typed by the function's schema."""
    args: dict[str, Any] = {}
    for pair in pairs:
        key, sep, value = pair.partition("=")
        if not sep or not key:
            raise UsageError(f"arguments are key=value, got {pair!r}")
        if schema is not None and key not in schema:
            raise UsageError(f"{key}: no such argument (takes: {', '.join(schema) or 'none'})")
        args[key] = _convert(key, (schema or {}).get(key, "any"), value)
    return args


def money_fields(fields: Mapping[str, str]) -> frozenset[str]:
    """The (dotted) names a call's description declares as money."""
    return frozenset(k for k, v in fields.items() if v.rstrip("?") == "money")


def show_money(value: Any, money: frozenset[str], prefix: str = "") -> Any:
    """``value`` with every declared money field formatted for people (the rest untouched)."""
    if isinstance(value, dict):
        return {k: format_money(v) if prefix + k in money and type(v) is int
                else show_money(v, money, prefix + k + ".") for k, v in value.items()}
    if isinstance(value, list):
        return [show_money(v, money, prefix) for v in value]
    return value


def _cell(value: Any) -> str:
    if isinstance(value, dt.datetime):
        return value.isoformat(timespec="seconds")
    if isinstance(value, bytes):
        return value.hex()
    if isinstance(value, (dict, list)):
        return json.dumps(value, default=str)
    return "" if value is None else str(value)


def render(result: Any) -> str:
    """A human view: a table for a list of maps, key: value lines for a map."""
    if isinstance(result, list) and result and all(isinstance(row, dict) for row in result):
        keys: list[str] = []
        for row in result:
            keys.extend(k for k in row if k not in keys)
        rows = [[_cell(row.get(k)) for k in keys] for row in result]
        widths = _widths(keys, rows)
        # the last column is not cut: nothing follows it, and it is where long text (a call's doc) sits
        widths[-1] = max(len(keys[-1]), *(len(row[-1]) for row in rows))
        return "\n".join([_line(keys, widths), _line(["-" * w for w in widths], widths),
                          *(_line(r, widths) for r in rows)])
    if isinstance(result, dict):
        width = max((len(k) for k in result), default=0)
        return "\n".join(f"{k.ljust(width)}  {_cell(v)}" for k, v in result.items())
    if isinstance(result, list):
        return "\n".join(_cell(v) for v in result) or "(none)"
    return _cell(result)


def _widths(keys: Sequence[str], rows: Sequence[Sequence[str]]) -> list[int]:
    return [min(40, max(len(k), *(len(row[i]) for row in rows))) for i, k in enumerate(keys)]


def _line(cells: Sequence[str], widths: Sequence[int]) -> str:
    # every column but the last is cut to its width; the last has nothing after it to push aside
    last = len(widths) - 1
    return "  ".join((c if i == last else c[:w]).ljust(w)
                     for i, (c, w) in enumerate(zip(cells, widths))).rstrip()


class RowPrinter:
    """Prints a stream's rows as they arrive: a table, JSON lines or CSV.

    A row is a list (its columns named by the call's declared ``fields``) or
    a map.  The table sizes its columns from the first rows and prints the
    rest as they come, so a report of millions of rows needs no memory."""

    def __init__(self, columns: Sequence[str], money: frozenset[str], fmt: str, out: TextIO) -> None:
        self.columns = list(columns)
        self.money = money
        self.fmt = fmt
        self.out = out
        self.rows = 0
        self._pending: list[dict[str, Any]] = []
        self._widths: list[int] | None = None
        self._csv: Any = None

    def _named(self, row: Any) -> dict[str, Any]:
        if isinstance(row, dict):
            for k in row:
                if k not in self.columns and self._widths is None and self._csv is None:
                    self.columns.append(k)
            return row
        if isinstance(row, (list, tuple)):
            while len(self.columns) < len(row):   # undeclared columns still print, numbered
                self.columns.append(f"col{len(self.columns) + 1}")
            return dict(zip(self.columns, row))
        return {"value": row}

    def add(self, row: Any) -> None:
        named = self._named(row)
        self.rows += 1
        if self.fmt == "json":
            self.out.write(json.dumps(named, default=_json_default) + "\n")
            return
        shown = show_money(named, self.money)
        if self.fmt == "csv":
            if self._csv is None:
                self._csv = csv.writer(self.out, lineterminator="\n")
                self._csv.writerow(self.columns)
            self._csv.writerow([safe_text(_cell(shown.get(k))) for k in self.columns])
            return
        if self._widths is None:
            self._pending.append(shown)
            if len(self._pending) >= _TABLE_SAMPLE:
                self._flush_table()
            return
        self.out.write(_line([_cell(shown.get(k)) for k in self.columns], self._widths) + "\n")

    def _flush_table(self) -> None:
        for pending in self._pending:
            self._named(pending)   # maps may add columns until the header is out
        cells = [[_cell(pending.get(k)) for k in self.columns] for pending in self._pending]
        self._widths = _widths(self.columns, cells) if cells else [len(k) for k in self.columns]
        self.out.write(_line(self.columns, self._widths) + "\n")
        self.out.write(_line(["-" * w for w in self._widths], self._widths) + "\n")
        for row in cells:
            self.out.write(_line(row, self._widths) + "\n")
        self._pending = []

    def finish(self) -> None:
        if self.fmt == "table" and self._widths is None and (self._pending or self.columns):
            self._flush_table()
        elif self.fmt == "csv" and self._csv is None and self.columns:
            csv.writer(self.out, lineterminator="\n").writerow(self.columns)
        self.out.flush()


def _json_default(value: Any) -> Any:
    if isinstance(value, dt.datetime):
        return value.isoformat()
    if isinstance(value, bytes):
        return value.hex()
    return str(value)


def _link(args: argparse.Namespace) -> Link:
    """One attempt at the core: a tool reports a failure instead of retrying it."""
    password = os.environ.get("BILLCTL_PASSWORD")
    if password is None:
        try:
            password = getpass.getpass(f"{args.kind} {args.login} password: ")
        except EOFError:
            raise UsageError("no password given: type it, or set BILLCTL_PASSWORD") from None
    context = ssl.create_default_context(cafile=args.cafile) if args.tls else None
    address = Address(host=None, unix=args.unix) if args.unix else Address(args.host, args.port, ssl=context)
    return Link([address], args.kind, args.login, password, timeout=args.timeout, persistent=False,
                otp=_otp_source(args))


def _otp_source(args: argparse.Namespace) -> str | Callable[[], str] | None:
    """The second factor's code: given, asked on the terminal only if the core wants one, or none."""
    if args.otp:
        return str(args.otp)
    if not sys.stdin.isatty():
        return None

    def ask() -> str:
        return getpass.getpass(f"{args.kind} {args.login} one-time code: ").strip()
    return ask


async def _otp_command(client: Client, args: argparse.Namespace) -> Any:
    """``billctl otp enroll``: a new secret, its code checked, the recovery codes; ``otp disable``."""
    if args.action == "disable":
        code = args.code or await asyncio.to_thread(getpass.getpass, "current one-time or recovery code: ")
        return await client.call("self.otp_disable", {"code": code.strip()})
    begun = await client.call("self.otp_begin")
    print(f"secret: {begun['secret']}\nadd it to your authenticator app (or scan a QR code of):\n{begun['uri']}",
          file=sys.stderr, flush=True)
    code = args.code or await asyncio.to_thread(getpass.getpass, "the code your app shows now: ")
    confirmed = await client.call("self.otp_confirm", {"code": code.strip()})
    print("second factor enrolled; keep these recovery codes (each works once):", file=sys.stderr)
    return confirmed["recovery_codes"]


async def _statement_command(client: Client, args: argparse.Namespace) -> list[dict[str, Any]]:
    """``billctl payments import-statement``: the lines' table on stdout, progress and the summary on stderr."""
    from billcore.clients.statement_import import import_statement, summary_text
    from billcore.common.statement import StatementError, read_statement

    try:
        with open(args.file, "rb") as f:
            data = f.read(args.max_bytes + 1)
    except OSError as exc:
        raise UsageError(f"{args.file}: {exc.strerror}") from None
    if len(data) > args.max_bytes:
        raise UsageError(f"{args.file}: larger than --max-bytes {args.max_bytes}")
    try:
        statement = read_statement(data, args.bank, minor_units=args.minor_units, encoding=args.encoding,
                                   delimiter=args.delimiter)
    except StatementError as exc:
        raise UsageError(f"{args.file}: {exc}") from None
    rows, summary = await import_statement(client, statement, args.bank, dry_run=args.dry_run)
    print(summary_text(summary), file=sys.stderr)
    return rows


class Described:
    """What ``sys.calls`` says about one function (empty when the core does not say)."""

    def __init__(self, entry: Mapping[str, Any] | None) -> None:
        entry = entry or {}
        self.args: dict[str, str] | None = dict(entry["args"]) if "args" in entry else None
        self.fields: dict[str, str] = dict(entry.get("fields") or {})
        self.streaming = bool(entry.get("streaming"))
        self.money = money_fields(self.fields)

    @property
    def columns(self) -> list[str]:
        return [k for k in self.fields if "." not in k]


async def _call_table(client: Client) -> list[dict[str, Any]]:
    """Every entry of ``sys.calls``, page by page (it grows with the plugins' calls)."""
    table: list[dict[str, Any]] = []
    while True:
        page = await client.call("sys.calls", {"offset": len(table)})
        table.extend(page)
        if not page:
            return table


async def _describe(client: Client, fn: str) -> Described:
    for call in await _call_table(client):
        if call["name"] == fn:
            return Described(call)
    return Described(None)


def _out_format(args: argparse.Namespace) -> str:
    return "json" if args.json else "csv" if args.csv else "table"


async def _stream(client: Client, fn: str, call_args: dict[str, Any], d: Described,
                  args: argparse.Namespace, progress: Callable[[Any], None] | None = None) -> Any:
    """Print every streamed row as it arrives; return the call's result (its summary)."""
    printer = RowPrinter(d.columns, d.money, _out_format(args), sys.stdout)
    stream = client.stream(fn, call_args)
    async for chunk in stream:
        for row in chunk if isinstance(chunk, list) else [chunk]:
            if progress is not None:
                progress(row)
            else:
                printer.add(row)
    if progress is None:
        printer.finish()
    return stream.result


def _account_view(result: dict[str, Any]) -> dict[str, Any]:
    """``accounts.get`` for a person: the blocks are part of the state, not a footnote."""
    from billcore.clients.tray import internet_state

    blocks = list(result.get("blocks") or [])
    view = dict(result)
    state = internet_state(blocks)
    view["status"] = f"{result.get('status')}, internet {state}"
    return view


def periodic_progress_text(p: Mapping[str, Any]) -> str:
    """One periodic run's progress (``RunProgress`` as a map) for a person; billcore's CLI says it the same way."""
    total, done = int(p.get("accounts_total") or 0), int(p.get("accounts_done") or 0)
    share = f" ({100 * done // total}%)" if total else ""
    return (f"periodic: {done}/{total} accounts{share}, {p.get('charges', 0)} charge(s),"
            f" {format_money(int(p.get('amount') or 0))} booked")


def _periodic_progress(chunk: Any) -> None:
    if isinstance(chunk, dict):
        print(periodic_progress_text(chunk), file=sys.stderr, flush=True)


async def _run(args: argparse.Namespace) -> tuple[Any, Described]:
    """The command's result and the description of the function that made it."""
    async with _link(args) as link:
        client = await link.ready()
        if getattr(args, "run", None) is not None:
            return await args.run(client, args), Described(None)
        if args.command == "calls":
            return [
                {"name": call["name"], "args": ", ".join(f"{k}:{v}" for k, v in call["args"].items()),
                 "right": call["right"] or "", "doc": call["doc"].split("\n")[0]}
                for call in await _call_table(client)
            ], Described(None)
        if args.command == "otp":
            return await _otp_command(client, args), Described(None)
        if args.command == "payments":
            return await _statement_command(client, args), Described({"fields": {"amount": "money"}})
        fn, call_args = _request(args)
        described = await _describe(client, fn)
        if args.command == "call":
            call_args = convert_args(args.args, described.args)
        if described.streaming:
            return await _stream(client, fn, call_args, described, args,
                                 _periodic_progress if args.command == "periodic-run" else None), described
        result = await client.call(fn, call_args)
        if args.command == "account" and isinstance(result, dict) and _out_format(args) == "table":
            result = _account_view(result)
        return result, described


def _request(args: argparse.Namespace) -> tuple[str, dict[str, Any]]:
    """The function and arguments a command asks for (``call``'s arguments are typed later)."""
    if args.command == "call":
        return args.fn, {}
    if args.command == "pay":
        call = {"account_id": _int("account", args.account), "amount": _convert("amount", "money", args.amount),
                "method": args.method, "comment": args.comment}
        if args.external_id:
            call["external_id"] = args.external_id
        return "payments.add", call
    if args.command == "users":
        return "users.search", {"text": args.text, "limit": args.limit}
    if args.command == "account":
        return "accounts.get", {"account_id": _int("account", args.id)}
    if args.command == "block":
        return "blocks.set", {"account_id": _int("account", args.id), "reason": args.reason}
    if args.command == "unblock":
        return "blocks.lift", {"account_id": _int("account", args.id)}
    if args.command == "promised":
        call = {"account_id": _int("account", args.account)}
        if args.amount is not None:
            call["amount"] = _convert("amount", "money", args.amount)
        if args.days is not None:
            call["days"] = args.days
        if args.reason:
            call["reason"] = args.reason
        return "payments.promised", call
    if args.command == "periodic-run":
        return "periodic.run", {}
    if args.command == "tokens":
        return _tokens_request(args)
    if args.command == "outbox":
        return _outbox_request(args)
    raise UsageError(f"unknown command {args.command}")


def _tokens_request(args: argparse.Namespace) -> tuple[str, dict[str, Any]]:
    """``billctl tokens create NAME --group G [--expires ISO]``, ``tokens list``, ``tokens revoke ID``."""
    if args.action == "create":
        call: dict[str, Any] = {"name": args.name, "groups": args.group}
        if args.expires:
            call["expires_at"] = _convert("expires", "time", args.expires)
        return "tokens.create", call
    if args.action == "list":
        return "tokens.list", {"limit": args.limit, "offset": args.offset}
    return "tokens.revoke", {"token_id": _int("token id", args.id)}


def _outbox_request(args: argparse.Namespace) -> tuple[str, dict[str, Any]]:
    """``billctl outbox stats``, ``outbox list [--state S] [--channel C] [--event E] [--account N]``,
    ``outbox retry ID...``."""
    if args.action == "stats":
        return "outbox.stats", {}
    if args.action == "list":
        call: dict[str, Any] = {"limit": args.limit, "offset": args.offset}
        for key in ("state", "channel", "event"):
            if getattr(args, key):
                call[key] = getattr(args, key)
        if args.account:
            call["account_id"] = _int("account", args.account)
        return "outbox.list", call
    return "outbox.retry", {"ids": [_int("delivery id", i) for i in args.ids]}


def _int(name: str, text: str) -> int:
    return int(_convert(name, "int", text))


def build_parser() -> argparse.ArgumentParser:
    env = os.environ.get
    p = argparse.ArgumentParser(prog="billctl", description="billcore administration over URFA")
    p.add_argument("--host", default=env("BILLCTL_HOST", "127.0.0.1"))
    p.add_argument("--port", type=int, default=int(env("BILLCTL_PORT", "11758")))
    p.add_argument("--unix", default=env("BILLCTL_UNIX"), help="URFA Unix socket instead of TCP")
    p.add_argument("--tls", action="store_true", help="TLS to the URFA port, verifying the server")
    p.add_argument("--cafile", help="CA or server certificate to verify against (with --tls)")
    p.add_argument("--login", default=env("BILLCTL_LOGIN", "admin"))
    p.add_argument("--kind", default=env("BILLCTL_KIND", "admin"), choices=["admin", "system", "user"])
    p.add_argument("--timeout", type=float, default=10.0)
    p.add_argument("--otp", default=env("BILLCTL_OTP"), metavar="CODE",
                   help="one-time code (TOTP or recovery) when your login has a second factor")
    fmt = p.add_mutually_exclusive_group()
    fmt.add_argument("--json", action="store_true",
                     help="JSON for scripts (money as integer micro-units; streamed rows: one object per line)")
    fmt.add_argument("--csv", action="store_true", help="CSV (a header, then one line per row)")
    sub = p.add_subparsers(dest="command", required=True)
    sub.add_parser("calls", help="the functions this session may call")
    c = sub.add_parser("call", help="call any function: billctl call payments.add account_id=1 amount=10.00")
    c.add_argument("fn")
    c.add_argument("args", nargs="*", metavar="key=value")
    c = sub.add_parser("pay", help="book a payment")
    c.add_argument("account")
    c.add_argument("amount", help="in currency units, e.g. 12.50")
    c.add_argument("--method", default="cash")
    c.add_argument("--comment", default="")
    c.add_argument("--external-id", help="makes the payment idempotent: the same id twice is one payment")
    c = sub.add_parser("users", help="search subscribers")
    c.add_argument("text", nargs="?", default="")
    c.add_argument("--limit", type=int, default=50)
    c = sub.add_parser("account", help="show an account")
    c.add_argument("id")
    c = sub.add_parser("block", help="set the administrative block")
    c.add_argument("id")
    c.add_argument("--reason", default="")
    c = sub.add_parser("unblock", help="lift the administrative block")
    c.add_argument("id")
    c = sub.add_parser("promised", help="grant an account this month's promised payment")
    c.add_argument("account")
    c.add_argument("--amount", help="in currency units (default: the configured promised amount)")
    c.add_argument("--days", type=int, help="days until it expires (default: the configured duration)")
    c.add_argument("--reason", default="", help="recorded in the audit log")
    sub.add_parser("periodic-run", help="run the periodic charges due now (what the scheduler would do)")
    c = sub.add_parser("payments", help="payments in bulk: import-statement FILE --bank NAME [--dry-run]")
    pay = c.add_subparsers(dest="action", required=True)
    t = pay.add_parser("import-statement", help="book a bank statement (CSV), each line once; --dry-run books"
                                                " nothing and shows the match table")
    t.add_argument("file")
    t.add_argument("--bank", required=True, help="the bank's short name (1 to 32 of A-Z a-z 0-9 _ -): part of"
                                                 " each line's external id")
    t.add_argument("--dry-run", action="store_true", help="match and show, book nothing")
    t.add_argument("--format", default="csv", choices=["csv"], help="the statement's format")
    t.add_argument("--encoding", default="auto", help="auto (UTF-8, else cp1251), utf-8 or cp1251")
    t.add_argument("--delimiter", default="auto", help="auto (; , tab or |, from the header) or the character")
    t.add_argument("--minor-units", type=int, default=2, choices=range(0, 7),
                   help="the currency's decimals (2: an amount with more is refused)")
    t.add_argument("--max-bytes", type=int, default=256 << 20, help="refuse a larger file")
    c = sub.add_parser("otp", help="your own TOTP second factor: enroll (prints the otpauth URI) or disable")
    c.add_argument("action", choices=["enroll", "disable"])
    c.add_argument("--code", help="the code, instead of a prompt")
    c = sub.add_parser("tokens", help="API tokens of the HTTP API: create (shows the token once), list, revoke")
    tokens = c.add_subparsers(dest="action", required=True)
    t = tokens.add_parser("create", help="a new token acting with the rights of the groups given")
    t.add_argument("name", help="1 to 64 of A-Z a-z 0-9 . _ -")
    t.add_argument("--group", action="append", required=True, help="an admin group (repeat for more)")
    t.add_argument("--expires", help="expiry, ISO 8601 (UTC when no zone is given)")
    t = tokens.add_parser("list", help="the tokens (never the tokens themselves)")
    t.add_argument("--limit", type=int, default=100)
    t.add_argument("--offset", type=int, default=0)
    t = tokens.add_parser("revoke", help="revoke a token: its sessions end at once")
    t.add_argument("id")
    c = sub.add_parser("outbox", help="the outbox of side effects: stats, list deliveries, retry dead ones")
    outbox = c.add_subparsers(dest="action", required=True)
    outbox.add_parser("stats", help="events not fanned out yet; deliveries per channel and state")
    t = outbox.add_parser("list", help="deliveries, newest first")
    t.add_argument("--state", choices=["pending", "delivered", "dead"])
    t.add_argument("--channel")
    t.add_argument("--event")
    t.add_argument("--account")
    t.add_argument("--limit", type=int, default=100)
    t.add_argument("--offset", type=int, default=0)
    t = outbox.add_parser("retry", help="try dead deliveries again")
    t.add_argument("ids", nargs="+")
    for module in COMMAND_MODULES:
        importlib.import_module(module).register(sub)
    return p


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        result, described = asyncio.run(_run(args))
    except UsageError as exc:
        print(f"billctl: {exc}", file=sys.stderr)
        return USAGE
    except (URFAError, OSError) as exc:
        return report("billctl", exc)
    if getattr(args, "printed", False):   # a command module streamed its rows and its summary itself
        return 0
    if described.streaming and args.command != "periodic-run":
        # the rows are out already; the summary (rows N) is for the person, not the pipe
        summary = show_money(result, described.money)
        print(render(summary) if isinstance(summary, dict) else _cell(summary), file=sys.stderr)
    elif args.json:
        print(json.dumps(result, default=_json_default, indent=2))
    elif args.csv:
        _print_csv(show_money(result, described.money))
    else:
        print(render(show_money(result, described.money)))
    if args.command == "tokens" and args.action == "create":
        print("billctl: the token is shown this once; store it now (only its hash is kept)", file=sys.stderr)
    if isinstance(result, dict) and result.get("notice"):   # e.g. radius.nas_add: what the core will drop
        print(f"billctl: notice: {result['notice']}", file=sys.stderr)
    return 0


def _print_csv(result: Any) -> None:
    rows = result if isinstance(result, list) else [result]
    keys: list[str] = []
    for row in rows:
        keys.extend(k for k in (row if isinstance(row, dict) else {"value": row}) if k not in keys)
    printer = RowPrinter(keys, frozenset(), "csv", sys.stdout)
    for row in rows:
        printer.add(row if isinstance(row, dict) else {"value": row})
    printer.finish()


if __name__ == "__main__":
    sys.exit(main())
