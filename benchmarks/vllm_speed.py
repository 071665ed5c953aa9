"""ERGO against one full-resolution pass on the same vLLM engine, as ratios measured in one run.

    # CPU (this project's machines): the vLLM venv from `make vllm-env`, the shipped demo model
    .venv-vllm/bin/python benchmarks/vllm_speed.py --output benchmarks/results/vllm-demo-cpu.json
    # GPU: a venv with `pip install vllm` and this package; a real ERGO folder
    python benchmarks/vllm_speed.py --model path/to/ergo-7b --sizes 2246x1582,7680x4320 --engine-args '{}'

One in-process ``vllm.LLM`` (prefix caching on, as vLLM's default) runs three modes on the same questions:
``ergo`` (``ErgoVLLM``: every stage 1 in one batch, then every stage 2 in one batch), ``full`` (one pass over the
whole image; the engine's own pixel limit applies, 16384 tokens for Qwen2.5-VL) and ``coarse`` (one pass over the
coarse view). The questions are the synthetic task's (``ergo_vqa.synthetic_task``), its scenes resized to each
``--sizes``. Each mode runs once untimed, then ``--repeats`` times, every run on new images (as a server meets
them: no request finds its image in the prefix cache, but ERGO's stage 2 finds stage 1's); the median wall time of
the whole batch is reported, with the vision tokens, prompt and generated tokens, and the prompt tokens served from
the prefix cache. The model writes its own replies (greedy), so modes may generate different lengths: the generated
tokens are shown beside the times.
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import time
from datetime import datetime, timezone
from pathlib import Path

from ergo_vqa.demo import DEMO_MODEL
from ergo_vqa.synthetic_task import generate_sample
from ergo_vqa.vllm_runner import ErgoVLLM
from processing_ergo.prompts_ergo import MULTIPLE_CHOICE_POSTFIX

CPU_ENGINE_ARGS = {"dtype": "float32", "enforce_eager": True, "max_model_len": 8192}


def questions(count: int, size: tuple[int, int], round_: str) -> list[tuple]:
    """``count`` new questions per round, so no request finds another's image in the prefix cache."""
    samples = [generate_sample(f"vllm-speed-{size}-{round_}-{index}") for index in range(count)]
    return [(s.image.resize(size), "\n".join([s.question, *s.options, MULTIPLE_CHOICE_POSTFIX])) for s in samples]


def run_mode(engine: ErgoVLLM, mode: str, batch: list[tuple], max_tokens: int) -> list:
    if mode == "ergo":
        return engine.answer_many(batch, max_tokens=max_tokens)
    images, texts = zip(*batch)
    budget = engine.processor.coarse_budget if mode == "coarse" else None
    return engine.single_pass_many(list(images), list(texts), budget=budget, max_tokens=max_tokens)


def measure(engine: ErgoVLLM, mode: str, rounds: list[list[tuple]], max_tokens: int) -> dict:
    """The first round untimed (the engine's first batch of a shape pays for allocations), then one timed run per
    further round, each on new images."""
    walls = []
    for index, batch in enumerate(rounds):
        started = time.perf_counter()
        results = run_mode(engine, mode, batch, max_tokens)
        if index:
            walls.append(time.perf_counter() - started)
        failures = [result.error for result in results if result.error]
        if failures:
            raise RuntimeError(f"{mode}: {failures[0]}")

    def mean(field: str, stage: str = "total") -> float:
        return statistics.mean(getattr(result, field)[stage] for result in results)

    return {"mode": mode, "batch": len(rounds[0]), "wall_s": statistics.median(walls), "walls_s": walls,
            "vision_tokens": mean("vision_tokens"), "prompt_tokens": mean("prompt_tokens"),
            "generated_tokens": mean("completion_tokens"), "cached_prompt_tokens": mean("cached_prompt_tokens"),
            "cached_stage2_share": (mean("cached_prompt_tokens", "stage2") / mean("prompt_tokens", "stage2")
                                    if mode == "ergo" and mean("prompt_tokens", "stage2") else None)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", default=str(DEMO_MODEL), help="an ERGO folder (default: the shipped demo model)")
    parser.add_argument("--sizes", default="1344x1344,2240x2240", help="image sizes, WxH, comma-separated")
    parser.add_argument("--batch", type=int, default=8, help="questions per batch")
    parser.add_argument("--max-tokens", type=int, default=64, help="per stage and per single pass")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--engine-args", type=json.loads, default=CPU_ENGINE_ARGS,
                        help=f"vllm.LLM arguments as JSON (default, for CPUs: {json.dumps(CPU_ENGINE_ARGS)})")
    parser.add_argument("--machine", default=f"{platform.machine()}, {platform.processor() or 'cpu'}",
                        help="what to record as the machine")
    parser.add_argument("--output", help="write the results as JSON here")
    args = parser.parse_args()

    import vllm

    started = time.perf_counter()
    engine = ErgoVLLM(args.model, max_tokens=args.max_tokens, engine_args=args.engine_args)
    load_s = time.perf_counter() - started
    rows = []
    print(f"{'size':>10} {'mode':>7} {'batch':>5} {'wall s':>8} {'vs full':>8} {'vision tok':>10} "
          f"{'generated':>9} {'cached':>7}")
    for size in args.sizes.split(","):
        width, height = (int(side) for side in size.split("x"))
        measured = {mode: measure(engine, mode, [questions(args.batch, (width, height), f"{mode}-{round_}")
                                                 for round_ in range(args.repeats + 1)], args.max_tokens)
                    for mode in ("full", "ergo", "coarse")}
        for mode, row in measured.items():
            row |= {"size": size, "time_vs_full": row["wall_s"] / measured["full"]["wall_s"],
                    "vision_tokens_vs_full": row["vision_tokens"] / measured["full"]["vision_tokens"]}
            rows.append(row)
            print(f"{size:>10} {mode:>7} {row['batch']:>5} {row['wall_s']:>8.3f} {row['time_vs_full']:>7.2f}x "
                  f"{row['vision_tokens']:>10.0f} {row['generated_tokens']:>9.1f} {row['cached_prompt_tokens']:>7.0f}")
    report = {"date": datetime.now(timezone.utc).strftime("%Y-%m-%d"), "machine": args.machine,
              "vllm": vllm.__version__, "model": args.model, "engine_args": args.engine_args,
              "max_tokens": args.max_tokens, "repeats": args.repeats, "load_s": load_s, "results": rows}
    if args.output:
        Path(args.output).write_text(json.dumps(report, indent=2) + "\n")
        print(f"written to {args.output}")


if __name__ == "__main__":  # vLLM starts its engine in another process, which imports this module again
    main()
