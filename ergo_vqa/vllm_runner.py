"""``ErgoVLLM``: ERGO's two stages on an in-process ``vllm.LLM``, batched per stage (the paper's fastest setup).

The same requests as ``ErgoClient`` (``ErgoChat`` builds them: coarse view, prompts, zoom, crop, fallbacks), given to
``vllm.LLM.chat`` all at once per stage: one batch for every stage 1, then one for every stage 2 that has a crop.
vLLM's automatic prefix caching lets stage 2 reuse stage 1's blocks, as behind ``vllm serve``; each result reports
the cached prompt tokens per stage (``RequestOutput.num_cached_tokens``).

Needs vLLM (``pip install vllm`` on a GPU machine; on this project's CPU machines ``make vllm-env``). vLLM starts
its engine in another process, so a script that builds an ``ErgoVLLM`` needs an ``if __name__ == "__main__":``
guard.
"""

from __future__ import annotations

import time

from processing_ergo import ErgoProcessor

from .client import ErgoChat, ErgoRequest, Stage1Turn, as_requests, failure
from .endpoint import ChatReply
from .inference import ErgoResult

DEFAULT_ENGINE_ARGS = {"limit_mm_per_prompt": {"image": 2, "video": 0}, "enable_prefix_caching": True}
"""Two images per prompt (the coarse view and the crop), no video, prefix caching on (vLLM's default too)."""


class ErgoVLLM(ErgoChat):
    """ERGO on ``vllm.LLM(model)``, in this process.

    Args:
        model: an ERGO or Qwen2.5-VL folder or Hub id, as ``vllm serve`` takes it.
        processor: default ``model``; see ``ErgoChat``.
        max_tokens, skip_answered, **processor_settings: see ``ErgoChat``.
        engine_args: more ``vllm.LLM`` arguments (``dtype``, ``max_model_len``, ``enforce_eager``, ...), over
            ``DEFAULT_ENGINE_ARGS``.
    """

    def __init__(self, model: str, processor: ErgoProcessor | str | None = None, *, max_tokens: int = 1024,
                 skip_answered: bool | None = None, engine_args: dict | None = None, **processor_settings):
        from vllm import LLM  # here, so that importing this module needs no vLLM

        super().__init__(processor or model, max_tokens, skip_answered, **processor_settings)
        self.model = str(model)
        self.llm = LLM(model=self.model, **{**DEFAULT_ENGINE_ARGS, **(engine_args or {})})

    def identity(self) -> dict[str, str]:
        return {"engine": "vllm (in-process)", "served_model": self.model}

    @property
    def description(self) -> str:
        return f"{self.model} on vLLM (in-process)"

    def answer_many(self, requests: list[ErgoRequest | tuple], max_tokens: int | None = None, on_result=None,
                    **settings) -> list[ErgoResult]:
        """ERGO on many requests, one vLLM batch per stage; results in order (``on_result(index, result)`` sees each
        at the end). A batch's samples share its timings. A request that fails (an unreadable image, a prompt the
        engine refuses) is that request's ``ErgoResult.error``; the others go on."""
        limit = max_tokens or self.max_tokens
        requests = as_requests(requests)
        results: list[ErgoResult | None] = [None] * len(requests)
        started = time.perf_counter()
        # ------------------------------------------------------------ stage 1: every coarse view in one batch
        turns: dict[int, Stage1Turn] = {}
        for index, request in enumerate(requests):
            turn, results[index] = _attempt(lambda: self.stage1(request, settings), started)
            if turn is not None:
                turns[index] = turn
        firsts = self._chat_batch({index: turn.messages for index, turn in turns.items()}, limit,
                                  self.stage_logit_bias)
        stage1_done = time.perf_counter()
        # ------------------------------------------------------------ zoom: regions, crops, stage-2 turns
        plans = {}
        for index, first in firsts.items():
            if first.error:
                results[index] = failure(f"stage 1: {first.error}", started)
                continue
            plan, results[index] = _attempt(lambda: self.stage2(turns[index], first), started)
            if plan is not None:
                plans[index] = plan
        zoom_done = time.perf_counter()
        # ------------------------------------------------------------ stage 2: every crop in one batch
        stage2_replies = self._chat_batch({index: messages for index, (_, messages) in plans.items() if messages},
                                          limit, self.stage_logit_bias)
        finished = time.perf_counter()
        timings = {"stage1": stage1_done - started, "zoom": zoom_done - stage1_done, "stage2": finished - zoom_done,
                   "total": finished - started}
        for index, (decision, _) in plans.items():
            second = stage2_replies.get(index)
            if second is not None and second.error:
                results[index] = failure(f"stage 2: {second.error}", started, firsts[index].text, decision)
            else:
                results[index] = self.result(turns[index], firsts[index], decision, second, timings)
        return _reported(results, on_result)

    def single_pass_many(self, images: list, questions: list[str], budget: int | None = None,
                         max_tokens: int | None = None, on_result=None) -> list[ErgoResult]:
        """One plain turn per (image, question) in one batch; see ``ErgoChat.single_pass_messages``."""
        started = time.perf_counter()
        results: list[ErgoResult | None] = [None] * len(images)
        prepared = {}
        for index, (source, question) in enumerate(zip(images, questions)):
            tokens_and_messages, results[index] = _attempt(
                lambda: self.single_pass_messages(source, question, budget), started)
            if tokens_and_messages is not None:
                prepared[index] = tokens_and_messages
        replies = self._chat_batch({index: messages for index, (_, messages) in prepared.items()},
                                   max_tokens or self.max_tokens)
        seconds = time.perf_counter() - started
        for index, reply in replies.items():
            results[index] = (failure(reply.error, started) if reply.error
                              else self.single_pass_result(prepared[index][0], reply, seconds))
        return _reported(results, on_result)

    def _chat_batch(self, conversations: dict[int, list[dict]], max_tokens: int,
                    logit_bias: dict[int, float] | None = None) -> dict[int, ChatReply]:
        """Greedy replies to ``conversations`` in one ``LLM.chat`` call; if the engine refuses the batch (one prompt
        too long, say), each conversation is sent alone, so that only the refused ones fail."""
        if not conversations:
            return {}
        from vllm import SamplingParams

        params = SamplingParams(temperature=0.0, max_tokens=max_tokens, logit_bias=logit_bias)
        started = time.perf_counter()
        try:
            outputs = self.llm.chat(list(conversations.values()), params, use_tqdm=False)
        except Exception as error:  # noqa: BLE001 - retried one by one below, each failure kept per request
            if len(conversations) == 1:
                return {index: ChatReply(None, error=f"{type(error).__name__}: {error}") for index in conversations}
            return {index: reply for index, messages in conversations.items()
                    for index, reply in self._chat_batch({index: messages}, max_tokens, logit_bias).items()}
        seconds = time.perf_counter() - started
        return {index: _reply(output, seconds) for index, output in zip(conversations, outputs)}


def _reply(output, seconds: float) -> ChatReply:
    """A ``vllm.RequestOutput`` as the ``ChatReply`` a server's response gives."""
    completion = output.outputs[0]
    return ChatReply(completion.text, completion.finish_reason, len(output.prompt_token_ids),
                     len(completion.token_ids), output.num_cached_tokens, seconds)


def _attempt(step, started: float) -> tuple[object, ErgoResult | None]:
    """Runs one request's ``step``: its value and no failure, or no value and that request's failure."""
    try:
        return step(), None
    except Exception as error:  # noqa: BLE001 - per-request failures are values
        return None, failure(f"{type(error).__name__}: {error}", started)


def _reported(results: list[ErgoResult], on_result) -> list[ErgoResult]:
    if on_result is not None:
        for index, result in enumerate(results):
            on_result(index, result)
    return results
