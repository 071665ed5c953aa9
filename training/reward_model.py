"""The frozen reward model behind r_region: it answers a question from an image (the crop) alone.

Two backends with one method, ``answer(images, questions) -> list[str | None]`` (None: that request failed):
``LocalRewardModel`` (a Qwen2.5-VL, Qwen3-VL or Qwen3.5 folder or Hub id, loaded once, frozen, batched) and
``EndpointRewardModel`` (an OpenAI-compatible chat endpoint, e.g. ``vllm serve Qwen/Qwen2.5-VL-72B-Instruct``).
A failed request is returned as None (the reason in ``last_error``): ``training.rewards.RegionReward`` leaves it
unscored (its group gets no advantage) and stops training once too many of the latest requests failed.
``probe_reward_model`` sends one real request before training, so a dead or misconfigured judge stops the run at
once rather than after the first steps.
"""

from __future__ import annotations

import logging
import os
from contextlib import contextmanager

import torch
from accelerate import PartialState
from PIL import Image
from transformers import AutoModelForImageTextToText

from ergo_vqa.endpoint import ChatEndpoint, openai_messages
from processing_ergo import ErgoProcessor

from .judge import judge_question, read_judge_reply
from .rewards import RewardModelError

logger = logging.getLogger(__name__)


class LocalRewardModel:
    """A model of any supported family in this process (its stock class: the judge answers single turns): greedy, no
    gradients, ``batch_size`` crops per ``generate``."""

    def __init__(self, name_or_path: str, device: str | torch.device | None = None, dtype: str = "auto",
                 max_new_tokens: int = 64, batch_size: int = 8):
        self.processor = ErgoProcessor.from_pretrained(name_or_path, padding_side="left")
        with _without_zero3():  # a frozen copy per process: never partitioned with the policy
            self.model = AutoModelForImageTextToText.from_pretrained(name_or_path, dtype=dtype).eval()
        self.model.to(device if device is not None else PartialState().device)
        self.model.requires_grad_(False)
        self.max_new_tokens, self.batch_size = max_new_tokens, batch_size
        self.failures = 0
        self.last_error: str | None = None

    @torch.no_grad()
    def answer(self, images: list[Image.Image], questions: list[str]) -> list[str | None]:
        replies: list[str | None] = []
        for start in range(0, len(images), self.batch_size):
            chunk = slice(start, start + self.batch_size)
            try:
                replies += self._answer(images[chunk], questions[chunk])
            except Exception as error:  # a failed batch is unscored; RegionReward decides when to stop
                logger.warning("reward model failed on %d requests: %s", len(images[chunk]), error)
                self.last_error = f"{type(error).__name__}: {error}"
                self.failures += len(images[chunk])
                replies += [None] * len(images[chunk])
        return replies

    def _answer(self, images: list[Image.Image], questions: list[str]) -> list[str]:
        inputs = self.processor.single_pass(images, questions).to(self.model.device)
        output = self.model.generate(**inputs, max_new_tokens=self.max_new_tokens, do_sample=False)
        return self.processor.post_process_image_text_to_text(output, prompt_length=inputs["input_ids"].shape[1])


class EndpointRewardModel:
    """An OpenAI-compatible chat endpoint, through ``ergo_vqa.endpoint.ChatEndpoint`` (the ``openai`` SDK: bounded
    concurrency, timeouts, retries with backoff on 429/5xx and connection errors): one greedy single-turn request
    per crop, ``concurrency`` in flight."""

    def __init__(self, base_url: str, model: str, api_key_env: str = "OPENAI_API_KEY", timeout: float = 60.0,
                 retries: int = 2, concurrency: int = 16, max_tokens: int = 64):
        self.endpoint = ChatEndpoint(base_url, model, api_key=os.environ.get(api_key_env, "EMPTY"), timeout=timeout,
                                     max_retries=retries, concurrency=concurrency)
        self.max_tokens = max_tokens
        self.failures = 0
        self.last_error: str | None = None

    def answer(self, images: list[Image.Image], questions: list[str]) -> list[str | None]:
        conversations = [openai_messages(ErgoProcessor.single_pass_messages(question), [image.convert("RGB")])
                         for image, question in zip(images, questions)]
        replies = self.endpoint.chat_many(conversations, self.max_tokens)
        for reply in replies:
            if reply.error:
                logger.warning("reward endpoint request failed: %s", reply.error)
                self.last_error = reply.error
        self.failures += sum(reply.error is not None for reply in replies)
        return [reply.text for reply in replies]


PROBE_COLOUR, PROBE_OPTIONS = (200, 30, 30), ["(A) red", "(B) green", "(C) blue"]


def probe_reward_model(reward_model) -> str:
    """One real request (a red 112x112 image: "What colour is this image?" with three options, asked as
    ``training.judge`` asks), before training: a judge that cannot answer raises ``RewardModelError`` with the
    reason; a reply that cannot be read is logged as a warning with the reply (training then counts such replies
    and stops when most are unreadable). Returns the reply."""
    question = judge_question("What colour is this image?", PROBE_OPTIONS)
    reply = reward_model.answer([Image.new("RGB", (112, 112), PROBE_COLOUR)], [question])[0]
    if reply is None:
        raise RewardModelError(f"the reward model did not answer a probe request before training: "
                               f"{getattr(reward_model, 'last_error', None) or 'no reason given'}. Check that it is "
                               "up and the --reward_model_* settings (endpoint, name, timeout, retries)")
    if read_judge_reply(reply, PROBE_OPTIONS) is None:
        logger.warning("the reward model's reply to the probe request could not be read: %r (asked %r)",
                       reply[:200], question)
    else:
        logger.info("the reward model answered the probe request: %r", reply[:200])
    return reply


@contextmanager
def _without_zero3():
    """Load outside DeepSpeed ZeRO-3's partitioned init, then restore its configuration for the policy."""
    from transformers.integrations import deepspeed

    saved = deepspeed._hf_deepspeed_config_weak_ref
    deepspeed.unset_hf_deepspeed_config()
    try:
        yield
    finally:
        deepspeed._hf_deepspeed_config_weak_ref = saved
