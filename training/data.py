"""Training data: questions about full-resolution images, checked and turned into GRPO rows.

Schema (one row per question):

| column     | type                              | meaning                                                    |
|------------|-----------------------------------|------------------------------------------------------------|
| `image`    | image (PIL, path or bytes)        | the full-resolution image; the rollout makes the coarse view |
| `question` | str                               | the question stem                                          |
| `options`  | list[str] (may be empty)          | multiple-choice options, e.g. `["(A) red", "(B) blue"]`    |
| `answer`   | str                               | the option letter (`"A"`) or the free-text answer          |
| `gt_bbox`  | [x1, y1, x2, y2] or null, optional | ground-truth region in original pixels (kept; no reward uses it) |

Sources: a Hub dataset id, a ``save_to_disk`` folder, or a ``.jsonl``/``.json``/``.parquet`` file whose
``image`` holds paths (relative to the file) or bytes.
"""

from __future__ import annotations

from pathlib import Path

import datasets
from datasets import Dataset, DatasetDict

from processing_ergo.images_ergo import ErgoImageError, load_image
from processing_ergo.prompts_ergo import MULTIPLE_CHOICE_POSTFIX, SYSTEM_PROMPT, stage1_prompt, stage_questions

REQUIRED_COLUMNS = ("image", "question", "options", "answer")


class DataError(ValueError):
    """A dataset that does not follow the schema; the message names the row."""


def load_training_data(source: str, split: str = "train") -> Dataset:
    """The dataset at ``source`` (folder, file or Hub id), with the schema checked."""
    path = Path(source)
    if path.is_dir():
        loaded = datasets.load_from_disk(str(path))
        dataset = loaded[split] if isinstance(loaded, DatasetDict) else loaded
    elif path.suffix in (".jsonl", ".json"):
        dataset = _resolve_image_paths(Dataset.from_json(str(path)), path.parent)
    elif path.suffix == ".parquet":
        dataset = _resolve_image_paths(Dataset.from_parquet(str(path)), path.parent)
    elif path.exists():
        raise DataError(f"{source}: unsupported file type {path.suffix!r}; use .jsonl, .json, .parquet or a folder")
    else:
        dataset = datasets.load_dataset(source, split=split)
    missing = [column for column in REQUIRED_COLUMNS if column not in dataset.column_names]
    if missing:
        raise DataError(f"{source}: missing column(s) {missing}; the schema needs {list(REQUIRED_COLUMNS)}")
    return dataset


def to_grpo_rows(dataset: Dataset, postfix: str = MULTIPLE_CHOICE_POSTFIX) -> Dataset:
    """Adds what the GRPO rollout reads: ``prompt`` (ERGO's system prompt and stage-1 turn, conversational, as
    TRL wants it) and ``stage2_question`` (stem, options and, for multiple choice, ``postfix``).

    Every image is decoded once here, so an unreadable one fails now, with its row, not mid-training.
    """
    images = dataset.cast_column("image", datasets.Image(decode=False))

    def build(row: dict, index: int) -> dict:
        try:
            load_image(_image_source(row["image"]), name=f"row {index}: image")
        except ErgoImageError as error:
            raise DataError(str(error)) from None
        options = row["options"] or []
        if not isinstance(options, list) or not all(isinstance(option, str) for option in options):
            raise DataError(f"row {index}: options must be a list of strings, got {row['options']!r}")
        answer = row["answer"]
        if not isinstance(answer, str) or not answer.strip():
            raise DataError(f"row {index}: answer must be a non-empty string, got {answer!r}")
        try:
            stem, full = stage_questions(row["question"], options, postfix if options else "")
        except ValueError as error:
            raise DataError(f"row {index}: {error}") from None
        prompt = [{"role": "system", "content": SYSTEM_PROMPT}, {"role": "user", "content": stage1_prompt(stem)}]
        return {"prompt": prompt, "stage2_question": full}

    rows = images.map(build, with_indices=True, desc="checking rows")
    return rows.cast_column("image", datasets.Image(decode=True))


def _image_source(value):
    """What ``datasets.Image(decode=False)`` stores: ``{"bytes", "path"}``."""
    if isinstance(value, dict):
        return value.get("bytes") or value.get("path")
    return value


def _resolve_image_paths(dataset: Dataset, folder: Path) -> Dataset:
    """Relative image paths in a file are relative to that file."""
    if "image" not in dataset.column_names or not isinstance(dataset.features["image"], datasets.Value):
        return dataset

    def resolve(row: dict) -> dict:
        image = row["image"]
        if isinstance(image, str) and image and not Path(image).is_absolute():
            image = str(folder / image)
        return {"image": image}

    return dataset.map(resolve, desc="resolving image paths")
