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
A row that cannot be read (not JSON, a field missing or empty) becomes a sample with an ``error`` naming the file and
line: the evaluation counts it as a failure and goes on. Two rows with one id are refused before anything runs
(``ValueError`` naming the id and both places): records are kept per id, so one of them could never be recorded.
"""

from __future__ import annotations

import base64
import csv
import dataclasses
import itertools
import json
import sys
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

from hub_card.results import BENCHMARKS
from processing_ergo.prompts_ergo import LETTER_POSTFIX, MULTIPLE_CHOICE_POSTFIX

from .synthetic_task import split_path

HUB_DATASETS = {name: (dataset_id, dataset_id.split("/")[1]) for name, (dataset_id, _) in BENCHMARKS.items()}
"""Benchmark name -> (Hub dataset id, the folder under ``--data-root`` it is downloaded to)."""
SYNTHETIC_DATASETS = {"synthetic": "original", "synthetic-context": "context"}
"""Dataset name -> variant of ``ergo_vqa.synthetic_task``; both read from one data root (``write_splits``)."""
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
    error: str | None = None
    """Why the row could not be read, with its file and line; such a sample fails without running."""
    where: str = ""
    """The file and line (or row) it was read from."""
    gt_bbox: list[int] | None = None
    """The target's box, original pixels, where the dataset has one (the synthetic ones): what ``mask_target``
    paints out of the coarse view."""


def load_benchmark(name: str, data_root: str | Path, limit: int | None = None, split: str = "test") -> list[EvalSample]:
    """The benchmark's samples in file order; ``limit`` stops reading after that many (the files can be large).
    ``synthetic`` reads ``<data_root>/<split>.jsonl`` and ``synthetic-context`` ``<data_root>/context/<split>.jsonl``,
    as ``ergo_vqa.synthetic_task.write_splits`` writes them."""
    loaders = {"vstar": _vstar, "hrbench": _hrbench, "mmerwl": _mmerwl}
    if name in SYNTHETIC_DATASETS:
        path = split_path(data_root, split, SYNTHETIC_DATASETS[name])
        return _unique(list(itertools.islice(_synthetic(path), limit)))
    if name not in loaders:
        raise ValueError(f"unknown benchmark {name!r}; one of {sorted(loaders) + sorted(SYNTHETIC_DATASETS)}")
    folder = Path(data_root) / HUB_DATASETS[name][1]
    if not folder.is_dir():
        raise FileNotFoundError(f"{folder} not found: download it with `ergo eval-download {name} --data-root "
                                f"{data_root}` (or git clone https://huggingface.co/datasets/{HUB_DATASETS[name][0]})")
    return _unique(list(itertools.islice(loaders[name](folder), limit)))


def _unique(samples: list[EvalSample]) -> list[EvalSample]:
    """``samples``, or ValueError naming each id that more than one of them has, with the places it occurs."""
    places: dict[str, list[str]] = {}
    for sample in samples:
        places.setdefault(sample.id, []).append(sample.where or "?")
    repeated = [f"id {key!r} at {' and '.join(found)}" for key, found in places.items() if len(found) > 1]
    if repeated:
        raise ValueError(f"repeated sample ids ({'; '.join(repeated[:5])}{'; ...' if len(repeated) > 5 else ''}): "
                         f"results are kept per id, so give each row its own")
    return samples


def download(name: str, data_root: str | Path) -> Path:
    """Fetch a benchmark from the Hub into ``data_root`` (needs network)."""
    from huggingface_hub import snapshot_download

    repo, folder = HUB_DATASETS[name]
    return Path(snapshot_download(repo, repo_type="dataset", local_dir=Path(data_root) / folder))


def _vstar(folder: Path) -> Iterator[EvalSample]:
    def sample(item: dict, index: int) -> EvalSample:
        parts = _field(item, "text").split("\n")
        return EvalSample(str(item.get("question_id", index)), folder / _field(item, "image"), parts[0], parts[1:-1],
                          parts[-1], _field(item, "label"), _field(item, "category"))

    yield from _json_lines(folder / "test_questions.jsonl", folder.parent, sample)


def _hrbench(folder: Path) -> Iterator[EvalSample]:
    def sample(item: dict, index: int, resolution: str) -> EvalSample:
        options = [f"{letter}:{_field(item, letter)}" for letter in "ABCD"]
        return EvalSample(f"{resolution}-{item.get('index', index)}", _base64(_field(item, "image")),
                          _field(item, "question"), options, LETTER_POSTFIX, _field(item, "answer"), resolution)

    for resolution in ("4k", "8k"):
        for where, index, item in _table(folder, f"hr_bench_{resolution}"):
            yield _parse(where, resolution, sample, item, index, resolution)


def _synthetic(path: Path) -> Iterator[EvalSample]:
    """Rows in the training schema (``training/data.py``) with ``id`` and ``category``; images relative to the file."""
    if not path.is_file():
        raise FileNotFoundError(f"{path} not found: write the splits with `python -m training.synthetic_recipe`")

    def sample(item: dict, index: int) -> EvalSample:
        return EvalSample(str(item.get("id", index)), path.parent / _field(item, "image"), _field(item, "question"),
                          _field(item, "options"), MULTIPLE_CHOICE_POSTFIX, _field(item, "answer"),
                          item.get("category", ""), gt_bbox=item.get("gt_bbox"))

    yield from _json_lines(path, path.parent, sample)


def _mmerwl(folder: Path) -> Iterator[EvalSample]:
    def sample(item: dict, index: int, shard: Path) -> EvalSample:
        return EvalSample(str(item.get("index", f"{shard.stem}-{index}")), _base64(_field(item, "bytes")),
                          _field(item, "question"), list(_field(item, "multi-choice options")), LETTER_POSTFIX,
                          _field(item, "answer"), _field(item, "category"))

    shards = sorted((folder / "data").glob("*.parquet"))
    if not shards:
        raise FileNotFoundError(f"no parquet shards under {folder / 'data'}")
    for shard in shards:
        for index, item in enumerate(_read_parquet(shard)):
            where = f"{shard.relative_to(folder.parent)} row {index + 1}"
            yield _parse(where, item.get("category") or "", sample, item, index, shard)


def _json_lines(path: Path, root: Path, sample: Callable[[dict, int], EvalSample]) -> Iterator[EvalSample]:
    """One sample per non-blank line; a line that is not a JSON object with the fields becomes a failed sample."""
    with open(path, encoding="utf-8") as lines:
        for index, line in enumerate(lines):
            if not line.strip():
                continue
            where = f"{path.relative_to(root)} line {index + 1}"
            try:
                item = json.loads(line)
            except json.JSONDecodeError as error:
                yield _broken(where, f"not JSON ({error})", "")
                continue
            category = item.get("category") if isinstance(item, dict) else None
            yield _parse(where, category if isinstance(category, str) else "", sample, item, index)


def _parse(where: str, category: str, sample: Callable[..., EvalSample], *row) -> EvalSample:
    """``sample(*row)`` with ``where`` it was read, or a failed sample saying what is wrong with the row and where."""
    try:
        return dataclasses.replace(sample(*row), where=where)
    except KeyError as error:
        return _broken(where, f"missing or empty field {error}", category)
    except (TypeError, ValueError, AttributeError) as error:
        return _broken(where, f"malformed row ({type(error).__name__}: {error})", category)


def _broken(where: str, reason: str, category: str) -> EvalSample:
    """Identified by its place in the file: the row's own id may be what is broken, or not unique. Grouped under its
    category when that much could be read."""
    return EvalSample(where, None, "", [], "", "", category or "unreadable rows", f"{where}: {reason}", where)


def _field(item: dict, key: str):
    """``item[key]``, also raising KeyError when the value is null or empty (a TSV row with too few cells gives
    None; an empty answer letter would score an empty reply as correct)."""
    value = item[key]
    if value is None or value == "":
        raise KeyError(key)
    return value


def _table(folder: Path, stem: str) -> Iterator[tuple[str, int, dict]]:
    """(where, row index, row) from the parquet file or else the TSV; ``where`` names the file and row or line."""
    parquet_path, tsv_path = folder / f"{stem}.parquet", folder / f"{stem}.tsv"
    if parquet_path.is_file():
        name = parquet_path.relative_to(folder.parent)
        return ((f"{name} row {index + 1}", index, item) for index, item in enumerate(_read_parquet(parquet_path)))
    if tsv_path.is_file():
        csv.field_size_limit(sys.maxsize)  # base64 images are long fields
        return _read_tsv(tsv_path, tsv_path.relative_to(folder.parent))
    raise FileNotFoundError(f"neither {stem}.parquet nor {stem}.tsv in {folder}")


def _read_tsv(path: Path, name: Path) -> Iterator[tuple[str, int, dict]]:
    with open(path, encoding="utf-8", newline="") as handle:
        reader = csv.DictReader(handle, delimiter="\t")
        for index, item in enumerate(reader):
            yield f"{name} line {reader.line_num}", index, item


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
