"""A CPU smoke run of the whole training recipe, offline: ``python -m training.smoke [OUT_DIR]``.

It writes a random-weight tiny ERGO model and a few generated scenes (``ergo_vqa.demo``) as a JSONL dataset, then
runs the shipped recipe through ``training.grpo.main`` with the model swapped for the tiny one, the tiny model
as its own local reward model, and sizes a CPU can take (2 steps). It proves the plumbing, not learning.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

from ergo_vqa.demo import ensure_model, generate_scene

from .grpo import main

RECIPE = Path(__file__).parent / "recipes" / "ergo-qwen2.5-vl-7b.yaml"


def write_dataset(folder: Path, count: int = 4) -> Path:
    """``count`` generated scenes (one small lettered square each) in the training schema."""
    folder.mkdir(parents=True, exist_ok=True)
    lines = []
    for seed in range(count):
        scene = generate_scene(seed, size=(1344, 896))
        scene.image.save(folder / f"scene-{seed}.png")
        stem, *options = scene.question.split("\n")
        lines.append({"image": f"scene-{seed}.png", "question": stem, "options": options, "answer": scene.answer})
    path = folder / "train.jsonl"
    path.write_text("\n".join(json.dumps(line) for line in lines) + "\n")
    return path


def smoke_arguments(out_dir: Path) -> list[str]:
    model = ensure_model(out_dir / "model")
    data = write_dataset(out_dir / "data")
    return [
        "--config", str(RECIPE), "--model_name_or_path", str(model), "--dataset", str(data),
        "--reward_model_endpoint", "", "--reward_model", str(model), "--dtype", "float32",
        "--output_dir", str(out_dir / "run"), "--max_steps", "2", "--save_steps", "2", "--use_cpu", "true",
        "--bf16", "false", "--gradient_checkpointing", "false", "--per_device_train_batch_size", "4",
        "--num_generations", "2", "--max_completion_length", "24", "--stage2_max_completion_length", "8",
        "--coarse_budget", "64", "--report_to", "none", "--use_peft", "true", "--lora_r", "8", "--lora_alpha", "16",
    ]


if __name__ == "__main__":
    out = Path(sys.argv[1] if len(sys.argv) > 1 else "ergo-train-smoke")
    folder = main(smoke_arguments(out))
    print(f"trained 2 steps; ERGO Hub folder: {folder}")
