"""Supervised warm-up on ERGO's two-turn format, with TRL's SFTTrainer.

GRPO can only reward regions a policy already writes, so a model that has never produced ``<zoom>[...]</zoom>`` is
first shown the format. Each dataset row with a region (``region``, else ``gt_bbox``, in original pixels) gives
examples of six kinds, each from a share of the rows (``ErgoSFTConfig.ergo_share`` and so on):

* ``stage1``: stage 1 alone (ERGO's stage-1 input and the reply naming the region): the cheap kind that teaches
  where to zoom, so a model that must learn to point can see many more images than two-stage examples allow;
* ``ergo``: the two-stage conversation, token for token as ``ErgoForConditionalGeneration.generate`` builds it
  (``ErgoProcessor.prepare``, the stage-1 reply, ``plan_zooms`` on that reply, ``stage2_turn_tokens``, the answer), so
  the crop is exactly the one inference would cut for that box;
* ``stage2``: stage 2's turn alone (ERGO's system prompt, the crop, the stage-2 prompt) and stage 2's reply: the
  crop sits as far before the reply as in the conversation, without the coarse view and stage 1's turn before it;
* ``crop``: one plain turn over the crop alone, answered with the letter: what r_region's frozen reward model is
  asked, so the warm-up model can serve as that reward model;
* ``full``: one plain turn over the whole image at native resolution: the single-pass baseline's skill;
* ``evidence``: one plain turn over the ``gt_bbox`` crop alone (a few vision tokens), cut as an inference crop is.

Replies: stage 1 ``<think> ... </think> <zoom>[box in coarse pixels]</zoom>``; stage 2 ``<think> The enlarged image
shows <option text>. </think> <answer><letter></answer>``; single turns the letter alone (the prompt asks for it).
Only the replies (and the end-of-turn token each writes) are trained; prompts and images are masked out.
"""

from __future__ import annotations

import math
from contextlib import nullcontext
from dataclasses import dataclass

import torch
from datasets import Dataset
from PIL import Image
from trl import SFTTrainer

from processing_ergo.family_ergo import RELATIVE_SCALE
from processing_ergo.geometry_ergo import IMAGE_FACTOR, PAPER_BUDGET, vision_tokens
from processing_ergo.images_ergo import load_image
from processing_ergo.processing_ergo import (FULL_RESOLUTION_BUDGET, ErgoContext, ErgoProcessor, ZoomDecision,
                                             parallel_map)
from processing_ergo.prompts_ergo import SYSTEM_PROMPT, stage_questions

from .config import ErgoSFTConfig
from .data import MULTIPLE_CHOICE_POSTFIX

STAGE1_REPLY = "<think> The question points to one object; zoom in on it. </think> <zoom>[{}, {}, {}, {}]</zoom>"
STAGE2_REPLY = "<think> The enlarged image shows {}. </think> <answer>{}</answer>"


def sft_rows(dataset: Dataset, shares: dict[str, float], coarse_budget: int = PAPER_BUDGET,
             crop_budget: int | None = None, factor: int = IMAGE_FACTOR) -> Dataset:
    """The examples, one row per (dataset row, kind) with the kind in column ``kind`` and the vision tokens it will
    hold in ``length`` (what the trainer groups batches by; ``factor``: the family's pixels per token side, the
    processor's ``factor``). Kind ``k`` comes from the first
    ``round(shares[k] * len(dataset))`` rows. Those rows must have the box their kind needs (``ergo``, ``crop``: a
    region; ``evidence``: a ``gt_bbox``)."""
    counts = {kind: round(share * len(dataset)) for kind, share in shares.items() if share > 0}
    region_column = "region" if "region" in dataset.column_names else "gt_bbox"
    _check_boxes(dataset, region_column, max(counts.get(kind, 0) for kind in ("stage1", "ergo", "stage2", "crop")),
                 "'stage1', 'ergo', 'stage2' and 'crop'")
    _check_boxes(dataset, "gt_bbox", counts.get("evidence", 0), "'evidence'")
    pairs = [(index, kind) for kind, count in counts.items() for index in range(count)]
    rows = dataset.select([index for index, _ in pairs])
    rows = rows.add_column("kind", [kind for _, kind in pairs])
    regions = dataset[region_column] if region_column in dataset.column_names else [None] * len(dataset)
    rows = rows.add_column("zoom_region", [regions[index] for index, _ in pairs])
    return rows.map(lambda row: {"length": _vision_tokens(row, coarse_budget, crop_budget or coarse_budget, factor)},
                    desc="sizing examples")


def _check_boxes(dataset: Dataset, column: str, rows: int, kinds: str) -> None:
    """The first ``rows`` rows must have a box in ``column``: a missing one raises rather than silently shrinking
    the dataset."""
    if not rows:
        return
    boxes = dataset[column][:rows] if column in dataset.column_names else [None] * rows
    missing = [index for index, box in enumerate(boxes) if box is None]
    if missing:
        raise ValueError(f"rows {missing[:10]} have no {column}: {kinds} examples need one (original pixels)")


def _vision_tokens(row: dict, coarse_budget: int, crop_budget: int, factor: int) -> int:
    """Roughly the vision tokens of an example, from the image header and the region (no decoding)."""
    with Image.open(row["image"]) if isinstance(row["image"], str) else nullcontext(row["image"]) as image:
        width, height = image.size
    if row["kind"] == "full":
        return min(vision_tokens(width, height, factor), FULL_RESOLUTION_BUDGET)
    if row["kind"] == "stage1":
        return coarse_budget
    x1, y1, x2, y2 = row["gt_bbox"] if row["kind"] == "evidence" else row["zoom_region"]
    crop = min(max(4, (x2 - x1) * (y2 - y1) // factor**2), crop_budget)
    return crop + (coarse_budget if row["kind"] == "ergo" else 0)


class ErgoSFTCollator:
    """Builds each example's token ids, pixel values and labels (replies only), then pads the batch on the right.

    A batch's examples are built side by side on a thread pool (PIL's decoding and resampling release the GIL). With
    ``views``, a dict kept by the caller, each (image path, region)'s ``RowViews`` are built once and reused by every
    example and phase that needs them; it holds a coarse view and a crop per row, so it suits a dataset that fits in
    memory that way (the synthetic recipe's)."""

    def __init__(self, processor: ErgoProcessor, postfix: str = MULTIPLE_CHOICE_POSTFIX, views: dict | None = None):
        self.processor, self.postfix, self.views = processor, postfix, views
        self.end_of_turn = processor.tokenizer.convert_tokens_to_ids(processor.tokenizer.eos_token)

    def __call__(self, rows: list[dict]) -> dict[str, torch.Tensor]:
        examples = parallel_map(self.example, rows)
        width = max(len(ids) for ids, _, _ in examples)
        pad = self.processor.tokenizer.pad_token_id
        batch = {
            "input_ids": torch.tensor([ids + [pad] * (width - len(ids)) for ids, _, _ in examples]),
            "attention_mask": torch.tensor([[1] * len(ids) + [0] * (width - len(ids)) for ids, _, _ in examples]),
            "labels": torch.tensor([labels + [-100] * (width - len(labels)) for _, labels, _ in examples]),
            "mm_token_type_ids": torch.tensor([types + [0] * (width - len(types)) for _, _, (types, _, _) in examples]),
            "pixel_values": torch.cat([pixels for _, _, (_, pixels, _) in examples]),
            "image_grid_thw": torch.cat([grid for _, _, (_, _, grid) in examples]),
        }
        return batch

    def example(self, row: dict) -> tuple[list[int], list[int], tuple[list[int], torch.Tensor, torch.Tensor]]:
        """(input ids, labels, (mm token types, pixel values, grid)) of one row."""
        letter, shown = answer_and_shown(row)
        options = row["options"] or []
        stem, full = stage_questions(row["question"], options, self.postfix if options else "")
        if row["kind"] == "full":
            image = load_image(row["image"], name="training image")
            return self._with_reply(self.processor.single_pass([image], [full]), letter)
        region = row["gt_bbox" if row["kind"] == "evidence" else "zoom_region"]
        views = row_views(self.processor, row["image"], region, self.views)
        if row["kind"] == "stage1":
            prompt = self.processor.stage1_inputs([stem], [views.coarse_view])
            return self._with_reply(prompt, self._reply1(views, region))
        if row["kind"] == "ergo":
            return self._two_stage(views, stem, full, region, letter, shown)
        if row["kind"] == "stage2":
            return self._stage2_alone(views, full, letter, shown)
        crop_budget = self.processor.crop_budget or self.processor.coarse_budget  # "crop" and "evidence"
        return self._with_reply(self.processor.single_pass([views.decision.image], [full], budget=crop_budget), letter)

    def _two_stage(self, views: RowViews, stem, full, region, letter, shown):
        """The conversation ``generate`` builds: stage 1's input, the reply naming ``region``, the turn bringing the
        crop, stage 2's reply."""
        processor = self.processor
        stage1 = processor.stage1_inputs([stem], [views.coarse_view])
        turn = processor.stage2_turn_tokens(views.decision, full, processor.stage2_template)
        reply1 = self._reply1(views, region)
        sequence = processor.stage2_sequence_tokens(stage1["input_ids"][0].tolist(), self._tokens(reply1), turn)
        reply2_ids = self._tokens(STAGE2_REPLY.format(shown, letter)) + [self.end_of_turn]
        ids = sequence.input_ids + reply2_ids
        # Trained: stage 1's reply, the end-of-turn token that opens the turn (stage 1 writes it, as in the rollout)
        # and stage 2's reply; the prompt and the rest of the injected turn are masked.
        labels = [-100] * len(ids)
        for span in (sequence.reply, slice(sequence.turn.start, sequence.turn.start + 1), slice(len(sequence.input_ids), len(ids))):
            labels[span] = ids[span]
        types = sequence.mm_token_type_ids + [0] * len(reply2_ids)
        pixels = torch.cat([stage1["pixel_values"], sequence.pixel_values])
        grid = torch.cat([stage1["image_grid_thw"], sequence.image_grid_thw])
        return ids, labels, (types, pixels, grid)

    def _stage2_alone(self, views: RowViews, full, letter, shown):
        """Stage 2's turn without stage 1's: ERGO's system prompt, then the crop and the stage-2 prompt as in
        ``_two_stage``, answered the same way. The crop sits as far from the reply as in the conversation."""
        system = [{"role": "system", "content": [{"type": "text", "text": SYSTEM_PROMPT}]}]
        messages = system + self.processor.stage2_turn_messages(full, self.processor.stage2_template)
        text = self.processor.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
        prompt = self.processor(text=[text], images=[views.decision.image], return_tensors="pt",
                                images_kwargs={"size": views.decision.processor_size})
        return self._with_reply(prompt, STAGE2_REPLY.format(shown, letter))

    def _reply1(self, views: RowViews, region: list[int]) -> str:
        return stage1_reply(region, views.original_size, views.coarse_view.size, self.processor.grounding)

    def _with_reply(self, prompt, text: str):
        """One turn: ``prompt``'s input, then ``text`` and the end-of-turn token, which alone are labelled."""
        prompt_ids = prompt["input_ids"][0].tolist()
        reply = self._tokens(text) + [self.end_of_turn]
        types = prompt["mm_token_type_ids"][0].tolist() + [0] * len(reply)
        return prompt_ids + reply, [-100] * len(prompt_ids) + reply, (types, prompt["pixel_values"], prompt["image_grid_thw"])

    def _tokens(self, text: str) -> list[int]:
        return self.processor.tokenizer.encode(text, add_special_tokens=False)


@dataclass(frozen=True)
class RowViews:
    """What the examples of one (image, region) pair are built from: the coarse view stage 1 sees, the original's
    size (the frame of stage 1's reply) and the crop inference cuts for a reply naming the region."""

    coarse_view: Image.Image
    original_size: tuple[int, int]
    decision: ZoomDecision


def row_views(processor: ErgoProcessor, image, region: list[int], cache: dict | None = None) -> RowViews:
    """The ``RowViews`` of ``image`` (a path or a PIL image) and ``region`` (original pixels), kept in ``cache`` by
    (path, region, the processor's budgets) when ``image`` is a path: decoding a 1344x1344 original and resizing it
    were half of building a supervised batch, and a row gives several examples in each phase
    (docs/synthetic-proof.md). A region that gives no crop raises."""
    key = None
    if cache is not None and isinstance(image, str):
        key = (image, tuple(region), processor.coarse_budget, processor.crop_budget, processor.factor)
        if key in cache:
            return cache[key]
    original = load_image(image, name="training image")
    context, (view,) = processor.make_context([original], [""], fallback="resize")
    views = RowViews(view, original.size, zoom_on(processor, context, region)[1])
    if key is not None:
        cache[key] = views
    return views


def stage1_reply(region: list[int], original_size: tuple[int, int], coarse_size: tuple[int, int],
                 grounding: str = "absolute") -> str:
    """Stage 1's reply naming ``region`` (original pixels) on a coarse view, in the ``grounding`` convention."""
    return STAGE1_REPLY.format(*coarse_box(region, original_size, coarse_size, grounding))


def zoom_on(processor: ErgoProcessor, context: ErgoContext, region: list[int]) -> tuple[str, ZoomDecision]:
    """(stage-1 reply naming ``region`` (original pixels), the crop decision inference makes for it) for the
    context's one sample; a region that gives no crop raises."""
    sample = context.samples[0]
    reply = stage1_reply(region, sample.image.size, sample.coarse_size, sample.grounding)
    decision = processor.plan_zooms(context, [reply])[0]
    if decision.fallback is not None:
        raise ValueError(f"region {region} gives no crop ({decision.fallback})")
    return reply, decision


def coarse_box(region: list[int], original_size: tuple[int, int], coarse_size: tuple[int, int],
               grounding: str = "absolute") -> list[int]:
    """``region`` (original pixels) as stage 1 writes it in the ``grounding`` convention (the processor's): in the
    coarse view's pixels (``absolute``, Qwen2.5-VL) or in thousandths of the image (``relative``, the 16-px
    families), rounded outwards so the crop still covers it."""
    frame = coarse_size if grounding == "absolute" else (RELATIVE_SCALE, RELATIVE_SCALE)
    scale_x, scale_y = frame[0] / original_size[0], frame[1] / original_size[1]
    x1, y1, x2, y2 = region
    return [max(0, math.floor(x1 * scale_x)), max(0, math.floor(y1 * scale_y)),
            min(frame[0], math.ceil(x2 * scale_x)), min(frame[1], math.ceil(y2 * scale_y))]


def answer_and_shown(row: dict) -> tuple[str, str]:
    """(what the reply answers, what stage 2's reasoning says it sees): the letter and its option's text for
    multiple choice, the answer itself otherwise."""
    answer = row["answer"].strip()
    for option in row["options"] or []:
        if option.lstrip().startswith(f"({answer})"):
            return answer, option.split(")", 1)[1].strip()
    return answer, answer


def build_sft_trainer(model, processor: ErgoProcessor, dataset: Dataset, args: ErgoSFTConfig,
                      views: dict | None = None) -> SFTTrainer:
    """TRL's SFTTrainer over ``dataset`` (training schema, with regions) expanded into the examples above; ``views``:
    ``ErgoSFTCollator``'s cache of each row's coarse view and crop."""
    args.apply_to(processor)  # the examples are built with the processor's budgets and stage-2 template
    collator = ErgoSFTCollator(processor, args.multiple_choice_postfix, views)
    rows = sft_rows(dataset, args.shares, processor.coarse_budget, processor.crop_budget, processor.factor)
    args.apply_to_model(model)
    return ErgoSFTTrainer(model=model, args=args, train_dataset=rows, data_collator=collator, processing_class=processor)


class ErgoSFTTrainer(SFTTrainer):
    """TRL's SFTTrainer, with ``ErgoSFTConfig.example_mean_loss``.

    The per-example mean is computed from the per-token log-probabilities of the one forward pass TRL's
    ``compute_loss`` runs (its fused LM head), caught with a forward hook: as a ``compute_loss_func`` it would make
    TRL run the model a second time, without gradients, for its metrics (timings: docs/synthetic-proof-history.md)."""

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        if self.args.example_mean_loss:
            self.loss_is_scaled_for_ga = False  # a mean per micro-batch: the Trainer divides by the accumulation steps

    def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
        if not self.args.example_mean_loss:
            return super().compute_loss(model, inputs, return_outputs, num_items_in_batch)
        caught = []
        hook = model.register_forward_hook(lambda module, args, output: caught.append(output))
        try:
            result = super().compute_loss(model, inputs, return_outputs, num_items_in_batch)
        finally:
            hook.remove()
        loss = example_mean_loss(caught[0].log_probs, caught[0].label_mask)  # caught[0]: the fused forward
        return (loss, result[1]) if return_outputs else loss


def example_mean_loss(log_probs: torch.Tensor, label_mask: torch.Tensor) -> torch.Tensor:
    """Negative log-likelihood averaged over each example's labelled tokens, then over the examples that have any
    (zero when none has).

    Stage-1 replies are about 50 tokens and crop replies two (the letter, the end of turn), and both kinds share
    batches (same vision tokens): under a mean over all tokens the short replies teach next to nothing
    (measurements: docs/synthetic-proof-history.md)."""
    counts = label_mask.sum(dim=1)
    per_example = -(log_probs * label_mask).sum(dim=1) / counts.clamp(min=1)
    labelled = (counts > 0).to(per_example.dtype)
    return (per_example * labelled).sum() / labelled.sum().clamp(min=1)
