"""Accuracy next to vision tokens and latency, under the reference's protocol (reference spec §2.6, §3).

Modes on the same samples: ``ergo`` (two stages), ``full`` (one pass over the whole image at 16384 vision tokens,
the paper's Qwen2.5-VL baseline) and ``coarse`` (one pass over the coarse view). Prediction = the ASCII letters of
the ``<answer>`` block (or of the whole reply without one); correct iff it equals the answer letter, ignoring case.

Departure from the reference, on purpose: a sample that fails (unreadable image, error, no reply) is counted as
wrong and listed; the reference drops it from numerator and denominator. The summary reports both figures.
Per-sample records are appended to ``<out>/<benchmark>-<mode>.jsonl`` as they finish, so a rerun resumes.
"""

from __future__ import annotations

import json
import time
from collections import defaultdict
from pathlib import Path

import torch
from PIL import Image, ImageDraw

from processing_ergo.geometry_ergo import PAPER_BUDGET
from processing_ergo.images_ergo import load_image
from processing_ergo.processing_ergo import FULL_RESOLUTION_BUDGET
from processing_ergo.prompts_ergo import answer_letters, stage_questions

from hub_card.card import results_table

from .eval_data import MMERWL_CATEGORIES, EvalSample

MODES = ("ergo", "full", "coarse")


def letters_match(reply: str, answer: str) -> bool:
    """The reference evaluation's rule: the reply's answer letters equal the answer letter, ignoring case (every
    benchmark here is multiple choice; the training rewards also score free-form answers)."""
    return answer_letters(reply).lower() == answer.strip().lower()


def evaluate(model, processor, samples: list[EvalSample], mode: str, out_dir: str | Path, benchmark: str,
             budget: int = PAPER_BUDGET, batch_size: int = 1, max_new_tokens: int = 1024, fallback: str = "reference",
             progress: bool = True) -> dict:
    """Runs the samples without a successful record in ``<out>/<benchmark>-<mode>-<budget>.jsonl`` (failed ones
    run again), appends their records and returns the summary of ``samples``. ``fallback`` (ERGO mode) defaults to
    the reference's: the unresized original when stage 1 gives no usable region. Use one ``out_dir`` per model."""
    if mode not in MODES:
        raise ValueError(f"mode must be one of {MODES}, got {mode!r}")
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    budget = budget if mode != "full" else FULL_RESOLUTION_BUDGET
    records_path = out_dir / f"{benchmark}-{mode}-{budget}.jsonl"
    done = {record["id"] for record in _read_records(records_path) if record["failure"] is None}
    todo = [sample for sample in samples if sample.id not in done]
    bar = _progress(len(samples), len(samples) - len(todo), f"{benchmark} {mode}", progress)
    if records_path.is_file() and records_path.stat().st_size and not records_path.read_bytes().endswith(b"\n"):
        with open(records_path, "a", encoding="utf-8") as records:
            records.write("\n")  # end a line cut off by an interruption
    with open(records_path, "a", encoding="utf-8") as records:
        for start in range(0, len(todo), batch_size):
            batch = todo[start:start + batch_size]
            for record in _run_batch(model, processor, batch, mode, budget, max_new_tokens, fallback):
                records.write(json.dumps(record) + "\n")
                records.flush()
                bar.update(1)
    bar.close()
    wanted = {sample.id for sample in samples}
    latest = {record["id"]: record for record in _read_records(records_path) if record["id"] in wanted}
    summary = summarize(list(latest.values()), benchmark, mode, budget)
    (out_dir / f"{benchmark}-{mode}-{budget}.summary.json").write_text(json.dumps(summary, indent=2) + "\n")
    return summary


def _run_batch(model, processor, batch, mode, budget, max_new_tokens, fallback) -> list[dict]:
    """Records for a batch; when the batch fails, each sample is retried alone so one bad sample fails alone."""
    try:
        return _generate(model, processor, batch, mode, budget, max_new_tokens, fallback)
    except Exception as error:  # noqa: BLE001 - recorded per sample below, never dropped
        message = f"{type(error).__name__}: {error}"
    # Out of the except block: the failed batch's tensors (held by the traceback) are freed before retrying.
    if torch.cuda.is_available():
        torch.cuda.empty_cache()
    if len(batch) == 1:
        return [_record(batch[0], mode, failure=message)]
    return [record for sample in batch
            for record in _run_batch(model, processor, [sample], mode, budget, max_new_tokens, fallback)]


@torch.no_grad()
def _generate(model, processor, batch: list[EvalSample], mode, budget, max_new_tokens, fallback) -> list[dict]:
    images = [load_image(sample.image, name=f"sample {sample.id}") for sample in batch]
    started = time.perf_counter()
    if mode == "ergo":
        inputs = processor.prepare(images, [sample.stem for sample in batch], options=[s.options for s in batch],
                                   postfixes=[s.postfix for s in batch], coarse_budget=budget, crop_budget=budget,
                                   fallback=fallback)
        out = model.generate(**inputs.to(model.device), max_new_tokens=max_new_tokens, do_sample=False,
                             return_dict_in_generate=True)
        replies = processor.post_process_image_text_to_text(out.sequences, prompt_length=inputs["input_ids"].shape[1])
        seconds = (time.perf_counter() - started) / len(batch)
        return [_record(sample, mode, reply, seconds, out.vision_tokens[i], out.regions[i], out.fallbacks[i])
                for i, (sample, reply) in enumerate(zip(batch, replies))]
    questions = [stage_questions(s.stem, s.options, s.postfix)[1] for s in batch]
    inputs = processor.single_pass(images, questions, budget=budget if mode == "coarse" else None)
    output = model.generate(**inputs.to(model.device), max_new_tokens=max_new_tokens, do_sample=False)
    replies = processor.post_process_image_text_to_text(output, prompt_length=inputs["input_ids"].shape[1])
    seconds = (time.perf_counter() - started) / len(batch)
    tokens = (inputs["image_grid_thw"].prod(dim=-1) // processor.image_processor.merge_size**2).tolist()
    return [_record(sample, mode, reply, seconds, {"stage1": count, "stage2": 0, "total": count})
            for sample, reply, count in zip(batch, replies, tokens)]


def _record(sample: EvalSample, mode: str, reply: str | None = None, seconds: float | None = None,
            vision_tokens: dict | None = None, region=None, fallback: str | None = None,
            failure: str | None = None) -> dict:
    return {
        "id": sample.id, "category": sample.category, "mode": mode, "answer": sample.answer,
        "reply": reply, "prediction": answer_letters(reply) if reply else None,
        "correct": failure is None and letters_match(reply, sample.answer),
        "failure": failure, "region": list(region) if region else None, "fallback": fallback,
        "vision_tokens": {k: v for k, v in (vision_tokens or {}).items() if k != "full_resolution"},
        "seconds": seconds,
    }


def summarize(records: list[dict], benchmark: str, mode: str, budget: int) -> dict:
    """Per-category and micro-averaged accuracy; failures count as wrong, and the reference-compatible figure
    (failures and degenerate boxes left out, as the reference drops them) is reported beside it. Empty replies are
    wrong in both. MME-RealWorld's total covers its 10 reference categories only."""
    by_category = defaultdict(list)
    for record in records:
        by_category[record["category"]].append(record)
    counted = [r for r in records if benchmark != "mmerwl" or r["category"] in MMERWL_CATEGORIES]
    # The reference drops samples that raise, degenerate boxes included; an empty reply there is simply wrong.
    succeeded = [r for r in counted if r["failure"] is None and r["fallback"] != "degenerate_box"]
    ran = [r for r in records if r["vision_tokens"] and r["seconds"] is not None]  # generated, even if no answer
    return {
        "benchmark": benchmark, "mode": mode, "budget": budget if mode != "full" else FULL_RESOLUTION_BUDGET,
        "samples": len(counted),
        "accuracy": _accuracy(counted),
        "accuracy_reference_protocol": _accuracy(succeeded),
        "categories": {name: {"accuracy": _accuracy(items), "samples": len(items)}
                       for name, items in sorted(by_category.items())},
        "failures": [{"id": r["id"], "failure": r["failure"]} for r in records if r["failure"] is not None],
        "no_answer": [r["id"] for r in records if r["failure"] is None and not answer_letters(r["reply"] or "")],
        "mean_vision_tokens": sum(r["vision_tokens"]["total"] for r in ran) / len(ran) if ran else None,
        "mean_seconds": sum(r["seconds"] for r in ran) / len(ran) if ran else None,
    }


def plot(summaries: list[dict], path: str | Path) -> Path:
    """Accuracy against mean vision tokens, one point per (benchmark, mode), as a PNG (Pillow only)."""
    width, height, margin = 640, 420, 60
    image = Image.new("RGB", (width, height), "white")
    draw = ImageDraw.Draw(image)
    points = [s for s in summaries if s["mean_vision_tokens"] is not None and s["accuracy"] is not None]
    top = max([s["mean_vision_tokens"] for s in points] + [1])
    draw.line([(margin, margin), (margin, height - margin), (width - margin, height - margin)], fill="black")
    draw.text((width // 2 - 60, height - margin + 25), "mean vision tokens per sample", fill="black")
    draw.text((8, margin - 30), "accuracy (%)", fill="black")
    for tick in (0, 50, 100):
        y = height - margin - tick / 100 * (height - 2 * margin)
        draw.text((margin - 30, y - 6), str(tick), fill="black")
    draw.text((width - margin - 20, height - margin + 8), f"{top:.0f}", fill="black")
    colors = {"ergo": "red", "full": "blue", "coarse": "green"}
    for s in points:
        x = margin + s["mean_vision_tokens"] / top * (width - 2 * margin)
        y = height - margin - s["accuracy"] * (height - 2 * margin)
        draw.ellipse([x - 5, y - 5, x + 5, y + 5], fill=colors.get(s["mode"], "black"))
        draw.text((x + 8, y - 6), f"{s['benchmark']} {s['mode']}", fill="black")
    image.save(path)
    return Path(path)


def _accuracy(records: list[dict]) -> float | None:
    return sum(r["correct"] for r in records) / len(records) if records else None


def _read_records(path: Path) -> list[dict]:
    if not path.is_file():
        return []
    records = []
    for line in path.read_text(encoding="utf-8").splitlines():
        try:
            records.append(json.loads(line))
        except json.JSONDecodeError:
            continue  # a line cut off by an interruption; that sample runs again
    return records


def _progress(total: int, done: int, description: str, enabled: bool):
    from tqdm.auto import tqdm

    return tqdm(total=total, initial=done, desc=description, disable=not enabled)
