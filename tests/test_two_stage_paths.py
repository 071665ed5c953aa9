"""The three copies of ERGO's two stages (local ``generate``, ``ErgoClient`` against a chat server, the GRPO rollout)
keep one set of books: the same scripted stage-1 text gives the same region, fallback / cut-off label, vision-token
counts and answer verdict on every path (issue 26, section 4)."""

from __future__ import annotations

import json

import torch
from datasets import Dataset

from conftest import noise_image
from ergo_vqa.client import ErgoClient
from ergo_vqa.testing_utils import scripted_stage1, zoom_text
from processing_ergo import ErgoProcessor
from processing_ergo.prompts_ergo import MULTIPLE_CHOICE_POSTFIX, letters_match
from test_serving import ScriptedServer
from test_training import ScriptedTrainer, grpo_config
from training.data import to_grpo_rows
from training.rewards import accuracy_reward
from training.smoke import SMALL_BOX

ROW = {"image": noise_image(840, 560, 30), "question": "What is on the sign?", "options": ["(A) a cat", "(B) a dog"],
       "answer": "(A)"}  # the gold letter as some data sets write it: every path must score "A" right
STAGE1_TEXTS = [zoom_text(SMALL_BOX, "small"), zoom_text(SMALL_BOX, "a much longer thought that runs past the limit")]
"""Row 0 ends with its region; row 1 is cut off by stage 1's limit before it (fallback ``"truncated"``)."""
ANSWER = "<think> a cat </think> <answer>A</answer>"


def _limit(tokenizer) -> int:
    """Each stage's token limit: the first stage-1 text and its stop token, which the second runs past."""
    return len(tokenizer(STAGE1_TEXTS[0], add_special_tokens=False)["input_ids"]) + 1


def _local(model, processor: ErgoProcessor, limit: int) -> list[dict]:
    inputs = processor.prepare([ROW["image"]] * 2, [ROW["question"]] * 2, options=[ROW["options"]] * 2,
                               postfixes=[MULTIPLE_CHOICE_POSTFIX] * 2)
    output = model.generate(**inputs, return_dict_in_generate=True,
                            stage1_generate_kwargs={**scripted_stage1(processor, STAGE1_TEXTS), "max_new_tokens": limit},
                            stage2_generate_kwargs={**scripted_stage1(processor, [ANSWER] * 2), "max_new_tokens": limit})
    answers = processor.batch_decode(output.sequences[:, inputs["input_ids"].shape[1]:], skip_special_tokens=True)
    return [{"region": output.regions[i], "fallback": output.fallbacks[i],
             "vision_tokens": [output.vision_tokens[i]["stage1"], output.vision_tokens[i]["stage2"]],
             "correct": letters_match(answers[i], ROW["answer"])} for i in range(2)]


def _reply(tokenizer, text: str, limit: int) -> bytes:
    """What an engine answers when its model says ``text`` under ``max_tokens=limit``: cut to the limit
    (``finish_reason`` ``"length"``) or ended by its stop token, which it counts."""
    ids = tokenizer(text, add_special_tokens=False)["input_ids"]
    cut = len(ids) >= limit
    content = tokenizer.decode(ids[:limit], skip_special_tokens=True) if cut else text
    return json.dumps({"choices": [{"index": 0, "finish_reason": "length" if cut else "stop",
                                    "message": {"role": "assistant", "content": content}}],
                       "usage": {"prompt_tokens": 1, "completion_tokens": min(len(ids) + 1, limit),
                                 "total_tokens": 1}}).encode()


def _served(tiny_folder, limit: int) -> list[dict]:
    tokenizer = ErgoProcessor.from_pretrained(tiny_folder).tokenizer
    records = []
    for text in STAGE1_TEXTS:
        server = ScriptedServer([(200, _reply(tokenizer, text, limit), 0.0),
                                 (200, _reply(tokenizer, ANSWER, limit), 0.0)])
        try:
            client = ErgoClient(server.url, "ergo", ErgoProcessor.from_pretrained(tiny_folder, coarse_budget=64),
                                max_tokens=limit, max_retries=0)
            result = client.answer(ROW["image"], ROW["question"], ROW["options"], MULTIPLE_CHOICE_POSTFIX)
        finally:
            server.close()
        assert result.error is None, result.error
        records.append({"region": tuple(result.region) if result.region else None, "fallback": result.fallback,
                        "vision_tokens": [result.vision_tokens["stage1"], result.vision_tokens["stage2"]],
                        "correct": letters_match(result.final_text, ROW["answer"])})
    return records


def _rollout(tiny_folder, tmp_path, limit: int) -> tuple[list[dict], list[bool]]:
    from modeling_ergo import ErgoForConditionalGeneration

    seen = []

    def record(completions, **kwargs):
        seen.append({**kwargs, "accuracy": accuracy_reward(completions, **kwargs)})
        return [0.0] * len(completions)

    class Trainer(ScriptedTrainer):
        stage1_texts = STAGE1_TEXTS
        stage2_texts = [ANSWER]

    processor = ErgoProcessor.from_pretrained(tiny_folder, padding_side="left")
    trainer = Trainer(model=ErgoForConditionalGeneration.from_pretrained(tiny_folder, dtype=torch.float32),
                      reward_funcs=[record], train_dataset=to_grpo_rows(Dataset.from_list([ROW, ROW])),
                      args=grpo_config(tmp_path, max_steps=1, max_completion_length=limit,
                                       stage2_max_completion_length=limit), processing_class=processor)
    trainer.train()
    batch, kwargs = trainer.recorded[0], seen[0]
    image_pad = processor.tokenizer.convert_tokens_to_ids("<|image_pad|>")
    records = [{"region": kwargs["region"][i], "fallback": kwargs["fallback"][i],
                "vision_tokens": [int((batch["prompt_ids"][i] == image_pad).sum()),
                                  int((batch["completion_ids"][i] == image_pad).sum())],
                "correct": kwargs["accuracy"][i] == 1.0} for i in range(2)]  # rows 0, 1: one prompt's two rollouts
    return records, kwargs["truncated"][:2]


def test_the_same_stage1_text_keeps_the_same_books_on_all_three_paths(model, tiny_folder, tmp_path):
    processor = ErgoProcessor.from_pretrained(tiny_folder, coarse_budget=64)
    limit = _limit(processor.tokenizer)
    local = _local(model, processor, limit)
    assert [record["fallback"] for record in local] == [None, "truncated"] and local[0]["region"] is not None
    assert all(record["correct"] for record in local)
    assert _served(tiny_folder, limit) == local
    rollout, truncated = _rollout(tiny_folder, tmp_path, limit)
    assert rollout == local
    assert truncated == [False, True]
