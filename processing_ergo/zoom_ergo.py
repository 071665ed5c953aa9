"""ERGO's zoom decision: what stage 2 sees, given stage 1's text. A pure function of the sample, the text and the
settings (no tokenizer, no model), so inference, the OpenAI-compatible client, SFT and the GRPO rollout decide alike.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Protocol

from PIL import Image

from .geometry_ergo import (
    IMAGE_FACTOR,
    MIN_PIXELS,
    Box,
    crop_region,
    crop_size,
    map_box_to_original,
    parse_zoom_box,
    resize_to_budget,
    within_aspect_limit,
)
from .prompts_ergo import extract_answer


class ZoomSample(Protocol):
    """What the decision reads from a request (``processing_ergo.ErgoSample``)."""

    image: Image.Image

    @property
    def scale(self) -> tuple[float, float]:
        """Original pixels per box unit, per axis (``geometry_ergo.box_scale``)."""
        ...


@dataclass
class ZoomDecision:
    """What stage 1 led to for one sample: the region (original pixels) and the second image, or why not."""

    region: Box | None
    image: Image.Image | None
    fallback: str | None = None
    """None when the region was used; else ``no_region`` (nothing parsable), ``truncated`` (nothing parsable, and
    stage 1 ran out of tokens), ``degenerate_box``, or ``answered``
    (stage 1 already answered without a region and early exit is on: no stage 2)."""
    processor_size: dict = field(default_factory=dict)
    """``size`` for the image processor so that the already-sized second image is not resized again."""


def decide_zoom(
    sample: ZoomSample,
    stage1_text: str,
    *,
    crop_max_pixels: int,
    fallback: str,
    reference_size: dict,
    truncated: bool = False,
    skip_answered: bool = False,
    factor: int = IMAGE_FACTOR,
) -> ZoomDecision:
    """The region ``stage1_text`` asks for, mapped to the original image and cropped within ``crop_max_pixels``;
    else the ``fallback`` policy's second image (``reference_size``: the image processor's own ``size``, which the
    ``reference`` policy keeps). ``truncated``: stage 1 ran out of tokens, so a missing region is reported as such.
    ``skip_answered``: a complete ``<answer>…</answer>`` without a region ends there (early exit). ``factor``: the
    family's pixels per vision-token side, which crop sizes are multiples of."""
    box = parse_zoom_box(stage1_text)
    if box is not None:
        region = map_box_to_original(box, *sample.scale, sample.image.width, sample.image.height)
        size = crop_size(region, crop_max_pixels, factor) if region is not None else None
        if size is not None:
            crop = crop_region(sample.image, region, size)
            return ZoomDecision(region, crop, None, keep_size(crop))
    if skip_answered and box is None and extract_answer(stage1_text) and "</answer>" in stage1_text:
        return ZoomDecision(None, None, "answered")
    reason = "degenerate_box" if box is not None else "truncated" if truncated else "no_region"
    if fallback == "coarse":
        return ZoomDecision(None, None, reason)
    if fallback == "reference" and within_aspect_limit(*sample.image.size):
        return ZoomDecision(None, sample.image, reason, dict(reference_size))
    whole = resize_to_budget(sample.image, crop_max_pixels, resample=Image.Resampling.LANCZOS, factor=factor)
    return ZoomDecision(None, whole, reason, keep_size(whole))


def size_up_to(max_pixels: int) -> dict:
    """The image processor's ``size`` for images of at most ``max_pixels``: an image already sized (28-aligned, within
    budget) keeps its size, a larger one is resized under the budget by the processor's own rule."""
    return {"shortest_edge": MIN_PIXELS, "longest_edge": max(max_pixels, MIN_PIXELS)}


def keep_size(image: Image.Image) -> dict:
    """The image processor's ``size`` that keeps an already-sized ``image`` as it is."""
    return size_up_to(image.width * image.height)


__all__ = ["ZoomDecision", "decide_zoom", "keep_size", "size_up_to"]
