"""What r_region's judge (the frozen reward model) is asked, and how its reply is read.

The policy's ``<answer>`` is scored by the reference's strict rule (``training.rewards.answer_matches``); a judge is a
general chat model that answers in its own words ("(B) blue", "The answer is B.", "The sign says STOP."), so its
reply needs a rule of its own, and an explicit instruction saying what to write.

The paper's judge prompt is not public (reference notes, section 4.2). The judge here gets the question, the
options and one answer-format instruction, the line Qwen2.5-VL's multiple-choice evaluations end with (and the
reference evaluation's postfix for V*), or for free-form questions the short-answer line of the VQA evaluations:

* multiple choice: ``JUDGE_LETTER_INSTRUCTION``;
* free text: ``JUDGE_SHORT_ANSWER_INSTRUCTION``.

Reading (``read_judge_reply``): ``<think>…</think>`` blocks are dropped; the text inside ``<answer>…</answer>`` is
taken when there is one, else the text before a stray ``</answer>`` (or a cut-off ``</answer``), else the
whole reply. Then:

* multiple choice: the first of, in order, (1) a letter opening the reply: ``B``, ``(B)``, ``B.``, ``B)``,
  ``B:``, followed by anything (``B. blue``, ``(B) blue``), or a lone letter in any case (``b``); a bare capital
  followed by a space counts only when its option's text follows (``A cat`` is not read as ``A`` unless option A
  is "a cat"); (2) a letter after "answer", "option" or "choice" (``The answer is B.``, ``Answer: (C)``), with the
  same rule for what follows it; (3) the reply being one option's text, normalised, or opening with it before a
  punctuation mark (``blue`` or ``Blue, because ...`` for "(B) blue"; several options matching: unreadable). Only
  letters of the options count (any capital when the options carry none). Nothing found: unreadable.
* free text: normalised (``normalize``: lower case, no punctuation, no articles); empty is unreadable. It
  matches when it equals the normalised answer or holds it as whole words ("The sign says STOP." matches "STOP").
  The second part accepts a reply that names the answer among other words, negations included ("not STOP"); the
  short-answer instruction keeps such replies rare.
"""

from __future__ import annotations

import re
import string

from processing_ergo.prompts_ergo import MULTIPLE_CHOICE_POSTFIX, answer_letters, stage_questions

JUDGE_LETTER_INSTRUCTION = MULTIPLE_CHOICE_POSTFIX
"""``"Answer with the option's letter from the given choices directly."``"""
JUDGE_SHORT_ANSWER_INSTRUCTION = "Answer the question using a single word or phrase."

_THINK = re.compile(r"<think>.*?</think>", re.DOTALL)
_OPTION = re.compile(r"^\s*\(?([A-Z])\s*[).:]\s*(.*)$", re.DOTALL)  # "(A) red", "A. red", "A) red", "A:red"
_LEADING_LETTER = re.compile(r"\s*(?:\((?P<paren>[A-Za-z])\)|(?P<bare>[A-Z])(?P<after>[.):;,!?]|\s|$))")
_OPENING_WORDS = re.compile(r"\s*([^.,;:!?]+?)\s*[.,;:!?]")  # "blue, because ..." -> "blue"
_KEYWORD = re.compile(r"\b(?:answer|option|choice)\b(?:\s+(?:is|would be|should be))?\s*[:\-]?", re.IGNORECASE)


def judge_question(question: str, options: list[str] | None) -> str:
    """The text the judge gets with the crop: the stem, the options and the answer-format instruction."""
    if options:
        return stage_questions(question, options, JUDGE_LETTER_INSTRUCTION)[1]
    return stage_questions(question)[1] + "\n" + JUDGE_SHORT_ANSWER_INSTRUCTION


def read_judge_reply(reply: str | None, options: list[str] | None) -> str | None:
    """The judge's answer: the option letter (multiple choice) or the normalised text (free text); None when the
    reply cannot be read (see the module docstring for the rule)."""
    if not isinstance(reply, str):
        return None
    text = _answer_span(reply)
    if not options:
        return normalize(text) or None
    letters = _option_texts(options)
    found = _letter_at(text, letters)
    if found is None:
        for keyword in _KEYWORD.finditer(text):
            found = _letter_at(text[keyword.end():], letters)
            if found is not None:
                break
    if found is None:
        found = _option_by_text(text, letters)
    return found


def judge_verdict(reply: str | None, answer: str, options: list[str] | None) -> bool | None:
    """Whether the judge's reply gives ``answer``; None when it cannot be read."""
    read = read_judge_reply(reply, options)
    if read is None:
        return None
    if options:
        return read == answer_letters(answer).upper()
    gold = normalize(answer)
    return gold != "" and (read == gold or f" {gold} " in f" {read} ")


def normalize(text: str) -> str:
    """Lower case, no punctuation, no articles, single spaces (SQuAD-style)."""
    text = "".join(char for char in text.lower() if char not in string.punctuation)
    return " ".join(word for word in text.split() if word not in ("a", "an", "the"))


def _answer_span(reply: str) -> str:
    text = _THINK.sub(" ", reply)
    if "<answer>" in text:
        text = text.split("<answer>", 1)[1]
    return text.split("</answer", 1)[0].strip()  # also a close the reply cut off ("E</answer ...")


def _option_texts(options: list[str]) -> dict[str, str]:
    """Option letter -> its normalised text; every capital (with no text) when the options carry no letters."""
    parsed = [_OPTION.match(str(option)) for option in options]
    if not all(parsed):
        return {letter: "" for letter in string.ascii_uppercase}
    return {match.group(1): normalize(match.group(2)) for match in parsed}


def _option_by_text(text: str, letters: dict[str, str]) -> str | None:
    """The letter of the one option whose text the reply is, or opens with before a punctuation mark."""
    opening = _OPENING_WORDS.match(text)
    candidates = {normalize(text), normalize(opening.group(1)) if opening else ""}
    matching = [letter for letter, option in letters.items() if option and option in candidates]
    return matching[0] if len(matching) == 1 else None


def _letter_at(text: str, letters: dict[str, str]) -> str | None:
    """The option letter opening ``text`` in one of the forms the module docstring lists, else None."""
    if len(text.strip().strip("().").strip()) == 1:
        letter = text.strip().strip("().").strip().upper()
        return letter if letter in letters else None
    match = _LEADING_LETTER.match(text)
    if match is None:
        return None
    if match.group("paren"):
        letter = match.group("paren").upper()
    else:
        letter = match.group("bare")
        if match.group("after").isspace():  # "A cat": a letter only when its option's text follows
            rest = normalize(text[match.end():])
            if not letters.get(letter) or not f"{rest} ".startswith(letters[letter] + " "):
                return None
    return letter if letter in letters else None
