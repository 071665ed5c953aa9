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
every advantage, and ``RegionReward`` stops training when too many of them fail or cannot be read.
"""

from __future__ import annotations

import logging
import re
from collections import deque

import torch
from accelerate import PartialState
from accelerate.utils import reduce

from processing_ergo.prompts_ergo import STAGE2_TEMPLATES, extract_answer, letters_match

from .judge import judge_question, judge_verdict, normalize

logger = logging.getLogger(__name__)

BOX_AREA_THRESHOLD = 0.6
"""γ: a region larger than this share of the image earns no box reward (the paper's value)."""

RM_MAX_FAILURE_SHARE = 0.5
RM_FAILURE_WINDOW = 500
"""Training stops once more than this share of the last this many reward-model requests failed: a dead reward
model stops it within about 250 requests (three steps of the shipped recipe), while an endpoint restart that fails
one step's requests does not."""
RM_MAX_UNREADABLE_SHARE = 0.5
"""Training stops once more than this share of the last ``RM_FAILURE_WINDOW`` replies could not be read: a judge
that answers in a form ``training.judge`` cannot read would make r_region silently 0."""

_STAGE1_FORMAT = re.compile(r"\s*<think>.*?</think>\s*<zoom>.*?</zoom>\s*", re.DOTALL)
# The reference template asks for "<think> ... <think>" (its typo); the conventional closing tag, which stage 1
# asks for, is accepted too. The fixed one asks for "</think>".
_THINK_CLOSE = {"reference": "(?:</think>|<think>)", "fixed": "</think>"}
assert _THINK_CLOSE.keys() == STAGE2_TEMPLATES.keys()
_STAGE2_FORMAT = {name: re.compile(rf"\s*<think>.*?{close}\s*<answer>.*?</answer>\s*", re.DOTALL)
                  for name, close in _THINK_CLOSE.items()}


def answer_matches(text: str | None, answer: str, options: list[str] | None) -> bool:
    """The rewards' rule: the evaluation's letter rule for multiple choice (``letters_match``), and, unlike the
    evaluation, free-form answers too, by normalised exact match of the ``<answer>`` content."""
    if not isinstance(text, str) or not isinstance(answer, str):
        return False
    if options:
        return letters_match(text, answer)
    predicted = extract_answer(text)
    return normalize(predicted if predicted is not None else text) == normalize(answer) != ""


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
        return [float(area_share(box, picture) <= self.threshold) if box is not None else 0.0
                for box, picture in zip(region, image)]


class RewardModelError(RuntimeError):
    """The reward model failed or could not be read too often: r_region would silently be 0 for much of the run."""


class _RecentShare:
    """The share of bad outcomes among the last ``window`` ones; before that many, the missing ones count as good,
    so a judge that is always bad is caught within its first ``limit * window`` outcomes."""

    def __init__(self, limit: float, window: int):
        self.limit, self.outcomes = limit, deque(maxlen=window)

    def add(self, bad: int, total: int) -> bool:
        """Adds ``bad`` of ``total`` outcomes (the bad ones leave the window last); True when over the limit."""
        self.outcomes.extend([False] * (total - bad) + [True] * bad)
        return self.bad > self.limit * self.outcomes.maxlen

    @property
    def bad(self) -> int:
        return sum(self.outcomes)


class RegionReward:
    """r_region: a frozen reward model (the judge) answers the question from the crop alone (never the original
    image); 1 when its answer is right. It is asked and read as ``training.judge`` says: the question and options
    with an explicit answer-format instruction, and a rule written for a chat model's reply ("(B) blue", "The
    answer is B.", "The sign says STOP."), not the strict ``<answer>`` rule of ``accuracy_reward``.

    Rollouts without a region score 0. A failed request scores None (``ErgoGRPOTrainer`` then keeps its group out
    of the advantages); a reply that cannot be read scores 0. Both are counted and logged per batch over all
    processes (``region_reward/rm_failures``, ``region_reward/rm_calls``, ``region_reward/rm_unreadable_share``:
    the share of the replies received that could not be read), the replies go to the completions table
    (``log_extra`` column ``rm_reply``), and the first unreadable ones are logged as warnings. Every process raises
    ``RewardModelError`` once more than ``max_failure_share`` of the last ``window`` requests failed, or more than
    ``max_unreadable_share`` of the last ``window`` replies could not be read.

    Args:
        reward_model: an object whose ``answer(images, questions)`` returns one reply (or None on failure) per
            image, such as ``training.reward_model.LocalRewardModel`` or ``EndpointRewardModel``.
        max_failure_share: the largest share of failed requests over the window that training tolerates.
        window: how many of the latest requests (and replies) the shares are taken over (before that many, the
            missing ones count as good, so a dead or unreadable judge stops training within its first
            ``share * window`` requests).
        max_unreadable_share: the largest share of unreadable replies over the window that training tolerates.

    Returns (when called with TRL's reward keyword arguments, ``crop``, ``question``, ``options`` and ``answer``
    among them): one float (or None) per completion.
    """

    __name__ = "region_reward"
    examples_logged = 3
    """How many unreadable replies are logged as warnings (the first ones of the run)."""

    def __init__(self, reward_model, max_failure_share: float = RM_MAX_FAILURE_SHARE, window: int = RM_FAILURE_WINDOW,
                 max_unreadable_share: float = RM_MAX_UNREADABLE_SHARE):
        for name, share in (("max_failure_share", max_failure_share), ("max_unreadable_share", max_unreadable_share)):
            if not 0.0 <= share < 1.0:
                raise ValueError(f"need 0 <= {name} < 1, got {share}")
        if window < 1:
            raise ValueError(f"need window >= 1, got {window}")
        self.reward_model = reward_model
        self.failures = _RecentShare(max_failure_share, window)
        self.unreadable = _RecentShare(max_unreadable_share, window)
        self.unreadable_examples: deque[str] = deque(maxlen=self.examples_logged)
        self.unreadable_warned = 0

    def __call__(self, completions, crop, question, answer, options=None, region=None, log_metric=None,
                 log_extra=None, **kwargs) -> list[float | None]:
        options = options if options is not None else [None] * len(completions)
        region = region or [None] * len(completions)
        asked = [index for index, (picture, box) in enumerate(zip(crop, region)) if picture is not None and box]
        questions = [judge_question(question[i], options[i]) for i in asked]
        replies = self.reward_model.answer([crop[i] for i in asked], questions) if asked else []
        scores: list[float | None] = [0.0] * len(completions)
        raw: list[str | None] = [None] * len(completions)
        failures = unreadable = 0
        for index, reply in zip(asked, replies):
            raw[index] = reply
            if reply is None:
                failures += 1
                scores[index] = None
                continue
            verdict = judge_verdict(reply, answer[index], options[index])
            if verdict is None:
                unreadable += 1
                self._note_unreadable(reply, questions[asked.index(index)])
            scores[index] = float(bool(verdict))
        if log_extra is not None:
            log_extra("rm_reply", raw)
        self._check(failures, len(asked), unreadable, log_metric)
        return scores

    def _note_unreadable(self, reply: str, question: str) -> None:
        self.unreadable_examples.append(reply[:200])
        if self.unreadable_warned < self.examples_logged:
            self.unreadable_warned += 1
            logger.warning("the reward model's reply could not be read (r_region 0): %r, asked %r",
                           reply[:200], question[:200])

    def _check(self, failures: int, calls: int, unreadable: int, log_metric) -> None:
        """Adds this batch's requests and replies of all processes to the windows (every process then decides
        alike) and logs the batch's counts."""
        state = PartialState()
        totals = torch.tensor([failures, calls, unreadable], device=state.device)
        failures, calls, unreadable = reduce(totals, reduction="sum").tolist()
        answered = calls - failures
        if log_metric is not None:
            log_metric("region_reward/rm_failures", float(failures))
            log_metric("region_reward/rm_calls", float(calls))
            log_metric("region_reward/rm_unreadable_share", unreadable / answered if answered else 0.0)
        window = self.failures.outcomes.maxlen
        if self.failures.add(failures, calls):
            raise RewardModelError(
                f"the reward model failed {self.failures.bad} of the last {len(self.failures.outcomes)} requests (the "
                f"limit is {self.failures.limit:.0%} of {window}); see the warnings above. Training stops rather than "
                "train without r_region. Fix or restart the reward model and resume from the last checkpoint, or "
                "raise --reward_model_max_failure_share")
        if self.unreadable.add(unreadable, answered):
            raise RewardModelError(
                f"{self.unreadable.bad} of the last {len(self.unreadable.outcomes)} replies of the reward model could "
                f"not be read (the limit is {self.unreadable.limit:.0%} of {window}), so r_region is 0 for them; "
                f"latest: {list(self.unreadable_examples)}. training.judge says what the judge is asked and how its "
                "reply is read; use a judge that follows the instruction, or raise --reward_model_max_unreadable_share")


def get_box_reward(threshold: float = BOX_AREA_THRESHOLD) -> BoxReward:
    """r_box with γ = ``threshold`` (TRL-style factory; the result is picklable and named ``box_reward``)."""
    return BoxReward(threshold)


def get_region_reward(reward_model, max_failure_share: float = RM_MAX_FAILURE_SHARE, window: int = RM_FAILURE_WINDOW,
                      max_unreadable_share: float = RM_MAX_UNREADABLE_SHARE) -> RegionReward:
    """r_region over ``reward_model`` (TRL-style factory; named ``region_reward``)."""
    return RegionReward(reward_model, max_failure_share, window, max_unreadable_share)


def area_share(box: tuple[int, int, int, int], image) -> float:
    """The share of ``image`` that ``box`` (pixels, clamped) covers: what r_box thresholds."""
    x1, y1, x2, y2 = box
    return max(0, x2 - x1) * max(0, y2 - y1) / max(1, image.width * image.height)


def _last_assistant_text(completion) -> str | None:
    if isinstance(completion, str):
        return completion
    texts = [m.get("content") for m in completion if isinstance(m, dict) and m.get("role") == "assistant"]
    return texts[-1] if texts and isinstance(texts[-1], str) else None
