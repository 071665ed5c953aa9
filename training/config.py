"""Training configurations, beside their trainers (as TRL keeps ``grpo_config.py`` beside ``grpo_trainer.py``).

Both trainers build ERGO's views with the budgets of ``ErgoViewConfig``. A trainer applies them to its
``ErgoProcessor`` when it starts, so the processor holds the one value every view is built from, and the Hub folder
written at the end carries it.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from trl import GRPOConfig, SFTConfig

from processing_ergo import ErgoProcessor
from processing_ergo.geometry_ergo import PAPER_BUDGET, min_pixels_for

from .data import MULTIPLE_CHOICE_POSTFIX


EXAMPLE_KINDS = ("stage1", "ergo", "stage2", "crop", "full", "evidence")
"""The supervised example kinds (``training.sft``); ``ErgoSFTConfig`` has a ``<kind>_share`` for each."""


@dataclass
class ErgoViewConfig:
    """The vision-token budgets of the coarse view and the crop, and the stage-2 prompt, as at inference."""

    coarse_budget: int = field(default=PAPER_BUDGET, metadata={"help": "Vision tokens of the coarse view (paper: 640, 1280)."})
    crop_budget: int | None = field(default=None, metadata={"help": "Most vision tokens of the crop (default: coarse)."})
    stage2_template: str = field(default="reference", metadata={
        "help": "Stage-2 prompt: 'reference' (the published one, typo '<think> ... <think>' included) or 'fixed' "
                "('<think> ... </think>'); the format reward accepts what the chosen one asks for."})

    def apply_to(self, processor: ErgoProcessor) -> ErgoProcessor:
        """Sets the budgets and the template on ``processor`` (checked there), which every view and turn is then
        built with, and lowers its image processor's minimum to ERGO's (4 vision tokens): TRL's loss forward and
        the rollout's stage 1 call the image processor with its own bounds, and Qwen3-VL's and Qwen3.5's stock
        minimum of 64 tokens would enlarge a smaller coarse view or crop there (Qwen2.5-VL's is 4 already). The
        exported folder keeps that minimum, so an engine serving it keeps small crops as training saw them."""
        processor.check_settings(self.coarse_budget, self.crop_budget, self.stage2_template, processor.fallback)
        processor.coarse_budget, processor.crop_budget = self.coarse_budget, self.crop_budget
        processor.stage2_template = self.stage2_template
        image_processor = processor.image_processor
        image_processor.size = {**dict(image_processor.size), "shortest_edge": min_pixels_for(processor.factor)}
        return processor


@dataclass
class ErgoVisionTowerConfig:
    """Whether the vision tower trains, for both trainers."""

    freeze_vision_tower: bool = field(default=False, metadata={"help": "Train the language model only (keeps a "
                                                                      "warmed-up or pre-trained tower as it is)."})

    def apply_to_model(self, model) -> None:
        """Freezes the tower when asked, LoRA layers inside it included (``model`` may be a PEFT wrapper)."""
        if self.freeze_vision_tower:
            base = model.get_base_model() if hasattr(model, "get_base_model") else model
            base.model.visual.requires_grad_(False)


@dataclass
class ErgoGRPOConfig(ErgoViewConfig, ErgoVisionTowerConfig, GRPOConfig):
    """GRPOConfig plus ERGO's rollout settings. ``max_completion_length`` bounds stage 1."""

    stage2_max_completion_length: int = field(default=256, metadata={"help": "Most tokens of the stage-2 answer."})


@dataclass
class ErgoSFTConfig(ErgoViewConfig, ErgoVisionTowerConfig, SFTConfig):
    """SFTConfig plus the coarse/crop budgets (as at inference) and which example kinds each row gives."""

    stage1_share: float = field(default=0.0, metadata={"help": "Share of rows giving a stage-1-only example (the "
                                                                 "coarse view and the reply naming the region)."})
    ergo_share: float = field(default=1.0, metadata={"help": "Share of rows giving a two-stage example."})
    stage2_share: float = field(default=0.0, metadata={"help": "Share of rows giving stage 2's turn alone (the crop "
                                                                 "and the stage-2 prompt, answered as stage 2)."})
    crop_share: float = field(default=1.0, metadata={"help": "Share of rows giving a crop-only single turn."})
    full_share: float = field(default=1.0, metadata={"help": "Share of rows giving a full-resolution single turn "
                                                                 "(the costly kind: every vision token of the image)."})
    evidence_share: float = field(default=0.0, metadata={"help": "Share of rows giving a single turn over the "
                                                                     "gt_bbox crop alone (needs gt_bbox)."})
    example_mean_loss: bool = field(default=False, metadata={
        "help": "Average the loss over each example's reply tokens, then over the examples, so that a one-letter "
                "reply weighs as much as a 50-token one (with TRL's mean over all tokens it weighs 1/50 of it)."})
    multiple_choice_postfix: str = field(default=MULTIPLE_CHOICE_POSTFIX)
    remove_unused_columns: bool = False  # the collator reads the raw rows
    dataset_kwargs: dict = field(default_factory=lambda: {"skip_prepare_dataset": True})
    # Batches of like-sized examples: a full-resolution example padded into a batch of crops costs 8x its share.
    train_sampling_strategy: str = "group_by_length"

    def __post_init__(self):
        if not all(0.0 <= share <= 1.0 for share in self.shares.values()) or not any(self.shares.values()):
            raise ValueError(f"example shares must lie in [0, 1] and not all be 0, got {self.shares}")
        super().__post_init__()

    @property
    def shares(self) -> dict[str, float]:
        return {kind: getattr(self, f"{kind}_share") for kind in EXAMPLE_KINDS}
