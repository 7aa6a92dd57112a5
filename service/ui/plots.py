"""The run page's figures and the latent page's histogram as inline SVG, drawn here so that
each point or bar is a link to the latents behind it (no image files, no script).

Every string that comes from the store goes through `escape`; the markup is then marked safe
for the templates.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from html import escape

from markupsafe import Markup

WIDTH, HEIGHT = 420, 300
LEFT, RIGHT, TOP, BOTTOM = 52, 12, 14, 40
COLORS = ("#1b9e77", "#d95f02", "#7570b3", "#e7298a")


@dataclass
class Point:
    x: float
    y: float
    color: int  # index into COLORS
    href: str
    title: str


@dataclass
class Bar:
    label: str
    value: float
    href: str
    title: str


def _scale(
    low: float, high: float, start: float, end: float, log: bool = False
) -> Callable[[float], float]:
    if log:
        low, high = math.log10(low), math.log10(high)
    span = (high - low) or 1.0

    def place(value: float) -> float:
        value = math.log10(value) if log else value
        return start + (value - low) / span * (end - start)

    return place


def _ticks(low: float, high: float, log: bool) -> list[float]:
    if log:
        return [
            10.0**e for e in range(math.floor(math.log10(low)), math.ceil(math.log10(high)) + 1)
        ]
    step = (high - low) / 4 or 1.0
    return [low + step * i for i in range(5)]


def _frame(title: str, x_label: str, y_label: str, body: list[str]) -> Markup:
    parts = [
        f'<svg class="plot" viewBox="0 0 {WIDTH} {HEIGHT}" width="{WIDTH}" height="{HEIGHT}" '
        f'role="img" aria-label="{escape(title)}">',
        f"<title>{escape(title)}</title>",
        f'<text x="{WIDTH / 2}" y="{HEIGHT - 6}" text-anchor="middle">{escape(x_label)}</text>',
        f'<text transform="translate(12 {HEIGHT / 2}) rotate(-90)" text-anchor="middle">'
        f"{escape(y_label)}</text>",
        *body,
        "</svg>",
    ]
    return Markup("".join(parts))


def scatter(
    title: str,
    x_label: str,
    y_label: str,
    points: Sequence[Point],
    legend: Sequence[str],
    log_x: bool = False,
) -> Markup:
    """A scatter plot whose points link to their latents; `legend[i]` names COLORS[i]."""
    xs = [p.x for p in points if math.isfinite(p.x) and (p.x > 0 or not log_x)]
    ys = [p.y for p in points if math.isfinite(p.y)]
    if not xs or not ys:
        return Markup('<p class="empty">nothing to plot</p>')
    x_low, x_high = min(xs), max(xs)
    y_low, y_high = min(ys), max(ys)
    if log_x:
        x_low, x_high = 10 ** math.floor(math.log10(x_low)), 10 ** math.ceil(math.log10(x_high))
    place_x = _scale(x_low, x_high, LEFT, WIDTH - RIGHT, log_x)
    place_y = _scale(y_low, y_high, HEIGHT - BOTTOM, TOP)
    body = [
        f'<line class="axis" x1="{LEFT}" y1="{HEIGHT - BOTTOM}" x2="{WIDTH - RIGHT}" '
        f'y2="{HEIGHT - BOTTOM}"/>',
        f'<line class="axis" x1="{LEFT}" y1="{TOP}" x2="{LEFT}" y2="{HEIGHT - BOTTOM}"/>',
    ]
    for tick in _ticks(x_low, x_high, log_x):
        label = f"{tick:.0e}" if log_x else f"{tick:.2g}"
        body.append(
            f'<text class="tick" x="{place_x(tick):.1f}" y="{HEIGHT - BOTTOM + 14}" '
            f'text-anchor="middle">{label}</text>'
        )
    for tick in _ticks(y_low, y_high, False):
        body.append(
            f'<text class="tick" x="{LEFT - 4}" y="{place_y(tick) + 4:.1f}" '
            f'text-anchor="end">{tick:.2g}</text>'
        )
    for point in points:
        if not (math.isfinite(point.x) and math.isfinite(point.y)) or (log_x and point.x <= 0):
            continue
        body.append(
            f'<a href="{escape(point.href)}"><circle cx="{place_x(point.x):.1f}" '
            f'cy="{place_y(point.y):.1f}" r="2.5" fill="{COLORS[point.color]}">'
            f"<title>{escape(point.title)}</title></circle></a>"
        )
    for i, name in enumerate(legend):
        body.append(
            f'<circle cx="{LEFT + 10}" cy="{TOP + 8 + 14 * i}" r="4" fill="{COLORS[i]}"/>'
            f'<text class="tick" x="{LEFT + 18}" y="{TOP + 12 + 14 * i}">{escape(name)}</text>'
        )
    return _frame(title, x_label, y_label, body)


def bars(title: str, x_label: str, y_label: str, items: Sequence[Bar]) -> Markup:
    """Vertical bars from zero, each a link; empty input draws nothing."""
    if not items:
        return Markup('<p class="empty">nothing to plot</p>')
    high = max(max(item.value for item in items), 1e-12)
    place_y = _scale(0.0, high, HEIGHT - BOTTOM, TOP)
    slot = (WIDTH - LEFT - RIGHT) / len(items)
    body = [
        f'<line class="axis" x1="{LEFT}" y1="{HEIGHT - BOTTOM}" x2="{WIDTH - RIGHT}" '
        f'y2="{HEIGHT - BOTTOM}"/>',
        f'<text class="tick" x="{LEFT - 4}" y="{TOP + 4}" text-anchor="end">{high:.3g}</text>',
        f'<text class="tick" x="{LEFT - 4}" y="{HEIGHT - BOTTOM}" text-anchor="end">0</text>',
    ]
    for i, item in enumerate(items):
        x = LEFT + slot * i + slot * 0.1
        y = place_y(item.value)
        body.append(
            f'<a href="{escape(item.href)}"><rect x="{x:.1f}" y="{y:.1f}" width="{slot * 0.8:.1f}" '
            f'height="{HEIGHT - BOTTOM - y:.1f}" fill="{COLORS[0]}">'
            f"<title>{escape(item.title)}</title></rect></a>"
            f'<text class="tick" x="{x + slot * 0.4:.1f}" y="{HEIGHT - BOTTOM + 14}" '
            f'text-anchor="middle">{escape(item.label)}</text>'
        )
    return _frame(title, x_label, y_label, body)
