"""ERGO's rewards as plain TRL reward callables.

TRL calls each with the batch's completions and every dataset column as keyword arguments; the ERGO rollout
(``training.rollout``) adds ``stage1_text``, ``answer_text``, ``region`` and ``crop``. The function's
``__name__`` is what TRL logs (``rewards/<name>/mean``), and ``GRPOConfig.reward_weights`` weighs them, so
the paper's total ``r_TCE + r_acc + r_format`` with ``r_TCE = α·r_region + β·r_box`` is the weighted sum of
``region_reward`` (α), ``box_reward`` (β), ``accuracy_reward`` and ``format_reward``. The two with settings are
callable objects made by ``get_box_reward`` / ``get_region_reward``, as TRL's ``trl.rewards`` factories are.
A malformed completion scores 0; nothing raises.
"""

from __future__ import annotations

import re
import string

from processing_ergo.prompts_ergo import answer_letters, extract_answer

BOX_AREA_THRESHOLD = 0.6
"""γ: a region larger than this share of the image earns no box reward (the paper's value)."""

_STAGE1_FORMAT = re.compile(r"\s*<think>.*?</think>\s*<zoom>.*?</zoom>\s*", re.DOTALL)
_STAGE2_FORMAT = re.compile(r"\s*<think>.*?</think>\s*<answer>.*?</answer>\s*", re.DOTALL)


def answer_matches(text: str | None, answer: str, options: list[str] | None) -> bool:
    """The rewards' rule: the evaluation's letter rule for multiple choice (``ergo_vqa.evaluation.letters_match``),
    and, unlike the evaluation, free-form answers too, by normalised exact match of the ``<answer>`` content."""
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
    return [float(answer_matches(text, gold, opts)) for text, gold, opts in zip(texts, answer, options)]


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


class BoxReward:
    """r_box: 1 when the region (original pixels, clamped) covers at most ``threshold`` of the image, else 0 (also
    when the rollout has no region).

    Args:
        threshold: γ, the largest share of the image a rewarded region may cover.

    Returns (when called with TRL's reward keyword arguments, ``image`` and ``region`` among them):
        one float per completion.
    """

    __name__ = "box_reward"

    def __init__(self, threshold: float = BOX_AREA_THRESHOLD):
        self.threshold = threshold

    def __call__(self, completions, image, region=None, **kwargs) -> list[float]:
        region = region or [None] * len(completions)
        return [float(_area_share(box, picture) <= self.threshold) if box is not None else 0.0
                for box, picture in zip(region, image)]


class RegionReward:
    """r_region: a frozen reward model answers the question from the crop alone (never the original image); 1 when
    that answer matches, under the same rule as ``accuracy_reward``. Rollouts without a region score 0, and so do
    reward-model failures, which are counted and logged (``region_reward/rm_failures``), never raised.

    Args:
        reward_model: an object whose ``answer(images, questions)`` returns one reply (or None on failure) per
            image, such as ``training.reward_model.LocalRewardModel`` or ``EndpointRewardModel``.

    Returns (when called with TRL's reward keyword arguments, ``crop``, ``stage2_question`` and ``answer`` among
    them): one float per completion.
    """

    __name__ = "region_reward"

    def __init__(self, reward_model):
        self.reward_model = reward_model

    def __call__(self, completions, crop, stage2_question, answer, options=None, region=None, log_metric=None,
                 **kwargs) -> list[float]:
        options = options if options is not None else [None] * len(completions)
        region = region or [None] * len(completions)
        asked = [index for index, (picture, box) in enumerate(zip(crop, region)) if picture is not None and box]
        replies = self.reward_model.answer([crop[i] for i in asked], [stage2_question[i] for i in asked]) if asked else []
        scores = [0.0] * len(completions)
        failures = 0
        for index, reply in zip(asked, replies):
            failures += reply is None
            scores[index] = float(answer_matches(reply, answer[index], options[index]))
        if log_metric is not None:
            log_metric("region_reward/rm_failures", float(failures))
            log_metric("region_reward/rm_calls", float(len(asked)))
        return scores


def get_box_reward(threshold: float = BOX_AREA_THRESHOLD) -> BoxReward:
    """r_box with γ = ``threshold`` (TRL-style factory; the result is picklable and named ``box_reward``)."""
    return BoxReward(threshold)


def get_region_reward(reward_model) -> RegionReward:
    """r_region over ``reward_model`` (TRL-style factory; named ``region_reward``)."""
    return RegionReward(reward_model)


def _area_share(box: tuple[int, int, int, int], image) -> float:
    x1, y1, x2, y2 = box
    return max(0, x2 - x1) * max(0, y2 - y1) / max(1, image.width * image.height)


def _last_assistant_text(completion) -> str | None:
    if isinstance(completion, str):
        return completion
    texts = [m.get("content") for m in completion if isinstance(m, dict) and m.get("role") == "assistant"]
    return texts[-1] if texts and isinstance(texts[-1], str) else None
