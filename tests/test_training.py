"""GRPO with ERGO's two-stage rollout on a tiny model: real TRL trainer, real processor, CPU."""

from __future__ import annotations

import json

import pytest
import torch
from transformers import AutoModelForImageTextToText, LogitsProcessorList

from conftest import noise_image
from ergo_vqa.testing_utils import ScriptedText, zoom_text
from modeling_ergo import ErgoForConditionalGeneration
from processing_ergo import ErgoProcessor
from processing_ergo.geometry_ergo import budget_to_pixels, resize_to_budget
from processing_ergo.prompts_ergo import stage2_prompt
from training.data import to_grpo_rows
from training.grpo import ErgoScriptArguments, build_trainer, export, main
from training.reward_model import LocalRewardModel
from training.rewards import accuracy_reward, format_reward, get_box_reward, get_region_reward
from training.config import ErgoGRPOConfig
from training.rollout import ErgoGRPOTrainer

SMALL_BOX, LARGE_BOX = (4, 4, 40, 30), (0, 0, 250, 170)  # coarse pixels; the large one is most of the image
STAGE1_TEXTS = [zoom_text(SMALL_BOX, "small"), zoom_text(LARGE_BOX, "large")]  # per rollout of a group: r_box differs, so does the advantage


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


class ScriptedTrainer(ErgoGRPOTrainer):
    """The random policy's stage 1 says ``STAGE1_TEXTS`` (cycled over the batch); stage 2 is sampled freely.
    Keeps what each generation step handed to the loss, to inspect it."""

    def _generate_single_turn(self, prompt_ids, images, multimodal_fields, num_generations, has_tool_images=False):
        if has_tool_images:  # stage 2
            return super()._generate_single_turn(prompt_ids, images, multimodal_fields, num_generations, True)
        tokenizer = self._tokenizer
        scripts = [tokenizer(STAGE1_TEXTS[row % 2], add_special_tokens=False)["input_ids"] for row in range(len(prompt_ids))]
        model = self.accelerator.unwrap_model(self.model)
        generate = model.generate
        model.generate = lambda *args, **kwargs: generate(*args, logits_processor=LogitsProcessorList(
            [ScriptedText(scripts, tokenizer.convert_tokens_to_ids("<|im_end|>"))]), **kwargs)
        try:
            return super()._generate_single_turn(prompt_ids, images, multimodal_fields, num_generations)
        finally:
            del model.generate

    def _generate_and_score_completions(self, inputs):
        output = super()._generate_and_score_completions(inputs)
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


def test_shipped_recipe_builds_a_trainer_with_the_tiny_model(tiny_folder, data_file, tmp_path):
    from trl import ModelConfig, TrlParser

    parser = TrlParser((ErgoScriptArguments, ErgoGRPOConfig, ModelConfig))
    script, args, model_args = parser.parse_args_and_config(args=_recipe_args(tiny_folder, data_file, tmp_path))
    assert (args.max_steps, args.num_generations, args.coarse_budget) == (250, 2, 64)  # recipe value kept, flags win
    assert (script.region_weight, script.box_weight, script.box_threshold) == (1.0, 0.5, 0.6)
    trainer = build_trainer(script, args, model_args)
    names = [func.__name__ for func in trainer.reward_funcs]
    assert names == ["accuracy_reward", "format_reward", "box_reward", "region_reward"]
    assert trainer.reward_weights.tolist() == [1.0, 1.0, 0.5, 1.0]


def test_train_resume_and_export_a_loadable_ergo_folder(tiny_folder, data_file, tmp_path):
    lora = ["--use_peft", "true", "--lora_r", "4", "--lora_alpha", "8", "--lora_target_modules", "q_proj", "v_proj"]
    run = tmp_path / "run"
    base = _recipe_args(tiny_folder, data_file, tmp_path, "--save_steps", "1", "--reward_model", "", *lora)
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
