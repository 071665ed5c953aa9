"""Accuracy next to vision tokens and latency, under the reference's protocol (reference spec §2.6, §3).

Modes on the same samples: ``ergo`` (two stages), ``full`` (one pass over the whole image at 16384 vision tokens,
the paper's Qwen2.5-VL baseline) and ``coarse`` (one pass over the coarse view). Prediction = the ASCII letters of
the ``<answer>`` block (or of the whole reply without one); correct iff it equals the answer letter, ignoring case.

Departure from the reference, on purpose: a sample that fails (unreadable image or row, error, no reply) is counted
as wrong and listed; the reference drops it from numerator and denominator. The summary reports both figures.
The model runs in this process, behind an OpenAI-compatible endpoint (an ``ErgoClient``), or on an in-process vLLM
(an ``ErgoVLLM``): the same code builds the views, prompts and crops; records then carry the endpoint or engine, the
served model and the engine's token ``usage``, cached prompt tokens included where the engine reports them.
Per-sample records are appended to ``<out>/<benchmark>-<mode>-<budget>-<settings id>.jsonl`` as they finish, so a
rerun with the same settings resumes and a run with other settings starts its own file.
"""

from __future__ import annotations

import hashlib
import json
import math
import time
from collections import defaultdict
from dataclasses import dataclass
from pathlib import Path

import torch
from PIL import Image, ImageDraw, ImageFont

from hub_card.card import results_table
from processing_ergo.geometry_ergo import PAPER_BUDGET
from processing_ergo.images_ergo import load_image
from processing_ergo.processing_ergo import FULL_RESOLUTION_BUDGET
from processing_ergo.prompts_ergo import answer_letters, letters_match, stage_questions

from .client import ErgoChat, ErgoClient, ErgoRequest
from .eval_data import MMERWL_CATEGORIES, EvalSample

MODES = ("ergo", "full", "coarse")
MODEL_IDENTITY = ("weights", "endpoint", "engine", "served_model")
"""The settings that say which model answered: a local model's weights fingerprint, a served model's endpoint and
name, or an in-process engine and its model. Rows compare only when these agree, present or absent alike."""


def evaluate(model, processor, samples: list[EvalSample], mode: str, out_dir: str | Path, benchmark: str,
             budget: int = PAPER_BUDGET, batch_size: int = 1, max_new_tokens: int = 1024, fallback: str = "reference",
             progress: bool = True) -> dict:
    """Runs the samples without a successful record under the same ``run_settings`` (failed ones run again), appends
    their records to ``<out>/<benchmark>-<mode>-<budget>-<settings id>.jsonl`` and returns the summary of
    ``samples``. ``model`` is a local model (``batch_size`` samples per ``generate``), an ``ErgoClient`` (all
    samples sent at once, its ``concurrency`` in flight; each record is written as its sample finishes) or an
    ``ErgoVLLM`` (all samples in one batch per stage). ``fallback`` (ERGO mode) defaults to the reference's: the unresized original when stage 1 gives no
    usable region."""
    if mode not in MODES:
        raise ValueError(f"mode must be one of {MODES}, got {mode!r}")
    if batch_size < 1 or max_new_tokens < 1:
        raise ValueError(f"batch_size and max_new_tokens must be positive, got {batch_size} and {max_new_tokens}")
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    settings = run_settings(model, processor, benchmark, mode, budget, max_new_tokens, fallback)
    budget = settings["budget"]
    stem = f"{benchmark}-{mode}-{budget}-{settings_id(settings)}"
    records_path = out_dir / f"{stem}.jsonl"
    done = {record["id"] for record in _read_records(records_path, settings) if record["failure"] is None}
    todo = [sample for sample in samples if sample.id not in done]
    bar = _progress(len(samples), len(samples) - len(todo), f"{benchmark} {mode}", progress)
    if records_path.is_file() and records_path.stat().st_size and not records_path.read_bytes().endswith(b"\n"):
        with open(records_path, "a", encoding="utf-8") as records:
            records.write("\n")  # end a line cut off by an interruption
    with open(records_path, "a", encoding="utf-8") as records:
        def write(record: dict) -> None:
            records.write(json.dumps({**record, "settings": settings}) + "\n")
            records.flush()
            bar.update(1)

        counters_before = model.endpoint.prefix_cache_counters() if isinstance(model, ErgoClient) else None
        if isinstance(model, ErgoChat):  # every sample in flight at once (a client: up to its concurrency)
            for sample in todo:
                if sample.error is not None:
                    write(_record(sample, mode, failure=sample.error))
            _request(model, [sample for sample in todo if sample.error is None], mode, budget, max_new_tokens,
                     fallback, write)
        else:
            for start in range(0, len(todo), batch_size):
                batch = todo[start:start + batch_size]
                runnable = [sample for sample in batch if sample.error is None]
                finished = [_record(sample, mode, failure=sample.error) for sample in batch
                            if sample.error is not None]
                if runnable:
                    finished += _run_batch(model, processor, runnable, mode, budget, max_new_tokens, fallback)
                for record in finished:
                    write(record)
    bar.close()
    wanted = {sample.id for sample in samples}
    latest = {record["id"]: record for record in _read_records(records_path, settings) if record["id"] in wanted}
    name = model.description if isinstance(model, ErgoChat) else model.config.name_or_path
    summary = {**summarize(list(latest.values()), settings, requested=len(samples)), "records": records_path.name,
               "model": name}
    if counters_before is not None and (counters_after := model.endpoint.prefix_cache_counters()) is not None:
        summary["server_prefix_cache"] = _counter_delta(counters_before, counters_after)
    (out_dir / f"{stem}.summary.json").write_text(json.dumps(summary, indent=2) + "\n")
    return summary


def run_settings(model, processor, benchmark: str, mode: str, budget: int, max_new_tokens: int,
                 fallback: str) -> dict:
    """Everything that changes a mode's answers (a setting the mode does not use is left out, so it does not set
    its records apart): written into every record and summary, and hashed into the file names. A local model is
    identified by its weights, not by how its path was written, so a copy, a re-download or ``./m`` for ``m``
    resumes; the summary names the path it was loaded from. A served one (``ErgoClient``) by its endpoint and
    served name: what the server holds behind that name is the server's to keep stable; an ``ErgoVLLM`` by its
    engine and model."""
    identity = model.identity() if isinstance(model, ErgoChat) else {"weights": weights_fingerprint(model)}
    settings = {"benchmark": benchmark, "mode": mode, "budget": budget if mode != "full" else FULL_RESOLUTION_BUDGET,
                "max_new_tokens": max_new_tokens, **identity}
    if mode == "ergo":
        settings |= {"fallback": fallback, "stage2_template": processor.stage2_template}
    return settings


def settings_id(settings: dict) -> str:
    """A short hash of the settings, for file names."""
    return hashlib.sha256(json.dumps(settings, sort_keys=True).encode()).hexdigest()[:10]


def weights_fingerprint(model) -> str:
    """A cheap hash of the weights as they run: each tensor's name, shape, dtype and 16 values at evenly spaced
    positions, plus the config and generation config (they change answers too). It follows content, not files:
    a copy or a re-download of the same checkpoint resumes, while weights retrained in place (same folder, same
    shapes, so the same headers and sizes) or loaded in another dtype do not. It reads about 16 values per tensor,
    milliseconds even for 7B parameters."""
    digest = hashlib.sha256()
    for name, tensor in sorted(model.state_dict().items()):
        flat = tensor.detach().reshape(-1)
        count = min(16, flat.numel())  # integer positions: the same on every device and for any tensor size
        positions = (torch.arange(count) * max(flat.numel() - 1, 0)) // max(count - 1, 1)
        digest.update(f"{name} {tuple(tensor.shape)} {tensor.dtype}".encode())
        digest.update(flat[positions.to(flat.device)].double().cpu().numpy().tobytes())
    # The cache kind (set per device by ``inference.use_cache``) and the library version do not change answers.
    transient = {"transformers_version", "cache_implementation", "compile_config", "_from_model_config"}
    configs = [{key: value for key, value in config.to_diff_dict().items() if key not in transient}
               for config in (model.config, model.generation_config)]
    digest.update(json.dumps(configs, sort_keys=True, default=str).encode())
    return digest.hexdigest()[:16]


def comparable(summaries: list[dict], settings: dict) -> list[dict]:
    """The summaries made with ``settings`` apart from mode and budget: what one table and plot may compare. A
    setting a mode does not use (the fallback in ``full`` mode) does not set it apart; summaries without settings
    (written before settings were recorded) are left out."""
    shared = {key: value for key, value in settings.items() if key not in ("mode", "budget")}
    return [s for s in summaries if "settings" in s and all(
        s["settings"].get(key, value) == value for key, value in shared.items())
        and all(s["settings"].get(key) == settings.get(key) for key in MODEL_IDENTITY)]


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


def _request(client: ErgoChat, samples: list[EvalSample], mode, budget, max_new_tokens, fallback, write) -> None:
    """Sends ``samples`` to the client's engine and hands each record to ``write`` as its sample finishes (a failed
    request is its own sample's failure)."""
    def finished(index: int, result) -> None:
        sample = samples[index]
        write({**_record(sample, mode, result.final_text, result.seconds["total"], result.vision_tokens,
                         result.region, result.fallback, failure=result.error),
               "prompt_tokens": result.prompt_tokens, "completion_tokens": result.completion_tokens,
               "cached_prompt_tokens": result.cached_prompt_tokens})

    if mode == "ergo":
        client.answer_many([ErgoRequest(s.image, s.stem, s.options, s.postfix) for s in samples],
                           max_tokens=max_new_tokens, on_result=finished,
                           coarse_budget=budget, crop_budget=budget, fallback=fallback)
    else:
        questions = [stage_questions(s.stem, s.options, s.postfix)[1] for s in samples]
        client.single_pass_many([s.image for s in samples], questions, budget=budget if mode == "coarse" else None,
                                max_tokens=max_new_tokens, on_result=finished)


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


def summarize(records: list[dict], settings: dict, requested: int) -> dict:
    """Per-category and micro-averaged accuracy; failures count as wrong, and the reference-compatible figure
    (failures and degenerate boxes left out, as the reference drops them) is reported beside it. Empty replies are
    wrong in both. MME-RealWorld's total covers its 10 reference categories only (``samples``). ``requested`` =
    ``run`` + ``failed`` + ``missing`` (requested samples without a readable record), so no sample vanishes."""
    benchmark, mode = settings["benchmark"], settings["mode"]
    by_category = defaultdict(list)
    for record in records:
        by_category[record["category"]].append(record)
    counted = [r for r in records if benchmark != "mmerwl" or r["category"] in MMERWL_CATEGORIES]
    # The reference drops samples that raise, degenerate boxes included; an empty reply there is simply wrong.
    succeeded = [r for r in counted if r["failure"] is None and r["fallback"] != "degenerate_box"]
    ran = [r for r in records if r["vision_tokens"] and r["seconds"] is not None]  # generated, even if no answer
    return {
        "benchmark": benchmark, "mode": mode, "budget": settings["budget"],
        "requested": requested,
        "run": sum(r["failure"] is None for r in records),
        "failed": sum(r["failure"] is not None for r in records),
        "missing": requested - len(records),
        "samples": len(counted),
        "accuracy": _accuracy(counted),
        "accuracy_reference_protocol": _accuracy(succeeded),
        "categories": {name: {"accuracy": _accuracy(items), "samples": len(items)}
                       for name, items in sorted(by_category.items())},
        "failures": [{"id": r["id"], "failure": r["failure"]} for r in records if r["failure"] is not None],
        "no_answer": [r["id"] for r in records if r["failure"] is None and not answer_letters(r["reply"] or "")],
        "mean_vision_tokens": sum(r["vision_tokens"]["total"] for r in ran) / len(ran) if ran else None,
        "mean_seconds": sum(r["seconds"] for r in ran) / len(ran) if ran else None,
        "mean_cached_prompt_tokens": _mean_per_stage(records, "cached_prompt_tokens"),
        "settings_id": settings_id(settings),
        "settings": settings,
    }


@dataclass
class PlotLabel:
    """A point's label: its text and the box it is drawn in, placed clear of the other labels and points."""

    text: str
    box: tuple[int, int, int, int]
    point: tuple[float, float]


@dataclass
class PlotLayout:
    size: tuple[int, int]
    area: tuple[int, int, int, int]
    """The axes' box; points and their labels stay inside it."""
    labels: list[PlotLabel]
    texts: list[tuple[str, tuple[int, int, int, int]]]
    """Titles and tick labels, with their boxes."""
    ticks: list[tuple[str, float]]
    """Grid lines: ``x`` or ``y`` and the pixel position."""


PLOT_COLORS = ("#d62728", "#1f77b4", "#2ca02c", "#9467bd", "#ff7f0e", "#8c564b", "#e377c2", "#17becf")
PLOT_MARKERS = {"ergo": "circle", "full": "square", "coarse": "triangle"}
_MARKER_RADIUS = 6


def plot(summaries: list[dict], path: str | Path) -> Path:
    """Accuracy against mean vision tokens (log scale), one point per summary, labelled "<benchmark> <mode>
    <budget>"; colour per benchmark, marker per mode (circle ergo, square full, triangle coarse). A PNG, Pillow only."""
    layout = plot_layout(summaries)
    font = _plot_font()
    image = Image.new("RGB", layout.size, "white")
    draw = ImageDraw.Draw(image)
    left, top, right, bottom = layout.area
    for axis, position in layout.ticks:
        line = [(position, top), (position, bottom)] if axis == "x" else [(left, position), (right, position)]
        draw.line(line, fill="#e6e6e6")
    draw.rectangle(layout.area, outline="black")
    for text, box in layout.texts:
        _draw_text(draw, box, text, font, "black")
    colors = _benchmark_colors(summaries)
    plotted = list(zip(layout.labels, _plotted(summaries)))
    for label, summary in plotted:
        x, y = label.point
        nearest = (min(max(x, label.box[0]), label.box[2]), min(max(y, label.box[1]), label.box[3]))
        if math.dist((x, y), nearest) > _MARKER_RADIUS + 12:  # placed away from its point: a leader line
            draw.line([(x, y), nearest], fill="#888888")
        _marker(draw, x, y, PLOT_MARKERS.get(summary["mode"], "circle"), colors[summary["benchmark"]])
    for label, summary in plotted:  # labels last, on white, so no line or marker crosses them
        draw.rectangle(label.box, fill="white")
        _draw_text(draw, label.box, label.text, font, colors[summary["benchmark"]])
    image.save(path)
    return Path(path)


def plot_layout(summaries: list[dict], size: tuple[int, int] = (960, 600)) -> PlotLayout:
    """Where everything goes. Each label takes the first place, nearest first, around its point that is inside
    the axes and clear of every point and earlier label (then drawn with a leader line); when none is, the place
    overlapping least."""
    font = _plot_font()
    width, height = size
    area = (80, 50, width - 30, height - 70)
    left, top, right, bottom = area
    points = _plotted(summaries)
    tokens = [max(s["mean_vision_tokens"], 1.0) for s in points] or [256.0, 16384.0]
    low, high = math.floor(math.log2(min(tokens))), math.ceil(math.log2(max(tokens)))
    low, high = (low - 1, high + 1) if high - low < 2 else (low, high)
    margin = 24  # pixels kept free inside the axes, so edge points leave room for their labels

    def x_of(value: float) -> float:
        return left + margin + (math.log2(max(value, 1.0)) - low) / (high - low) * (right - left - 2 * margin)

    def y_of(accuracy: float) -> float:
        return bottom - margin - accuracy * (bottom - top - 2 * margin)

    texts, ticks = [], []
    step = max(1, math.ceil((high - low) / 8))
    for power in range(low, high + 1, step):
        x = x_of(2 ** power)
        ticks.append(("x", x))
        texts.append(_text_box(_tokens_text(2 ** power), font, x, bottom + 6, "top"))
    for percent in range(0, 101, 20):
        y = y_of(percent / 100)
        ticks.append(("y", y))
        texts.append(_text_box(f"{percent}%", font, left - 8, y, "right"))
    texts.append(_text_box("mean vision tokens per sample (log scale)", font, (left + right) / 2, bottom + 30, "top"))
    texts.append(_text_box("accuracy (failures counted wrong)", font, left, top - 10, "bottom-left"))

    centers = [(x_of(max(s["mean_vision_tokens"], 1.0)), y_of(s["accuracy"])) for s in points]
    obstacles = [(x - _MARKER_RADIUS - 2, y - _MARKER_RADIUS - 2, x + _MARKER_RADIUS + 2, y + _MARKER_RADIUS + 2)
                 for x, y in centers]
    labels = []
    for s, (x, y) in zip(points, centers):
        text = f"{s['benchmark']} {s['mode']} {s['budget']}"
        ink = font.getbbox(text)
        w, h = ink[2] - ink[0] + 4, ink[3] - ink[1] + 4  # 2 pixels of white around the text
        candidates = []
        for distance in (_MARKER_RADIUS + 4, 18, 30, 46, 66, 90, 120):
            for dx, dy in ((1, 0), (-1, 0), (0, -1), (0, 1), (1, -1), (1, 1), (-1, -1), (-1, 1)):
                bx = x + dx * distance + (0 if dx > 0 else -w if dx < 0 else -w / 2)
                by = y + dy * distance + (0 if dy > 0 else -h if dy < 0 else -h / 2)
                box = (round(bx), round(by), round(bx) + w, round(by) + h)
                if left < box[0] and box[2] < right and top < box[1] and box[3] < bottom:
                    candidates.append(box)
        overlap = [sum(_overlap(box, other) for other in obstacles + [label.box for label in labels])
                   for box in candidates]
        best = candidates[overlap.index(min(overlap))] if candidates else (left + 1, top + 1, left + 1 + w, top + 1 + h)
        labels.append(PlotLabel(text, best, (x, y)))
    return PlotLayout(size, area, labels, texts, ticks)


def _plotted(summaries: list[dict]) -> list[dict]:
    return [s for s in summaries if s["mean_vision_tokens"] is not None and s["accuracy"] is not None]


def _plot_font() -> ImageFont.ImageFont | ImageFont.FreeTypeFont:
    return ImageFont.load_default(size=15)


def _benchmark_colors(summaries: list[dict]) -> dict[str, str]:
    names = list(dict.fromkeys(s["benchmark"] for s in summaries))
    return {name: PLOT_COLORS[index % len(PLOT_COLORS)] for index, name in enumerate(names)}


def _tokens_text(value: int) -> str:
    return f"{value // 1024}k" if value >= 1024 and value % 1024 == 0 else str(value)


def _text_box(text: str, font, x: float, y: float, anchor: str) -> tuple[str, tuple[int, int, int, int]]:
    """``text``'s box placed by one of its sides: centred under ``(x, y)`` ("top"), right-aligned and vertically
    centred ("right") or above and to the right ("bottom-left")."""
    ink = font.getbbox(text)
    w, h = ink[2] - ink[0], ink[3] - ink[1]
    x0, y0 = {"top": (x - w / 2, y), "right": (x - w, y - h / 2), "bottom-left": (x, y - h)}[anchor]
    return text, (round(x0), round(y0), round(x0) + w, round(y0) + h)


def _draw_text(draw: ImageDraw.ImageDraw, box, text: str, font, fill: str) -> None:
    """``text``'s ink centred in ``box`` (``font.getbbox`` measures ink from the drawing origin, not from 0, 0)."""
    ink = font.getbbox(text)
    x = box[0] + (box[2] - box[0] - (ink[2] - ink[0])) / 2 - ink[0]
    y = box[1] + (box[3] - box[1] - (ink[3] - ink[1])) / 2 - ink[1]
    draw.text((x, y), text, fill=fill, font=font)


def _marker(draw: ImageDraw.ImageDraw, x: float, y: float, shape: str, color: str) -> None:
    r = _MARKER_RADIUS
    if shape == "square":
        draw.rectangle([x - r + 1, y - r + 1, x + r - 1, y + r - 1], fill=color, outline="black")
    elif shape == "triangle":
        draw.polygon([(x, y - r), (x - r, y + r - 1), (x + r, y + r - 1)], fill=color, outline="black")
    else:
        draw.ellipse([x - r, y - r, x + r, y + r], fill=color, outline="black")


def _overlap(a: tuple[int, int, int, int], b: tuple[int, int, int, int]) -> int:
    return max(0, min(a[2], b[2]) - max(a[0], b[0])) * max(0, min(a[3], b[3]) - max(a[1], b[1]))


def _mean_per_stage(records: list[dict], field: str) -> dict[str, float] | None:
    """Per-stage means of a usage field over the records that carry it (the engine reported it), else ``None``."""
    counted = [r[field] for r in records if r["failure"] is None and (r.get(field) or {}).get("total") is not None]
    if not counted:
        return None
    return {stage: sum(counts[stage] for counts in counted) / len(counted) for stage in ("stage1", "stage2", "total")}


def _counter_delta(before: dict[str, float], after: dict[str, float]) -> dict:
    """The server's prefix-cache counters over a run (``/metrics``): server-wide, so exact only when no other
    client was sending."""
    queries, hits = after["queries"] - before["queries"], after["hits"] - before["hits"]
    return {"queried_tokens": int(queries), "hit_tokens": int(hits),
            "hit_rate": round(hits / queries, 4) if queries else None, "source": "/metrics difference, server-wide"}


def _accuracy(records: list[dict]) -> float | None:
    return sum(r["correct"] for r in records) / len(records) if records else None


def _read_records(path: Path, settings: dict) -> list[dict]:
    """The records made under ``settings`` (the file name's hash already says so; a record says it itself)."""
    if not path.is_file():
        return []
    records = []
    for line in path.read_text(encoding="utf-8").splitlines():
        try:
            record = json.loads(line)
        except json.JSONDecodeError:
            continue  # a line cut off by an interruption; that sample runs again
        if isinstance(record, dict) and record.get("settings") == settings:
            records.append(record)
    return records


def _progress(total: int, done: int, description: str, enabled: bool):
    from tqdm.auto import tqdm

    return tqdm(total=total, initial=done, desc=description, disable=not enabled)
