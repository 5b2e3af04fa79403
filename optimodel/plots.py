"""Small inline SVG charts for the HTML report: no plotting library, no network.

Each function returns one `<svg>` element as text, sized for a report column.
"""

from __future__ import annotations

import html
from collections.abc import Sequence

WIDTH, ROW, PAD_LEFT, PAD_RIGHT = 640, 34, 170, 30
COLORS = ["#4C78A8", "#F58518", "#54A24B", "#E45756", "#72B7B2", "#B279A2"]


def _esc(text: object) -> str:
    return html.escape(str(text))


def _scale(value: float, low: float, high: float, width: float) -> float:
    return 0.0 if high <= low else (value - low) / (high - low) * width


def _axis(low: float, high: float, y: float, unit: str) -> str:
    plot = WIDTH - PAD_LEFT - PAD_RIGHT
    parts = [f'<line x1="{PAD_LEFT}" y1="{y}" x2="{WIDTH - PAD_RIGHT}" y2="{y}" stroke="#888"/>']
    for i in range(5):
        value = low + (high - low) * i / 4
        x = PAD_LEFT + plot * i / 4
        parts.append(
            f'<text x="{x:.1f}" y="{y + 14}" font-size="10" text-anchor="middle">'
            f"{value:.3g}{_esc(unit)}</text>"
        )
    return "".join(parts)


def latency_boxes(title: str, series: Sequence[tuple[str, Sequence[float]]]) -> str:
    """Box plots from 21 percentiles (0, 5, ..., 100) per stage: whiskers p5..p95."""
    rows = [(label, list(p)) for label, p in series if p and len(p) == 21]
    if not rows:
        return ""
    low = min(p[1] for _, p in rows)
    high = max(p[19] for _, p in rows)
    if high <= low:
        high = low + 1e-6
    plot = WIDTH - PAD_LEFT - PAD_RIGHT
    height = 30 + ROW * len(rows) + 30
    parts = [_open(title, height)]
    for i, (label, p) in enumerate(rows):
        y = 30 + ROW * i + ROW / 2
        x = {q: PAD_LEFT + _scale(p[q], low, high, plot) for q in (1, 5, 10, 15, 19)}
        color = COLORS[i % len(COLORS)]
        parts.append(
            f'<text x="{PAD_LEFT - 8}" y="{y + 4}" font-size="12" text-anchor="end">'
            f"{_esc(label)}</text>"
            f'<line x1="{x[1]:.1f}" y1="{y}" x2="{x[19]:.1f}" y2="{y}" stroke="{color}"/>'
            f'<rect x="{x[5]:.1f}" y="{y - 9}" width="{max(x[15] - x[5], 1):.1f}" height="18" '
            f'fill="{color}" fill-opacity="0.35" stroke="{color}"/>'
            f'<line x1="{x[10]:.1f}" y1="{y - 9}" x2="{x[10]:.1f}" y2="{y + 9}" '
            f'stroke="{color}" stroke-width="2"/>'
        )
    parts.append(_axis(low, high, 30 + ROW * len(rows) + 4, " ms"))
    parts.append("</svg>")
    return "".join(parts)


def bars(title: str, items: Sequence[tuple[str, float]], unit: str = "") -> str:
    """Horizontal bars, e.g. model bytes per stage."""
    items = [(label, float(v)) for label, v in items if v is not None]
    if not items:
        return ""
    high = max(v for _, v in items) or 1.0
    plot = WIDTH - PAD_LEFT - PAD_RIGHT
    height = 30 + ROW * len(items) + 10
    parts = [_open(title, height)]
    for i, (label, value) in enumerate(items):
        y = 30 + ROW * i
        width = _scale(value, 0, high, plot)
        parts.append(
            f'<text x="{PAD_LEFT - 8}" y="{y + ROW / 2 + 4}" font-size="12" text-anchor="end">'
            f"{_esc(label)}</text>"
            f'<rect x="{PAD_LEFT}" y="{y + 6}" width="{max(width, 1):.1f}" height="{ROW - 12}" '
            f'fill="{COLORS[i % len(COLORS)]}"/>'
            f'<text x="{PAD_LEFT + width + 4:.1f}" y="{y + ROW / 2 + 4}" font-size="11">'
            f"{value:,.0f}{_esc(unit)}</text>"
        )
    parts.append("</svg>")
    return "".join(parts)


def scatter(
    title: str, points: Sequence[tuple[str, float, float]], x_label: str, y_label: str
) -> str:
    """Labelled points, e.g. accuracy (or cosine) against latency for every variant."""
    points = [
        (label, float(x), float(y)) for label, x, y in points if x is not None and y is not None
    ]
    if not points:
        return ""
    xs, ys = [p[1] for p in points], [p[2] for p in points]
    x_low, x_high = min(xs) * 0.9, max(xs) * 1.1 or 1.0
    y_span = (max(ys) - min(ys)) or abs(max(ys)) * 0.01 or 1.0
    y_low, y_high = min(ys) - 0.1 * y_span, max(ys) + 0.1 * y_span
    left, top, width, height = 70, 30, WIDTH - 100, 220
    parts = [_open(title, top + height + 50)]
    parts.append(
        f'<rect x="{left}" y="{top}" width="{width}" height="{height}" fill="none" '
        f'stroke="#888"/>'
        f'<text x="{left + width / 2}" y="{top + height + 36}" font-size="11" '
        f'text-anchor="middle">{_esc(x_label)}</text>'
        f'<text x="14" y="{top + height / 2}" font-size="11" '
        f'transform="rotate(-90 14 {top + height / 2})" text-anchor="middle">'
        f"{_esc(y_label)}</text>"
        f'<text x="{left}" y="{top + height + 16}" font-size="10">{x_low:.3g}</text>'
        f'<text x="{left + width}" y="{top + height + 16}" font-size="10" '
        f'text-anchor="end">{x_high:.3g}</text>'
        f'<text x="{left - 4}" y="{top + height}" font-size="10" text-anchor="end">'
        f"{y_low:.4g}</text>"
        f'<text x="{left - 4}" y="{top + 10}" font-size="10" text-anchor="end">{y_high:.4g}</text>'
    )
    for i, (label, x, y) in enumerate(points):
        cx = left + _scale(x, x_low, x_high, width)
        cy = top + height - _scale(y, y_low, y_high, height)
        color = COLORS[i % len(COLORS)]
        parts.append(
            f'<circle cx="{cx:.1f}" cy="{cy:.1f}" r="5" fill="{color}"/>'
            f'<text x="{cx + 8:.1f}" y="{cy - 6:.1f}" font-size="11">{_esc(label)}</text>'
        )
    parts.append("</svg>")
    return "".join(parts)


def _open(title: str, height: float) -> str:
    return (
        f'<svg xmlns="http://www.w3.org/2000/svg" class="plot" width="{WIDTH}" '
        f'height="{height:.0f}" role="img" aria-label="{_esc(title)}">'
        f"<title>{_esc(title)}</title>"
        f'<text x="8" y="18" font-size="13" font-weight="bold">{_esc(title)}</text>'
    )
