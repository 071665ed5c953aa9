"""Vision warm-up for a model trained from scratch: teach the vision tower to read the answer and to find the target.

Released Qwen2.5-VL models start from a pre-trained vision tower; a model built from config does not, and then the
language model's loss reaches the tower too weakly to shape it: on the synthetic task a from-scratch model stayed at
chance through hundreds of supervised steps, while the same steps after this warm-up learned to read within one
hundred, and its stage 1 never learned where the target is until the tower was taught that too (README, "Synthetic
proof"). The warm-up trains only the vision tower (patch embedding, blocks, merger) and two throw-away linear heads
on the merger's output tokens, on the sum of two objectives per step:

* reading: classify each row's answer from its evidence crop (``gt_bbox`` widened to the 28 px token grid of the
  original, so the crop is taken at native resolution and never resampled, and the original's pixels meet the same
  patches). An image's score per answer is its best token's (the detail sits in one token).
* pointing: on the coarse view, built as inference builds it (``ErgoProcessor.make_context``), one softmax over
  every (token, cell) pair, where the cells are a ``grid`` x ``grid`` partition of the view; the target is the
  tokens overlapping ``gt_bbox`` paired with the cell holding the box's centre (normalised multi-hot). So the
  target's tokens stand out, and their features say where they are, which stage 1's reply has to name.

The heads are discarded; the language model is untouched.
"""

from __future__ import annotations

import logging
import random
from dataclasses import dataclass, field

import torch
from datasets import Dataset
from PIL import Image

from processing_ergo.geometry_ergo import IMAGE_FACTOR
from processing_ergo.images_ergo import load_image
from processing_ergo.processing_ergo import ErgoProcessor, size_up_to

logger = logging.getLogger(__name__)


@dataclass
class WarmUpHistory:
    """Per-step training accuracy of each head: the answer read from the crop; the top (token, cell) pair of the
    coarse view on the target with the right cell."""

    reading: list[float] = field(default_factory=list)
    pointing: list[float] = field(default_factory=list)


def warm_up_vision(model, processor: ErgoProcessor, dataset: Dataset, steps: int = 300, batch_size: int = 32,
                   learning_rate: float = 1e-3, grid: int = 4, seed: int = 0) -> WarmUpHistory:
    """Trains ``model.model.visual`` in place on both objectives (batches of ``batch_size`` rows each)."""
    if "gt_bbox" not in dataset.column_names or any(box is None for box in dataset["gt_bbox"]):
        raise ValueError("the vision warm-up needs a gt_bbox on every row")
    answers = sorted(set(dataset["answer"]))
    crops, labels, views, targets = [], [], [], []
    for row in dataset:
        image = load_image(row["image"], name="training image")
        crops.append(image.crop(_on_token_grid(row["gt_bbox"], image.size)))
        labels.append(answers.index(row["answer"]))
        _, (view,) = processor.make_context([image], [row["question"]], fallback="resize")
        views.append(view)
        targets.append(pointing_target(row["gt_bbox"], image.size, view.size, grid))

    vision = model.model.visual
    hidden = model.config.text_config.hidden_size
    reader, pointer = torch.nn.Linear(hidden, len(answers)), torch.nn.Linear(hidden, grid * grid)
    parameters = [*vision.parameters(), *reader.parameters(), *pointer.parameters()]
    optimizer = torch.optim.AdamW(parameters, lr=learning_rate, weight_decay=0.0)
    # A tenth of the steps of linear warm-up: without it, runs at 3e-3 sometimes collapsed to chance for good.
    schedule = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: min(1.0, (step + 1) / max(1, steps // 10)))
    rng = random.Random(seed)
    history = WarmUpHistory()
    vision.train()
    reader.to(model.device), pointer.to(model.device)
    for step in range(steps):
        picked = rng.sample(range(len(crops)), min(batch_size, len(crops)))
        per_token = [reader(tokens) for tokens in _token_features(model, processor, [crops[i] for i in picked])]
        logits = torch.stack([tokens.max(0).values for tokens in per_token])
        answer = torch.tensor([labels[i] for i in picked], device=model.device)
        reading_loss = torch.nn.functional.cross_entropy(logits, answer)
        history.reading.append((logits.argmax(-1) == answer).float().mean().item())

        picked = rng.sample(range(len(views)), min(batch_size, len(views)))
        pointing_loss, hits = torch.zeros((), device=model.device), 0.0
        for tokens, index in zip(_token_features(model, processor, [views[i] for i in picked]), picked):
            scores = pointer(tokens).flatten().log_softmax(-1)
            target = targets[index].to(model.device).flatten()
            pointing_loss = pointing_loss - (target * scores).sum() / len(picked)
            hits += float(target[scores.argmax()] > 0) / len(picked)
        history.pointing.append(hits)

        (reading_loss + pointing_loss).backward()
        torch.nn.utils.clip_grad_norm_(parameters, 1.0)
        optimizer.step()
        schedule.step()
        optimizer.zero_grad()
        if step % 25 == 0 or step == steps - 1:
            logger.warning("vision warm-up step %d: reading loss %.3f, accuracy %.2f; pointing loss %.3f, hits %.2f",
                           step, reading_loss.item(), history.reading[-1], pointing_loss.item(), hits)
    return history


def pointing_target(box: list[int], size: tuple[int, int], view_size: tuple[int, int], grid: int) -> torch.Tensor:
    """(view tokens, grid * grid) normalised multi-hot: the merged tokens of the view that ``box`` (original pixels)
    overlaps, each paired with the cell of the ``grid`` x ``grid`` partition holding the box's centre. Tokens are in
    the merger's row-major order."""
    (width, height), (view_width, view_height) = size, view_size
    x1, x2 = box[0] * view_width / width, box[2] * view_width / width
    y1, y2 = box[1] * view_height / height, box[3] * view_height / height
    columns, rows = view_width // IMAGE_FACTOR, view_height // IMAGE_FACTOR
    cell = (min(grid - 1, int((y1 + y2) / 2 / view_height * grid)) * grid
            + min(grid - 1, int((x1 + x2) / 2 / view_width * grid)))
    target = torch.zeros(rows * columns, grid * grid)
    for row in range(rows):
        for column in range(columns):
            left, top = column * IMAGE_FACTOR, row * IMAGE_FACTOR
            if x1 < left + IMAGE_FACTOR and x2 > left and y1 < top + IMAGE_FACTOR and y2 > top:
                target[row * columns + column, cell] = 1.0
    return target / target.sum()


def _token_features(model, processor: ErgoProcessor, images: list[Image.Image]) -> tuple[torch.Tensor, ...]:
    """The merger's output tokens of each image (28-aligned images keep their size, as in ``ErgoProcessor``)."""
    largest = max(image.width * image.height for image in images)
    pixels = processor.image_processor(images=images, return_tensors="pt", size=size_up_to(largest))
    grid = pixels["image_grid_thw"].to(model.device)
    features = model.model.visual(pixels["pixel_values"].to(model.device), grid_thw=grid)
    features = getattr(features, "pooler_output", features)
    return features.split((grid.prod(-1) // processor.image_processor.merge_size ** 2).tolist())


def _on_token_grid(box: list[int], size: tuple[int, int], grid: int = IMAGE_FACTOR) -> tuple[int, int, int, int]:
    """``box`` widened outwards to multiples of ``grid`` (at least 2x2 tokens), inside the image."""
    width, height = size
    x1, y1 = box[0] // grid * grid, box[1] // grid * grid
    x2 = min(width // grid * grid, max(x1 + 2 * grid, -(-box[2] // grid) * grid))
    y2 = min(height // grid * grid, max(y1 + 2 * grid, -(-box[3] // grid) * grid))
    return x1, y1, x2, y2
