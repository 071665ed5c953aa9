"""``ErgoProcessor``: Qwen2.5-VL's processor (image-only, for every family) plus ERGO's two-stage input building.

Stage 1 (``apply_chat_template`` / ``prepare``): the image is downsampled to the coarse budget and the question
stem is wrapped in ERGO's system prompt and stage-1 template. The returned ``BatchFeature`` carries an
``ergo_context`` (the full-resolution images and settings) that ``ErgoForConditionalGeneration.generate`` uses.

Stage 2 (``plan_zooms`` / ``stage2_turn_tokens``): the model's stage-1 text is parsed into a region, mapped to the
original image and cropped (``zoom_ergo.decide_zoom``); the crop and the stage-2 prompt become the next user turn of
the same conversation.

One class for every family (``family_ergo.py``): the image processor's patch and merge sizes give the family's
pixels per vision token (``factor``: 28 for Qwen2.5-VL, 32 for Qwen3-VL and Qwen3.5), which budgets, resizing, token
accounting and crops follow, and the ``grounding`` setting (the family's native convention by default) says how
stage 1 is asked for its box and how the box maps to the original.

Works without torchvision: image-only (no video processor), PIL image backend; Qwen3-VL and Qwen3.5 folders, whose
stock processor (``Qwen3VLProcessor``) cannot even be constructed without torchvision, load through it too.
"""

from __future__ import annotations

import math
import os
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field

import torch

from PIL import Image

from .compat_ergo import TRANSFORMERS_RANGE  # noqa: F401  (first: checks the installed transformers before using it)
from transformers import Qwen2_5_VLProcessor
from transformers.feature_extraction_utils import BatchFeature
from transformers.processing_utils import ProcessorMixin

from .family_ergo import GROUNDING_CONVENTIONS, native_grounding
from .geometry_ergo import (
    INFERENCE_BUDGET,
    MAX_ASPECT_RATIO,
    MIN_PIXELS,
    box_scale,
    budget_to_pixels,
    resize_to_budget,
    smart_resize,
    within_aspect_limit,
)
from .images_ergo import ErgoImageError, abbreviate, load_image
from .prompts_ergo import SYSTEM_PROMPT, stage1_prompt, stage2_prompt, stage_questions
from .zoom_ergo import ZoomDecision, decide_zoom, size_up_to

FALLBACK_POLICIES = ("resize", "reference", "coarse")
"""What stage 2 sees when stage 1 gives no usable region:
``resize``: the whole image at the crop budget (bounded cost; default);
``reference``: the unresized original, as the reference implementation does (the image processor's own
max_pixels then applies, up to 16384 tokens for stock Qwen2.5-VL; images flatter than 200:1, which that
processor refuses, get ``resize`` instead);
``coarse``: no stage 2; the stage-1 text is the answer."""

RESPONSE_TEMPLATE = {
    "defaults": {"role": "assistant"},
    "start_anchor_pattern": r"<\|im_start\|>assistant\n(?:<think>\n\n</think>\n\n)?",
    "fields": {"content": {"close_pattern": r"(?:<\|im_end\|>|<\|endoftext\|>)", "content": "text",
                           "content_args": {"strip": False}}},
}
"""How ``ergo serve`` parses ERGO's replies: the whole reply is content, as written. ``<think>``, ``<zoom>`` and
``<answer>`` are ERGO's answer format, and the stage-1 reply goes back into stage 2's conversation as written;
``transformers serve`` would otherwise split ``<think>…</think>`` off as reasoning for Qwen models, and strip the
reply. The reply starts after the assistant header, and after the empty thinking block that Qwen3.5's generation
prompt ends with (transformers serve returns what the prompt writes after the anchor as part of the reply).
``ergo serve`` registers it for its own process; the tokenizer does not carry it, because transformers' pipelines
then keep special tokens in every reply (``return_full_text=False`` ended in ``<|im_end|>``)."""

SAVED_RESPONSE_TEMPLATE = {
    "defaults": {"role": "assistant"},
    "start_anchor": "<|im_start|>assistant\n",
    "fields": {"content": {"close_pattern": r"(?:<\|im_end\|>|<\|endoftext\|>)", "content": "text"}},
}
"""The response template ERGO folders saved in their tokenizer before ``ergo serve`` registered it itself."""

FULL_RESOLUTION_BUDGET = 16384
"""Vision tokens of the paper's full-resolution baseline (Qwen2.5-VL's stock max_pixels; Qwen3-VL's too)."""


@dataclass
class ErgoSample:
    """One request: the full-resolution image, its coarse view, the stage-2 question and how stage 1 writes boxes."""

    image: Image.Image
    coarse_size: tuple[int, int]
    stage2_question: str
    grounding: str = "absolute"

    @property
    def scale(self) -> tuple[float, float]:
        """Original pixels per box unit, per axis: how a stage-1 box maps to the original."""
        return box_scale(self.image.size, self.coarse_size, self.grounding)


@dataclass
class ErgoContext:
    """What ``generate`` needs beyond the stage-1 tensors. Built by ``ErgoProcessor.prepare``."""

    processor: "ErgoProcessor" = field(repr=False)
    samples: list[ErgoSample]
    crop_max_pixels: int
    fallback: str
    stage2_template: str

    @classmethod
    def merge(cls, contexts: list["ErgoContext"]) -> "ErgoContext":
        """One context for requests prepared separately and batched later (as ``pipeline(batch_size=N)`` does)."""
        first = contexts[0]
        settings = {(c.crop_max_pixels, c.fallback, c.stage2_template) for c in contexts}
        if len(settings) > 1:
            raise ValueError("cannot batch ERGO requests prepared with different crop budgets, fallbacks or templates")
        samples = [sample for context in contexts for sample in context.samples]
        return cls(first.processor, samples, first.crop_max_pixels, first.fallback, first.stage2_template)


@dataclass
class Stage2Sequence:
    """One sample's stage-2 conversation, as ``ErgoProcessor.stage2_sequence_tokens`` lays it out."""

    input_ids: list[int]
    mm_token_type_ids: list[int]
    reply: slice
    """Positions of stage 1's reply (trained by SFT and GRPO)."""
    turn: slice
    """Positions of the turn that closes the reply and brings the second image (its first token, the end of
    stage 1's turn, is the policy's own when it wrote it; the rest is injected)."""
    pixel_values: torch.Tensor
    image_grid_thw: torch.Tensor
    """The second image only; the stage-1 image's tensors come with the stage-1 prompt."""


class ErgoProcessor(Qwen2_5_VLProcessor):
    """Qwen2.5-VL's processor (image-only; for every family, by its image processor's geometry) that also formats
    ERGO's prompts and builds both stages' inputs.

    Args:
        coarse_budget: vision tokens of the stage-1 (coarse) image; the paper uses 1280 and 640 (``PAPER_BUDGET``).
        crop_budget: vision tokens the stage-2 crop may use at most; ``None`` means equal to ``coarse_budget``.
        stage2_template: ``"reference"`` (the published evaluation's string, typo included) or ``"fixed"``.
        fallback: one of ``FALLBACK_POLICIES``.
        grounding: how stage 1 is asked to write its box and how the box is read, one of
            ``family_ergo.GROUNDING_CONVENTIONS``: ``"absolute"`` pixels of the coarse view (Qwen2.5-VL, the released
            ERGO weights) or ``"relative"`` on a 0-1000 scale (Qwen3-VL, Qwen3.5). ``None``: the native convention of
            the family whose vision geometry the image processor has.
    """

    def __init__(
        self,
        image_processor=None,
        tokenizer=None,
        chat_template=None,
        coarse_budget: int = INFERENCE_BUDGET,
        crop_budget: int | None = None,
        stage2_template: str = "reference",
        fallback: str = "resize",
        grounding: str | None = None,
        **kwargs,
    ):
        self.image_token = getattr(tokenizer, "image_token", None) or "<|image_pad|>"
        self.video_token = getattr(tokenizer, "video_token", None) or "<|video_pad|>"
        self.image_token_id = tokenizer.convert_tokens_to_ids(self.image_token)
        self.video_token_id = tokenizer.convert_tokens_to_ids(self.video_token)
        self.coarse_budget, self.crop_budget = coarse_budget, crop_budget
        self.stage2_template, self.fallback = stage2_template, fallback
        self.check_settings(coarse_budget, crop_budget, stage2_template, fallback)
        self.grounding = grounding or native_grounding(image_processor.patch_size, image_processor.merge_size)
        if self.grounding not in GROUNDING_CONVENTIONS:
            raise ValueError(f"grounding must be one of {GROUNDING_CONVENTIONS}, got {grounding!r}")
        if getattr(tokenizer, "response_template", None) in (RESPONSE_TEMPLATE, SAVED_RESPONSE_TEMPLATE):
            tokenizer.response_template = None
        # Skip Qwen2_5_VLProcessor.__init__: it insists on a video processor, which needs torchvision.
        ProcessorMixin.__init__(self, image_processor, tokenizer, chat_template=chat_template, **kwargs)

    @staticmethod
    def check_settings(coarse_budget, crop_budget, stage2_template, fallback) -> None:
        """Raises ValueError for a budget, template or fallback policy the processor cannot use."""
        budget_to_pixels(coarse_budget)
        if crop_budget is not None:
            budget_to_pixels(crop_budget)
        stage2_prompt("", stage2_template)
        if fallback not in FALLBACK_POLICIES:
            raise ValueError(f"fallback must be one of {FALLBACK_POLICIES}, got {fallback!r}")

    @property
    def factor(self) -> int:
        """Pixels per LLM vision-token side: the image processor's patch size times its merge size."""
        return self.image_processor.patch_size * self.image_processor.merge_size

    # ------------------------------------------------------------------ stage 1

    def prepare(
        self,
        images: list,
        questions: list[str],
        options: list[list[str] | None] | None = None,
        postfixes: list[str] | None = None,
        coarse_budget: int | None = None,
        crop_budget: int | None = None,
        stage2_template: str | None = None,
        fallback: str | None = None,
    ) -> BatchFeature:
        """Stage-1 inputs for a batch of (image, question) pairs, left-padded, with an ``ergo_context``.

        Per call, any processor setting can be overridden; ``budget``-style arguments are vision tokens.
        ``options[i]`` (optional) lists answer options for question i; see ``prompts_ergo.stage_questions``.
        """
        if isinstance(questions, str) or not isinstance(images, (list, tuple)):
            raise TypeError("prepare() takes a list of images and a list of questions")
        if len(images) != len(questions) or not images:
            raise ValueError(f"got {len(images)} images for {len(questions)} questions; need one each, at least one")
        options = options or [None] * len(images)
        postfixes = postfixes or [""] * len(images)

        def load_and_parse(index: int) -> tuple[Image.Image, str, str]:
            source = describe_source(images[index])  # alone, a request is named by its source (pipeline requests are)
            image = load_image(images[index], name=f"sample {index} ({source})" if len(images) > 1 else source)
            try:
                stem, full_question = stage_questions(questions[index], options[index], postfixes[index])
            except ValueError as error:
                raise ValueError(f"sample {index}: {error}") from None
            return image, stem, full_question

        originals, stems, full_questions = zip(*parallel_map(load_and_parse, range(len(images))))
        context, coarse_images = self.make_context(list(originals), list(full_questions), coarse_budget, crop_budget,
                                                   fallback, stage2_template)
        inputs = self.stage1_inputs(list(stems), coarse_images)
        inputs["ergo_context"] = context
        return inputs

    def stage1_inputs(self, question_stems: list[str], coarse_views: list[Image.Image]) -> BatchFeature:
        """Stage 1's tensors for question stems over their coarse views (``make_context``'s), left-padded: what
        ``prepare`` returns besides the context, for a caller that keeps the views (SFT builds several examples
        on one)."""
        return self._encode([self._render(self.stage1_messages(stem)) for stem in question_stems], coarse_views)

    def make_context(
        self,
        images: list[Image.Image],
        stage2_questions: list[str],
        coarse_budget: int | None = None,
        crop_budget: int | None = None,
        fallback: str | None = None,
        stage2_template: str | None = None,
    ) -> tuple[ErgoContext, list[Image.Image]]:
        """The context for loaded full-resolution images (and their stage-2 questions), with their coarse views.

        ``prepare`` builds its inputs on it; a trainer that tokenises stage 1 itself (the GRPO rollout, SFT) takes
        the coarse views from here. Images that Qwen2.5-VL could not take at either budget raise ``ErgoImageError``.
        """
        coarse_budget = coarse_budget or self.coarse_budget
        crop_budget = crop_budget or self.crop_budget or coarse_budget
        fallback, stage2_template = fallback or self.fallback, stage2_template or self.stage2_template
        self.check_settings(coarse_budget, crop_budget, stage2_template, fallback)
        factor = self.factor
        coarse_pixels, crop_pixels = budget_to_pixels(coarse_budget, factor), budget_to_pixels(crop_budget, factor)

        def coarse_view(index: int) -> Image.Image:
            image = images[index]
            for pixels in (coarse_pixels, crop_pixels):
                height, width = smart_resize(image.height, image.width, factor, max_pixels=pixels)
                if not within_aspect_limit(width, height):
                    raise ErgoImageError(
                        f"sample {index}: a {image.width}x{image.height} image becomes {width}x{height} at the "
                        f"budget, flatter than the image processor's {MAX_ASPECT_RATIO}:1 limit; pad or split it first"
                    )
            return resize_to_budget(image, coarse_pixels, factor=factor)

        coarse_views = parallel_map(coarse_view, range(len(images)))
        samples = [ErgoSample(image, view.size, question, self.grounding)
                   for image, view, question in zip(images, coarse_views, stage2_questions)]
        return ErgoContext(self, samples, crop_pixels, fallback, stage2_template), coarse_views

    def stage1_messages(self, question_stem: str) -> list[dict]:
        """The stage-1 conversation: ERGO's system prompt, then the coarse image before the stem, templated for the
        processor's grounding convention."""
        text = stage1_prompt(question_stem, self.grounding)
        return [
            {"role": "system", "content": [{"type": "text", "text": SYSTEM_PROMPT}]},
            {"role": "user", "content": [{"type": "image"}, {"type": "text", "text": text}]},
        ]

    def _render(self, messages: list[dict], add_generation_prompt: bool = True) -> str:
        return super().apply_chat_template(messages, add_generation_prompt=add_generation_prompt, tokenize=False)

    def _encode(self, texts: list[str], images: list[Image.Image]) -> BatchFeature:
        """Tokenise prompts whose images are already aligned to the factor and in budget, so the processor keeps their
        size."""
        largest = max(image.width * image.height for image in images)
        return self(
            text=texts,
            images=images,
            padding=True,
            padding_side="left",
            return_tensors="pt",
            images_kwargs={"size": size_up_to(largest)},
        )

    def _process_images(self, images, **kwargs):
        """The processor's image step over ``images_side_by_side`` when it takes a list of PIL images to tensors."""
        flat = isinstance(images, (list, tuple)) and all(isinstance(image, Image.Image) for image in images)
        if not (flat and len(images) > 1 and kwargs.get("return_tensors") == "pt"):
            return super()._process_images(images, **kwargs)
        processed = self.images_side_by_side(images, **kwargs)
        return processed, [self.replace_image_token(processed, image_idx=index) for index in range(len(images))]

    def images_side_by_side(self, images: list[Image.Image], **kwargs) -> dict[str, torch.Tensor]:
        """The image processor per image on a thread pool (PIL resampling and numpy normalisation release the GIL),
        its tensors concatenated: the same as one call over the batch (``kwargs`` must ask for ``pt`` tensors)."""
        parts = parallel_map(lambda image: self.image_processor([image], **kwargs), images)
        return {key: torch.cat([part[key] for part in parts]) for key in parts[0]}

    def single_pass(self, images: list, questions: list[str], budget: int | None = None) -> BatchFeature:
        """One plain Qwen2.5-VL user turn per (image, question), without ERGO's prompts, left-padded: the whole image
        at the paper's 16384-token baseline, or with ``budget`` resized as ERGO's coarse view is (the image processor
        then keeps it as is). The baselines, the reward model and SFT's single turns use it."""
        images = [load_image(image, name=f"sample {index}") for index, image in enumerate(images)]
        factor = self.factor
        max_pixels = budget_to_pixels(FULL_RESOLUTION_BUDGET, factor)
        if budget is not None:
            images = parallel_map(lambda image: resize_to_budget(image, budget_to_pixels(budget, factor), factor=factor),
                                  images)
            max_pixels = max(image.width * image.height for image in images)
        texts = [self._render(self.single_pass_messages(question)) for question in questions]
        return self(text=texts, images=images, padding=True, padding_side="left", return_tensors="pt",
                    images_kwargs={"size": size_up_to(max_pixels)})

    @staticmethod
    def single_pass_messages(question: str) -> list[dict]:
        """A plain Qwen2.5-VL turn: one user message, the image before the question."""
        return [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": question}]}]

    def post_process_image_text_to_text(self, generated_outputs, skip_special_tokens: bool = True,
                                        prompt_length: int | None = None, **kwargs) -> list[str]:
        """Decoded ``generate`` outputs; with ``prompt_length``, only what follows the prompt (the reply)."""
        one = generated_outputs.dim() == 1 if isinstance(generated_outputs, torch.Tensor) else (
            len(generated_outputs) > 0 and isinstance(generated_outputs[0], int))
        rows = [generated_outputs] if one else generated_outputs
        if prompt_length is not None:
            rows = [row[prompt_length:] for row in rows]
        return self.tokenizer.batch_decode(rows, skip_special_tokens=skip_special_tokens, **kwargs)

    def apply_chat_template(self, conversation, chat_template=None, ergo: bool | None = None, **kwargs):
        """Qwen2.5-VL's ``apply_chat_template``, except that an ERGO request becomes ERGO's stage-1 input.

        An ERGO request is a conversation with one user message holding exactly one image and its text, with no
        system or assistant message; the text is the question (answer options may follow on their own lines).
        Tokenised with ``return_dict=True``, it yields ``prepare``'s output. Anything else is processed exactly
        like Qwen2.5-VL, and ``generate`` then runs plain single-pass generation. ``ergo=True`` insists on ERGO
        (ValueError when the conversation does not qualify), ``ergo=False`` turns it off.
        """
        conversations = conversation if _is_batch(conversation) else [conversation]
        requests = [_ergo_request(messages) for messages in conversations]
        wants_tensors = kwargs.get("tokenize", False) and kwargs.get("return_dict", False)
        eligible = all(request is not None for request in requests)
        if ergo and not eligible:
            raise ValueError(
                "ERGO needs conversations with a single user message holding one image and the question text"
            )
        if ergo is None and wants_tensors and chat_template is None and not eligible and any(requests):
            _refuse_mixed_batch(requests)
        if ergo is False or not eligible or not wants_tensors or chat_template is not None:
            return super().apply_chat_template(conversation, chat_template=chat_template, **kwargs)
        if kwargs.get("return_tensors", "pt") != "pt":
            raise ValueError("ERGO inputs are PyTorch tensors; use return_tensors='pt'")
        settings = {key: kwargs[key] for key in ("coarse_budget", "crop_budget", "stage2_template", "fallback") if key in kwargs}
        images, questions = zip(*requests)
        return self.prepare(list(images), list(questions), **settings)

    # ------------------------------------------------------------------ stage 2

    def plan_zooms(
        self, context: ErgoContext, stage1_texts: list[str], skip_answered: bool = False,
        truncated: list[bool] | None = None,
    ) -> list[ZoomDecision]:
        """Per sample, the plan for stage 2 (``zoom_ergo.decide_zoom``): the region the stage-1 text asks for, mapped
        to the original and cropped, or a fallback. With ``skip_answered``, a stage-1 text that gives a complete,
        non-empty ``<answer>…</answer>`` and no region ends there (early exit). ``truncated[i]``: stage 1 ran out of
        tokens, so a missing region is reported as ``truncated`` rather than ``no_region``."""
        truncated = truncated or [False] * len(stage1_texts)
        settings = {"crop_max_pixels": context.crop_max_pixels, "fallback": context.fallback,
                    "reference_size": self.image_processor.size, "skip_answered": skip_answered, "factor": self.factor}
        return parallel_map(lambda args: decide_zoom(args[0], args[1], truncated=args[2], **settings),
                            list(zip(context.samples, stage1_texts, truncated)))

    def stage2_turn_text(self, stage2_question: str, stage2_template: str) -> str:
        """The text that follows stage 1's generated text: the end of that assistant turn, the new user turn (second
        image placeholder, stage-2 prompt) and the assistant header, as the chat template renders them."""
        text = self._render(_SENTINEL_TURN + self.stage2_turn_messages(stage2_question, stage2_template))
        return text.split(_SENTINEL, 1)[1]

    def stage2_turn_tokens(self, decision: ZoomDecision, stage2_question: str, stage2_template: str) -> BatchFeature:
        """``stage2_turn_text`` tokenised with the plan's second image: its ``input_ids`` and pixel values."""
        following = self.stage2_turn_text(stage2_question, stage2_template)
        end_of_turn = self.tokenizer.eos_token or "<|im_end|>"
        if not following.startswith(end_of_turn):
            raise ValueError(f"the chat template does not end an assistant turn with {end_of_turn!r}")
        return self(
            text=[following],
            images=[decision.image],
            return_tensors="pt",
            images_kwargs={"size": decision.processor_size},
        )

    def stage2_turn_tokens_by_sample(self, context: ErgoContext,
                                     decisions: list[ZoomDecision]) -> dict[int, BatchFeature]:
        """``stage2_turn_tokens`` for every sample that has a second image, by index, built side by side on a thread
        pool (each processes its own crop)."""
        rows = [index for index, decision in enumerate(decisions) if decision.image is not None]
        turns = parallel_map(lambda index: self.stage2_turn_tokens(
            decisions[index], context.samples[index].stage2_question, context.stage2_template), rows)
        return dict(zip(rows, turns))

    def stage2_sequence_tokens(self, prompt_ids: list[int], reply_ids: list[int],
                               turn: BatchFeature) -> Stage2Sequence:
        """Stage 2's whole conversation for one sample as tokens, the one layout inference, the GRPO rollout and SFT
        share: the stage-1 prompt, the stage-1 reply (up to, not including, its end-of-turn token), then ``turn``
        from ``stage2_turn_tokens`` (which opens with that end-of-turn token)."""
        turn_ids = turn["input_ids"][0].tolist()
        ids = list(prompt_ids) + list(reply_ids) + turn_ids
        reply_start = len(prompt_ids)
        turn_start = reply_start + len(reply_ids)
        return Stage2Sequence(
            input_ids=ids,
            mm_token_type_ids=self.create_mm_token_type_ids([ids])[0],
            reply=slice(reply_start, turn_start),
            turn=slice(turn_start, len(ids)),
            pixel_values=turn["pixel_values"],
            image_grid_thw=turn["image_grid_thw"],
        )

    def max_stage2_turn_tokens(self, context: ErgoContext) -> int:
        """An upper bound on the tokens ``stage2_turn_tokens`` adds for the samples of ``context``, so that a static
        cache for both stages can be sized before stage 1 runs. It depends on the settings, not on the images, so that
        the cache, and the decode step compiled for it, keep one shape across calls."""
        pixels_per_token = self.factor * self.factor
        budget = context.crop_max_pixels // pixels_per_token
        # smart_resize rounds each side of a crop of up to 200:1, so it may exceed its budget by ~7 sqrt(budget).
        image_tokens = budget + math.ceil(8 * math.sqrt(budget)) + 1
        if context.fallback == "reference":  # the unresized original, up to the image processor's own limit
            image_tokens = max(image_tokens, self.image_processor.size["longest_edge"] // pixels_per_token)
        texts = [self.stage2_turn_text(sample.stage2_question, context.stage2_template) for sample in context.samples]
        text_tokens = max(len(self.tokenizer(text)["input_ids"]) for text in texts)
        return text_tokens + image_tokens

    @staticmethod
    def stage2_turn_messages(stage2_question: str, stage2_template: str) -> list[dict]:
        """The stage-2 user turn as chat messages: the second image before the stage-2 prompt."""
        text = stage2_prompt(stage2_question, stage2_template)
        return [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": text}]}]

    # ------------------------------------------------------------------ accounting

    def image_tokens(self, width: int, height: int, max_pixels: int, min_pixels: int = MIN_PIXELS) -> int:
        """Vision tokens the image processor spends on a width x height image under ``max_pixels`` (and over
        ``min_pixels``), as ERGO has it processed (``size_up_to``). The bounds go in by name: the image processor's
        count reads ``size`` from its own settings only, whose lower bound Qwen3-VL's and Qwen3.5's stock folders set
        to 64 tokens (Qwen2.5-VL's: 4)."""
        bounds = {"min_pixels": min_pixels, "max_pixels": max(max_pixels, min_pixels)}
        patches = self.image_processor.get_number_of_image_patches(height, width, bounds)
        return patches // self.image_processor.merge_size**2

    def full_resolution_tokens(self, image: Image.Image) -> int | None:
        """Vision tokens of the paper's baseline: one pass over the whole image at 16384 tokens (None when
        Qwen2.5-VL's processor cannot take the image unresized: flatter than 200:1)."""
        if not within_aspect_limit(*image.size):
            return None
        return self.image_tokens(image.width, image.height, budget_to_pixels(FULL_RESOLUTION_BUDGET, self.factor))

    def second_image_tokens(self, decision: ZoomDecision) -> int:
        """Vision tokens of stage 2's image (0 when stage 2 is skipped)."""
        if decision.image is None:
            return 0
        size = decision.processor_size
        return self.image_tokens(*decision.image.size, size["longest_edge"], size["shortest_edge"])

    def vision_token_counts(self, stage1: int, decision: ZoomDecision, original: Image.Image) -> dict[str, int | None]:
        """One sample's vision-token record (``stage1``, ``stage2``, ``total``, ``full_resolution``), counted the same
        way by ``generate`` and the chat engines, given stage 1's count (the coarse view's tokens)."""
        stage2 = self.second_image_tokens(decision)
        return {"stage1": stage1, "stage2": stage2, "total": stage1 + stage2,
                "full_resolution": self.full_resolution_tokens(original)}


_SENTINEL = "\x00ERGO_STAGE1_ANSWER\x00"
_SENTINEL_TURN = [{"role": "assistant", "content": [{"type": "text", "text": _SENTINEL}]}]


def describe_source(source) -> str:
    """A short name for an image source, so an error names its request even when requests are prepared one by one
    (as ``pipeline(batch_size=N)`` does, where every request is its own call's sample 0)."""
    if isinstance(source, Image.Image):
        return f"a {source.width}x{source.height} {source.mode} image"
    if isinstance(source, (bytes, bytearray)):
        return f"{len(source)} bytes"
    return abbreviate(str(source), limit=80)


def parallel_map(function, items) -> list:
    """``[function(item) for item in items]``, on a thread pool when there is more than one item."""
    items = list(items)
    if len(items) < 2:
        return [function(item) for item in items]
    with ThreadPoolExecutor(max_workers=min(len(items), os.cpu_count() or 1)) as pool:
        return list(pool.map(function, items))


def _refuse_mixed_batch(requests: list) -> None:
    """A batch is generated one way, two-stage or single-pass: a batch mixing ERGO requests with other conversations
    is refused, naming them, instead of silently answering the ERGO requests single-pass."""
    ergo = [index for index, request in enumerate(requests) if request is not None]
    other = [index for index, request in enumerate(requests) if request is None]
    raise ValueError(
        f"conversations {other} of this batch are not ERGO requests (a system or assistant message, several images "
        f"or none), while {ergo} are; a batch is generated one way: batch them separately, or pass ergo=False to "
        "answer every conversation single-pass as Qwen2.5-VL"
    )


def _is_batch(conversation) -> bool:
    return isinstance(conversation, (list, tuple)) and bool(conversation) and isinstance(conversation[0], (list, tuple))


def _image_source(block: dict):
    if block.get("type") not in ("image", "image_url"):
        return None
    for key in ("image", "url", "path", "image_url"):
        source = block.get(key)
        if isinstance(source, dict):
            source = source.get("url")
        if source is not None:
            return source
    return None


def _ergo_request(messages) -> tuple[object, str] | None:
    """(image, question) when ``messages`` is a single user turn with one image and text; else None."""
    if not isinstance(messages, (list, tuple)) or len(messages) != 1 or messages[0].get("role") != "user":
        return None
    content = messages[0].get("content")
    if not isinstance(content, list):
        return None
    images = [source for source in map(_image_source, content) if source is not None]
    texts = [block.get("text", "") for block in content if block.get("type") == "text"]
    if len(images) != 1 or not texts:
        return None
    return images[0], "\n".join(texts)


ErgoProcessor.register_for_auto_class("AutoProcessor")

__all__ = ["ErgoProcessor", "ErgoContext", "ErgoSample", "Stage2Sequence", "ZoomDecision", "FALLBACK_POLICIES"]
