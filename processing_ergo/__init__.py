"""ERGO's processor, prompts and geometry. The files beside this one ship unchanged as a Hub folder's remote code."""

from .processing_ergo import FALLBACK_POLICIES, ErgoContext, ErgoProcessor, ZoomDecision

__all__ = ["ErgoProcessor", "ErgoContext", "ZoomDecision", "FALLBACK_POLICIES"]
