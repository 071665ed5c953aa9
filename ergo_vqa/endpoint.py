"""One client for OpenAI-compatible chat endpoints (vLLM, SGLang, ``transformers serve``, TGI, hosted APIs).

Built on the ``openai`` SDK: ``transformers[serving]`` already brings it, every engine above documents it, and it
retries what should be retried (connection errors, timeouts, 408/409/429/5xx, honouring ``Retry-After``) with
exponential backoff, so this module adds only what the SDK leaves to the caller: a bound on requests in flight, and
errors returned per request as values (``ChatReply.error``) rather than raised, so one failed sample never ends a
batch. ``huggingface_hub.AsyncInferenceClient`` would add aiohttp and retries only for a model that is loading.
"""

from __future__ import annotations

import asyncio
import base64
import io
import json
import os
import time
import urllib.request
from dataclasses import dataclass

from PIL import Image

from processing_ergo.images_ergo import abbreviate


@dataclass
class ChatReply:
    """One chat request's outcome: the reply with its ``usage`` counts, or why there is none."""

    text: str | None
    finish_reason: str | None = None
    """``stop``, or ``length`` when the reply was cut off by ``max_tokens``."""
    prompt_tokens: int | None = None
    completion_tokens: int | None = None
    cached_tokens: int | None = None
    """Prompt tokens the engine took from its prefix cache, where it reports them (vLLM:
    ``usage.prompt_tokens_details.cached_tokens`` with ``--enable-prompt-tokens-details``)."""
    seconds: float = 0.0
    error: str | None = None


class ChatEndpoint:
    """``/chat/completions`` of one served model, greedy by default.

    Args:
        base_url: the server's OpenAI base URL, e.g. ``http://localhost:8000/v1``.
        model: the served model's name (``vllm serve --served-model-name``; ``transformers serve``: the folder or id).
        api_key: sent as a bearer token; default ``$OPENAI_API_KEY``, or ``EMPTY`` (local servers ignore it).
        timeout: seconds per attempt.
        max_retries: further attempts after a retryable failure, with the SDK's backoff (0.5 s doubling, 8 s at most).
        concurrency: requests in flight at once, per ``chat_many`` / ``amap`` call (each call has its own bound and
            connection pool: send a batch through one call rather than one call per request).
    """

    def __init__(self, base_url: str, model: str, api_key: str | None = None, timeout: float = 120.0,
                 max_retries: int = 3, concurrency: int = 16):
        if not base_url.startswith(("http://", "https://")):
            raise ValueError(f"endpoint must be an http(s) URL such as http://localhost:8000/v1, got {base_url!r}")
        if concurrency < 1 or max_retries < 0 or timeout <= 0:
            raise ValueError(f"need concurrency >= 1, max_retries >= 0 and timeout > 0, got {concurrency}, "
                             f"{max_retries} and {timeout}")
        self.base_url, self.model = base_url.rstrip("/"), model
        self.api_key = api_key or os.environ.get("OPENAI_API_KEY") or "EMPTY"
        self.timeout, self.max_retries, self.concurrency = timeout, max_retries, concurrency

    def session(self):
        """An ``openai.AsyncOpenAI`` client for the running event loop (its connection pool belongs to one loop)."""
        from openai import AsyncOpenAI

        return AsyncOpenAI(base_url=self.base_url, api_key=self.api_key, timeout=self.timeout,
                           max_retries=self.max_retries)

    async def achat(self, session, messages: list[dict], max_tokens: int, temperature: float = 0.0,
                    logit_bias: dict[int, float] | None = None) -> ChatReply:
        """One request on ``session``; any failure (after the SDK's retries) comes back as ``ChatReply.error``.
        ``logit_bias`` (token id: bias, -100 to 100) is sent only when given."""
        started = time.perf_counter()
        biased = {"logit_bias": {str(token): bias for token, bias in logit_bias.items()}} if logit_bias else {}
        try:
            response = await session.chat.completions.create(
                model=self.model, messages=messages, max_tokens=max_tokens, temperature=temperature, **biased)
            if not getattr(response, "choices", None):
                raise ValueError(f"the reply has no choices: {abbreviate(str(response), 200)}")
            choice = response.choices[0]
            text = getattr(choice.message, "content", None)
            if not isinstance(text, str):
                raise ValueError("the reply has no text content")
        except Exception as error:  # noqa: BLE001 - per-request errors are values; the caller decides
            return ChatReply(None, seconds=time.perf_counter() - started, error=describe_error(error))
        usage = response.usage
        details = getattr(usage, "prompt_tokens_details", None)
        return ChatReply(text, choice.finish_reason, usage.prompt_tokens if usage else None,
                         usage.completion_tokens if usage else None, getattr(details, "cached_tokens", None),
                         time.perf_counter() - started)

    async def amap(self, function, items: list, on_result=None) -> list:
        """``[await function(session, item) for item in items]`` with at most ``concurrency`` in flight, in order;
        ``on_result(index, result)`` is called as each one finishes (to write it down before the others end)."""
        limit = asyncio.Semaphore(self.concurrency)
        async with self.session() as session:
            async def bounded(index: int, item):
                async with limit:
                    result = await function(session, item)
                if on_result is not None:
                    on_result(index, result)
                return result

            return await asyncio.gather(*(bounded(index, item) for index, item in enumerate(items)))

    def prefix_cache_counters(self) -> dict[str, float] | None:
        """vLLM's server-wide prefix-cache counters from its Prometheus ``/metrics`` (``queries`` and ``hits``, in
        prompt tokens, since the server started), or ``None`` where the server exposes none. The difference over a
        run is what that run's requests took from the cache when no other client was sending."""
        root = self.base_url.removesuffix("/v1")
        try:
            with urllib.request.urlopen(f"{root}/metrics", timeout=min(self.timeout, 10.0)) as response:
                text = response.read().decode(errors="replace")
        except (OSError, ValueError):
            return None
        counters = {"queries": 0.0, "hits": 0.0}
        found = False
        for line in text.splitlines():
            for name in counters:
                if line.startswith(f"vllm:prefix_cache_{name}_total"):
                    counters[name] += float(line.rsplit(" ", 1)[1])
                    found = True
        return counters if found else None

    def run(self, coroutine):
        """Runs ``coroutine`` to completion from synchronous code (the sync methods' one way into asyncio)."""
        try:
            asyncio.get_running_loop()
        except RuntimeError:
            return asyncio.run(coroutine)
        coroutine.close()
        raise RuntimeError("called from a running event loop (e.g. a notebook): use the async form (await a...)")

    def chat_many(self, conversations: list[list[dict]], max_tokens: int, temperature: float = 0.0) -> list[ChatReply]:
        """One reply per conversation, in order, ``concurrency`` at a time."""
        return self.run(self.amap(lambda session, messages: self.achat(session, messages, max_tokens, temperature),
                                  conversations))


def describe_error(error: BaseException) -> str:
    """A one-line reason: the HTTP status and the server's message when there was a response."""
    if isinstance(error, json.JSONDecodeError):
        return f"malformed reply, not JSON ({error})"
    status = getattr(error, "status_code", None)
    message = str(error).strip().splitlines()[0] if str(error).strip() else type(error).__name__
    body = getattr(error, "body", None)
    if body and str(body) not in message:  # the server's own words, e.g. FastAPI's {"detail": ...}
        message += f" - {body}"
    return f"{type(error).__name__}" + (f" (HTTP {status})" if status else "") + f": {message[:300]}"


def image_data_uri(image: Image.Image) -> str:
    """``image`` as a lossless PNG data URI: the server decodes exactly these pixels."""
    buffer = io.BytesIO()
    image.save(buffer, format="PNG")
    return "data:image/png;base64," + base64.b64encode(buffer.getvalue()).decode()


def openai_messages(messages: list[dict], images: list[Image.Image]) -> list[dict]:
    """Chat-template messages (``{"type": "image"}`` placeholders, as ``ErgoProcessor`` builds them) in the OpenAI
    format, the placeholders filled with ``images`` in order as data URIs."""
    pending = iter(images)
    converted = []
    for message in messages:
        content = message["content"]
        if isinstance(content, str):
            converted.append({"role": message["role"], "content": content})
            continue
        parts = []
        for block in content:
            if block["type"] == "image":
                parts.append({"type": "image_url", "image_url": {"url": image_data_uri(next(pending))}})
            else:
                parts.append({"type": "text", "text": block["text"]})
        converted.append({"role": message["role"], "content": parts})
    return converted
