"""ERGO's rewards as plain TRL reward callables.

TRL calls each with the batch's completions and every dataset column as keyword arguments; the ERGO rollout
(``training.rollout``) adds ``stage1_text``, ``answer_text``, ``region`` and ``crop``. The function's
``__name__`` is what TRL logs (``rewards/<name>/mean``), and ``GRPOConfig.reward_weights`` weighs them, so
the paper's total ``r_TCE + r_acc + r_format`` with ``r_TCE = α·r_region + β·r_box`` is the weighted sum of
``region_reward`` (α), ``box_reward`` (β), ``accuracy_reward`` and ``format_reward``. A malformed completion scores 0; nothing raises.
"""

from __future__ import annotations

import re
import string
from collections.abc import Callable

from processing_ergo.prompts_ergo import answer_letters, extract_answer

BOX_AREA_THRESHOLD = 0.6
"""γ: a region larger than this share of the image earns no box reward (the paper's value)."""

_STAGE1_FORMAT = re.compile(r"\s*<think>.*?</think>\s*<zoom>.*?</zoom>\s*", re.DOTALL)
_STAGE2_FORMAT = re.compile(r"\s*<think>.*?</think>\s*<answer>.*?</answer>\s*", re.DOTALL)


def is_correct(text: str | None, answer: str, options: list[str] | None) -> bool:
    """The reference's letter protocol for multiple choice (the answer's letters, case-insensitive), normalised
    exact match of the ``<answer>`` content otherwise."""
    if not isinstance(text, str) or not isinstance(answer, str):
        return False
    if options:
        return answer_letters(text).lower() == answer_letters(answer).lower() != ""
    predicted = extract_answer(text)
    return normalize(predicted if predicted is not None else text) == normalize(answer) != ""


def normalize(text: str) -> str:
    """Lower case, no punctuation, no articles, single spaces (SQuAD-style)."""
    text = "".join(char for char in text.lower() if char not in string.punctuation)
    return " ".join(word for word in text.split() if word not in ("a", "an", "the"))


def accuracy_reward(completions, answer, options=None, answer_text=None, **kwargs) -> list[float]:
    """r_acc: 1 when the final answer (stage 2's, or stage 1's when stage 2 was skipped) matches."""
    texts = answer_text if answer_text is not None else [_last_assistant_text(c) for c in completions]
    options = options if options is not None else [None] * len(texts)
    return [float(is_correct(text, gold, opts)) for text, gold, opts in zip(texts, answer, options)]


def format_reward(completions, stage1_text=None, answer_text=None, region=None, **kwargs) -> list[float]:
    """r_format: 1 when turn 1 is ``<think>…</think><zoom>…</zoom>`` with a usable region and turn 2 is
    ``<think>…</think><answer>…</answer>``; else 0."""
    stage1_text = stage1_text or [None] * len(completions)
    answer_text = answer_text or [None] * len(completions)
    region = region or [None] * len(completions)
    return [
        float(
            isinstance(first, str) and isinstance(second, str) and box is not None
            and _STAGE1_FORMAT.fullmatch(first) is not None and _STAGE2_FORMAT.fullmatch(second) is not None
        )
        for first, second, box in zip(stage1_text, answer_text, region)
    ]


def make_box_reward(threshold: float = BOX_AREA_THRESHOLD) -> Callable[..., list[float]]:
    """r_box: 1 when the region (original pixels, clamped) covers at most ``threshold`` of the image."""

    def box_reward(completions, image, region=None, **kwargs) -> list[float]:
        region = region or [None] * len(completions)
        return [float(_area_share(box, picture) <= threshold) if box is not None else 0.0
                for box, picture in zip(region, image)]

    return box_reward


def make_region_reward(reward_model) -> Callable[..., list[float]]:
    """r_region: a frozen reward model answers the question from the crop alone (never the original image);
    1 when that answer matches, under the same rule as ``accuracy``. Rollouts without a region score 0, and so
    do reward-model failures, which are counted and logged (``region_reward/rm_failures``), never raised."""

    def region_reward(completions, crop, stage2_question, answer, options=None, region=None, log_metric=None,
               **kwargs) -> list[float]:
        options = options if options is not None else [None] * len(completions)
        region = region or [None] * len(completions)
        asked = [index for index, (picture, box) in enumerate(zip(crop, region)) if picture is not None and box]
        replies = reward_model.answer([crop[i] for i in asked], [stage2_question[i] for i in asked]) if asked else []
        scores = [0.0] * len(completions)
        failures = 0
        for index, reply in zip(asked, replies):
            failures += reply is None
            scores[index] = float(is_correct(reply, answer[index], options[index]))
        if log_metric is not None:
            log_metric("region_reward/rm_failures", float(failures))
            log_metric("region_reward/rm_calls", float(len(asked)))
        return scores

    return region_reward


def _area_share(box: tuple[int, int, int, int], image) -> float:
    x1, y1, x2, y2 = box
    return max(0, x2 - x1) * max(0, y2 - y1) / max(1, image.width * image.height)


def _last_assistant_text(completion) -> str | None:
    if isinstance(completion, str):
        return completion
    texts = [m.get("content") for m in completion if isinstance(m, dict) and m.get("role") == "assistant"]
    return texts[-1] if texts and isinstance(texts[-1], str) else None
