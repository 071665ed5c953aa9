"""A CPU smoke run of the whole training recipe, offline: ``python -m training.smoke [OUT_DIR]``.

It writes a random-weight tiny ERGO model and a few synthetic samples (``ergo_vqa.synthetic_task``) as a JSONL dataset, then
runs the shipped recipe through ``training.grpo.main`` with the model swapped for the tiny one, the tiny model
as its own local reward model, and sizes a CPU can take (2 steps). It proves the plumbing, not learning.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

from ergo_vqa.synthetic_task import write_split
from ergo_vqa.tiny import build_model, build_processor, build_tokenizer
from hub_card import save_hub_folder

from .grpo import main

RECIPE = Path(__file__).parent / "recipes" / "ergo-qwen2.5-vl-7b.yaml"


def tiny_model(folder: Path) -> Path:
    """A random-weight tiny ERGO folder, written once."""
    if not (folder / "config.json").is_file():
        tokenizer = build_tokenizer()
        save_hub_folder(build_model(tokenizer), build_processor(tokenizer), folder)
    return folder


def smoke_arguments(out_dir: Path) -> list[str]:
    model = tiny_model(out_dir / "model")
    data = write_split(out_dir / "data", "train", 4)
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
