"""PDF pages rendered per second: invoices of typical size, and a long one, with documents/render.py.

Theory of operation
-------------------
The monthly invoice run issues one invoice per account; subscribers and
operators then download them as PDF, rendered on demand by the office, the
console or billctl (nothing is stored).  This measures what one process
renders: N typical invoices (six lines: a fee, three traffic classes, time,
a one-off; Russian and English alternating, the issuer with a logo) and a
300-line invoice that spans pages, each rendered to PDF by
``documents.render.invoice_pdf`` and its pages counted in the PDF itself.
HTML (``invoice_html``) is measured beside it.  CPU seconds, best of R runs;
``--tiny`` is the CI size and writes no result files.
"""

from __future__ import annotations

import argparse
import re
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from _machine import machine, publish, tree_commit  # noqa: E402
from documents.render import invoice_html, invoice_pdf  # noqa: E402
from documents.view import Issuer  # noqa: E402

RESULTS = Path(__file__).resolve().parent / "results"
_PAGE = re.compile(rb"/Type /Page[^s]")


def typical(n: int) -> dict[str, Any]:
    lines = [("periodic", "Monthly fee «Home 100»", None, 41_666_667, 8_333_333),
             ("traffic", "Internet traffic, local", 52_345_678_901, 0, 0),
             ("traffic", "Internet traffic, world", 12_000_000_000, 10_000_000, 2_000_000),
             ("traffic", "Night traffic", 3_500_000_000, 0, 0),
             ("time", "Dial-up time", 5_430, 1_250_000, 250_000),
             ("once", "Router rental", None, 8_333_333, 1_666_667)]
    rows = [{"line_no": i, "line_kind": kind, "service_id": i, "class_id": None, "description": text,
             "quantity": qty, "net": net, "vat": vat, "total": net + vat}
            for i, (kind, text, qty, net, vat) in enumerate(lines, start=1)]
    net, vat = sum(r["net"] for r in rows), sum(r["vat"] for r in rows)
    return {"id": n, "kind": "invoice", "number": f"INV-2026-{n:06d}", "series": "INV", "year": 2026, "seq": n,
            "account_id": 1000 + n, "period_start": "2026-11-01T00:00:00+03:00",
            "period_end": "2026-12-01T00:00:00+03:00", "issued_at": "2026-12-01T00:10:00+03:00",
            "issued_by": "periodic", "vat_bp": 2000, "net": net, "vat": vat, "total": net + vat, "reason": "",
            "credits": None, "credited_by": [],
            "customer": {"user_id": n, "login": f"user{n}", "full_name": "Иван Петрович Сидоров",
                         "address": "Москва, ул. Тверская, д. 1, кв. 2", "email": f"user{n}@example.org"},
            "lines": rows, "currency": "RUB", "minor_units": 2}


def long_invoice(lines: int) -> dict[str, Any]:
    doc = typical(999_999)
    doc["lines"] = [{"line_no": i, "line_kind": "traffic", "service_id": 4, "class_id": i,
                     "description": f"Traffic class {i}", "quantity": i * 10**9, "net": 1_000_000, "vat": 200_000,
                     "total": 1_200_000} for i in range(1, lines + 1)]
    doc["net"], doc["vat"], doc["total"] = lines * 1_000_000, lines * 200_000, lines * 1_200_000
    return doc


def logo_png() -> Path:
    from PIL import Image   # reportlab's own dependency

    path = Path(tempfile.mkdtemp(prefix="docbench-")) / "logo.png"
    Image.new("RGB", (240, 80), (20, 90, 160)).save(path)
    return path


def best(runs: int, fn: Callable[[], int]) -> tuple[float, int]:
    """(best CPU seconds, what fn counted) over ``runs`` runs."""
    times, counted = [], 0
    for _ in range(runs):
        start = time.process_time()
        counted = fn()
        times.append(time.process_time() - start)
    return min(times), counted


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--tiny", action="store_true", help="CI size; writes no result files")
    p.add_argument("--invoices", type=int, default=400)
    p.add_argument("--long-lines", type=int, default=300)
    p.add_argument("--runs", type=int, default=3)
    args = p.parse_args()
    count, long_lines, runs = (12, 60, 1) if args.tiny else (args.invoices, args.long_lines, args.runs)
    started = machine()
    logo = logo_png()
    issuer = Issuer(name="ООО «Сеть Плюс»", address="125009, Москва\nул. Тверская, 1", tax_id="7701234567",
                    bank_details="ПАО Сбербанк\nр/с 40702810900000000001", logo=str(logo),
                    timezone="Europe/Moscow")
    docs = [typical(n) for n in range(1, count + 1)]
    invoice_pdf(docs[0], issuer, "ru")      # fonts registered, templates compiled: not part of the figure

    def typical_pdfs() -> int:
        return sum(len(_PAGE.findall(invoice_pdf(doc, issuer, "ru" if i % 2 else "en")))
                   for i, doc in enumerate(docs))

    def long_pdf() -> int:
        return len(_PAGE.findall(invoice_pdf(long_invoice(long_lines), issuer, "ru")))

    def typical_html() -> int:
        return sum(1 for i, doc in enumerate(docs) if invoice_html(doc, issuer, "ru" if i % 2 else "en"))

    t_pdf, pages = best(runs, typical_pdfs)
    t_long, long_pages = best(runs, long_pdf)
    t_html, htmls = best(runs, typical_html)
    sample = invoice_pdf(docs[0], issuer, "ru")
    report = {
        "benchmark": "documents_render", "commit": tree_commit(), "machine": started, "tiny": args.tiny,
        "typical": {"invoices": count, "pages": pages, "cpu_s": round(t_pdf, 4),
                    "pages_per_s": round(pages / t_pdf, 1), "pdf_bytes": len(sample)},
        "long": {"lines": long_lines, "pages": long_pages, "cpu_s": round(t_long, 4),
                 "pages_per_s": round(long_pages / t_long, 1)},
        "html": {"invoices": htmls, "cpu_s": round(t_html, 4), "per_s": round(htmls / t_html, 1)},
    }
    m = started
    text = (
        "# documents_render — PDF pages rendered per second\n\n"
        f"documents/render.py (reportlab, DejaVu Sans embedded, the issuer's PNG logo), one process, best of "
        f"{runs} runs, CPU seconds.\n\n"
        "| document | documents | pages | CPU s | pages per CPU-second |\n| --- | ---: | ---: | ---: | ---: |\n"
        f"| typical invoice (6 lines; ru/en), PDF | {count:,} | {pages:,} | {t_pdf:.4f} | **{pages / t_pdf:,.1f}** |\n"
        f"| long invoice ({long_lines} lines), PDF | 1 | {long_pages:,} | {t_long:.4f} | {long_pages / t_long:,.1f} |\n"
        f"| typical invoice, HTML | {htmls:,} | — | {t_html:.4f} | {htmls / t_html:,.1f} documents/s |\n\n"
        f"A typical invoice is one A4 page of {len(sample):,} bytes.  At this rate one core renders a month's "
        f"invoices of 1,000,000 accounts in {1_000_000 / (pages / t_pdf) / 3600:,.1f} hours; documents are "
        "rendered on demand (downloads), not stored, so the figure bounds a download's CPU cost "
        f"({1000 * t_pdf / max(1, count):.1f} ms each).\n\n"
        f"Machine: {m['cpu']}, nproc {m['nproc']}, {m['platform']}, Python {m['python']}; {m['date']}; "
        f"1-minute load average {m['loadavg'][0]} when the run started (other processes shared the machine).\n\n"
        "Reproduce: `python benchmarks/documents_render.py`\n")
    publish(report, text, RESULTS / "documents_render", args.tiny)
    logo.unlink()
    logo.parent.rmdir()
    return 0


if __name__ == "__main__":
    sys.exit(main())
