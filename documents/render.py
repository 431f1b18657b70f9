"""Invoices, credit notes and statements to HTML (Jinja2) and PDF (reportlab).

Theory of operation
-------------------
``documents.view`` turns a document into the strings it shows; this module
only lays them out, twice: an autoescaping Jinja2 template (documents/
templates/) for HTML, and reportlab's platypus for PDF.  reportlab is a
well-kept PDF library (since 2000, used by Wagtail, Odoo, ERPNext); a PDF
writer of our own would be one more thing to get wrong.

PDF text is drawn in a TrueType font that reportlab embeds (subset), so
Cyrillic is real text a reader extracts, not shapes: ``[documents] font``
and ``font_bold`` (DejaVu Sans from Debian's fonts-dejavu-core by default).
Each font file is registered once per process under a name derived from
its path.  Tables are platypus ``Table``s with ``repeatRows=1``: a table
longer than a page continues on the next one under its header again.
Every text that reaches a platypus ``Paragraph`` (which reads a little
markup) is XML-escaped first, as Jinja2 escapes the HTML.  PDFs are
written with reportlab's ``invariant`` flag: the same document gives the
same bytes (no creation time, a fixed id).

Errors: a malformed document or an unreadable font or logo raises
``DocumentError`` (``documents.view``).
"""

from __future__ import annotations

import base64
import hashlib
import io
import threading
from collections.abc import Iterable, Mapping, Sequence
from pathlib import Path
from typing import Any
from xml.sax.saxutils import escape

import jinja2
from reportlab.lib import colors
from reportlab.lib.enums import TA_RIGHT
from reportlab.lib.pagesizes import A4
from reportlab.lib.styles import ParagraphStyle
from reportlab.lib.units import mm
from reportlab.pdfbase import pdfmetrics
from reportlab.pdfbase.ttfonts import TTFError, TTFont
from reportlab.pdfgen.canvas import Canvas
from reportlab.platypus import Flowable, Image, Paragraph, SimpleDocTemplate, Spacer, Table, TableStyle

from .view import DocumentError, InvoiceView, Issuer, StatementView, invoice_view, statement_view

__all__ = ["invoice_html", "invoice_pdf", "statement_html", "statement_pdf", "DocumentError", "Issuer"]

HERE = Path(__file__).parent
_env = jinja2.Environment(loader=jinja2.FileSystemLoader(HERE / "templates"), autoescape=True,
                          undefined=jinja2.StrictUndefined, trim_blocks=True, lstrip_blocks=True)

_fonts_lock = threading.Lock()
_fonts: dict[str, str] = {}          # font file → the name it is registered under


# -- HTML -------------------------------------------------------------------------------

def _logo_uri(issuer: Issuer) -> str:
    png = issuer.logo_png()
    return "data:image/png;base64," + base64.b64encode(png).decode() if png else ""


def invoice_html(doc: Mapping[str, Any], issuer: Issuer, lang: str) -> str:
    """The invoice or credit note as one self-contained HTML page (the logo inline)."""
    view = invoice_view(doc, issuer, lang)
    return _env.get_template("invoice.html").render(v=view, w=view.words, logo=_logo_uri(issuer))


def statement_html(statement: Mapping[str, Any], rows: Iterable[Sequence[Any]], issuer: Issuer, lang: str) -> str:
    """The statement (``statements.get``'s result and rows) as one self-contained HTML page."""
    view = statement_view(statement, rows, issuer, lang)
    return _env.get_template("statement.html").render(v=view, w=view.words, logo=_logo_uri(issuer))


# -- PDF --------------------------------------------------------------------------------

def _font(path: str) -> str:
    """The reportlab name of the TrueType font at ``path``, registered on first use."""
    with _fonts_lock:
        name = _fonts.get(path)
        if name is None:
            name = "doc-" + hashlib.sha256(path.encode()).hexdigest()[:12]
            try:
                pdfmetrics.registerFont(TTFont(name, path))
            except (OSError, TTFError) as exc:
                raise DocumentError(f"documents.font: cannot use {path}: {exc}") from None
            _fonts[path] = name
        return name


class _Styles:
    def __init__(self, issuer: Issuer) -> None:
        self.regular = _font(issuer.font)
        self.bold = _font(issuer.font_bold)
        self.body = ParagraphStyle("body", fontName=self.regular, fontSize=9, leading=11.5)
        self.small = ParagraphStyle("small", parent=self.body, fontSize=8, leading=10)
        self.title = ParagraphStyle("title", fontName=self.bold, fontSize=16, leading=20)
        self.heading = ParagraphStyle("heading", fontName=self.bold, fontSize=9, leading=11.5)
        self.right = ParagraphStyle("right", parent=self.body, alignment=TA_RIGHT)
        self.total = ParagraphStyle("total", fontName=self.bold, fontSize=11, leading=14, alignment=TA_RIGHT)


def _p(text: str, style: ParagraphStyle) -> Paragraph:
    return Paragraph(escape(text), style)


def _block(heading: str, lines: list[str], s: _Styles) -> list[Flowable]:
    return [_p(heading, s.heading), *(_p(line, s.body) for line in lines)]


def _header(title: str, facts: list[tuple[str, str]], issuer: Issuer, issuer_lines: list[str],
            customer_lines: list[str], w: Mapping[str, str], s: _Styles) -> list[Flowable]:
    png = issuer.logo_png()
    story: list[Flowable] = []
    heading: list[Flowable] = [_p(title, s.title), Spacer(1, 2 * mm),
                               *(_p(f"{label}: {value}", s.body) for label, value in facts)]
    if png:
        logo = Image(io.BytesIO(png))
        scale = min(45 * mm / logo.imageWidth, 20 * mm / logo.imageHeight)
        logo.drawWidth, logo.drawHeight = logo.imageWidth * scale, logo.imageHeight * scale
        logo.hAlign = "RIGHT"
        top = Table([[heading, logo]], colWidths=[120 * mm, 50 * mm])
        top.setStyle(TableStyle([("VALIGN", (0, 0), (-1, -1), "TOP"), ("ALIGN", (1, 0), (1, 0), "RIGHT"),
                                 ("LEFTPADDING", (0, 0), (-1, -1), 0)]))
        story.append(top)
    else:
        story += heading
    story.append(Spacer(1, 5 * mm))
    parties = Table([[_block(w["issuer"], issuer_lines, s), _block(w["customer"], customer_lines, s)]],
                    colWidths=[85 * mm, 85 * mm])
    parties.setStyle(TableStyle([("VALIGN", (0, 0), (-1, -1), "TOP"), ("LEFTPADDING", (0, 0), (-1, -1), 0)]))
    story += [parties, Spacer(1, 6 * mm)]
    return story


def _grid(rows: list[list[Any]], widths: list[float], numeric_from: int, s: _Styles) -> Table:
    table = Table(rows, colWidths=widths, repeatRows=1)
    table.setStyle(TableStyle([
        ("FONTNAME", (0, 0), (-1, -1), s.regular), ("FONTSIZE", (0, 0), (-1, -1), 8.5),
        ("FONTNAME", (0, 0), (-1, 0), s.bold), ("BACKGROUND", (0, 0), (-1, 0), colors.HexColor("#e8ecf2")),
        ("LINEBELOW", (0, 0), (-1, 0), 0.6, colors.HexColor("#5a6b85")),
        ("LINEBELOW", (0, 1), (-1, -1), 0.25, colors.HexColor("#c8ced8")),
        ("ALIGN", (numeric_from, 0), (-1, -1), "RIGHT"), ("VALIGN", (0, 0), (-1, -1), "TOP"),
    ]))
    return table


def _footer(label: str, s: _Styles) -> Any:
    def draw(canvas: Canvas, doc: Any) -> None:
        canvas.saveState()
        canvas.setFont(s.regular, 7.5)
        canvas.setFillColor(colors.HexColor("#5a6b85"))
        canvas.drawRightString(A4[0] - 20 * mm, 10 * mm, f"{label} · {doc.page}")
        canvas.restoreState()
    return draw


def _build(story: list[Flowable], title: str, author: str, footer: str, s: _Styles) -> bytes:
    out = io.BytesIO()
    doc = SimpleDocTemplate(out, pagesize=A4, leftMargin=20 * mm, rightMargin=20 * mm, topMargin=18 * mm,
                            bottomMargin=18 * mm, title=title, author=author, creator="billcore", invariant=1)
    draw = _footer(footer, s)
    doc.build(story, onFirstPage=draw, onLaterPages=draw)
    return out.getvalue()


def _invoice_story(v: InvoiceView, s: _Styles) -> list[Flowable]:
    w = v.words
    facts = [(w["number"], v.number), (w["issued"], v.issued), (w["period"], v.period)]
    story = _header(f"{v.title} {v.number}", facts, v.issuer, v.issuer_lines, v.customer_lines, w, s)
    if v.credit_for:
        story += [_p(v.credit_for, s.heading)]
        if v.reason:
            story.append(_p(f"{w['reason']}: {v.reason}", s.body))
        story.append(Spacer(1, 4 * mm))
    rows: list[list[Any]] = [[w["line_no"], w["description"], w["quantity"], w["net"], w["vat"], w["total"]]]
    rows += [[line.line_no, _p(line.description, s.body), line.quantity, line.net, line.vat, line.total]
             for line in v.lines]
    story.append(_grid(rows, [9 * mm, 67 * mm, 22 * mm, 24 * mm, 22 * mm, 26 * mm], 2, s))
    story.append(Spacer(1, 4 * mm))
    totals = Table([[w["net"], v.net], [f"{w['vat']} {v.vat_rate}", v.vat],
                    [f"{v.total_label}, {v.currency}", v.total]], colWidths=[60 * mm, 35 * mm], hAlign="RIGHT")
    totals.setStyle(TableStyle([
        ("FONTNAME", (0, 0), (-1, -1), s.regular), ("FONTSIZE", (0, 0), (-1, -1), 9),
        ("FONTNAME", (0, 2), (-1, 2), s.bold), ("FONTSIZE", (0, 2), (-1, 2), 11),
        ("LINEABOVE", (0, 2), (-1, 2), 0.6, colors.black), ("ALIGN", (0, 0), (-1, -1), "RIGHT"),
    ]))
    story += [totals, Spacer(1, 3 * mm), _p(f"{w['vat_rate']}: {v.vat_rate}. "
                                            + w["currency"].format(currency=v.currency) + ".", s.small)]
    if v.credited_by:
        story.append(_p(f"{w['credited_by']}: {', '.join(v.credited_by)}", s.small))
    return story


def invoice_pdf(doc: Mapping[str, Any], issuer: Issuer, lang: str) -> bytes:
    """The invoice or credit note as a PDF (A4)."""
    view = invoice_view(doc, issuer, lang)
    s = _Styles(issuer)
    return _build(_invoice_story(view, s), f"{view.title} {view.number}", issuer.name, view.number, s)


def _statement_story(v: StatementView, s: _Styles) -> list[Flowable]:
    w = v.words
    facts = [(w["account"], v.account), (w["since"], v.since), (w["until"], v.until)]
    story = _header(v.title, facts, v.issuer, v.issuer_lines, v.customer_lines, w, s)
    story.append(_p(f"{w['opening']}: {v.opening} {v.currency}", s.heading))
    story.append(Spacer(1, 3 * mm))
    if v.rows:
        rows: list[list[Any]] = [[w["date"], w["kind"], w["reference"], w["amount"], w["balance"]]]
        rows += [[r.date, r.kind, _p(r.reference, s.small), r.amount, r.balance] for r in v.rows]
        story.append(_grid(rows, [30 * mm, 32 * mm, 58 * mm, 25 * mm, 25 * mm], 3, s))
    else:
        story.append(_p(w["no_entries"], s.body))
    story += [Spacer(1, 3 * mm), _p(f"{w['entries']}: {v.entries}", s.body),
              _p(f"{w['closing']}: {v.closing} {v.currency}", s.heading)]
    return story


def statement_pdf(statement: Mapping[str, Any], rows: Iterable[Sequence[Any]], issuer: Issuer, lang: str) -> bytes:
    """The statement as a PDF (A4)."""
    view = statement_view(statement, rows, issuer, lang)
    s = _Styles(issuer)
    return _build(_statement_story(view, s), f"{view.title} {view.account}", issuer.name,
                  f"{view.title} {view.account}", s)
