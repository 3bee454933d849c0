"""Charts drawn on the server as inline SVG: no script, no inline style, readable without colour.

Every chart carries a <title> and a <desc>, its axes carry labels, and every plotted point a
<title> with its reading (shown on hover, read by screen readers) and data-x / data-y
attributes with the exact values (what the browser tests compare with the stored ones). Colours
are presentation attributes (fill, stroke), which a strict Content-Security-Policy allows;
series differ by dash pattern as well as by colour.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from html import escape

from django.utils.safestring import SafeString, mark_safe

Formatter = Callable[[float], str]

# Dash patterns and colours of successive series (colour-blind safe, distinct in grey).
DASHES = ("", "6 3", "2 3", "8 3 2 3", "1 2")
COLOURS = ("#205493", "#b35900", "#2e7d32", "#6a1b9a", "#555555")
FONT = 'font-family="sans-serif" font-size="11"'
# More series than this go without a legend: each line's <title> names it.
LEGEND_MAX = 5
BAR_MAX = 24.0


@dataclass(frozen=True)
class Series:
    """One line of a chart: a label and its points (x, y), x ascending."""

    label: str
    points: Sequence[tuple[float, float]]


def _attr(text: str) -> str:
    return escape(text, quote=True)


def _number(value: float) -> str:
    """Coordinates with two decimals at most: shorter markup, no visible difference."""
    return f"{value:.2f}".rstrip("0").rstrip(".")


def _data(value: float) -> str:
    return repr(value) if isinstance(value, float) and not value.is_integer() else str(int(value))


def scale(value: float, low: float, high: float, start: float, end: float) -> float:
    """Map value from [low, high] onto [start, end]; a flat range maps to the middle."""
    if high == low:
        return (start + end) / 2
    return start + (value - low) * (end - start) / (high - low)


def _bounds(values: Sequence[float], include_zero: bool) -> tuple[float, float]:
    low, high = min(values), max(values)
    if include_zero:
        low, high = min(low, 0.0), max(high, 0.0)
    return low, high


def _empty(title: str, width: int, height: int, message: str) -> SafeString:
    return mark_safe(
        f'<svg xmlns="http://www.w3.org/2000/svg" class="leakguard-chart" role="img" '
        f'width="{width}" height="{height}" viewBox="0 0 {width} {height}">'
        f"<title>{_attr(title)}</title>"
        f'<text x="{width / 2:g}" y="{height / 2:g}" text-anchor="middle" {FONT} '
        f'fill="#555555">{_attr(message)}</text></svg>'
    )


def sparkline(
    values: Sequence[float], title: str, *, width: int = 120, height: int = 24
) -> SafeString:
    """A small line of values over equal steps, with a zero line when values change sign."""
    if not values:
        return _empty(title, width, height, "no data")
    low, high = _bounds(values, include_zero=True)
    pad = 2.0
    last = max(len(values) - 1, 1)
    coords = [
        (
            scale(index, 0, last, pad, width - pad),
            scale(value, low, high, height - pad, pad),
        )
        for index, value in enumerate(values)
    ]
    path = " ".join(f"{_number(x)},{_number(y)}" for x, y in coords)
    zero = scale(0, low, high, height - pad, pad)
    return mark_safe(
        f'<svg xmlns="http://www.w3.org/2000/svg" class="leakguard-sparkline" role="img" '
        f'width="{width}" height="{height}" viewBox="0 0 {width} {height}" '
        f'data-values="{" ".join(_data(value) for value in values)}">'
        f"<title>{_attr(title)}</title>"
        f'<line x1="0" x2="{width}" y1="{_number(zero)}" y2="{_number(zero)}" '
        f'stroke="#bbbbbb" stroke-width="1"/>'
        f'<polyline points="{path}" fill="none" stroke="{COLOURS[0]}" stroke-width="1.5"/>'
        f"</svg>"
    )


def line_chart(
    title: str,
    series: Sequence[Series],
    *,
    x_format: Formatter,
    y_format: Formatter,
    description: str = "",
    bars: bool = False,
    include_zero: bool = True,
    width: int = 640,
    height: int = 220,
) -> SafeString:
    """A chart of one or more series with labelled axes; bars draws the first series as bars.

    Axes are labelled at their ends (x_format, y_format turn values into text). The y range
    includes zero unless include_zero is False (levels such as RSS, where zero would flatten
    the changes that matter): growth and shrinkage then read the right way round.
    """
    points = [point for line in series for point in line.points]
    if not points:
        return _empty(title, width, height, "No readings in this window.")
    legend = 1 < len(series) <= LEGEND_MAX
    left, right, top, bottom = 78.0, 180.0 if legend else 16.0, 12.0, 34.0
    x_low, x_high = _bounds([x for x, _ in points], include_zero=False)
    y_low, y_high = _bounds([y for _, y in points], include_zero=include_zero)

    def at(x: float, y: float) -> tuple[float, float]:
        return (
            scale(x, x_low, x_high, left, width - right),
            scale(y, y_low, y_high, height - bottom, top),
        )

    parts = [
        f'<svg xmlns="http://www.w3.org/2000/svg" class="leakguard-chart" role="img" '
        f'width="{width}" height="{height}" viewBox="0 0 {width} {height}">',
        f"<title>{_attr(title)}</title><desc>{_attr(description or title)}</desc>",
    ]
    x0, zero = at(x_low, min(max(0, y_low), y_high))
    x1, _ = at(x_high, 0)
    parts.append(
        f'<line x1="{_number(x0)}" x2="{_number(x1)}" y1="{_number(zero)}" '
        f'y2="{_number(zero)}" stroke="#888888" stroke-width="1"/>'
        f'<line x1="{left:g}" x2="{left:g}" y1="{top:g}" y2="{height - bottom:g}" '
        f'stroke="#888888" stroke-width="1"/>'
    )
    for value, anchor_y in ((y_high, top + 4), (y_low, height - bottom)):
        parts.append(
            f'<text x="{left - 4:g}" y="{anchor_y:g}" text-anchor="end" {FONT} '
            f'fill="#333333">{_attr(y_format(value))}</text>'
        )
    if y_low < 0 < y_high:
        parts.append(
            f'<text x="{left - 4:g}" y="{_number(zero + 4)}" text-anchor="end" {FONT} '
            f'fill="#333333">{_attr(y_format(0))}</text>'
        )
    ends = ((x_low, "start"), (x_high, "end")) if x_high > x_low else ((x_low, "middle"),)
    for value, anchor in ends:
        x, _ = at(value, 0)
        parts.append(
            f'<text x="{_number(x)}" y="{height - bottom + 16:g}" text-anchor="{anchor}" '
            f'{FONT} fill="#333333">{_attr(x_format(value))}</text>'
        )
    step = (width - left - right) / max(len({x for x, _ in points}), 1)
    for index, line in enumerate(series):
        colour = COLOURS[index % len(COLOURS)]
        dash = DASHES[index % len(DASHES)]
        parts.append(f'<g class="leakguard-series" data-label="{_attr(line.label)}">')
        parts.append(f"<title>{_attr(line.label)}</title>")
        coords = [at(x, y) for x, y in line.points]
        if bars and index == 0:
            bar = min(max(step * 0.8, 1.0), BAR_MAX)
            for (x, y), (cx, cy) in zip(line.points, coords, strict=True):
                y_top, y_end = sorted((cy, zero))
                parts.append(
                    f'<rect x="{_number(cx - bar / 2)}" y="{_number(y_top)}" '
                    f'width="{_number(bar)}" height="{_number(max(y_end - y_top, 0.5))}" '
                    f'fill="{colour}" data-x="{_data(x)}" data-y="{_data(y)}">'
                    f"<title>{_attr(x_format(x))}: {_attr(y_format(y))}</title></rect>"
                )
        else:
            path = " ".join(f"{_number(cx)},{_number(cy)}" for cx, cy in coords)
            dash_attr = f' stroke-dasharray="{dash}"' if dash else ""
            parts.append(
                f'<polyline points="{path}" fill="none" stroke="{colour}" '
                f'stroke-width="1.5"{dash_attr}/>'
            )
            for (x, y), (cx, cy) in zip(line.points, coords, strict=True):
                parts.append(
                    f'<circle cx="{_number(cx)}" cy="{_number(cy)}" r="2.5" fill="{colour}" '
                    f'data-x="{_data(x)}" data-y="{_data(y)}">'
                    f"<title>{_attr(line.label)}, {_attr(x_format(x))}: "
                    f"{_attr(y_format(y))}</title></circle>"
                )
        parts.append("</g>")
    if legend:
        parts.extend(_legend(series, width - right + 12))
    parts.append("</svg>")
    return mark_safe("".join(parts))


def _legend(series: Sequence[Series], left: float) -> list[str]:
    """A sample of each series' line and its label, right of the plot, one row each."""
    parts = ['<g class="leakguard-legend">']
    for index, line in enumerate(series):
        y = 14 + 14 * index
        dash = DASHES[index % len(DASHES)]
        dash_attr = f' stroke-dasharray="{dash}"' if dash else ""
        parts.append(
            f'<line x1="{left:g}" x2="{left + 24:g}" y1="{y - 4}" y2="{y - 4}" '
            f'stroke="{COLOURS[index % len(COLOURS)]}" stroke-width="2"{dash_attr}/>'
            f'<text x="{left + 30:g}" y="{y}" {FONT} fill="#333333">{_attr(line.label)}</text>'
        )
    parts.append("</g>")
    return parts
