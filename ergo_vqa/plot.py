"""The evaluation's plot: accuracy against mean vision tokens, one labelled point per summary, drawn with Pillow only.

Apart from the evaluator so that scoring runs need no drawing code and the label placement can be tested alone.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path

from PIL import Image, ImageDraw, ImageFont


@dataclass
class PlotLabel:
    """A point's label: its text and the box it is drawn in, placed clear of the other labels and points."""

    text: str
    box: tuple[int, int, int, int]
    point: tuple[float, float]


@dataclass
class PlotLayout:
    size: tuple[int, int]
    area: tuple[int, int, int, int]
    """The axes' box; points and their labels stay inside it."""
    labels: list[PlotLabel]
    texts: list[tuple[str, tuple[int, int, int, int]]]
    """Titles and tick labels, with their boxes."""
    ticks: list[tuple[str, float]]
    """Grid lines: ``x`` or ``y`` and the pixel position."""


PLOT_COLORS = ("#d62728", "#1f77b4", "#2ca02c", "#9467bd", "#ff7f0e", "#8c564b", "#e377c2", "#17becf")
PLOT_MARKERS = {"ergo": "circle", "full": "square", "coarse": "triangle"}
_MARKER_RADIUS = 6


def plot(summaries: list[dict], path: str | Path) -> Path:
    """Accuracy against mean vision tokens (log scale), one point per summary, labelled "<benchmark> <mode>
    <budget>"; colour per benchmark, marker per mode (circle ergo, square full, triangle coarse). A PNG, Pillow only."""
    layout = plot_layout(summaries)
    font = _plot_font()
    image = Image.new("RGB", layout.size, "white")
    draw = ImageDraw.Draw(image)
    left, top, right, bottom = layout.area
    for axis, position in layout.ticks:
        line = [(position, top), (position, bottom)] if axis == "x" else [(left, position), (right, position)]
        draw.line(line, fill="#e6e6e6")
    draw.rectangle(layout.area, outline="black")
    for text, box in layout.texts:
        _draw_text(draw, box, text, font, "black")
    colors = _benchmark_colors(summaries)
    plotted = list(zip(layout.labels, _plotted(summaries)))
    for label, summary in plotted:
        x, y = label.point
        nearest = (min(max(x, label.box[0]), label.box[2]), min(max(y, label.box[1]), label.box[3]))
        if math.dist((x, y), nearest) > _MARKER_RADIUS + 12:  # placed away from its point: a leader line
            draw.line([(x, y), nearest], fill="#888888")
        _marker(draw, x, y, PLOT_MARKERS.get(summary["mode"], "circle"), colors[summary["benchmark"]])
    for label, summary in plotted:  # labels last, on white, so no line or marker crosses them
        draw.rectangle(label.box, fill="white")
        _draw_text(draw, label.box, label.text, font, colors[summary["benchmark"]])
    image.save(path)
    return Path(path)


def plot_layout(summaries: list[dict], size: tuple[int, int] = (960, 600)) -> PlotLayout:
    """Where everything goes. Each label takes the first place, nearest first, around its point that is inside
    the axes and clear of every point and earlier label (then drawn with a leader line); when none is, the place
    overlapping least."""
    font = _plot_font()
    width, height = size
    area = (80, 50, width - 30, height - 70)
    left, top, right, bottom = area
    points = _plotted(summaries)
    tokens = [max(s["mean_vision_tokens"], 1.0) for s in points] or [256.0, 16384.0]
    low, high = math.floor(math.log2(min(tokens))), math.ceil(math.log2(max(tokens)))
    low, high = (low - 1, high + 1) if high - low < 2 else (low, high)
    margin = 24  # pixels kept free inside the axes, so edge points leave room for their labels

    def x_of(value: float) -> float:
        return left + margin + (math.log2(max(value, 1.0)) - low) / (high - low) * (right - left - 2 * margin)

    def y_of(accuracy: float) -> float:
        return bottom - margin - accuracy * (bottom - top - 2 * margin)

    texts, ticks = [], []
    step = max(1, math.ceil((high - low) / 8))
    for power in range(low, high + 1, step):
        x = x_of(2 ** power)
        ticks.append(("x", x))
        texts.append(_text_box(_tokens_text(2 ** power), font, x, bottom + 6, "top"))
    for percent in range(0, 101, 20):
        y = y_of(percent / 100)
        ticks.append(("y", y))
        texts.append(_text_box(f"{percent}%", font, left - 8, y, "right"))
    texts.append(_text_box("mean vision tokens per sample (log scale)", font, (left + right) / 2, bottom + 30, "top"))
    texts.append(_text_box("accuracy (failures counted wrong)", font, left, top - 10, "bottom-left"))

    centers = [(x_of(max(s["mean_vision_tokens"], 1.0)), y_of(s["accuracy"])) for s in points]
    obstacles = [(x - _MARKER_RADIUS - 2, y - _MARKER_RADIUS - 2, x + _MARKER_RADIUS + 2, y + _MARKER_RADIUS + 2)
                 for x, y in centers]
    labels = []
    for s, (x, y) in zip(points, centers):
        text = f"{s['benchmark']} {s['mode']} {s['budget']}"
        ink = font.getbbox(text)
        w, h = ink[2] - ink[0] + 4, ink[3] - ink[1] + 4  # 2 pixels of white around the text
        candidates = []
        for distance in (_MARKER_RADIUS + 4, 18, 30, 46, 66, 90, 120):
            for dx, dy in ((1, 0), (-1, 0), (0, -1), (0, 1), (1, -1), (1, 1), (-1, -1), (-1, 1)):
                bx = x + dx * distance + (0 if dx > 0 else -w if dx < 0 else -w / 2)
                by = y + dy * distance + (0 if dy > 0 else -h if dy < 0 else -h / 2)
                box = (round(bx), round(by), round(bx) + w, round(by) + h)
                if left < box[0] and box[2] < right and top < box[1] and box[3] < bottom:
                    candidates.append(box)
        overlap = [sum(_overlap(box, other) for other in obstacles + [label.box for label in labels])
                   for box in candidates]
        best = candidates[overlap.index(min(overlap))] if candidates else (left + 1, top + 1, left + 1 + w, top + 1 + h)
        labels.append(PlotLabel(text, best, (x, y)))
    return PlotLayout(size, area, labels, texts, ticks)


def _plotted(summaries: list[dict]) -> list[dict]:
    return [s for s in summaries if s["mean_vision_tokens"] is not None and s["accuracy"] is not None]


def _plot_font() -> ImageFont.ImageFont | ImageFont.FreeTypeFont:
    return ImageFont.load_default(size=15)


def _benchmark_colors(summaries: list[dict]) -> dict[str, str]:
    names = list(dict.fromkeys(s["benchmark"] for s in summaries))
    return {name: PLOT_COLORS[index % len(PLOT_COLORS)] for index, name in enumerate(names)}


def _tokens_text(value: int) -> str:
    return f"{value // 1024}k" if value >= 1024 and value % 1024 == 0 else str(value)


def _text_box(text: str, font, x: float, y: float, anchor: str) -> tuple[str, tuple[int, int, int, int]]:
    """``text``'s box placed by one of its sides: centred under ``(x, y)`` ("top"), right-aligned and vertically
    centred ("right") or above and to the right ("bottom-left")."""
    ink = font.getbbox(text)
    w, h = ink[2] - ink[0], ink[3] - ink[1]
    x0, y0 = {"top": (x - w / 2, y), "right": (x - w, y - h / 2), "bottom-left": (x, y - h)}[anchor]
    return text, (round(x0), round(y0), round(x0) + w, round(y0) + h)


def _draw_text(draw: ImageDraw.ImageDraw, box, text: str, font, fill: str) -> None:
    """``text``'s ink centred in ``box`` (``font.getbbox`` measures ink from the drawing origin, not from 0, 0)."""
    ink = font.getbbox(text)
    x = box[0] + (box[2] - box[0] - (ink[2] - ink[0])) / 2 - ink[0]
    y = box[1] + (box[3] - box[1] - (ink[3] - ink[1])) / 2 - ink[1]
    draw.text((x, y), text, fill=fill, font=font)


def _marker(draw: ImageDraw.ImageDraw, x: float, y: float, shape: str, color: str) -> None:
    r = _MARKER_RADIUS
    if shape == "square":
        draw.rectangle([x - r + 1, y - r + 1, x + r - 1, y + r - 1], fill=color, outline="black")
    elif shape == "triangle":
        draw.polygon([(x, y - r), (x - r, y + r - 1), (x + r, y + r - 1)], fill=color, outline="black")
    else:
        draw.ellipse([x - r, y - r, x + r, y + r], fill=color, outline="black")


def _overlap(a: tuple[int, int, int, int], b: tuple[int, int, int, int]) -> int:
    return max(0, min(a[2], b[2]) - max(a[0], b[0])) * max(0, min(a[3], b[3]) - max(a[1], b[1]))
