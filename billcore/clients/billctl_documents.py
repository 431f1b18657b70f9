"""``billctl`` commands that write documents: an invoice or credit note as PDF or HTML, a statement as PDF.

    billctl invoices pdf ID --out F [--lang ru] [--config billcore.toml]
    billctl invoices html ID --out F
    billctl statement-pdf ACCOUNT --since 2026-11-01 --until 2026-12-01 --out F

Theory of operation
-------------------
The document comes from the core (``invoices.get``; ``statements.get``
streams its rows, collected up to ``MAX_STATEMENT_ROWS`` since a PDF is laid
out whole) and is rendered here by ``documents.render`` with the issuer's
details of the ``[documents]`` section of the config file (``--config``,
else ``$BILLCORE_CONFIG``, else the built-in defaults: the ISP's name
empty).  The output file is written next to
its destination and renamed into place, so a failed render never leaves half
a PDF behind.  A date without a time (``--since 2026-11-01``) is midnight
in the operator's time zone (``[core] timezone``).
"""

from __future__ import annotations

import argparse
import datetime as dt
import os
import tempfile
import zoneinfo
from pathlib import Path
from typing import Any

from urfa.client import Client

from billcore.common.config import ConfigError, load_config
from documents.render import DocumentError, Issuer, invoice_html, invoice_pdf, statement_html, statement_pdf
from billcore.clients.exits import UsageError
from billcore.clients.subcommands import actions_of

__all__ = ["register", "MAX_STATEMENT_ROWS"]

MAX_STATEMENT_ROWS = 500_000


def _issuer(args: argparse.Namespace) -> Issuer:
    path = args.config or os.environ.get("BILLCORE_CONFIG") or None
    try:
        return Issuer.of(load_config(path))
    except ConfigError as exc:
        raise UsageError(f"config: {exc}") from None


def _lang(args: argparse.Namespace, issuer: Issuer) -> str:
    return str(args.lang or issuer.language)


def _write(out: str, data: bytes) -> dict[str, Any]:
    target = Path(out)
    try:
        fd, temp = tempfile.mkstemp(dir=target.parent if str(target.parent) else ".", prefix=f".{target.name}.")
        with os.fdopen(fd, "wb") as f:
            f.write(data)
        os.replace(temp, target)
    except OSError as exc:
        raise UsageError(f"{out}: {exc.strerror}") from None
    return {"out": str(target), "bytes": len(data)}


def _moment(name: str, text: str, zone: str) -> dt.datetime:
    try:
        value = dt.datetime.fromisoformat(text)
    except ValueError:
        raise UsageError(f"{name}: a date or time, ISO 8601 (2026-11-01 or 2026-11-01T00:00+03:00), got {text!r}") from None
    return value if value.tzinfo else value.replace(tzinfo=zoneinfo.ZoneInfo(zone))


def _invoice_id(text: str) -> int:
    try:
        return int(text, 10)
    except ValueError:
        raise UsageError(f"invoice id: an integer, got {text!r}") from None


async def invoice_document(client: Client, args: argparse.Namespace) -> dict[str, Any]:
    """``billctl invoices pdf|html ID --out F``."""
    issuer = _issuer(args)
    doc = await client.call("invoices.get", {"invoice_id": _invoice_id(args.id)})
    try:
        if args.action == "pdf":
            data = invoice_pdf(doc, issuer, _lang(args, issuer))
        else:
            data = invoice_html(doc, issuer, _lang(args, issuer)).encode("utf-8")
    except (DocumentError, ValueError) as exc:
        raise UsageError(f"documents: {exc}") from None
    return {"number": doc.get("number"), **_write(args.out, data)}


async def statement_document(client: Client, args: argparse.Namespace) -> dict[str, Any]:
    """``billctl statement-pdf|statement-html ACCOUNT --since D --until D --out F``."""
    issuer = _issuer(args)
    try:
        account_id = int(args.account, 10)
    except ValueError:
        raise UsageError(f"account: an integer, got {args.account!r}") from None
    call = {"account_id": account_id, "since": _moment("since", args.since, issuer.timezone),
            "until": _moment("until", args.until, issuer.timezone)}
    rows: list[Any] = []
    stream = client.stream("statements.get", call)
    async for chunk in stream:
        rows.extend(chunk if isinstance(chunk, list) else [chunk])
        if len(rows) > MAX_STATEMENT_ROWS:
            raise UsageError(f"more than {MAX_STATEMENT_ROWS:,} entries: ask for a shorter range")
    try:
        if args.command == "statement-pdf":
            data = statement_pdf(stream.result, rows, issuer, _lang(args, issuer))
        else:
            data = statement_html(stream.result, rows, issuer, _lang(args, issuer)).encode("utf-8")
    except (DocumentError, ValueError) as exc:
        raise UsageError(f"documents: {exc}") from None
    return {"account_id": account_id, "entries": len(rows), **_write(args.out, data)}


def _common(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--out", required=True, help="the file to write")
    parser.add_argument("--lang", choices=["en", "ru"], help="the document's language (default: [documents] language)")
    parser.add_argument("--config", help="billcore config with the [documents] issuer (default: $BILLCORE_CONFIG)")


def register(sub: Any) -> None:
    """Add the commands to billctl's sub-parsers; each sets ``run`` (client, args) → result."""
    invoices = actions_of(sub, "invoices", "invoices and credit notes")
    for fmt in ("pdf", "html"):
        c = invoices.add_parser(fmt, help=f"write an invoice or credit note as {fmt.upper()}")
        c.add_argument("id", help="the invoice's id")
        _common(c)
        c.set_defaults(run=invoice_document)
    for fmt in ("pdf", "html"):
        c = sub.add_parser(f"statement-{fmt}", help=f"write an account's statement for a range as {fmt.upper()}")
        c.add_argument("account")
        c.add_argument("--since", required=True, help="first moment, ISO 8601 (a date: midnight in the operator's zone)")
        c.add_argument("--until", required=True, help="end of the range, excluded")
        _common(c)
        c.set_defaults(run=statement_document)
