"""Where a model reads: teacher-forced accuracy of the first answer token, per supervised example kind.

    python -m training.reading_probe runs/synthetic/reading runs/synthetic/data/validation.jsonl

Each example is built by ``training.sft.ErgoSFTCollator`` as training builds it, so the true text comes before the
answer. The check: is the model's most likely next token the answer's first token? That is the option text in stage
2's reasoning ("The enlarged image shows <text>") for ``ergo`` and ``stage2`` examples, and the letter for single
turns (``crop``, ``full``, ``evidence``). For single turns this is the letter the model would write first, whatever
follows it: a model trained for ERGO's conversation may ramble after it, which the reference's scorer (every letter of
a reply without ``<answer>``) counts as wrong. ``coarse`` is the control, one plain turn over the coarse view: the
option letter the model ranks highest there, even if it would rather write something else, since the question is
whether the coarse view carries the answer at all. The synthetic recipe's third phase came from it
(docs/synthetic-proof.md): a model that read every crop shown alone read the same crops at stage 2 of the conversation at chance.
"""

from __future__ import annotations

import argparse

import torch
from datasets import Dataset

from ergo_vqa.inference import ergo_class
from processing_ergo import ErgoProcessor
from processing_ergo.images_ergo import load_image
from processing_ergo.prompts_ergo import stage_questions

from .data import MULTIPLE_CHOICE_POSTFIX, load_training_data
from .sft import STAGE2_REPLY, ErgoSFTCollator, answer_and_shown, sft_rows

PROBED_KINDS = ("ergo", "stage2", "crop", "full", "evidence", "coarse")


def first_answer_token_accuracy(model, processor: ErgoProcessor, dataset: Dataset, kind: str,
                                batch_size: int = 10) -> float:
    """Share of ``dataset``'s rows whose ``kind`` example has its answer's first token as the model's greedy next
    token, given everything before it."""
    if kind not in PROBED_KINDS:
        raise ValueError(f"kind must be one of {PROBED_KINDS}, got {kind!r}")
    if kind == "coarse":
        return _coarse_letter_accuracy(model, processor, dataset, batch_size)
    collator = ErgoSFTCollator(processor)
    image_token = processor.tokenizer.convert_tokens_to_ids(processor.tokenizer.image_token)
    reasoning = len(processor.tokenizer.encode(STAGE2_REPLY.split("{}")[0], add_special_tokens=False))
    rows = sft_rows(dataset, {kind: 1.0}, processor.coarse_budget, processor.crop_budget)
    right = 0
    for start in range(0, len(rows), batch_size):
        batch_rows = [rows[index] for index in range(start, min(len(rows), start + batch_size))]
        batch = collator(batch_rows)
        with torch.no_grad():
            logits = model(**{key: value.to(model.device) for key, value in batch.items() if key != "labels"}).logits
        for ids, labels, row_logits in zip(batch["input_ids"], batch["labels"], logits):
            labelled = (labels != -100).nonzero().flatten()
            if kind in ("ergo", "stage2"):  # stage 2's reply follows the last image; the answer follows its prefix
                last_image = (ids == image_token).nonzero().flatten()[-1]
                answer = int(labelled[labelled > last_image][0]) + reasoning
            else:
                answer = int(labelled[0])
            right += int(row_logits[answer - 1].argmax()) == int(ids[answer])
    return right / len(rows)


def _coarse_letter_accuracy(model, processor: ErgoProcessor, dataset: Dataset, batch_size: int) -> float:
    """Share of multiple-choice rows whose answer letter the model ranks first among the options' letters, as the
    next token of one plain turn over the coarse view (the coarse-only baseline's input)."""
    right = 0
    for start in range(0, len(dataset), batch_size):
        rows = dataset.select(range(start, min(len(dataset), start + batch_size)))
        if not all(rows["options"]):
            raise ValueError("the coarse control needs multiple-choice rows")
        questions = [stage_questions(row["question"], row["options"], MULTIPLE_CHOICE_POSTFIX)[1] for row in rows]
        inputs = processor.single_pass([load_image(row["image"]) for row in rows], questions,
                                       budget=processor.coarse_budget)
        with torch.no_grad():
            next_token = model(**inputs.to(model.device)).logits[:, -1]  # left-padded: the last position is next
        for row, logits in zip(rows, next_token):
            letters = [chr(ord("A") + index) for index in range(len(row["options"]))]
            ids = [processor.tokenizer.encode(letter, add_special_tokens=False)[0] for letter in letters]
            right += letters[int(logits[ids].argmax())] == answer_and_shown(row)[0]
    return right / len(dataset)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("model", help="an ERGO Hub folder (any family)")
    parser.add_argument("data", help="rows in the training schema, with regions (e.g. a synthetic split)")
    parser.add_argument("--rows", type=int, default=100, help="the first this many rows")
    parser.add_argument("--kinds", default="ergo,stage2,crop,full,coarse",
                        help=f"comma-separated, of {', '.join(PROBED_KINDS)}")
    args = parser.parse_args(argv)
    processor = ErgoProcessor.from_pretrained(args.model)
    model = ergo_class(args.model).from_pretrained(args.model, dtype=torch.float32).eval()
    dataset = load_training_data(args.data)
    dataset = dataset.select(range(min(args.rows, len(dataset))))
    for kind in args.kinds.split(","):
        accuracy = first_answer_token_accuracy(model, processor, dataset, kind)
        print(f"{kind}: {100 * accuracy:.0f}% of {len(dataset)} rows", flush=True)


if __name__ == "__main__":
    main()
