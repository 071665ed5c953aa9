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

``mask_target`` is the paper's masking test: the coarse view is made from the image with the sample's ``gt_bbox``
painted over in its surroundings' colour, while stage 2's crop is still cut from the unmasked original. A model that
found the target through its context keeps its region; one that needed to see the target loses it.
"""

from __future__ import annotations

import hashlib
import json
import time
from collections import defaultdict
from pathlib import Path

import numpy as np
import torch
from PIL import Image

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
             progress: bool = True, mask_target: bool = False) -> dict:
    """Runs the samples without a successful record under the same ``run_settings`` (failed ones run again), appends
    their records to ``<out>/<benchmark>-<mode>-<budget>-<settings id>.jsonl`` and returns the summary of
    ``samples``. ``model`` is a local model (``batch_size`` samples per ``generate``), an ``ErgoClient`` (all
    samples sent at once, its ``concurrency`` in flight; each record is written as its sample finishes) or an
    ``ErgoVLLM`` (all samples in one batch per stage). ``fallback`` (ERGO mode) defaults to the reference's: the unresized original when stage 1 gives no
    usable region. ``mask_target`` (local models, modes ``ergo`` and ``coarse``, samples with a ``gt_bbox``) masks
    the target out of the coarse view only (module docstring)."""
    if mode not in MODES:
        raise ValueError(f"mode must be one of {MODES}, got {mode!r}")
    if mask_target:
        _check_maskable(model, samples, mode)
    if batch_size < 1 or max_new_tokens < 1:
        raise ValueError(f"batch_size and max_new_tokens must be positive, got {batch_size} and {max_new_tokens}")
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    settings = run_settings(model, processor, benchmark, mode, budget, max_new_tokens, fallback, mask_target)
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
                    finished += _run_batch(model, processor, runnable, mode, budget, max_new_tokens, fallback,
                                           mask_target)
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
                 fallback: str, mask_target: bool = False) -> dict:
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
    if mask_target:  # only then: unmasked runs keep the settings (and file names) they always had
        settings["mask"] = "gt_bbox in the coarse view"
    return settings


def _check_maskable(model, samples: list[EvalSample], mode: str) -> None:
    """``mask_target`` needs the coarse view built here (a local model) and a box on every readable sample."""
    if mode == "full":
        raise ValueError("mask_target masks the coarse view: modes ergo and coarse only")
    if isinstance(model, ErgoChat):
        raise ValueError("mask_target: local models only (a served engine builds its own coarse view)")
    missing = [sample.id for sample in samples if sample.error is None and sample.gt_bbox is None]
    if missing:
        raise ValueError(f"mask_target needs each sample's gt_bbox; none for {missing[:5]} (the synthetic datasets "
                         f"have them)")


def mask_box(image: Image.Image, box: list[int], ring: int = 4) -> Image.Image:
    """A copy of ``image`` with ``box`` (original pixels) filled with the median colour of the ``ring`` pixels
    around it: the target is gone, and no hole of an odd colour marks where it was."""
    pixels = np.asarray(image.convert("RGB")).copy()
    height, width = pixels.shape[:2]
    x1, y1, x2, y2 = (max(0, min(value, limit)) for value, limit in zip(box, (width, height, width, height)))
    outer = pixels[max(0, y1 - ring):y2 + ring, max(0, x1 - ring):x2 + ring].reshape(-1, 3)
    inside = np.zeros((height, width), dtype=bool)
    inside[y1:y2, x1:x2] = True
    around = ~inside[max(0, y1 - ring):y2 + ring, max(0, x1 - ring):x2 + ring].reshape(-1)
    pixels[y1:y2, x1:x2] = np.median(outer[around], axis=0).round().astype(np.uint8)
    return Image.fromarray(pixels)


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


def _run_batch(model, processor, batch, mode, budget, max_new_tokens, fallback, mask_target=False) -> list[dict]:
    """Records for a batch; when the batch fails, each sample is retried alone so one bad sample fails alone."""
    try:
        return _generate(model, processor, batch, mode, budget, max_new_tokens, fallback, mask_target)
    except Exception as error:  # noqa: BLE001 - recorded per sample below, never dropped
        message = f"{type(error).__name__}: {error}"
    # Out of the except block: the failed batch's tensors (held by the traceback) are freed before retrying.
    if torch.cuda.is_available():
        torch.cuda.empty_cache()
    if len(batch) == 1:
        return [_record(batch[0], mode, failure=message)]
    return [record for sample in batch
            for record in _run_batch(model, processor, [sample], mode, budget, max_new_tokens, fallback, mask_target)]


@torch.no_grad()
def _generate(model, processor, batch: list[EvalSample], mode, budget, max_new_tokens, fallback,
              mask_target=False) -> list[dict]:
    images = [load_image(sample.image, name=f"sample {sample.id}") for sample in batch]
    seen = [mask_box(image, sample.gt_bbox) for image, sample in zip(images, batch)] if mask_target else images
    started = time.perf_counter()
    if mode == "ergo":
        inputs = processor.prepare(seen, [sample.stem for sample in batch], options=[s.options for s in batch],
                                   postfixes=[s.postfix for s in batch], coarse_budget=budget, crop_budget=budget,
                                   fallback=fallback)
        if mask_target:  # stage 2 crops the unmasked original; the coarse view is already made
            for request, image in zip(inputs["ergo_context"].samples, images):
                request.image = image
        out = model.generate(**inputs.to(model.device), max_new_tokens=max_new_tokens, do_sample=False,
                             return_dict_in_generate=True)
        replies = processor.post_process_image_text_to_text(out.sequences, prompt_length=inputs["input_ids"].shape[1])
        seconds = (time.perf_counter() - started) / len(batch)
        return [_record(sample, mode, reply, seconds, out.vision_tokens[i], out.regions[i], out.fallbacks[i])
                for i, (sample, reply) in enumerate(zip(batch, replies))]
    questions = [stage_questions(s.stem, s.options, s.postfix)[1] for s in batch]
    inputs = processor.single_pass(seen, questions, budget=budget if mode == "coarse" else None)
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
