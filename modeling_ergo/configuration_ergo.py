"""``ErgoConfig``: a Qwen2.5-VL config plus the settings of ERGO's two-stage generation.

``model_type`` stays ``"qwen2_5_vl"`` on purpose: engines that know Qwen2.5-VL natively (vLLM, SGLang, TGI)
pick the architecture from ``model_type``/``architectures`` and serve an ERGO folder as the plain Qwen2.5-VL it
is, while ``trust_remote_code`` loaders follow ``auto_map`` to these classes.

Prompt and geometry settings (budgets, stage-2 template, fallback policy) act before the model sees anything,
so they live on ``ErgoProcessor`` (``processor_config.json``); this config holds what ``generate`` decides.
"""

from __future__ import annotations

from .compat_ergo import TRANSFORMERS_RANGE  # noqa: F401  (first: checks the installed transformers before using it)
from huggingface_hub.dataclasses import strict
from transformers import Qwen2_5_VLConfig


@strict
class ErgoConfig(Qwen2_5_VLConfig):
    r"""
    stage1_generation_kwargs (`dict`, *optional*):
        Defaults for stage 1's ``generate`` arguments (e.g. ``{"max_new_tokens": 1024}``); call-time arguments win.
    stage2_generation_kwargs (`dict`, *optional*):
        The same for stage 2.
    reuse_stage1_cache (`bool`, *optional*, defaults to `True`):
        Stage 2 continues from stage 1's KV cache, so its prefill is only the new turn (crop and stage-2 prompt).
        ``False`` re-encodes the whole conversation for stage 2, as the reference transformers path does; the
        greedy outputs are the same.
    skip_answered_stage2 (`bool`, *optional*, defaults to `False`):
        Early exit: when stage 1 already gives an ``<answer>`` and no region, that is the answer and stage 2 is
        skipped. Off by default because the reference always runs stage 2 (a fallback image) in that case.
    vision_attention (`str`, *optional*, defaults to `"auto"`):
        ``"auto"``: during generation on CUDA in half precision, a vision tower loaded with SDPA runs all its
        attention windows in one call of PyTorch's varlen (flash) attention instead of one SDPA call per window;
        elsewhere it keeps what it was loaded with. ``"loaded"``: always keep what it was loaded with (to use
        ``flash_attention_2``, load with ``attn_implementation={"vision_config": "flash_attention_2"}``).
    """

    stage1_generation_kwargs: dict | None = None
    stage2_generation_kwargs: dict | None = None
    reuse_stage1_cache: bool = True
    skip_answered_stage2: bool = False
    vision_attention: str = "auto"

    def validate_vision_attention(self):
        if self.vision_attention not in VISION_ATTENTION_CHOICES:
            raise ValueError(f"vision_attention must be one of {VISION_ATTENTION_CHOICES}, got {self.vision_attention!r}")

    def to_dict(self) -> dict:
        output = super().to_dict()
        # Engines that serve Qwen2.5-VL natively pick their implementation by `architectures`; transformers'
        # trust_remote_code loaders follow `auto_map` to the ERGO classes instead.
        output["architectures"] = ["Qwen2_5_VLForConditionalGeneration"]
        output["auto_map"] = dict(AUTO_MAP)
        return output


VISION_ATTENTION_CHOICES = ("auto", "loaded")

ERGO_DEFAULTS = {name: getattr(ErgoConfig, name) for name in ErgoConfig.__annotations__}
"""ERGO's own config fields (those ``ErgoConfig`` adds to Qwen2.5-VL's) and their defaults."""


def ergo_setting(config, name: str):
    """``config.<name>``, or ERGO's default when the config lacks it: the class also runs with a stock
    ``Qwen2_5_VLConfig`` (transformers' own tests, ``from_pretrained(folder, config=Qwen2_5_VLConfig(...))``)."""
    return getattr(config, name, ERGO_DEFAULTS[name])

AUTO_MAP = {
    "AutoConfig": "configuration_ergo.ErgoConfig",
    "AutoModel": "modeling_ergo.ErgoForConditionalGeneration",
    "AutoModelForImageTextToText": "modeling_ergo.ErgoForConditionalGeneration",
    # What `transformers serve` loads a Qwen2.5-VL `model_type` with.
    "AutoModelForMultimodalLM": "modeling_ergo.ErgoForConditionalGeneration",
}

ErgoConfig.register_for_auto_class()


__all__ = ["ErgoConfig", "AUTO_MAP", "VISION_ATTENTION_CHOICES", "ERGO_DEFAULTS", "ergo_setting"]
