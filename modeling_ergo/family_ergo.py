"""The model families ERGO runs on, and everything that differs between them, in one place.

ERGO's method is backbone-agnostic: the two-stage loop (``generation_ergo.py``), the prompts, the geometry and the
processor read what is specific to a family from its ``Family`` here, and nothing else names a family. Each entry
was checked against the transformers source of both ends of the supported range (``compat_ergo.py``):

* **Qwen2.5-VL** (``qwen2_5_vl``): 14-px patches merged 2x2 (28 px per LLM vision token); boxes in absolute pixels
  of the image the model saw (the released ERGO weights and the reference depend on it); a KV cache only.
* **Qwen3-VL** (``qwen3_vl``): 16-px patches merged 2x2 (32 px); boxes relative to the image on a 0-1000 scale;
  a KV cache only; its vision tower also returns DeepStack features (``get_image_features``'s
  ``deepstack_features``), which generation feeds to the first decoder layers beside the image tokens.
* **Qwen3.5** (``qwen3_5``): Qwen3-VL's geometry and grounding without DeepStack; its language model interleaves
  gated-DeltaNet linear attention with full attention, so its cache holds recurrent states beside the KV cache.

``processing_ergo/family_ergo.py`` is a link to this file (both packages ship into one flat Hub folder).
"""

from __future__ import annotations

from dataclasses import dataclass

from .compat_ergo import TRANSFORMERS_RANGE  # noqa: F401  (first: checks the installed transformers before using it)
from transformers import (
    PreTrainedConfig,
    PreTrainedModel,
    Qwen2_5_VLConfig,
    Qwen2_5_VLForConditionalGeneration,
    Qwen3_5Config,
    Qwen3_5ForConditionalGeneration,
    Qwen3VLConfig,
    Qwen3VLForConditionalGeneration,
)

GROUNDING_CONVENTIONS = ("absolute", "relative")
"""How a model writes a box: ``absolute`` pixels of the image it saw (Qwen2.5-VL) or ``relative`` to that image on a
0-1000 scale per axis (Qwen3-VL, Qwen3.5)."""

RELATIVE_SCALE = 1000
"""The ``relative`` convention's full width and height."""


@dataclass(frozen=True)
class Family:
    """What ERGO needs to know about one model family."""

    name: str
    """Its name in words, for messages and documents."""
    model_type: str
    """``config.model_type``: ERGO folders keep the stock one, so engines serve them as the stock model."""
    config_class: type[PreTrainedConfig]
    model_class: type[PreTrainedModel]
    """The stock generation class, which ERGO's class extends and which ``architectures`` names."""
    patch_size: int
    merge_size: int
    grounding: str
    """The native grounding convention (one of ``GROUNDING_CONVENTIONS``): the processor's default."""
    video_processor: str
    """The stock video processor class, which a Hub folder names for engines that load the stock processor (ERGO
    reads no video, and that class needs torchvision)."""
    recurrent_cache: str | None = None
    """Why stage 2 can continue stage 1's cache only for a lone sample with the dynamic cache, or None when it can
    always continue (a KV cache, where masked positions are simply not attended to)."""

    @property
    def factor(self) -> int:
        """Pixels per LLM vision-token side: the patch size times the merge size."""
        return self.patch_size * self.merge_size


QWEN2_5_VL = Family("Qwen2.5-VL", "qwen2_5_vl", Qwen2_5_VLConfig, Qwen2_5_VLForConditionalGeneration,
                    patch_size=14, merge_size=2, grounding="absolute", video_processor="Qwen2VLVideoProcessor")
QWEN3_VL = Family("Qwen3-VL", "qwen3_vl", Qwen3VLConfig, Qwen3VLForConditionalGeneration,
                  patch_size=16, merge_size=2, grounding="relative", video_processor="Qwen3VLVideoProcessor")
QWEN3_5 = Family(
    "Qwen3.5", "qwen3_5", Qwen3_5Config, Qwen3_5ForConditionalGeneration, patch_size=16, merge_size=2,
    grounding="relative", video_processor="Qwen3VLVideoProcessor",
    recurrent_cache="Qwen3.5's gated-DeltaNet states take in every token fed (padding, tokens after a stop) and "
                    "cannot drop rows",
)
FAMILIES = {family.model_type: family for family in (QWEN2_5_VL, QWEN3_VL, QWEN3_5)}
"""The supported families by ``model_type``."""


def family_of(model_type: str) -> Family:
    """The family of a checkpoint's ``model_type``, or a ValueError naming the supported ones."""
    if model_type not in FAMILIES:
        raise ValueError(f"ERGO runs on {', '.join(f'{f.name} ({t})' for t, f in FAMILIES.items())}; "
                         f"got a {model_type!r} checkpoint")
    return FAMILIES[model_type]


def native_grounding(patch_size: int, merge_size: int) -> str:
    """The grounding convention of the families whose vision tokens have this geometry (a processor knows its image
    processor, not its model): Qwen2.5-VL's 14-px patches mean absolute pixels, the 16-px families relative."""
    conventions = {family.grounding for family in FAMILIES.values()
                   if (family.patch_size, family.merge_size) == (patch_size, merge_size)}
    if len(conventions) != 1:
        raise ValueError(f"no supported family has {patch_size}-px patches merged {merge_size}x{merge_size}; pass "
                         f"grounding= one of {GROUNDING_CONVENTIONS}")
    return conventions.pop()


__all__ = ["Family", "FAMILIES", "GROUNDING_CONVENTIONS", "RELATIVE_SCALE", "QWEN2_5_VL", "QWEN3_VL", "QWEN3_5",
           "family_of", "native_grounding"]
