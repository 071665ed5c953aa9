"""A CPU smoke run of the whole training recipe, offline: ``python -m training.smoke [OUT_DIR] [--zero3]
[--family qwen3_vl|qwen3_5]``; on two processes ``torchrun --nproc_per_node 2 -m training.smoke OUT_DIR``.

It writes a random-weight tiny ERGO model of the family (Qwen2.5-VL by default) and a few synthetic samples
(``ergo_vqa.synthetic_task``) as a JSONL dataset, then runs the shipped recipe through ``training.grpo.main`` with
the model swapped for the tiny one, the tiny model as its own local reward model, and sizes a CPU can take (2 steps).
A random policy never writes a region, so stage 1 is scripted: the rollouts of a group ask for a small and a large
region, their box rewards differ, and every step has non-zero advantages and a gradient. It prints each step's loss and grad norm and fails when no step had a
gradient. It proves the plumbing, backward included, not learning.
"""

from __future__ import annotations

import argparse
import json
from contextlib import contextmanager
from pathlib import Path

from accelerate import PartialState
from transformers import LogitsProcessorList

from ergo_vqa.synthetic_task import SceneSpec, write_split
from ergo_vqa.testing_utils import ScriptedText, zoom_text
from ergo_vqa.tiny import build_model, build_processor, build_tokenizer
from hub_card import save_hub_folder
from modeling_ergo.family_ergo import FAMILIES, QWEN2_5_VL, Family

from .grpo import main
from .rollout import ErgoGRPOTrainer

RECIPE = Path(__file__).parent / "recipes" / "ergo-qwen2.5-vl-7b.yaml"
SMALL_BOX, LARGE_BOX = (4, 4, 40, 30), (0, 0, 1000, 1000)
"""A small region and the whole image in either grounding convention: Qwen2.5-VL's coarse pixels (the large box is
clamped to the coarse view) and the 16-px families' thousandths."""
STAGE1_TEXTS = [zoom_text(SMALL_BOX, "small"), zoom_text(LARGE_BOX, "large")]


class ScriptedStage1Trainer(ErgoGRPOTrainer):
    """ErgoGRPOTrainer whose stage 1 says ``stage1_texts`` (cycled over the batch, so over each group's rollouts);
    stage 2 is sampled."""

    stage1_texts: list[str] = STAGE1_TEXTS

    def generate_stage(self, stage: int, prompt_ids: list[list[int]], pixel_fields: dict) -> list[list[int]]:
        if stage == 2:
            return super().generate_stage(stage, prompt_ids, pixel_fields)
        with saying(self, self.stage1_texts, len(prompt_ids)):
            return super().generate_stage(stage, prompt_ids, pixel_fields)


@contextmanager
def saying(trainer: ErgoGRPOTrainer, texts: list[str], rows: int):
    """Within the block, the policy's ``generate`` makes row ``i`` say ``texts[i % len(texts)]`` and then end."""
    tokenizer = trainer.processing_class.tokenizer
    scripts = [tokenizer(texts[row % len(texts)], add_special_tokens=False)["input_ids"] for row in range(rows)]
    model = trainer.accelerator.unwrap_model(trainer.model)
    generate = model.generate
    model.generate = lambda *args, **kwargs: generate(*args, logits_processor=LogitsProcessorList(
        [ScriptedText(scripts, tokenizer.convert_tokens_to_ids("<|im_end|>"))]), **kwargs)
    try:
        yield
    finally:
        del model.generate


def tiny_model(folder: Path, family: Family = QWEN2_5_VL) -> Path:
    """A random-weight tiny ERGO folder of ``family``, written once."""
    if not (folder / "config.json").is_file():
        tokenizer = build_tokenizer(family=family)
        save_hub_folder(build_model(tokenizer, family=family), build_processor(tokenizer, family=family), folder)
    return folder


def smoke_arguments(out_dir: Path, family: Family = QWEN2_5_VL) -> list[str]:
    # Under torchrun, process 0 writes the model and the data and the others then read them. `cpu=True`: the
    # process group is gloo's, as `--use_cpu true` sets it up.
    with PartialState(cpu=True).main_process_first():
        model = tiny_model(out_dir / "model", family)
        data = write_split(out_dir / "data", "train", 4, spec=SceneSpec(size=448, shape_side=(40, 60), clutter=40))  # CPU-sized crops
    return [
        "--config", str(RECIPE), "--model_name_or_path", str(model), "--dataset", str(data),
        "--reward_model_endpoint", "", "--reward_model", str(model), "--dtype", "float32",
        "--output_dir", str(out_dir / "run"), "--max_steps", "2", "--save_steps", "2", "--use_cpu", "true",
        "--bf16", "false", "--gradient_checkpointing", "false", "--per_device_train_batch_size", "4",
        "--gradient_accumulation_steps", "1",
        "--num_generations", "2", "--max_completion_length", "40", "--stage2_max_completion_length", "8",
        "--coarse_budget", "64", "--report_to", "none", "--use_peft", "true", "--lora_r", "8", "--lora_alpha", "16",
    ]


ZERO3 = {"zero_optimization": {"stage": 3, "stage3_gather_16bit_weights_on_model_save": True},
         "train_micro_batch_size_per_gpu": "auto", "gradient_accumulation_steps": "auto", "train_batch_size": "auto",
         "gradient_clipping": "auto", "bf16": {"enabled": False}}
"""The recipe's ZeRO-3 layout (``training/accelerate/zero3.yaml``) for ``--zero3``, in fp32 for the CPU."""


def run(out_dir: Path, zero3: bool = False, family: Family = QWEN2_5_VL) -> list[dict]:
    """Trains the 2 steps on a tiny model of ``family`` and returns their logged entries (loss, grad_norm, reward,
    ...); SystemExit when no step had a gradient. ``zero3``: under DeepSpeed ZeRO-3 (needs ``deepspeed``; run with
    torchrun)."""
    arguments = smoke_arguments(out_dir, family)
    if zero3:
        import deepspeed

        # transformers skips this under `--use_cpu`, and ZeRO-3 loading needs the process group.
        deepspeed.init_distributed("gloo")
        arguments += ["--deepspeed", json.dumps(ZERO3)]
    folder = main(arguments, trainer_class=ScriptedStage1Trainer)
    state = json.loads((out_dir / "run" / "checkpoint-2" / "trainer_state.json").read_text())
    steps = [entry for entry in state["log_history"] if "grad_norm" in entry]
    if not PartialState().is_main_process:
        return steps
    for entry in steps:
        print(f"step {entry['step']}: loss {entry['loss']:.6f}  grad_norm {entry['grad_norm']:.6f}  "
              f"reward {entry['reward']:.3f}  reward_std {entry['reward_std']:.3f}")
    if not any(entry["grad_norm"] > 0 for entry in steps):
        raise SystemExit("no step had a gradient: the backward through the two-stage completion is broken")
    print(f"trained {len(steps)} steps; ERGO Hub folder: {folder}")
    return steps


if __name__ == "__main__":
    parser = argparse.ArgumentParser(prog="python -m training.smoke", description=__doc__.split("\n\n")[0])
    parser.add_argument("out_dir", nargs="?", default="ergo-train-smoke", type=Path)
    parser.add_argument("--zero3", action="store_true", help="under DeepSpeed ZeRO-3 (needs deepspeed)")
    parser.add_argument("--family", choices=list(FAMILIES), default=QWEN2_5_VL.model_type)
    options = parser.parse_args()
    run(options.out_dir, zero3=options.zero3, family=FAMILIES[options.family])
