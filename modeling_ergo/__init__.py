"""ERGO's model classes. The files beside this one ship unchanged as a Hub folder's remote code."""

from .configuration_ergo import ErgoConfig
from .modeling_ergo import ErgoForConditionalGeneration, ErgoGenerateOutput

__all__ = ["ErgoConfig", "ErgoForConditionalGeneration", "ErgoGenerateOutput"]
