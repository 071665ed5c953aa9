"""ERGO's reward callables on crafted rollouts, malformed ones included, and the training data checks."""

from __future__ import annotations

import io
import json
import pickle

import pytest
from datasets import Dataset

from chat_server import chat_server
from conftest import noise_image
from training.data import DataError, load_training_data, to_grpo_rows
from training.judge import JUDGE_LETTER_INSTRUCTION, JUDGE_SHORT_ANSWER_INSTRUCTION
from training.rewards import RewardModelError, accuracy_reward, format_reward, get_box_reward, get_region_reward

GOOD_STAGE1 = "<think> the sign is small </think> <zoom>[10, 10, 50, 40]</zoom>"
GOOD_ANSWER = "<think> I can read it </think> <answer>B</answer>"


def completions(count: int) -> list:
    return [[{"role": "assistant", "content": "..."}] for _ in range(count)]


@pytest.mark.parametrize("text, answer, options, expected", [
    ("<think>x</think> <answer>B</answer>", "B", ["(A) a", "(B) b"], 1.0),
    ("<answer>(b)</answer>", "B", ["(A) a", "(B) b"], 1.0),      # the reference keeps letters only, any case
    ("<answer>B. a dog</answer>", "B", ["(A) a", "(B) b"], 0.0),  # "Badog" is not "B", as in the reference
    ("B", "B", ["(A) a", "(B) b"], 1.0),                          # no <answer>: the letters of the whole text
    ("<answer></answer>", "B", ["(A) a", "(B) b"], 0.0),
    ("<answer>The Red car.</answer>", "red car", [], 1.0),        # free text: normalised exact match
    ("<answer>red</answer>", "red car", [], 0.0),
    ("", "red car", [], 0.0),
    (None, "B", ["(A) a"], 0.0),
])
def test_accuracy(text, answer, options, expected):
    assert accuracy_reward(completions(1), answer=[answer], options=[options], answer_text=[text]) == [expected]


@pytest.mark.parametrize("stage1, answer, region, expected", [
    (GOOD_STAGE1, GOOD_ANSWER, (1, 1, 5, 5), 1.0),
    (GOOD_STAGE1, "<answer>B</answer>", (1, 1, 5, 5), 0.0),                  # turn 2 without <think>
    ("<zoom>[1, 1, 5, 5]</zoom>", GOOD_ANSWER, (1, 1, 5, 5), 0.0),           # turn 1 without <think>
    (GOOD_STAGE1, GOOD_ANSWER, None, 0.0),                                   # no usable region
    (GOOD_STAGE1 + " and more", GOOD_ANSWER, (1, 1, 5, 5), 0.0),             # trailing text
    ("<think> a </think> <answer>B</answer>", "<think> a </think> <answer>B</answer>", None, 0.0),  # never zoomed
    (None, None, None, 0.0),
])
def test_format(stage1, answer, region, expected):
    assert format_reward(completions(1), stage1_text=[stage1], answer_text=[answer], region=[region]) == [expected]


@pytest.mark.parametrize("answer, template, expected", [
    ("<think> a <think> <answer>B</answer>", "reference", 1.0),  # what the reference template asks for (its typo)
    (GOOD_ANSWER, "reference", 1.0),
    ("<think> a <think> <answer>B</answer>", "fixed", 0.0),
    (GOOD_ANSWER, "fixed", 1.0),
])
def test_format_accepts_what_the_stage2_template_asks_for(answer, template, expected):
    assert format_reward(completions(1), stage1_text=[GOOD_STAGE1], answer_text=[answer], region=[(1, 1, 5, 5)],
                         stage2_template=[template]) == [expected]
    if template == "reference":  # the default, as in the processor
        assert format_reward(completions(1), stage1_text=[GOOD_STAGE1], answer_text=[answer], region=[(1, 1, 5, 5)]) == [expected]


def test_box_reward_is_a_step_at_gamma():
    image = noise_image(100, 100)
    box = get_box_reward(0.6)
    regions = [(0, 0, 60, 100), (0, 0, 61, 100), (0, 0, 10, 10), None, (50, 50, 40, 40)]
    assert box(completions(5), image=[image] * 5, region=regions) == [1.0, 0.0, 1.0, 0.0, 1.0]
    assert get_box_reward(0.005)(completions(1), image=[image], region=[(0, 0, 10, 10)]) == [0.0]


def test_reward_objects_carry_the_names_trl_logs_and_survive_pickling():
    """TRL logs ``rewards/<__name__>``; worker processes and checkpoints need picklable rewards."""
    image = noise_image(100, 100)
    box = pickle.loads(pickle.dumps(get_box_reward(0.3)))
    assert (box.__name__, box.threshold) == ("box_reward", 0.3)
    assert box(completions(2), image=[image] * 2, region=[(0, 0, 30, 100), (0, 0, 31, 100)]) == [1.0, 0.0]
    region = pickle.loads(pickle.dumps(get_region_reward(FixedReplies({40: "B"}))))
    assert region.__name__ == "region_reward" and isinstance(region.reward_model, FixedReplies)


class FixedReplies:
    """A reward model that answers from a table keyed by crop width, and fails on one width."""

    def __init__(self, replies: dict):
        self.replies, self.questions = replies, []

    def answer(self, images, questions):
        self.questions += questions
        return [self.replies.get(image.width) for image in images]


def test_region_reward_asks_about_the_crop_only_and_leaves_failures_unscored():
    model = FixedReplies({40: "<answer>B</answer>", 50: "A", 60: None})
    metrics = {}
    crops = [noise_image(40, 30), noise_image(50, 30), noise_image(60, 30), None]
    region = get_region_reward(model)
    scores = region(completions(4), crop=crops, question=["q0", "q1", "q2", "q3"], answer=["B"] * 4,
                    options=[["(A) x", "(B) y"]] * 4, region=[(0, 0, 4, 3)] * 3 + [None],
                    log_metric=lambda name, value: metrics.__setitem__(name, value))
    assert scores == [1.0, 0.0, None, 0.0]  # the failed request is no score, not a wrong answer
    # The rollout without a crop is not asked; the others with the options and the answer-format instruction.
    assert model.questions == [f"q{i}\n(A) x\n(B) y\n{JUDGE_LETTER_INSTRUCTION}" for i in range(3)]
    assert metrics == {"region_reward/rm_failures": 1.0, "region_reward/rm_calls": 3.0,
                       "region_reward/rm_unreadable_share": 0.0}
    assert region.__name__ == "region_reward"


def test_region_reward_stops_training_when_too_many_requests_fail():
    """Limit: more than 25% of the last 8 requests (2 failures). Old failures leave the window."""
    region = get_region_reward(FixedReplies({40: "B"}), max_failure_share=0.25, window=8)
    good, bad = noise_image(40, 30), noise_image(60, 30)

    def ask(crops):
        return region(completions(len(crops)), crop=crops, question=["q"] * len(crops), answer=["B"] * len(crops),
                      options=[["(A) x", "(B) y"]] * len(crops), region=[(0, 0, 4, 3)] * len(crops))

    assert ask([bad, good, bad, good]) == [None, 1.0, None, 1.0]  # 2 of 8: at the limit
    assert ask([good] * 8) == [1.0] * 8  # the window slides past them
    ask([bad, bad, good])
    with pytest.raises(RewardModelError, match="failed 3 of the last 8 requests"):
        ask([bad])
    with pytest.raises(ValueError, match="max_failure_share"):
        get_region_reward(FixedReplies({}), max_failure_share=1.0)
    with pytest.raises(ValueError, match="max_unreadable_share"):
        get_region_reward(FixedReplies({}), max_unreadable_share=-0.1)


class Saying:
    """A judge that gives every crop the same reply."""

    def __init__(self, reply: str):
        self.reply, self.questions = reply, []

    def answer(self, images, questions):
        self.questions += questions
        return [self.reply] * len(images)


def judged(reply: str, answer: str, options: list[str], metrics: dict | None = None, extra: dict | None = None):
    """r_region of one rollout whose judge replies ``reply``."""
    region = get_region_reward(Saying(reply))
    return region(completions(1), crop=[noise_image(40, 30)], question=["What does the sign say?"], answer=[answer],
                  options=[options], region=[(0, 0, 4, 3)],
                  log_metric=None if metrics is None else metrics.__setitem__,
                  log_extra=None if extra is None else extra.__setitem__)[0]


COLOURS = ["(A) red", "(B) blue", "(C) green"]


@pytest.mark.parametrize("reply, expected", [
    ("B", 1.0), ("(B)", 1.0), ("B.", 1.0), ("B. blue", 1.0), ("(B) blue", 1.0), ("The answer is B.", 1.0),
    ("B</answer> and then more text", 1.0),         # the demo model's habit: its letter, then a stray close
    ("B</answer ....... </think>", 1.0),              # ... or one cut off
    ("<think> the sign is blue </think> <answer>(B) blue</answer>", 1.0),
    ("b", 1.0), ("Answer: (B)", 1.0), ("blue", 1.0), ("Blue, the sign is painted blue.", 1.0),
    ("A", 0.0), ("(A) red", 0.0), ("The answer is C.", 0.0), ("C</answer>", 0.0),  # read, and wrong
])
def test_the_judges_letter_is_read_in_any_common_form(reply, expected):
    """The strict reference rule (letters of the whole reply) scored "B. blue", "(B) blue" and "The answer is B."
    as 0, and every reply of the demo model (``E</answer>…``) as 0."""
    metrics = {}
    assert judged(reply, "B", COLOURS, metrics) == expected
    assert metrics["region_reward/rm_unreadable_share"] == 0.0


@pytest.mark.parametrize("reply, expected", [
    ("STOP", 1.0), ("STOP.", 1.0), ("The sign says STOP.", 1.0), ("<answer>stop</answer>", 1.0),
    ("GO", 0.0), ("The sign says STOPPING.", 0.0),
])
def test_a_free_text_judge_reply_is_matched_after_normalising(reply, expected):
    judge = Saying(reply)
    region = get_region_reward(judge)
    assert region(completions(1), crop=[noise_image(40, 30)], question=["What does the sign say?"], answer=["STOP"],
                  options=[[]], region=[(0, 0, 4, 3)]) == [expected]
    assert judge.questions == [f"What does the sign say?\n{JUDGE_SHORT_ANSWER_INSTRUCTION}"]


@pytest.mark.parametrize("reply", ["I cannot tell from this image.", "", "<think> hmm", "The colour is purple.",
                                   "A or B", "E"])  # E: not one of the options
def test_unreadable_replies_score_0_and_are_logged(reply):
    metrics, extra = {}, {}
    assert judged(reply, "B", COLOURS, metrics, extra) == 0.0
    assert metrics["region_reward/rm_unreadable_share"] == 1.0
    assert extra == {"rm_reply": [reply]}  # the raw reply, in the completions table


def test_training_stops_when_most_judge_replies_cannot_be_read(caplog):
    """Limit: more than half of the last 8 replies. Failed requests are not replies; readable ones dilute."""
    readable, unreadable, dead = noise_image(40, 30), noise_image(50, 30), noise_image(60, 30)
    region = get_region_reward(FixedReplies({40: "(B) blue", 50: "I am not sure.", 60: None}), window=8)

    def ask(crops):
        return region(completions(len(crops)), crop=crops, question=["q"] * len(crops), answer=["B"] * len(crops),
                      options=[COLOURS] * len(crops), region=[(0, 0, 4, 3)] * len(crops))

    assert ask([unreadable] * 4 + [dead] * 3) == [0.0] * 4 + [None] * 3  # 4 of 8: at the limit
    assert "could not be read" in caplog.text and "I am not sure." in caplog.text
    assert ask([readable] * 8) == [1.0] * 8  # the window slides past them
    ask([unreadable] * 4)
    with pytest.raises(RewardModelError, match=r"5 of the last 8 replies .* could not be read.*I am not sure"):
        ask([unreadable])


def test_training_data_from_jsonl_with_relative_paths(tmp_path):
    noise_image(300, 200).save(tmp_path / "a.png")
    noise_image(200, 300, 1).convert("L").save(tmp_path / "b.png")
    lines = [{"image": "a.png", "question": "What?", "options": ["(A) x", "(B) y"], "answer": "A"},
             {"image": "b.png", "question": "Which color?", "options": [], "answer": "red"}]
    (tmp_path / "data.jsonl").write_text("\n".join(json.dumps(line) for line in lines))
    dataset = to_grpo_rows(load_training_data(str(tmp_path / "data.jsonl")))
    assert dataset[0]["image"].size == (300, 200) and dataset[1]["image"].size == (200, 300)
    assert dataset[0]["prompt"][1]["content"].count("What?") == 1
    assert dataset[0]["stage2_question"] == (
        "What?\n(A) x\n(B) y\nAnswer with the option's letter from the given choices directly.")
    assert dataset[1]["stage2_question"] == "Which color?"


def test_training_data_from_parquet_bytes_and_a_saved_folder(tmp_path):
    buffer = io.BytesIO()
    noise_image(120, 90).save(buffer, format="PNG")
    table = Dataset.from_list([{"image": {"bytes": buffer.getvalue(), "path": None}, "question": "Q?",
                                "options": ["(A) 1"], "answer": "A"}])
    table.to_parquet(str(tmp_path / "data.parquet"))
    assert to_grpo_rows(load_training_data(str(tmp_path / "data.parquet")))[0]["image"].size == (120, 90)
    table.save_to_disk(str(tmp_path / "saved"))
    assert load_training_data(str(tmp_path / "saved")).num_rows == 1


@pytest.mark.parametrize("row, message", [
    ({"image": "garbage.png"}, "row 1: image: cannot read image"),
    ({"image": "missing.png"}, "row 1: image: image file not found"),
    ({"question": "  "}, "row 1: the question is empty"),
    ({"answer": ""}, "row 1: answer must be a non-empty string"),
])
def test_bad_rows_are_reported_with_their_index(tmp_path, row, message):
    noise_image(64, 64).save(tmp_path / "good.png")
    (tmp_path / "garbage.png").write_bytes(b"not an image")
    good = {"image": str(tmp_path / "good.png"), "question": "Fine?", "options": [], "answer": "yes"}
    bad = {**good, **row}
    if "image" in row:
        bad["image"] = str(tmp_path / row["image"])
    with pytest.raises(DataError, match=message):
        to_grpo_rows(Dataset.from_list([good, bad]))


def test_missing_columns_and_unknown_files_are_refused(tmp_path):
    (tmp_path / "data.jsonl").write_text(json.dumps({"image": "a.png", "question": "Q?"}))
    with pytest.raises(DataError, match=r"missing column\(s\) \['options', 'answer'\]"):
        load_training_data(str(tmp_path / "data.jsonl"))
    (tmp_path / "data.csv").write_text("image,question\n")
    with pytest.raises(DataError, match="unsupported file type"):
        load_training_data(str(tmp_path / "data.csv"))


def test_endpoint_reward_model_round_trip_and_soft_failures():
    from training.reward_model import EndpointRewardModel

    received = []

    def respond(image, text):
        received.append((image.width, text))
        return (500, "") if image.width == 13 else (200, f"<answer>{image.width}</answer>")

    with chat_server(respond) as url:
        model = EndpointRewardModel(url, "rm", retries=1, concurrency=2)
        replies = model.answer([noise_image(40, 30), noise_image(13, 30)], ["q0", "q1"])
    assert replies == ["<answer>40</answer>", None] and model.failures == 1
    assert sorted(received) == [(13, "q1"), (13, "q1"), (40, "q0")]  # the failing request was retried once
    assert "HTTP 500" in model.last_error
