"""``billctl``: the administrator's command-line URFA client.

    billctl calls                         what this session may call, with arguments
    billctl call FN [key=value …]         call any function
    billctl pay ACCOUNT AMOUNT [--method cash] [--external-id ID]
    billctl users [TEXT]                  search subscribers
    billctl account ID                    one account with its balance and blocks
    billctl block ID [--reason …] / unblock ID
    billctl verify                        the ledger invariants, as the core sees them

Arguments are converted by the function's own schema (``sys.calls``): a
``money`` argument takes ``12.50`` (decimal currency) and sends integer
micro-units, ``int``/``bool`` are parsed strictly, ``list``/``map`` take
JSON.  Output is a human table by default and JSON with ``--json``.
The password comes from ``$BILLCTL_PASSWORD`` or a prompt; it never crosses
the wire (SCRAM).
"""

from __future__ import annotations

import argparse
import asyncio
import datetime as dt
import getpass
import json
import os
import ssl
import sys
from collections.abc import Sequence
from typing import Any

from urfa.client import Client, connect
from urfa.errors import CallFailed, LoginFailed, URFAError

from .billing.money import format_money, parse_money
from .billing.errors import BillingError

__all__ = ["main", "convert_args", "render"]

MONEY_KEYS = ("amount", "balance", "credit", "fee", "price", "total", "promised")


class UsageError(Exception):
    """The command line is wrong; the message says how."""


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


def _cell(key: str, value: Any) -> str:
    if isinstance(value, int) and not isinstance(value, bool) and key.split("_")[-1] in MONEY_KEYS:
        return format_money(value)
    if isinstance(value, dt.datetime):
        return value.isoformat(timespec="seconds")
    if isinstance(value, bytes):
        return value.hex()
    if isinstance(value, (dict, list)):
        return json.dumps(value, default=str)
    return "" if value is None else str(value)


def render(result: Any) -> str:
    """A human view: a table for a list of maps, key: value lines for a map."""
    if isinstance(result, list) and result and all(isinstance(r, dict) for r in result):
        keys: list[str] = []
        for r in result:
            keys.extend(k for k in r if k not in keys)
        rows = [[_cell(k, r.get(k)) for k in keys] for r in result]
        widths = [min(40, max(len(k), *(len(row[i]) for row in rows))) for i, k in enumerate(keys)]
        line = lambda cells: "  ".join(c[:40].ljust(w) for c, w in zip(cells, widths)).rstrip()  # noqa: E731
        return "\n".join([line(keys), line(["-" * w for w in widths]), *(line(r) for r in rows)])
    if isinstance(result, dict):
        width = max((len(k) for k in result), default=0)
        return "\n".join(f"{k.ljust(width)}  {_cell(k, v)}" for k, v in result.items())
    if isinstance(result, list):
        return "\n".join(_cell("", v) for v in result) or "(none)"
    return _cell("", result)


def _json_default(value: Any) -> Any:
    if isinstance(value, dt.datetime):
        return value.isoformat()
    if isinstance(value, bytes):
        return value.hex()
    return str(value)


async def _session(args: argparse.Namespace) -> Client:
    password = os.environ.get("BILLCTL_PASSWORD")
    if password is None:
        try:
            password = await asyncio.to_thread(getpass.getpass, f"{args.kind} {args.login} password: ")
        except EOFError:
            raise UsageError("no password given: type it, or set BILLCTL_PASSWORD") from None
    context = None
    if args.tls:
        context = ssl.create_default_context(cafile=args.cafile)
    if args.unix:
        client = await connect(unix=args.unix, timeout=args.timeout)
    else:
        client = await connect(args.host, args.port, ssl=context, timeout=args.timeout)
    try:
        await client.login(args.kind, args.login, password)
    except BaseException:
        await client.close()
        raise
    return client


async def _call_table(client: Client) -> list[dict[str, Any]]:
    """Every entry of ``sys.calls``, page by page (it grows with the plugins' calls)."""
    table: list[dict[str, Any]] = []
    while True:
        page = await client.call("sys.calls", {"offset": len(table)})
        table.extend(page)
        if not page:
            return table


async def _schema(client: Client, fn: str) -> dict[str, str] | None:
    for c in await _call_table(client):
        if c["name"] == fn:
            return dict(c["args"])
    return None


async def _run(args: argparse.Namespace) -> Any:
    client = await _session(args)
    try:
        if args.command == "calls":
            return [
                {"name": c["name"], "args": ", ".join(f"{k}:{v}" for k, v in c["args"].items()),
                 "right": c["right"] or "", "doc": c["doc"].split("\n")[0]}
                for c in await _call_table(client)
            ]
        if args.command == "call":
            schema = await _schema(client, args.fn)
            return await client.call(args.fn, convert_args(args.args, schema))
        if args.command == "pay":
            call = {"account_id": int(args.account), "amount": _convert("amount", "money", args.amount),
                    "method": args.method, "comment": args.comment}
            if args.external_id:
                call["external_id"] = args.external_id
            return await client.call("payments.add", call)
        if args.command == "users":
            return await client.call("users.search", {"text": args.text, "limit": args.limit})
        if args.command == "account":
            return await client.call("accounts.get", {"account_id": int(args.id)})
        if args.command == "block":
            return await client.call("blocks.set", {"account_id": int(args.id), "reason": args.reason})
        if args.command == "unblock":
            return await client.call("blocks.lift", {"account_id": int(args.id)})
        raise UsageError(f"unknown command {args.command}")
    finally:
        await client.close()


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
    p.add_argument("--json", action="store_true", help="JSON output for scripts")
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
    return p


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        result = asyncio.run(_run(args))
    except UsageError as exc:
        print(f"billctl: {exc}", file=sys.stderr)
        return 2
    except LoginFailed as exc:
        print(f"billctl: login refused: {exc}", file=sys.stderr)
        return 3
    except CallFailed as exc:
        print(f"billctl: {exc.code}: {exc.message}", file=sys.stderr)
        return 1
    except (URFAError, OSError) as exc:
        print(f"billctl: cannot talk to the core: {exc}", file=sys.stderr)
        return 4
    if args.json:
        print(json.dumps(result, default=_json_default, indent=2))
    else:
        print(render(result))
    return 0


if __name__ == "__main__":
    sys.exit(main())
