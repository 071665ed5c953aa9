"""Vision warm-up for a model trained from scratch: teach the vision tower to tell the answers apart first.

Released Qwen2.5-VL models start from a pre-trained vision tower; a model built from config does not, and then the
language model's loss reaches the tower too weakly to shape it: on the synthetic task a from-scratch model stayed at
chance through hundreds of supervised steps, while the same steps after this warm-up learned to read within one
hundred (README, "Synthetic proof"). The warm-up trains only the vision tower (patch embedding, blocks, merger) and a
throw-away linear head on each of the merger's output tokens, to classify each row's answer from its evidence crop:
``gt_bbox`` widened to the 28 px token grid of the original, so the crop is taken at native resolution and never
resampled, and the original's pixels meet the same patches. An image's score per answer is its best token's (the
detail sits in one token). The head is discarded; the language model is untouched.
"""

from __future__ import annotations

import logging
import random

import torch
from datasets import Dataset

from processing_ergo.images_ergo import load_image
from processing_ergo.processing_ergo import ErgoProcessor

logger = logging.getLogger(__name__)


def warm_up_vision(model, processor: ErgoProcessor, dataset: Dataset, steps: int = 300, batch_size: int = 32,
                   learning_rate: float = 1e-3, seed: int = 0) -> list[float]:
    """Trains ``model.model.visual`` in place; returns the per-step training accuracy of the linear head."""
    if "gt_bbox" not in dataset.column_names or any(box is None for box in dataset["gt_bbox"]):
        raise ValueError("the vision warm-up needs a gt_bbox on every row")
    answers = sorted(set(dataset["answer"]))
    crops, labels = [], []
    for row in dataset:
        image = load_image(row["image"], name="training image")
        crops.append(image.crop(_on_token_grid(row["gt_bbox"], image.size)))
        labels.append(answers.index(row["answer"]))

    vision = model.model.visual
    head = torch.nn.Linear(model.config.text_config.hidden_size, len(answers))
    parameters = list(vision.parameters()) + list(head.parameters())
    optimizer = torch.optim.AdamW(parameters, lr=learning_rate, weight_decay=0.0)
    # A tenth of the steps of linear warm-up: without it, runs at 3e-3 sometimes collapsed to chance for good.
    schedule = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: min(1.0, (step + 1) / max(1, steps // 10)))
    rng = random.Random(seed)
    merge = processor.image_processor.merge_size ** 2
    accuracy = []
    vision.train()
    for step in range(steps):
        picked = rng.sample(range(len(crops)), min(batch_size, len(crops)))
        pixels = processor.image_processor(images=[crops[i] for i in picked], return_tensors="pt")
        features = vision(pixels["pixel_values"].to(model.device), grid_thw=pixels["image_grid_thw"].to(model.device))
        features = getattr(features, "pooler_output", features)
        per_token = head.to(model.device)(features)
        sizes = (pixels["image_grid_thw"].prod(-1) // merge).tolist()
        logits = torch.stack([chunk.max(0).values for chunk in per_token.split(sizes)])
        target = torch.tensor([labels[i] for i in picked], device=model.device)
        loss = torch.nn.functional.cross_entropy(logits, target)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(parameters, 1.0)
        optimizer.step()
        schedule.step()
        optimizer.zero_grad()
        accuracy.append((logits.argmax(-1) == target).float().mean().item())
        if step % 25 == 0 or step == steps - 1:
            logger.warning("vision warm-up step %d: loss %.3f, accuracy %.2f", step, loss.item(), accuracy[-1])
    return accuracy


def _on_token_grid(box: list[int], size: tuple[int, int], grid: int = 28) -> tuple[int, int, int, int]:
    """``box`` widened outwards to multiples of ``grid`` (at least 2x2 tokens), inside the image."""
    width, height = size
    x1, y1 = box[0] // grid * grid, box[1] // grid * grid
    x2 = min(width // grid * grid, max(x1 + 2 * grid, -(-box[2] // grid) * grid))
    y2 = min(height // grid * grid, max(y1 + 2 * grid, -(-box[3] // grid) * grid))
    return x1, y1, x2, y2
