"""Small inline-SVG plots and a self-contained HTML page, for the device and hub reports.

Why hand-written: the reports must be single HTML files that open anywhere with nothing external (no
JavaScript CDN, no fonts, no network on a device), and no plotting library is a dependency of this
project (matplotlib is not installed, and a 40 MB plotting stack on an edge device for a few line charts
is the wrong trade). Line, step and bar charts with axes, ticks and a legend fit in ~200 lines.

Every data mark (a series' line, a point, a bar) carries ``class="mark"`` so tests and tools can count
what a plot shows; each plot is an ``<svg class="plot">`` with a ``<title>``.

Public API::

    line_chart(series, title, y_label="", x_label="seconds since start", step=False) -> str
    bar_chart(bars, title, y_label="") -> str
    page(title, sections, subtitle="") -> str        # sections: [(heading, html)]
    html_table(headers, rows) -> str
"""

from __future__ import annotations

import html
import math
from collections.abc import Mapping, Sequence

__all__ = ["PALETTE", "bar_chart", "html_table", "line_chart", "nice_ticks", "page"]

PALETTE = ("#1f77b4", "#d62728", "#2ca02c", "#ff7f0e", "#9467bd", "#8c564b", "#e377c2", "#17becf")
WIDTH, HEIGHT = 720, 260
MARGIN_L, MARGIN_R, MARGIN_T, MARGIN_B = 64, 150, 30, 40
MAX_POINTS = 2000


def _e(s: object) -> str:
    # every text in a report may come from a device: controls and bidi overrides are shown, not obeyed
    from sre_core.textsafe import neutralise

    return html.escape(neutralise(s), quote=True)


def _fmt(v: float) -> str:
    if v == 0:
        return "0"
    a = abs(v)
    if a >= 10_000 or a < 0.001:
        return f"{v:.2g}"
    if a >= 100:
        return f"{v:.0f}"
    if a >= 1:
        return f"{v:.3g}"
    return f"{v:.3g}"


def nice_ticks(lo: float, hi: float, n: int = 5) -> list[float]:
    """About ``n`` round tick values covering [lo, hi]."""
    if not (math.isfinite(lo) and math.isfinite(hi)):
        return [0.0]
    if hi <= lo:
        hi = lo + (abs(lo) or 1.0)
    raw = (hi - lo) / max(n, 1)
    mag = 10 ** math.floor(math.log10(raw))
    step = next(m * mag for m in (1, 2, 2.5, 5, 10) if m * mag >= raw)
    start = math.floor(lo / step) * step
    ticks = []
    v = start
    for _ in range(50):  # up to the first tick at or above hi, so the axis covers every value
        ticks.append(round(v, 12))
        if v >= hi - step * 1e-9:
            break
        v += step
    return ticks


def _thin(points: Sequence[tuple[float, float]]) -> list[tuple[float, float]]:
    pts = [(float(x), float(y)) for x, y in points if math.isfinite(x) and math.isfinite(y)]
    if len(pts) <= MAX_POINTS:
        return pts
    stride = math.ceil(len(pts) / MAX_POINTS)
    return pts[::stride]


def _frame(title: str, y_label: str, x_label: str) -> list[str]:
    return [
        f'<svg class="plot" xmlns="http://www.w3.org/2000/svg" viewBox="0 0 {WIDTH} {HEIGHT}" '
        f'width="{WIDTH}" height="{HEIGHT}" role="img" aria-label="{_e(title)}">',
        f"<title>{_e(title)}</title>",
        f'<rect x="0" y="0" width="{WIDTH}" height="{HEIGHT}" fill="#fff"/>',
        f'<text x="{MARGIN_L}" y="18" font-size="13" font-weight="bold">{_e(title)}</text>',
        f'<text x="14" y="{MARGIN_T + (HEIGHT - MARGIN_T - MARGIN_B) / 2:.0f}" font-size="11" '
        f'transform="rotate(-90 14 {MARGIN_T + (HEIGHT - MARGIN_T - MARGIN_B) / 2:.0f})" '
        f'text-anchor="middle">{_e(y_label)}</text>',
        f'<text x="{MARGIN_L + (WIDTH - MARGIN_L - MARGIN_R) / 2:.0f}" y="{HEIGHT - 6}" font-size="11" '
        f'text-anchor="middle">{_e(x_label)}</text>',
    ]


def _empty(parts: list[str], msg: str = "no data") -> str:
    parts.append(
        f'<text x="{WIDTH / 2:.0f}" y="{HEIGHT / 2:.0f}" font-size="12" fill="#888" '
        f'text-anchor="middle">{_e(msg)}</text></svg>'
    )
    return "".join(parts)


def line_chart(
    series: Mapping[str, Sequence[tuple[float, float]]],
    title: str,
    y_label: str = "",
    x_label: str = "seconds since start",
    step: bool = False,
) -> str:
    """One line per series (x, y points); ``step`` draws a staircase (weights, counts)."""
    parts = _frame(title, y_label, x_label)
    data = {name: _thin(pts) for name, pts in series.items()}
    data = {k: v for k, v in data.items() if v}
    if not data:
        return _empty(parts)
    xs = [x for pts in data.values() for x, _ in pts]
    ys = [y for pts in data.values() for _, y in pts]
    x0, x1 = min(xs), max(xs)
    y0, y1 = min(0.0, *ys), max(ys)
    if x1 <= x0:
        x1 = x0 + 1.0
    yt = nice_ticks(y0, y1 if y1 > y0 else y0 + 1.0)
    y0, y1 = min(yt[0], y0), max(yt[-1], y1)
    pw, ph = WIDTH - MARGIN_L - MARGIN_R, HEIGHT - MARGIN_T - MARGIN_B

    def px(x: float) -> float:
        return MARGIN_L + (x - x0) / (x1 - x0) * pw

    def py(y: float) -> float:
        return MARGIN_T + ph - (y - y0) / ((y1 - y0) or 1.0) * ph

    parts.append('<g class="axes" stroke="#ccc" stroke-width="1" font-size="10" fill="#444">')
    for t in yt:
        parts.append(f'<line x1="{MARGIN_L}" x2="{MARGIN_L + pw}" y1="{py(t):.1f}" y2="{py(t):.1f}"/>')
        parts.append(
            f'<text x="{MARGIN_L - 4}" y="{py(t) + 3:.1f}" text-anchor="end" stroke="none">{_fmt(t)}</text>'
        )
    for t in nice_ticks(x0, x1, 6):
        if x0 <= t <= x1:
            parts.append(
                f'<text x="{px(t):.1f}" y="{MARGIN_T + ph + 14}" text-anchor="middle" stroke="none">'
                f"{_fmt(t)}</text>"
            )
    parts.append(
        f'<line x1="{MARGIN_L}" x2="{MARGIN_L}" y1="{MARGIN_T}" y2="{MARGIN_T + ph}" stroke="#888"/>'
        f'<line x1="{MARGIN_L}" x2="{MARGIN_L + pw}" y1="{MARGIN_T + ph}" y2="{MARGIN_T + ph}" '
        'stroke="#888"/>'
        "</g>"
    )
    for i, (name, raw) in enumerate(sorted(data.items())):
        color = PALETTE[i % len(PALETTE)]
        pts = sorted(raw)
        d: list[str] = []
        for j, (x, y) in enumerate(pts):
            if j == 0:
                d.append(f"M{px(x):.1f},{py(y):.1f}")
            elif step:
                d.append(f"H{px(x):.1f}V{py(y):.1f}")
            else:
                d.append(f"L{px(x):.1f},{py(y):.1f}")
        parts.append(
            f'<path class="mark" d="{"".join(d)}" fill="none" stroke="{color}" stroke-width="2">'
            f"<title>{_e(name)}</title></path>"
        )
        if len(pts) <= 60:
            for x, y in pts:
                parts.append(
                    f'<circle class="mark" cx="{px(x):.1f}" cy="{py(y):.1f}" r="2.5" fill="{color}">'
                    f"<title>{_e(name)}: {_fmt(y)} at {_fmt(x)}</title></circle>"
                )
        ly = MARGIN_T + 6 + i * 16
        parts.append(
            f'<rect x="{WIDTH - MARGIN_R + 10}" y="{ly - 8}" width="10" height="10" fill="{color}"/>'
            f'<text x="{WIDTH - MARGIN_R + 24}" y="{ly + 1}" font-size="10">{_e(name[:26])}</text>'
        )
    parts.append("</svg>")
    return "".join(parts)


def bar_chart(bars: Sequence[tuple[str, float, str | None]], title: str, y_label: str = "") -> str:
    """Vertical bars: (label, value, color or None)."""
    parts = _frame(title, y_label, "")
    bars = [(lbl, float(v), c) for lbl, v, c in bars if math.isfinite(float(v))][:40]
    if not bars:
        return _empty(parts)
    hi = max(0.0, *(v for _, v, _ in bars))
    yt = nice_ticks(0.0, hi if hi > 0 else 1.0)
    top = yt[-1]
    pw, ph = WIDTH - MARGIN_L - MARGIN_R, HEIGHT - MARGIN_T - MARGIN_B
    bw = pw / len(bars)
    parts.append('<g class="axes" stroke="#ccc" font-size="10" fill="#444">')
    for t in yt:
        y = MARGIN_T + ph - t / top * ph
        parts.append(f'<line x1="{MARGIN_L}" x2="{MARGIN_L + pw}" y1="{y:.1f}" y2="{y:.1f}"/>')
        parts.append(
            f'<text x="{MARGIN_L - 4}" y="{y + 3:.1f}" text-anchor="end" stroke="none">{_fmt(t)}</text>'
        )
    parts.append("</g>")
    for i, (label, v, color) in enumerate(bars):
        h = v / top * ph if top else 0.0
        x = MARGIN_L + i * bw + bw * 0.15
        parts.append(
            f'<rect class="mark" x="{x:.1f}" y="{MARGIN_T + ph - h:.1f}" width="{bw * 0.7:.1f}" '
            f'height="{max(h, 0.5):.1f}" fill="{color or PALETTE[i % len(PALETTE)]}">'
            f"<title>{_e(label)}: {_fmt(v)}</title></rect>"
            f'<text x="{x + bw * 0.35:.1f}" y="{MARGIN_T + ph + 14}" font-size="10" '
            f'text-anchor="middle">{_e(label[:18])}</text>'
        )
    parts.append("</svg>")
    return "".join(parts)


def html_table(headers: Sequence[str], rows: Sequence[Sequence[object]]) -> str:
    """A plain HTML table (every cell escaped)."""
    if not rows:
        return '<p class="empty">none</p>'
    head = "".join(f"<th>{_e(h)}</th>" for h in headers)
    body = "".join("<tr>" + "".join(f"<td>{_e(c)}</td>" for c in r) + "</tr>" for r in rows)
    return f"<table><thead><tr>{head}</tr></thead><tbody>{body}</tbody></table>"


_CSS = """
body{font-family:system-ui,-apple-system,Segoe UI,Helvetica,Arial,sans-serif;margin:24px;color:#222;
background:#f6f7f9}
h1{font-size:22px;margin:0 0 4px}h2{font-size:16px;margin:24px 0 8px;border-bottom:1px solid #ddd}
.sub{color:#666;font-size:13px;margin-bottom:12px}
section{background:#fff;border:1px solid #e3e5e8;border-radius:6px;padding:10px 16px;margin-bottom:14px}
table{border-collapse:collapse;font-size:12px;margin:6px 0}
td,th{border:1px solid #ddd;padding:3px 8px;text-align:left;vertical-align:top}
th{background:#f0f2f4}.empty{color:#888;font-size:12px}
.ok{color:#2ca02c;font-weight:bold}.bad{color:#d62728;font-weight:bold}
svg.plot{display:block;margin:6px 0;max-width:100%;height:auto}
"""


def page(title: str, sections: Sequence[tuple[str, str]], subtitle: str = "") -> str:
    """A self-contained HTML document: inline CSS and SVG only, nothing fetched."""
    body = "".join(f"<section><h2>{_e(h)}</h2>{content}</section>" for h, content in sections)
    return (
        '<!DOCTYPE html><html lang="en"><head><meta charset="utf-8">'
        f"<title>{_e(title)}</title><style>{_CSS}</style></head><body>"
        f'<h1>{_e(title)}</h1><div class="sub">{_e(subtitle)}</div>{body}</body></html>'
    )
