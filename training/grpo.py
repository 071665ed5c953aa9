"""Train ERGO with GRPO and the TCE reward, then write (and optionally push) an ERGO Hub folder.

    python -m training.grpo --config training/recipes/ergo-qwen2.5-vl-7b.yaml
    accelerate launch --config_file training/accelerate/zero3.yaml -m training.grpo \
        --config training/recipes/ergo-qwen2.5-vl-7b.yaml

Every field of ``ErgoScriptArguments``, ``ErgoGRPOConfig`` (TRL's ``GRPOConfig`` plus ERGO's rollout settings) and
TRL's ``ModelConfig`` is a command-line flag and a YAML key; flags win over the recipe.
"""

from __future__ import annotations

import importlib.util
import logging
from dataclasses import dataclass, field
from pathlib import Path

import torch
from accelerate import PartialState
from huggingface_hub import HfApi, constants
from peft import PeftModel
from transformers.integrations.deepspeed import unset_hf_deepspeed_config
from trl import ModelConfig, TrlParser, get_peft_config, get_quantization_config

from ergo_vqa.inference import ergo_class
from hub_card import push_folder, save_hub_folder
from processing_ergo import ErgoProcessor

from .data import MULTIPLE_CHOICE_POSTFIX, load_training_data, to_grpo_rows
from .reward_model import EndpointRewardModel, LocalRewardModel, probe_reward_model
from .rewards import (BOX_AREA_THRESHOLD, RM_FAILURE_WINDOW, RM_MAX_FAILURE_SHARE, RM_MAX_UNREADABLE_SHARE,
                      accuracy_reward, format_reward, get_box_reward, get_region_reward)
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
    reward_model_max_unreadable_share: float = field(default=RM_MAX_UNREADABLE_SHARE, metadata={
        "help": "Training stops once more than this share of the last --reward_model_failure_window RM replies could "
                "not be read (training/judge.py says how replies are read)."})
    reward_model_timeout: float = field(default=60.0, metadata={"help": "Seconds per RM endpoint request attempt."})
    reward_model_retries: int = field(default=2, metadata={
        "help": "Further attempts after a failed RM endpoint request (connection errors, timeouts, 408/409/429/5xx)."})
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
    """Dataset, processor, policy, rewards and trainer from the three argument groups. Settings that would be
    ignored are refused and the reward model answers one probe request, all before the policy loads."""
    if args.reward_weights is not None:
        raise ValueError("--reward_weights is not used: the weights are --accuracy_weight, --format_weight, "
                         "--box_weight and --region_weight (α), in that order")
    init_kwargs = model_init_kwargs(model_args, args)
    reward_model = _reward_model(script)
    if reward_model is not None:
        probe_reward_model(reward_model)
    processor = ErgoProcessor.from_pretrained(model_args.model_name_or_path, revision=init_kwargs["revision"],
                                              padding_side="left")  # budgets: args
    args.model_init_kwargs = init_kwargs  # TRL builds the frozen reference model (beta > 0) from these
    model = ergo_class(model_args.model_name_or_path, init_kwargs["revision"]).from_pretrained(
        model_args.model_name_or_path, **{**init_kwargs, "dtype": weights_dtype(init_kwargs["dtype"], model_args, args)})
    dataset = to_grpo_rows(load_training_data(script.dataset, script.dataset_split), script.multiple_choice_postfix)

    reward_funcs = [accuracy_reward, format_reward, get_box_reward(script.box_threshold)]
    args.reward_weights = [script.accuracy_weight, script.format_weight, script.box_weight]
    if reward_model is not None:
        reward_funcs.append(get_region_reward(reward_model, script.reward_model_max_failure_share,
                                              script.reward_model_failure_window,
                                              script.reward_model_max_unreadable_share))
        args.reward_weights.append(script.region_weight)
    else:
        logger.warning("--no_region_reward: r_region is left out of the reward")
    return trainer_class(model=model, reward_funcs=reward_funcs, args=args, train_dataset=dataset,
                         processing_class=processor, peft_config=get_peft_config(model_args))


def model_init_kwargs(model_args: ModelConfig, args: ErgoGRPOConfig) -> dict:
    """What the policy, its processor (``revision``) and TRL's reference model are loaded with, as TRL's own
    ``trl/scripts/grpo.py`` builds it: ``--model_revision``, ``--trust_remote_code``, ``--attn_implementation`` and
    ``--dtype``, updated by ``--model_init_kwargs`` (which wins, as there), plus the quantization of
    ``--load_in_4bit`` / ``--load_in_8bit`` (QLoRA). Quantization without bitsandbytes or without LoRA, and
    quantization settings without quantization, are refused by name: TRL would ignore them silently."""
    if not model_args.model_name_or_path:
        raise ValueError("--model_name_or_path is required (a Qwen2.5-VL, Qwen3-VL, Qwen3.5 or ERGO folder or Hub id)")
    kwargs = {"revision": model_args.model_revision, "trust_remote_code": args.trust_remote_code,
              "attn_implementation": model_args.attn_implementation, "dtype": model_args.dtype,
              **(args.model_init_kwargs or {})}
    flag = "--load_in_4bit" if model_args.load_in_4bit else "--load_in_8bit" if model_args.load_in_8bit else None
    if flag is None:
        four_bit = {"bnb_4bit_quant_type": "nf4", "use_bnb_nested_quant": False, "bnb_4bit_quant_storage": None}
        ignored = [f"--{name}" for name, default in four_bit.items() if getattr(model_args, name) != default]
        if ignored:
            raise ValueError(f"{', '.join(ignored)} only act with --load_in_4bit true (QLoRA); pass it or drop them")
        return kwargs
    if importlib.util.find_spec("bitsandbytes") is None:
        raise ValueError(f"{flag} true (QLoRA) needs bitsandbytes, which is not installed: `pip install bitsandbytes` "
                         f"on a CUDA machine, or drop {flag}")
    if not model_args.use_peft:
        raise ValueError(f"{flag} true needs --use_peft true: a quantized model trains through LoRA adapters only")
    # A quantized model cannot be moved after loading: each process loads it onto its own device.
    return {**kwargs, "quantization_config": get_quantization_config(model_args),
            "device_map": {"": PartialState().local_process_index}}


def weights_dtype(requested: str | torch.dtype | None, model_args: ModelConfig,
                  args: ErgoGRPOConfig) -> torch.dtype | str | None:
    """The ``requested`` dtype, except for full fine-tuning outside DeepSpeed: fp32. Updates of a bf16 weight smaller
    than its precision round away (two steps at lr 1e-6 changed under 1% of the weights), and only DeepSpeed keeps
    fp32 master weights for the optimizer; ``bf16``/``fp16`` then autocast the compute. LoRA trains fp32 adapters
    over the frozen base, which keeps the requested dtype."""
    dtype = requested if requested in (None, "auto") or isinstance(requested, torch.dtype) else getattr(torch, requested)
    if model_args.use_peft or args.deepspeed_plugin is not None or dtype == torch.float32:
        return dtype
    logger.warning("full fine-tuning without DeepSpeed: the policy is loaded in float32, not %s (with bf16/fp16 "
                   "autocast); use DeepSpeed (training/accelerate/zero3.yaml) or LoRA to hold it in %s", dtype, dtype)
    return torch.float32


def export(checkpoint: str | Path, base_model: str, processor: ErgoProcessor, folder: Path,
           revision: str = "main") -> Path:
    """The trained policy as an ERGO Hub folder, read back from what ``trainer.save_model`` wrote (which gathers
    ZeRO-3 shards); LoRA adapters are merged into the base weights (``base_model`` at ``revision``)."""
    checkpoint = Path(checkpoint)
    if (checkpoint / "adapter_config.json").is_file():
        base = ergo_class(base_model, revision).from_pretrained(base_model, revision=revision, dtype="auto")
        model = PeftModel.from_pretrained(base, checkpoint).merge_and_unload()
    else:
        model = ergo_class(checkpoint).from_pretrained(checkpoint, dtype="auto")
    save_hub_folder(model, processor, folder, base_model=base_model)
    return folder


def main(argv: list[str] | None = None, trainer_class: type[ErgoGRPOTrainer] = ErgoGRPOTrainer) -> Path:
    parser = TrlParser((ErgoScriptArguments, ErgoGRPOConfig, ModelConfig))
    script, args, model_args = parser.parse_args_and_config(args=argv)
    push, args.push_to_hub = args.push_to_hub, False  # the Hub gets the ERGO folder below, not raw checkpoints
    repo_id = check_hub_target(args.hub_model_id or Path(args.output_dir).name, args) if push else None
    trainer = build_trainer(script, args, model_args, trainer_class)
    trainer.train(resume_from_checkpoint=args.resume_from_checkpoint)
    trainer.save_model(args.output_dir)  # for LoRA: the adapter, loadable with peft
    folder = Path(script.export_dir or Path(args.output_dir) / "ergo")
    trainer.accelerator.wait_for_everyone()
    unset_hf_deepspeed_config()  # the export below loads on one process; ZeRO-3 loading would wait for the others
    if trainer.accelerator.is_main_process:
        export(args.output_dir, model_args.model_name_or_path, trainer.processing_class, folder,
               revision=args.model_init_kwargs["revision"])
        if repo_id is not None:
            push_folder(folder, repo_id, private=args.hub_private_repo, token=args.hub_token)
    return folder


def check_hub_target(repo_id: str, args: ErgoGRPOConfig) -> str:
    """The repository ``--push_to_hub`` pushes the ERGO folder to at the end, checked before anything loads (as TRL's
    own ``push_to_hub`` does at start): refused offline; created (or found) now with ``--hub_token``, so a missing
    token or permission fails in seconds, not after training."""
    if constants.HF_HUB_OFFLINE:
        raise ValueError("--push_to_hub true, but HF_HUB_OFFLINE is set, so the folder could not be pushed after "
                         "training: unset HF_HUB_OFFLINE or pass --push_to_hub false")
    if PartialState().is_main_process:
        try:
            HfApi(token=args.hub_token).create_repo(repo_id, private=args.hub_private_repo, exist_ok=True)
        except Exception as error:
            raise ValueError(f"--push_to_hub true: cannot create or reach the Hub repository {repo_id!r} "
                             f"(--hub_model_id): {error}") from error
    return repo_id


def _reward_model(script: ErgoScriptArguments):
    if script.reward_model_endpoint and script.reward_model:
        raise ValueError("give either --reward_model (local) or --reward_model_endpoint (served), not both; "
                         "pass --reward_model_endpoint '' to drop the recipe's endpoint")
    if bool(script.reward_model_endpoint or script.reward_model) == script.no_region_reward:
        raise ValueError("r_region needs a reward model: give --reward_model (local) or --reward_model_endpoint "
                         "(served), or pass --no_region_reward true to train without r_region (not with a reward "
                         "model: pass --reward_model_endpoint '' to drop the recipe's endpoint)")
    if script.reward_model_endpoint:
        return EndpointRewardModel(script.reward_model_endpoint, script.reward_model_name,
                                   timeout=script.reward_model_timeout, retries=script.reward_model_retries)
    if script.reward_model:
        return LocalRewardModel(script.reward_model, device=script.reward_model_device,
                                batch_size=script.reward_model_batch_size)
    return None


if __name__ == "__main__":
    main()
