"""How much faster is ERGO than one full-resolution pass? Five modes, one process, the same shapes and lengths.

    python benchmarks/two_stage_speed.py --shape cpu-proxy            # CPU, about 10 minutes
    python benchmarks/two_stage_speed.py --shape qwen2.5-vl-7b        # GPU: bf16, static cache, varlen vision
    python benchmarks/two_stage_speed.py --shape qwen2.5-vl-7b --caches dynamic,static --vision-attention sdpa,varlen
    python benchmarks/two_stage_speed.py --shape qwen3-vl-8b          # GPU: the other families' real shapes
    python benchmarks/two_stage_speed.py --shape qwen3.5-9b
    python benchmarks/two_stage_speed.py --shape cpu-proxy-qwen3-vl   # CPU: each family's proxy (cpu-proxy-qwen3.5)

The family is a dimension of the shape: each shape names its family (``modeling_ergo.family_ergo``), whose tokenizer,
chat template, image processor (28 or 32 px per vision token), grounding convention and ERGO class the run uses.

Modes, all on the same random-weight model:
  (a)  ergo_kv           ERGO, stage 2 continues stage 1's KV cache (the default)
  (b)  ergo_reprefill    ERGO, stage 2 re-encodes the whole conversation (the reference transformers path)
  (c)  full_resolution   one pass over the whole image at 16384 vision tokens (the paper's Qwen2.5-VL baseline),
                         answering directly (answer tokens)
  (c2) full_same_length  the same pass generating as many tokens as ERGO does (stage 1 + answer): what a model
                         that reasons at full resolution pays
  (d)  coarse_only       one pass over the coarse image alone

Dimensions: the KV cache (``--caches``: dynamic, or static, where transformers compiles the decode step on GPU) and
the vision tower's attention (``--vision-attention``: sdpa, one call per attention window, or varlen, all windows in
one call of PyTorch's flash varlen attention; CUDA only). Every combination runs every mode, so each ERGO row has
baselines under the same settings.

Random weights generate random text, so lengths are forced: stage 1 emits exactly ``--stage1-tokens`` tokens
ending in a ``<zoom>`` box sized so the crop costs ``--crop-tokens`` vision tokens; every answer (ERGO's stage 2,
(c), (d)) is exactly ``--answer-tokens`` long, and (c2) is ``--stage1-tokens + --answer-tokens`` long.
Wall time is end to end (image preprocessing included), the median of ``--repeats`` runs after one untimed run
(allocations, kernel selection and, for static caches, compilation). "preproc" is the share of it spent preparing
images: stage-1 inputs, plus for ERGO the zoom step between the stages (parsing, cropping, stage-2 inputs).
Decode ms/token comes from one more run that timestamps every generation step (synchronised), as the median step,
next to the floor set by reading the language model's weights once per step at the memory bandwidth measured here
by a device-to-device copy. Peak memory is the CUDA allocator's peak on GPU and the process's peak RSS on CPU.
"""

from __future__ import annotations

import argparse
import itertools
import json
import platform
import random
import re
import statistics
import time
from dataclasses import asdict, dataclass, field
from datetime import datetime, timezone
from pathlib import Path

import torch
from PIL import Image
from transformers import LogitsProcessor, LogitsProcessorList

from ergo_vqa.inference import use_cache
from ergo_vqa.testing_utils import ScriptedText
from ergo_vqa.tiny import TINY, ModelShape, build_model, build_processor, build_tokenizer
from modeling_ergo.family_ergo import QWEN2_5_VL, QWEN3_5, QWEN3_VL, Family
from modeling_ergo.modeling_ergo import varlen_available
from processing_ergo.geometry_ergo import PAPER_BUDGET, box_scale, budget_to_pixels, smart_resize
from processing_ergo.processing_ergo import FULL_RESOLUTION_BUDGET


@dataclass(frozen=True)
class BenchmarkShape:
    """A model to time: its family, its sizes, and what its config sets that ``ModelShape`` does not express (set on
    the built config's ``text_config`` / ``vision_config`` before the weights are made)."""

    family: Family
    sizes: ModelShape
    text_config: dict = field(default_factory=dict)
    vision_config: dict = field(default_factory=dict)


CPU_PROXY = ModelShape(hidden_size=256, intermediate_size=704, layers=4, heads=8, kv_heads=2,
                       vision_depth=4, vision_hidden=128, vision_intermediate=256, vision_heads=4)
"""4 layers of width 256 and a 4-block vision tower of width 128: the same sizes in every family's proxy."""
QWEN3_5_LAYERS = ["linear_attention"] * 3 + ["full_attention"]
"""Qwen3.5's layer pattern: three gated-DeltaNet layers, then one full-attention layer (``full_attention_interval``
4 in its config.json), repeated."""

# Real shapes: the public config.json of each checkpoint, as recalled here (this machine cannot reach the Hub, so none
# was read from a download). Qwen/Qwen2.5-VL-7B-Instruct: text 3584 wide, 18944 MLP, 28 layers, 28 heads / 4 KV
# heads, vocabulary 152064; vision 32 blocks of 1280 (MLP 3420, 16 heads), full attention in blocks 7, 15, 23, 31.
# Qwen/Qwen3-VL-8B-Instruct: text 4096 wide, 12288 MLP, 36 layers, 32 heads / 8 KV heads of 128, vocabulary 151936;
# vision 27 blocks of 1152 (MLP 4304, 16 heads), 2304 learned positions, DeepStack features from blocks 8, 16, 24.
# Qwen/Qwen3.5-9B: text 4096 wide, 12288 MLP, 32 layers (QWEN3_5_LAYERS), full attention 16 heads / 4 KV heads of
# 256, gated DeltaNet 16 key heads and 32 value heads of 128, vocabulary 248320; vision as Qwen3-VL's without
# DeepStack. The Qwen3.5 numbers are also transformers 5.23's Qwen3_5Config defaults (9.4B parameters with the
# merger's output at the text width). RoPE sections and theta, which change no cost, keep ergo_vqa.tiny's.
SHAPES = {
    "tiny": BenchmarkShape(QWEN2_5_VL, TINY),
    "tiny-qwen3-vl": BenchmarkShape(QWEN3_VL, TINY),
    "tiny-qwen3.5": BenchmarkShape(QWEN3_5, TINY),
    "cpu-proxy": BenchmarkShape(QWEN2_5_VL, CPU_PROXY),
    "cpu-proxy-qwen3-vl": BenchmarkShape(QWEN3_VL, CPU_PROXY),
    "cpu-proxy-qwen3.5": BenchmarkShape(QWEN3_5, CPU_PROXY, text_config={"layer_types": QWEN3_5_LAYERS}),
    "qwen2.5-vl-7b": BenchmarkShape(QWEN2_5_VL, ModelShape(
        hidden_size=3584, intermediate_size=18944, layers=28, heads=28, kv_heads=4,
        vision_depth=32, vision_hidden=1280, vision_intermediate=3420, vision_heads=16,
        full_attention_blocks=(7, 15, 23, 31), vocab_size=152064,
    )),
    "qwen3-vl-8b": BenchmarkShape(QWEN3_VL, ModelShape(
        hidden_size=4096, intermediate_size=12288, layers=36, heads=32, kv_heads=8,
        vision_depth=27, vision_hidden=1152, vision_intermediate=4304, vision_heads=16, vocab_size=151936,
    ), vision_config={"deepstack_visual_indexes": [8, 16, 24], "num_position_embeddings": 2304}),
    "qwen3.5-9b": BenchmarkShape(QWEN3_5, ModelShape(
        hidden_size=4096, intermediate_size=12288, layers=32, heads=16, kv_heads=4,
        vision_depth=27, vision_hidden=1152, vision_intermediate=4304, vision_heads=16, vocab_size=248320,
    ), text_config={"layer_types": QWEN3_5_LAYERS * 8, "linear_num_key_heads": 16, "linear_num_value_heads": 32,
                    "linear_key_head_dim": 128, "linear_value_head_dim": 128},
        vision_config={"num_position_embeddings": 2304}),
}
MODES = ("ergo_kv", "ergo_reprefill", "full_resolution", "full_same_length", "coarse_only")
LABELS = {"ergo_kv": "(a)", "ergo_reprefill": "(b)", "full_resolution": "(c)", "full_same_length": "(c2)",
          "coarse_only": "(d)"}
QUESTION = "What is the color of the small sign?\n(A) red\n(B) blue\n(C) green\n(D) white"


@dataclass
class Lengths:
    stage1_tokens: int = 96
    answer_tokens: int = 24
    crop_tokens: int = 384


@dataclass(frozen=True)
class Setting:
    """One combination of the benchmark's dimensions."""

    cache: str
    vision_attention: str

    @property
    def name(self) -> str:
        return f"{self.cache}/{self.vision_attention}"

    def apply(self, model) -> None:
        use_cache(model, self.cache)
        model.config.vision_attention = "auto" if self.vision_attention == "varlen" else "loaded"


class StepClock(LogitsProcessor):
    """Timestamps every generation step (after synchronising the device); leaves the scores alone."""

    def __init__(self, synchronize):
        self.synchronize, self.stamps = synchronize, []

    def __call__(self, input_ids: torch.LongTensor, scores: torch.FloatTensor) -> torch.FloatTensor:
        self.synchronize()
        self.stamps.append((input_ids.shape[1], time.perf_counter()))
        return scores

    def decode_seconds(self) -> list[float]:
        """Seconds of each decode step: between two stamps one token apart (a stage's first step follows its
        prefill, and a new ``generate`` call starts from another length)."""
        return [later - earlier for (length, earlier), (next_length, later) in zip(self.stamps, self.stamps[1:])
                if next_length == length + 1]


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
    ``crop_tokens`` vision tokens, written in the processor's grounding convention (coarse pixels or thousandths)."""
    factor = processor.factor
    coarse_h, coarse_w = smart_resize(image.height, image.width, factor,
                                      max_pixels=budget_to_pixels(coarse_budget, factor))
    share = min(1.0, (lengths.crop_tokens * factor * factor / (image.width * image.height)) ** 0.5)
    box_w, box_h = max(2, round(coarse_w * share)), max(2, round(coarse_h * share))
    x1, y1 = (coarse_w - box_w) // 2, (coarse_h - box_h) // 2
    # Coarse pixels -> original pixels -> the convention's units (the identity for absolute boxes).
    scale_x, scale_y = (size / coarse / written for size, coarse, written in zip(
        image.size, (coarse_w, coarse_h), box_scale(image.size, (coarse_w, coarse_h), processor.grounding)))
    box = [round(x1 * scale_x), round(y1 * scale_y), round((x1 + box_w) * scale_x), round((y1 + box_h) * scale_y)]
    return forced_text(processor, f"<zoom>[{', '.join(map(str, box))}]</zoom>", lengths.stage1_tokens)


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


def run_once(mode, model, processor, images, scripts, lengths, coarse_budget, device, memory,
             clock: StepClock | None = None) -> dict:
    """One timed run of ``mode``; with ``clock``, every generation step is also timestamped."""
    tokenizer = processor.tokenizer
    end_id = tokenizer.convert_tokens_to_ids(tokenizer.eos_token)
    answer_tokens = lengths.answer_tokens + (lengths.stage1_tokens if mode == "full_same_length" else 0)
    answer = {"max_new_tokens": answer_tokens, "min_new_tokens": answer_tokens}
    if clock is not None:
        answer["logits_processor"] = LogitsProcessorList([clock])
    memory.reset()
    _synchronize(device)
    started = time.perf_counter()
    if mode.startswith("ergo"):
        model.config.reuse_stage1_cache = mode == "ergo_kv"
        inputs = processor.prepare(images, [QUESTION] * len(images), coarse_budget=coarse_budget).to(device)
        preprocessed = time.perf_counter()
        stage1 = {
            "logits_processor": LogitsProcessorList([ScriptedText(scripts, end_id)] + ([clock] if clock else [])),
            "max_new_tokens": max(len(script) for script in scripts) + 1,
        }
        output = model.generate(**inputs, stage1_generate_kwargs=stage1, stage2_generate_kwargs=answer,
                                return_dict_in_generate=True)
        preprocess = preprocessed - started + output.timings[0]["zoom"]
        vision = [tokens["total"] for tokens in output.vision_tokens]
        prefill = [int(inputs["attention_mask"][row].sum()) + output.stage2_prefill_tokens[row]
                   for row in range(len(images))]
        generated = lengths.stage1_tokens + 1 + lengths.answer_tokens  # stage 1's text and its end token
        early_exits, cache = output.fallbacks.count("answered"), output.cache
    else:
        view_budget = coarse_budget if mode == "coarse_only" else None  # coarse_only: ERGO's own coarse view
        inputs = processor.single_pass(images, [QUESTION] * len(images), budget=view_budget).to(device)
        preprocess = time.perf_counter() - started
        model.generate(**inputs, **answer)
        merge = processor.image_processor.merge_size**2
        vision = (inputs["image_grid_thw"].prod(dim=-1) // merge).tolist()
        prefill = inputs["attention_mask"].sum(dim=1).tolist()
        generated, early_exits, cache = answer_tokens, 0, None
    _synchronize(device)
    return {
        "wall_s": time.perf_counter() - started,
        "preprocess_s": preprocess,
        "vision_tokens": statistics.mean(vision),
        "prefill_tokens": statistics.mean(prefill),
        "generated_tokens": generated,
        "peak_mib": memory.peak_mib(),
        "early_exits": early_exits,
        "stage2_cache": cache,
    }


def measure(mode, model, processor, images, scripts, lengths, args, device, memory) -> dict:
    """Median of ``args.repeats`` timed runs after one untimed run, then one run with step timestamps."""
    run = lambda clock=None: run_once(mode, model, processor, images, scripts, lengths, args.coarse_budget, device,
                                      memory, clock)
    # Every mode starts from fresh caches: transformers sizes a new static cache to the largest seen so far, and ERGO
    # keeps its own; either would make this mode attend over (and hold) another mode's cache length.
    model.__dict__.pop("_previous_max_cache_length", None)
    model.release_static_cache()
    run()
    runs = [run() for _ in range(args.repeats)]
    clock = StepClock(lambda: _synchronize(device))
    run(clock)
    wall = statistics.median(r["wall_s"] for r in runs)
    peaks = [r["peak_mib"] for r in runs if r["peak_mib"] is not None]
    decode = clock.decode_seconds()
    return {
        "mode": mode,
        "batch": len(images),
        "vision_tokens": runs[0]["vision_tokens"],
        "prefill_tokens": runs[0]["prefill_tokens"],
        "generated_tokens": runs[0]["generated_tokens"],
        "wall_s": wall,
        "per_sample_s": wall / len(images),
        "samples_per_s": len(images) / wall,
        "preprocess_share": statistics.median(r["preprocess_s"] for r in runs) / wall,
        "decode_ms_per_token": 1000 * statistics.median(decode) if decode else None,
        "peak_mib": max(peaks) if peaks else None,
        "early_exits": runs[0]["early_exits"],
        "stage2_cache": runs[0]["stage2_cache"],
    }


def with_ratios(results: list[dict]) -> list[dict]:
    """Adds, per row, speed-ups against (c) and (c2) and the vision-token share against (c), each of the same
    setting, size and batch."""
    for row in results:
        same = lambda mode: next(r for r in results if r["mode"] == mode
                                 and (r["setting"], r["size"], r["batch"]) == (row["setting"], row["size"], row["batch"]))
        row["speedup_vs_full"] = same("full_resolution")["wall_s"] / row["wall_s"]
        row["speedup_vs_full_same_length"] = same("full_same_length")["wall_s"] / row["wall_s"]
        row["vision_share_vs_full"] = row["vision_tokens"] / same("full_resolution")["vision_tokens"]
    return results


def table(results: list[dict]) -> str:
    header = (f"{'setting':<15}{'size':>10} {'B':>2} {'mode':<22}{'vision':>7}{'prefill':>8}{'gen':>5}{'wall s':>8}"
              f"{'per smp s':>10}{'preproc':>8}{'ms/tok':>7}{'peak MiB':>9}{'vs (c)':>7}{'vs (c2)':>8}{'vis%':>5}")
    lines = [header, "-" * len(header)]
    for r in results:
        peak = f"{r['peak_mib']:.0f}" if r["peak_mib"] is not None else "-"
        decode = f"{r['decode_ms_per_token']:.1f}" if r["decode_ms_per_token"] is not None else "-"
        lines.append(
            f"{r['setting']:<15}{r['size']:>10} {r['batch']:>2} {LABELS[r['mode']] + ' ' + r['mode']:<22}"
            f"{r['vision_tokens']:>7.0f}{r['prefill_tokens']:>8.0f}{r['generated_tokens']:>5}{r['wall_s']:>8.3f}"
            f"{r['per_sample_s']:>10.3f}{100 * r['preprocess_share']:>7.1f}%{decode:>7}{peak:>9}"
            f"{r['speedup_vs_full']:>6.2f}x{r['speedup_vs_full_same_length']:>7.2f}x{100 * r['vision_share_vs_full']:>4.0f}%"
        )
    return "\n".join(lines)


def copy_bandwidth(device: torch.device) -> float:
    """Bytes per second one device-to-device copy moves (read plus write), best of five."""
    size = 2**30 if device.type == "cuda" else 2**28
    source = torch.empty(size, dtype=torch.uint8, device=device)
    target = torch.empty_like(source)
    best = float("inf")
    for _ in range(5):
        _synchronize(device)
        started = time.perf_counter()
        target.copy_(source)
        _synchronize(device)
        best = min(best, time.perf_counter() - started)
    return 2 * size / best


def language_model_bytes(model) -> int:
    """Bytes of the weights every decode step reads: the language model and the LM head."""
    modules = (model.model.language_model, model.lm_head)
    return sum(p.numel() * p.element_size() for module in modules for p in module.parameters())


def parse_sizes(text: str) -> list[tuple[int, int]]:
    return [tuple(int(side) for side in size.split("x")) for size in text.split(",")]


def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--shape", choices=sorted(SHAPES), default="cpu-proxy")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--dtype", choices=["float32", "bfloat16"], help="default: bfloat16 on GPU, float32 on CPU")
    parser.add_argument("--caches", type=lambda t: t.split(","), help="dynamic,static (default: static on GPU, "
                        "dynamic on CPU, where nothing is compiled)")
    parser.add_argument("--vision-attention", type=lambda t: t.split(","),
                        help="sdpa,varlen (default: varlen on GPU, sdpa on CPU; varlen needs CUDA and half precision)")
    parser.add_argument("--sizes", type=parse_sizes, default=parse_sizes("2246x1582,3840x2160,7680x4320"),
                        help="image sizes WxH for the batch-1 comparison (2246x1582 is V*'s mean)")
    parser.add_argument("--throughput-size", type=parse_sizes, default=parse_sizes("2246x1582"),
                        help="image size for the batch-size sweep")
    parser.add_argument("--batch-sizes", type=lambda t: [int(b) for b in t.split(",")], default=[1, 4, 8])
    parser.add_argument("--coarse-budget", type=int, default=PAPER_BUDGET)
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
    gpu = device.type == "cuda"
    dtype = getattr(torch, args.dtype or ("bfloat16" if gpu else "float32"))
    settings = [Setting(cache, attention) for cache, attention in itertools.product(
        args.caches or ["static" if gpu else "dynamic"], args.vision_attention or ["varlen" if gpu else "sdpa"])]
    if any(s.vision_attention == "varlen" for s in settings) and not varlen_available(device, dtype):
        raise SystemExit("varlen vision attention needs CUDA, half precision and PyTorch >= 2.10")
    lengths = Lengths(args.stage1_tokens, args.answer_tokens, args.crop_tokens)
    shape = SHAPES[args.shape]
    tokenizer = build_tokenizer(family=shape.family)
    processor = build_processor(tokenizer, family=shape.family)
    model = build_benchmark_model(shape, tokenizer, device, dtype)
    model.config.skip_answered_stage2 = args.early_exit
    torch._dynamo.config.recompile_limit = 64  # one decode graph per cache shape: every size and batch here
    memory = PeakMemory(device)
    floor_ms = 1000 * language_model_bytes(model) / copy_bandwidth(device)

    plan = [(size, 1) for size in args.sizes]
    plan += [(args.throughput_size[0], batch) for batch in args.batch_sizes if (args.throughput_size[0], batch) not in plan]
    results = []
    for setting in settings:
        setting.apply(model)
        for (width, height), batch in plan:
            images = [synthetic_image(width, height, seed) for seed in range(batch)]
            answered = round(args.answered_share * batch)
            scripts = [forced_text(processor, "<answer>A</answer>", lengths.stage1_tokens) if index < answered
                       else stage1_script(processor, image, args.coarse_budget, lengths)
                       for index, image in enumerate(images)]
            for mode in MODES:
                row = measure(mode, model, processor, images, scripts, lengths, args, device, memory)
                results.append({"setting": setting.name, "size": f"{width}x{height}", **row})
    results = with_ratios(results)

    report = {
        "date": datetime.now(timezone.utc).strftime("%Y-%m-%d"),
        "machine": _machine(device),
        "torch": torch.__version__,
        "shape": args.shape,
        "family": shape.family.name,
        "model_shape": asdict(shape.sizes),
        "config_overrides": {"text_config": shape.text_config, "vision_config": shape.vision_config},
        "parameters": sum(p.numel() for p in model.parameters()),
        "dtype": str(dtype).removeprefix("torch."),
        "settings": [s.name for s in settings],
        "decode_floor_ms_per_token": floor_ms,
        "coarse_budget": args.coarse_budget,
        "full_resolution_budget": FULL_RESOLUTION_BUDGET,
        "lengths": asdict(lengths),
        "answered_share": args.answered_share,
        "early_exit": args.early_exit,
        "repeats": args.repeats,
        "results": results,
    }
    print(f"{args.shape} ({shape.family.name}) on {report['machine']}, {report['dtype']}; coarse budget "
          f"{args.coarse_budget}; stage 1 "
          f"{lengths.stage1_tokens} tokens, answers {lengths.answer_tokens} tokens ((c2): "
          f"{lengths.stage1_tokens + lengths.answer_tokens}), crop ~{lengths.crop_tokens} vision tokens; median of "
          f"{args.repeats}; decode floor (LM weights / measured copy bandwidth) {floor_ms:.2f} ms/token")
    print(table(results))
    output = args.output or Path(__file__).parent / "results" / f"{args.shape}-{_device_slug(device)}.json"
    output.parent.mkdir(parents=True, exist_ok=True)
    output.write_text(json.dumps(report, indent=2) + "\n")
    print(f"wrote {output}")
    return report


def build_benchmark_model(shape: BenchmarkShape, tokenizer, device: torch.device | str, dtype: torch.dtype):
    """``ergo_vqa.tiny.build_model``'s random-weight model of ``shape``, its config completed with the shape's
    overrides: built on the meta device first (no weights), then made once from the completed config."""
    model = build_model(tokenizer, shape.sizes, device="meta" if shape.text_config or shape.vision_config else device,
                        dtype=dtype, family=shape.family)
    if not (shape.text_config or shape.vision_config):
        return model
    model.config.text_config.update(shape.text_config)
    model.config.vision_config.update(shape.vision_config)
    torch.manual_seed(0)
    with torch.device(device):
        built = type(model)._from_config(model.config, dtype=dtype).eval()
    built.generation_config = model.generation_config
    return built


def _synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _device_slug(device: torch.device) -> str:
    """``cpu``, or the GPU's name in lower case with dashes (``nvidia-h100-80gb-hbm3``)."""
    if device.type != "cuda":
        return device.type
    return re.sub(r"[^a-z0-9]+", "-", torch.cuda.get_device_name(device).lower()).strip("-")


def _machine(device: torch.device) -> str:
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    return f"{platform.processor() or platform.machine()}, {torch.get_num_threads()} threads"


if __name__ == "__main__":
    main()
