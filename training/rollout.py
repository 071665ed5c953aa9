"""ERGO's two-stage rollout inside TRL's GRPOTrainer, built with the code inference uses.

Per sample: the policy sees the coarse view (ERGO's resize of the dataset's full-resolution ``image``) and the
stage-1 prompt and writes its region; ``ErgoProcessor.plan_zooms`` maps and crops it exactly as
``ErgoForConditionalGeneration.generate`` does; ``ErgoProcessor.stage2_turn_tokens`` closes the turn and appends the
crop with the stage-2 prompt; the policy answers. The completion TRL trains on is
``stage-1 tokens + injected turn + stage-2 tokens`` with the injected turn masked out of the loss
(``tool_mask``), and the loss forward gets both images per sample, each at its own size.

Why not TRL's tool loop or ``rollout_func`` (trl 1.16, pinned): ``rollout_func`` cannot add the crop to the loss
forward (``docs/trl-rollout-images.md``), and the tool loop needs a tool-call format, drops the second turn silently
when the length budget runs out, and has no per-stage limits. The trainer builds on ``training.trl_adapter``, the one
module that touches ``GRPOTrainer``'s private methods.
"""

from __future__ import annotations

import time

import numpy as np
import torch
from trl.data_utils import prepare_multimodal_messages

from modeling_ergo.generation_ergo import ran_out_of_tokens, tokens_until_stop, vision_placeholder_ids
from processing_ergo import ErgoProcessor
from processing_ergo.images_ergo import load_image

from .config import ErgoGRPOConfig
from .rewards import area_share
from .trl_adapter import Rollout, RolloutGRPOTrainer


class ErgoGRPOTrainer(RolloutGRPOTrainer):
    """GRPOTrainer whose rollouts are ERGO's two stages. Dataset rows: ``training.data.to_grpo_rows``.

    Reward functions receive, besides the dataset columns (``image`` is the full-resolution original):
    ``completions``, one conversation per rollout of two assistant messages, ``[stage 1, stage 2]`` (so
    ``completion[0]["content"]`` is stage 1's region request, not the answer); ``answer_text``, stage 2's reply
    (the final answer) on its own; ``stage1_text`` (= ``completion[0]["content"]``); ``completion_ids``, the
    tokens the policy wrote (stage 1, its end token, stage 2; never the injected turn's image tokens); ``region``
    (original pixels, or None when stage 1 gave no usable region); ``crop`` (stage 2's image: the region, or the
    whole image resized when there was none); ``fallback``; ``stage2_template`` (the template stage 2 was asked
    with); ``truncated`` (the rollout was cut off in either stage).

    Scores that must not reach an advantage are voided (TRL's "unscorable": out of the group baseline, advantage
    0): every rollout of a group in which a reward function returned None for some rollouts but not all (a failed
    score, e.g. a reward-model request; a function returning None for a whole group is left out of that group, as
    TRL does), and, with ``mask_truncated_completions``, every rollout cut off in either stage, whose loss is masked
    too (attention and the crop's image tokens stay, unlike TRL's own masking, which would hide them).
    """

    def __init__(self, *args, **kwargs):
        if any(kwargs.get(name) for name in ("tools", "environment_factory", "rollout_func")):
            raise ValueError("ErgoGRPOTrainer runs its own two-stage rollout; tools, environment_factory and "
                             "rollout_func cannot be combined with it")
        args_ = kwargs.get("args") or (args[2] if len(args) > 2 else None)
        if not isinstance(args_, ErgoGRPOConfig):
            raise TypeError("ErgoGRPOTrainer needs an ErgoGRPOConfig as args")
        if args_.use_vllm or args_.use_transformers_continuous_batching:
            raise ValueError("ErgoGRPOTrainer generates with transformers; vLLM and continuous batching are not "
                             "supported yet (the two-stage rollout is not wired to them)")
        processor = kwargs.get("processing_class")
        if not isinstance(processor, ErgoProcessor) or processor.fallback != "resize":
            # Every rollout must have a second image: ranks then make the same generate calls (no ZeRO-3 hang), and
            # every loss forward takes the same per-image path.
            raise ValueError("ErgoGRPOTrainer needs an ErgoProcessor with fallback='resize' as processing_class")
        # Sampling a vision placeholder would break the image-token accounting of the loss forward.
        generation_kwargs = dict(args_.generation_kwargs or {})
        generation_kwargs["suppress_tokens"] = sorted(
            set(generation_kwargs.get("suppress_tokens") or []) | vision_placeholder_ids(processor.tokenizer))
        args_.generation_kwargs = generation_kwargs
        args_.apply_to(processor)  # the rollout builds its views with the processor's budgets and template
        super().__init__(*args, **kwargs)
        args_.apply_to_model(self.model)
        # TRL's masking zeroes the whole completion's attention, the crop's image tokens included (a shape mismatch
        # in the loss forward); `rollout` masks the loss of a truncated rollout instead.
        self.mask_truncated_completions = False
        # Dr. GRPO divides by the most tokens a completion can train: both stages (the bound TRL set is stage 1's).
        self.max_completion_length = args_.max_completion_length + args_.stage2_max_completion_length
        # TRL gathers every rollout's images to every rank for the completions table, which only logs them with
        # `log_completions`.
        self.log_multimodal = args_.log_multimodal and args_.log_completions

    def rollout(self, rows: list[dict]) -> Rollout:
        # Under bf16/fp16 the rollout computes as the loss forward does, also when the weights are fp32 (full
        # fine-tuning without DeepSpeed), so generation neither runs in fp32 nor holds an fp32 KV cache.
        with self.accelerator.autocast():
            return self._two_stage_rollout(rows)

    def generate_stage(self, stage: int, prompt_ids: list[list[int]], pixel_fields: dict) -> list[list[int]]:
        """Stage ``stage``'s (1 or 2) tokens for each prompt, within that stage's length limit."""
        limit = self.args.max_completion_length if stage == 1 else self.args.stage2_max_completion_length
        return self.generate_turn(prompt_ids, pixel_fields, self.with_max_new_tokens(limit))

    def _two_stage_rollout(self, rows: list[dict]) -> Rollout:
        processor, tokenizer, args = self.processing_class, self._tokenizer, self.args
        mode = "train" if self.model.training else "eval"
        originals = [load_image(row["image"], name="training image") for row in rows]
        context, coarse_views = processor.make_context(originals, [row["stage2_question"] for row in rows])
        prompts = [prepare_multimodal_messages(row["prompt"], [view]) for row, view in zip(rows, coarse_views)]

        started = time.perf_counter()
        stage1 = processor.apply_chat_template(conversation=prompts, add_generation_prompt=True, tokenize=True,
                                               return_dict=True, **self.chat_template_kwargs)
        prompt_ids = stage1["input_ids"]
        stage1_ids = self.generate_stage(1, prompt_ids, {key: torch.tensor(np.array(stage1[key]))
                                                         for key in ("pixel_values", "image_grid_thw")})
        stage1_done = time.perf_counter()

        stage1_tokens = [tokens_until_stop(ids, self.stop_ids) for ids in stage1_ids]
        stage1_texts = tokenizer.batch_decode(stage1_tokens, skip_special_tokens=True)
        stage1_cut = [ran_out_of_tokens(len(tokens), len(ids), args.max_completion_length)
                      for tokens, ids in zip(stage1_tokens, stage1_ids)]
        decisions = processor.plan_zooms(context, stage1_texts, truncated=stage1_cut)

        # With the `resize` fallback (checked at init) every rollout has a second image, so every rollout has a stage 2.
        completion_ids, loss_mask, stage2_prompts, images = [], [], [], []
        end_of_turn = tokenizer.convert_tokens_to_ids(tokenizer.eos_token)
        for index, (ids, tokens, decision) in enumerate(zip(stage1_ids, stage1_tokens, decisions)):
            turn = processor.stage2_turn_tokens(decision, context.samples[index].stage2_question,
                                                context.stage2_template)
            sequence = processor.stage2_sequence_tokens(prompt_ids[index], tokens, turn)
            # The turn opens with <|im_end|>: trained when the policy wrote it, injected (masked) when stage 1 was
            # cut off or stopped on another token, as inference closes the turn either way.
            wrote_end = len(ids) > len(tokens) and ids[len(tokens)] == end_of_turn
            turn_length = sequence.turn.stop - sequence.turn.start
            completion_ids.append(sequence.input_ids[sequence.reply.start:])
            loss_mask.append([1] * len(tokens) + [int(wrote_end)] + [0] * (turn_length - 1))
            stage2_prompts.append(sequence.input_ids)
            images.append([coarse_views[index], decision.image])
        zoom_done = time.perf_counter()

        # The same image-processor call TRL's loss forward makes; ERGO's images are already sized, so none is resized.
        pixels = processor.image_processor(images=[image for pair in images for image in pair], return_tensors="pt")
        stage2_ids = self.generate_stage(2, stage2_prompts, {"pixel_values": pixels["pixel_values"],
                                                             "image_grid_thw": pixels["image_grid_thw"]})
        stage1_lengths = [sum(mask) for mask in loss_mask]
        stage2_texts, stage2_cut, policy_ids = [], [], []
        for index, answer in enumerate(stage2_ids):
            answer_tokens = tokens_until_stop(answer, self.stop_ids)
            stage2_cut.append(ran_out_of_tokens(len(answer_tokens), len(answer), args.stage2_max_completion_length))
            policy_ids.append([t for t, keep in zip(completion_ids[index], loss_mask[index]) if keep] + answer)
            completion_ids[index] += answer
            loss_mask[index] += [1] * len(answer)
            stage2_texts.append(tokenizer.decode(answer_tokens, skip_special_tokens=True))
        truncated = [first or second for first, second in zip(stage1_cut, stage2_cut)]
        if args.mask_truncated_completions:
            loss_mask = [[0] * len(mask) if cut else mask for mask, cut in zip(loss_mask, truncated)]
        finished = time.perf_counter()

        completions = [[{"role": "assistant", "content": first}, {"role": "assistant", "content": second}]
                       for first, second in zip(stage1_texts, stage2_texts)]
        extra_fields = {
            "image": originals,
            "stage1_text": stage1_texts,
            "answer_text": stage2_texts,
            "region": [decision.region for decision in decisions],
            "crop": [decision.image for decision in decisions],
            "fallback": [decision.fallback for decision in decisions],
            "stage2_template": [context.stage2_template] * len(decisions),
            "completion_ids": policy_ids,
            "truncated": truncated,
        }
        metrics = self._metrics[mode]
        metrics["ergo/fallback_share"].append(sum(d.fallback is not None for d in decisions) / len(decisions))
        # What each stage trains (TRL's completions/* count both stages together).
        stage2_lengths = [len(answer) for answer in stage2_ids]
        for name, values in (("stage1_length", stage1_lengths), ("stage2_length", stage2_lengths),
                             ("stage1_clipped_ratio", stage1_cut), ("stage2_clipped_ratio", stage2_cut)):
            metrics[f"ergo/{name}"].append(self.across_processes(values).mean().item())
        self._log_stage_times(metrics, {"stage1": stage1_done - started, "zoom": zoom_done - stage1_done,
                                        "stage2": finished - zoom_done},
                              {"stage1": sum(map(len, stage1_ids)), "stage2": sum(stage2_lengths)})
        self._log_regions(metrics, rows, originals, decisions)
        return Rollout(prompt_ids, completion_ids, loss_mask, completions, images, extra_fields)

    def _log_stage_times(self, metrics, seconds: dict[str, float], tokens: dict[str, int]) -> None:
        """``ergo/<phase>_s``, the slowest process's seconds (the step waits for it); ``ergo/<stage>_tokens``, the
        tokens each stage generated on all processes, every reply up to and including its stop token (as a chat
        engine's ``usage.completion_tokens`` counts them); ``ergo/<stage>_tokens_per_s``, the two divided."""
        slowest = self.across_processes(list(seconds.values())).view(-1, len(seconds)).max(dim=0).values.tolist()
        total = self.across_processes(list(tokens.values())).view(-1, len(tokens)).sum(dim=0).tolist()
        seconds = dict(zip(seconds, slowest))
        for name, value in seconds.items():
            metrics[f"ergo/{name}_s"].append(value)
        for name, count in zip(tokens, total):
            metrics[f"ergo/{name}_tokens"].append(count)
            metrics[f"ergo/{name}_tokens_per_s"].append(count / seconds[name])

    def _log_regions(self, metrics, rows: list[dict], originals: list, decisions: list) -> None:
        """What r_TCE is about, over the rollouts of all processes: ``ergo/region_area_share``, the mean share of the
        image the crop was cut from (1 for a rollout without a region: stage 2 sees the whole image), and, when rows
        carry ``gt_bbox``, ``ergo/region_holds_gt_share``, the share of those rollouts whose region holds the whole
        box (rollouts without a region count as not holding it)."""
        areas, holds = [], []
        for row, image, decision in zip(rows, originals, decisions):
            region, gt_box = decision.region, row.get("gt_bbox")
            areas.append(area_share(region, image) if region is not None else 1.0)
            if gt_box is not None:
                holds.append(float(region is not None and region[0] <= gt_box[0] and region[1] <= gt_box[1]
                                   and region[2] >= gt_box[2] and region[3] >= gt_box[3]))
        metrics["ergo/region_area_share"].append(self.across_processes(areas).mean().item())
        # Counts rather than a mean per process: processes may hold different numbers of rows with a box.
        held = self.across_processes([sum(holds), len(holds)]).view(-1, 2).sum(dim=0).tolist()
        if held[1]:
            metrics["ergo/region_holds_gt_share"].append(held[0] / held[1])

    def adjust_rewards(self, rewards: torch.Tensor, inputs: list[dict]) -> torch.Tensor:
        """Void rows set to NaN (see the class docstring)."""
        mode = "train" if self.model.training else "eval"
        size = self.num_generations if mode == "train" else self.num_generations_eval
        missing = rewards.isnan().view(-1, size, rewards.size(1))
        failed_groups = (missing.any(dim=1) & ~missing.all(dim=1)).any(dim=1)
        void = failed_groups.repeat_interleave(size)
        if self.args.mask_truncated_completions:
            void |= self.accelerator.gather(torch.tensor([row["truncated"] for row in inputs], device=rewards.device))
        rewards[void] = torch.nan
        self._metrics[mode]["ergo/failed_group_share"].append(failed_groups.float().mean().item())
        self._metrics[mode]["ergo/void_share"].append(void.float().mean().item())
        return rewards
