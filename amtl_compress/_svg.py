"""A small line chart written as SVG text, with no plotting dependency.

Why hand-written SVG and not matplotlib: matplotlib (with numpy, pillow, fonttools, ...) is only in
the ``dev`` extra, and ``amtl-compress plan`` must run from the plain install. The chart it needs
(a few curves of AUC against a ratio in [0, 1], a reference line, marked points) is about a hundred
lines of SVG; any browser, image viewer or document renders it, and it stays a readable text file.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from xml.sax.saxutils import escape, quoteattr

#: Line colours, one per series in order (matplotlib's "tab10", colour-blind friendlier than RGB).
PALETTE = (
    "#1f77b4", "#ff7f0e", "#2ca02c", "#d62728", "#9467bd",
    "#8c564b", "#e377c2", "#7f7f7f", "#bcbd22", "#17becf",
)

_WIDTH, _HEIGHT = 720, 440
_LEFT, _RIGHT, _TOP, _BOTTOM = 70, 200, 40, 50  # margins: the legend sits on the right
_TICKS = 5
_GREY = "#555555"


@dataclass(frozen=True)
class HLine:
    """A dashed horizontal reference line at ``y`` with a text ``label``."""

    y: float
    label: str


def _legend_row(row: int, label: str, style: str) -> list[str]:
    """A legend row: a line sample drawn with ``style`` and its label, right of the plot."""
    x, y = _WIDTH - _RIGHT + 16, _TOP + 10 + 20 * row
    return [f'<line x1="{x}" y1="{y}" x2="{x + 20}" y2="{y}" {style}/>',
            f'<text x="{x + 26}" y="{y + 4}">{escape(label)}</text>']


def _ticks(low: float, high: float, count: int = _TICKS) -> list[float]:
    """About ``count`` round tick values (steps of 1, 2 or 5 x 10^n) covering [low, high]."""
    span = high - low
    raw = span / max(count - 1, 1)
    magnitude = 10 ** math.floor(math.log10(raw))
    step = next(m * magnitude for m in (1, 2, 5, 10) if m * magnitude >= raw)
    first = math.ceil(low / step - 1e-9) * step
    ticks = []
    value = first
    while value <= high + step * 1e-9:
        ticks.append(round(value, 12))
        value += step
    return ticks


def _decimals(ticks: Sequence[float]) -> int:
    """Fewest decimals that tell the ticks apart (at most 6)."""
    for places in range(7):
        if len({f"{t:.{places}f}" for t in ticks}) == len(ticks):
            return places
    return 6


def line_chart(
    series: Mapping[str, Sequence[tuple[float, float]]],
    title: str,
    x_label: str,
    y_label: str,
    x_range: tuple[float, float] = (0.0, 1.0),
    hlines: Sequence[HLine] = (),
    marks: Mapping[str, tuple[float, float]] | None = None,
    mark_label: str = "",
) -> str:
    """An SVG document (UTF-8 text) of one polyline with dot markers per entry of ``series``.

    Args:
        series: name -> [(x, y)] in any order (drawn sorted by x); the legend lists the names in
            this order, each in its :data:`PALETTE` colour (cycled past 10 series).
        title, x_label, y_label: text, escaped here.
        x_range: the x axis' span; the y span fits every y, reference line and mark, padded by
            5 % (a flat chart gets a span of 0.01 around its value).
        hlines: dashed reference lines across the plot.
        marks: name -> (x, y) of a point to ring in that series' colour (a chosen point).
        mark_label: the legend's text for the rings (none if empty).
    """
    marks = dict(marks or {})
    ys = [y for points in series.values() for _, y in points]
    ys += [line.y for line in hlines] + [y for _, y in marks.values()]
    y_low, y_high = (min(ys), max(ys)) if ys else (0.0, 1.0)
    if y_high - y_low < 1e-9:
        y_low, y_high = y_low - 0.005, y_high + 0.005
    pad = 0.05 * (y_high - y_low)
    y_low, y_high = y_low - pad, y_high + pad
    x_low, x_high = x_range
    plot_w, plot_h = _WIDTH - _LEFT - _RIGHT, _HEIGHT - _TOP - _BOTTOM

    def px(x: float) -> float:
        return _LEFT + (x - x_low) / (x_high - x_low) * plot_w

    def py(y: float) -> float:
        return _TOP + (y_high - y) / (y_high - y_low) * plot_h

    out = [
        f'<svg xmlns="http://www.w3.org/2000/svg" width="{_WIDTH}" height="{_HEIGHT}" '
        f'viewBox="0 0 {_WIDTH} {_HEIGHT}" font-family="sans-serif" font-size="12">',
        f'<rect width="{_WIDTH}" height="{_HEIGHT}" fill="white"/>',
        f'<text x="{_LEFT + plot_w / 2:.1f}" y="22" text-anchor="middle" font-size="14">'
        f"{escape(title)}</text>",
    ]
    x_ticks = _ticks(x_low, x_high, 6)
    y_ticks = [t for t in _ticks(y_low, y_high) if y_low <= t <= y_high]
    x_places, y_places = _decimals(x_ticks), _decimals(y_ticks)
    for t in x_ticks:
        x = px(t)
        out.append(f'<line x1="{x:.1f}" y1="{_TOP}" x2="{x:.1f}" y2="{_TOP + plot_h}" '
                   'stroke="#e5e5e5"/>')
        out.append(f'<text x="{x:.1f}" y="{_TOP + plot_h + 16}" text-anchor="middle">'
                   f"{t:.{x_places}f}</text>")
    for t in y_ticks:
        y = py(t)
        out.append(f'<line x1="{_LEFT}" y1="{y:.1f}" x2="{_LEFT + plot_w}" y2="{y:.1f}" '
                   'stroke="#e5e5e5"/>')
        out.append(f'<text x="{_LEFT - 6}" y="{y + 4:.1f}" text-anchor="end">'
                   f"{t:.{y_places}f}</text>")
    out.append(f'<rect x="{_LEFT}" y="{_TOP}" width="{plot_w}" height="{plot_h}" fill="none" '
               'stroke="black"/>')
    out.append(f'<text x="{_LEFT + plot_w / 2:.1f}" y="{_HEIGHT - 12}" text-anchor="middle">'
               f"{escape(x_label)}</text>")
    out.append(f'<text transform="translate(18 {_TOP + plot_h / 2:.1f}) rotate(-90)" '
               f'text-anchor="middle">{escape(y_label)}</text>')
    for line in hlines:
        y = py(line.y)
        out.append(f'<line x1="{_LEFT}" y1="{y:.1f}" x2="{_LEFT + plot_w}" y2="{y:.1f}" '
                   f'stroke="{_GREY}" stroke-dasharray="6 4"/>')
    for i, (name, points) in enumerate(series.items()):
        colour = PALETTE[i % len(PALETTE)]
        ordered = sorted(points)
        coords = " ".join(f"{px(x):.1f},{py(y):.1f}" for x, y in ordered)
        out.append(f'<g stroke={quoteattr(colour)} fill={quoteattr(colour)}>')
        out.append(f'<title>{escape(name)}</title>')
        out.append(f'<polyline points="{coords}" fill="none" stroke-width="2"/>')
        out += [f'<circle cx="{px(x):.1f}" cy="{py(y):.1f}" r="3"/>' for x, y in ordered]
        if name in marks:
            x, y = marks[name]
            out.append(f'<circle cx="{px(x):.1f}" cy="{py(y):.1f}" r="7" fill="none" '
                       'stroke-width="2"/>')
        out.append("</g>")
        out += _legend_row(i, name, f'stroke={quoteattr(colour)} stroke-width="2"')
    # The reference lines and the ring are explained in the legend, never on the plot, where
    # their labels would cross the curves.
    row = len(series)
    for line in hlines:
        out += _legend_row(row, line.label, f'stroke="{_GREY}" stroke-dasharray="6 4"')
        row += 1
    if marks and mark_label:
        x, y = _WIDTH - _RIGHT + 16, _TOP + 10 + 20 * row
        out.append(f'<circle cx="{x + 10}" cy="{y}" r="7" fill="none" stroke="{_GREY}" '
                   'stroke-width="2"/>')
        out.append(f'<text x="{x + 26}" y="{y + 4}">{escape(mark_label)}</text>')
    out.append("</svg>")
    return "\n".join(out) + "\n"
