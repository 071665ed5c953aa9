"""GRPO with ERGO's two-stage rollout on a tiny model: real TRL trainer, real processor, CPU."""

from __future__ import annotations

import json
import os
import pickle
import shutil
from pathlib import Path

import pytest
import torch
from transformers import AutoModelForImageTextToText, LogitsProcessorList
from trl import ModelConfig, TrlParser

from conftest import noise_image
from ergo_vqa.testing_utils import ScriptedText, zoom_text
from modeling_ergo import FAMILIES, ErgoForConditionalGeneration
from processing_ergo import ErgoProcessor
from processing_ergo.geometry_ergo import budget_to_pixels, resize_to_budget
from processing_ergo.prompts_ergo import stage2_prompt
from training.data import to_grpo_rows
from training.grpo import ErgoScriptArguments, build_trainer, export, main
from training.reward_model import LocalRewardModel
from training.rewards import accuracy_reward, format_reward, get_box_reward, get_region_reward
from training.config import ErgoGRPOConfig
from training.rollout import ErgoGRPOTrainer
from training.smoke import SMALL_BOX, STAGE1_TEXTS, ScriptedStage1Trainer, saying  # per rollout of a group: r_box differs


def rows(count: int = 2) -> list[dict]:
    return [
        {"image": noise_image(840 + 56 * index, 560, 30 + index), "question": f"What is on sign {index}?",
         "options": ["(A) a cat", "(B) a dog"], "answer": "A", "gt_bbox": [10, 10, 100, 100]}
        for index in range(count)
    ]


def grpo_config(tmp_path, **overrides) -> ErgoGRPOConfig:
    settings = dict(
        output_dir=str(tmp_path / "run"), use_cpu=True, bf16=False, per_device_train_batch_size=4, num_generations=2,
        max_completion_length=40, stage2_max_completion_length=5, max_steps=2, logging_steps=1,
        save_strategy="no", report_to="none", learning_rate=5e-2, beta=0.0, gradient_checkpointing=False,
        seed=0, coarse_budget=64,
    )
    return ErgoGRPOConfig(**{**settings, **overrides})


@pytest.fixture
def policy(tiny_folder):
    model = ErgoForConditionalGeneration.from_pretrained(tiny_folder, dtype=torch.float32)
    return model, ErgoProcessor.from_pretrained(tiny_folder, padding_side="left")


class ScriptedTrainer(ScriptedStage1Trainer):
    """The random policy's stage 1 says ``STAGE1_TEXTS`` (cycled over the batch); stage 2 is sampled freely, or says
    ``stage2_texts`` when set. Keeps what each generation step handed to the loss, to inspect it."""

    stage2_texts: list[str] | None = None

    def generate_stage(self, stage: int, prompt_ids: list[list[int]], pixel_fields: dict) -> list[list[int]]:
        if stage == 2 and self.stage2_texts:
            with saying(self, self.stage2_texts, len(prompt_ids)):
                return super().generate_stage(stage, prompt_ids, pixel_fields)
        return super().generate_stage(stage, prompt_ids, pixel_fields)

    def scored_batch(self, rows: list[dict]) -> dict:
        output = super().scored_batch(rows)
        self.recorded = getattr(self, "recorded", []) + [output]
        return output


def recording_rewards(seen: list):
    def box_and_record(completions, **kwargs):
        seen.append(kwargs)
        return get_box_reward()(completions, **kwargs)

    return [accuracy_reward, format_reward, box_and_record]


def test_grpo_steps_train_both_turns_with_the_crop_in_the_loss_forward(policy, tmp_path):
    model, processor = policy
    seen, loss_forwards = [], []
    hook = model.register_forward_pre_hook(
        lambda module, args, kwargs: loss_forwards.append(kwargs) if torch.is_grad_enabled() else None,
        with_kwargs=True)
    before = {name: p.detach().clone() for name, p in model.named_parameters()}
    trainer = ScriptedTrainer(model=model, reward_funcs=recording_rewards(seen), args=grpo_config(tmp_path),
                               train_dataset=to_grpo_rows(_dataset()), processing_class=processor)
    trainer.train()
    hook.remove()

    changed = [name for name, p in model.named_parameters() if not torch.equal(before[name], p.detach())]
    assert len(changed) > len(before) // 2
    rewards = seen[0]
    assert rewards["stage1_text"] == STAGE1_TEXTS * 2 and all(region is not None for region in rewards["region"])
    assert get_box_reward()([None] * 4, **rewards) == [1.0, 0.0, 1.0, 0.0]

    # The loss forward sees both images of every rollout: the coarse view and the crop, each at its own size
    # (TRL may reorder the rollouts, so they are compared as a set).
    crops = rewards["crop"]
    views = _coarse_views(rewards)
    expected = [_image_rows(processor, [view, crop]) for view, crop in zip(views, crops)]
    forward = loss_forwards[0]
    grids, pixels = forward["image_grid_thw"], forward["pixel_values"]
    sizes = grids.prod(dim=-1).tolist()
    starts = [sum(sizes[:index]) for index in range(len(sizes))]
    seen_pairs = [(grids[i:i + 2].tolist(), pixels[starts[i]: starts[i] + sizes[i] + sizes[i + 1]])
                  for i in range(0, len(sizes), 2)]
    assert len(seen_pairs) == len(expected) == 4
    for grid, rows_ in expected:
        assert any(grid == seen_grid and torch.equal(rows_, seen_rows) for seen_grid, seen_rows in seen_pairs)

    # Both assistant turns are trained; the injected user turn (crop and stage-2 prompt) is masked.
    batch = trainer.recorded[0]
    tokenizer = processor.tokenizer
    for row in range(4):
        ids = batch["completion_ids"][row][batch["completion_mask"][row].bool()].tolist()
        mask = batch["tool_mask"][row][: len(ids)].tolist()
        masked = [token for token, keep in zip(ids, mask) if not keep]
        stage2_question = rewards["stage2_question"][row]
        crop_tokens = crops[row].width * crops[row].height // 28**2
        assert tokenizer.decode(masked) == (
            "\n<|im_start|>user\n<|vision_start|>" + "<|image_pad|>" * crop_tokens + "<|vision_end|>"
            + stage2_prompt(stage2_question) + "<|im_end|>\n<|im_start|>assistant\n")
        trained = tokenizer.decode([token for token, keep in zip(ids, mask) if keep])
        assert trained.startswith(STAGE1_TEXTS[row % 2] + "<|im_end|>")


def test_rollout_matches_inference_token_for_token(policy, tiny_folder, tmp_path):
    """The stage-2 context the policy is trained on is the one ``generate`` builds at inference."""
    model, processor = policy
    trainer = ScriptedTrainer(model=model, reward_funcs=[accuracy_reward], train_dataset=to_grpo_rows(_dataset()),
                               args=grpo_config(tmp_path, max_steps=1), processing_class=processor)
    trainer.train()
    batch = trainer.recorded[0]
    prompt = batch["prompt_ids"][0][batch["prompt_mask"][0].bool()].tolist()
    completion = batch["completion_ids"][0][batch["completion_mask"][0].bool()].tolist()
    mask = batch["tool_mask"][0][: len(completion)].tolist()
    end_of_injected_turn = len(mask) - mask[::-1].index(0)
    rollout_context = prompt + completion[:end_of_injected_turn]

    inference = ErgoForConditionalGeneration.from_pretrained(tiny_folder, dtype=torch.float32)
    inference.config.reuse_stage1_cache = False
    image = _dataset()[0]["image"]
    grpo_row = to_grpo_rows(_dataset())[0]
    inputs = ErgoProcessor.from_pretrained(tiny_folder, coarse_budget=64).prepare(
        [image], [grpo_row["question"]], options=[grpo_row["options"]],
        postfixes=["Answer with the option's letter from the given choices directly."])
    seen = []
    hook = inference.register_forward_pre_hook(
        lambda module, args, kwargs: seen.append(kwargs["input_ids"][0].tolist()), with_kwargs=True)
    tokenizer = processor.tokenizer
    inference.generate(**inputs, max_new_tokens=2, stage1_generate_kwargs={
        "logits_processor": LogitsProcessorList([ScriptedText(
            [tokenizer(STAGE1_TEXTS[0], add_special_tokens=False)["input_ids"]], tokenizer.convert_tokens_to_ids("<|im_end|>"))]),
        "max_new_tokens": 40})
    hook.remove()
    vision_start = tokenizer.convert_tokens_to_ids("<|vision_start|>")
    stage2_prefill = next(ids for ids in seen if ids.count(vision_start) == 2)
    assert stage2_prefill == rollout_context


def _dataset():
    from datasets import Dataset

    return Dataset.from_list(rows())


def _coarse_views(rewards):
    return [resize_to_budget(image, budget_to_pixels(64)) for image in rewards["image"]]


def _image_rows(processor, images):
    out = processor.image_processor(images=images, return_tensors="pt")
    return out["image_grid_thw"].tolist(), out["pixel_values"]


def test_lora_steps_change_only_the_adapters(policy, tmp_path):
    from peft import LoraConfig

    model, processor = policy
    trainer = ScriptedTrainer(model=model, reward_funcs=[get_box_reward()], args=grpo_config(tmp_path),
                              train_dataset=to_grpo_rows(_dataset()), processing_class=processor,
                              peft_config=LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"],
                                                     task_type="CAUSAL_LM"))
    trainable = {name: p.detach().clone() for name, p in trainer.model.named_parameters() if p.requires_grad}
    trainer.train()
    assert trainable and all("lora_" in name for name in trainable)
    changed = [name for name, p in trainer.model.named_parameters()
               if name in trainable and not torch.equal(trainable[name], p.detach())]
    assert len(changed) == len(trainable)


def test_local_reward_model_answers_from_crops_end_to_end(tiny_folder):
    reward_model = LocalRewardModel(str(tiny_folder), max_new_tokens=3, batch_size=2)
    crops = [noise_image(56, 56), noise_image(112, 84, 1), noise_image(84, 140, 2)]
    replies = reward_model.answer(crops, ["Which one?\n(A) x\n(B) y"] * 3)
    assert len(replies) == 3 and all(isinstance(reply, str) for reply in replies)
    assert not any(p.requires_grad for p in reward_model.model.parameters())
    assert reward_model.failures == 0
    # A batch the model cannot take (an image flatter than Qwen2.5-VL's 200:1 limit) scores None, softly.
    assert reward_model.answer([noise_image(3000, 10)], ["Which one?"]) == [None] and reward_model.failures == 1


def _recipe_args(tiny_folder, data_file, tmp_path, *extra):
    recipe = "training/recipes/ergo-qwen2.5-vl-7b.yaml"
    return ["--config", recipe, "--model_name_or_path", str(tiny_folder), "--dataset", str(data_file),
            "--dtype", "float32", "--reward_model_endpoint", "", "--reward_model", str(tiny_folder),
            "--output_dir", str(tmp_path / "run"), "--use_cpu", "true", "--bf16", "false",
            "--gradient_checkpointing", "false", "--per_device_train_batch_size", "2", "--num_generations", "2",
            "--max_completion_length", "16", "--stage2_max_completion_length", "3", "--coarse_budget", "64",
            "--report_to", "none", *extra]


@pytest.fixture
def data_file(tmp_path):
    lines = []
    for index, row in enumerate(rows(2)):
        row["image"].save(tmp_path / f"{index}.png")
        lines.append(json.dumps({**row, "image": f"{index}.png"}))
    (tmp_path / "train.jsonl").write_text("\n".join(lines))
    return tmp_path / "train.jsonl"


def _parse(arguments: list[str]):
    return TrlParser((ErgoScriptArguments, ErgoGRPOConfig, ModelConfig)).parse_args_and_config(args=arguments)


def test_shipped_recipe_builds_a_trainer_with_the_tiny_model(tiny_folder, data_file, tmp_path):
    script, args, model_args = _parse(_recipe_args(tiny_folder, data_file, tmp_path))
    assert (args.max_steps, args.num_generations, args.coarse_budget) == (250, 2, 64)  # recipe value kept, flags win
    assert (script.region_weight, script.box_weight, script.box_threshold) == (1.0, 0.5, 0.6)
    trainer = build_trainer(script, args, model_args)
    names = [func.__name__ for func in trainer.reward_funcs]
    assert names == ["accuracy_reward", "format_reward", "box_reward", "region_reward"]
    assert trainer.reward_weights.tolist() == [1.0, 1.0, 0.5, 1.0]
    assert trainer.reward_funcs[2].threshold == 0.6
    # γ is a recipe field: a flag (the synthetic recipe's) reaches r_box.
    script, args, model_args = _parse(_recipe_args(tiny_folder, data_file, tmp_path, "--box_threshold", "0.1"))
    box_reward = build_trainer(script, args, model_args).reward_funcs[2]
    assert box_reward.threshold == 0.1
    assert box_reward([None] * 2, image=[rows(1)[0]["image"]] * 2, region=[(0, 0, 100, 100), (0, 0, 900, 900)]) == [1.0, 0.0]


def test_train_resume_and_export_a_loadable_ergo_folder(tiny_folder, data_file, tmp_path):
    lora = ["--use_peft", "true", "--lora_r", "4", "--lora_alpha", "8", "--lora_target_modules", "q_proj", "v_proj"]
    run = tmp_path / "run"
    base = _recipe_args(tiny_folder, data_file, tmp_path, "--save_steps", "1", "--reward_model", "",
                        "--no_region_reward", "true", *lora)
    folder = main(base + ["--max_steps", "2"])
    assert (run / "checkpoint-2").is_dir() and (run / "adapter_config.json").is_file()
    # Resume: checkpoint-2's state is restored and training goes on to step 3.
    main(base + ["--max_steps", "3", "--resume_from_checkpoint", str(run / "checkpoint-2")])
    state = json.loads((run / "checkpoint-3" / "trainer_state.json").read_text())
    assert state["global_step"] == 3
    assert [entry["step"] for entry in state["log_history"] if "loss" in entry] == [1, 2, 3]
    loaded = AutoModelForImageTextToText.from_pretrained(folder, trust_remote_code=True)
    assert type(loaded).__name__ == "ErgoForConditionalGeneration" and (folder / "README.md").is_file()


def test_unsupported_setups_are_refused_up_front(policy, tiny_folder, data_file, tmp_path):
    model, processor = policy
    dataset = to_grpo_rows(_dataset())
    with pytest.raises(ValueError, match="fallback='resize'"):
        ErgoGRPOTrainer(model=model, reward_funcs=[accuracy_reward], args=grpo_config(tmp_path),
                        train_dataset=dataset, processing_class=ErgoProcessor.from_pretrained(tiny_folder, fallback="coarse"))
    with pytest.raises(ValueError, match="vLLM"):
        ErgoGRPOTrainer(model=model, reward_funcs=[accuracy_reward], args=grpo_config(tmp_path, use_vllm=True),
                        train_dataset=dataset, processing_class=processor)
    with pytest.raises(ValueError, match="not both"):
        main(_recipe_args(tiny_folder, data_file, tmp_path, "--reward_model_endpoint", "http://127.0.0.1:9/v1"))


# ---------------------------------------------------------------- issue 14: runs that work on real data or fail loudly


def _images_in(messages) -> list:
    return [part["image"] for message in messages if isinstance(message["content"], list)
            for part in message["content"] if part.get("type") == "image" and "image" in part]


def test_mask_truncated_completions_drops_cut_rollouts_and_keeps_their_crops_attended(policy, tmp_path):
    """Rows: 0 ends both stages; 1 is cut off in stage 1; 2 in stage 2; 3 in both. TRL's own masking would zero the
    attention over the crop's image tokens (a shape mismatch in the loss forward)."""
    model, processor = policy
    tokenizer = processor.tokenizer
    answer = "<answer>A</answer>"

    class Trainer(ScriptedTrainer):
        stage1_texts = [zoom_text(SMALL_BOX), zoom_text(SMALL_BOX, "a much longer thought that runs past the limit")]
        stage2_texts = [answer, answer, answer * 3, answer * 3]

    length = {text: len(tokenizer(text, add_special_tokens=False)["input_ids"]) for text in (*Trainer.stage1_texts, answer)}
    args = grpo_config(tmp_path, max_steps=1, mask_truncated_completions=True,
                       max_completion_length=length[Trainer.stage1_texts[0]] + 1, stage2_max_completion_length=length[answer] + 1)
    trainer = Trainer(model=model, reward_funcs=[get_box_reward()], args=args, train_dataset=to_grpo_rows(_dataset()),
                      processing_class=processor)
    trainer.train()
    batch = trainer.recorded[0]
    trained = (batch["completion_mask"] * batch["tool_mask"]).sum(dim=1).tolist()
    assert trained[0] > 0 and trained[1:] == [0, 0, 0]
    image_pad = tokenizer.convert_tokens_to_ids("<|image_pad|>")
    crops = batch["completion_ids"] == image_pad
    assert crops.sum(dim=1).min() > 0 and torch.equal((crops & batch["completion_mask"].bool()).sum(dim=1), crops.sum(dim=1))
    assert batch["advantages"][1:].tolist() == [0.0, 0.0, 0.0]
    logged = next(entry for entry in trainer.state.log_history if "ergo/void_share" in entry)
    assert (logged["ergo/void_share"], logged["ergo/stage1_clipped_ratio"], logged["ergo/stage2_clipped_ratio"]) == (0.75, 0.5, 0.5)


def test_a_failed_score_takes_no_part_in_its_groups_advantage(policy, tmp_path):
    """Group 0 (rows 0-1) has a failed score in row 0: the whole group is voided. Group 1 (rows 2-3) has a reward that
    does not apply to it at all (None for the whole group): left out, as TRL does; box still ranks the group."""
    model, processor = policy

    def failed_in_row_0(completions, **kwargs):
        return [None, 0.0, 0.0, 0.0]

    def absent_in_group_1(completions, **kwargs):
        return [1.0, 1.0, None, None]

    trainer = ScriptedTrainer(model=model, reward_funcs=[get_box_reward(), failed_in_row_0, absent_in_group_1],
                              args=grpo_config(tmp_path, max_steps=1), train_dataset=to_grpo_rows(_dataset()),
                              processing_class=processor)
    trainer.train()
    advantages = trainer.recorded[0]["advantages"].tolist()
    assert advantages[:2] == [0.0, 0.0] and advantages[2] > 0 > advantages[3]
    logged = next(entry for entry in trainer.state.log_history if "ergo/failed_group_share" in entry)
    assert logged["ergo/failed_group_share"] == 0.5


def test_training_without_a_reward_model_needs_the_explicit_flag(tiny_folder, data_file, tmp_path):
    without = _recipe_args(tiny_folder, data_file, tmp_path, "--reward_model", "")
    with pytest.raises(ValueError, match="--no_region_reward true"):
        build_trainer(*_parse(without))
    with pytest.raises(ValueError, match="--no_region_reward true"):  # both: contradictory
        build_trainer(*_parse(_recipe_args(tiny_folder, data_file, tmp_path, "--no_region_reward", "true")))
    trainer = build_trainer(*_parse(without + ["--no_region_reward", "true"]))
    assert [func.__name__ for func in trainer.reward_funcs] == ["accuracy_reward", "format_reward", "box_reward"]


def test_stage2_template_is_configurable_and_reaches_the_format_reward(policy, tmp_path):
    model, processor = policy
    seen = []
    trainer = ScriptedTrainer(model=model, reward_funcs=recording_rewards(seen), train_dataset=to_grpo_rows(_dataset()),
                              args=grpo_config(tmp_path, max_steps=1, stage2_template="fixed"), processing_class=processor)
    trainer.train()
    assert seen[0]["stage2_template"] == ["fixed"] * 4
    batch = trainer.recorded[0]
    ids = batch["completion_ids"][0][batch["completion_mask"][0].bool()].tolist()
    injected = processor.tokenizer.decode([t for t, keep in zip(ids, batch["tool_mask"][0].tolist()) if not keep])
    assert stage2_prompt(seen[0]["stage2_question"][0], "fixed") in injected
    assert "<think> ... </think>" in injected


def recording_all(seen: list):
    def record(**kwargs):
        seen.append(kwargs)
        return [0.0] * len(kwargs["completions"])

    return record


def test_rewards_get_the_answer_apart_and_the_policys_own_tokens(policy, tmp_path):
    """Third-party rewards: ``completions`` is [stage 1, stage 2]; ``answer_text`` is the answer; ``completion_ids``
    are the tokens the policy wrote (no injected turn: no image tokens to count or penalise)."""
    model, processor = policy
    seen = []
    trainer = ScriptedTrainer(model=model, reward_funcs=[recording_all(seen)], train_dataset=to_grpo_rows(_dataset()),
                              args=grpo_config(tmp_path, max_steps=1), processing_class=processor)
    trainer.train()
    rewards, batch = seen[0], trainer.recorded[0]
    assert [c[0]["content"] for c in rewards["completions"]] == rewards["stage1_text"] == STAGE1_TEXTS * 2
    assert [c[1]["content"] for c in rewards["completions"]] == rewards["answer_text"]
    for row, ids in enumerate(rewards["completion_ids"]):
        completion = batch["completion_ids"][row][batch["completion_mask"][row].bool()]
        assert ids == completion[batch["tool_mask"][row][: len(completion)].bool()].tolist()
        assert processor.tokenizer.convert_tokens_to_ids("<|image_pad|>") not in ids


def test_the_full_resolution_original_is_never_gathered_or_logged(policy, tmp_path):
    """TRL gathers the prompts (and, with log_multimodal, the images) to every rank every step for its logs."""
    model, processor = policy
    seen = []
    trainer = ScriptedTrainer(model=model, reward_funcs=[recording_all(seen)], train_dataset=to_grpo_rows(_dataset()),
                              args=grpo_config(tmp_path, max_steps=1), processing_class=processor)
    trainer.train()
    assert trainer._logs["prompt"] and not any(_images_in(prompt) for prompt in trainer._logs["prompt"])
    # The rows reached the rollout on the prompts (RowPrompt); none stays on what TRL keeps, and what it gathers from
    # other ranks (a pickle) is the plain messages.
    assert not any(getattr(prompt, "__dict__", None) for prompt in trainer._logs["prompt"])
    assert all(type(pickle.loads(pickle.dumps(prompt))) is list for prompt in trainer._logs["prompt"])
    assert not trainer._logs["images"]  # gathered only for log_completions
    assert all(not _images_in(prompt) for prompt in seen[0]["prompts"])
    assert sorted(image.size for image in seen[0]["image"]) == [(840, 560), (840, 560), (896, 560), (896, 560)]


def test_full_fine_tuning_without_deepspeed_keeps_fp32_weights(tiny_folder, data_file, tmp_path):
    bf16 = ["--dtype", "bfloat16", "--bf16", "true"]
    full = build_trainer(*_parse(_recipe_args(tiny_folder, data_file, tmp_path) + bf16))
    assert {p.dtype for p in full.model.parameters()} == {torch.float32} and full.args.bf16
    assert full.beta > 0 and {p.dtype for p in full.ref_model.parameters()} == {torch.bfloat16}  # frozen: no fp32
    lora = build_trainer(*_parse(_recipe_args(tiny_folder, data_file, tmp_path) + bf16 + [
        "--use_peft", "true", "--lora_r", "4", "--lora_target_modules", "q_proj", "v_proj"]))
    assert {p.dtype for name, p in lora.model.named_parameters() if "lora_" not in name} == {torch.bfloat16}


def test_dr_grpo_normalises_by_both_stages_and_each_stage_length_is_logged(policy, tmp_path):
    model, processor = policy
    trainer = ScriptedTrainer(model=model, reward_funcs=[get_box_reward()], train_dataset=to_grpo_rows(_dataset()),
                              args=grpo_config(tmp_path, max_steps=1, loss_type="dr_grpo"), processing_class=processor)
    assert trainer.max_completion_length == 40 + 5
    # Stage 2 generates with its own limit, and the trainer's generation config (stage 1's) is never rewritten.
    limits = []
    hook = model.register_forward_pre_hook(lambda *_: limits.append(trainer.generation_config.max_new_tokens))
    trainer.train()
    hook.remove()
    assert set(limits) == {40}
    logged = next(entry for entry in trainer.state.log_history if "ergo/stage1_length" in entry)
    batch = trainer.recorded[0]  # num_tokens: every token of both stages (and the injected turn) of the step
    assert logged["num_tokens"] == batch["prompt_mask"].sum().item() + batch["completion_mask"].sum().item()
    tokenizer = processor.tokenizer
    scripted = [len(tokenizer(text, add_special_tokens=False)["input_ids"]) + 1 for text in STAGE1_TEXTS]  # + <|im_end|>
    assert logged["ergo/stage1_length"] == sum(scripted) / 2 and 1 <= logged["ergo/stage2_length"] <= 5
    assert logged["ergo/stage1_clipped_ratio"] == 0.0


def test_the_rollout_refuses_a_trl_it_was_not_written_for():
    """The adapter overrides GRPOTrainer internals of TRL 1.16; another release must fail at import, by name."""
    from training.trl_adapter import check_trl_version

    check_trl_version("1.16.0")
    check_trl_version("1.16.3")
    for version in ("1.15.2", "1.17.0", "2.0.0"):
        with pytest.raises(ImportError, match=rf"trl>=1.16,<1.17.*trl {version} is installed"):
            check_trl_version(version)


def test_freeze_vision_tower_trains_the_language_model_only(policy, tmp_path):
    model, processor = policy
    before = {name: p.detach().clone() for name, p in model.named_parameters()}
    trainer = ScriptedTrainer(model=model, reward_funcs=[get_box_reward()], train_dataset=to_grpo_rows(_dataset()),
                              args=grpo_config(tmp_path, max_steps=1, freeze_vision_tower=True), processing_class=processor)
    trainer.train()
    changed = {name for name, p in model.named_parameters() if not torch.equal(before[name], p.detach())}
    tower = {name for name in before if name.startswith("model.visual.")}
    assert tower and not changed & tower and len(changed) > (len(before) - len(tower)) // 2


@pytest.mark.parametrize("family", list(FAMILIES.values()), ids=list(FAMILIES))
def test_smoke_run_has_a_gradient(tmp_path, capsys, family):
    """The shipped recipe through ``training.grpo.main`` on a tiny model of each family (loaded by its ERGO class,
    exported as its ERGO folder)."""
    from training import smoke

    steps = smoke.run(tmp_path, family=family)
    assert len(steps) == 2 and all(entry["grad_norm"] > 0 and entry["reward_std"] > 0 for entry in steps)
    assert "grad_norm" in capsys.readouterr().out
    assert json.loads((tmp_path / "run" / "ergo" / "config.json").read_text())["model_type"] == family.model_type
    # Each step's log says where the time went and what the regions were (the synthetic rows carry gt_bbox).
    for entry in steps:
        phases = ("stage1", "zoom", "stage2", "reward", "logprob", "loss_forward", "loss_backward")
        assert all(entry[f"ergo/{name}_s"] > 0 for name in phases)
        for stage in ("stage1", "stage2"):
            tokens = entry[f"ergo/{stage}_tokens"]
            assert tokens > 0 and entry[f"ergo/{stage}_tokens_per_s"] == pytest.approx(tokens / entry[f"ergo/{stage}_s"])
        assert 0 < entry["ergo/region_area_share"] < 1 and 0 <= entry["ergo/region_holds_gt_share"] <= 1
        assert entry["region_reward/rm_calls"] > 0 and 0 <= entry["region_reward/rm_unreadable_share"] <= 1


def test_two_processes_agree_on_a_split_group_and_stop_together_on_a_judge_failure(tmp_path):
    """The smoke recipe under ``torchrun --nproc_per_node 2`` on CPU (gloo): a group of two rollouts, one per process,
    gets one baseline (advantages +a and -a, computed on each process from the rewards of both), and a judge that
    fails on process 0 only stops both processes at the same step (no process waits for the other forever)."""
    import subprocess
    import sys

    root = Path(__file__).parent.parent
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(root), str(root / "tests")])}
    command = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2",
               str(root / "tests" / "two_process_smoke.py"), str(tmp_path)]
    done = subprocess.run(command, env=env, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    agree = [json.loads((tmp_path / f"agree-{rank}.json").read_text()) for rank in (0, 1)]
    assert {(run["processes"], run["backend"]) for run in agree} == {(2, "gloo")}
    (first,), (second,) = (run["advantages"] for run in agree)
    assert first > 0 and second == pytest.approx(-first)  # process 0 asked for the small region: r_box 1
    down = [json.loads((tmp_path / f"judge_down-{rank}.json").read_text()) for rank in (0, 1)]
    assert down[0] == down[1] and down[0]["step"] == 0 and "the reward model failed 1 of the last 2" in down[0]["stopped"]


def test_zero3_on_two_processes_trains_and_exports_as_ddp_does(tmp_path):
    """The recipe's ZeRO-3 layout, two CPU processes: the same grad norms and exported weights as plain DDP. Needs
    deepspeed, which is not a dependency (run it from an environment that has it)."""
    pytest.importorskip("deepspeed")
    import subprocess
    import sys

    from safetensors.torch import load_file

    root = Path(__file__).parent.parent
    env = {**os.environ, "PYTHONPATH": str(root)}
    steps, weights = {}, {}
    for name, extra in (("ddp", []), ("zero3", ["--zero3"])):
        out = tmp_path / name
        done = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "-m",
                               "training.smoke", str(out), *extra], cwd=root, env=env, capture_output=True, text=True,
                              timeout=900)
        assert done.returncode == 0, done.stderr[-3000:]
        state = json.loads((out / "run" / "checkpoint-2" / "trainer_state.json").read_text())
        steps[name] = [entry["grad_norm"] for entry in state["log_history"] if "grad_norm" in entry]
        weights[name] = {k: v for f in (out / "run" / "ergo").glob("*.safetensors") for k, v in load_file(f).items()}
    assert steps["zero3"] == pytest.approx(steps["ddp"], rel=1e-4) and len(steps["ddp"]) == 2
    assert weights["zero3"].keys() == weights["ddp"].keys()
    assert all(torch.allclose(weights["zero3"][k], weights["ddp"][k], atol=1e-6) for k in weights["ddp"])


def test_shipped_layout_fits_one_eight_gpu_node():
    """The recipe's reward model is served on the GPUs ZeRO-3 leaves free, and is the one the recipe asks for."""
    import re

    import yaml

    recipe_text = open("training/recipes/ergo-qwen2.5-vl-7b.yaml").read()
    recipe, accelerate = yaml.safe_load(recipe_text), yaml.safe_load(open("training/accelerate/zero3.yaml"))
    served = re.search(r"vllm serve (\S+) --tensor-parallel-size (\d+)", recipe_text)
    assert served and served.group(1) == recipe["reward_model_name"]
    assert accelerate["num_processes"] + int(served.group(2)) <= 8
    rollouts = accelerate["num_processes"] * recipe["per_device_train_batch_size"] * recipe["gradient_accumulation_steps"]
    assert rollouts % recipe["num_generations"] == 0


# ---------------------------------------------------------------- issue 25: a 7B run can trust its judge and settings


def test_the_demo_model_as_its_own_judge_is_read(tmp_path):
    """The demo model, trained to answer the judge's question about a crop with its letter, replies like
    ``H</answer>…``: the strict rule scored all of them 0. Asked as ``training.judge`` asks, on the true crops of 8
    synthetic questions, most of its replies are read and right."""
    from ergo_vqa.synthetic_task import generate_sample
    from training.sft import zoom_on

    judge = LocalRewardModel("ergo_vqa/demo_model", batch_size=8)
    samples = [generate_sample(f"judge-{index}") for index in range(8)]
    crops = []
    for sample in samples:
        context, _ = judge.processor.make_context([sample.image], [sample.question], fallback="resize")
        crops.append(zoom_on(judge.processor, context, sample.region)[1].image)
    metrics, extra = {}, {}
    scores = get_region_reward(judge)(
        [None] * 8, crop=crops, question=[s.question for s in samples], options=[s.options for s in samples],
        answer=[s.answer for s in samples], region=[s.region for s in samples], log_metric=metrics.__setitem__,
        log_extra=extra.__setitem__)
    assert sum(scores) >= 6, extra["rm_reply"]
    assert metrics["region_reward/rm_unreadable_share"] <= 0.25 and len(extra["rm_reply"]) == 8


def test_quantization_is_refused_by_name_before_anything_loads(tiny_folder, data_file, tmp_path):
    """QLoRA without bitsandbytes ran in full precision; its settings without it were ignored. The reward model
    path does not exist: the refusal comes before any loading."""
    import importlib.util

    assert importlib.util.find_spec("bitsandbytes") is None  # this machine: the refusal is what runs
    nowhere = ["--reward_model", str(tmp_path / "no-such-model")]
    with pytest.raises(ValueError, match=r"--load_in_4bit true \(QLoRA\) needs bitsandbytes"):
        build_trainer(*_parse(_recipe_args(tiny_folder, data_file, tmp_path, "--load_in_4bit", "true",
                                           "--use_peft", "true", *nowhere)))
    with pytest.raises(ValueError, match="--load_in_8bit true"):
        build_trainer(*_parse(_recipe_args(tiny_folder, data_file, tmp_path, "--load_in_8bit", "true", *nowhere)))
    with pytest.raises(ValueError, match="--bnb_4bit_quant_type only act"):
        build_trainer(*_parse(_recipe_args(tiny_folder, data_file, tmp_path, "--bnb_4bit_quant_type", "fp4", *nowhere)))
    with pytest.raises(ValueError, match="--reward_weights is not used"):
        build_trainer(*_parse(_recipe_args(tiny_folder, data_file, tmp_path, "--reward_weights", "1", "1", "1", "1",
                                           *nowhere)))


def _hub_cache(cache, repo: str, revisions: dict[str, Path]) -> None:
    """A Hub cache as ``huggingface_hub`` lays it out (refs/<name> -> commit, snapshots/<commit>/files), read
    offline."""
    root = cache / f"models--{repo.replace('/', '--')}"
    for index, (name, folder) in enumerate(revisions.items()):
        commit = f"{index + 1:040x}"
        (root / "refs").mkdir(parents=True, exist_ok=True)
        (root / "refs" / name).write_text(commit)
        shutil.copytree(folder, root / "snapshots" / commit)


def test_model_revision_and_model_init_kwargs_reach_the_policy_and_the_reference(tiny_folder, data_file, tmp_path,
                                                                                   monkeypatch):
    """``--model_revision`` was never passed (the default branch trained), and ``model_init_kwargs`` reached only
    TRL's reference model. A Hub id with two branches in an offline cache: ``v2`` has other weights."""
    import huggingface_hub

    main_folder, v2_folder = tmp_path / "main", tmp_path / "v2"
    shutil.copytree(tiny_folder, main_folder)
    shutil.copytree(tiny_folder, v2_folder)
    other = ErgoForConditionalGeneration.from_pretrained(tiny_folder, dtype=torch.float32)
    torch.nn.init.normal_(other.lm_head.weight, std=5.0)
    other.save_pretrained(v2_folder)
    _hub_cache(tmp_path / "cache", "ergo-test/tiny", {"main": main_folder, "v2": v2_folder})
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_CACHE", str(tmp_path / "cache"))

    arguments = _recipe_args(tiny_folder, data_file, tmp_path, "--model_name_or_path", "ergo-test/tiny",
                             "--model_revision", "v2", "--model_init_kwargs", '{"skip_answered_stage2": true}')
    trainer = build_trainer(*_parse(arguments))
    assert trainer.beta > 0 and trainer.ref_model is not None
    for model in (trainer.model, trainer.ref_model):
        assert torch.equal(model.lm_head.weight, other.lm_head.weight)
        assert model.config.skip_answered_stage2 is True


def test_the_judge_is_probed_once_before_anything_loads(tiny_folder, data_file, tmp_path):
    """A wedged endpoint made a step take 232 s (60 s x 3 attempts, not settable) and the policy still updated. Now
    one real request goes out first; timeout and retries are flags. The policy path does not exist: a refusal
    must come before it is read."""
    import time

    from chat_server import chat_server
    from training.judge import JUDGE_LETTER_INSTRUCTION
    from training.rewards import RewardModelError

    def endpoint(url: str, *extra: str) -> list[str]:
        return _recipe_args(tiny_folder, data_file, tmp_path, "--reward_model", "", "--reward_model_endpoint", url,
                            "--reward_model_retries", "0", "--reward_model_timeout", "1", *extra)

    nowhere = ["--model_name_or_path", str(tmp_path / "no-such-policy")]
    with pytest.raises(RewardModelError, match="did not answer a probe request.*Connection"):
        build_trainer(*_parse(endpoint("http://127.0.0.1:9/v1", *nowhere)))

    with chat_server(lambda image, text: (time.sleep(3), (200, "A"))[1]) as url:
        started = time.perf_counter()
        with pytest.raises(RewardModelError, match="did not answer a probe request.*(?i:timed out|timeout)"):
            build_trainer(*_parse(endpoint(url, *nowhere)))
        assert time.perf_counter() - started < 2.5  # one attempt of 1 s, not 3 of 60

    received = []
    with chat_server(lambda image, text: (received.append((image.size, text)), (200, "(A) red"))[1]) as url:
        script, args, model_args = _parse(endpoint(url, "--reward_model_timeout", "7", "--reward_model_retries", "4"))
        trainer = build_trainer(script, args, model_args)
    endpoint_ = trainer.reward_funcs[-1].reward_model.endpoint
    assert (endpoint_.timeout, endpoint_.max_retries) == (7.0, 4)
    assert len(received) == 1 and received[0][0] == (112, 112) and received[0][1].endswith(JUDGE_LETTER_INSTRUCTION)


def test_push_to_hub_is_checked_before_training(tiny_folder, data_file, tmp_path, monkeypatch):
    """TRL's own push_to_hub fails at start; ours failed only after training and export."""
    import huggingface_hub

    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)
    with pytest.raises(ValueError, match="--push_to_hub true, but HF_HUB_OFFLINE is set"):
        main(_recipe_args(tiny_folder, data_file, tmp_path, "--push_to_hub", "true", "--model_name_or_path",
                          str(tmp_path / "no-such-policy")))
    assert not (tmp_path / "run").exists()


def test_every_recipe_field_reaches_the_trainer(tiny_folder, data_file, tmp_path):
    """Each key of the shipped recipe is a field of the three argument groups and acts where TRL documents it
    (LoRA settings under --use_peft true); loss_type is pinned to VLM-R1's per-sequence mean, not TRL's dapo."""
    import dataclasses

    import yaml

    recipe = yaml.safe_load(open("training/recipes/ergo-qwen2.5-vl-7b.yaml"))
    fields = {f.name for group in (ErgoScriptArguments, ErgoGRPOConfig, ModelConfig) for f in dataclasses.fields(group)}
    assert set(recipe) <= fields, set(recipe) - fields
    assert recipe["loss_type"] == "grpo"
    trainer = build_trainer(*_parse(_recipe_args(tiny_folder, data_file, tmp_path, "--use_peft", "true")))
    generation = trainer.generation_config
    assert (generation.temperature, generation.top_p, generation.top_k) == (0.9, 1.0, 50)
    assert (trainer.loss_type, trainer.beta, trainer.epsilon_low, trainer.epsilon_high) == ("grpo", 0.04, 0.2, 0.2)
    assert (trainer.args.learning_rate, trainer.args.gradient_accumulation_steps, trainer.args.seed) == (1e-6, 2, 42)
    lora = trainer.model.peft_config["default"]
    assert (lora.r, lora.lora_alpha, lora.lora_dropout) == (64, 128, 0.05)
    assert set(lora.target_modules) == set(recipe["lora_target_modules"])
    assert trainer.model.base_model.model.config._attn_implementation == "sdpa"
    assert trainer.processing_class.coarse_budget == 64  # the flag over the recipe's 640


def test_region_metrics_are_the_regions_the_rewards_saw(policy, tmp_path):
    """``ergo/region_area_share`` and ``ergo/region_holds_gt_share``, the two quantities r_TCE is about, from the
    regions and ``gt_bbox`` the rewards received (scripted: a small region that misses the box, a large one that
    holds it)."""
    from training.rewards import area_share

    model, processor = policy
    seen = []
    trainer = ScriptedTrainer(model=model, reward_funcs=recording_rewards(seen), train_dataset=to_grpo_rows(_dataset()),
                              args=grpo_config(tmp_path, max_steps=1), processing_class=processor)
    trainer.train()
    rewards = seen[0]
    holds = [all(r[i] <= g[i] for i in (0, 1)) and all(r[i] >= g[i] for i in (2, 3))
             for r, g in zip(rewards["region"], rewards["gt_bbox"])]
    logged = next(entry for entry in trainer.state.log_history if "ergo/region_area_share" in entry)
    expected_area = sum(map(area_share, rewards["region"], rewards["image"])) / 4
    assert logged["ergo/region_area_share"] == pytest.approx(expected_area)
    assert holds == [False, True, False, True] and logged["ergo/region_holds_gt_share"] == 0.5
    assert logged["ergo/reward_s"] > 0
