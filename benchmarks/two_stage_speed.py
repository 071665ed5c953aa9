"""How much faster is ERGO than one full-resolution pass? Four modes, one process, the same shapes and lengths.

    python benchmarks/two_stage_speed.py --shape cpu-proxy            # CPU, a few minutes
    python benchmarks/two_stage_speed.py --shape qwen2.5-vl-7b        # GPU: bf16, SDPA, the real 7B shape

Modes, all on the same random-weight model:
  (a) ergo_kv         ERGO, stage 2 continues stage 1's KV cache (the default)
  (b) ergo_reprefill  ERGO, stage 2 re-encodes the whole conversation (the reference transformers path)
  (c) full_resolution one pass over the whole image at 16384 vision tokens (the paper's Qwen2.5-VL baseline)
  (d) coarse_only     one pass over the coarse image alone

Random weights generate random text, so lengths are forced: stage 1 emits exactly ``--stage1-tokens`` tokens
ending in a ``<zoom>`` box sized so the crop costs ``--crop-tokens`` vision tokens; every answer (ERGO's stage 2,
(c), (d)) is exactly ``--answer-tokens`` long. Wall time is end to end (image preprocessing included); "outside
forward" is the share of it not spent in the model's forward passes (vision encoder and language model):
image preprocessing ("preproc", also shown alone), transformers' per-token generation loop, and for ERGO the work
between the stages (decoding, parsing, cropping, building stage 2).
Peak memory is the CUDA allocator's peak on GPU and the process's peak RSS on CPU (both reset per run).
"""

from __future__ import annotations

import argparse
import json
import platform
import random
import statistics
import time
from dataclasses import asdict, dataclass
from datetime import datetime, timezone
from pathlib import Path

import torch
from PIL import Image
from transformers import LogitsProcessorList

from ergo_vqa.scripted import ScriptedText
from ergo_vqa.tiny import TINY, ModelShape, build_model, build_processor, build_tokenizer
from ergo_vqa.evaluation import single_pass_inputs
from processing_ergo.geometry_ergo import budget_to_pixels, smart_resize
from processing_ergo.processing_ergo import FULL_RESOLUTION_BUDGET

SHAPES = {
    "tiny": TINY,
    "cpu-proxy": ModelShape(
        hidden_size=256, intermediate_size=704, layers=4, heads=8, kv_heads=2,
        vision_depth=4, vision_hidden=128, vision_intermediate=256, vision_heads=4,
    ),
    "qwen2.5-vl-7b": ModelShape(
        hidden_size=3584, intermediate_size=18944, layers=28, heads=28, kv_heads=4,
        vision_depth=32, vision_hidden=1280, vision_intermediate=3420, vision_heads=16,
        full_attention_blocks=(7, 15, 23, 31), vocab_size=152064,
    ),
}
MODES = ("ergo_kv", "ergo_reprefill", "full_resolution", "coarse_only")
QUESTION = "What is the color of the small sign?\n(A) red\n(B) blue\n(C) green\n(D) white"


@dataclass
class Lengths:
    stage1_tokens: int = 96
    answer_tokens: int = 24
    crop_tokens: int = 384


class ForwardClock:
    """Seconds spent inside forward passes of the model and of its vision encoder (outermost calls only)."""

    def __init__(self, model, synchronize):
        self.seconds, self._depth, self._start, self._synchronize = 0.0, 0, 0.0, synchronize
        modules = (model, model.model.visual)
        self._handles = [m.register_forward_pre_hook(self._enter) for m in modules]
        self._handles += [m.register_forward_hook(self._leave) for m in modules]

    def _enter(self, *_):
        if self._depth == 0:
            self._synchronize()
            self._start = time.perf_counter()
        self._depth += 1

    def _leave(self, *_):
        self._depth -= 1
        if self._depth == 0:
            self._synchronize()
            self.seconds += time.perf_counter() - self._start

    def remove(self):
        for handle in self._handles:
            handle.remove()


class PeakMemory:
    """Peak memory of one run: CUDA allocator peak, or the process's peak RSS (Linux ``VmHWM``, reset per run)."""

    def __init__(self, device: torch.device):
        self.device = device

    def reset(self) -> None:
        if self.device.type == "cuda":
            torch.cuda.reset_peak_memory_stats(self.device)
        else:
            try:
                Path("/proc/self/clear_refs").write_text("5")
            except OSError:
                pass

    def peak_mib(self) -> float | None:
        if self.device.type == "cuda":
            return torch.cuda.max_memory_allocated(self.device) / 2**20
        try:
            line = next(l for l in Path("/proc/self/status").read_text().splitlines() if l.startswith("VmHWM"))
        except (OSError, StopIteration):
            return None
        return int(line.split()[1]) / 1024


def synthetic_image(width: int, height: int, seed: int) -> Image.Image:
    """Random pixels: the content does not change the cost, only the size does."""
    return Image.frombytes("RGB", (width, height), random.Random(seed).randbytes(width * height * 3))


def stage1_script(processor, image: Image.Image, coarse_budget: int, lengths: Lengths) -> list[int]:
    """Stage-1 token ids: filler reasoning, then a centred ``<zoom>`` box whose native-resolution crop is about
    ``crop_tokens`` vision tokens."""
    coarse_h, coarse_w = smart_resize(image.height, image.width, max_pixels=budget_to_pixels(coarse_budget))
    share = min(1.0, (lengths.crop_tokens * 28 * 28 / (image.width * image.height)) ** 0.5)
    box_w, box_h = max(2, round(coarse_w * share)), max(2, round(coarse_h * share))
    x1, y1 = (coarse_w - box_w) // 2, (coarse_h - box_h) // 2
    return forced_text(processor, f"<zoom>[{x1}, {y1}, {x1 + box_w}, {y1 + box_h}]</zoom>", lengths.stage1_tokens)


def forced_text(processor, ending: str, length: int) -> list[int]:
    """Token ids of exactly ``length``: ``<think>``, filler words, ``</think>`` and ``ending``."""
    tokenizer = processor.tokenizer
    head = tokenizer("<think>", add_special_tokens=False)["input_ids"]
    tail = tokenizer(f" </think> {ending}", add_special_tokens=False)["input_ids"]
    filler = tokenizer(" the", add_special_tokens=False)["input_ids"]
    missing = length - len(head) - len(tail)
    if missing < 0:
        raise ValueError(f"--stage1-tokens must be at least {len(head) + len(tail)}")
    return head + (filler * missing)[:missing] + tail


def run_once(mode, model, processor, images, scripts, lengths, coarse_budget, device, clock, memory) -> dict:
    tokenizer = processor.tokenizer
    end_id = tokenizer.convert_tokens_to_ids(tokenizer.eos_token)
    answer = {"max_new_tokens": lengths.answer_tokens, "min_new_tokens": lengths.answer_tokens}
    memory.reset()
    clock.seconds = 0.0
    _synchronize(device)
    started = time.perf_counter()
    if mode.startswith("ergo"):
        model.config.reuse_stage1_cache = mode == "ergo_kv"
        inputs = processor.prepare(images, [QUESTION] * len(images), coarse_budget=coarse_budget).to(device)
        preprocessed = time.perf_counter()
        stage1 = {
            "logits_processor": LogitsProcessorList([ScriptedText(scripts, end_id)]),
            "max_new_tokens": max(len(script) for script in scripts) + 1,
        }
        output = model.generate(**inputs, stage1_generate_kwargs=stage1, stage2_generate_kwargs=answer,
                                return_dict_in_generate=True)
        vision = [tokens["total"] for tokens in output.vision_tokens]
        prefill = [int(inputs["attention_mask"][row].sum()) + output.stage2_prefill_tokens[row]
                   for row in range(len(images))]
        early_exits = output.fallbacks.count("answered")
    else:
        view_budget = coarse_budget if mode == "coarse_only" else None  # coarse_only: ERGO's own coarse view
        inputs = single_pass_inputs(processor, images, [QUESTION] * len(images), coarse_budget=view_budget).to(device)
        preprocessed = time.perf_counter()
        model.generate(**inputs, **answer)
        merge = processor.image_processor.merge_size**2
        vision = (inputs["image_grid_thw"].prod(dim=-1) // merge).tolist()
        prefill = inputs["attention_mask"].sum(dim=1).tolist()
        early_exits = 0
    _synchronize(device)
    wall = time.perf_counter() - started
    return {
        "wall_s": wall,
        "forward_s": clock.seconds,
        "preprocess_s": preprocessed - started,
        "vision_tokens": statistics.mean(vision),
        "prefill_tokens": statistics.mean(prefill),
        "peak_mib": memory.peak_mib(),
        "early_exits": early_exits,
    }


def measure(mode, model, processor, images, scripts, lengths, args, device, clock, memory) -> dict:
    runs = [run_once(mode, model, processor, images, scripts, lengths, args.coarse_budget, device, clock, memory)
            for _ in range(args.repeats)]
    wall = statistics.median(run["wall_s"] for run in runs)
    forward = statistics.median(run["forward_s"] for run in runs)
    preprocess = statistics.median(run["preprocess_s"] for run in runs)
    peaks = [run["peak_mib"] for run in runs if run["peak_mib"] is not None]
    return {
        "mode": mode,
        "batch": len(images),
        "vision_tokens": runs[0]["vision_tokens"],
        "prefill_tokens": runs[0]["prefill_tokens"],
        "wall_s": wall,
        "per_sample_s": wall / len(images),
        "samples_per_s": len(images) / wall,
        "outside_forward_share": max(0.0, 1 - forward / wall),
        "preprocess_share": preprocess / wall,
        "peak_mib": max(peaks) if peaks else None,
        "early_exits": runs[0]["early_exits"],
    }


def with_ratios(results: list[dict]) -> list[dict]:
    """Adds, per row, speed-up and token shares against the full-resolution pass of the same size and batch."""
    for row in results:
        base = next(r for r in results if r["mode"] == "full_resolution"
                    and (r["size"], r["batch"]) == (row["size"], row["batch"]))
        row["speedup_vs_full"] = base["wall_s"] / row["wall_s"]
        row["vision_share_vs_full"] = row["vision_tokens"] / base["vision_tokens"]
        row["prefill_share_vs_full"] = row["prefill_tokens"] / base["prefill_tokens"]
    return results


def table(results: list[dict]) -> str:
    header = (f"{'size':>10} {'B':>2} {'mode':<16}{'vision':>8}{'prefill':>9}{'wall s':>9}{'per smp s':>10}"
              f"{'smp/s':>7}{'outside':>8}{'preproc':>8}{'peak MiB':>9}{'speedup':>8}{'vis%':>6}{'exits':>6}")
    lines = [header, "-" * len(header)]
    for r in results:
        peak = f"{r['peak_mib']:.0f}" if r["peak_mib"] is not None else "-"
        lines.append(
            f"{r['size']:>10} {r['batch']:>2} {r['mode']:<16}{r['vision_tokens']:>8.0f}{r['prefill_tokens']:>9.0f}"
            f"{r['wall_s']:>9.3f}{r['per_sample_s']:>10.3f}{r['samples_per_s']:>7.2f}"
            f"{100 * r['outside_forward_share']:>7.1f}%{100 * r['preprocess_share']:>7.1f}%{peak:>9}{r['speedup_vs_full']:>7.2f}x"
            f"{100 * r['vision_share_vs_full']:>5.0f}%{r['early_exits']:>6}"
        )
    return "\n".join(lines)


def parse_sizes(text: str) -> list[tuple[int, int]]:
    return [tuple(int(side) for side in size.split("x")) for size in text.split(",")]


def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--shape", choices=sorted(SHAPES), default="cpu-proxy")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--dtype", choices=["float32", "bfloat16"], help="default: bfloat16 on GPU, float32 on CPU")
    parser.add_argument("--sizes", type=parse_sizes, default=parse_sizes("2246x1582,3840x2160,7680x4320"),
                        help="image sizes WxH for the batch-1 comparison (2246x1582 is V*'s mean)")
    parser.add_argument("--throughput-size", type=parse_sizes, default=parse_sizes("2246x1582"),
                        help="image size for the batch-size sweep")
    parser.add_argument("--batch-sizes", type=lambda t: [int(b) for b in t.split(",")], default=[1, 4, 8])
    parser.add_argument("--coarse-budget", type=int, default=640)
    parser.add_argument("--stage1-tokens", type=int, default=Lengths.stage1_tokens)
    parser.add_argument("--answer-tokens", type=int, default=Lengths.answer_tokens)
    parser.add_argument("--crop-tokens", type=int, default=Lengths.crop_tokens)
    parser.add_argument("--answered-share", type=float, default=0.0,
                        help="share of samples whose stage 1 answers without a region (exercises early exit)")
    parser.add_argument("--early-exit", action="store_true", help="turn on config.skip_answered_stage2")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--output", type=Path, help="JSON file (default: benchmarks/results/<shape>-<device>.json)")
    return parser.parse_args(argv)


def main(argv=None) -> dict:
    args = parse_args(argv)
    device = torch.device(args.device)
    dtype = getattr(torch, args.dtype or ("bfloat16" if device.type == "cuda" else "float32"))
    lengths = Lengths(args.stage1_tokens, args.answer_tokens, args.crop_tokens)
    tokenizer = build_tokenizer()
    processor = build_processor(tokenizer)
    model = build_model(tokenizer, SHAPES[args.shape], device=device, dtype=dtype)
    model.config.skip_answered_stage2 = args.early_exit
    clock, memory = ForwardClock(model, lambda: _synchronize(device)), PeakMemory(device)

    plan = [(size, 1) for size in args.sizes]
    plan += [(args.throughput_size[0], batch) for batch in args.batch_sizes if (args.throughput_size[0], batch) not in plan]
    warmup = [synthetic_image(448, 448, 0)]
    for mode in MODES:  # first calls pay one-time costs (allocator, kernels); keep them out of the figures
        run_once(mode, model, processor, warmup, [stage1_script(processor, warmup[0], args.coarse_budget, lengths)],
                 lengths, args.coarse_budget, device, clock, memory)

    results = []
    for (width, height), batch in plan:
        images = [synthetic_image(width, height, seed) for seed in range(batch)]
        answered = round(args.answered_share * batch)
        scripts = [forced_text(processor, "<answer>A</answer>", lengths.stage1_tokens) if index < answered
                   else stage1_script(processor, image, args.coarse_budget, lengths)
                   for index, image in enumerate(images)]
        for mode in MODES:
            row = measure(mode, model, processor, images, scripts, lengths, args, device, clock, memory)
            results.append({"size": f"{width}x{height}", **row})
    clock.remove()
    results = with_ratios(results)

    report = {
        "date": datetime.now(timezone.utc).strftime("%Y-%m-%d"),
        "machine": _machine(device),
        "shape": args.shape,
        "model_shape": asdict(SHAPES[args.shape]),
        "parameters": sum(p.numel() for p in model.parameters()),
        "dtype": str(dtype).removeprefix("torch."),
        "attention": model.config._attn_implementation,
        "coarse_budget": args.coarse_budget,
        "full_resolution_budget": FULL_RESOLUTION_BUDGET,
        "lengths": asdict(lengths),
        "answered_share": args.answered_share,
        "early_exit": args.early_exit,
        "repeats": args.repeats,
        "results": results,
    }
    print(f"{args.shape} on {report['machine']}, {report['dtype']}, {report['attention']}; coarse budget "
          f"{args.coarse_budget}; stage 1 {lengths.stage1_tokens} tokens, answers {lengths.answer_tokens} tokens, "
          f"crop ~{lengths.crop_tokens} vision tokens; median of {args.repeats}")
    print(table(results))
    output = args.output or Path(__file__).parent / "results" / f"{args.shape}-{device.type}.json"
    output.parent.mkdir(parents=True, exist_ok=True)
    output.write_text(json.dumps(report, indent=2) + "\n")
    print(f"wrote {output}")
    return report


def _synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _machine(device: torch.device) -> str:
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    return f"{platform.processor() or platform.machine()}, {torch.get_num_threads()} threads"


if __name__ == "__main__":
    main()
