"""ERGO geometry: pixel budgets, the coarse resize, zoom-box parsing, mapping to the original image, cropping.

Everything here follows the reference implementation (nota-github/ERGO, ``src/ergo/utils.py``) rule for rule,
because the released ERGO weights were trained and evaluated with exactly these coordinate frames:

* sizes are rounded to multiples of 28 with Python's ``round`` (not ``floor``), so an image may land slightly
  over its budget;
* the model's box is in the coarse image's pixels; it is scaled to the original per axis, clamped, truncated;
* the crop keeps native resolution and is only resized to a multiple of 28 (LANCZOS), down when over budget.

Other families (``family_ergo.py``) run the same rules with their own ``factor`` (32 px for Qwen3-VL and Qwen3.5)
and, for boxes relative to the image on a 0-1000 scale, a scale of ``original / 1000`` per axis
(``box_scale``); every function here defaults to Qwen2.5-VL's 28.

Deliberate departures, each only where the reference would crash:

* ``smart_resize`` never returns a side of 0 (the reference's over-budget branch can, for very flat images):
  such images get one token row and as many columns as the budget allows;
* a box that is empty after clamping, or whose crop would exceed Qwen2.5-VL's 200:1 aspect limit, is
  reported as degenerate (``None``) instead of raising inside PIL or the image processor.
"""

from __future__ import annotations

import math
import re

from PIL import Image

from .family_ergo import RELATIVE_SCALE

IMAGE_FACTOR = 28
"""Pixels per vision-token side: Qwen2.5-VL's 14-px patches merged 2x2 (``Family.factor`` for the others)."""
PIXELS_PER_TOKEN = IMAGE_FACTOR * IMAGE_FACTOR
MIN_PIXELS = 4 * PIXELS_PER_TOKEN
"""The reference's lower bound: at least 4 vision tokens."""
MAX_ASPECT_RATIO = 200
"""Qwen2.5-VL's image processor refuses images flatter than this."""
INFERENCE_BUDGET = 1280
"""Default vision-token budget of the coarse view for inference (``ErgoProcessor``, Hub folders): what the released
ERGO code's inference, demo and evaluation use."""
PAPER_BUDGET = 640
"""The paper's headline operating point (V*: 81.7 with 1,025 vision tokens): the default of ``ergo eval``, training
and the speed benchmark."""

Box = tuple[int, int, int, int]

_ZOOM_BLOCK = re.compile(r"<zoom>(.*?)</zoom>", re.DOTALL)
_WHOLE_BOX = re.compile(r"^\s*\[\d+,\s*\d+,\s*\d+,\s*\d+\]\s*$")
_ANY_BOX = re.compile(r"\[\d+,\s*\d+,\s*\d+,\s*\d+\]")


def budget_to_pixels(tokens: int, factor: int = IMAGE_FACTOR) -> int:
    """A vision-token budget as a pixel count (one token per ``factor`` x ``factor`` px)."""
    if not isinstance(tokens, int) or isinstance(tokens, bool) or tokens < 4:
        raise ValueError(f"a vision-token budget must be an integer >= 4, got {tokens!r}")
    return tokens * factor * factor


def min_pixels_for(factor: int) -> int:
    """The reference's lower bound, 4 vision tokens, in pixels of a family with this ``factor``."""
    return 4 * factor * factor


def vision_tokens(width: int, height: int, factor: int = IMAGE_FACTOR) -> int:
    """LLM vision tokens spent on an image already sized to multiples of ``factor``."""
    return (width // factor) * (height // factor)


def smart_resize(
    height: int,
    width: int,
    factor: int = IMAGE_FACTOR,
    min_pixels: int | None = None,
    max_pixels: int = INFERENCE_BUDGET * PIXELS_PER_TOKEN,
) -> tuple[int, int]:
    """ERGO's round-based ``smart_resize``: (height, width) as multiples of ``factor`` near the pixel budget.

    Unlike Qwen's own version it rounds (not floors) when shrinking and has no aspect-ratio check, which is what
    the reference does and what fixes the coarse frame the released model predicts boxes in.
    """
    if height <= 0 or width <= 0:
        raise ValueError(f"cannot resize an empty image ({width}x{height})")
    min_pixels = min_pixels_for(factor) if min_pixels is None else min_pixels
    h_bar = max(factor, round(height / factor) * factor)
    w_bar = max(factor, round(width / factor) * factor)
    if h_bar * w_bar > max_pixels:
        beta = math.sqrt(height * width / max_pixels)
        h_bar = round(height / beta / factor) * factor
        w_bar = round(width / beta / factor) * factor
        if min(h_bar, w_bar) < factor:
            # Departure: the reference returns a 0 side here (very flat images). Keep one token row and as many
            # columns as the budget allows instead.
            budget_side = max(factor, max_pixels // factor // factor * factor)
            longest = min(round(max(height, width) / factor) * factor, budget_side)
            h_bar, w_bar = (longest, factor) if height >= width else (factor, longest)
    elif h_bar * w_bar < min_pixels:
        beta = math.sqrt(min_pixels / (height * width))
        h_bar = math.ceil(height * beta / factor) * factor
        w_bar = math.ceil(width * beta / factor) * factor
    return h_bar, w_bar


def within_aspect_limit(width: int, height: int) -> bool:
    """Whether Qwen2.5-VL's image processor accepts an image of this size."""
    return max(width, height) / min(width, height) <= MAX_ASPECT_RATIO


def resize_to_budget(
    image: Image.Image, max_pixels: int, resample: int = Image.Resampling.BICUBIC, factor: int = IMAGE_FACTOR
) -> Image.Image:
    """The image resized to ERGO's ``smart_resize`` size (BICUBIC: the reference's coarse view)."""
    height, width = smart_resize(image.height, image.width, factor, max_pixels=max_pixels)
    return image.resize((width, height), resample)


def parse_zoom_box(text: str) -> Box | None:
    """The box of the first ``<zoom>[x1, y1, x2, y2]</zoom>`` block, or None (reference rules).

    Only non-negative integers count; floats, negatives, JSON objects, a space before a comma and two or more
    boxes in the block all give None. Box order (x1 < x2) is not checked here; see ``map_box_to_original``.
    """
    if not isinstance(text, str):
        return None
    block = _ZOOM_BLOCK.search(text)
    if block is None:
        return None
    content = block.group(1)
    if _WHOLE_BOX.match(content):
        candidates = [content]
    else:
        candidates = _ANY_BOX.findall(content)
        if len(candidates) != 1:
            return None
    numbers = [int(value) for value in candidates[0].strip().strip("[]").split(",")]
    return numbers[0], numbers[1], numbers[2], numbers[3]


def box_scale(original: tuple[int, int], coarse: tuple[int, int], grounding: str = "absolute") -> tuple[float, float]:
    """Original pixels per box unit, per axis: per coarse-view pixel for ``absolute`` boxes (the reference's
    ``width_scale``, ``height_scale``), per thousandth of the image for ``relative`` ones."""
    frame = coarse if grounding == "absolute" else (RELATIVE_SCALE, RELATIVE_SCALE)
    return original[0] / frame[0], original[1] / frame[1]


def map_box_to_original(
    box: Box, scale_x: float, scale_y: float, width: int, height: int
) -> Box | None:
    """A box in original pixels (``box_scale``'s scale): scaled per axis, clamped to the image, truncated.

    Returns None for a degenerate box (empty or inverted once clamped), which the reference does not guard.
    """
    x1, y1, x2, y2 = box[0] * scale_x, box[1] * scale_y, box[2] * scale_x, box[3] * scale_y
    x1, x2 = (int(min(max(x, 0), width)) for x in (x1, x2))
    y1, y2 = (int(min(max(y, 0), height)) for y in (y1, y2))
    if x2 <= x1 or y2 <= y1:
        return None
    return x1, y1, x2, y2


def crop_size(region: Box, max_pixels: int, factor: int = IMAGE_FACTOR) -> tuple[int, int] | None:
    """(width, height) the crop of ``region`` is resized to, or None when the image processor could not take it."""
    region_w, region_h = region[2] - region[0], region[3] - region[1]
    # The reference passes (w, h) into an (h, w) function; harmless since smart_resize is symmetric.
    new_w, new_h = smart_resize(region_w, region_h, factor, max_pixels=max_pixels)
    if not within_aspect_limit(new_w, new_h):
        return None
    return new_w, new_h


def crop_region(image: Image.Image, region: Box, size: tuple[int, int]) -> Image.Image:
    """The region cut from the full-resolution image at native scale, resized (LANCZOS) to ``size``."""
    return image.crop(region).resize(size, Image.Resampling.LANCZOS)
