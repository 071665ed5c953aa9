"""ERGO's model classes. The files beside this one ship unchanged as a Hub folder's remote code."""

from .configuration_ergo import ErgoConfig, ErgoQwen3_5Config, ErgoQwen3VLConfig
from .family_ergo import FAMILIES, Family, family_of
from .modeling_ergo import (
    ErgoForConditionalGeneration,
    ErgoGenerateOutput,
    ErgoQwen3_5ForConditionalGeneration,
    ErgoQwen3VLForConditionalGeneration,
)

__all__ = ["ErgoConfig", "ErgoQwen3VLConfig", "ErgoQwen3_5Config", "ErgoForConditionalGeneration",
           "ErgoQwen3VLForConditionalGeneration", "ErgoQwen3_5ForConditionalGeneration", "ErgoGenerateOutput",
           "FAMILIES", "Family", "family_of"]
