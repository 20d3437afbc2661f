"""Small hand-written inline SVG charts: the report stays one self-contained file with no plotting dependency."""

from __future__ import annotations

from html import escape

W, H, PAD = 420, 240, 40
COLORS = ("#1f77b4", "#d62728", "#2ca02c", "#9467bd", "#ff7f0e", "#8c564b", "#e377c2", "#17becf")


def _scale(v, lo, hi, a, b):
    return a + (b - a) * ((v - lo) / (hi - lo) if hi > lo else 0.5)


def _frame(kind: str, title: str, body: list[str], xlabel: str, ylabel: str, lo_hi: tuple) -> str:
    (x0, x1), (y0, y1) = lo_hi
    axes = [
        f'<line x1="{PAD}" y1="{H - PAD}" x2="{W - 10}" y2="{H - PAD}" stroke="#333"/>',
        f'<line x1="{PAD}" y1="20" x2="{PAD}" y2="{H - PAD}" stroke="#333"/>',
        f'<text x="{W / 2}" y="{H - 8}" text-anchor="middle" font-size="11">{escape(xlabel)} [{x0:.3g}, {x1:.3g}]</text>',
        f'<text x="10" y="{H / 2}" font-size="11" transform="rotate(-90 10 {H / 2})" text-anchor="middle">{escape(ylabel)} [{y0:.3g}, {y1:.3g}]</text>',
        f'<text x="{W / 2}" y="14" text-anchor="middle" font-size="12" font-weight="bold">{escape(title)}</text>',
    ]
    return (f'<svg xmlns="http://www.w3.org/2000/svg" class="plot" data-plot="{kind}" data-title="{escape(title)}" '
            f'width="{W}" height="{H}" viewBox="0 0 {W} {H}">' + "".join(axes + body) + "</svg>")


def line_chart(kind: str, title: str, series: dict[str, list[tuple[float, float]]], xlabel: str, ylabel: str,
               diagonal: bool = False) -> str:
    pts = [p for s in series.values() for p in s if p[1] is not None]
    if diagonal:
        pts += [(0.0, 0.0), (1.0, 1.0)]
    xs, ys = [p[0] for p in pts] or [0, 1], [p[1] for p in pts] or [0, 1]
    lo_hi = ((min(xs), max(xs)), (min(ys), max(ys)))
    X = lambda x: _scale(x, *lo_hi[0], PAD, W - 10)  # noqa: E731
    Y = lambda y: _scale(y, *lo_hi[1], H - PAD, 20)  # noqa: E731
    body = []
    if diagonal:
        body.append(f'<line x1="{X(0)}" y1="{Y(0)}" x2="{X(1)}" y2="{Y(1)}" stroke="#aaa" stroke-dasharray="4"/>')
    for k, (name, s) in enumerate(series.items()):
        c = COLORS[k % len(COLORS)]
        s = [p for p in s if p[1] is not None]
        body.append(f'<polyline class="series" data-series="{escape(name)}" fill="none" stroke="{c}" stroke-width="2" '
                    f'points="{" ".join(f"{X(x):.1f},{Y(y):.1f}" for x, y in s)}"/>')
        body += [f'<circle cx="{X(x):.1f}" cy="{Y(y):.1f}" r="2.5" fill="{c}"/>' for x, y in s]
        body.append(f'<text x="{W - 12}" y="{32 + 13 * k}" text-anchor="end" font-size="10" fill="{c}">{escape(name)}</text>')
    return _frame(kind, title, body, xlabel, ylabel, lo_hi)


def histogram(kind: str, title: str, counts: list[int], lo: float, hi: float, xlabel: str) -> str:
    top = max(counts) if counts and max(counts) > 0 else 1
    bw = (W - 10 - PAD) / max(len(counts), 1)
    body = [f'<rect class="bar" x="{PAD + i * bw:.1f}" y="{_scale(c, 0, top, H - PAD, 20):.1f}" width="{bw - 1:.1f}" '
            f'height="{_scale(c, 0, top, 0, H - PAD - 20):.1f}" fill="{COLORS[0]}" data-count="{c}"/>' for i, c in enumerate(counts)]
    return _frame(kind, title, body, xlabel, "count", ((lo, hi), (0, top)))
