"""Prompt strings, the stage-1/stage-2 question split and answer extraction (ergo-reference.md §2.1, §2.6, §3)."""

import pytest

from processing_ergo.prompts_ergo import (
    STAGE1_TEMPLATE,
    STAGE1_TEMPLATES,
    STAGE2_TEMPLATES,
    SYSTEM_PROMPT,
    answer_letters,
    extract_answer,
    letters_match,
    split_question,
    stage2_prompt,
    stage_questions,
)


def test_prompts_are_the_reference_strings():
    assert SYSTEM_PROMPT.startswith("You are a helpful assistant. Given an image and one question. First,")
    assert SYSTEM_PROMPT.endswith("Once the enlarged image is available, provide the final answer.")
    assert STAGE1_TEMPLATE.startswith("{Question} First, consider how to zoom in")
    assert STAGE1_TEMPLATE.endswith("<zoom>[x1, y1, x2, y2]</zoom> tags.")
    assert "\n" not in SYSTEM_PROMPT + STAGE1_TEMPLATE


def test_stage1_asks_relative_boxes_only_for_the_relative_convention():
    """Qwen2.5-VL's absolute pixels keep the reference's template; the relative (0-1000) families' template only
    says so, after "bounding box coordinates"."""
    assert STAGE1_TEMPLATES["absolute"] is STAGE1_TEMPLATE
    head, tail = STAGE1_TEMPLATE.split("bounding box coordinates")
    assert STAGE1_TEMPLATES["relative"] == head + "bounding box coordinates, relative to the image on a 0-1000 scale," + tail


def test_stage2_template_variants_differ_only_in_the_typo():
    reference, fixed = STAGE2_TEMPLATES["reference"], STAGE2_TEMPLATES["fixed"]
    assert reference.startswith("{Question}\nCarefully analyze both the original image")
    assert "strictly <think> ... <think>, and provide" in reference
    assert "strictly <think> ... </think>, and provide" in fixed
    assert reference.replace("... <think>,", "... </think>,") == fixed
    assert reference.endswith("enclosed within <answer> ... </answer>")


def test_stage2_prompt_rejects_unknown_variants():
    with pytest.raises(ValueError, match="stage2_template"):
        stage2_prompt("q", "typo-free")


VSTAR = ("What is the color of the woman's bag?\n(A) red\n(B) black\n(C) white\n(D) blue\n"
         "Answer with the option's letter from the given choices directly.")


SPLIT_CASES = [
    (VSTAR, "What is the color of the woman's bag?", ["(A) red", "(B) black", "(C) white", "(D) blue"],
     "Answer with the option's letter from the given choices directly."),
    ("Which side?\nA:left\nB:right", "Which side?", ["A:left", "B:right"], ""),
    ("Count them.\nA. 1\nB. 2\nC) 3", "Count them.", ["A. 1", "B. 2", "C) 3"], ""),
    ("Line one\nline two\n(A) x\n(B) y", "Line one\nline two", ["(A) x", "(B) y"], ""),
    ("Describe the scene.", "Describe the scene.", [], ""),
    ("What is written?\n(A) only one option", "What is written?\n(A) only one option", [], ""),
    ("A. is this a stem?\nB. or an option", "A. is this a stem?\nB. or an option", [], ""),
]


@pytest.mark.parametrize("question, stem, options, postfix", SPLIT_CASES)
def test_split_question(question, stem, options, postfix):
    assert split_question(question) == (stem, options, postfix)


@pytest.mark.parametrize("question, stem, options, postfix", SPLIT_CASES)
@pytest.mark.parametrize("newline", ["\r\n", "\r"])
def test_split_question_reads_crlf_lines_as_lf_lines(question, stem, options, postfix, newline):
    assert split_question(question.replace("\n", newline)) == (stem, options, postfix)


@pytest.mark.parametrize(
    "question",
    [
        "What is the color of the woman's bag?\n(A) red\n\n(B) black\n\n(C) white\n\n(D) blue\n\n"
        "Answer with the option's letter from the given choices directly.",
        "What is the color of the woman's bag?\n\n(A) red\n  \n(B) black\n\t\n(C) white\n(D) blue\n"
        "Answer with the option's letter from the given choices directly.",
        "What is the color of the woman's bag?\r\n\r\n(A) red\r\n\r\n(B) black\r\n(C) white\r\n(D) blue\r\n\r\n"
        "Answer with the option's letter from the given choices directly.\r\n",
    ],
)
def test_blank_lines_between_options_are_ignored(question):
    assert split_question(question) == split_question(VSTAR)
    assert stage_questions(question)[0] == "What is the color of the woman's bag?"  # stage 1 sees no options


def test_blank_lines_inside_the_stem_are_kept():
    assert split_question("Look here.\n\nWhat is it?\n\n(A) x\n\n(B) y") == (
        "Look here.\n\nWhat is it?", ["(A) x", "(B) y"], "")


def test_stage_questions_follow_the_reference_evaluation():
    stage1, stage2 = stage_questions(VSTAR)
    assert stage1 == "What is the color of the woman's bag?"
    assert stage2 == VSTAR
    # HR-Bench style explicit options: no space after the colon, postfix with a leading space.
    postfix = " Answer with the option's letter from the given choices directly."
    stage1, stage2 = stage_questions("Where is it?", ["A:left", "B:right"], postfix)
    assert (stage1, stage2) == ("Where is it?", "Where is it?\nA:left\nB:right\n" + postfix)


@pytest.mark.parametrize("question", ["", "   \n ", None])
def test_empty_questions_are_rejected(question):
    with pytest.raises(ValueError, match="empty"):
        stage_questions(question)


@pytest.mark.parametrize(
    "text, letters",
    [
        ("<think>..</think><answer>A</answer>", "A"),
        ("<answer>(A)</answer>", "A"),
        ("<answer>A. rubber</answer>", "Arubber"),  # wrong against "A", as in the reference
        ("The answer is B", "TheanswerisB"),  # no tag: the whole response
        ("<answer></answer> so C", "answeranswersoC"),  # empty answer: the whole response
        ("<answer>b", "b"),  # unclosed: the rest of the text
    ],
)
def test_answer_letters_follow_the_reference(text, letters):
    assert answer_letters(text) == letters


def test_extract_answer_takes_the_first_block():
    assert extract_answer("<answer> A </answer><answer>B</answer>") == "A"
    assert extract_answer("no tags") is None


@pytest.mark.parametrize("gold", ["A", "(A)", " a ", "A."])
def test_evaluation_and_the_training_reward_give_one_verdict_for_any_way_of_writing_the_gold_letter(gold):
    from ergo_vqa.evaluation import letters_match as evaluation_rule
    from training.rewards import accuracy_reward

    for reply, expected in (("<answer>(A)</answer>", True), ("<answer>B</answer>", False), ("", False)):
        assert evaluation_rule(reply, gold) is letters_match(reply, gold) is expected
        reward = accuracy_reward([[{"role": "assistant", "content": reply}]], [gold], [["(A) x", "(B) y"]])
        assert reward == [float(expected)]
