"""Charts for the reports pages: inline SVG drawn on the server from a report's rows.

Theory of operation
-------------------
``bar_chart(labels, series)`` is pure: labels and one or two stacked series
of integers in, SVG text out. No script and no chart library reach the
browser (the console's content security policy allows neither inline script
nor outside sources); colours are presentation attributes, not ``style``,
for the same reason. Values are the report's own integers (micro-units for
money); ``fmt`` turns one into the text of the axis and of each bar's
tooltip (``<title>``), so money is shown by the one money formatter.

The value axis always includes zero; a negative value (a day of more
cancellations than payments) hangs below it. At most `MAX_BARS` bars are
drawn (the page's table holds the same rows); every label and value is
escaped.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from html import escape

__all__ = ["MAX_BARS", "COLOURS", "bar_chart"]

MAX_BARS = 1_000
WIDTH, HEIGHT = 860, 260
LEFT, RIGHT, TOP, BOTTOM = 90, 10, 12, 46
COLOURS = ("#2f6db5", "#e0a030")


def _nice(n: float) -> str:
    return f"{n:.1f}"


def bar_chart(labels: Sequence[str], series: Sequence[tuple[str, Sequence[int]]],
              fmt: Callable[[int], str] = str, test_id: str = "chart") -> str:
    """An SVG bar chart: one bar per label, the series stacked (each a (name, values) pair)."""
    labels = list(labels)[:MAX_BARS]
    n = len(labels)
    series = [(name, list(values)[:n]) for name, values in series][:len(COLOURS)]
    if n == 0 or not series:
        return ""
    tops = [sum(max(0, s[1][i]) for s in series) for i in range(n)]
    bottoms = [sum(min(0, s[1][i]) for s in series) for i in range(n)]
    high, low = max(0, *tops), min(0, *bottoms)
    span = (high - low) or 1
    plot_w, plot_h = WIDTH - LEFT - RIGHT, HEIGHT - TOP - BOTTOM
    step = plot_w / n
    bar_w = min(60.0, max(1.0, step * 0.8))

    def y(value: int) -> float:
        return TOP + (high - value) * plot_h / span

    out = [f'<svg xmlns="http://www.w3.org/2000/svg" viewBox="0 0 {WIDTH} {HEIGHT}" width="100%" role="img"'
           f' data-test="{escape(test_id)}" aria-label="{escape(", ".join(name for name, _ in series))}">']
    zero = y(0)
    out.append(f'<line x1="{LEFT}" y1="{_nice(zero)}" x2="{WIDTH - RIGHT}" y2="{_nice(zero)}" stroke="#888"/>')
    for value in sorted({high, low, 0}):
        out.append(f'<text x="{LEFT - 6}" y="{_nice(y(value) + 4)}" text-anchor="end" font-size="11"'
                   f' fill="#444">{escape(fmt(value))}</text>')
    for i, label in enumerate(labels):
        x = LEFT + i * step + (step - bar_w) / 2
        up, down = 0, 0
        for k, (name, values) in enumerate(series):
            value = values[i]
            if value >= 0:
                top, bottom = y(up + value), y(up)
                up += value
            else:
                top, bottom = y(down), y(down + value)
                down += value
            out.append(f'<rect x="{_nice(x)}" y="{_nice(top)}" width="{_nice(bar_w)}"'
                       f' height="{_nice(max(0.0, bottom - top))}" fill="{COLOURS[k]}" data-label="{escape(label)}">'
                       f'<title>{escape(label)} · {escape(name)}: {escape(fmt(value))}</title></rect>')
    # the first, middle and last labels under the axis: enough to read a long series, never a smudge
    for i in sorted({0, n // 2, n - 1}):
        x = LEFT + i * step + step / 2
        out.append(f'<text x="{_nice(x)}" y="{HEIGHT - BOTTOM + 16}" text-anchor="middle" font-size="11"'
                   f' fill="#444">{escape(labels[i][:24])}</text>')
    for k, (name, _values) in enumerate(series):
        x = LEFT + k * 200
        out.append(f'<rect x="{x}" y="{HEIGHT - 16}" width="10" height="10" fill="{COLOURS[k]}"/>'
                   f'<text x="{x + 14}" y="{HEIGHT - 7}" font-size="11" fill="#444">{escape(name)}</text>')
    out.append("</svg>")
    return "".join(out)
