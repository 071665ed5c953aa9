"""Vision warm-up for a model trained from scratch: teach the vision tower to read the answer and to find the target,
in features the language model can use as they are.

Released Qwen2.5-VL models start from a pre-trained vision tower; a model built from config does not, and then the
language model's loss reaches the tower too weakly to shape it (docs/synthetic-proof-history.md). The warm-up trains
only the vision tower (patch embedding, blocks, merger), on the sum of two objectives per step, each read out by an
``AttentionProbe``: one attention head over an image's merged tokens, the operation a language-model layer applies to
them. A probe that only needs "find the token by its content, copy what it carries" is what the language model can
later learn quickly on a frozen tower (the readouts that failed: docs/synthetic-proof-history.md).

* reading, on the crop stage 2 gets for the true region (``training.sft.row_views``: ``plan_zooms`` on a reply naming
  it, so the crop is cut and sized as inference cuts it): the probe's answer is the row's answer, and its attention
  goes to the token holding the centre of ``gt_bbox`` (where the label is). Besides, every token's own value must
  give the answer as far as the tower can carry it (every token when a block attends over the whole image, as
  Qwen2.5-VL's full-attention blocks do; else the tokens of that token's attention window), and "none" beyond: a
  detail every token carries reaches the language model through any attention at all, one held by a few tokens did
  not (docs/synthetic-proof-history.md).
* pointing, on the coarse view (``ErgoProcessor.make_context``, as inference builds it): the probe's answer is the
  cell of a ``grid`` x ``grid`` partition of the view holding the centre of ``gt_bbox`` (what stage 1's reply has to
  name), and its attention goes to the tokens ``gt_bbox`` overlaps; on a row with a ``landmark`` (the synthetic
  task's contextual variant, whose target only the question picks out) the landmark's box stands for ``gt_bbox``. Besides, every token's own value must name the
  cell the token lies in: the tower has no absolute position embedding and has to work out where a token is from
  the scene, and this dense signal teaches it on every token of every image, not only on the target's few.

The attention targets make the search fast (each image says where to look); the answers make the attended tokens
carry what the language model has to copy out. The probes are discarded; the language model is untouched.
"""

from __future__ import annotations

import logging
import random
from dataclasses import dataclass, field

import torch
from datasets import Dataset
from PIL import Image

from processing_ergo.geometry_ergo import IMAGE_FACTOR
from processing_ergo.processing_ergo import ErgoProcessor, parallel_map, size_up_to

from .sft import row_views

logger = logging.getLogger(__name__)


@dataclass
class WarmUpHistory:
    """Per-step training accuracy of each probe's answer (the row's answer; the target's cell)."""

    reading: list[float] = field(default_factory=list)
    pointing: list[float] = field(default_factory=list)


class AttentionProbe(torch.nn.Module):
    """One attention head over an image's tokens with a learned query: RMS-normed tokens (as a decoder layer norms
    its input), a score per token, a softmax, and class logits from the weighted tokens."""

    def __init__(self, hidden_size: int, classes: int):
        super().__init__()
        self.norm = torch.nn.RMSNorm(hidden_size)
        self.score = torch.nn.Linear(hidden_size, 1)
        self.value = torch.nn.Linear(hidden_size, classes)

    def forward(self, tokens: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(class logits, log attention weights over the tokens) for one image's (tokens, hidden) features."""
        normed = self.norm(tokens)
        attention = self.score(normed).squeeze(-1).log_softmax(-1)
        return attention.exp() @ self.value(normed), attention


@dataclass
class _Task:
    """One objective's images with, per image, the probe's answer and where its attention should go."""

    images: list[Image.Image] = field(default_factory=list)
    answers: list[int] = field(default_factory=list)
    attention: list[torch.Tensor] = field(default_factory=list)
    token_classes: list[torch.Tensor] = field(default_factory=list)
    """Per image, a class for every token's own value to predict."""


def warm_up_vision(model, processor: ErgoProcessor, dataset: Dataset, steps: int = 300, batch_size: int = 32,
                   learning_rate: float = 1e-3, grid: int = 4, seed: int = 0,
                   views: dict | None = None) -> WarmUpHistory:
    """Trains ``model.model.visual`` in place on both objectives (``batch_size`` images of each per step); ``views``:
    a cache of each row's coarse view and crop (``training.sft.row_views``), shared with the supervised phases."""
    if "gt_bbox" not in dataset.column_names or any(box is None for box in dataset["gt_bbox"]):
        raise ValueError("the vision warm-up needs a gt_bbox on every row")
    region_column = "region" if "region" in dataset.column_names else "gt_bbox"
    answers = sorted(set(dataset["answer"]))
    reading, pointing = _Task(), _Task()
    reach, factor = _reach(model.config.vision_config), processor.factor
    rows = list(dataset)
    built = parallel_map(lambda row: row_views(processor, row["image"], row[region_column] or row["gt_bbox"], views),
                         rows)
    for row, row_view in zip(rows, built):
        view, size = row_view.coarse_view, row_view.original_size
        crop, crop_box = row_view.decision.image, row_view.decision.region
        reading.images.append(crop)
        reading.answers.append(answers.index(row["answer"]))
        reading.attention.append(centre_token(row["gt_bbox"], crop_box, crop.size, factor))
        reading.token_classes.append(window_classes(reading.attention[-1], crop.size, reach or max(crop.size),
                                                    reading.answers[-1], none=len(answers), factor=factor))
        pointed = row.get("landmark") or row["gt_bbox"]
        pointing.images.append(view)
        pointing.answers.append(centre_cell(pointed, size, grid))
        pointing.attention.append(overlapped_tokens(pointed, size, view.size, factor))
        pointing.token_classes.append(token_cells(view.size, grid, factor))

    vision = model.model.visual
    hidden = model.config.text_config.hidden_size
    reader, pointer = AttentionProbe(hidden, len(answers) + 1), AttentionProbe(hidden, grid * grid)
    reader.to(model.device), pointer.to(model.device)
    parameters = [*vision.parameters(), *reader.parameters(), *pointer.parameters()]
    optimizer = torch.optim.AdamW(parameters, lr=learning_rate, weight_decay=0.0)
    # A tenth of the steps of linear warm-up: without it, runs at 3e-3 sometimes collapsed to chance for good.
    schedule = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: min(1.0, (step + 1) / max(1, steps // 10)))
    rng = random.Random(seed)
    history = WarmUpHistory()
    vision.train()
    for step in range(steps):
        losses = []
        for task, probe, accuracy in ((reading, reader, history.reading), (pointing, pointer, history.pointing)):
            picked = rng.sample(range(len(task.images)), min(batch_size, len(task.images)))
            loss, correct = _probe_loss(model, processor, task, probe, picked)
            losses.append(loss)
            accuracy.append(correct)
        sum(losses).backward()
        torch.nn.utils.clip_grad_norm_(parameters, 1.0)
        optimizer.step()
        schedule.step()
        optimizer.zero_grad()
        if step % 25 == 0 or step == steps - 1:
            logger.warning("vision warm-up step %d: reading loss %.3f, accuracy %.2f; pointing loss %.3f, accuracy %.2f",
                           step, losses[0].item(), history.reading[-1], losses[1].item(), history.pointing[-1])
    return history


def _probe_loss(model, processor: ErgoProcessor, task: _Task, probe: AttentionProbe,
                picked: list[int]) -> tuple[torch.Tensor, float]:
    """Mean over the picked images of (answer cross-entropy + attention cross-entropy + mean per-token value
    cross-entropy), and the answer accuracy."""
    loss, correct = torch.zeros((), device=model.device), 0
    for tokens, index in zip(_token_features(model, processor, [task.images[i] for i in picked]), picked):
        logits, attention = probe(tokens)
        answer = torch.tensor(task.answers[index], device=model.device)
        where = task.attention[index].to(model.device)
        own = task.token_classes[index].to(model.device)
        loss = (loss + torch.nn.functional.cross_entropy(logits, answer) - (where * attention).sum()
                + torch.nn.functional.cross_entropy(probe.value(probe.norm(tokens)), own))
        correct += int(logits.argmax() == answer)
    return loss / len(picked), correct / len(picked)


def centre_token(box: list[int], crop_box: list[int], crop_size: tuple[int, int],
                 factor: int = IMAGE_FACTOR) -> torch.Tensor:
    """One-hot over the crop's merged tokens (row-major; ``factor`` px each, the processor's): the token holding the
    centre of ``box`` (original pixels) in a crop of ``crop_box`` resized to ``crop_size``."""
    scale_x = crop_size[0] / (crop_box[2] - crop_box[0])
    scale_y = crop_size[1] / (crop_box[3] - crop_box[1])
    columns, rows = crop_size[0] // factor, crop_size[1] // factor
    column = min(columns - 1, max(0, int(((box[0] + box[2]) / 2 - crop_box[0]) * scale_x) // factor))
    row = min(rows - 1, max(0, int(((box[1] + box[3]) / 2 - crop_box[1]) * scale_y) // factor))
    target = torch.zeros(rows * columns)
    target[row * columns + column] = 1.0
    return target


def centre_cell(box: list[int], size: tuple[int, int], grid: int) -> int:
    """The cell of a ``grid`` x ``grid`` partition of the image holding the centre of ``box``, row-major."""
    column = min(grid - 1, int((box[0] + box[2]) / 2 / size[0] * grid))
    row = min(grid - 1, int((box[1] + box[3]) / 2 / size[1] * grid))
    return row * grid + column


def window_classes(centre: torch.Tensor, size: tuple[int, int], window: int, answer: int, none: int,
                   factor: int = IMAGE_FACTOR) -> torch.Tensor:
    """Per merged token of an image (row-major): ``answer`` for the tokens in the same ``window`` x ``window`` tower
    attention window as the one-hot ``centre`` token, ``none`` for the rest."""
    columns, rows = size[0] // factor, size[1] // factor
    row, column = divmod(int(centre.argmax()), columns)
    in_window = ((torch.arange(rows) // window == row // window)[:, None]
                 & (torch.arange(columns) // window == column // window)[None, :])
    return torch.where(in_window, answer, none).flatten()


def _reach(vision_config) -> int | None:
    """How far, in merged tokens per side, the vision tower can move information: None (the whole image) when a
    block has full attention (every block of Qwen3-VL's and Qwen3.5's towers), else the side of its attention window
    (Qwen2.5-VL: ``window_size`` pixels)."""
    if getattr(vision_config, "fullatt_block_indexes", True):
        return None
    return max(1, vision_config.window_size // (vision_config.patch_size * vision_config.spatial_merge_size))


def token_cells(view_size: tuple[int, int], grid: int, factor: int = IMAGE_FACTOR) -> torch.Tensor:
    """Per merged token of a view (row-major), the cell of a ``grid`` x ``grid`` partition holding its centre."""
    columns, rows = view_size[0] // factor, view_size[1] // factor
    column = ((torch.arange(columns) + 0.5) * grid / columns).long().clamp(max=grid - 1)
    row = ((torch.arange(rows) + 0.5) * grid / rows).long().clamp(max=grid - 1)
    return (row[:, None] * grid + column[None, :]).flatten()


def overlapped_tokens(box: list[int], size: tuple[int, int], view_size: tuple[int, int],
                      factor: int = IMAGE_FACTOR) -> torch.Tensor:
    """Normalised multi-hot over the view's merged tokens (row-major): those ``box`` (original pixels) overlaps."""
    (width, height), (view_width, view_height) = size, view_size
    x1, x2 = box[0] * view_width / width, box[2] * view_width / width
    y1, y2 = box[1] * view_height / height, box[3] * view_height / height
    columns, rows = view_width // factor, view_height // factor
    target = torch.zeros(rows, columns)
    for row in range(rows):
        for column in range(columns):
            left, top = column * factor, row * factor
            target[row, column] = float(x1 < left + factor and x2 > left and y1 < top + factor and y2 > top)
    return target.flatten() / target.sum()


def _token_features(model, processor: ErgoProcessor, images: list[Image.Image]) -> tuple[torch.Tensor, ...]:
    """The merger's output tokens of each image (images aligned to the factor keep their size, as in
    ``ErgoProcessor``), the images processed side by side (``ErgoProcessor.images_side_by_side``)."""
    largest = max(image.width * image.height for image in images)
    pixels = processor.images_side_by_side(images, return_tensors="pt", size=size_up_to(largest))
    grid = pixels["image_grid_thw"].to(model.device)
    features = model.model.visual(pixels["pixel_values"].to(model.device), grid_thw=grid)
    features = getattr(features, "pooler_output", features)
    return features.split((grid.prod(-1) // processor.image_processor.merge_size ** 2).tolist())
