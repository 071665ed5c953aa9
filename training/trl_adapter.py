"""Every use of ``GRPOTrainer``'s private surface, in one module, for the TRL versions it was written against.

TRL's public ``rollout_func`` cannot carry a rollout's own images into the loss forward (``docs/trl-rollout-images.md``
says what it lacks), so a rollout that adds an image mid-conversation (ERGO's crop) has to sit inside
``GRPOTrainer``. This module is the only place that does; ``training.rollout`` builds on its small API:
``RolloutGRPOTrainer.rollout`` (rows in, a ``Rollout`` out, by name), ``generate_turn`` (one generation with a given
``GenerationConfig``) and ``adjust_rewards``. The private things touched, and why:

- ``_generate_and_score_completions`` (overridden): the one call that sees the batch's rows; the columns in
  ``hidden_columns`` are kept out of TRL's view (it would put an ``image`` into every prompt and gather it to every
  rank for its logs). TRL hands ``_generate`` only the prompts (``[row["prompt"] for row in rows]``), so each row
  rides on its own prompt (``RowPrompt``) rather than on the trainer.
- ``_generate`` (overridden): runs ``rollout`` on the rows its prompts carry and returns TRL's 8-tuple, built here by
  name.
- ``_calculate_rewards`` (overridden): rewards get the policy's own tokens (the ``completion_ids`` extra field; TRL's
  are the whole completion, the injected turn's image tokens included), and ``adjust_rewards`` may void rows.
- ``self.tools`` (set after ``__init__``): a non-empty list makes TRL's loss forward take the pixels of every image of
  every sequence and ``mm_token_type_ids`` from the full sequence. Passing ``tools=`` to ``__init__`` would instead
  rewrite the processor's chat template and render a tool schema into every prompt.
- ``self._dist.summon_full_params`` (FSDP), ``self._tokenizer``, ``self._metrics``: what TRL's own generation uses
  and logs to; ``Trainer._prepare_input`` (transformers) moves the generation inputs as TRL's own do.
"""

from __future__ import annotations

import copy
import time
from dataclasses import dataclass, field

import torch
import trl
from packaging.specifiers import SpecifierSet
from packaging.version import Version
from transformers import GenerationConfig
from trl import GRPOTrainer
from trl.models import unwrap_model_for_generation
from trl.trainer.utils import pad

from modeling_ergo.generation_ergo import stop_token_ids

SUPPORTED_TRL = ">=1.16,<1.17"
"""The TRL releases whose ``GRPOTrainer`` internals this module was checked against (trl 1.16.0)."""


def check_trl_version(version: str) -> None:
    """Refuses a TRL outside ``SUPPORTED_TRL``: the private methods overridden here change between releases, and a
    changed one would train on wrong masks or images without an error."""
    if Version(version) not in SpecifierSet(SUPPORTED_TRL):
        raise ImportError(f"ERGO's GRPO rollout supports trl{SUPPORTED_TRL} (it overrides GRPOTrainer internals, see "
                          f"training/trl_adapter.py); trl {version} is installed: pip install 'trl{SUPPORTED_TRL}'")


check_trl_version(trl.__version__)


def _routes_images_per_sample():
    """Never called. A non-empty ``tools`` list makes TRL build the loss forward's pixel values from every image of
    every sample (each at its own size) and its ``mm_token_type_ids`` from the full sequence."""


class RowPrompt(list):
    """A prompt (TRL's list of messages) carrying its dataset row, every column, to ``_generate(prompts)``. The row
    stays on this process: TRL pickles the prompts to gather its logs from every rank, and a pickle (or a copy) of a
    ``RowPrompt`` is its plain messages, without the row and its full-resolution image."""

    def __init__(self, messages: list, row: dict):
        super().__init__(messages)
        self.row = row

    def __reduce__(self):
        return list, (list(self),)


@dataclass
class Rollout:
    """One batch of rollouts, one entry per rollout in every list. ``loss_mask`` is 1 on the tokens the loss trains
    (0 on injected ones); ``images`` holds every image of the prompt and completion, in sequence order;
    ``extra_fields`` reach the reward functions as keyword arguments (``completion_ids`` replaces TRL's)."""

    prompt_ids: list[list[int]]
    completion_ids: list[list[int]]
    loss_mask: list[list[int]]
    completions: list
    images: list[list]
    extra_fields: dict[str, list] = field(default_factory=dict)


class RolloutGRPOTrainer(GRPOTrainer):
    """A ``GRPOTrainer`` whose rollout is ``rollout(rows)``: generation, masks and images are the subclass's, the rest
    (reference and old log-probs, rewards, advantages, loss) is TRL's."""

    hidden_columns: tuple[str, ...] = ("image",)
    """Dataset columns TRL never sees (not in its prompts, not gathered for its logs); ``rollout`` gets them."""

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.tools = [_routes_images_per_sample]
        self._step_seconds = dict.fromkeys(("scoring", "rollout", "reward", "forward"), 0.0)  # of this training_step

    def rollout(self, rows: list[dict]) -> Rollout:
        """Generates one completion per row (rows are the batch's dataset rows, every column)."""
        raise NotImplementedError

    def adjust_rewards(self, rewards: torch.Tensor, inputs: list[dict]) -> torch.Tensor:
        """Rewards of all processes (rollouts x reward functions) before advantages; set a row to NaN to void it.
        ``inputs`` are this process's rows with the rollout's extra fields."""
        return rewards

    def scored_batch(self, rows: list[dict]) -> dict:
        """TRL's training batch for ``rows`` (advantages, masks, pixel values ...). Logs ``ergo/logprob_s``: the time
        outside the rollout and the rewards, that is the reference (and old) log-probs with TRL's batch assembly."""
        visible = [{**{key: value for key, value in row.items() if key not in self.hidden_columns},
                    "prompt": RowPrompt(row["prompt"], row)} for row in rows]
        seconds = self._step_seconds
        before = {name: seconds[name] for name in ("rollout", "reward")}
        started = time.perf_counter()
        try:
            batch = super()._generate_and_score_completions(visible)
        finally:
            for row in visible:  # TRL keeps the prompts for its logs; the rows (their images) are this step's only
                del row["prompt"].row
        scoring = time.perf_counter() - started
        seconds["scoring"] += scoring
        logprob = scoring - sum(seconds[name] - before[name] for name in before)
        mode = "train" if self.model.training else "eval"
        self._metrics[mode]["ergo/logprob_s"].append(self.across_processes([logprob]).max().item())
        return batch

    def across_processes(self, values: list[float]) -> torch.Tensor:
        """``values`` of every process, concatenated (every process must call it, in the same order)."""
        return self.accelerator.gather(torch.tensor(values, dtype=torch.float32, device=self.accelerator.device))

    def training_step(self, model, inputs, num_items_in_batch=None):
        """TRL's step, timed: ``ergo/loss_forward_s`` (the policy's loss forward) and ``ergo/loss_backward_s`` (the
        rest of the step outside generation and scoring: the backward), each the slowest process's."""
        self._step_seconds = dict.fromkeys(self._step_seconds, 0.0)
        started = time.perf_counter()
        loss = super().training_step(model, inputs, num_items_in_batch)
        total = time.perf_counter() - started
        forward, backward = self.across_processes(
            [self._step_seconds["forward"], total - self._step_seconds["scoring"] - self._step_seconds["forward"]]
        ).view(-1, 2).max(dim=0).values.tolist()
        self._metrics["train"]["ergo/loss_forward_s"].append(forward)
        self._metrics["train"]["ergo/loss_backward_s"].append(backward)
        return loss

    def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
        started = time.perf_counter()
        try:
            return super().compute_loss(model, inputs, return_outputs, num_items_in_batch)
        finally:
            self._step_seconds["forward"] += time.perf_counter() - started

    def generate_turn(self, prompt_ids: list[list[int]], pixel_fields: dict[str, torch.Tensor],
                      generation_config: GenerationConfig) -> list[list[int]]:
        """Each prompt's generated tokens up to and including its first end-of-sequence token, as TRL's transformers
        path generates them, but with ``generation_config`` (stage 2 has its own length limit)."""
        padded = pad([torch.tensor(ids) for ids in prompt_ids], padding_value=self._tokenizer.pad_token_id,
                     padding_side="left", pad_to_multiple_of=self.pad_to_multiple_of)
        attention = pad([torch.ones(len(ids), dtype=torch.long) for ids in prompt_ids], padding_value=0,
                        padding_side="left", pad_to_multiple_of=self.pad_to_multiple_of)
        mm_token_type_ids = torch.zeros_like(padded)
        mm_token_type_ids[padded == self.processing_class.image_token_id] = 1
        inputs = self._prepare_input({"input_ids": padded, "attention_mask": attention,
                                      "mm_token_type_ids": mm_token_type_ids, **pixel_fields})
        with (unwrap_model_for_generation(self.model_wrapped, self.accelerator,
                                          gather_deepspeed3_params=self.args.ds3_gather_for_generation,
                                          generation_kwargs=self.generation_kwargs,
                                          gradient_checkpointing_kwargs=self.args.gradient_checkpointing_kwargs) as model,
              torch.no_grad(), self._dist.summon_full_params(self.model_wrapped, recurse=False)):
            generated = model.generate(**inputs, generation_config=generation_config)[:, padded.size(1):].tolist()
        return [ids[:next((i + 1 for i, token in enumerate(ids) if token in self.stop_ids), len(ids))]
                for ids in generated]

    @property
    def stop_ids(self) -> frozenset[int]:
        """What ends a turn: ``generate``'s rule (``stop_token_ids``) over TRL's end-of-sequence ids and padding."""
        return stop_token_ids(self.eos_token_ids, self._tokenizer.pad_token_id, self._tokenizer)

    def with_max_new_tokens(self, limit: int) -> GenerationConfig:
        """A copy of TRL's generation config with another length limit (the trainer's own is left as it is)."""
        config = copy.deepcopy(self.generation_config)
        config.update(max_new_tokens=limit)
        return config

    # ------------------------------------------------------------------ GRPOTrainer's private methods (trl 1.16)

    def _generate_and_score_completions(self, inputs):
        return self.scored_batch(inputs)

    def _generate(self, prompts: list):
        started = time.perf_counter()
        rollout = self.rollout([prompt.row for prompt in prompts])
        self._step_seconds["rollout"] += time.perf_counter() - started
        self._log_lengths(rollout)
        # TRL's tuple: prompt ids, completion ids, tool mask, completions, sampling log-probs, extra fields, images of
        # each sequence (for the loss forward), tool images (non-empty: images inside the completion).
        return (rollout.prompt_ids, rollout.completion_ids, rollout.loss_mask, rollout.completions, None,
                rollout.extra_fields, rollout.images, [images[1:] for images in rollout.images])

    def _calculate_rewards(self, inputs, prompts, completions, completion_ids_list):
        started = time.perf_counter()
        policy_ids = [row["completion_ids"] for row in inputs]
        rewards = super()._calculate_rewards(inputs, prompts, completions, policy_ids)
        seconds = time.perf_counter() - started
        self._step_seconds["reward"] += seconds
        mode = "train" if self.model.training else "eval"
        self._metrics[mode]["ergo/reward_s"].append(self.across_processes([seconds]).max().item())
        return self.adjust_rewards(rewards, inputs)

    def _log_lengths(self, rollout: Rollout) -> None:
        """What TRL's ``_generate`` logs, over both stages: ``num_tokens`` (every token of every sequence, all
        processes) and ``completions/*`` over the trained tokens."""
        mode = "train" if self.model.training else "eval"
        seen = sum(len(p) + len(c) for p, c in zip(rollout.prompt_ids, rollout.completion_ids))
        seen = int(self.across_processes([seen]).sum().item())
        if mode == "train":
            self.state.num_input_tokens_seen += seen
        self._metrics[mode]["num_tokens"] = [self.state.num_input_tokens_seen]
        lengths = self.across_processes([sum(mask) for mask in rollout.loss_mask])
        metrics = self._metrics[mode]
        metrics["completions/mean_length"].append(lengths.mean().item())
        metrics["completions/min_length"].append(lengths.min().item())
        metrics["completions/max_length"].append(lengths.max().item())
