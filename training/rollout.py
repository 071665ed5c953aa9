"""ERGO's two-stage rollout inside TRL's GRPOTrainer, built with the code inference uses.

Per sample: the policy sees the coarse view (ERGO's resize of the dataset's full-resolution ``image``) and the
stage-1 prompt and writes its region; ``ErgoProcessor.plan_zooms`` maps and crops it exactly as
``ErgoForConditionalGeneration.generate`` does; ``ErgoProcessor.stage2_turn_tokens`` closes the turn and appends the
crop with the stage-2 prompt; the policy answers. The completion TRL trains on is
``stage-1 tokens + injected turn + stage-2 tokens`` with the injected turn masked out of the loss
(``tool_mask``), and the loss forward gets both images per sample, each at its own size.

Why a subclass and not TRL's tool loop or ``rollout_func`` (trl 1.16, pinned): ``rollout_func`` cannot add the
crop to the loss forward, and the tool loop needs a tool-call format, drops the second turn silently when the
length budget runs out, and has no per-stage limits. This overrides three methods (``_generate_and_score_completions``
to see the batch's rows, ``_generate`` to run the stages, ``_calculate_rewards`` to void scores that must not reach
an advantage) and reuses TRL's own single-turn generator for both stages.
"""

from __future__ import annotations

import time

import torch
from trl import GRPOTrainer
from trl.data_utils import prepare_multimodal_messages

from modeling_ergo.generation_ergo import tokens_until_stop
from processing_ergo import ErgoProcessor
from processing_ergo.images_ergo import load_image

from .config import ErgoGRPOConfig
from .rewards import area_share


def _routes_images_per_sample():
    """Never called. A non-empty ``tools`` list makes TRL build the loss forward's pixel values from every image of
    every sample (each at its own size) and its ``mm_token_type_ids`` from the full sequence."""


class ErgoGRPOTrainer(GRPOTrainer):
    """GRPOTrainer whose rollouts are ERGO's two stages. Dataset rows: ``training.data.to_grpo_rows``.

    Reward functions receive, besides the dataset columns (``image`` is the full-resolution original):
    ``completions``, one conversation per rollout of two assistant messages, ``[stage 1, stage 2]`` (so
    ``completion[0]["content"]`` is stage 1's region request, not the answer); ``answer_text``, stage 2's reply
    (the final answer) on its own; ``stage1_text`` (= ``completion[0]["content"]``); ``completion_ids``, the
    tokens the policy wrote (stage 1, its end token, stage 2; never the injected turn's image tokens); ``region``
    (original pixels, or None when stage 1 gave no usable region); ``crop`` (stage 2's image: the region, or the
    whole image resized when there was none); ``fallback``; ``stage2_template`` (the template stage 2 was asked
    with).

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
        vision_ids = processor.tokenizer.convert_tokens_to_ids(
            ["<|image_pad|>", "<|video_pad|>", "<|vision_start|>", "<|vision_end|>", "<|vision_pad|>"])
        generation_kwargs = dict(args_.generation_kwargs or {})
        generation_kwargs["suppress_tokens"] = sorted(set(generation_kwargs.get("suppress_tokens", [])) | set(vision_ids))
        args_.generation_kwargs = generation_kwargs
        args_.apply_to(processor)  # the rollout builds its views with the processor's budgets and template
        super().__init__(*args, **kwargs)
        self.tools = [_routes_images_per_sample]
        # TRL's masking zeroes the whole completion's attention, the crop's image tokens included (a shape mismatch
        # in the loss forward); `_generate` masks the loss of a truncated rollout instead.
        self.mask_truncated_completions = False
        # Dr. GRPO divides by the most tokens a completion can train: both stages (the bound TRL set is stage 1's).
        self.max_completion_length = args_.max_completion_length + args_.stage2_max_completion_length
        # TRL gathers every rollout's images to every rank for the completions table, which only logs them with
        # `log_completions`.
        self.log_multimodal = args_.log_multimodal and args_.log_completions

    def _generate_and_score_completions(self, inputs):
        # `_generate` only gets the prompts; stage 2 needs the full image and the question. TRL would put the
        # original into every prompt and gather the prompts to every rank for its logs, so it never sees it: the
        # rollout hands the originals to the rewards as an extra field.
        self._batch_rows = inputs
        return super()._generate_and_score_completions(
            [{key: value for key, value in row.items() if key != "image"} for row in inputs])

    def _generate(self, prompts: list):
        # Under bf16/fp16 the rollout computes as the loss forward does, also when the weights are fp32 (full
        # fine-tuning without DeepSpeed), so generation neither runs in fp32 nor holds an fp32 KV cache.
        with self.accelerator.autocast():
            return self._two_stage_rollout(prompts)

    def _two_stage_rollout(self, prompts: list):
        processor, tokenizer, args = self.processing_class, self._tokenizer, self.args
        mode = "train" if self.model.training else "eval"
        originals = [load_image(row["image"], name="training image") for row in self._batch_rows]
        context, coarse_views = processor.make_context(originals, [row["stage2_question"] for row in self._batch_rows])
        prompts = [prepare_multimodal_messages(prompt, [view]) for prompt, view in zip(prompts, coarse_views)]

        started = time.perf_counter()
        tools, self.tools = self.tools, []  # stage 1 is TRL's plain single-turn generation
        try:
            prompt_ids, stage1_ids, _, _, logprobs, extra_fields, _, _ = super()._generate(prompts)  # logprobs: None
        finally:
            self.tools = tools
        stage1_done = time.perf_counter()

        stop_ids = set(self.eos_token_ids) | {tokenizer.pad_token_id}
        stage1_ids = [list(ids) for ids in stage1_ids]
        stage1_tokens = [tokens_until_stop(ids, stop_ids) for ids in stage1_ids]
        stage1_texts = tokenizer.batch_decode(stage1_tokens, skip_special_tokens=True)
        stage1_cut = [len(tokens) == len(ids) for tokens, ids in zip(stage1_tokens, stage1_ids)]  # no stop token
        decisions = processor.plan_zooms(context, stage1_texts, truncated=stage1_cut)

        # With the `resize` fallback (checked at init) every rollout has a second image, so every rollout has a stage 2.
        completion_ids, loss_mask, stage2_prompts, stage2_images = [], [], [], []
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
            stage2_images.append([coarse_views[index], decision.image])
        zoom_done = time.perf_counter()

        # The same image-processor call TRL's loss forward makes; ERGO's images are already sized, so none is resized.
        pixels = processor.image_processor(images=[image for pair in stage2_images for image in pair], return_tensors="pt")
        fields = {"pixel_values": pixels["pixel_values"], "image_grid_thw": pixels["image_grid_thw"]}
        limit = self.generation_config.max_new_tokens
        self.generation_config.max_new_tokens = args.stage2_max_completion_length
        try:
            stage2_ids, _ = self._generate_single_turn(
                stage2_prompts, stage2_images, fields, num_generations=1, has_tool_images=True)
        finally:
            self.generation_config.max_new_tokens = limit
        stage1_lengths = [sum(mask) for mask in loss_mask]
        stage2_texts, stage2_cut, self._policy_ids = [], [], []
        for index, answer in enumerate(stage2_ids):
            answer = list(answer)
            answer_tokens = tokens_until_stop(answer, stop_ids)
            stage2_cut.append(len(answer_tokens) == len(answer))
            self._policy_ids.append([t for t, keep in zip(completion_ids[index], loss_mask[index]) if keep] + answer)
            completion_ids[index] += answer
            loss_mask[index] += [1] * len(answer)
            stage2_texts.append(tokenizer.decode(answer_tokens, skip_special_tokens=True))
        self._truncated = [first or second for first, second in zip(stage1_cut, stage2_cut)]
        if args.mask_truncated_completions:
            loss_mask = [[0] * len(mask) if cut else mask for mask, cut in zip(loss_mask, self._truncated)]
        finished = time.perf_counter()

        completions = [[{"role": "assistant", "content": first}, {"role": "assistant", "content": second}]
                       for first, second in zip(stage1_texts, stage2_texts)]
        extra_fields = {
            **extra_fields,
            "image": originals,
            "stage1_text": stage1_texts,
            "answer_text": stage2_texts,
            "region": [decision.region for decision in decisions],
            "crop": [decision.image for decision in decisions],
            "fallback": [decision.fallback for decision in decisions],
            "stage2_template": [context.stage2_template] * len(decisions),
        }
        metrics = self._metrics[mode]
        metrics["ergo/fallback_share"].append(sum(d.fallback is not None for d in decisions) / len(decisions))
        # TRL's completions/* metrics are stage 1's (its generate call); these count what each stage trains.
        stage2_lengths = [len(answer) for answer in stage2_ids]
        for name, values in (("stage1_length", stage1_lengths), ("stage2_length", stage2_lengths),
                             ("stage1_clipped_ratio", stage1_cut), ("stage2_clipped_ratio", stage2_cut)):
            gathered = self.accelerator.gather(torch.tensor(values, dtype=torch.float32, device=self.accelerator.device))
            metrics[f"ergo/{name}"].append(gathered.mean().item())
        metrics["ergo/stage1_s"].append(stage1_done - started)
        metrics["ergo/zoom_s"].append(zoom_done - stage1_done)
        metrics["ergo/stage2_s"].append(finished - zoom_done)
        self._log_regions(metrics, originals, decisions)
        tool_images = [[decision.image] for decision in decisions]
        return prompt_ids, completion_ids, loss_mask, completions, logprobs, extra_fields, stage2_images, tool_images

    def _log_regions(self, metrics, originals: list, decisions: list) -> None:
        """What r_TCE is about, over the rollouts of all processes: ``ergo/region_area_share``, the mean share of the
        image the crop was cut from (1 for a rollout without a region: stage 2 sees the whole image), and, when rows
        carry ``gt_bbox``, ``ergo/region_holds_gt_share``, the share of those rollouts whose region holds the whole
        box (rollouts without a region count as not holding it)."""
        areas, holds = [], []
        for row, image, decision in zip(self._batch_rows, originals, decisions):
            region, gt_box = decision.region, row.get("gt_bbox")
            areas.append(area_share(region, image) if region is not None else 1.0)
            if gt_box is not None:
                holds.append(float(region is not None and region[0] <= gt_box[0] and region[1] <= gt_box[1]
                                   and region[2] >= gt_box[2] and region[3] >= gt_box[3]))
        device = self.accelerator.device
        metrics["ergo/region_area_share"].append(self.accelerator.gather(torch.tensor(areas, device=device)).mean().item())
        # Counts rather than a mean per process: processes may hold different numbers of rows with a box.
        held = self.accelerator.gather(torch.tensor([[sum(holds), len(holds)]], device=device)).sum(dim=0).tolist()
        if held[1]:
            metrics["ergo/region_holds_gt_share"].append(held[0] / held[1])

    def _calculate_rewards(self, inputs, prompts, completions, completion_ids_list):
        """TRL's rewards (over the policy's own tokens), with void rows set to NaN (see the class docstring);
        ``ergo/reward_s`` is the time they took on this process (the judge's requests included)."""
        started = time.perf_counter()
        rewards = super()._calculate_rewards(inputs, prompts, completions, self._policy_ids)
        mode = "train" if self.model.training else "eval"
        self._metrics[mode]["ergo/reward_s"].append(time.perf_counter() - started)
        size = self.num_generations if mode == "train" else self.num_generations_eval
        missing = rewards.isnan().view(-1, size, rewards.size(1))
        failed_groups = (missing.any(dim=1) & ~missing.all(dim=1)).any(dim=1)
        void = failed_groups.repeat_interleave(size)
        if self.args.mask_truncated_completions:
            void |= self.accelerator.gather(torch.tensor(self._truncated, device=rewards.device))
        rewards[void] = torch.nan
        self._metrics[mode]["ergo/failed_group_share"].append(failed_groups.float().mean().item())
        self._metrics[mode]["ergo/void_share"].append(void.float().mean().item())
        return rewards

