"""The smoke recipe on two CPU processes, for ``test_training.py``:
``torchrun --nproc_per_node 2 tests/two_process_smoke.py OUT``.

Two runs of one step, one group of two rollouts split across the processes (one rollout each):
1. ``agree``: process ``r``'s stage 1 asks for ``STAGE1_TEXTS[r]``, so the two rollouts of the group have different
   box rewards; each process writes its rollout's advantage (computed from the rewards of both processes).
2. ``judge_down``: process 0's judge fails every request (as an endpoint that went down after the probe), process 1's
   answers; each process writes where it stopped.
Each process writes ``OUT/<run>-<rank>.json``.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

from accelerate import PartialState
from trl import ModelConfig, TrlParser

from training.config import ErgoGRPOConfig
from training.grpo import ErgoScriptArguments, build_trainer
from training.rewards import RegionReward, RewardModelError
from training.smoke import STAGE1_TEXTS, ScriptedStage1Trainer, smoke_arguments


class SplitGroupTrainer(ScriptedStage1Trainer):
    """Process ``r``'s rollouts say ``STAGE1_TEXTS[r]``; keeps this process's advantages."""

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.stage1_texts = [STAGE1_TEXTS[self.accelerator.process_index % len(STAGE1_TEXTS)]]
        self.advantages: list[float] = []

    def scored_batch(self, rows: list[dict]) -> dict:
        batch = super().scored_batch(rows)
        self.advantages += batch["advantages"].tolist()
        return batch


class DownJudge:
    """A judge every request of which fails (``answer`` returns None, as ``EndpointRewardModel`` does then)."""

    failures = 0

    def answer(self, images: list, questions: list[str]) -> list[None]:
        self.failures += len(images)
        return [None] * len(images)


def trainer(out: Path, run: str, *extra: str) -> SplitGroupTrainer:
    arguments = smoke_arguments(out) + ["--output_dir", str(out / run), "--max_steps", "1", "--save_strategy", "no",
                  "--per_device_train_batch_size", "1", *extra]
    script, args, model_args = TrlParser((ErgoScriptArguments, ErgoGRPOConfig, ModelConfig)).parse_args_and_config(
        args=arguments)
    return build_trainer(script, args, model_args, SplitGroupTrainer)


def main(out: Path) -> None:
    state = PartialState(cpu=True)  # gloo, as `--use_cpu true` sets it up
    rank = state.process_index
    agree = trainer(out, "agree")
    agree.train()
    (out / f"agree-{rank}.json").write_text(json.dumps({
        "advantages": agree.advantages, "processes": agree.accelerator.num_processes, "backend": state.backend}))

    down = trainer(out, "judge_down", "--reward_model_max_failure_share", "0.1", "--reward_model_failure_window", "4")
    region = next(func for func in down.reward_funcs if isinstance(func, RegionReward))
    if rank == 0:
        region.reward_model = DownJudge()
    try:
        down.train()
        stopped = None
    except RewardModelError as error:
        stopped = str(error)
    (out / f"judge_down-{rank}.json").write_text(json.dumps({"stopped": stopped, "step": down.state.global_step}))


if __name__ == "__main__":
    main(Path(sys.argv[1]))
