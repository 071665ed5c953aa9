"""Train ERGO with GRPO and the TCE reward, then write (and optionally push) an ERGO Hub folder.

    python -m training.grpo --config training/recipes/ergo-qwen2.5-vl-7b.yaml
    accelerate launch --config_file training/accelerate/zero3.yaml -m training.grpo \
        --config training/recipes/ergo-qwen2.5-vl-7b.yaml

Every field of ``ErgoScriptArguments``, ``ErgoGRPOConfig`` (TRL's ``GRPOConfig`` plus ERGO's rollout settings) and
TRL's ``ModelConfig`` is a command-line flag and a YAML key; flags win over the recipe.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from pathlib import Path

import torch
from peft import PeftModel
from transformers.integrations.deepspeed import unset_hf_deepspeed_config
from trl import ModelConfig, TrlParser, get_peft_config

from hub_card import push_folder, save_hub_folder
from modeling_ergo import ErgoForConditionalGeneration
from processing_ergo import ErgoProcessor

from .data import MULTIPLE_CHOICE_POSTFIX, load_training_data, to_grpo_rows
from .reward_model import EndpointRewardModel, LocalRewardModel
from .rewards import (BOX_AREA_THRESHOLD, RM_FAILURE_WINDOW, RM_MAX_FAILURE_SHARE, accuracy_reward, format_reward,
                      get_box_reward, get_region_reward)
from .config import ErgoGRPOConfig
from .rollout import ErgoGRPOTrainer

logger = logging.getLogger(__name__)


@dataclass
class ErgoScriptArguments:
    dataset: str = field(metadata={"help": "Hub id, save_to_disk folder, or .jsonl/.parquet file (see training/data.py)."})
    dataset_split: str = field(default="train")
    multiple_choice_postfix: str = field(default=MULTIPLE_CHOICE_POSTFIX)
    reward_model: str | None = field(default=None, metadata={"help": "Local RM: a Qwen2.5-VL folder or Hub id."})
    reward_model_endpoint: str | None = field(
        default=None, metadata={"help": "OpenAI-compatible base URL of a served RM, e.g. http://rm:8000/v1."})
    reward_model_name: str = field(default="Qwen/Qwen2.5-VL-72B-Instruct", metadata={"help": "Model name at the endpoint."})
    reward_model_device: str | None = field(default=None, metadata={"help": "Default: this process's device."})
    reward_model_batch_size: int = field(default=8)
    reward_model_max_failure_share: float = field(default=RM_MAX_FAILURE_SHARE, metadata={
        "help": "Training stops once more than this share of the last --reward_model_failure_window RM requests failed."})
    reward_model_failure_window: int = field(default=RM_FAILURE_WINDOW, metadata={"help": "RM requests the share is over."})
    no_region_reward: bool = field(default=False, metadata={
        "help": "Train without r_region (no reward model). Needed to run without one, so a missing RM is a choice."})
    region_weight: float = field(default=1.0, metadata={"help": "α in r_TCE = α·r_region + β·r_box."})
    box_weight: float = field(default=0.5, metadata={"help": "β in r_TCE."})
    box_threshold: float = field(default=BOX_AREA_THRESHOLD, metadata={"help": "γ: largest region share earning r_box."})
    accuracy_weight: float = field(default=1.0)
    format_weight: float = field(default=1.0)
    export_dir: str | None = field(default=None, metadata={"help": "ERGO Hub folder to write (default: <output_dir>/ergo)."})


def build_trainer(script: ErgoScriptArguments, args: ErgoGRPOConfig, model_args: ModelConfig,
                  trainer_class: type[ErgoGRPOTrainer] = ErgoGRPOTrainer) -> ErgoGRPOTrainer:
    """Dataset, processor, policy, rewards and trainer from the three argument groups."""
    reward_model = _reward_model(script)
    processor = ErgoProcessor.from_pretrained(model_args.model_name_or_path, padding_side="left")  # budgets: args
    dtype = weights_dtype(model_args, args)
    if dtype == torch.float32 and model_args.dtype not in (None, "auto", "float32"):
        # TRL builds the frozen reference model (beta > 0) from these; it needs no fp32 master weights.
        args.model_init_kwargs = {**(args.model_init_kwargs or {}), "dtype": getattr(torch, model_args.dtype)}
    model = ErgoForConditionalGeneration.from_pretrained(
        model_args.model_name_or_path, dtype=dtype, attn_implementation=model_args.attn_implementation)
    dataset = to_grpo_rows(load_training_data(script.dataset, script.dataset_split), script.multiple_choice_postfix)

    reward_funcs = [accuracy_reward, format_reward, get_box_reward(script.box_threshold)]
    args.reward_weights = [script.accuracy_weight, script.format_weight, script.box_weight]
    if reward_model is not None:
        reward_funcs.append(get_region_reward(reward_model, script.reward_model_max_failure_share,
                                              script.reward_model_failure_window))
        args.reward_weights.append(script.region_weight)
    else:
        logger.warning("--no_region_reward: r_region is left out of the reward")
    return trainer_class(model=model, reward_funcs=reward_funcs, args=args, train_dataset=dataset,
                         processing_class=processor, peft_config=get_peft_config(model_args))


def weights_dtype(model_args: ModelConfig, args: ErgoGRPOConfig) -> torch.dtype | str | None:
    """``model_args.dtype``, except for full fine-tuning outside DeepSpeed: fp32. Updates of a bf16 weight smaller
    than its precision round away (two steps at lr 1e-6 changed under 1% of the weights), and only DeepSpeed keeps
    fp32 master weights for the optimizer; ``bf16``/``fp16`` then autocast the compute. LoRA trains fp32 adapters
    over the frozen base, which keeps the requested dtype."""
    dtype = model_args.dtype if model_args.dtype in (None, "auto") else getattr(torch, model_args.dtype)
    if model_args.use_peft or args.deepspeed_plugin is not None or dtype == torch.float32:
        return dtype
    logger.warning("full fine-tuning without DeepSpeed: the policy is loaded in float32, not %s (with bf16/fp16 "
                   "autocast); use DeepSpeed (training/accelerate/zero3.yaml) or LoRA to hold it in %s", dtype, dtype)
    return torch.float32


def export(checkpoint: str | Path, base_model: str, processor: ErgoProcessor, folder: Path) -> Path:
    """The trained policy as an ERGO Hub folder, read back from what ``trainer.save_model`` wrote (which gathers
    ZeRO-3 shards); LoRA adapters are merged into the base weights."""
    checkpoint = Path(checkpoint)
    if (checkpoint / "adapter_config.json").is_file():
        base = ErgoForConditionalGeneration.from_pretrained(base_model, dtype="auto")
        model = PeftModel.from_pretrained(base, checkpoint).merge_and_unload()
    else:
        model = ErgoForConditionalGeneration.from_pretrained(checkpoint, dtype="auto")
    save_hub_folder(model, processor, folder, base_model=base_model)
    return folder


def main(argv: list[str] | None = None, trainer_class: type[ErgoGRPOTrainer] = ErgoGRPOTrainer) -> Path:
    parser = TrlParser((ErgoScriptArguments, ErgoGRPOConfig, ModelConfig))
    script, args, model_args = parser.parse_args_and_config(args=argv)
    push, args.push_to_hub = args.push_to_hub, False  # the Hub gets the ERGO folder below, not raw checkpoints
    trainer = build_trainer(script, args, model_args, trainer_class)
    trainer.train(resume_from_checkpoint=args.resume_from_checkpoint)
    trainer.save_model(args.output_dir)  # for LoRA: the adapter, loadable with peft
    folder = Path(script.export_dir or Path(args.output_dir) / "ergo")
    trainer.accelerator.wait_for_everyone()
    unset_hf_deepspeed_config()  # the export below loads on one process; ZeRO-3 loading would wait for the others
    if trainer.accelerator.is_main_process:
        export(args.output_dir, model_args.model_name_or_path, trainer.processing_class, folder)
        if push:
            push_folder(folder, args.hub_model_id or Path(args.output_dir).name, private=args.hub_private_repo)
    return folder


def _reward_model(script: ErgoScriptArguments):
    if script.reward_model_endpoint and script.reward_model:
        raise ValueError("give either --reward_model (local) or --reward_model_endpoint (served), not both; "
                         "pass --reward_model_endpoint '' to drop the recipe's endpoint")
    if bool(script.reward_model_endpoint or script.reward_model) == script.no_region_reward:
        raise ValueError("r_region needs a reward model: give --reward_model (local) or --reward_model_endpoint "
                         "(served), or pass --no_region_reward true to train without r_region (not with a reward "
                         "model: pass --reward_model_endpoint '' to drop the recipe's endpoint)")
    if script.reward_model_endpoint:
        return EndpointRewardModel(script.reward_model_endpoint, script.reward_model_name)
    if script.reward_model:
        return LocalRewardModel(script.reward_model, device=script.reward_model_device,
                                batch_size=script.reward_model_batch_size)
    return None


if __name__ == "__main__":
    main()
