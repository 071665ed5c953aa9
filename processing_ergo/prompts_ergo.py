"""ERGO's prompts, the question split between the two stages, and answer extraction.

The strings are the reference's (``src/ergo/const.py``) byte for byte: the released weights were trained on them.
The one addition is the stage-1 template for families that write boxes relative to the image on a 0-1000 scale
(Qwen3-VL, Qwen3.5; ``family_ergo.py``), which says so; Qwen2.5-VL's absolute pixels keep the reference's.
"""

from __future__ import annotations

import re

SYSTEM_PROMPT = (
    "You are a helpful assistant. Given an image and one question. First, identify the coordinates of the key "
    "image area relevant to solving the problem. Append the coordinates in [x1, y1, x2, y2] format at the end of "
    "your response and stop. This will trigger cropping of the corresponding area in the original image and "
    "enlarge it for improved clarity. Once the enlarged image is available, provide the final answer."
)

STAGE1_TEMPLATE = (
    "{Question} First, consider how to zoom in on the image to include only the region containing all the "
    "information necessary to answer the question. Output the thinking process in <think> </think> tags and then "
    "output the region's bounding box coordinates in the following format <zoom>[x1, y1, x2, y2]</zoom> tags."
)

STAGE1_TEMPLATES = {
    "absolute": STAGE1_TEMPLATE,
    "relative": STAGE1_TEMPLATE.replace(
        "bounding box coordinates", "bounding box coordinates, relative to the image on a 0-1000 scale,"),
}
"""Stage 1's template per grounding convention (``family_ergo.GROUNDING_CONVENTIONS``)."""

_STAGE2_BODY = (
    "{Question}\nCarefully analyze both the original image and the enlarged sub-image to solve the question step "
    "by step. Present your reasoning clearly the following format strictly <think> ... {close}, and provide the "
    "final answer enclosed within <answer> ... </answer>"
)
STAGE2_TEMPLATES = {
    # What the published evaluation (``main``: eval.py, infer.py) sends, typo "<think> ... <think>" included.
    "reference": _STAGE2_BODY.replace("{close}", "<think>"),
    # The demo branch's copy with the closing tag fixed; otherwise identical.
    "fixed": _STAGE2_BODY.replace("{close}", "</think>"),
}

LETTER_POSTFIX = " Answer with the option's letter from the given choices directly."
"""The reference's answer-format line for HR-Bench and MME-RealWorld, leading space included; ``stage_questions``
puts it after the options."""
MULTIPLE_CHOICE_POSTFIX = LETTER_POSTFIX.strip()
"""The same line as V* writes it; what training rows, the demo and the synthetic benchmark use."""

# "(A) red", "A. red", "A) red", "A: red", "A:red" (HR-Bench writes no space after the colon).
_OPTION_LINE = re.compile(r"^\s*(?:\([A-Z]\)|[A-Z][.):])")
_LINE_END = re.compile(r"\r\n|\r|\n")


def split_question(question: str) -> tuple[str, list[str], str]:
    """(stem, options, postfix) of a multiple-choice question written as text.

    The rule: trailing lines that look like options ("(A) ...", "A. ...", "A) ...", "A: ...") form the options
    when there are at least two of them and they follow a first line; one non-option line after them is the
    answer-format postfix (V*'s "Answer with the option's letter ..."). Anything else is all stem. CRLF and CR line
    ends read as LF, and blank lines among the options and the postfix are skipped (pasted or Windows-edited text).
    """
    lines = _LINE_END.split(question.strip())
    filled = [index for index, line in enumerate(lines) if line.strip()]  # the first line is never blank
    end = len(filled)
    postfix = ""
    if end > 1 and not _OPTION_LINE.match(lines[filled[-1]]):
        end -= 1
        postfix = lines[filled[-1]]
    start = end
    while start > 1 and _OPTION_LINE.match(lines[filled[start - 1]]):
        start -= 1
    if end - start < 2:
        return "\n".join(lines), [], ""
    return "\n".join(lines[:filled[start]]).strip(), [lines[index] for index in filled[start:end]], postfix


def stage_questions(question: str, options: list[str] | None = None, postfix: str = "") -> tuple[str, str]:
    """(stage-1 question, stage-2 question) as the reference evaluation builds them.

    Stage 1 sees only the stem, stage 2 the stem, the options and the postfix. With ``options`` given explicitly,
    ``question`` is taken as the stem; otherwise options written into the question are detected
    (``split_question``) and the question goes to stage 2 unchanged.
    """
    if question is not None and not isinstance(question, str):  # a ValueError too, so callers catch one kind
        raise ValueError(f"the question must be a string, got {type(question).__name__} ({repr(question)[:80]})")
    if not question or not question.strip():
        raise ValueError("the question is empty")
    if options:
        parts = [question.strip(), "\n".join(str(option) for option in options)] + ([postfix] if postfix else [])
        return question.strip(), "\n".join(parts)
    stem, _, _ = split_question(question)
    return stem, question.strip()


def stage1_prompt(question: str, grounding: str = "absolute") -> str:
    return STAGE1_TEMPLATES[grounding].format(Question=question)


def stage2_prompt(question: str, variant: str = "reference") -> str:
    if variant not in STAGE2_TEMPLATES:
        raise ValueError(f"stage2_template must be one of {sorted(STAGE2_TEMPLATES)}, got {variant!r}")
    return STAGE2_TEMPLATES[variant].format(Question=question)


def extract_answer(text: str) -> str | None:
    """The text inside the first ``<answer>...</answer>``, stripped; None when there is no ``<answer>``."""
    if "<answer>" not in text:
        return None
    return text.split("<answer>", 1)[1].split("</answer>", 1)[0].strip()


def answer_letters(text: str) -> str:
    """The reference's prediction: the ASCII letters of the answer block, or of the whole text without one."""
    return "".join(re.findall(r"[a-zA-Z]", extract_answer(text) or text))


def letters_match(reply: str, answer: str) -> bool:
    """The reference evaluation's multiple-choice verdict: the reply's answer letters equal the gold answer's, ignoring
    case. The gold answer goes through the same letter rule, so ``(A)`` and ``A`` are one answer wherever it is
    scored (evaluation, demo, training reward); the reference's gold answers are bare letters, so its numbers stand."""
    return answer_letters(reply).lower() == answer_letters(answer).lower() != ""
