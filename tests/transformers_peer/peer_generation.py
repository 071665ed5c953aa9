"""Generation checks for the peer suite: ERGO's class generates exactly as the stock Qwen2.5-VL class does.

transformers' own generation tests (``tests/generation/test_utils.py``, ``GenerationTesterMixin``) are not in its
source distribution, so this module stands in for that file (see :mod:`peer_upstream`). It is our code, and it
checks drop-in compatibility differentially: for inputs that are not an ERGO request (the tester's ids, image
and mask), ``ErgoForConditionalGeneration.generate`` with a decoding mode must return what
``Qwen2_5_VLForConditionalGeneration.generate`` returns with the same weights, config and arguments, tensors and
scores included; prompt-lookup and assisted decoding must also agree with greedy search, as in transformers' tests.
"""

from __future__ import annotations

import copy

import torch
from transformers import Qwen2_5_VLForConditionalGeneration

NEW_TOKENS = 4


class GenerationTesterMixin:
    """Mixed into a ``unittest.TestCase`` with ``all_model_classes`` and a ``model_tester``, as transformers' is."""

    reference_class = Qwen2_5_VLForConditionalGeneration

    def _models(self, model_class):
        config, inputs = self.model_tester.prepare_config_and_inputs_for_common()
        torch.manual_seed(0)
        model = model_class(copy.deepcopy(config)).eval()
        reference = self.reference_class(copy.deepcopy(config)).eval()
        reference.load_state_dict(model.state_dict())
        for m in (model, reference):  # random weights: never stop early, so every mode writes NEW_TOKENS tokens
            m.generation_config.eos_token_id = None
        return model, reference, inputs

    def _both(self, call, **kwargs):
        for model_class in self.all_generative_model_classes:
            model, reference, inputs = self._models(model_class)
            kwargs = {"max_new_tokens": NEW_TOKENS, **kwargs}
            torch.manual_seed(1)
            ours = call(model, inputs, kwargs)
            torch.manual_seed(1)
            theirs = call(reference, inputs, kwargs)
            self._assert_same(ours, theirs)
            yield model, inputs, ours

    def _assert_same(self, ours, theirs, path="output"):
        if isinstance(ours, torch.Tensor):
            self.assertIsInstance(theirs, torch.Tensor, path)
            torch.testing.assert_close(ours, theirs, rtol=0, atol=0, msg=lambda m: f"{path}: {m}")
        elif isinstance(ours, (tuple, list)):
            self.assertEqual(len(ours), len(theirs), path)
            for i, (a, b) in enumerate(zip(ours, theirs)):
                self._assert_same(a, b, f"{path}[{i}]")
        elif isinstance(ours, dict):  # ModelOutput
            self.assertEqual(type(ours).__name__, type(theirs).__name__, path)
            self.assertEqual(sorted(k for k in ours if k != "past_key_values"),
                             sorted(k for k in theirs if k != "past_key_values"), path)
            for key in ours:
                if key != "past_key_values":
                    self._assert_same(ours[key], theirs[key], f"{path}.{key}")
        else:
            self.assertEqual(ours, theirs, path)

    def _first_row(self, inputs):
        """The first sample alone (assisted and prompt-lookup decoding take a batch of one)."""
        patches = int(inputs["image_grid_thw"][0].prod())
        return {"input_ids": inputs["input_ids"][:1], "attention_mask": inputs["attention_mask"][:1],
                "pixel_values": inputs["pixel_values"][:patches], "image_grid_thw": inputs["image_grid_thw"][:1]}

    @staticmethod
    def _generate(model, inputs, kwargs):
        return model.generate(**inputs, **kwargs)

    def test_greedy_generate_matches_stock(self):
        for _ in self._both(self._generate, do_sample=False):
            pass

    def test_greedy_generate_dict_outputs_match_stock(self):
        for _, _, out in self._both(self._generate, do_sample=False, return_dict_in_generate=True,
                                    output_scores=True, output_logits=True, output_attentions=True,
                                    output_hidden_states=True):
            self.assertEqual(len(out.scores), NEW_TOKENS)
            self.assertEqual(len(out.hidden_states), NEW_TOKENS)

    def test_sample_generate_matches_stock(self):
        for _ in self._both(self._generate, do_sample=True, top_k=5, num_return_sequences=2,
                            return_dict_in_generate=True, output_scores=True):
            pass

    def test_beam_search_generate_matches_stock(self):
        for _ in self._both(self._generate, do_sample=False, num_beams=2, num_return_sequences=2,
                            return_dict_in_generate=True, output_scores=True):
            pass

    def test_static_cache_generate_matches_stock_and_dynamic(self):
        for model, inputs, out in self._both(self._generate, do_sample=False, cache_implementation="static"):
            dynamic = model.generate(**inputs, do_sample=False, max_new_tokens=NEW_TOKENS)
            torch.testing.assert_close(out, dynamic, rtol=0, atol=0)

    def test_left_padded_batch_matches_stock(self):
        def left_padded(model, inputs, kwargs):
            inputs = dict(inputs)
            mask = inputs["attention_mask"].clone()
            mask[0, :2] = 0  # the first row starts with two padding positions
            ids = inputs["input_ids"].clone()
            ids[0, :2] = self.model_tester.pad_token_id
            return model.generate(**{**inputs, "input_ids": ids, "attention_mask": mask}, **kwargs)

        for _ in self._both(left_padded, do_sample=False):
            pass

    def test_continue_from_past_key_values_matches_stock(self):
        def continued(model, inputs, kwargs):
            first = model.generate(**inputs, do_sample=False, max_new_tokens=2, return_dict_in_generate=True)
            # The image is in the cache: the continuation passes the ids and mask, not the pixels again.
            return model.generate(input_ids=first.sequences, attention_mask=torch.ones_like(first.sequences),
                                  past_key_values=first.past_key_values, do_sample=False, **kwargs)

        for model, inputs, out in self._both(continued):
            once = model.generate(**inputs, do_sample=False, max_new_tokens=2 + NEW_TOKENS)
            torch.testing.assert_close(out, once, rtol=0, atol=0)

    def test_prompt_lookup_decoding_matches_greedy_search(self):
        def prompt_lookup(model, inputs, kwargs):
            return model.generate(**self._first_row(inputs), **kwargs)

        for model, inputs, out in self._both(prompt_lookup, do_sample=False, prompt_lookup_num_tokens=2):
            inputs = self._first_row(inputs)
            greedy = model.generate(**inputs, do_sample=False, max_new_tokens=NEW_TOKENS)
            torch.testing.assert_close(out, greedy, rtol=0, atol=0)

    def test_assisted_decoding_matches_greedy_search(self):
        def assisted(model, inputs, kwargs):
            assistant = copy.deepcopy(model)
            return model.generate(**self._first_row(inputs), assistant_model=assistant, **kwargs)

        for model, inputs, out in self._both(assisted, do_sample=False):
            inputs = self._first_row(inputs)
            greedy = model.generate(**inputs, do_sample=False, max_new_tokens=NEW_TOKENS)
            torch.testing.assert_close(out, greedy, rtol=0, atol=0)
