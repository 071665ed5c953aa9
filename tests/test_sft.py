"""The supervised warm-up: examples built as inference builds them, replies-only labels, a real SFTTrainer run."""

from pathlib import Path

import pytest
import torch
from transformers import AutoModelForImageTextToText, AutoProcessor

from ergo_vqa.synthetic_task import write_split
from modeling_ergo import ErgoForConditionalGeneration
from processing_ergo.geometry_ergo import parse_zoom_box
from processing_ergo.images_ergo import ErgoImageError, load_image
from training.data import load_training_data
from training.config import ErgoSFTConfig
from training.sft import (
    STAGE1_REPLY, STAGE2_REPLY, ErgoSFTCollator, build_sft_trainer, coarse_box, example_mean_loss, sft_rows, zoom_on,
)
from training.vision_warmup import (
    AttentionProbe, centre_cell, centre_token, overlapped_tokens, token_cells, warm_up_vision, window_classes,
)
from modeling_ergo.family_ergo import QWEN2_5_VL, QWEN3_5, QWEN3_VL
from test_families import family, folder  # noqa: F401  (fixtures: one tiny folder per family)


@pytest.fixture(scope="module")
def dataset(tmp_path_factory):
    return load_training_data(str(write_split(tmp_path_factory.mktemp("synthetic"), "train", 4)))


def _labelled_text(processor, ids, labels):
    return processor.tokenizer.decode([token for token, label in zip(ids, labels) if label != -100])


def test_two_stage_example_is_the_inference_layout_with_replies_labelled(processor, dataset):
    collator = ErgoSFTCollator(processor)
    row = {**dataset[0], "kind": "ergo", "zoom_region": dataset[0]["region"]}
    ids, labels, (types, pixels, grid) = collator.example(row)
    box = coarse_box(row["region"], (1344, 1344), (224, 224))  # 64 tokens: the 1344 px square becomes 224 px
    letter = row["answer"]
    digit = row["options"][ord(letter) - ord("A")].split(") ")[1]
    assert _labelled_text(processor, ids, labels) == (
        STAGE1_REPLY.format(*box) + "<|im_end|>" + STAGE2_REPLY.format(digit, letter) + "<|im_end|>")
    assert grid.shape[0] == 2 and len(ids) == len(labels) == len(types)  # coarse view and crop
    image_id = processor.tokenizer.convert_tokens_to_ids("<|image_pad|>")
    assert ids.count(image_id) == int(grid.prod(dim=-1).sum()) // 4 == pixels.shape[0] // 4
    # The stage-2 question (with options) follows the crop; stage 1 saw the stem alone.
    text = processor.tokenizer.decode(ids)
    assert text.count(row["options"][0]) == 1 and text.index(row["options"][0]) > text.index("<zoom>[")


def test_stage2_example_is_the_conversations_stage2_turn_alone(processor, dataset):
    collator = ErgoSFTCollator(processor)
    row = {**dataset[1], "zoom_region": dataset[1]["region"]}
    ergo_ids, ergo_labels, (_, ergo_pixels, ergo_grid) = collator.example({**row, "kind": "ergo"})
    ids, labels, (types, pixels, grid) = collator.example({**row, "kind": "stage2"})
    user = processor.tokenizer.encode("<|im_start|>user", add_special_tokens=False)
    starts = [index for index in range(len(ergo_ids)) if ergo_ids[index:index + len(user)] == user]
    # The same crop, stage-2 prompt and reply as the conversation's second user turn, after ERGO's system prompt.
    assert ids[-(len(ergo_ids) - starts[-1]):] == ergo_ids[starts[-1]:]
    assert ids[:starts[0]] == ergo_ids[:starts[0]]
    assert torch.equal(grid, ergo_grid[1:]) and torch.equal(pixels, ergo_pixels[-pixels.shape[0]:])
    assert _labelled_text(processor, ids, labels) == _labelled_text(processor, ergo_ids, ergo_labels).split(
        "<|im_end|>", 1)[1]  # stage 2's reply
    assert len(types) == len(ids) and sum(types) == ids.count(processor.tokenizer.convert_tokens_to_ids("<|image_pad|>"))


def test_stage1_example_is_the_stage1_input_with_the_zoom_reply_labelled(processor, dataset):
    collator = ErgoSFTCollator(processor)
    row = {**dataset[3], "kind": "stage1", "zoom_region": dataset[3]["region"]}
    ids, labels, (types, pixels, grid) = collator.example(row)
    box = coarse_box(row["region"], (1344, 1344), (224, 224))
    assert _labelled_text(processor, ids, labels) == STAGE1_REPLY.format(*box) + "<|im_end|>"
    stage1 = processor.prepare([row["image"]], [row["question"]], options=[row["options"]], postfixes=[""])
    assert ids[:labels.index(next(label for label in labels if label != -100))] == stage1["input_ids"][0].tolist()
    assert torch.equal(pixels, stage1["pixel_values"]) and grid.tolist() == [[1, 16, 16]]  # the coarse view only
    assert len(ids) == len(labels) == len(types)


def test_row_views_are_built_once_and_give_the_same_examples(processor, tmp_path):
    """With a views cache, each (image, region) is decoded and resized once: the batch is the one built from the
    image file, and a second collator sharing the cache builds it again with the file gone."""
    rows = load_training_data(str(write_split(tmp_path, "train", 2)))
    batch_rows = [{**row, "kind": kind, "zoom_region": row["region"]}
                  for row in rows for kind in ("stage1", "ergo", "stage2", "crop")]
    views = {}
    built = ErgoSFTCollator(processor, views=views)(batch_rows)
    assert len(views) == 2  # one entry per (image, region), shared by the four kinds
    plain = ErgoSFTCollator(processor)(batch_rows)
    for row in rows:
        Path(row["image"]).unlink()
    with pytest.raises(ErgoImageError, match="training image"):
        ErgoSFTCollator(processor)(batch_rows)
    again = ErgoSFTCollator(processor, views=views)(batch_rows)
    for batch in (plain, again):
        assert batch.keys() == built.keys() and all(torch.equal(batch[key], built[key]) for key in built)


def test_box_written_in_coarse_pixels_covers_the_region(dataset):
    region = dataset[1]["region"]
    box = coarse_box(region, (1344, 1344), (336, 336))
    assert box == [value // 4 for value in region]
    assert parse_zoom_box(STAGE1_REPLY.format(*box)) == tuple(box)
    assert coarse_box([10, 10, 1343, 1343], (1344, 1344), (336, 336)) == [2, 2, 336, 336]


def test_the_zoom_reply_names_the_region_in_the_familys_convention(folder, dataset):
    """Stage 1's supervised reply writes the region as the family's stage 1 is asked to (coarse pixels, or
    thousandths of the image), so the crop inference cuts for it holds the region and little more."""
    processor = AutoProcessor.from_pretrained(folder, trust_remote_code=True, coarse_budget=64)
    row = dataset[1]
    context, _ = processor.make_context([load_image(row["image"])], [row["question"]], fallback="resize")
    _, decision = zoom_on(processor, context, row["region"])
    region, wanted = decision.region, row["region"]
    assert region[0] <= wanted[0] and region[1] <= wanted[1] and region[2] >= wanted[2] and region[3] >= wanted[3]
    area = lambda box: (box[2] - box[0]) * (box[3] - box[1])
    assert area(region) < 1.1 * area(wanted)


def test_single_turn_examples_answer_with_the_letter(processor, dataset):
    collator = ErgoSFTCollator(processor)
    side = dataset[2]["gt_bbox"][2] - dataset[2]["gt_bbox"][0]
    evidence_tokens = round(side / 28) ** 2  # the shape's box at native resolution, sides rounded to 28 px
    for kind, images_tokens in (("crop", 64), ("full", 48 * 48), ("evidence", evidence_tokens)):
        row = {**dataset[2], "kind": kind, "zoom_region": dataset[2]["region"]}
        ids, labels, (_, _, grid) = collator.example(row)
        assert _labelled_text(processor, ids, labels) == row["answer"] + "<|im_end|>"
        assert grid.shape[0] == 1 and int(grid.prod()) // 4 == images_tokens


def test_example_shares_and_missing_regions(dataset):
    rows = sft_rows(dataset, {"stage1": 0.75, "ergo": 1.0, "crop": 0.5, "full": 0.25, "evidence": 0.25},
                    coarse_budget=64)
    assert sorted(rows["kind"]) == ["crop"] * 2 + ["ergo"] * 4 + ["evidence", "full"] + ["stage1"] * 3
    # Lengths the trainer groups batches by: vision tokens (a 336 px cell is 144 tokens, capped at the budget).
    lengths = set(zip(rows["kind"], rows["length"]))
    assert {("stage1", 64), ("ergo", 64 + 64), ("crop", 64), ("full", 48 * 48)} < lengths and len(lengths) == 5
    without = dataset.remove_columns(["region"]).map(lambda row, i: {"gt_bbox": None if i == 1 else row["gt_bbox"]},
                                                     with_indices=True)
    with pytest.raises(ValueError, match=r"rows \[1\] have no gt_bbox"):
        sft_rows(without, {"ergo": 1.0})
    with pytest.raises(ValueError, match=r"rows \[1\] have no gt_bbox: 'evidence'"):
        sft_rows(without, {"evidence": 1.0})
    assert len(sft_rows(without, {"full": 1.0})) == 4  # single full-image turns need no region
    with pytest.raises(ValueError, match="shares"):
        ErgoSFTConfig(output_dir="unused", full_share=1.5)


@pytest.mark.parametrize("family, example_mean_loss",
                         [(QWEN2_5_VL, False), (QWEN2_5_VL, True), (QWEN3_VL, True), (QWEN3_5, True)],
                         ids=lambda value: getattr(value, "model_type", None), scope="module")
def test_sft_trainer_learns_from_the_examples(folder, dataset, tmp_path, example_mean_loss):
    """On every family's tiny folder (``test_families``), loaded as users load it: every kind of example trains the
    vision tower and the language model (the 16-px families' examples sized by their own factor)."""
    model = AutoModelForImageTextToText.from_pretrained(folder, trust_remote_code=True, dtype=torch.float32)
    processor = AutoProcessor.from_pretrained(folder, trust_remote_code=True)
    before = {name: weight.clone() for name, weight in model.named_parameters()}
    args = ErgoSFTConfig(output_dir=str(tmp_path), coarse_budget=64, full_share=0.25, max_steps=3,
                         per_device_train_batch_size=3, learning_rate=1e-3, logging_steps=1, save_strategy="no",
                         report_to="none", use_cpu=True, bf16=False, gradient_checkpointing=False,
                         example_mean_loss=example_mean_loss)
    trainer = build_sft_trainer(model, processor, dataset, args)
    forwards = []
    model.register_forward_hook(lambda module, args, output: forwards.append(output))
    trainer.train()
    losses = [entry["loss"] for entry in trainer.state.log_history if "loss" in entry]
    assert len(losses) == 3 and all(torch.isfinite(torch.tensor(losses)))
    assert len(forwards) == 3  # one forward pass per step, loss and TRL's metrics from the same one
    changed = [name for name, weight in trainer.model.named_parameters() if not torch.equal(weight, before[name])]
    assert any("visual" in name for name in changed) and any("language_model" in name for name in changed)


def test_example_mean_loss_trainer_returns_the_mean_of_each_examples_loss(tiny_folder, processor, dataset, tmp_path):
    model = ErgoForConditionalGeneration.from_pretrained(tiny_folder, dtype=torch.float32)
    args = ErgoSFTConfig(output_dir=str(tmp_path), coarse_budget=64, stage1_share=1.0, crop_share=1.0, ergo_share=0.0,
                         full_share=0.0, report_to="none", use_cpu=True, bf16=False, example_mean_loss=True)
    trainer = build_sft_trainer(model, processor, dataset, args)
    kinds = trainer.train_dataset["kind"]
    batch = trainer.data_collator([trainer.train_dataset[kinds.index(kind)] for kind in ("stage1", "crop")])
    loss = trainer.compute_loss(trainer.model, dict(batch))
    logits = trainer.model(**{key: value for key, value in batch.items() if key != "labels"}).logits
    targets = batch["labels"][:, 1:]
    token_losses = torch.nn.functional.cross_entropy(logits[:, :-1].transpose(1, 2), targets, ignore_index=-100,
                                                     reduction="none")
    labelled = targets != -100
    counts = labelled.sum(dim=1)
    assert counts[1] < counts[0]  # the crop's one-letter reply beside stage 1's reply
    expected = ((token_losses * labelled).sum(dim=1) / counts).mean()
    assert torch.isclose(loss, expected, atol=1e-5)


def test_vision_warm_up_trains_the_vision_tower_only(folder, dataset):
    """On each family's tower: Qwen2.5-VL's windowed one at 28 px, the 16-px families' full-attention ones at 32."""
    model = AutoModelForImageTextToText.from_pretrained(folder, trust_remote_code=True, dtype=torch.float32)
    processor = AutoProcessor.from_pretrained(folder, trust_remote_code=True, coarse_budget=64)
    before = {name: weight.clone() for name, weight in model.named_parameters()}
    history = warm_up_vision(model, processor, dataset, steps=3, batch_size=2)
    for accuracy in (history.reading, history.pointing):
        assert len(accuracy) == 3 and all(0.0 <= value <= 1.0 for value in accuracy)
    changed = {name for name, weight in model.named_parameters() if not torch.equal(weight, before[name])}
    assert changed and all(".visual." in name for name in changed)
    assert any("merger" in name for name in changed) and any("patch_embed" in name for name in changed)
    with pytest.raises(ValueError, match="gt_bbox"):
        warm_up_vision(model, processor, dataset.remove_columns(["region", "gt_bbox"]), steps=1)


def test_pointing_targets_are_the_box_tokens_and_the_cell_of_its_centre():
    # A 1344 px image seen as 336 px (12 x 12 tokens of 28 px); the box maps to x 90-120, y 170-190 in the view.
    where = overlapped_tokens([360, 680, 480, 760], (1344, 1344), (336, 336))
    assert where.shape == (144,) and torch.isclose(where.sum(), torch.tensor(1.0))
    assert where.nonzero().flatten().tolist() == [6 * 12 + 3, 6 * 12 + 4]  # row 6, columns 3-4
    assert centre_cell([360, 680, 480, 760], (1344, 1344), grid=4) == 2 * 4 + 1  # centre (420, 720)
    cells = token_cells((336, 336), grid=4).view(12, 12)  # 3 x 3 tokens per cell
    assert cells[0, 0] == 0 and cells[2, 2] == 0 and cells[2, 3] == 1 and cells[3, 0] == 4 and cells[11, 11] == 15


def test_reading_attention_target_is_the_token_of_the_box_centre_in_the_crop():
    # The crop shows original x 336-672, y 0-336 as 168 px (6 x 6 tokens); the centre (430, 100) lands at (47, 50).
    where = centre_token([400, 80, 460, 120], [336, 0, 672, 336], (168, 168))
    assert where.sum() == 1 and where.nonzero().item() == 1 * 6 + 1


def test_attention_probe_reads_the_token_its_attention_picks():
    probe = AttentionProbe(hidden_size=8, classes=3)
    with torch.no_grad():
        probe.score.weight.zero_(), probe.score.bias.zero_(), probe.value.bias.zero_()
        probe.score.weight[0, 0] = 50.0  # attend to the token with the largest first feature
        probe.value.weight.zero_(), probe.value.weight[2, 1].fill_(1.0)  # class 2 <- second feature
    tokens = torch.tensor([[0.0, -1.0] + [0.1] * 6, [1.0, 1.0] + [0.1] * 6, [0.0, -1.0] + [0.1] * 6])
    logits, attention = probe(tokens)
    assert attention.exp().argmax() == 1 and logits.argmax() == 2 and torch.isclose(attention.exp().sum(), torch.tensor(1.0))


def test_frozen_vision_tower_stays_as_it_was(folder, dataset, tmp_path):
    model = AutoModelForImageTextToText.from_pretrained(folder, trust_remote_code=True, dtype=torch.float32)
    processor = AutoProcessor.from_pretrained(folder, trust_remote_code=True)
    before = {name: weight.clone() for name, weight in model.named_parameters()}
    args = ErgoSFTConfig(output_dir=str(tmp_path), coarse_budget=64, full_share=0.0, max_steps=1,
                         per_device_train_batch_size=2, learning_rate=1e-3, save_strategy="no", report_to="none",
                         use_cpu=True, bf16=False, gradient_checkpointing=False, freeze_vision_tower=True)
    build_sft_trainer(model, processor, dataset, args).train()
    changed = {name for name, weight in model.named_parameters() if not torch.equal(weight, before[name])}
    assert changed and not any(".visual." in name for name in changed)


def test_reading_token_classes_are_the_answer_in_the_centre_tokens_window():
    centre = torch.zeros(36)
    centre[1 * 6 + 5] = 1.0  # row 1, column 5 of a 6 x 6 token crop; windows of 4 x 4 tokens start at 0
    classes = window_classes(centre, (168, 168), window=4, answer=7, none=10).view(6, 6)
    expected = torch.full((6, 6), 10)
    expected[0:4, 4:6] = 7
    assert torch.equal(classes, expected)


def test_example_mean_loss_weighs_every_example_alike():
    log_probs = -torch.rand(3, 4)
    label_mask = torch.tensor([[True] * 4, [False, False, False, True], [False] * 4])  # 4 tokens, 1, none
    log_probs = log_probs * label_mask  # as TRL's fused head gives them: zero where the label is ignored
    expected = (-log_probs[0].mean() - log_probs[1, 3]) / 2  # the third example has nothing to learn
    assert torch.isclose(example_mean_loss(log_probs, label_mask), expected)
    assert not torch.isclose(example_mean_loss(log_probs, label_mask), -log_probs.sum() / 5)  # not TRL's token mean
    assert example_mean_loss(log_probs[2:], label_mask[2:]) == 0  # finite when no example is labelled
