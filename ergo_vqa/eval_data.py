"""The published high-resolution VQA benchmarks, read from their own formats (reference spec §3.1).

No benchmark data ships with this project (their licences do not allow it). Get them from the Hub, as the
reference does (``download`` does it for you when online):

| name      | Hub dataset                                   | files read                                                   |
|-----------|-----------------------------------------------|--------------------------------------------------------------|
| `vstar`   | `craigwu/vstar_bench`                         | `vstar_bench/test_questions.jsonl` + the image files           |
| `hrbench` | `DreamMr/HR-Bench`                            | `HR-Bench/hr_bench_4k.parquet`, `hr_bench_8k.parquet` (or `.tsv`), base64 images |
| `mmerwl`  | `yifanzhang114/MME-RealWorld-lite-lmms-eval`  | `MME-RealWorld-lite-lmms-eval/data/*.parquet`, base64 images   |

Each sample carries what the reference's evaluation builds: stage 1 sees ``stem``, stage 2 the stem, ``options``
and ``postfix`` (joined by newlines); ``answer`` is the option letter; ``category`` is what accuracy is grouped by.
"""

from __future__ import annotations

import base64
import csv
import itertools
import json
import sys
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

from hub_card.card import BENCHMARKS

HUB_DATASETS = {name: (dataset_id, dataset_id.split("/")[1]) for name, (dataset_id, _) in BENCHMARKS.items()}
"""Benchmark name -> (Hub dataset id, the folder under ``--data-root`` it is downloaded to)."""
LETTER_POSTFIX = " Answer with the option's letter from the given choices directly."
"""HR-Bench's and MME-RealWorld's postfix in the reference, leading space included."""
MULTIPLE_CHOICE_POSTFIX = LETTER_POSTFIX.strip()
"""The same line as V* writes it; what training rows and the synthetic benchmark use."""
MMERWL_CATEGORIES = tuple(
    f"{task}/{domain}" for task in ("Perception", "Reasoning")
    for domain in ("Autonomous_Driving", "Diagram and Table", "Monitoring", "OCR with Complex Context", "Remote Sensing")
)


@dataclass
class EvalSample:
    id: str
    image: object
    """A path or bytes; opened only when the sample is run, so one bad image fails one sample."""
    stem: str
    options: list[str]
    postfix: str
    answer: str
    category: str


def load_benchmark(name: str, data_root: str | Path, limit: int | None = None, split: str = "test") -> list[EvalSample]:
    """The benchmark's samples in file order; ``limit`` stops reading after that many (the files can be large).
    ``synthetic`` reads ``<data_root>/<split>.jsonl`` as ``ergo_vqa.synthetic_task`` writes it."""
    loaders = {"vstar": _vstar, "hrbench": _hrbench, "mmerwl": _mmerwl}
    if name == "synthetic":
        return list(itertools.islice(_synthetic(Path(data_root) / f"{split}.jsonl"), limit))
    if name not in loaders:
        raise ValueError(f"unknown benchmark {name!r}; one of {sorted(loaders) + ['synthetic']}")
    folder = Path(data_root) / HUB_DATASETS[name][1]
    if not folder.is_dir():
        raise FileNotFoundError(f"{folder} not found: download it with `ergo eval-download {name} --data-root "
                                f"{data_root}` (or git clone https://huggingface.co/datasets/{HUB_DATASETS[name][0]})")
    return list(itertools.islice(loaders[name](folder), limit))


def download(name: str, data_root: str | Path) -> Path:
    """Fetch a benchmark from the Hub into ``data_root`` (needs network)."""
    from huggingface_hub import snapshot_download

    repo, folder = HUB_DATASETS[name]
    return Path(snapshot_download(repo, repo_type="dataset", local_dir=Path(data_root) / folder))


def _vstar(folder: Path) -> Iterator[EvalSample]:
    with open(folder / "test_questions.jsonl", encoding="utf-8") as lines:
        for index, line in enumerate(lines):
            if not line.strip():
                continue
            item = json.loads(line)
            parts = item["text"].split("\n")
            yield EvalSample(str(item.get("question_id", index)), folder / item["image"], parts[0], parts[1:-1],
                             parts[-1], item["label"], item["category"])


def _hrbench(folder: Path) -> Iterator[EvalSample]:
    for resolution in ("4k", "8k"):
        rows = _table(folder, f"hr_bench_{resolution}")
        for index, item in enumerate(rows):
            options = [f"{letter}:{item[letter]}" for letter in "ABCD"]
            yield EvalSample(f"{resolution}-{item.get('index', index)}", _base64(item["image"]), item["question"],
                             options, LETTER_POSTFIX, item["answer"], resolution)


def _synthetic(path: Path) -> Iterator[EvalSample]:
    """Rows in the training schema (``training/data.py``) with ``id`` and ``category``; images relative to the file."""
    if not path.is_file():
        raise FileNotFoundError(f"{path} not found: write the splits with `python -m training.synthetic_recipe`")
    with open(path, encoding="utf-8") as lines:
        for index, line in enumerate(lines):
            if line.strip():
                item = json.loads(line)
                yield EvalSample(str(item.get("id", index)), path.parent / item["image"], item["question"],
                                 item["options"], MULTIPLE_CHOICE_POSTFIX, item["answer"], item.get("category", ""))


def _mmerwl(folder: Path) -> Iterator[EvalSample]:
    shards = sorted((folder / "data").glob("*.parquet"))
    if not shards:
        raise FileNotFoundError(f"no parquet shards under {folder / 'data'}")
    for shard in shards:
        for index, item in enumerate(_read_parquet(shard)):
            yield EvalSample(str(item.get("index", f"{shard.stem}-{index}")), _base64(item["bytes"]), item["question"],
                             list(item["multi-choice options"]), LETTER_POSTFIX, item["answer"], item["category"])


def _table(folder: Path, stem: str) -> Iterator[dict]:
    if (folder / f"{stem}.parquet").is_file():
        return _read_parquet(folder / f"{stem}.parquet")
    if (folder / f"{stem}.tsv").is_file():
        csv.field_size_limit(sys.maxsize)  # base64 images are long fields
        return _read_tsv(folder / f"{stem}.tsv")
    raise FileNotFoundError(f"neither {stem}.parquet nor {stem}.tsv in {folder}")


def _read_tsv(path: Path) -> Iterator[dict]:
    with open(path, encoding="utf-8", newline="") as handle:
        yield from csv.DictReader(handle, delimiter="\t")


def _read_parquet(path: Path) -> Iterator[dict]:
    """Rows one batch at a time, so a limited run does not load a multi-gigabyte file."""
    try:
        import pyarrow.parquet as parquet
    except ImportError as error:
        raise ImportError("reading parquet benchmarks needs pyarrow: pip install 'ergo-vqa[eval]'") from error
    for batch in parquet.ParquetFile(path).iter_batches(batch_size=16):
        yield from batch.to_pylist()


def _base64(value) -> bytes | object:
    """Benchmark images stored as base64 text; bytes and anything else pass through (decode errors surface
    per sample when the image is opened)."""
    if isinstance(value, str):
        try:
            return base64.b64decode(value, validate=False)
        except ValueError:
            return value.encode()
    return value
