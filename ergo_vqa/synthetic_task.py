"""A synthetic high-resolution VQA task on which the ERGO effect can be measured offline.

Each image (1344x1344 by default) holds a shaded backdrop, muted clutter and 3-6 labelled shapes, one per cell of
a 4x4 grid, each carrying a 12 px seven-segment digit on a white label. One shape, the target, has a saturated
colour; the others are muted. The question names the target by its colour and asks for its digit, with the ten
digits as options:

* the coarse view at 144 vision tokens shrinks the image 4x and leaves the digit a 3 px smudge (unreadable), while
  the target's grid cell cropped at native resolution (``region``, 336x336 px, 144 tokens) shows it as drawn;
* the target stays easy to find in the coarse view (the one saturated thing in the scene), so stage 1 can point
  at it: the paper's "reasoning-driven perception". ``gt_bbox`` is the target's own box.

Learnability aids for a from-scratch model this small, deliberate: digits sit inside one cell of the 14 px patch
grid; the backdrop shades from left to right and top to bottom (Qwen2.5-VL's vision tower has no absolute position
embedding); the options are the digits in order. Everything is drawn with Pillow primitives (no fonts), so a seed
gives the same pixels on every machine. Splits are written in the training schema (``training/data.py``) that
``ergo eval --dataset synthetic`` also reads.

The ``context`` variant (``generate_sample(seed, variant="context")``) asks about a target the coarse view cannot
show, found only through its context: every cell of the grid without a landmark holds one tag (the same white label
and digit), 3-5 landmarks (the shapes above, without labels) stand in the other cells, one saturated and the rest
muted, and the question names the tag by its relation to the saturated landmark ("What number is written on the tag
to the right of the blue circle?"). At 144 vision tokens every tag is the same 4x5 px light dot with a 3 px smudge
in it, so the target cannot be told from the 10-12 other tags; the landmark is plain to see, and the relation picks
one of its 2-4 tagged neighbours. ``region`` is the target tag's cell (it holds no other tag), ``gt_bbox`` the tag's
label. Same options and answer format as the original variant, so one model answers both.
"""

from __future__ import annotations

import json
import os
import random
from concurrent.futures import ProcessPoolExecutor
from dataclasses import dataclass
from functools import partial
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw

COLORS = {
    "red": (215, 35, 35), "blue": (30, 70, 215), "green": (25, 150, 50),
    "yellow": (240, 205, 20), "purple": (135, 45, 175), "orange": (245, 125, 15),
}
SHAPES = ("square", "circle", "diamond")
# Segments a-g of a seven-segment digit: top, upper right, lower right, bottom, lower left, upper left, middle.
SEGMENTS = {
    "0": "abcdef", "1": "bc", "2": "abged", "3": "abgcd", "4": "fgbc",
    "5": "afgcd", "6": "afgedc", "7": "abc", "8": "abcdefg", "9": "abcdfg",
}
QUESTION = "What number is written on the {color} {shape}?"
CONTEXT_QUESTION = "What number is written on the tag {relation} the {color} {shape}?"
RELATIONS = {"to the right of": (0, 1), "to the left of": (0, -1), "above": (-1, 0), "below": (1, 0)}
"""The contextual variant's relations: (row, column) step from the landmark's grid cell to the target tag's."""
VARIANTS = ("original", "context")
VARIANT_FOLDERS = {"original": ".", "context": "context"}
"""Where ``write_splits`` puts each variant's split files under a data root (``ergo eval --data-root`` reads both)."""
OPTIONS = [f"({chr(65 + digit)}) {digit}" for digit in range(10)]
"""Every question offers the ten digits in order, (A) 0 to (J) 9: answering is reading, not option matching."""
SPLITS = {"train": 1000, "validation": 100, "test": 200}


@dataclass(frozen=True)
class SceneSpec:
    """Geometry of a scene; the defaults are what the demo model was trained on."""

    size: int = 1344
    grid: int = 4
    shapes: tuple[int, int] = (3, 6)
    shape_side: tuple[int, int] = (64, 100)
    digit_height: int = 12
    patch: int = 14
    """Digits sit inside one cell of Qwen2.5-VL's 14 px patch grid, so each digit always meets the vision tower as
    the same pixels: a model this small, trained from scratch on a CPU, then learns to read them in minutes."""
    clutter: int = 140
    landmarks: tuple[int, int] = (3, 5)
    """Contextual variant: landmarks per scene, the named one included."""
    label_margin: int = 5
    """White border around a digit, pixels: a label is (7 + 2 * 5) x (12 + 2 * 5) = 17 x 22 px."""

    @property
    def cell(self) -> int:
        return self.size // self.grid


@dataclass
class SyntheticSample:
    image: Image.Image
    question: str
    options: list[str]
    answer: str
    gt_bbox: list[int]
    """The target shape's box, original pixels."""
    region: list[int]
    """The grid cell holding the target, original pixels: the region the warm-up teaches stage 1 to zoom on."""
    digit: str
    color: str
    variant: str = "original"
    landmark: list[int] | None = None
    """Contextual variant: the named landmark's box, original pixels."""


def generate_sample(seed: int | str, spec: SceneSpec = SceneSpec(), variant: str = "original") -> SyntheticSample:
    """One scene and its question, fully determined by ``seed`` and ``variant`` (``VARIANTS``)."""
    if variant == "context":
        return _context_sample(seed, spec)
    if variant != "original":
        raise ValueError(f"variant must be one of {VARIANTS}, got {variant!r}")
    rng = random.Random(seed)
    image = _backdrop(spec.size)
    draw = ImageDraw.Draw(image)
    for _ in range(spec.clutter):
        _draw_clutter(draw, rng, spec.size)
    count = rng.randint(*spec.shapes)
    cells = rng.sample(range(spec.grid * spec.grid), count)
    digits = rng.sample(sorted(SEGMENTS), count)
    color = rng.choice(sorted(COLORS))
    shapes = [rng.choice(SHAPES) for _ in range(count)]
    boxes = []
    for index, (cell, digit, shape) in enumerate(zip(cells, digits, shapes)):
        side = rng.randint(*spec.shape_side)
        row, column = divmod(cell, spec.grid)
        margin = 8
        x = column * spec.cell + rng.randint(margin, spec.cell - side - margin)
        y = row * spec.cell + rng.randint(margin, spec.cell - side - margin)
        boxes.append([x, y, x + side, y + side])
        _draw_shape(draw, shape, boxes[-1], COLORS[color] if index == 0 else _muted(rng))
        _draw_label(draw, digit, boxes[-1], spec.digit_height, spec.patch, spec.label_margin)
    return SyntheticSample(image, QUESTION.format(color=color, shape=shapes[0]), list(OPTIONS),
                           chr(65 + int(digits[0])), boxes[0], _cell_box(cells[0], spec), digits[0], color)


def _context_sample(seed: int | str, spec: SceneSpec) -> SyntheticSample:
    """The contextual variant's scene (module docstring): landmarks in some cells, one tag in each other cell, the
    question naming the tag by a relation to the one saturated landmark."""
    rng = random.Random(f"context/{seed}")  # not the original variant's stream: other clutter for the same seed
    image = _backdrop(spec.size)
    draw = ImageDraw.Draw(image)
    for _ in range(spec.clutter):
        _draw_clutter(draw, rng, spec.size)
    cells = spec.grid * spec.grid
    while True:  # the named landmark needs a tagged neighbour; redrawn (rarely) until it has one
        landmarks = rng.sample(range(cells), rng.randint(*spec.landmarks))
        row, column = divmod(landmarks[0], spec.grid)
        relations = {relation: (row + step_row) * spec.grid + column + step_column
                     for relation, (step_row, step_column) in RELATIONS.items()
                     if 0 <= row + step_row < spec.grid and 0 <= column + step_column < spec.grid}
        relations = {relation: cell for relation, cell in relations.items() if cell not in landmarks}
        if relations:
            break
    relation = rng.choice(sorted(relations))
    color, shape = rng.choice(sorted(COLORS)), rng.choice(SHAPES)
    landmark_boxes = []
    for index, cell in enumerate(landmarks):
        landmark_boxes.append(_place(rng, cell, rng.randint(*spec.shape_side), spec))
        _draw_shape(draw, shape if index == 0 else rng.choice(SHAPES), landmark_boxes[-1],
                    COLORS[color] if index == 0 else _muted(rng))
    labels = {}
    for cell in sorted(set(range(cells)) - set(landmarks)):
        digit = rng.choice(sorted(SEGMENTS))
        labels[cell] = (digit, _draw_label(draw, digit, _place(rng, cell, 2 * spec.patch, spec), spec.digit_height,
                                           spec.patch, spec.label_margin))
    digit, label = labels[relations[relation]]
    return SyntheticSample(image, CONTEXT_QUESTION.format(relation=relation, color=color, shape=shape),
                           list(OPTIONS), chr(65 + int(digit)), label, _cell_box(relations[relation], spec), digit,
                           color, "context", landmark_boxes[0])


def _place(rng: random.Random, cell: int, side: int, spec: SceneSpec) -> list[int]:
    """A ``side`` x ``side`` box at a random place inside grid cell ``cell``, 8 px from its edges."""
    row, column = divmod(cell, spec.grid)
    x = column * spec.cell + rng.randint(8, spec.cell - side - 8)
    y = row * spec.cell + rng.randint(8, spec.cell - side - 8)
    return [x, y, x + side, y + side]


def _cell_box(cell: int, spec: SceneSpec) -> list[int]:
    row, column = divmod(cell, spec.grid)
    return [column * spec.cell, row * spec.cell, (column + 1) * spec.cell, (row + 1) * spec.cell]


def write_split(root: str | Path, split: str, count: int, seed: int = 0, spec: SceneSpec = SceneSpec(),
                variant: str = "original") -> Path:
    """``<root>/<split>.jsonl`` and ``<root>/<split>/<index>.png``; rows in the training schema plus ``region``,
    ``id`` and ``category`` (the target colour; the contextual variant: the landmark's), and for the contextual
    variant ``variant`` and ``landmark`` (its box). Sample ``i`` of a split is
    ``generate_sample(f"{seed}/{split}/{i}", spec, variant)``, so the split is the same however many processes draw
    it: large splits are drawn on every core (drawing and PNG encoding take minutes for the recipe's splits)."""
    root = Path(root)
    (root / split).mkdir(parents=True, exist_ok=True)
    draw = partial(_write_sample, root, split, seed, spec, variant)
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1
    if count < PARALLEL_SPLIT_SIZE or cores == 1:
        rows = [draw(index) for index in range(count)]
    else:
        with ProcessPoolExecutor(cores) as pool:
            rows = list(pool.map(draw, range(count), chunksize=16))
    path = root / f"{split}.jsonl"
    path.write_text("".join(json.dumps(row) + "\n" for row in rows))
    return path


PARALLEL_SPLIT_SIZE = 64
"""Splits this large are drawn by a process per core; smaller ones in this process (starting processes would cost
more)."""


def _write_sample(root: Path, split: str, seed: int, spec: SceneSpec, variant: str, index: int) -> dict:
    """Sample ``index`` of a split: its image written under ``root``, its row returned."""
    sample = generate_sample(f"{seed}/{split}/{index}", spec, variant)
    image_path = f"{split}/{index:05d}.png"
    sample.image.save(root / image_path, compress_level=3)
    row = {"id": f"{split}-{index:05d}", "image": image_path, "question": sample.question, "options": sample.options,
           "answer": sample.answer, "gt_bbox": sample.gt_bbox, "region": sample.region, "category": sample.color}
    if variant == "context":  # the original variant's rows stay as they were
        row |= {"variant": variant, "landmark": sample.landmark}
    return row


def split_path(root: str | Path, split: str, variant: str = "original") -> Path:
    """Where ``write_splits(root, ..., variant=variant)`` writes ``split``'s rows."""
    return Path(root) / VARIANT_FOLDERS[variant] / f"{split}.jsonl"


def write_splits(root: str | Path, counts: dict[str, int] = SPLITS, seed: int = 0,
                 variant: str = "original") -> dict[str, Path]:
    """Each split of ``counts`` under ``root`` (the contextual variant in its ``VARIANT_FOLDERS`` folder)."""
    folder = split_path(root, "", variant).parent
    return {split: write_split(folder, split, count, seed, variant=variant) for split, count in counts.items()}


def _backdrop(size: int) -> Image.Image:
    """Warm on the left to cool on the right, light at the top to dark at the bottom."""
    ramp = np.linspace(0.0, 1.0, size, dtype=np.float32)
    x, y = ramp[None, :], ramp[:, None]
    pixels = np.stack([
        np.broadcast_to(200 - 70 * x, (size, size)),
        np.broadcast_to(205 - 75 * y, (size, size)),
        150 + 40 * x + 30 * (1 - y),
    ], axis=-1)
    return Image.fromarray(pixels.round().astype(np.uint8), "RGB")


def _muted(rng: random.Random) -> tuple[int, int, int]:
    """A low-saturation colour: never one of the target colours."""
    grey = rng.randint(60, 200)
    return tuple(min(255, max(0, grey + rng.randint(-18, 18))) for _ in range(3))


def _draw_clutter(draw: ImageDraw.ImageDraw, rng: random.Random, size: int) -> None:
    """A muted rectangle, ellipse or line."""
    color = _muted(rng)
    x, y = rng.randrange(size), rng.randrange(size)
    w, h = rng.randint(8, 70), rng.randint(8, 70)
    kind = rng.random()
    if kind < 0.4:
        draw.rectangle((x, y, x + w, y + h), fill=color)
    elif kind < 0.8:
        draw.ellipse((x, y, x + w, y + h), fill=color)
    else:
        draw.line((x, y, x + rng.randint(-120, 120), y + rng.randint(-120, 120)), fill=color, width=rng.randint(2, 6))


def _draw_shape(draw: ImageDraw.ImageDraw, shape: str, box: list[int], color: tuple[int, int, int]) -> None:
    """Fills pixels x1 <= x < x2, y1 <= y < y2 only (Pillow's boxes include their far edge)."""
    x1, y1, x2, y2 = box[0], box[1], box[2] - 1, box[3] - 1
    if shape == "square":
        draw.rectangle((x1, y1, x2, y2), fill=color)
    elif shape == "circle":
        draw.ellipse((x1, y1, x2, y2), fill=color)
    else:
        cx, cy = (x1 + x2) / 2, (y1 + y2) / 2
        draw.polygon([(cx, y1), (x2, cy), (cx, y2), (x1, cy)], fill=color)


def _draw_label(draw: ImageDraw.ImageDraw, digit: str, box: list[int], height: int, patch: int,
                margin: int) -> list[int]:
    """A white label with a black seven-segment digit, near the box's centre, the digit inside one patch cell.
    Returns the label's box (pixels x1 <= x < x2, y1 <= y < y2)."""
    width, stroke = height * 7 // 12, max(2, height // 6)
    cx, cy = (box[0] + box[2]) // 2, (box[1] + box[3]) // 2
    left = cx // patch * patch + (patch - width) // 2
    top = cy // patch * patch + (patch - height) // 2
    label = [left - margin, top - margin, left + width + margin, top + height + margin]
    draw.rectangle((label[0], label[1], label[2] - 1, label[3] - 1), fill=(255, 255, 255))
    half = height // 2
    spans = {
        "a": (left, top, left + width, top + stroke), "d": (left, top + height - stroke, left + width, top + height),
        "g": (left, top + half - stroke // 2, left + width, top + half + (stroke + 1) // 2),
        "f": (left, top, left + stroke, top + half), "b": (left + width - stroke, top, left + width, top + half),
        "e": (left, top + half, left + stroke, top + height),
        "c": (left + width - stroke, top + half, left + width, top + height),
    }
    for segment in SEGMENTS[digit]:
        x1, y1, x2, y2 = spans[segment]
        draw.rectangle((x1, y1, x2 - 1, y2 - 1), fill=(0, 0, 0))
    return label
