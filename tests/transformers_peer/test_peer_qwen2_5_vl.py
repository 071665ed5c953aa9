"""transformers' own model tests (``ModelTesterMixin``, ``ConfigTester``) run against ERGO's class.

As transformers tests its Qwen2.5-VL model: a tester that builds a tiny Qwen2.5-VL config and inputs (ids with one
image each), and a ``unittest.TestCase`` mixing in the common tests, here with ``all_model_classes =
(ErgoForConditionalGeneration,)``, once with an ``ErgoConfig`` and once with a stock ``Qwen2_5_VLConfig`` (ERGO's
class must work with either). The mixins come from the installed transformers release's source distribution
(:mod:`peer_upstream`); the generation checks are :mod:`peer_generation`. The tester and the ERGO-specific choices
below are ours. Tests that cannot apply here are skipped by name, with the reason, in ``SKIPPED``.
"""

from __future__ import annotations

import copy
import os
import unittest

import pytest
import torch
from transformers import Qwen2_5_VLConfig

from modeling_ergo import ErgoConfig, ErgoForConditionalGeneration

try:
    import peer_upstream

    common = peer_upstream.load("test_modeling_common")
    ConfigTester = peer_upstream.load("test_configuration_common").ConfigTester
except RuntimeError as error:  # no source distribution and no registry to fetch it from: say so, loudly
    if os.environ.get("CI"):  # CI reaches PyPI: there a missing download is a failure, not a skip
        raise
    pytest.skip(f"transformers' test mixins are not available: {error}", allow_module_level=True)

from peer_generation import GenerationTesterMixin  # noqa: E402  (after peer_upstream registered it)

# Each test of the mixins that cannot apply to ERGO's class on this machine, with the reason; nothing else skips
# (transformers' own decorators still skip GPU-, flash-attention- and slow-only tests, and say so).
SKIPPED = {
    # As transformers skips them for Qwen2.5-VL itself (tests/models/qwen2_5_vl/test_modeling_qwen2_5_vl.py):
    "test_feed_forward_chunking": "Qwen2.5-VL does not support feed-forward chunking (skipped upstream too)",
    "test_cpu_offload": "Qwen2.5-VL does not support CPU offload (skipped upstream too)",
    "test_disk_offload_bin": "undefined behaviour with Qwen2.5-VL test models (skipped upstream too)",
    "test_disk_offload_safetensors": "undefined behaviour with Qwen2.5-VL test models (skipped upstream too)",
    "test_model_parallelism": "undefined behaviour with Qwen2.5-VL test models (skipped upstream too)",
    "test_sdpa_can_dispatch_on_flash": "compile not supported by Qwen2.5-VL (skipped upstream too)",
    "test_multi_gpu_data_parallel_forward": "multi-GPU (skipped upstream too)",
    "test_model_is_small": "the tiny Qwen2.5-VL config cannot be made smaller (skipped upstream too)",
}


class ErgoPeerModelTester:
    """A tiny Qwen2.5-VL: 2 text and 2 vision layers, 4 image tokens per sample (a 2x2 patch grid, no merge)."""

    def __init__(self, parent, config_class):
        self.parent = parent
        self.config_class = config_class
        self.batch_size = 3
        self.text_length = 7
        self.grid = (1, 2, 2)  # t, h, w in patches
        self.image_tokens = self.grid[0] * self.grid[1] * self.grid[2]
        self.seq_length = self.text_length + self.image_tokens + 1  # the vision-start token too
        self.vocab_size = 99
        self.hidden_size = 32
        self.num_hidden_layers = 2
        self.num_attention_heads = 4
        self.is_training = True
        self.pad_token_id, self.vision_start_token_id, self.image_token_id, self.video_token_id = 2, 3, 4, 5
        self.vision_config = {"depth": 2, "hidden_size": 32, "intermediate_size": 32, "num_heads": 4,
                              "out_hidden_size": self.hidden_size, "patch_size": 14, "spatial_merge_size": 1,
                              "temporal_patch_size": 2, "in_chans": 3, "hidden_act": "silu",
                              "fullatt_block_indexes": [1], "window_size": 28}

    def get_config(self):
        return self.config_class(
            text_config={"vocab_size": self.vocab_size, "hidden_size": self.hidden_size, "intermediate_size": 37,
                         "num_hidden_layers": self.num_hidden_layers, "num_attention_heads": self.num_attention_heads,
                         "num_key_value_heads": 2, "max_position_embeddings": 512, "max_window_layers": 2,
                         "rope_parameters": {"rope_type": "default", "rope_theta": 10000.0, "mrope_section": [2, 1, 1]},
                         "bos_token_id": 0, "eos_token_id": 1, "pad_token_id": self.pad_token_id,
                         "tie_word_embeddings": True},
            vision_config=copy.deepcopy(self.vision_config),
            vision_start_token_id=self.vision_start_token_id, image_token_id=self.image_token_id,
            video_token_id=self.video_token_id, tie_word_embeddings=True)

    def pixel_values(self, images):
        c = self.vision_config
        patch = c["in_chans"] * c["temporal_patch_size"] * c["patch_size"] ** 2
        return common.floats_tensor([images * self.image_tokens, patch])

    def input_ids(self, image_token):
        ids = common.ids_tensor([self.batch_size, self.seq_length], self.vocab_size)
        special = (self.vision_start_token_id, self.image_token_id, self.video_token_id)
        ids[torch.isin(ids, torch.tensor(special))] = self.pad_token_id + 4  # any ordinary token
        ids[:, 1] = self.vision_start_token_id
        ids[:, 2:2 + self.image_tokens] = image_token
        return ids

    def prepare_config_and_inputs_for_common(self):
        ids = self.input_ids(self.image_token_id)
        return self.get_config(), {"input_ids": ids, "attention_mask": torch.ones_like(ids),
                                   "pixel_values": self.pixel_values(self.batch_size),
                                   "image_grid_thw": torch.tensor([self.grid] * self.batch_size)}


class ErgoPeerTests(common.ModelTesterMixin, GenerationTesterMixin):
    all_model_classes = (ErgoForConditionalGeneration,)
    config_class = ErgoConfig
    test_pruning = False
    test_head_masking = False

    def setUp(self):
        self.model_tester = ErgoPeerModelTester(self, self.config_class)
        self.config_tester = ConfigTester(self, config_class=self.config_class, has_text_modality=False)

    def _prepare_for_class(self, inputs_dict, model_class, return_labels=False):
        # The mixin adds labels (for the training tests) by the class's name in transformers' auto mappings, where
        # ERGO's class is not: prepare them as for the Qwen2.5-VL class it subclasses.
        if issubclass(model_class, self.reference_class):
            model_class = self.reference_class
        return super()._prepare_for_class(inputs_dict, model_class, return_labels=return_labels)

    def test_config(self):
        self.config_tester.run_common_tests()

    def test_model_class_and_config_class(self):
        config, _ = self.model_tester.prepare_config_and_inputs_for_common()
        self.assertIs(type(config), self.config_class)
        self.assertIs(type(ErgoForConditionalGeneration(config).config), self.config_class)

    def test_mismatching_num_image_tokens(self):
        config, inputs = self.model_tester.prepare_config_and_inputs_for_common()
        model = ErgoForConditionalGeneration(config).eval()
        model(**inputs)
        one_image = self.model_tester.image_tokens
        with self.assertRaises(ValueError):  # three rows of image tokens, two images
            model(**{**inputs, "pixel_values": inputs["pixel_values"][one_image:],
                     "image_grid_thw": inputs["image_grid_thw"][1:]})

    def test_video_forward(self):
        config, inputs = self.model_tester.prepare_config_and_inputs_for_common()
        model = ErgoForConditionalGeneration(config).eval()
        batch = self.model_tester.batch_size
        out = model(input_ids=self.model_tester.input_ids(self.model_tester.video_token_id),
                    pixel_values_videos=self.model_tester.pixel_values(batch),
                    video_grid_thw=torch.tensor([self.model_tester.grid] * batch),
                    second_per_grid_ts=torch.ones(batch))
        self.assertEqual(out.logits.shape[:2], inputs["input_ids"].shape)


for _name, _reason in SKIPPED.items():
    setattr(ErgoPeerTests, _name, unittest.skip(_reason)(lambda self: None))


class TestErgoClassWithErgoConfig(ErgoPeerTests, unittest.TestCase):
    config_class = ErgoConfig


class TestErgoClassWithStockConfig(ErgoPeerTests, unittest.TestCase):
    config_class = Qwen2_5_VLConfig
