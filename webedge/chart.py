"""The traffic chart as inline SVG, and its table: the office's traffic page and the console's card.

The chart is drawn here, server-side, as a stacked bar per day and a colour
per traffic class, so it needs no script, no inline style and no CDN (a
strict CSP passes it) and prints as it looks.  The number filters every
page uses are ``webedge.render``'s.
"""

from __future__ import annotations

import datetime as dt
from collections import OrderedDict
from html import escape
from typing import Any

from webedge.render import human_bytes

__all__ = ["traffic_chart", "traffic_table", "PALETTE"]

PALETTE = ("#2b6cb0", "#dd6b20", "#38a169", "#805ad5", "#d53f8c", "#319795", "#b7791f", "#718096")


def _days(first: str, last: str) -> list[str]:
    a, b = dt.date.fromisoformat(first), dt.date.fromisoformat(last)
    return [(a + dt.timedelta(days=i)).isoformat() for i in range((b - a).days + 1)]


def _classes(rows: list[dict[str, Any]]) -> OrderedDict[int, str]:
    out: OrderedDict[int, str] = OrderedDict()
    for row in sorted(rows, key=lambda row: row["class_id"]):
        out.setdefault(row["class_id"], str(row["class"]))
    return out


def traffic_table(traffic: dict[str, Any]) -> dict[str, Any]:
    """Rows per day (only days with traffic) and totals per class."""
    rows = traffic["rows"]
    classes = _classes(rows)
    by_day: OrderedDict[str, dict[int, tuple[int, int]]] = OrderedDict()
    for row in rows:
        by_day.setdefault(row["day"], {})[row["class_id"]] = (int(row["bytes"]), int(row["amount"]))
    totals = {c: (sum(per_class.get(c, (0, 0))[0] for per_class in by_day.values()),
                  sum(per_class.get(c, (0, 0))[1] for per_class in by_day.values())) for c in classes}
    return {"classes": classes, "days": by_day, "totals": totals,
            "total_bytes": sum(b for b, _ in totals.values()),
            "total_amount": sum(a for _, a in totals.values())}


def traffic_chart(traffic: dict[str, Any], title: str = "") -> str:
    """An accessible SVG: one stacked bar per day, ``<title>`` tooltips, a legend."""
    rows = traffic["rows"]
    days = _days(traffic["first"], traffic["last"])[-366:]
    classes = _classes(rows)
    colour = {c: PALETTE[i % len(PALETTE)] for i, c in enumerate(classes)}
    per_day: dict[str, dict[int, int]] = {}
    for row in rows:
        per_day.setdefault(row["day"], {})[row["class_id"]] = int(row["bytes"])
    peak = max((sum(v.values()) for v in per_day.values()), default=0)
    width, height, left, top, bottom = 720, 260, 64, 12, 36
    plot_w, plot_h = width - left - 8, height - top - bottom
    step = plot_w / max(1, len(days))
    bar_w = max(1.0, step * 0.7)
    parts = [f'<svg class="chart" viewBox="0 0 {width} {height + 22 * ((len(classes) + 3) // 4)}" '
             f'role="img" aria-label="{escape(title)}" xmlns="http://www.w3.org/2000/svg">']
    for i in range(5):  # grid lines with labels
        y = top + plot_h - plot_h * i / 4
        label = human_bytes(peak * i // 4) if peak else "0"
        parts.append(f'<line x1="{left}" y1="{y:.1f}" x2="{width - 8}" y2="{y:.1f}" class="grid"/>')
        parts.append(f'<text x="{left - 6}" y="{y + 4:.1f}" text-anchor="end" class="axis">{escape(label)}</text>')
    for i, day in enumerate(days):
        x = left + i * step + (step - bar_w) / 2
        y = top + plot_h
        for c in classes:
            q = per_day.get(day, {}).get(c, 0)
            if not q or not peak:
                continue
            h = plot_h * q / peak
            y -= h
            tip = f"{day} · {classes[c]}: {human_bytes(q)}"
            parts.append(f'<rect x="{x:.1f}" y="{y:.1f}" width="{bar_w:.1f}" height="{max(h, 0.5):.1f}" '
                         f'fill="{colour[c]}" data-day="{day}" data-class="{escape(classes[c])}">'
                         f'<title>{escape(tip)}</title></rect>')
        # every day up to two weeks; else one label a week-ish, counted back from the last day, so
        # the last day is labelled and no two labels meet
        if len(days) <= 14 or (len(days) - 1 - i) % max(1, len(days) // 7) == 0:
            parts.append(f'<text x="{x + bar_w / 2:.1f}" y="{top + plot_h + 16}" text-anchor="middle" '
                         f'class="axis">{day[5:]}</text>')
    for i, (c, name) in enumerate(classes.items()):
        lx, ly = left + (i % 4) * 160, height + 6 + 22 * (i // 4)
        parts.append(f'<rect x="{lx}" y="{ly}" width="12" height="12" fill="{colour[c]}"/>'
                     f'<text x="{lx + 18}" y="{ly + 11}" class="legend">{escape(name)}</text>')
    parts.append("</svg>")
    return "".join(parts)
