"""ERGO's rewards as plain TRL reward callables.

TRL calls each with the batch's completions and every dataset column as keyword arguments; the ERGO rollout
(``training.rollout.ErgoGRPOTrainer``, whose docstring lists them all) adds ``stage1_text``, ``answer_text`` (the
final answer: ``completions`` holds two assistant messages, stage 1's first), ``region``, ``crop`` and
``stage2_template``. The function's
``__name__`` is what TRL logs (``rewards/<name>/mean``), and ``GRPOConfig.reward_weights`` weighs them, so
the paper's total ``r_TCE + r_acc + r_format`` with ``r_TCE = α·r_region + β·r_box`` is the weighted sum of
``region_reward`` (α), ``box_reward`` (β), ``accuracy_reward`` and ``format_reward``. The two with settings are
callable objects made by ``get_box_reward`` / ``get_region_reward``, as TRL's ``trl.rewards`` factories are.
A malformed completion scores 0. A failed reward-model request scores None, which the trainer keeps out of
every advantage, and ``RegionReward`` stops training when too many of them fail.
"""

from __future__ import annotations

import re
import string
from collections import deque

import torch
from accelerate import PartialState
from accelerate.utils import reduce

from processing_ergo.prompts_ergo import STAGE2_TEMPLATES, answer_letters, extract_answer

BOX_AREA_THRESHOLD = 0.6
"""γ: a region larger than this share of the image earns no box reward (the paper's value)."""

RM_MAX_FAILURE_SHARE = 0.5
RM_FAILURE_WINDOW = 500
"""Training stops once more than this share of the last this many reward-model requests failed: a dead reward
model stops it within about 250 requests (three steps of the shipped recipe), while an endpoint restart that fails
one step's requests does not."""

_STAGE1_FORMAT = re.compile(r"\s*<think>.*?</think>\s*<zoom>.*?</zoom>\s*", re.DOTALL)
# The reference template asks for "<think> ... <think>" (its typo); the conventional closing tag, which stage 1
# asks for, is accepted too. The fixed one asks for "</think>".
_THINK_CLOSE = {"reference": "(?:</think>|<think>)", "fixed": "</think>"}
assert _THINK_CLOSE.keys() == STAGE2_TEMPLATES.keys()
_STAGE2_FORMAT = {name: re.compile(rf"\s*<think>.*?{close}\s*<answer>.*?</answer>\s*", re.DOTALL)
                  for name, close in _THINK_CLOSE.items()}


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


def format_reward(completions, stage1_text=None, answer_text=None, region=None, stage2_template=None,
                  **kwargs) -> list[float]:
    """r_format: 1 when turn 1 is ``<think>…</think><zoom>…</zoom>`` with a usable region and turn 2 is
    ``<think>…</think><answer>…</answer>`` as the rollout's stage-2 template asks (``<think>…<think>`` also
    passes under ``"reference"``, the default); else 0."""
    stage1_text = stage1_text or [None] * len(completions)
    answer_text = answer_text or [None] * len(completions)
    region = region or [None] * len(completions)
    stage2_template = stage2_template or ["reference"] * len(completions)
    return [
        float(
            isinstance(first, str) and isinstance(second, str) and box is not None
            and _STAGE1_FORMAT.fullmatch(first) is not None and _STAGE2_FORMAT[template].fullmatch(second) is not None
        )
        for first, second, box, template in zip(stage1_text, answer_text, region, stage2_template)
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


class RewardModelError(RuntimeError):
    """Too many reward-model requests failed: r_region would silently be 0 for much of the run."""


class RegionReward:
    """r_region: a frozen reward model answers the question from the crop alone (never the original image); 1 when
    that answer matches, under the same rule as ``accuracy_reward``. Rollouts without a region score 0. A failed
    request scores None (``ErgoGRPOTrainer`` then keeps its group out of the advantages), is counted and logged
    (``region_reward/rm_failures``), and once more than ``max_failure_share`` of the last ``window`` requests of
    all processes failed, every process raises ``RewardModelError``.

    Args:
        reward_model: an object whose ``answer(images, questions)`` returns one reply (or None on failure) per
            image, such as ``training.reward_model.LocalRewardModel`` or ``EndpointRewardModel``.
        max_failure_share: the largest share of failed requests over the window that training tolerates.
        window: how many of the latest requests the share is taken over (before that many, the missing ones count
            as successes, so a dead reward model stops training within its first ``max_failure_share * window``
            requests).

    Returns (when called with TRL's reward keyword arguments, ``crop``, ``stage2_question`` and ``answer`` among
    them): one float (or None) per completion.
    """

    __name__ = "region_reward"

    def __init__(self, reward_model, max_failure_share: float = RM_MAX_FAILURE_SHARE, window: int = RM_FAILURE_WINDOW):
        if not 0.0 <= max_failure_share < 1.0 or window < 1:
            raise ValueError(f"need 0 <= max_failure_share < 1 and window >= 1, got {max_failure_share}, {window}")
        self.reward_model = reward_model
        self.max_failure_share = max_failure_share
        self.recent_failures: deque[bool] = deque(maxlen=window)

    def __call__(self, completions, crop, stage2_question, answer, options=None, region=None, log_metric=None,
                 **kwargs) -> list[float | None]:
        options = options if options is not None else [None] * len(completions)
        region = region or [None] * len(completions)
        asked = [index for index, (picture, box) in enumerate(zip(crop, region)) if picture is not None and box]
        replies = self.reward_model.answer([crop[i] for i in asked], [stage2_question[i] for i in asked]) if asked else []
        scores: list[float | None] = [0.0] * len(completions)
        failures = 0
        for index, reply in zip(asked, replies):
            failures += reply is None
            scores[index] = None if reply is None else float(answer_matches(reply, answer[index], options[index]))
        if log_metric is not None:
            log_metric("region_reward/rm_failures", float(failures))
            log_metric("region_reward/rm_calls", float(len(asked)))
        self._check_failures(failures, len(asked))
        return scores

    def _check_failures(self, failures: int, calls: int) -> None:
        """Adds this batch's requests of all processes to the window (every process then decides alike)."""
        state = PartialState()
        failures, calls = reduce(torch.tensor([failures, calls], device=state.device), reduction="sum").tolist()
        self.recent_failures.extend([False] * (calls - failures) + [True] * failures)  # failures leave the window last
        failed, window = sum(self.recent_failures), self.recent_failures.maxlen
        if failed > self.max_failure_share * window:
            raise RewardModelError(
                f"the reward model failed {failed} of the last {len(self.recent_failures)} requests (the limit is "
                f"{self.max_failure_share:.0%} of {window}); see the warnings above. Training stops rather than "
                "train without r_region. Fix or restart the reward model and resume from the last checkpoint, or "
                "raise --reward_model_max_failure_share")


def get_box_reward(threshold: float = BOX_AREA_THRESHOLD) -> BoxReward:
    """r_box with γ = ``threshold`` (TRL-style factory; the result is picklable and named ``box_reward``)."""
    return BoxReward(threshold)


def get_region_reward(reward_model, max_failure_share: float = RM_MAX_FAILURE_SHARE,
                      window: int = RM_FAILURE_WINDOW) -> RegionReward:
    """r_region over ``reward_model`` (TRL-style factory; named ``region_reward``)."""
    return RegionReward(reward_model, max_failure_share, window)


def _area_share(box: tuple[int, int, int, int], image) -> float:
    x1, y1, x2, y2 = box
    return max(0, x2 - x1) * max(0, y2 - y1) / max(1, image.width * image.height)


def _last_assistant_text(completion) -> str | None:
    if isinstance(completion, str):
        return completion
    texts = [m.get("content") for m in completion if isinstance(m, dict) and m.get("role") == "assistant"]
    return texts[-1] if texts and isinstance(texts[-1], str) else None
