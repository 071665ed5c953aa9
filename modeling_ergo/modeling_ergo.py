"""``ErgoForConditionalGeneration``: Qwen2.5-VL whose ``generate`` runs ERGO's two stages.

The two-stage loop lives in ``generation_ergo.py`` (``ErgoGenerationMixin``). This file adds what the model class
itself needs: the checkpoint key mapping of Hub Qwen2.5-VL checkpoints, and the vision tower's attention for
generation on GPU (all attention windows in one varlen call instead of one SDPA call per window).
"""

from __future__ import annotations

from contextlib import contextmanager

import torch

from .compat_ergo import TRANSFORMERS_RANGE  # noqa: F401  (first: checks the installed transformers before using it)
from transformers import AttentionInterface, Qwen2_5_VLForConditionalGeneration
from transformers.conversion_mapping import get_checkpoint_conversion_mapping, register_checkpoint_conversion_mapping

from .configuration_ergo import ErgoConfig, ergo_setting
from .generation_ergo import ErgoGenerateOutput, ErgoGenerationMixin

try:  # PyTorch >= 2.10
    from torch.nn.attention.varlen import varlen_attn
except ImportError:
    varlen_attn = None

# Hub Qwen2.5-VL checkpoints store `model.layers.*` / `visual.*`; transformers renames them on load, but only for
# classes it registered itself. Without this, a subclass silently loads random weights.
register_checkpoint_conversion_mapping(
    "ErgoForConditionalGeneration",
    get_checkpoint_conversion_mapping("Qwen2_5_VLForConditionalGeneration"),
    overwrite=True,
)


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
"""The name the vision tower's attention is registered under; Qwen2.5-VL sends attention implementations whose
name contains "flash" through its ``cu_seqlens`` (all windows at once) path."""
if varlen_attn is not None:
    AttentionInterface.register(VARLEN_ATTENTION, varlen_attention)


class ErgoForConditionalGeneration(ErgoGenerationMixin, Qwen2_5_VLForConditionalGeneration):
    config_class = ErgoConfig

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


def varlen_available(device: torch.device, dtype: torch.dtype) -> bool:
    """Whether PyTorch's varlen attention runs here: it needs CUDA and fp16/bf16."""
    return varlen_attn is not None and device.type == "cuda" and dtype in (torch.float16, torch.bfloat16)


ErgoForConditionalGeneration.register_for_auto_class("AutoModelForImageTextToText")

__all__ = ["ErgoForConditionalGeneration", "ErgoGenerateOutput", "VARLEN_ATTENTION", "varlen_available"]
