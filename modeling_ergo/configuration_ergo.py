"""ERGO's configs: a family's stock config (``family_ergo.py``) plus the settings of ERGO's two-stage generation.

``model_type`` stays the stock one (``"qwen2_5_vl"``, ``"qwen3_vl"``, ``"qwen3_5"``) on purpose: engines that know the
family natively (vLLM, SGLang, TGI) pick the architecture from ``model_type``/``architectures`` and serve an ERGO
folder as the plain model it is, while ``trust_remote_code`` loaders follow ``auto_map`` to these classes.

Prompt and geometry settings (budgets, stage-2 template, grounding, fallback policy) act before the model sees
anything, so they live on ``ErgoProcessor`` (``processor_config.json``); this config holds what ``generate`` decides.
"""

from __future__ import annotations

from dataclasses import dataclass

from .compat_ergo import TRANSFORMERS_RANGE  # noqa: F401  (first: checks the installed transformers before using it)
from huggingface_hub.dataclasses import strict
from transformers import Qwen2_5_VLConfig, Qwen3_5Config, Qwen3VLConfig

from .family_ergo import QWEN2_5_VL, QWEN3_5, QWEN3_VL, Family


@dataclass(repr=False, eq=False)
class ErgoSettings:
    r"""
    stage1_generation_kwargs (`dict`, *optional*):
        Defaults for stage 1's ``generate`` arguments (e.g. ``{"max_new_tokens": 1024}``); call-time arguments win.
    stage2_generation_kwargs (`dict`, *optional*):
        The same for stage 2.
    reuse_stage1_cache (`bool`, *optional*, defaults to `True`):
        Stage 2 continues from stage 1's KV cache, so its prefill is only the new turn (crop and stage-2 prompt).
        ``False`` re-encodes the whole conversation for stage 2, as the reference transformers path does; the
        greedy outputs are the same. A family whose cache cannot always be continued (``Family.recurrent_cache``)
        re-encodes where it cannot, and says why in ``ErgoGenerateOutput.cache``.
    skip_answered_stage2 (`bool`, *optional*, defaults to `False`):
        Early exit: when stage 1 already gives an ``<answer>`` and no region, that is the answer and stage 2 is
        skipped. Off by default because the reference always runs stage 2 (a fallback image) in that case.
    vision_attention (`str`, *optional*, defaults to `"auto"`):
        ``"auto"``: during generation on CUDA in half precision, a vision tower loaded with SDPA runs all its
        attention windows (or images) in one call of PyTorch's varlen (flash) attention instead of one SDPA call
        each; elsewhere it keeps what it was loaded with. ``"loaded"``: always keep what it was loaded with (to use
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
        # Engines that serve the family natively pick their implementation by `architectures`; transformers'
        # trust_remote_code loaders follow `auto_map` to the ERGO classes instead.
        output["architectures"] = [self.ergo_family.model_class.__name__]
        output["auto_map"] = auto_map(self.ergo_family)
        return output


@strict
class ErgoConfig(ErgoSettings, Qwen2_5_VLConfig):
    """Qwen2.5-VL's config with ERGO's settings."""

    ergo_family = QWEN2_5_VL


@strict
class ErgoQwen3VLConfig(ErgoSettings, Qwen3VLConfig):
    """Qwen3-VL's config with ERGO's settings."""

    ergo_family = QWEN3_VL


@strict
class ErgoQwen3_5Config(ErgoSettings, Qwen3_5Config):
    """Qwen3.5's config with ERGO's settings."""

    ergo_family = QWEN3_5


VISION_ATTENTION_CHOICES = ("auto", "loaded")

ERGO_DEFAULTS = {name: getattr(ErgoSettings, name) for name in ErgoSettings.__annotations__}
"""ERGO's own config fields (those ``ErgoSettings`` adds to a family's config) and their defaults."""

CONFIG_CLASSES = {config.ergo_family.model_type: config for config in (ErgoConfig, ErgoQwen3VLConfig, ErgoQwen3_5Config)}
"""ERGO's config class per family ``model_type``."""


def ergo_setting(config, name: str):
    """``config.<name>``, or ERGO's default when the config lacks it: the classes also run with a stock config
    (transformers' own tests, ``from_pretrained(folder, config=Qwen2_5_VLConfig(...))``)."""
    return getattr(config, name, ERGO_DEFAULTS[name])


def auto_map(family: Family) -> dict[str, str]:
    """The ``auto_map`` of a family's ERGO folder: its config and generation classes in the flat remote code."""
    config, model = f"Ergo{_class_stem(family)}Config", f"Ergo{_class_stem(family)}ForConditionalGeneration"
    return {
        "AutoConfig": f"configuration_ergo.{config}",
        "AutoModel": f"modeling_ergo.{model}",
        "AutoModelForImageTextToText": f"modeling_ergo.{model}",
        # What `transformers serve` loads these families' `model_type` with.
        "AutoModelForMultimodalLM": f"modeling_ergo.{model}",
    }


def _class_stem(family: Family) -> str:
    """What ERGO's class names add after ``Ergo``: nothing for Qwen2.5-VL (the names its folders have always had),
    else the stock class's stem (``Qwen3VL``, ``Qwen3_5``)."""
    return "" if family is QWEN2_5_VL else family.model_class.__name__.removesuffix("ForConditionalGeneration")


for _config in CONFIG_CLASSES.values():
    _config.register_for_auto_class()


__all__ = ["ErgoConfig", "ErgoQwen3VLConfig", "ErgoQwen3_5Config", "ErgoSettings", "CONFIG_CLASSES",
           "VISION_ATTENTION_CHOICES", "ERGO_DEFAULTS", "auto_map", "ergo_setting"]
