"""The synthetic demo model end to end on a CPU: data, supervised warm-up, GRPO with TCE, evaluation.

    python -m training.synthetic_recipe runs/synthetic           # both variants: about 52 minutes on 2 CPU cores
    python -m training.synthetic_recipe runs/synthetic --ship    # then copy the trained model to ergo_vqa/demo_model
                                                          # (without its remote code: ergo_vqa.demo adds it)
    python -m training.synthetic_recipe runs/synthetic --ablation  # then GRPO's reward ablation from the same start
    python -m training.synthetic_recipe runs/original --variants original  # the first round's model: 40-52 minutes
    python -m training.synthetic_recipe runs/qwen3-vl --family qwen3_vl --variants original  # on a Qwen3-VL

By default one model learns both variants of the task (``ergo_vqa.synthetic_task.VARIANTS``), asked in the same
format, the shipped model's recipe: it learns the original variant first, then both (docs/synthetic-proof.md:
trained on both variants from the start, the language model never learned to read). ``--variants original`` stops
after the original variant, the first round's recipe.

Each step writes a folder under OUT and is skipped when that folder is complete, so an interrupted run resumes:

1. ``data``: the synthetic splits of the variants (``ergo_vqa.synthetic_task``), in the training schema, and the
   rows each step reads, with image paths relative to ``data``: ``data/original-train.jsonl`` (the original
   variant's training rows: the first phases'), ``data/warmup-train.jsonl`` (the vision warm-up's, its first
   ``Recipe.vision_warmup_rows``) and, with both variants, ``data/mixed-train.jsonl`` (original and contextual
   rows interleaved: the last phase's and GRPO's) and ``data/warmup-both-train.jsonl`` (the second warm-up's);
2. ``init``: a ``DEMO``-shape model of ``--family`` (Qwen2.5-VL) built from config, random weights, offline
   tokenizer;
3. ``vision``: the vision warm-up (``training.vision_warmup``: reading crops and pointing at the target on the
   coarse view), written as an ERGO Hub folder;
4. ``sft``, ``reading``, ``answering``: three supervised phases (``training.sft``, TRL's SFTTrainer, tower frozen) on
   the original variant, each from the previous one's model (``Recipe.formatting``, ``Recipe.reading``,
   ``Recipe.answering``): the format, then reading the crop, then reading it at stage 2 of the conversation;
5. with both variants, ``vision-both`` and ``both``: the vision warm-up again, from ``answering``'s model, on both
   variants' rows (a contextual target's cell cannot be pointed at without the question, which the tower never
   sees, so there it points at the landmark; the tag's cell is one step from it), then a fourth supervised phase on
   both variants (``Recipe.both_variants``), which relearns reading on the changed tower and learns the contextual
   stage 1;
6. ``grpo``: ``training.grpo.main`` (the project's GRPO recipe) from the last supervised model, with a frozen reward
   model for r_region that reads crops shown alone (``reading``'s; with both variants ``both``'s, the one that reads
   contextual crops); its ERGO folder is ``grpo/ergo`` (with both variants ``grpo-both/ergo``: a folder holds
   both);
7. ``eval``: ``ergo_vqa.evaluation`` on each variant's test split, the same samples for every mode: the
   full-resolution single pass for the reading model (the one trained on full images last), ERGO for each later
   supervised model, and for the GRPO model ERGO, ERGO with the target masked out of the coarse view
   (``mask_target``) and the coarse-only single pass; ``results.md`` and ``results.json`` hold the table.

Each step's wall time is appended to ``OUT/timings.jsonl``.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import shutil
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
from PIL import Image

from ergo_vqa.eval_data import SYNTHETIC_DATASETS, load_benchmark
from ergo_vqa.evaluation import evaluate
from ergo_vqa.inference import ergo_class, load
from ergo_vqa.synthetic_task import VARIANTS, split_path, write_splits
from ergo_vqa.tiny import DEMO, DEMO_VOCAB_SIZE, build_model, build_processor, build_tokenizer
from hub_card import save_hub_folder
from hub_card.folder import REMOTE_CODE_MODULES
from modeling_ergo import FAMILIES, family_of
from modeling_ergo.family_ergo import QWEN2_5_VL
from processing_ergo import ErgoProcessor

from .data import load_training_data
from .grpo import main as grpo_main
from .config import EXAMPLE_KINDS, ErgoSFTConfig
from .sft import build_sft_trainer
from .vision_warmup import warm_up_vision

SHIPPED_MODEL = Path(__file__).resolve().parent.parent / "ergo_vqa" / "demo_model"
SHIPPED_CARD = """---
library_name: transformers
pipeline_tag: image-text-to-text
tags: [ergo, qwen2_5_vl, synthetic]
---

# ERGO demo model (synthetic task)

A 1.6M-parameter Qwen2.5-VL-architecture model trained from scratch, on 2 CPU cores, by the ERGO project's own
recipe (`python -m training.synthetic_recipe runs/synthetic --ship`) on the synthetic task of
`ergo_vqa.synthetic_task`, both of its variants, asked in one format. In a 1344x1344 image seen at 144 vision tokens,
the question asks for the digit written on a target: in the original variant the one saturated shape, plain to see
in the coarse view; in the contextual variant a tag that the coarse view cannot tell from a dozen others, named by
its relation to a visible landmark ("the tag to the right of the blue circle"). The model zooms on the target's cell
and reads the digit in the native-resolution crop. The recipe: on the original variant, a vision warm-up (reading
digits in crops, pointing at the target on the coarse view) and three supervised phases on ERGO's two-turn format
(the format; reading crops; reading the crop at stage 2); then on both variants a second warm-up and a fourth
supervised phase; then GRPO with the TCE reward. It is a demonstration, not a general model: it answers ERGO's
two-stage conversation (its single passes over the coarse view and the full image are in the table). The table
below was measured on held-out questions when it was trained (docs/synthetic-proof.md in the project says how).

Load it with `AutoModelForImageTextToText.from_pretrained(path, trust_remote_code=True)`.

## Results on the held-out test split (greedy, CPU)

{table}
"""


@dataclass(frozen=True)
class SupervisedPhase:
    """One supervised phase (``training.sft``): the examples each training row gives and how the loss weighs them."""

    shares: tuple[tuple[str, float], ...]
    """(example kind, share of the training rows giving one), as ``ErgoSFTConfig``'s ``<kind>_share``."""
    example_mean_loss: bool = False
    learning_rate: float = 1e-3
    max_steps: int = -1
    """Batches of 8; -1: ``Recipe.epochs`` of the phase's examples."""


@dataclass(frozen=True)
class Recipe:
    """The sizes behind the published table (docs/synthetic-proof.md)."""

    splits: tuple[tuple[str, int], ...] = (("train", 3000), ("validation", 100), ("test", 200))
    """The original variant's splits: its training rows are the first phases' (every one) and the vision warm-up's
    (the first ``vision_warmup_rows``)."""
    context_splits: tuple[tuple[str, int], ...] = (("train", 2000), ("validation", 100), ("test", 200))
    """The contextual variant's, with both variants: its training rows are the last phase's and GRPO's, beside the
    first ``mixed_original_rows`` original rows."""
    variants: tuple[str, ...] = ("original", "context")
    """The task variants trained and evaluated (``--variants``). The default is the shipped model's recipe: both,
    which runs the original variant's steps, then the second warm-up and the phase on both variants (module
    docstring); ``make ablation`` runs on it. The original variant alone is the first round's recipe."""
    mixed_original_rows: int = 1000
    """With both variants, the first this many original rows join every contextual row in ``mixed-train.jsonl``:
    the original variant is learned by then, and the contextual stage 1 (a landmark, then a step to a neighbouring
    cell) has the more to learn."""
    budget: int = 144
    """Coarse and crop budget, vision tokens: the 1344x1344 image shrinks 4x in the coarse view."""
    vision_warmup_steps: int = 300
    vision_warmup_batch: int = 16
    """Images of each objective per warm-up step."""
    vision_warmup_rows: int = 1000
    """The first this many training rows of each variant feed the vision warm-ups (both objectives)."""
    both_warmup_steps: int = 150
    both_warmup_learning_rate: float = 5e-4
    """The second warm-up (both variants), from a tower that already reads the original variant: half the first's
    steps and learning rate."""
    freeze_vision_tower: bool = True
    """The warm-up's features are used as they are: the language model learns to find and copy them, and each step is
    cheaper (measurements: docs/synthetic-proof-history.md)."""
    formatting: SupervisedPhase = SupervisedPhase(
        shares=(("stage1", 1.0), ("ergo", 0.5), ("crop", 1.0), ("full", 0.02)))
    """A stage-1-only example from every training row (the cheap kind that teaches where to zoom), the two-stage
    conversation from half, the crop alone from every row, a few full images; loss averaged over all tokens, as TRL
    does. The crop examples are what lets phase 2 learn to read (docs/synthetic-proof-history.md)."""
    reading: SupervisedPhase = SupervisedPhase(shares=(("stage1", 0.34), ("crop", 1.0)), example_mean_loss=True)
    """Loss averaged per example, so one-letter crop replies weigh as much as 50-token stage-1 replies; a crop from
    every row, stage-1 examples from a third to keep stage 1 (the runs behind these choices:
    docs/synthetic-proof-history.md). This phase's model is r_region's frozen reward model."""
    answering: SupervisedPhase = SupervisedPhase(
        shares=(("stage2", 1.0), ("ergo", 0.34), ("stage1", 0.34)), example_mean_loss=True)
    """Stage 2 reading the crop inside the conversation: reading a crop shown alone does not carry over to stage 2,
    and stage 2's turn alone (``stage2`` examples) does (docs/synthetic-proof-history.md)."""
    both_variants: SupervisedPhase = SupervisedPhase(
        shares=(("stage2", 1.0), ("stage1", 1.0), ("ergo", 0.34), ("crop", 0.34)), example_mean_loss=True)
    """With both variants, the phase after the second warm-up: stage 2's turn alone and stage 1 from every row (the
    changed tower has to be read again; the contextual stage 1 is new), two-stage examples, and crops alone from a
    third, so that this model can be r_region's reward model on both variants."""
    grpo_steps: int = 40
    grpo_learning_rate: float = 1e-4
    box_threshold: float = 0.1
    """γ of r_box: the target's cell is 1/16 of the image, so only a box about one cell large earns it (the paper's
    0.6 does not tell the target's cell from a box ten times larger)."""
    seed: int = 0
    epochs: float = 1.0
    """Of each supervised phase (a fraction stops it early, with its learning-rate schedule fitted to the shorter
    run): ``--epochs`` trains a smaller model when the CPU is not free (docs/synthetic-proof.md). Below 1 the model
    may not learn to read at all: with phases 1, 3 and 4 shortened it did not (docs/synthetic-proof.md, fifth run)."""
    eval_limit: int | None = None
    """The first this many test questions of each variant (default: all); ``--eval-limit``."""
    full_eval_limit: int | None = 50
    """The full-resolution control (2304 vision tokens, about 0.9 s a question, six times ERGO's) on the first this
    many of them (None: as many as the others): the evaluation took 14 minutes with it on all 200 and the rows of
    ``eval_every_phase``."""
    eval_every_phase: bool = False
    """ERGO with the supervised models after phase 2 as well (``--eval-every-phase``; about 5 minutes more): the
    published table's rows for phases 3 and 4 (docs/synthetic-proof.md)."""
    ablation_arms: tuple[tuple[str, tuple[str, ...]], ...] = (
        ("all rewards", ()),
        ("r_acc + r_format", ("--box_weight", "0", "--reward_model", "", "--no_region_reward", "true")),
        ("r_TCE only", ("--accuracy_weight", "0", "--format_weight", "0")),
    )
    """GRPO's reward ablation (``ablation``): the arms' flags over the recipe's GRPO arguments. All rewards is the
    paper's (and the recipe's); r_TCE = r_region + 0.5 r_box."""
    ablation_seeds: tuple[int, ...] = (0, 1)
    family: str = QWEN2_5_VL.model_type
    """The model family (``modeling_ergo.FAMILIES``), ``--family``: the demo model is Qwen2.5-VL; the same recipe
    trains a ``DEMO``-shape Qwen3-VL or Qwen3.5 on the same data, in that family's geometry and grounding."""

    def __post_init__(self):
        if "original" not in self.variants:
            raise ValueError(f"variants {self.variants}: the recipe learns the original variant first (phases 1-3), "
                             "so it needs it; train both with ('original', 'context')")


def run(out: Path, recipe: Recipe = Recipe()) -> dict:
    """Every step (module docstring); returns the evaluation's table and rows, and the GRPO model's folder."""
    out.mkdir(parents=True, exist_ok=True)
    torch.manual_seed(recipe.seed)
    trained = train_steps(out, recipe)
    grpo = trained.grpo / "ergo"
    phases = []
    if recipe.eval_every_phase:
        phases = [("SFT phases 1-3", trained.answering, "ergo")]
        phases += [("SFT phases 1-4 (both variants)", trained.both, "ergo")] if trained.both else []
    start = time.perf_counter()
    result = evaluate_all([("SFT phases 1-2", trained.reading, "full"), *phases, ("SFT + GRPO", grpo, "ergo"),
                           ("SFT + GRPO", grpo, "ergo masked"), ("SFT + GRPO", grpo, "coarse")], out, recipe.budget,
                          limit=recipe.eval_limit, full_limit=recipe.full_eval_limit, variants=recipe.variants)
    _log_time(out, "eval", start)
    return result | {"model": grpo}


@dataclass(frozen=True)
class Trained:
    """The supervised models ``train_steps`` leaves under ``out``, and what GRPO starts from, reads, is rewarded by
    and writes."""

    out: Path
    both_variants: bool

    @property
    def reading(self) -> Path:
        return self.out / "reading"

    @property
    def answering(self) -> Path:
        return self.out / "answering"

    @property
    def both(self) -> Path | None:
        """The phase on both variants' model (None: the original variant alone)."""
        return self.out / "both" if self.both_variants else None

    @property
    def grpo_start(self) -> Path:
        return self.both or self.answering

    @property
    def reward_model(self) -> Path:
        """r_region's frozen reward model: the last supervised model that reads crops shown alone."""
        return self.both or self.reading

    @property
    def grpo_rows(self) -> Path:
        return self.out / "data" / ("mixed-train.jsonl" if self.both_variants else "original-train.jsonl")

    @property
    def grpo(self) -> Path:
        """GRPO's output folder (its ERGO folder is ``ergo`` inside), one per start: a folder where the original
        variant's recipe ran keeps its GRPO model when both variants' run there."""
        return self.out / ("grpo-both" if self.both_variants else "grpo")

    @property
    def ablation(self) -> Path:
        """The reward ablation's arms (``ablation``), one folder per start, as ``grpo``."""
        return self.out / ("ablation-both" if self.both_variants else "ablation")


def train_steps(out: Path, recipe: Recipe) -> Trained:
    """The steps from the data to GRPO's (each skipped when its folder is complete)."""
    trained = Trained(out, "context" in recipe.variants)
    data, init, vision, sft = out / "data", out / "init", out / "vision", out / "sft"
    original = data / "original-train.jsonl"
    views = {}  # each row's coarse view and crop, built once for the warm-ups and phases (training.sft.row_views)
    _step(out, "data", trained.grpo_rows, lambda: write_data(data, recipe))
    _step(out, "init", init / "config.json", lambda: build_init(init, recipe.seed, recipe.family))
    _step(out, "vision", vision / "config.json",
          lambda: vision_warm_up(init, data / "warmup-train.jsonl", vision, recipe, recipe.vision_warmup_steps,
                                 views=views))
    _step(out, "sft", sft / "config.json",
          lambda: supervised_phase(vision, original, sft, recipe, recipe.formatting, views=views))
    _step(out, "reading", trained.reading / "config.json",
          lambda: supervised_phase(sft, original, trained.reading, recipe, recipe.reading, views=views))
    _step(out, "answering", trained.answering / "config.json",
          lambda: supervised_phase(trained.reading, original, trained.answering, recipe, recipe.answering, views=views))
    if trained.both:
        vision_both = out / "vision-both"
        _step(out, "vision-both", vision_both / "config.json",
              lambda: vision_warm_up(trained.answering, data / "warmup-both-train.jsonl", vision_both, recipe,
                                     recipe.both_warmup_steps, recipe.both_warmup_learning_rate, views=views))
        _step(out, "both", trained.both / "config.json",
              lambda: supervised_phase(vision_both, trained.grpo_rows, trained.both, recipe, recipe.both_variants,
                                       views=views))
    _step(out, trained.grpo.name, trained.grpo / "ergo" / "config.json",
          lambda: grpo_main(grpo_arguments(trained.grpo_start, trained.reward_model, trained.grpo_rows, trained.grpo,
                                           recipe)))
    return trained


def write_data(data: Path, recipe: Recipe) -> Path:
    """The splits of ``Recipe.variants`` under ``data`` and the rows each step reads (module docstring), interleaved
    evenly where they hold both variants, so that every "first share of the rows" of a supervised phase holds them in
    proportion; the warm-up rows keep the contextual rows' ``landmark``. Returns ``original-train.jsonl``. GRPO's rows
    (``Trained.grpo_rows``) are written last: the step is complete once they exist, so a folder whose data holds the
    original variant alone gets the contextual rows before the steps on both variants read them."""
    splits = {"original": dict(recipe.splits), "context": dict(recipe.context_splits)}
    for variant in recipe.variants:
        write_splits(data, splits[variant], seed=recipe.seed, variant=variant)
    _write_rows(data / "warmup-train.jsonl", _interleaved(data, {"original": recipe.vision_warmup_rows}))
    original = _write_rows(data / "original-train.jsonl", _interleaved(data, {"original": None}), landmark=False)
    if "context" in recipe.variants:
        _write_rows(data / "warmup-both-train.jsonl",
                    _interleaved(data, {variant: recipe.vision_warmup_rows for variant in recipe.variants}))
        _write_rows(data / "mixed-train.jsonl",
                    _interleaved(data, {"original": recipe.mixed_original_rows, "context": None}), landmark=False)
    return original


def _write_rows(path: Path, rows: list[dict], landmark: bool = True) -> Path:
    """``rows`` as JSONL; without their ``landmark`` unless ``landmark`` (only the vision warm-up reads it)."""
    path.write_text("".join(json.dumps({key: value for key, value in row.items() if landmark or key != "landmark"})
                            + "\n" for row in rows))
    return path


def _interleaved(data: Path, rows_per_variant: dict[str, int | None]) -> list[dict]:
    """The first ``rows_per_variant[variant]`` training rows of each variant (None: all), interleaved evenly, with
    image paths relative to ``data`` and a ``variant`` and ``landmark`` (None on the original variant) on every
    row."""
    placed = []
    for variant, count in rows_per_variant.items():
        path = split_path(data, "train", variant)
        rows = [json.loads(line) for line in path.read_text().splitlines()][:count]
        folder = path.parent.relative_to(data)
        for index, row in enumerate(rows):
            row = row | {"variant": variant, "landmark": row.get("landmark"), "image": str(folder / row["image"])}
            placed.append(((index + 0.5) / len(rows), variant, row))
    return [row for *_, row in sorted(placed, key=lambda item: item[:2])]


def _step(out: Path, name: str, done: Path, build: Callable[[], object]) -> None:
    """Runs ``build`` unless its output ``done`` exists (an interrupted run resumes), timing it."""
    if not done.is_file():
        start = time.perf_counter()
        build()
        _log_time(out, name, start)


def _log_time(out: Path, name: str, start: float) -> None:
    """Appends the step's wall time to ``out/timings.jsonl``: ``make demo-model`` is meant to fit in 45 minutes on 2 CPU
    cores."""
    with (out / "timings.jsonl").open("a") as log:
        log.write(json.dumps({"step": name, "seconds": round(time.perf_counter() - start, 1)}) + "\n")


def build_init(folder: Path, seed: int, family: str = QWEN2_5_VL.model_type) -> Path:
    """A ``DEMO``-shape model of ``family`` with random weights and the offline tokenizer, as an ERGO Hub folder."""
    model_family = family_of(family)
    tokenizer = build_tokenizer(DEMO_VOCAB_SIZE, model_family)
    return save_hub_folder(build_model(tokenizer, DEMO, seed=seed, family=model_family),
                           build_processor(tokenizer, model_family), folder)


def vision_warm_up(init: Path, train_file: Path, folder: Path, recipe: Recipe, steps: int,
                   learning_rate: float = 1e-3, views: dict | None = None) -> Path:
    """The vision tower of the model in ``init`` taught to read and to point (``training.vision_warmup``); ``views``:
    the rows' coarse views and crops kept across steps (``training.sft.row_views``)."""
    processor = ErgoProcessor.from_pretrained(init, coarse_budget=recipe.budget)
    model = ergo_class(init).from_pretrained(init, dtype=torch.float32)
    dataset = load_training_data(str(train_file))
    history = warm_up_vision(model, processor, dataset, steps=steps, batch_size=recipe.vision_warmup_batch,
                             learning_rate=learning_rate, seed=recipe.seed, views=views)
    save_hub_folder(model, processor, folder, base_model="synthetic-init")
    (folder / "warmup.json").write_text(json.dumps(asdict(history)) + "\n")
    return folder


def supervised_phase(start: Path, train_file: Path, folder: Path, recipe: Recipe, phase: SupervisedPhase,
                     views: dict | None = None) -> Path:
    """One supervised phase (``training.sft``, TRL's SFTTrainer) from the model in ``start``; ``views``: as
    ``vision_warm_up``'s."""
    processor = ErgoProcessor.from_pretrained(start, coarse_budget=recipe.budget)
    model = ergo_class(start).from_pretrained(start, dtype=torch.float32)
    dataset = load_training_data(str(train_file))
    shares = dict(phase.shares)
    args = ErgoSFTConfig(
        output_dir=str(folder.parent / f"{folder.name}-run"), coarse_budget=recipe.budget,
        **{f"{kind}_share": shares.get(kind, 0.0) for kind in EXAMPLE_KINDS},
        freeze_vision_tower=recipe.freeze_vision_tower, example_mean_loss=phase.example_mean_loss,
        num_train_epochs=recipe.epochs, max_steps=phase.max_steps,
        learning_rate=phase.learning_rate, lr_scheduler_type="cosine",
        warmup_steps=0.05, per_device_train_batch_size=8, weight_decay=0.0, logging_steps=10, save_strategy="no",
        report_to="none", use_cpu=True, bf16=False, gradient_checkpointing=False, seed=recipe.seed,
        dataloader_num_workers=0, max_length=None,
    )
    trainer = build_sft_trainer(model, processor, dataset, args, views)
    trainer.train()
    save_hub_folder(trainer.model, processor, folder, base_model="synthetic-init")
    return folder


def grpo_arguments(policy: Path, reward_model: Path, train_file: Path, out: Path, recipe: Recipe) -> list[str]:
    """The shipped 7B recipe with these models, data and CPU-sized settings."""
    recipe_file = Path(__file__).parent / "recipes" / "ergo-qwen2.5-vl-7b.yaml"
    return [
        "--config", str(recipe_file), "--model_name_or_path", str(policy), "--dataset", str(train_file),
        "--reward_model_endpoint", "", "--reward_model", str(reward_model), "--reward_model_batch_size", "16",
        "--dtype", "float32", "--output_dir", str(out), "--max_steps", str(recipe.grpo_steps),
        "--save_steps", str(recipe.grpo_steps), "--use_cpu", "true", "--bf16", "false",
        "--gradient_checkpointing", "false", "--per_device_train_batch_size", "8", "--gradient_accumulation_steps", "1",
        "--num_generations", "4", "--max_completion_length", "64", "--stage2_max_completion_length", "32",
        "--coarse_budget", str(recipe.budget), "--learning_rate", str(recipe.grpo_learning_rate),
        "--box_threshold", str(recipe.box_threshold),
        "--temperature", "1.0", "--report_to", "none", "--use_peft", "false", "--seed", str(recipe.seed),
    ]


def evaluate_all(runs: list[tuple[str, Path, str]], out: Path, budget: int, table: str = "results",
                 limit: int | None = None, full_limit: int | None = None,
                 variants: tuple[str, ...] = VARIANTS) -> dict:
    """The table ``OUT/<table>.md`` (and ``.json``): for each (model name, folder, mode) and each of ``variants``' test
    split in ``OUT/data`` (its first ``limit`` questions; mode ``full`` its first ``full_limit`` of those), accuracy,
    vision tokens and latency, and for ERGO how often stage 1's region held the target and the mean share of the
    image it cut (1 without a region). Mode ``ergo masked`` is ERGO with the target masked out of the coarse view
    (``evaluate``'s ``mask_target``). "share of full" is of the variant's full-resolution pass. Records go to
    ``OUT/eval/<model folder under OUT, or its name>``, so a model in two tables runs once."""
    rows = []
    for dataset, variant in SYNTHETIC_DATASETS.items():
        if variant not in variants:
            continue
        samples = load_benchmark(dataset, out / "data", split="test", limit=limit)
        targets = {sample.id: sample.gt_bbox for sample in samples}
        for name, folder, mode in runs:
            model, processor = load(str(folder), device="cpu")
            where = folder.relative_to(out) if folder.is_relative_to(out) else folder.name
            records = out / "eval" / re.sub(r"[^a-z0-9]+", "-", str(where).lower()).strip("-")
            asked = samples[:full_limit] if mode == "full" else samples
            summary = evaluate(model, processor, asked, mode.split()[0], records, dataset, budget=budget,
                               batch_size=8, max_new_tokens=64, progress=False, mask_target=mode.endswith("masked"))
            hits = area = None
            if mode.startswith("ergo"):
                regions = {r["id"]: r["region"] for r in map(json.loads, (records / summary["records"])
                                                             .read_text().splitlines())}
                hits = sum(_contains(regions.get(i), box) for i, box in targets.items()) / len(targets)
                area = sum(_area_share(regions.get(i), sample.image) for i, sample in
                           zip(targets, samples)) / len(samples)
            rows.append({**summary, "variant": variant, "model": name, "mode": mode,  # the table's names
                         "target_in_region": hits, "region_area_share": area})
    lines = ["| variant | model | mode | questions | accuracy | target inside the region | mean crop area share | "
             "vision tokens / sample | share of full | s / sample |", "|---|---|---|---|---|---|---|---|---|---|"]
    for row in rows:
        full = next((r for r in rows if r["variant"] == row["variant"] and r["mode"] == "full"), None)
        share = f"{100 * row['mean_vision_tokens'] / full['mean_vision_tokens']:.0f}%" if full else "-"
        hits, area = ("-" if row[key] is None else f"{100 * row[key]:.1f}%"
                      for key in ("target_in_region", "region_area_share"))
        lines.append(f"| {row['variant']} | {row['model']} | {row['mode']} | {row['samples']} | "
                     f"{100 * row['accuracy']:.1f}% | {hits} | "
                     f"{area} | {row['mean_vision_tokens']:.0f} | {share} | {row['mean_seconds']:.2f} |")
    text = "\n".join(lines) + "\n\nQuestions: the first of each variant's test split; 10 options each (chance 10%).\n"
    (out / f"{table}.md").write_text(text)
    (out / f"{table}.json").write_text(json.dumps(rows, indent=2) + "\n")
    return {"table": text, "rows": rows}


def _area_share(region: list[int] | None, image: Path) -> float:
    """The share of the image a region covers; 1 without one (the fallback then reads the whole image)."""
    if region is None:
        return 1.0
    with Image.open(image) as opened:
        width, height = opened.size
    return (region[2] - region[0]) * (region[3] - region[1]) / (width * height)


def _contains(region: list[int] | None, box: list[int]) -> bool:
    return region is not None and region[0] <= box[0] and region[1] <= box[1] and region[2] >= box[2] and region[3] >= box[3]


def ablation(out: Path, recipe: Recipe = Recipe()) -> dict:
    """GRPO's reward ablation from one supervised start, the one the recipe's GRPO has (``Trained.grpo_start``),
    with the recipe's GRPO settings and steps for every arm (``Recipe.ablation_arms``) and seed
    (``Recipe.ablation_seeds``); the arm with all rewards and the recipe's seed is the recipe's own ``grpo`` step.
    The start suits the ablation when rewards still differ within rollout groups, as on a variant it does not answer
    yet (what the starts gave so far: docs/synthetic-proof.md). ``OUT/ablation.md`` holds the table: the start and
    every arm, ERGO on the recipe's variants' test splits."""
    trained = train_steps(out, recipe)
    runs = [("supervised start", trained.grpo_start, "ergo")]
    for seed in recipe.ablation_seeds:  # every arm of one seed before the next seed's
        for arm, flags in recipe.ablation_arms:
            folder = trained.ablation / f"{re.sub(r'[^a-z0-9]+', '-', arm.lower()).strip('-')}-seed{seed}"
            if not flags and seed == recipe.seed:
                folder = trained.grpo
            arguments = grpo_arguments(trained.grpo_start, trained.reward_model, trained.grpo_rows, folder, recipe)
            _step(out, f"ablation {arm} seed {seed}", folder / "ergo" / "config.json",
                  lambda: grpo_main([*arguments, *flags, "--seed", str(seed)]))
            runs.append((f"{arm}, seed {seed}", folder / "ergo", "ergo"))
    start = time.perf_counter()
    result = evaluate_all(runs, out, recipe.budget, table="ablation", limit=recipe.eval_limit,
                          variants=recipe.variants)
    _log_time(out, "ablation eval", start)
    return result


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("out", type=Path, help="folder for data, checkpoints and results")
    parser.add_argument("--ship", action="store_true", help=f"copy the SFT + GRPO model to {SHIPPED_MODEL}")
    parser.add_argument("--ablation", action="store_true",
                        help="GRPO's reward ablation instead (OUT/ablation.md), after the supervised steps")
    parser.add_argument("--epochs", type=float, default=1.0, help="of each supervised phase (default 1)")
    parser.add_argument("--eval-limit", type=int, default=None,
                        help="evaluate the first N test questions of each variant (default all)")
    parser.add_argument("--eval-every-phase", action="store_true",
                        help="evaluate ERGO with the supervised models after phase 2 too (about 5 minutes more)")
    defaults = Recipe()
    parser.add_argument("--family", choices=sorted(FAMILIES), default=defaults.family,
                        help="the model family to train (default: Qwen2.5-VL, the demo model's)")
    parser.add_argument("--variants", nargs="+", choices=VARIANTS, default=list(defaults.variants),
                        help="the task variants to train and evaluate (default: both, the shipped model's recipe; "
                             "the original alone: the first round's)")
    args = parser.parse_args(argv)
    variants = tuple(variant for variant in VARIANTS if variant in args.variants)
    if args.ship and (args.family != defaults.family or variants != defaults.variants):
        parser.error("--ship replaces the demo model, a Qwen2.5-VL trained on both variants, whose card says so; "
                     "train other families and variants without it")
    try:
        recipe = Recipe(epochs=args.epochs, eval_limit=args.eval_limit, eval_every_phase=args.eval_every_phase,
                        family=args.family, variants=variants)
    except ValueError as error:
        parser.error(str(error))
    if args.ablation:
        print(ablation(args.out, recipe)["table"])
        return
    result = run(args.out, recipe)
    print(result["table"])
    if args.ship:
        ship(result["model"], SHIPPED_MODEL, SHIPPED_CARD.format(table=result["table"]))
        print(f"shipped to {SHIPPED_MODEL}")


def ship(trained: Path, target: Path, card: str) -> None:
    """``target`` becomes the trained folder with ``card``, its remote code linked to this package's files (one copy
    of the code to keep up to date; a wheel stores the links as files), as the shipped demo folder is."""
    shutil.rmtree(target, ignore_errors=True)
    shutil.copytree(trained, target, ignore=shutil.ignore_patterns("*.py"))
    for module in REMOTE_CODE_MODULES:
        source = Path(module.__file__).resolve()
        (target / source.name).symlink_to(os.path.relpath(source, target))
    (target / "README.md").write_text(card)


if __name__ == "__main__":
    main()
