"""``ErgoForConditionalGeneration``: Qwen2.5-VL whose ``generate`` runs ERGO's two stages.

Given inputs from ``ErgoProcessor`` (they carry an ``ergo_context``), ``generate``:

1. generates stage 1 on the coarse image (reasoning and a ``<zoom>[x1, y1, x2, y2]</zoom>`` region);
2. asks the processor to map the region to the original image and crop it at native resolution (or to apply
   the fallback policy);
3. generates stage 2 as a continuation of the same conversation: the stage-1 prompt and answer token for token,
   then a user turn with the crop and the stage-2 prompt;
4. returns the caller's ``input_ids`` followed by the stage-2 answer, so the usual slicing and the pipeline's
   prompt stripping yield the answer.

Any other inputs (a trainer's rollout, a multi-image chat) get plain Qwen2.5-VL generation.
"""

from __future__ import annotations

import time
from dataclasses import dataclass

import torch
from transformers import DynamicCache, GenerationConfig, Qwen2_5_VLForConditionalGeneration
from transformers.conversion_mapping import get_checkpoint_conversion_mapping, register_checkpoint_conversion_mapping
from transformers.utils import ModelOutput

from .configuration_ergo import ErgoConfig

# Hub Qwen2.5-VL checkpoints store `model.layers.*` / `visual.*`; transformers renames them on load, but only for
# classes it registered itself. Without this, a subclass silently loads random weights.
register_checkpoint_conversion_mapping(
    "ErgoForConditionalGeneration",
    get_checkpoint_conversion_mapping("Qwen2_5_VLForConditionalGeneration"),
    overwrite=True,
)


@dataclass
class ErgoGenerateOutput(ModelOutput):
    """``generate(..., return_dict_in_generate=True)`` on ERGO inputs. Lists hold one entry per sample.

    Args:
        sequences: the caller's ``input_ids`` followed by the final answer's tokens (right-padded).
        stage1_texts: stage 1's decoded output (reasoning and zoom request).
        regions: the region in original-image pixels ``(x1, y1, x2, y2)``, or None when a fallback was taken.
        crop_sizes: ``(width, height)`` of the image stage 2 saw, or None when stage 2 was skipped.
        vision_tokens: ``{"stage1", "stage2", "total", "full_resolution"}`` LLM vision tokens; the last is what
            one pass over the whole image at 16384 tokens (the paper's baseline) would cost (None when that
            baseline cannot take the image: flatter than 200:1).
        fallbacks: None when the region was used, else ``"no_region"``, ``"degenerate_box"`` or ``"answered"`` (early
            exit: stage 1 answered without a region and ``config.skip_answered_stage2`` is on).
        fallback_policy: the policy applied to those samples (``resize``, ``reference`` or ``coarse``).
        stage2_prefill_tokens: tokens stage 2's prefill processed for the sample (0 when skipped): the whole
            conversation when re-prefilling, only the new turn when continuing from stage 1's cache.
        timings: seconds per step, ``{"stage1", "zoom", "stage2", "total"}``; the batch is generated together,
            so every sample of a batch reports the batch's figures.
    """

    sequences: torch.LongTensor | None = None
    stage1_texts: list[str] | None = None
    regions: list[tuple[int, int, int, int] | None] | None = None
    crop_sizes: list[tuple[int, int] | None] | None = None
    vision_tokens: list[dict[str, int]] | None = None
    fallbacks: list[str | None] | None = None
    fallback_policy: str | None = None
    stage2_prefill_tokens: list[int] | None = None
    timings: list[dict[str, float]] | None = None


class ErgoForConditionalGeneration(Qwen2_5_VLForConditionalGeneration):
    config_class = ErgoConfig

    def generate(
        self,
        *args,
        ergo_context=None,
        stage1_generate_kwargs: dict | None = None,
        stage2_generate_kwargs: dict | None = None,
        **kwargs,
    ):
        """Two-stage ERGO generation for ``ErgoProcessor`` inputs, plain Qwen2.5-VL generation otherwise.

        Standard generation arguments apply to both stages; ``stage1_generate_kwargs`` / ``stage2_generate_kwargs``
        override them per stage (over ``config.stage{1,2}_generation_kwargs`` defaults).
        """
        if ergo_context is None:
            return super().generate(*args, **kwargs)
        if args:
            raise TypeError("pass ERGO inputs as keyword arguments: model.generate(**inputs)")
        if isinstance(ergo_context, (list, tuple)):  # requests batched by a collator, e.g. pipeline(batch_size=N)
            ergo_context = type(ergo_context[0]).merge(list(ergo_context))
        return self._generate_two_stage(ergo_context, stage1_generate_kwargs, stage2_generate_kwargs, **kwargs)

    def _stage_kwargs(self, shared: dict, config_defaults: dict | None, overrides: dict | None) -> dict:
        merged = {**(config_defaults or {}), **shared, **(overrides or {})}
        if merged.get("num_return_sequences", 1) != 1:
            raise ValueError("ERGO generates one answer per request; num_return_sequences must be 1")
        merged["return_dict_in_generate"] = True
        return merged

    @torch.no_grad()
    def _generate_two_stage(self, context, stage1_overrides, stage2_overrides, **kwargs) -> torch.LongTensor | ErgoGenerateOutput:
        return_dict = kwargs.pop("return_dict_in_generate", False)
        input_ids = kwargs.pop("input_ids")
        attention_mask = kwargs.pop("attention_mask", None)
        if attention_mask is None:
            attention_mask = torch.ones_like(input_ids)
        vision = {key: kwargs.pop(key) for key in ("pixel_values", "image_grid_thw", "mm_token_type_ids")}
        caller_input_ids = input_ids
        if kwargs.get("generation_config") is None:
            kwargs.pop("generation_config", None)  # passing it with other arguments is deprecated; leave it out
        generation_config = kwargs.get("generation_config") or self.generation_config
        stage1_kwargs = self._stage_kwargs(kwargs, self.config.stage1_generation_kwargs, stage1_overrides)
        stage2_kwargs = self._stage_kwargs(kwargs, self.config.stage2_generation_kwargs, stage2_overrides)
        processor = context.processor
        stop_ids = _stop_token_ids(generation_config, processor)
        pad_id = _pad_token_id(generation_config, processor)
        # Generation needs left padding; collators may have padded on the right.
        input_ids, attention_mask, vision["mm_token_type_ids"] = _left_align(
            [input_ids, attention_mask, vision["mm_token_type_ids"]], attention_mask, [pad_id, 0, 0]
        )
        prompt_length = input_ids.shape[1]

        started = time.perf_counter()
        stage1 = super().generate(
            input_ids=input_ids, attention_mask=attention_mask, **vision, **stage1_kwargs
        )
        stage1_completions = [_until_stop(row, stop_ids) for row in stage1.sequences[:, prompt_length:]]
        stage1_texts = processor.batch_decode(stage1_completions, skip_special_tokens=True)
        stage1_done = time.perf_counter()

        decisions = processor.plan_stage2(context, stage1_texts, skip_answered=self.config.skip_answered_stage2)
        rows = [index for index, decision in enumerate(decisions) if decision.image is not None]
        turns = [
            processor.stage2_turn(
                decisions[index], context.samples[index].stage2_question, context.stage2_template
            ).to(input_ids.device)
            for index in rows
        ]
        cache, stage1.past_key_values = stage1.past_key_values, None
        if not self._can_continue(cache, stage1_kwargs, stage2_kwargs, generation_config):
            cache = None  # re-prefill; the stage-1 cache is freed here
        if not rows:
            stage2_inputs = {}
        elif cache is not None:
            stage2_kwargs.pop("cache_implementation", None)  # the cache is given
            stage2_inputs = self._stage2_continuation(
                turns, rows, stage1.sequences, attention_mask, vision, stage1_completions, cache, pad_id
            )
        else:
            stage2_inputs = self._stage2_prefill(
                turns, rows, input_ids, attention_mask, vision, stage1_completions, pad_id
            )
        zoom_done = time.perf_counter()

        answers = [stage1.sequences[index, prompt_length:] for index in range(len(decisions))]
        prefill_tokens = stage2_inputs.pop("prefill_tokens", [0] * len(rows))
        if rows:
            if "crop_pixel_values" in stage2_inputs:  # continuation: encode only the crops (stage 2's vision work)
                stage2_inputs["mm_encoder_outputs"] = {"image": self.model.get_image_features(
                    stage2_inputs.pop("crop_pixel_values"), stage2_inputs.pop("crop_grid_thw"), return_dict=True)}
            stage2 = super().generate(**stage2_inputs, **stage2_kwargs).sequences
            for row, index in enumerate(rows):
                answers[index] = stage2[row, stage2_inputs["input_ids"].shape[1]:]
        finished = time.perf_counter()

        sequences = torch.cat([caller_input_ids, _pad(answers, pad_id, left=False)[0]], dim=1)
        if not return_dict:
            return sequences
        timings = {
            "stage1": stage1_done - started,
            "zoom": zoom_done - stage1_done,
            "stage2": finished - zoom_done,
            "total": finished - started,
        }
        stage1_tokens = (vision["image_grid_thw"].prod(dim=-1) // processor.image_processor.merge_size**2).tolist()
        tokens = []
        for index, (sample, decision) in enumerate(zip(context.samples, decisions)):
            second = processor.second_image_tokens(decision)
            tokens.append({
                "stage1": stage1_tokens[index],
                "stage2": second,
                "total": stage1_tokens[index] + second,
                "full_resolution": processor.full_resolution_tokens(sample.image),
            })
        return ErgoGenerateOutput(
            sequences=sequences,
            stage1_texts=stage1_texts,
            regions=[decision.region for decision in decisions],
            crop_sizes=[decision.image.size if decision.image is not None else None for decision in decisions],
            vision_tokens=tokens,
            fallbacks=[decision.fallback for decision in decisions],
            fallback_policy=context.fallback,
            timings=[dict(timings) for _ in decisions],
            stage2_prefill_tokens=_scatter(prefill_tokens, rows, len(decisions)),
        )

    def _can_continue(self, cache, stage1_kwargs: dict, stage2_kwargs: dict, generation_config: GenerationConfig) -> bool:
        """Stage 2 reuses stage 1's cache when asked to, when that cache holds one row per sample in order (a
        dynamic cache from sampling or greedy search; beam search reorders and multiplies rows) and when stage 2
        does not search with beams either."""
        beams = [kwargs.get("num_beams", generation_config.num_beams) or 1 for kwargs in (stage1_kwargs, stage2_kwargs)]
        return self.config.reuse_stage1_cache and isinstance(cache, DynamicCache) and beams == [1, 1]

    def _stage2_prefill(self, turns, rows, input_ids, attention_mask, vision, completions, pad_id) -> dict:
        """Stage 2 from scratch, for the samples in ``rows``: each sample's stage-1 prompt and answer as they were,
        then its new turn (end of the stage-1 turn, user turn with the second image, assistant header)."""
        sequences, token_types, pixels, grids = [], [], [], []
        image_pixels = vision["pixel_values"].split(vision["image_grid_thw"].prod(dim=-1).tolist())
        for turn, index in zip(turns, rows):
            keep = attention_mask[index].bool()
            sequences.append(torch.cat([input_ids[index][keep], completions[index], turn["input_ids"][0]]))
            token_types.append(torch.cat([
                vision["mm_token_type_ids"][index][keep],
                torch.zeros_like(completions[index]),
                turn["mm_token_type_ids"][0],
            ]))
            pixels += [image_pixels[index], turn["pixel_values"]]
            grids += [vision["image_grid_thw"][index:index + 1], turn["image_grid_thw"]]
        ids, mask = _pad(sequences, pad_id)
        types, _ = _pad(token_types, 0)
        pixel_values = vision["pixel_values"]
        return {
            "input_ids": ids,
            "attention_mask": mask,
            "mm_token_type_ids": types,
            "pixel_values": torch.cat([p.to(pixel_values.device, pixel_values.dtype) for p in pixels]),
            "image_grid_thw": torch.cat(grids),
            "prefill_tokens": [len(sequence) for sequence in sequences],
        }

    def _stage2_continuation(self, turns, rows, stage1_sequences, prompt_mask, vision, completions, cache, pad_id) -> dict:
        """Stage 2 as a continuation of stage 1's KV cache: only the new turn is prefilled.

        The history is stage 1's own batch (prompt, generated tokens), with everything from each sample's stop token
        on masked out, so cached positions are reused as they are; the new turns follow, left-padded to a common
        width. M-RoPE positions are computed by transformers over the whole sequence (``image_grid_thw`` lists both
        images of every row); only the crop goes through the vision encoder.
        """
        device = stage1_sequences.device
        generated = stage1_sequences.shape[1] - prompt_mask.shape[1]
        kept = torch.zeros(len(completions), generated, dtype=prompt_mask.dtype, device=device)
        for index, completion in enumerate(completions):
            kept[index, : len(completion)] = 1
        history_mask = torch.cat([prompt_mask, kept], dim=1)[rows]
        history_types = torch.cat([vision["mm_token_type_ids"], torch.zeros_like(kept)], dim=1)[rows]
        turn_ids, turn_mask = _pad([turn["input_ids"][0] for turn in turns], pad_id)
        turn_types, _ = _pad([turn["mm_token_type_ids"][0] for turn in turns], 0)
        if len(rows) != len(completions):
            cache.batch_select_indices(torch.tensor(rows))
        grids = []
        for turn, index in zip(turns, rows):
            grids += [vision["image_grid_thw"][index:index + 1], turn["image_grid_thw"]]
        return {
            "input_ids": torch.cat([stage1_sequences[rows], turn_ids], dim=1),
            "attention_mask": torch.cat([history_mask, turn_mask], dim=1),
            "mm_token_type_ids": torch.cat([history_types, turn_types], dim=1),
            "image_grid_thw": torch.cat(grids),
            "crop_pixel_values": torch.cat([turn["pixel_values"] for turn in turns]),
            "crop_grid_thw": torch.cat([turn["image_grid_thw"] for turn in turns]),
            "past_key_values": cache,
            # each row's new turn, plus its last stage-1 token, which generation never fed back
            "prefill_tokens": [len(turn["input_ids"][0]) + 1 for turn in turns],
        }


def _stop_token_ids(generation_config: GenerationConfig, processor) -> set[int]:
    eos = generation_config.eos_token_id
    ids = set(eos if isinstance(eos, (list, tuple)) else [eos] if eos is not None else [])
    ids.add(processor.tokenizer.convert_tokens_to_ids(processor.tokenizer.eos_token))
    if generation_config.pad_token_id is not None:
        ids.add(generation_config.pad_token_id)
    return ids


def _until_stop(tokens, stop_ids: set[int]):
    """The generated tokens (a tensor or a list) before the first end-of-sequence or padding token."""
    for position, token in enumerate(tokens.tolist() if isinstance(tokens, torch.Tensor) else tokens):
        if token in stop_ids:
            return tokens[:position]
    return tokens


def _pad_token_id(generation_config: GenerationConfig, processor) -> int:
    for candidate in (generation_config.pad_token_id, processor.tokenizer.pad_token_id):
        if candidate is not None:
            return candidate
    return processor.tokenizer.convert_tokens_to_ids(processor.tokenizer.eos_token)


def _left_align(tensors: list[torch.Tensor], attention_mask: torch.Tensor, fills: list[int]) -> list[torch.Tensor]:
    """``tensors`` (batch x length, aligned with ``attention_mask``) with every row's real tokens moved right."""
    if bool(attention_mask[:, -1].all()):
        return tensors
    keep = attention_mask.bool()
    lengths = keep.sum(dim=1).tolist()
    aligned = []
    for tensor, fill in zip(tensors, fills):
        out = torch.full_like(tensor, fill)
        for row, length in enumerate(lengths):
            out[row, tensor.shape[1] - length:] = tensor[row][keep[row]]
        aligned.append(out)
    return aligned


def _pad(rows: list[torch.Tensor], fill: int, left: bool = True) -> tuple[torch.Tensor, torch.Tensor]:
    """``rows`` stacked with padding on the left (generation inputs) or right (answers), and the attention mask."""
    width = max(len(row) for row in rows)
    out = rows[0].new_full((len(rows), width), fill)
    mask = torch.zeros_like(out)
    for index, row in enumerate(rows):
        span = slice(width - len(row), width) if left else slice(0, len(row))
        out[index, span] = row
        mask[index, span] = 1
    return out, mask


def _scatter(values: list[int], rows: list[int], size: int) -> list[int]:
    out = [0] * size
    for value, index in zip(values, rows):
        out[index] = value
    return out


ErgoForConditionalGeneration.register_for_auto_class("AutoModelForImageTextToText")

__all__ = ["ErgoForConditionalGeneration", "ErgoGenerateOutput"]
