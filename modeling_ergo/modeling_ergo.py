"""ERGO's generation classes, one per family (``family_ergo.py``): the stock class whose ``generate`` runs ERGO's two
stages. ``ErgoForConditionalGeneration`` is Qwen2.5-VL's (the name its folders have always had),
``ErgoQwen3VLForConditionalGeneration`` Qwen3-VL's and ``ErgoQwen3_5ForConditionalGeneration`` Qwen3.5's.

The two-stage loop lives in ``generation_ergo.py`` (``ErgoGenerationMixin``). This file adds what the model classes
themselves need: the checkpoint key mapping of Hub checkpoints, and the vision tower's attention for generation on
GPU (all attention windows, or images, in one varlen call instead of one SDPA call each).
"""

from __future__ import annotations

from contextlib import contextmanager

import torch

from .compat_ergo import TRANSFORMERS_RANGE  # noqa: F401  (first: checks the installed transformers before using it)
from transformers import (
    AttentionInterface,
    Qwen2_5_VLForConditionalGeneration,
    Qwen3_5ForConditionalGeneration,
    Qwen3VLForConditionalGeneration,
)
from transformers.conversion_mapping import get_checkpoint_conversion_mapping, register_checkpoint_conversion_mapping

from .configuration_ergo import ErgoConfig, ErgoQwen3_5Config, ErgoQwen3VLConfig, ergo_setting
from .generation_ergo import ErgoGenerateOutput, ErgoGenerationMixin

try:  # PyTorch >= 2.10
    from torch.nn.attention.varlen import varlen_attn
except ImportError:
    varlen_attn = None


def varlen_attention(
    module: torch.nn.Module,
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    attention_mask: torch.Tensor | None = None,
    scaling: float | None = None,
    dropout: float = 0.0,
    cu_seq_lens_q: torch.Tensor | None = None,
    cu_seq_lens_k: torch.Tensor | None = None,
    max_length_q: int | None = None,
    max_length_k: int | None = None,
    **kwargs,
) -> tuple[torch.Tensor, None]:
    """Qwen2.5-VL's vision attention over all windows in one call of PyTorch's ``varlen_attn`` (flash attention on
    CUDA, no extra package) instead of one SDPA call per window. Takes and returns transformers' layouts:
    ``(1, heads, tokens, dim)`` in, ``(1, tokens, heads, dim)`` out."""
    if dropout:
        raise ValueError("varlen vision attention is for inference; use sdpa to train with attention dropout")
    query, key, value = (tensor.squeeze(0).transpose(0, 1).contiguous() for tensor in (query, key, value))
    out = varlen_attn(
        query, key, value, cu_seq_lens_q.to(torch.int32), cu_seq_lens_k.to(torch.int32),
        int(max_length_q), int(max_length_k), scale=scaling,
    )
    return out.unsqueeze(0), None


VARLEN_ATTENTION = "ergo_flash_varlen"
"""The name the vision tower's attention is registered under; the vision towers of all three families send attention
implementations whose name contains "flash" through their ``cu_seqlens`` path (all windows, or all images, at once;
``is_flash_attention_requested`` in 5.19 and 5.23)."""
if varlen_attn is not None:
    AttentionInterface.register(VARLEN_ATTENTION, varlen_attention)


class ErgoModelMixin(ErgoGenerationMixin):
    """What ERGO's class adds to any family's stock generation class (put it first among the bases)."""

    def _prepare_position_ids_for_generation(self, inputs_tensor: torch.Tensor, model_kwargs: dict) -> torch.Tensor:
        """Stage 2 continuing stage 1's cache brings a new image (the crop) after the cached tokens. transformers
        5.19 then reuses stage 1's rope deltas instead of computing the crop's 3-D positions (5.23 computes them);
        forgetting the deltas makes every supported release compute them."""
        cache, token_types = model_kwargs.get("past_key_values"), model_kwargs.get("mm_token_type_ids")
        if cache is not None and token_types is not None and bool(token_types[:, cache.get_seq_length():].any()):
            self.model.rope_deltas = None
        return super()._prepare_position_ids_for_generation(inputs_tensor, model_kwargs)

    @contextmanager
    def _generation_vision_attention(self):
        """With ``config.vision_attention="auto"``, generation runs the vision tower on PyTorch's varlen attention
        where it can (CUDA, half precision, a tower loaded with SDPA) and keeps what it was loaded with elsewhere
        (SDPA on CPU). Restored afterwards, so training forwards keep the loaded implementation."""
        vision_config = self.model.visual.config
        loaded = vision_config._attn_implementation
        switch = (ergo_setting(self.config, "vision_attention") == "auto" and loaded == "sdpa"
                  and varlen_available(self.model.visual.device, self.model.visual.dtype))
        if switch:
            vision_config._attn_implementation = VARLEN_ATTENTION
        try:
            yield
        finally:
            vision_config._attn_implementation = loaded


class ErgoForConditionalGeneration(ErgoModelMixin, Qwen2_5_VLForConditionalGeneration):
    config_class = ErgoConfig


class ErgoQwen3VLForConditionalGeneration(ErgoModelMixin, Qwen3VLForConditionalGeneration):
    config_class = ErgoQwen3VLConfig


class ErgoQwen3_5ForConditionalGeneration(ErgoModelMixin, Qwen3_5ForConditionalGeneration):
    config_class = ErgoQwen3_5Config


MODEL_CLASSES = {model.config_class.ergo_family.model_type: model for model in (
    ErgoForConditionalGeneration, ErgoQwen3VLForConditionalGeneration, ErgoQwen3_5ForConditionalGeneration)}
"""ERGO's generation class per family ``model_type``."""

for _model in MODEL_CLASSES.values():
    # Hub checkpoints may store a legacy key layout (Qwen2.5-VL's `model.layers.*` / `visual.*`); transformers renames
    # them on load, but only for classes it registered itself. Without this, a subclass silently loads random weights.
    # (Qwen3-VL and Qwen3.5 register none at the top level: their checkpoints already have the class's layout.)
    _mapping = get_checkpoint_conversion_mapping(_model.config_class.ergo_family.model_class.__name__)
    if _mapping is not None:
        register_checkpoint_conversion_mapping(_model.__name__, _mapping, overwrite=True)
    _model.register_for_auto_class("AutoModelForImageTextToText")


def varlen_available(device: torch.device, dtype: torch.dtype) -> bool:
    """Whether PyTorch's varlen attention runs here: it needs CUDA and fp16/bf16."""
    return varlen_attn is not None and device.type == "cuda" and dtype in (torch.float16, torch.bfloat16)


__all__ = ["ErgoForConditionalGeneration", "ErgoQwen3VLForConditionalGeneration", "ErgoQwen3_5ForConditionalGeneration",
           "ErgoGenerateOutput", "MODEL_CLASSES", "VARLEN_ATTENTION", "varlen_available"]
