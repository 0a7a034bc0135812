"""Charts as SVG geometry, computed here and drawn by the templates: stacked bars with an optional
line, a y axis with round ticks. No JavaScript library; the page stays readable without scripts."""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass

PAD_LEFT, PAD_RIGHT, PAD_TOP, PAD_BOTTOM = 44, 8, 8, 22


@dataclass(frozen=True)
class Bar:
    x: float
    y: float
    width: float
    height: float
    css: str
    title: str


@dataclass(frozen=True)
class Tick:
    y: float
    label: str


@dataclass(frozen=True)
class Label:
    x: float
    text: str


@dataclass(frozen=True)
class Chart:
    width: int
    height: int
    bars: list[Bar]
    line: str
    """SVG polyline points of the line series; empty when there is none."""
    line_title: str
    ticks: list[Tick]
    labels: list[Label]
    legend: list[tuple[str, str]]
    """(css class, name) of each series, in drawing order."""
    empty: bool


def nice_ceiling(value: float) -> float:
    """The smallest of 1, 2, 5 x 10^k at or above ``value`` (1 for nothing), so ticks read as round numbers."""
    if value <= 1:
        return 1.0
    exponent = math.floor(math.log10(value))
    for step in (1, 2, 5, 10):
        candidate = step * 10.0**exponent
        if candidate >= value:
            return float(candidate)
    return 10.0 ** (exponent + 1)  # pragma: no cover - the loop always returns


def _number(value: float) -> str:
    return f"{value:g}" if value < 1e6 else f"{value / 1e6:g}M"


def stacked_bars(
    columns: Sequence[tuple[str, Mapping[str, float]]],
    stacks: Sequence[tuple[str, str, str]],
    *,
    line: tuple[str, str] | None = None,
    width: int = 1200,
    height: int = 220,
    label_every: int = 10,
) -> Chart:
    """``columns``: (label, values) left to right; ``stacks``: (key, css class, name) drawn bottom up;
    ``line``: (key, name) drawn over the bars. Negative or missing values count as 0."""
    plot_w, plot_h = width - PAD_LEFT - PAD_RIGHT, height - PAD_TOP - PAD_BOTTOM
    count = max(1, len(columns))
    slot = plot_w / count
    gap = min(2.0, slot * 0.2)
    peak = 0.0
    for _, values in columns:
        total = sum(max(0.0, float(values.get(key, 0) or 0)) for key, _, _ in stacks)
        peak = max(peak, total, max(0.0, float(values.get(line[0], 0) or 0)) if line else 0.0)
    top = nice_ceiling(peak)
    scale = plot_h / top
    bars: list[Bar] = []
    points: list[str] = []
    labels: list[Label] = []
    for i, (label, values) in enumerate(columns):
        x = PAD_LEFT + i * slot
        base = float(PAD_TOP + plot_h)
        for key, css, name in stacks:
            value = max(0.0, float(values.get(key, 0) or 0))
            if value <= 0:
                continue
            h = min(max(1.0, value * scale), base - PAD_TOP)  # at least a pixel: a small count stays visible
            if h <= 0:
                continue
            base -= h
            bars.append(Bar(round(x + gap / 2, 2), round(base, 2), round(max(0.5, slot - gap), 2), round(h, 2), css, f"{label}: {_number(value)} {name}"))
        if line:
            value = max(0.0, float(values.get(line[0], 0) or 0))
            points.append(f"{x + slot / 2:.2f},{PAD_TOP + plot_h - value * scale:.2f}")
        if label_every and i % label_every == 0:
            labels.append(Label(round(x, 2), label))
    ticks = [Tick(round(PAD_TOP + plot_h - fraction * plot_h, 2), _number(top * fraction)) for fraction in (0.0, 0.5, 1.0)]
    legend = [(css, name) for _, css, name in stacks] + ([("line", line[1])] if line else [])
    return Chart(width, height, bars, " ".join(points), line[1] if line else "", ticks, labels, legend, peak == 0)
