"""``python -m documents preview --out invoice.pdf``: a sample invoice with your ``[documents]`` details.

An operator setting up the issuer's name, address, bank details, logo and
fonts sees the result without a core or an invoice: the sample is a
typical monthly invoice (a fee, traffic, time, a one-off) of a made-up
subscriber, rendered with the config file's ``[documents]`` and
``[billing]`` sections (``--config``, else ``$BILLCORE_CONFIG``, else the
defaults), as PDF or HTML by the output's suffix.  docs/img/invoice-sample.png
is this sample in Russian, drawn by ``pdftoppm``.
"""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path
from typing import Any

from billcore.common.config import ConfigError, load_config

from .render import invoice_html, invoice_pdf
from .view import DocumentError, Issuer

__all__ = ["main", "sample_invoice"]


def sample_invoice(currency: str = "RUB", minor_units: int = 2) -> dict[str, Any]:
    """A typical monthly invoice, in the shape ``invoices.get`` returns."""
    lines: list[tuple[str, str, int | None, int, int]] = [("periodic", "Абонентская плата «Домашний 100» / Monthly fee", None, 50_000_000, 10_000_000),
             ("traffic", "Трафик: интернет / Internet traffic", 52_345_678_901, 8_333_333, 1_666_667),
             ("traffic", "Трафик: ночной / Night traffic", 12_000_000_000, 0, 0),
             ("time", "Время: коммутируемый доступ / Dial-up time", 5_430, 2_500_000, 500_000),
             ("once", "Аренда роутера / Router rental", None, 12_500_000, 2_500_000)]
    rows: list[dict[str, Any]] = [{"line_no": n, "line_kind": kind, "service_id": n, "class_id": None, "description": text,
             "quantity": qty, "net": net, "vat": vat, "total": net + vat}
            for n, (kind, text, qty, net, vat) in enumerate(lines, start=1)]
    net, vat = sum(r["net"] for r in rows), sum(r["vat"] for r in rows)
    return {"id": 7, "kind": "invoice", "number": "INV-2026-000007", "series": "INV", "year": 2026, "seq": 7,
            "account_id": 1042, "period_start": "2026-10-31T21:00:00+00:00",
            "period_end": "2026-11-30T21:00:00+00:00", "issued_at": "2026-11-30T21:10:00+00:00",
            "issued_by": "periodic", "vat_bp": 2000, "net": net, "vat": vat, "total": net + vat, "reason": "",
            "credits": None, "credited_by": [],
            "customer": {"user_id": 5, "login": "ivanov", "full_name": "Иван Петрович Иванов",
                         "address": "125009, Москва, ул. Тверская, д. 7, кв. 12", "email": "ivanov@example.org"},
            "lines": rows, "currency": currency, "minor_units": minor_units}


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m documents", description=__doc__.split("\n")[0])
    sub = p.add_subparsers(dest="command", required=True)
    c = sub.add_parser("preview", help="write a sample invoice with the configured issuer")
    c.add_argument("--out", required=True, help="FILE.pdf or FILE.html")
    c.add_argument("--lang", choices=["en", "ru"], help="default: [documents] language")
    c.add_argument("--config", help="billcore config (default: $BILLCORE_CONFIG, else the defaults)")
    args = p.parse_args(argv)
    try:
        config = load_config(args.config or os.environ.get("BILLCORE_CONFIG") or None)
    except ConfigError as exc:
        print(f"documents: {exc}", file=sys.stderr)
        return 2
    issuer = Issuer.of(config)
    doc = sample_invoice(config.billing.currency, config.billing.minor_units)
    lang = args.lang or issuer.language
    out = Path(args.out)
    try:
        data = invoice_html(doc, issuer, lang).encode() if out.suffix == ".html" else invoice_pdf(doc, issuer, lang)
    except DocumentError as exc:
        print(f"documents: {exc}", file=sys.stderr)
        return 2
    out.write_bytes(data)
    return 0


if __name__ == "__main__":
    sys.exit(main())
