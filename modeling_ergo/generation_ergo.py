"""ERGO's two-stage generation loop, as a mixin over transformers' ``generate`` (the way transformers keeps
Whisper's long-form loop in ``generation_whisper.py``).

``ErgoGenerationMixin.generate`` takes ``ErgoProcessor`` inputs (they carry an ``ergo_context``) and:

1. **stage 1**: generates on the coarse view (reasoning and a ``<zoom>[x1, y1, x2, y2]</zoom>`` region);
2. **zoom**: asks the processor to map the region to the original image and crop it at native resolution (or to
   apply the fallback policy), and builds stage 2's input as a continuation of the same conversation;
3. **stage 2**: generates the answer, continuing stage 1's KV cache when it can (only the new turn is prefilled);
4. **accounting**: returns the caller's ``input_ids`` followed by the answer, or an ``ErgoGenerateOutput``.

Any other inputs (a trainer's rollout, a multi-image chat) get the family's plain generation.

Caches. With the default dynamic cache, stage 2 continues stage 1's ``DynamicCache`` (rows that skip stage 2 are
dropped from it). With ``cache_implementation="static"`` (per call or in ``generation_config``), one ``StaticCache``
sized for both stages is allocated before stage 1 and kept on the model for later calls of the same batch size;
stage 2 continues in it, so transformers' compiled decode step serves both stages and every call of that size.
Rows that skip stage 2 stay in a static batch (its shape is what the compiled step was built for) and are ended at
their first token. Beam search and other cache kinds re-encode the whole conversation for stage 2. A family whose cache
keeps recurrent states (Qwen3.5, ``Family.recurrent_cache``) continues only a lone sample's dynamic cache, whose
states hold exactly its prompt and reply; batches and static caches re-encode, and ``ErgoGenerateOutput.cache``
says why.
"""

from __future__ import annotations

import copy
import time
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any, Protocol

import torch
from PIL import Image
from transformers import (
    DynamicCache,
    GenerationConfig,
    LogitsProcessor,
    LogitsProcessorList,
    PreTrainedTokenizerBase,
    StaticCache,
)
from transformers.generation.streamers import BaseStreamer
from transformers.feature_extraction_utils import BatchFeature
from transformers.utils import ModelOutput

from .configuration_ergo import ergo_setting
from .family_ergo import Family

DEFAULT_MAX_NEW_TOKENS = 1024
"""New tokens per stage when no argument, stage default or generation config sets a limit: the reference
evaluation's ``max_tokens``. ERGO folders also carry it in ``generation_config.json``; this covers models built
without one, where transformers' own default (20 new tokens) would cut stage 1 before its region."""

STATIC_CACHE_BUCKET = 256
"""Static caches are sized in multiples of this many tokens, so that calls of similar length share one cache and
one compiled decode step instead of recompiling for every length."""


class ErgoSampleLike(Protocol):
    """One request as the loop reads it (``processing_ergo.ErgoSample``)."""

    image: Image.Image
    stage2_question: str


class ZoomDecisionLike(Protocol):
    """What stage 1 led to for one sample (``processing_ergo.zoom_ergo.ZoomDecision``)."""

    region: tuple[int, int, int, int] | None
    image: Image.Image | None
    fallback: str | None


class Stage2SequenceLike(Protocol):
    """One sample's stage-2 conversation as tokens (``processing_ergo.Stage2Sequence``)."""

    input_ids: list[int]
    mm_token_type_ids: list[int]
    pixel_values: torch.Tensor
    image_grid_thw: torch.Tensor


class ErgoProcessorLike(Protocol):
    """Every processor call the loop makes (``processing_ergo.ErgoProcessor``). Installed, ``modeling_ergo`` and
    ``processing_ergo`` are separate packages and the modeling files import nothing from the processor's, so the
    contract is written here as a structural type."""

    tokenizer: PreTrainedTokenizerBase
    image_processor: Any  # reads merge_size

    def batch_decode(self, sequences: list[torch.Tensor], skip_special_tokens: bool = ...) -> list[str]: ...

    def plan_zooms(self, context: ErgoContextLike, stage1_texts: list[str], skip_answered: bool = ...,
                   truncated: list[bool] | None = ...) -> list[ZoomDecisionLike]: ...

    def stage2_turn_tokens_by_sample(self, context: ErgoContextLike,
                                     decisions: list[ZoomDecisionLike]) -> dict[int, BatchFeature]: ...

    def stage2_sequence_tokens(self, prompt_ids: list[int], reply_ids: list[int],
                               turn: BatchFeature) -> Stage2SequenceLike: ...

    def max_stage2_turn_tokens(self, context: ErgoContextLike) -> int: ...

    def vision_token_counts(self, stage1: int, decision: ZoomDecisionLike,
                            original: Image.Image) -> dict[str, int | None]: ...


class ErgoContextLike(Protocol):
    """The ``ergo_context`` of ERGO inputs (``processing_ergo.ErgoContext``): the requests and their settings, and
    the processor that built them, which builds stage 2's turns the same way."""

    processor: ErgoProcessorLike
    samples: list[ErgoSampleLike]
    fallback: str

    @classmethod
    def merge(cls, contexts: list[ErgoContextLike]) -> ErgoContextLike:
        """One context for requests prepared one by one and collated (a pipeline's batch)."""
        ...


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
        fallbacks: None when the region was used, else ``"no_region"``, ``"truncated"`` (stage 1 ran out of tokens
            before writing a region), ``"degenerate_box"`` or ``"answered"`` (early exit: stage 1 answered without
            a region and ``config.skip_answered_stage2`` is on).
        fallback_policy: the policy applied to those samples (``resize``, ``reference`` or ``coarse``).
        stage2_prefill_tokens: tokens stage 2's prefill processed for the sample (0 when skipped): the whole
            conversation when re-prefilling, only the new turn when continuing from stage 1's cache.
        cache: how the batch's stage 2 got its context: ``"dynamic"`` or ``"static"`` (continued stage 1's cache of
            that kind), ``"re-prefill"`` (re-encoded the conversation), ``"re-prefill (why)"`` when the family's
            cache could not be continued (``Family.recurrent_cache``), or None when no sample had a stage 2.
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
    cache: str | None = None
    timings: list[dict[str, float]] | None = None


@dataclass(frozen=True)
class _TwoStagePlan:
    """Everything both stages need, settled once before stage 1 runs (the arguments each stage's ``generate`` gets,
    their limits, and how stage 2 will get its context)."""

    context: ErgoContextLike
    caller_input_ids: torch.LongTensor
    """The caller's ``input_ids``, returned in front of the answers as they came (possibly right-padded)."""
    input_ids: torch.LongTensor
    """Stage 1's prompt, left-aligned, as generation needs it."""
    attention_mask: torch.LongTensor
    vision: dict[str, torch.Tensor]
    """``pixel_values``, ``image_grid_thw`` and ``mm_token_type_ids`` (aligned with ``input_ids``)."""
    stage1_kwargs: dict[str, Any]
    stage2_kwargs: dict[str, Any]
    stage1_limit: int
    stage2_limit: int
    stop_ids: frozenset[int]
    pad_id: int
    idle_end_id: int
    """The token a static batch's rows without a stage 2 end on."""
    reuse: str | None
    """``"dynamic"`` or ``"static"``: stage 2 is to continue stage 1's cache of that kind; None: re-prefill."""
    refused: str | None
    """Why the family's cache cannot be continued for this call although reuse was asked for; None otherwise."""
    streamer: BaseStreamer | None
    return_dict: bool

    @property
    def processor(self) -> ErgoProcessorLike:
        return self.context.processor

    @property
    def prompt_length(self) -> int:
        return self.input_ids.shape[1]


@dataclass(frozen=True)
class _Stage1Result:
    """What stage 1 wrote, per sample, and the cache it leaves."""

    sequences: torch.LongTensor
    completions: list[torch.Tensor]
    """Each row's generated tokens before its first stop token."""
    texts: list[str]
    truncated: list[bool]
    """Cut off by the token limit: no stop token, and as many tokens as the stage could write."""
    cache: Any


@dataclass(frozen=True)
class _Stage2Batch:
    """Stage 2's ``generate`` arguments, the stage-1 rows they hold (a static batch keeps all), and how the context
    got there: ``"dynamic"`` / ``"static"`` (continuing stage 1's cache) or ``"re-prefill"``."""

    inputs: dict[str, Any]
    generate_kwargs: dict[str, Any]
    rows: list[int]
    prefill_tokens: list[int]
    cache: str


@dataclass
class _KeptStaticCache:
    """The ``StaticCache`` a model keeps between static-cache calls, and the (batch size, dtype, device) it serves."""

    shape: tuple[int, torch.dtype, torch.device]
    cache: StaticCache


class ErgoGenerationMixin:
    """Adds ERGO's two-stage ``generate`` to a family's generation class (put it first among the bases; the class's
    ``config_class.ergo_family`` names the family)."""

    _ergo_static_cache: _KeptStaticCache | None = None
    """What the model keeps between calls: with ``cache_implementation="static"``, one cache sized for both stages,
    reused by later calls of the same batch size so that the compiled decode step keeps its shape. Freed by
    ``release_static_cache``."""

    def generate(
        self,
        *args,
        ergo_context: ErgoContextLike | list[ErgoContextLike] | None = None,
        stage1_generate_kwargs: dict | None = None,
        stage2_generate_kwargs: dict | None = None,
        **kwargs,
    ):
        """Two-stage ERGO generation for ``ErgoProcessor`` inputs, the family's plain generation otherwise.

        Standard generation arguments apply to both stages; ``stage1_generate_kwargs`` / ``stage2_generate_kwargs``
        override them per stage (over ``config.stage{1,2}_generation_kwargs`` defaults). They take any ``generate``
        argument, e.g. a ``logits_processor`` that scripts a stage's text (``ergo_vqa.testing_utils.scripted_stage1``).
        """
        with self._generation_vision_attention():
            if ergo_context is None:
                return super().generate(*args, **kwargs)
            if args:
                raise TypeError("pass ERGO inputs as keyword arguments: model.generate(**inputs)")
            if isinstance(ergo_context, (list, tuple)):  # requests batched by a collator, e.g. pipeline(batch_size=N)
                ergo_context = _merge_contexts(list(ergo_context))
            return self._generate_two_stage(ergo_context, stage1_generate_kwargs, stage2_generate_kwargs, **kwargs)

    @contextmanager
    def _generation_vision_attention(self):
        """Hook for the model class: the vision tower's attention during generation (unchanged here)."""
        yield

    @torch.no_grad()
    def _generate_two_stage(
        self, context: ErgoContextLike, stage1_overrides: dict | None, stage2_overrides: dict | None, **kwargs
    ) -> torch.LongTensor | ErgoGenerateOutput:
        plan = self._plan_two_stage(context, stage1_overrides=stage1_overrides, stage2_overrides=stage2_overrides,
                                    kwargs=kwargs)
        started = time.perf_counter()
        # ---------------------------------------------------------------- stage 1: coarse view
        stage1 = self._run_stage1(plan=plan)
        stage1_done = time.perf_counter()
        # ---------------------------------------------------------------- zoom: region, crop, stage-2 input
        decisions, batch = self._zoom(plan=plan, stage1=stage1)
        zoom_done = time.perf_counter()
        # ---------------------------------------------------------------- stage 2: the crop, same conversation
        answers, prefill_tokens = self._run_stage2(plan=plan, stage1=stage1, batch=batch)
        if plan.streamer is not None:
            plan.streamer.end()
        finished = time.perf_counter()
        # ---------------------------------------------------------------- output
        timings = {"stage1": stage1_done - started, "zoom": zoom_done - stage1_done, "stage2": finished - zoom_done,
                   "total": finished - started}
        return self._assemble_output(plan=plan, stage1=stage1, decisions=decisions, answers=answers,
                                     prefill_tokens=prefill_tokens, cache=batch.cache if batch else None,
                                     timings=timings)

    # -------------------------------------------------------------------- set-up

    def _plan_two_stage(self, context: ErgoContextLike, *, stage1_overrides: dict | None,
                        stage2_overrides: dict | None, kwargs: dict) -> _TwoStagePlan:
        """Resolves the call's arguments into each stage's, aligns the inputs and, for a static cache, allocates one
        sized for both stages (stage 2's turn is bounded by the processor before stage 1 runs)."""
        kwargs = dict(kwargs)
        return_dict = kwargs.pop("return_dict_in_generate", False)
        caller_input_ids = kwargs.pop("input_ids")
        attention_mask = kwargs.pop("attention_mask", None)
        if attention_mask is None:
            attention_mask = torch.ones_like(caller_input_ids)
        vision = {key: kwargs.pop(key) for key in ("pixel_values", "image_grid_thw", "mm_token_type_ids")}
        stage_defaults = [ergo_setting(self.config, f"stage{stage}_generation_kwargs") for stage in (1, 2)]
        stages, streamer = self._stage_arguments(kwargs, overrides=[stage1_overrides, stage2_overrides],
                                                 defaults=stage_defaults)
        (stage1_kwargs, stage1_config), (stage2_kwargs, stage2_config) = stages
        processor = context.processor
        pad_id = _pad_token_id(stage1_config, processor)
        # Generation needs left padding; collators may have padded on the right.
        input_ids, attention_mask, vision["mm_token_type_ids"] = _left_align(
            [caller_input_ids, attention_mask, vision["mm_token_type_ids"]], attention_mask, [pad_id, 0, 0])
        limits = self._stage_token_limits([stage1_overrides, stage2_overrides], kwargs, stage_defaults,
                                          input_ids.shape[1])
        placeholders = vision_placeholder_ids(processor.tokenizer)
        for stage_kwargs, stage_config, limit in zip((stage1_kwargs, stage2_kwargs), (stage1_config, stage2_config),
                                                     limits):
            stage_kwargs.pop("max_length", None)
            stage_kwargs["max_new_tokens"] = limit
            stage_kwargs["suppress_tokens"] = sorted(set(stage_config.suppress_tokens or []) | placeholders)
        reuse = self._reusable_cache_kind(stage1_config, stage2_config)
        refused = self._refused_continuation(reuse, len(input_ids))
        reuse = None if refused else reuse
        if reuse == "static":
            capacity = input_ids.shape[1] + limits[0] + processor.max_stage2_turn_tokens(context) + limits[1]
            cache = self._static_cache(len(input_ids), capacity)
            stage1_kwargs.update(past_key_values=cache, cache_implementation=None)
        eos = stage2_config.eos_token_id
        idle_end_id = _tokenizer_eos(processor) if eos is None else eos[0] if isinstance(eos, (list, tuple)) else eos
        return _TwoStagePlan(
            context=context, caller_input_ids=caller_input_ids, input_ids=input_ids, attention_mask=attention_mask,
            vision=vision, stage1_kwargs=stage1_kwargs, stage2_kwargs=stage2_kwargs, stage1_limit=limits[0],
            stage2_limit=limits[1], pad_id=pad_id,
            stop_ids=stop_token_ids(stage1_config.eos_token_id, stage1_config.pad_token_id, processor.tokenizer),
            idle_end_id=idle_end_id, reuse=reuse, refused=refused, streamer=streamer, return_dict=return_dict,
        )

    def _stage_arguments(self, kwargs: dict, *, overrides: list[dict | None], defaults: list[dict | None]
                         ) -> tuple[list[tuple[dict, GenerationConfig]], BaseStreamer | None]:
        """Each stage's ``generate`` arguments (its ``overrides`` over the call's ``kwargs`` over the config's
        ``defaults``) and resolved configuration, and the caller's streamer (each stage gets its share of it);
        refuses what the two stages cannot honour. Pops ``generation_config=None`` and ``streamer`` from ``kwargs``."""
        if kwargs.get("generation_config") is None:
            kwargs.pop("generation_config", None)  # passing it with other arguments is deprecated; leave it out
        stages = []
        for stage_defaults, stage_overrides in zip(defaults, overrides):
            stage_kwargs = _stage_kwargs(kwargs, stage_defaults, stage_overrides)
            stages.append((stage_kwargs, self._stage_config(stage_kwargs)))
        _check_stage_arguments(stages[0][1], stages[1][1], {**(defaults[1] or {}), **(overrides[1] or {})})
        streamer = kwargs.pop("streamer", None)  # one stream over both stages: see _StageStreamer
        if streamer is not None:
            stages[0][0]["streamer"], stages[1][0]["streamer"] = _StageStreamer(streamer), _StageStreamer(streamer, 1)
        return stages, streamer

    # -------------------------------------------------------------------- the phases

    def _run_stage1(self, *, plan: _TwoStagePlan) -> _Stage1Result:
        """Stage 1 on the coarse view: the reasoning and the ``<zoom>`` region, decoded per sample."""
        output = super().generate(input_ids=plan.input_ids, attention_mask=plan.attention_mask, **plan.vision,
                                  **plan.stage1_kwargs)
        generated = output.sequences[:, plan.prompt_length:]
        completions = [tokens_until_stop(row, plan.stop_ids) for row in generated]
        return _Stage1Result(
            sequences=output.sequences,
            completions=completions,
            texts=plan.processor.batch_decode(completions, skip_special_tokens=True),
            truncated=[ran_out_of_tokens(len(tokens), generated.shape[1], plan.stage1_limit) for tokens in completions],
            cache=output.past_key_values,
        )

    def _zoom(self, *, plan: _TwoStagePlan,
              stage1: _Stage1Result) -> tuple[list[ZoomDecisionLike], _Stage2Batch | None]:
        """Per sample, the processor's plan for stage 2 (the region mapped to the original and cropped, or a fallback)
        and, for the samples that have a second image, stage 2's batch."""
        processor, context = plan.processor, plan.context
        decisions = processor.plan_zooms(context, stage1.texts, truncated=stage1.truncated,
                                         skip_answered=ergo_setting(self.config, "skip_answered_stage2"))
        turns = {index: turn.to(plan.input_ids.device)
                 for index, turn in processor.stage2_turn_tokens_by_sample(context, decisions).items()}
        if not turns:
            return decisions, None
        return decisions, self._stage2_inputs(plan=plan, stage1=stage1, turns=turns)

    def _run_stage2(self, *, plan: _TwoStagePlan, stage1: _Stage1Result,
                    batch: _Stage2Batch | None) -> tuple[list[torch.Tensor], list[int]]:
        """Stage 2 on the crop; per sample, the answer's tokens (stage 1's own when the sample skips stage 2) and the
        tokens its prefill processed."""
        samples = len(stage1.sequences)
        answers = [stage1.sequences[index, plan.prompt_length:] for index in range(samples)]
        prefill_tokens = [0] * samples
        if batch is None:
            return answers, prefill_tokens
        inputs = dict(batch.inputs)
        if "crop_pixel_values" in inputs:  # continuation: encode only the crops (stage 2's vision work)
            inputs["mm_encoder_outputs"] = {"image": self.model.get_image_features(
                inputs.pop("crop_pixel_values"), inputs.pop("crop_grid_thw"), return_dict=True)}
        stage2 = super().generate(**inputs, **batch.generate_kwargs).sequences
        for row, index in enumerate(batch.rows):
            if batch.prefill_tokens[row]:  # a static batch also holds rows that skip stage 2
                answers[index] = stage2[row, inputs["input_ids"].shape[1]:]
                prefill_tokens[index] = batch.prefill_tokens[row]
        return answers, prefill_tokens

    def _assemble_output(self, *, plan: _TwoStagePlan, stage1: _Stage1Result, decisions: list[ZoomDecisionLike],
                         answers: list[torch.Tensor], prefill_tokens: list[int], cache: str | None,
                         timings: dict[str, float]) -> torch.LongTensor | ErgoGenerateOutput:
        """The caller's ``input_ids`` followed by the answers; with ``return_dict_in_generate``, what each sample
        cost and which path it took."""
        sequences = torch.cat([plan.caller_input_ids, pad_rows(answers, plan.pad_id, left=False)[0]], dim=1)
        if not plan.return_dict:
            return sequences
        processor = plan.processor
        stage1_tokens = (plan.vision["image_grid_thw"].prod(dim=-1) // processor.image_processor.merge_size**2).tolist()
        tokens = [processor.vision_token_counts(count, decision, sample.image)
                  for count, sample, decision in zip(stage1_tokens, plan.context.samples, decisions)]
        return ErgoGenerateOutput(
            sequences=sequences,
            stage1_texts=stage1.texts,
            regions=[decision.region for decision in decisions],
            crop_sizes=[decision.image.size if decision.image is not None else None for decision in decisions],
            vision_tokens=tokens,
            fallbacks=[decision.fallback for decision in decisions],
            fallback_policy=plan.context.fallback,
            stage2_prefill_tokens=prefill_tokens,
            cache=cache,
            timings=[dict(timings) for _ in decisions],
        )

    # -------------------------------------------------------------------- stage-2 batch

    def _stage2_inputs(self, *, plan: _TwoStagePlan, stage1: _Stage1Result, turns: dict[int, BatchFeature]
                       ) -> _Stage2Batch:
        """Stage 2's batch for the samples in ``turns``: a continuation of stage 1's cache when ``plan.reuse`` says
        so and the cache still fits, else the whole conversation re-encoded."""
        reuse, refused = self._continuable(plan=plan, stage1=stage1, turns=turns)
        if reuse is None:
            inputs, prefill_tokens = self._stage2_prefill(plan=plan, stage1=stage1, turns=turns)
            return _Stage2Batch(inputs=inputs, generate_kwargs=plan.stage2_kwargs, rows=list(turns),
                                prefill_tokens=prefill_tokens,
                                cache=f"re-prefill ({refused})" if refused else "re-prefill")
        # A static batch keeps every row (its shape is what the compiled decode step was built for), and the rows that
        # skip stage 2 are ended at their first token; a dynamic cache simply drops them.
        samples = len(stage1.sequences)
        rows = list(range(samples)) if reuse == "static" else list(turns)
        if len(rows) != samples:
            stage1.cache.batch_select_indices(torch.tensor(rows, device=stage1.sequences.device))
        inputs, prefill_tokens = self._stage2_continuation(plan=plan, stage1=stage1, rows=rows,
                                                           turns=[turns.get(index) for index in rows])
        generate_kwargs = {**plan.stage2_kwargs, "cache_implementation": None}  # the cache is given
        idle = [row for row, index in enumerate(rows) if index not in turns]
        if idle:
            generate_kwargs["logits_processor"] = LogitsProcessorList(
                [*(plan.stage2_kwargs.get("logits_processor") or []), EndRows(idle, plan.idle_end_id)])
        return _Stage2Batch(inputs=inputs, generate_kwargs=generate_kwargs, rows=rows, prefill_tokens=prefill_tokens,
                            cache=reuse)

    def _continuable(self, *, plan: _TwoStagePlan, stage1: _Stage1Result,
                     turns: dict[int, BatchFeature]) -> tuple[str | None, str | None]:
        """(``plan.reuse``, None) if stage 1's cache can still take stage 2, else (None, why the family's cache could
        not be continued, or None for the ordinary re-prefill)."""
        if plan.refused:
            return None, plan.refused
        if plan.reuse == "static":
            needed = stage1.sequences.shape[1] + max(len(turn["input_ids"][0]) for turn in turns.values())
            needed += plan.stage2_limit
            kept = self._ergo_static_cache
            if kept is None or stage1.cache is not kept.cache or needed > kept.cache.layers[0].max_cache_len:
                return None, None  # the processor's bound makes this rare (a tiny crop budget); re-encode then
        if plan.reuse == "dynamic" and type(stage1.cache) is not DynamicCache:
            return None, None
        if plan.reuse and self.ergo_family.recurrent_cache and _fed_after_stop(plan, stage1):
            return None, f"{self.ergo_family.recurrent_cache}: stage 1 went on after its stop token"
        return plan.reuse, None

    def _stage_token_limits(self, overrides: list[dict | None], shared: dict, stage_defaults: list[dict | None],
                            prompt_length: int) -> tuple[int, int]:
        """Each stage's new-token limit. The most specific source that sets a length decides (a stage's own
        arguments, the call's, the config's stage defaults, a passed ``generation_config``, the model's), and within
        a source ``max_new_tokens`` wins over ``max_length``, so a call's ``max_length`` beats a folder's
        ``max_new_tokens``. ``max_length`` counts stage 1's prompt; stage 2, whose prompt is the whole conversation,
        may then write as many new tokens as stage 1 could. With no source, each stage gets
        ``DEFAULT_MAX_NEW_TOKENS``, never transformers' model-agnostic 20."""
        configs = [shared.get("generation_config"), self.generation_config]
        limits = []
        for stage in (0, 1):
            name, value = _length_setting([overrides[stage], shared, stage_defaults[stage], *configs])
            if name == "max_length" and stage == 1:
                value = limits[0]
            elif name == "max_length":
                if value <= prompt_length:
                    raise ValueError(f"max_length={value} leaves stage 1 no new tokens after its {prompt_length}-token "
                                     "prompt; pass max_new_tokens (it applies to each stage) instead")
                value -= prompt_length
            limits.append(DEFAULT_MAX_NEW_TOKENS if value is None else value)
        return limits[0], limits[1]

    # -------------------------------------------------------------------- caches

    def _stage_config(self, stage_kwargs: dict) -> GenerationConfig:
        """The generation configuration a stage's arguments resolve to, as transformers' ``generate`` resolves it (a
        passed ``generation_config``, its unset fields from ``model.generation_config``, then the arguments), to size
        and plan with."""
        passed = stage_kwargs.get("generation_config")
        config = copy.deepcopy(self.generation_config if passed is None else passed)
        if passed is not None:
            config.update(**self.generation_config.to_dict(), defaults_only=True, allow_custom_entries=True)
        config.update(**{key: value for key, value in stage_kwargs.items() if key != "generation_config"})
        return config

    def release_static_cache(self) -> None:
        """Frees the static cache ERGO keeps between calls (it is allocated again by the next static call)."""
        self._ergo_static_cache = None

    @property
    def ergo_family(self) -> Family:
        """The model family this class generates for (``family_ergo.py``)."""
        return self.config_class.ergo_family

    def _refused_continuation(self, reuse: str | None, batch_size: int) -> str | None:
        """Why stage 2 cannot continue a ``reuse`` cache of stage 1 for a batch of ``batch_size`` on this family, or
        None. A recurrent state holds a lone sample exactly (its prompt, then its reply up to the stop token, which is
        never fed back) but not a batch: left padding, the tokens after a row's stop and the padding between the
        history and a shorter new turn are all absorbed. ERGO's shared static cache is built for KV layers only."""
        reason = self.ergo_family.recurrent_cache
        if reuse is None or reason is None:
            return None
        if reuse == "static":
            return f"{reason}; ERGO continues a static cache of KV layers only"
        return f"{reason}: a batch of {batch_size}" if batch_size > 1 else None

    def _reusable_cache_kind(self, stage1_config: GenerationConfig, stage2_config: GenerationConfig) -> str | None:
        """``"dynamic"`` or ``"static"`` when stage 2 can continue stage 1's cache; None to re-prefill.

        Reuse needs ``config.reuse_stage1_cache``, one row per sample in order (no beam search in either stage, as
        beams reorder and multiply rows) and the same cache kind in both stages, dynamic or static; other kinds
        (offloaded, quantized, ...) re-prefill."""
        if not ergo_setting(self.config, "reuse_stage1_cache"):
            return None
        kinds = [config.cache_implementation or "dynamic" for config in (stage1_config, stage2_config)]
        beams = [config.num_beams or 1 for config in (stage1_config, stage2_config)]
        if beams != [1, 1] or kinds[0] != kinds[1] or kinds[0] not in ("dynamic", "static"):
            return None
        return kinds[0]

    def _static_cache(self, batch_size: int, tokens: int) -> StaticCache:
        """An empty ``StaticCache`` for ``batch_size`` rows of at least ``tokens``, reusing the model's previous one
        when it fits, so that its shape, and the decode step compiled for it, stay the same across calls."""
        length = -(-tokens // STATIC_CACHE_BUCKET) * STATIC_CACHE_BUCKET
        shape = (batch_size, self.dtype, self.device)
        kept = self._ergo_static_cache
        if kept is not None and kept.shape == shape:
            if kept.cache.layers[0].max_cache_len >= length:
                kept.cache.reset()
                return kept.cache
            length = max(length, kept.cache.layers[0].max_cache_len)
        cache = StaticCache(config=self.config.get_text_config(decoder=True), max_cache_len=length)
        self._ergo_static_cache = _KeptStaticCache(shape, cache)
        return cache

    # -------------------------------------------------------------------- stage-2 inputs

    def _stage2_prefill(self, *, plan: _TwoStagePlan, stage1: _Stage1Result,
                        turns: dict[int, BatchFeature]) -> tuple[dict[str, Any], list[int]]:
        """Stage 2 from scratch, for the samples in ``turns``: each sample's stage-1 prompt and answer as they were,
        then its new turn (end of the stage-1 turn, user turn with the second image, assistant header), laid out by
        ``processor.stage2_sequence_tokens``; and each row's prefill length."""
        input_ids, vision = plan.input_ids, plan.vision
        sequences, token_types, pixels, grids = [], [], [], []
        image_pixels = vision["pixel_values"].split(vision["image_grid_thw"].prod(dim=-1).tolist())
        for index, turn in turns.items():
            prompt = input_ids[index][plan.attention_mask[index].bool()].tolist()
            sequence = plan.processor.stage2_sequence_tokens(prompt, stage1.completions[index].tolist(), turn)
            sequences.append(input_ids.new_tensor(sequence.input_ids))
            token_types.append(input_ids.new_tensor(sequence.mm_token_type_ids))
            pixels += [image_pixels[index], sequence.pixel_values]
            grids += [vision["image_grid_thw"][index:index + 1], sequence.image_grid_thw]
        ids, mask = pad_rows(sequences, plan.pad_id)
        types, _ = pad_rows(token_types, 0)
        pixel_values = vision["pixel_values"]
        inputs = {
            "input_ids": ids,
            "attention_mask": mask,
            "mm_token_type_ids": types,
            "pixel_values": torch.cat([p.to(pixel_values.device, pixel_values.dtype) for p in pixels]),
            "image_grid_thw": torch.cat(grids),
        }
        return inputs, [len(sequence) for sequence in sequences]

    def _stage2_continuation(self, *, plan: _TwoStagePlan, stage1: _Stage1Result, turns: list[BatchFeature | None],
                             rows: list[int]) -> tuple[dict[str, Any], list[int]]:
        """Stage 2 as a continuation of stage 1's KV cache (which holds ``rows``): only the new turns are prefilled;
        and each row's prefill length (its turn, plus its last stage-1 token, which generation never fed back).

        The history is stage 1's own batch (prompt, generated tokens), with everything from each sample's stop token
        on masked out, so cached positions are reused as they are; the new turns follow, left-padded to a common
        width (a row whose turn is None gets one end token, so that no row ends in padding, and is discarded).
        M-RoPE positions are computed by transformers over the whole sequence (``image_grid_thw`` lists every row's
        images); only the crops go through the vision encoder (with Qwen3-VL's DeepStack features, which
        ``get_image_features`` returns beside them). A recurrent cache (one sample: ``_refused_continuation``) gets
        its history cut at the stop token instead of masked, since its states take in whatever is fed.
        """
        sequences, prompt_mask, vision, pad_id = stage1.sequences, plan.attention_mask, plan.vision, plan.pad_id
        if self.ergo_family.recurrent_cache:
            sequences = sequences[:, : plan.prompt_length + len(stage1.completions[0])]
        kept = torch.zeros(len(stage1.completions), sequences.shape[1] - prompt_mask.shape[1], dtype=prompt_mask.dtype,
                           device=sequences.device)
        for index, completion in enumerate(stage1.completions):
            kept[index, : len(completion)] = 1
        history_mask = torch.cat([prompt_mask, kept], dim=1)[rows]
        history_types = torch.cat([vision["mm_token_type_ids"], torch.zeros_like(kept)], dim=1)[rows]
        idle = sequences.new_full((1,), pad_id)
        turn_ids, turn_mask = pad_rows([turn["input_ids"][0] if turn else idle for turn in turns], pad_id)
        turn_types, _ = pad_rows([turn["mm_token_type_ids"][0] if turn else idle * 0 for turn in turns], 0)
        grids = []
        for turn, index in zip(turns, rows):
            grids += [vision["image_grid_thw"][index:index + 1]] + ([turn["image_grid_thw"]] if turn else [])
        active = [turn for turn in turns if turn]
        inputs = {
            "input_ids": torch.cat([sequences[rows], turn_ids], dim=1),
            "attention_mask": torch.cat([history_mask, turn_mask], dim=1),
            "mm_token_type_ids": torch.cat([history_types, turn_types], dim=1),
            "image_grid_thw": torch.cat(grids),
            "crop_pixel_values": torch.cat([turn["pixel_values"] for turn in active]),
            "crop_grid_thw": torch.cat([turn["image_grid_thw"] for turn in active]),
            "past_key_values": stage1.cache,
        }
        uncached = sequences.shape[1] - (stage1.sequences.shape[1] - 1)  # stage 1's last token, unless cut off above
        return inputs, [len(turn["input_ids"][0]) + uncached if turn else 0 for turn in turns]


class EndRows(LogitsProcessor):
    """Makes the given batch rows emit ``end_id`` at every step, so they finish at their first token."""

    def __init__(self, rows: list[int], end_id: int):
        self.rows, self.end_id = rows, end_id

    def __call__(self, input_ids: torch.LongTensor, scores: torch.FloatTensor) -> torch.FloatTensor:
        scores[self.rows] = float("-inf")
        scores[self.rows, self.end_id] = 0.0
        return scores


class _StageStreamer(BaseStreamer):
    """Hands one stage's tokens to the caller's streamer, so that it receives one stream: stage 1's prompt (which a
    ``skip_prompt`` streamer drops), stage 1's text, then the answer, and its end only after the final token (the
    loop ends it). Stage 2's prompt, the conversation so far, is not passed on."""

    def __init__(self, streamer: BaseStreamer, skip_puts: int = 0):
        self.streamer, self.skip_puts = streamer, skip_puts

    def put(self, value: torch.Tensor) -> None:
        if self.skip_puts:
            self.skip_puts -= 1
            return
        self.streamer.put(value)

    def end(self) -> None:
        pass


def _fed_after_stop(plan: _TwoStagePlan, stage1: _Stage1Result) -> bool:
    """Whether stage 1 fed any token after a row's stop token into the cache (generation feeds back every token but
    the last; a lone row that ended on its stop token fed none)."""
    fed = stage1.sequences.shape[1] - 1
    return any(plan.prompt_length + len(completion) < fed for completion in stage1.completions)


def _merge_contexts(contexts: list[ErgoContextLike | None]) -> ErgoContextLike:
    """One context for requests a collator batched (it lists each request's context); a row without one is not an
    ERGO request, and a batch is generated one way, so that is refused naming the rows."""
    others = [row for row, context in enumerate(contexts) if context is None]
    if others:
        ergo = [row for row, context in enumerate(contexts) if context is not None]
        raise ValueError(f"rows {others} of this batch are not ERGO requests (no ergo_context) while {ergo} are; a "
                         "batch is generated one way: generate them separately")
    return type(contexts[0]).merge(contexts)


def _check_stage_arguments(stage1_config: GenerationConfig, stage2_config: GenerationConfig,
                           stage2_arguments: dict) -> None:
    """Refuses, before stage 1 runs, what the two stages cannot honour (``stage2_arguments``: stage 2's own)."""
    for name in ("output_scores", "output_logits", "output_attentions", "output_hidden_states"):
        if getattr(stage1_config, name) or getattr(stage2_config, name):
            raise ValueError(f"{name} is not supported by ERGO's two-stage generate: the stages score different "
                             "rows and prompts. Run model.generate on inputs without an ergo_context for them")
    if "max_length" in stage2_arguments and "max_new_tokens" not in stage2_arguments:
        raise ValueError("stage 2's prompt is the whole conversation, so max_length cannot bound it; give stage 2 "
                         "max_new_tokens (max_length alone bounds stage 1, and stage 2 then writes as many tokens)")


def _stage_kwargs(shared: dict, config_defaults: dict | None, overrides: dict | None) -> dict:
    merged = {**(config_defaults or {}), **shared, **(overrides or {})}
    if merged.get("num_return_sequences", 1) != 1:
        raise ValueError("ERGO generates one answer per request; num_return_sequences must be 1")
    merged["return_dict_in_generate"] = True
    return merged


def _length_setting(sources: list) -> tuple[str | None, int | None]:
    """``("max_new_tokens" | "max_length", value)`` from the first source (a dict of arguments or a
    ``GenerationConfig``) that sets either, ``max_new_tokens`` first; ``(None, None)`` when none does."""
    for source in sources:
        for name in ("max_new_tokens", "max_length"):
            value = source.get(name) if isinstance(source, dict) else getattr(source, name, None)
            if value is not None:
                return name, value
    return None, None


def stop_token_ids(eos_token_id: int | list[int] | None, pad_token_id: int | None, tokenizer) -> frozenset[int]:
    """What ends a stage, in ``generate`` and in the GRPO rollout alike: the configured end-of-sequence ids, the
    tokenizer's end of turn (the chat template closes every turn with it) and padding (a batch pads finished rows)."""
    ids = set(eos_token_id if isinstance(eos_token_id, (list, tuple)) else [eos_token_id])
    ids |= {tokenizer.convert_tokens_to_ids(tokenizer.eos_token), pad_token_id}
    return frozenset(ids - {None})


VISION_PLACEHOLDERS = ("<|image_pad|>", "<|video_pad|>", "<|vision_start|>", "<|vision_end|>", "<|vision_pad|>")
"""The tokens that stand for images and videos in a prompt: a reply must never hold one."""


def vision_placeholder_ids(tokenizer) -> set[int]:
    """The ids of ``VISION_PLACEHOLDERS`` the tokenizer knows, which both stages (in ``generate`` and in the GRPO
    rollout) never sample: a stage-1 reply carried into stage 2's conversation with an image placeholder in it
    would count as an image without pixels ("Image features and image tokens do not match"), and in training it
    breaks the loss forward's image-token accounting."""
    ids = tokenizer.convert_tokens_to_ids(list(VISION_PLACEHOLDERS))
    return {token for token in ids if token is not None and token != tokenizer.unk_token_id}


def ran_out_of_tokens(reply_length: int, written: int, limit: int) -> bool:
    """Whether a stage was cut off by its token limit (the zoom's ``"truncated"`` label, the rollout's truncation):
    no stop token among the ``written`` tokens (the reply before the first stop is all of them) and the whole
    ``limit`` written, so a stop string or time limit is not a cut-off. A chat engine applies this rule itself and
    says so with ``finish_reason == "length"``."""
    return reply_length == written == limit


def tokens_until_stop(tokens, stop_ids: set[int]):
    """The generated tokens (a tensor or a list) before the first end-of-sequence or padding token."""
    for position, token in enumerate(tokens.tolist() if isinstance(tokens, torch.Tensor) else tokens):
        if token in stop_ids:
            return tokens[:position]
    return tokens


def _pad_token_id(generation_config: GenerationConfig, processor) -> int:
    for candidate in (generation_config.pad_token_id, processor.tokenizer.pad_token_id):
        if candidate is not None:
            return candidate
    return _tokenizer_eos(processor)


def _tokenizer_eos(processor) -> int:
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


def pad_rows(rows: list[torch.Tensor], fill: int, left: bool = True) -> tuple[torch.Tensor, torch.Tensor]:
    """``rows`` stacked with padding on the left (generation inputs) or right (answers), and the attention mask."""
    width = max(len(row) for row in rows)
    out = rows[0].new_full((len(rows), width), fill)
    mask = torch.zeros_like(out)
    for index, row in enumerate(rows):
        span = slice(width - len(row), width) if left else slice(0, len(row))
        out[index, span] = row
        mask[index, span] = 1
    return out, mask


__all__ = [
    "ErgoGenerationMixin",
    "ErgoGenerateOutput",
    "ErgoContextLike",
    "ErgoProcessorLike",
    "EndRows",
    "ran_out_of_tokens",
    "stop_token_ids",
    "vision_placeholder_ids",
    "tokens_until_stop",
    "pad_rows",
]
