"""``ErgoClient``: ERGO's two stages against a served model (vLLM, SGLang, ``transformers serve``, any
OpenAI-compatible chat endpoint serving a Qwen2.5-VL-architecture model).

The server only generates; everything ERGO-specific runs here, with the code ``generate()`` uses
(``ErgoProcessor``'s coarse view, prompts, box parser, mapping, crop and fallback policies):

1. stage 1: ERGO's system prompt and the stage-1 prompt with the coarse view, sent as a lossless PNG already sized
   on the 28-pixel grid within the budget, so the server's image processor keeps it as it is;
2. zoom: the reply's ``<zoom>`` box is mapped to the original and cropped at native resolution (or a fallback);
3. stage 2: the same messages, stage 1's reply as the assistant turn, then the crop and the stage-2 prompt, so a
   server with prefix caching (vLLM's automatic prefix caching, SGLang's radix cache) reuses stage 1's prefix.

Vision tokens are counted from the geometry (the server does not report them); prompt, completion and cached prompt
tokens come from each response's ``usage`` (cached ones where the server reports them: vLLM with
``--enable-prompt-tokens-details``).

``ErgoChat`` holds what every chat engine shares (the requests, the zoom and the results); ``ErgoClient`` sends the
requests over HTTP, ``ergo_vqa.vllm_runner.ErgoVLLM`` to an in-process ``vllm.LLM``.
"""

from __future__ import annotations

import asyncio
import time
from dataclasses import dataclass

from PIL import Image
from transformers import PretrainedConfig

from modeling_ergo.generation_ergo import vision_placeholder_ids
from processing_ergo import ErgoProcessor
from processing_ergo.geometry_ergo import budget_to_pixels, resize_to_budget
from processing_ergo.images_ergo import load_image
from processing_ergo.processing_ergo import ErgoContext, ZoomDecision, describe_source
from processing_ergo.prompts_ergo import extract_answer, stage_questions

from .endpoint import ChatEndpoint, ChatReply, openai_messages
from .inference import ErgoResult

SINGLE_PASS_SYSTEM_PROMPT = "You are a helpful assistant."
"""Sent with single-pass requests: Qwen2.5-VL's template adds exactly this when a conversation has no system turn
(so the prompt is the one ``ErgoProcessor.single_pass`` builds), and an explicit system turn keeps a server that
runs ERGO itself (``ergo serve``) from taking a one-image question for an ERGO request."""


@dataclass
class ErgoRequest:
    """One question about one image, as ``ErgoProcessor.prepare`` takes it."""

    image: object
    question: str
    options: list[str] | None = None
    postfix: str = ""


@dataclass
class Stage1Turn:
    """One request's stage 1: its ERGO context (original image, questions, settings), the coarse view, and the
    messages sent."""

    context: ErgoContext
    coarse: Image.Image
    messages: list[dict]


class ErgoChat:
    """ERGO's two stages over an engine that answers OpenAI-format chat messages: the requests each stage sends, the
    zoom between them and the results, with ``ErgoProcessor``'s code. Subclasses send the requests.

    Args:
        processor: an ``ErgoProcessor``, or the folder / Hub id to load one from: its budgets, fallback policy and
            template apply, as in ``generate()``. Only the processor's and config's files are read, never weights.
        max_tokens: per stage, as ``max_new_tokens`` locally.
        skip_answered: end after stage 1 when it answered without a region; default: the folder's
            ``config.skip_answered_stage2``, as ``generate()`` does (False for a processor object).
        **processor_settings: ``coarse_budget``, ``crop_budget``, ``fallback``, ``stage2_template`` overrides.
    """

    def __init__(self, processor: ErgoProcessor | str, max_tokens: int = 1024, skip_answered: bool | None = None,
                 **processor_settings):
        if isinstance(processor, str):
            source = processor
            processor = ErgoProcessor.from_pretrained(source, **processor_settings)
            if skip_answered is None:
                config, _ = PretrainedConfig.get_config_dict(source)
                skip_answered = bool(config.get("skip_answered_stage2", False))
        elif processor_settings:
            raise TypeError("pass processor settings either to ErgoProcessor or to the engine, not with a processor")
        self.processor, self.max_tokens, self.skip_answered = processor, max_tokens, bool(skip_answered)
        self.stage_logit_bias = {token: -100.0 for token in vision_placeholder_ids(processor.tokenizer)}
        """What both stages send as ``logit_bias``: ``generate``'s rule that a stage never writes a vision
        placeholder (``vision_placeholder_ids``), at the OpenAI API's floor of -100, which keeps a token out of a
        greedy reply."""

    def identity(self) -> dict[str, str]:
        """What names the answering model in evaluation records (``evaluation.MODEL_IDENTITY``)."""
        raise NotImplementedError

    @property
    def description(self) -> str:
        """The answering model, for people (summaries, logs)."""
        raise NotImplementedError

    def answer_many(self, requests: list[ErgoRequest | tuple], max_tokens: int | None = None, on_result=None,
                    **settings) -> list[ErgoResult]:
        """ERGO on many requests, results in order; ``on_result(index, result)`` sees each one. The engine's own."""
        raise NotImplementedError

    def answer(self, image, question: str, options: list[str] | None = None, postfix: str = "",
               **settings) -> ErgoResult:
        """ERGO on one (image, question). A failure is reported in ``ErgoResult.error``, not raised. ``settings``
        override the processor's for this call, as in ``ErgoProcessor.prepare``."""
        return self.answer_many([ErgoRequest(image, question, options, postfix)], **settings)[0]

    def stage1(self, request: ErgoRequest, settings: dict) -> Stage1Turn:
        image = load_image(request.image, name=describe_source(request.image))
        stem, full_question = stage_questions(request.question, request.options, request.postfix)
        context, (coarse,) = self.processor.make_context([image], [full_question], **settings)
        return Stage1Turn(context, coarse, openai_messages(self.processor.stage1_messages(stem), [coarse]))

    def stage2(self, turn: Stage1Turn, first: ChatReply) -> tuple[ZoomDecision, list[dict] | None]:
        """The zoom decision, and stage 1's conversation continued with its reply and the stage-2 turn (``None``
        when the decision skips stage 2). A cut-off stage 1 is the engine's ``finish_reason == "length"``: its
        application of ``generate``'s rule (``ran_out_of_tokens``) to the tokens only it sees."""
        decision = self.processor.plan_zooms(turn.context, [first.text], skip_answered=self.skip_answered,
                                             truncated=[first.finish_reason == "length"])[0]
        if decision.image is None:
            return decision, None
        question = self.processor.stage2_turn_messages(turn.context.samples[0].stage2_question,
                                                       turn.context.stage2_template)
        return decision, turn.messages + [{"role": "assistant", "content": first.text}] + openai_messages(
            question, [decision.image])

    def result(self, turn: Stage1Turn, first: ChatReply, decision: ZoomDecision, second: ChatReply | None,
               seconds: dict[str, float]) -> ErgoResult:
        """The request's ``ErgoResult``: the answer, region, vision tokens (from the geometry) and usage."""
        coarse = turn.coarse
        final_text = second.text if second else first.text
        stage1_tokens = self.processor.image_tokens(*coarse.size, coarse.width * coarse.height)
        return ErgoResult(
            answer=extract_answer(final_text), final_text=final_text, stage1_text=first.text,
            region=list(decision.region) if decision.region else None, fallback=decision.fallback,
            second_image_size=list(decision.image.size) if decision.image is not None else None,
            vision_tokens=self.processor.vision_token_counts(stage1_tokens, decision, turn.context.samples[0].image),
            seconds=_rounded(seconds), **_usages(first, second),
        )

    def single_pass_messages(self, source, question: str, budget: int | None) -> tuple[int, list[dict]]:
        """One plain turn, as ``ErgoProcessor.single_pass``: the request's vision tokens (from the geometry) and
        messages. The original as it is (the engine's image processor then applies its own pixel limit, 16384 tokens
        for stock Qwen2.5-VL), or with ``budget`` the image resized as ERGO's coarse view is."""
        image = load_image(source, name=describe_source(source))
        if budget is None:
            sent, tokens = image, self.processor.full_resolution_tokens(image)
            if tokens is None:
                raise ValueError(f"a {image.width}x{image.height} image is flatter than Qwen2.5-VL's limit: "
                                 f"no full-resolution pass")
        else:
            sent = resize_to_budget(image, budget_to_pixels(budget))
            tokens = self.processor.image_tokens(*sent.size, sent.width * sent.height)
        messages = openai_messages([{"role": "system", "content": SINGLE_PASS_SYSTEM_PROMPT},
                                    *self.processor.single_pass_messages(question)], [sent])
        return tokens, messages

    @staticmethod
    def single_pass_result(tokens: int, reply: ChatReply, seconds: float) -> ErgoResult:
        return ErgoResult(
            answer=extract_answer(reply.text), final_text=reply.text, stage1_text=reply.text, region=None,
            fallback=None, second_image_size=None,
            vision_tokens={"stage1": tokens, "stage2": 0, "total": tokens, "full_resolution": None},
            seconds=_rounded({"total": seconds}), **_usages(reply, None),
        )


class ErgoClient(ErgoChat):
    """ERGO over an OpenAI-compatible endpoint.

    Args:
        base_url: e.g. ``http://localhost:8000/v1``.
        model: the served model's name.
        processor: an ``ErgoProcessor``, or the folder / Hub id to load one from (default: ``model``, which is what
            ``transformers serve`` and ``vllm serve <folder>`` call it); see ``ErgoChat``.
        max_tokens, skip_answered, **processor_settings: see ``ErgoChat``.
        concurrency, timeout, max_retries, api_key: see ``ChatEndpoint``.
    """

    def __init__(self, base_url: str, model: str, processor: ErgoProcessor | str | None = None, *,
                 max_tokens: int = 1024, skip_answered: bool | None = None, concurrency: int = 16,
                 timeout: float = 120.0, max_retries: int = 3, api_key: str | None = None, **processor_settings):
        self.endpoint = ChatEndpoint(base_url, model, api_key=api_key, timeout=timeout, max_retries=max_retries,
                                     concurrency=concurrency)
        super().__init__(processor or model, max_tokens, skip_answered, **processor_settings)

    @property
    def base_url(self) -> str:
        return self.endpoint.base_url

    @property
    def model(self) -> str:
        return self.endpoint.model

    def identity(self) -> dict[str, str]:
        return {"endpoint": self.base_url, "served_model": self.model}

    @property
    def description(self) -> str:
        return f"{self.model} at {self.base_url}"

    # ------------------------------------------------------------------ ERGO

    def answer_many(self, requests: list[ErgoRequest | tuple], max_tokens: int | None = None, on_result=None,
                    **settings) -> list[ErgoResult]:
        """ERGO on many requests (``(image, question)`` tuples too), ``concurrency`` in flight, results in order;
        ``on_result(index, result)`` sees each as it finishes."""
        return self.endpoint.run(self.aanswer_many(requests, max_tokens, on_result, **settings))

    async def aanswer(self, image, question: str, options: list[str] | None = None, postfix: str = "",
                      **settings) -> ErgoResult:
        return (await self.aanswer_many([ErgoRequest(image, question, options, postfix)], **settings))[0]

    async def aanswer_many(self, requests: list[ErgoRequest | tuple], max_tokens: int | None = None,
                           on_result=None, **settings) -> list[ErgoResult]:
        limit = max_tokens or self.max_tokens
        return await self.endpoint.amap(
            lambda session, request: _guarded(self._two_stages(session, request, limit, settings)),
            as_requests(requests), on_result)

    async def _two_stages(self, session, request: ErgoRequest, max_tokens: int, settings: dict) -> ErgoResult:
        started = time.perf_counter()
        turn = await asyncio.to_thread(self.stage1, request, settings)
        # ------------------------------------------------------------ stage 1: coarse view
        first = await self.endpoint.achat(session, turn.messages, max_tokens, logit_bias=self.stage_logit_bias)
        if first.error:
            return failure(f"stage 1: {first.error}", started)
        stage1_done = time.perf_counter()
        # ------------------------------------------------------------ zoom: region, crop, stage-2 turn
        decision, messages = await asyncio.to_thread(self.stage2, turn, first)
        zoom_done = time.perf_counter()
        # ------------------------------------------------------------ stage 2: the crop, same conversation
        second = None
        if messages is not None:
            second = await self.endpoint.achat(session, messages, max_tokens, logit_bias=self.stage_logit_bias)
            if second.error:
                return failure(f"stage 2: {second.error}", started, first.text, decision)
        finished = time.perf_counter()
        return self.result(turn, first, decision, second, {
            "stage1": stage1_done - started, "zoom": zoom_done - stage1_done, "stage2": finished - zoom_done,
            "total": finished - started})

    # ------------------------------------------------------------------ single pass (baselines)

    def single_pass_many(self, images: list, questions: list[str], budget: int | None = None,
                         max_tokens: int | None = None, on_result=None) -> list[ErgoResult]:
        """One plain turn per (image, question); see ``ErgoChat.single_pass_messages``. The request carries the
        image as PNG."""
        limit = max_tokens or self.max_tokens
        return self.endpoint.run(self.endpoint.amap(
            lambda session, pair: _guarded(self._single_pass(session, *pair, budget, limit)),
            list(zip(images, questions)), on_result))

    async def _single_pass(self, session, source, question: str, budget: int | None, max_tokens: int) -> ErgoResult:
        started = time.perf_counter()
        tokens, messages = await asyncio.to_thread(self.single_pass_messages, source, question, budget)
        reply = await self.endpoint.achat(session, messages, max_tokens)
        if reply.error:
            return failure(reply.error, started)
        return self.single_pass_result(tokens, reply, time.perf_counter() - started)


def as_requests(requests: list[ErgoRequest | tuple]) -> list[ErgoRequest]:
    return [request if isinstance(request, ErgoRequest) else ErgoRequest(*request) for request in requests]


async def _guarded(coroutine) -> ErgoResult:
    """A request's result, or its failure: whatever goes wrong with one sample (an unreadable image, a reply the
    parser or the crop cannot use, a server error) is that sample's, and the others go on."""
    started = time.perf_counter()
    try:
        return await coroutine
    except Exception as error:  # noqa: BLE001 - per-sample failures are values
        return failure(f"{type(error).__name__}: {error}", started)


def _usages(first: ChatReply, second: ChatReply | None) -> dict[str, dict[str, int | None]]:
    """``prompt_tokens``, ``completion_tokens`` and ``cached_prompt_tokens`` of ``ErgoResult``, per stage and in
    total (``None`` where the engine did not report it)."""
    usages = {}
    for name, field in (("prompt_tokens", "prompt_tokens"), ("completion_tokens", "completion_tokens"),
                        ("cached_prompt_tokens", "cached_tokens")):
        counts = {"stage1": getattr(first, field), "stage2": getattr(second, field) if second else 0}
        counts["total"] = None if None in counts.values() else sum(counts.values())
        usages[name] = counts
    return usages


def _rounded(seconds: dict[str, float]) -> dict[str, float]:
    return {key: round(value, 4) for key, value in seconds.items()}


def failure(error: str, started: float, stage1_text: str = "", decision: ZoomDecision | None = None) -> ErgoResult:
    """The ``ErgoResult`` of a request that ended without an answer."""
    return ErgoResult(
        answer=None, final_text="", stage1_text=stage1_text,
        region=list(decision.region) if decision and decision.region else None,
        fallback=decision.fallback if decision else None, second_image_size=None, vision_tokens={},
        seconds=_rounded({"total": time.perf_counter() - started}), error=error,
    )
