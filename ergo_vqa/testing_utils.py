"""Making a random-weight model say a given text, so ERGO's plumbing can be exercised without trained weights.

``ScriptedText`` is an ordinary ``LogitsProcessor``: it leaves generation, caching and decoding to transformers
and only forces which token wins at each step. It reaches one stage through ``generate``'s documented per-stage
arguments, ``stage1_generate_kwargs`` / ``stage2_generate_kwargs`` (``scripted_stage1`` builds them), so nothing
patches ``model.generate``: the loop under test is the one users run.
"""

from __future__ import annotations

import torch
from transformers import LogitsProcessor, LogitsProcessorList


class ScriptedText(LogitsProcessor):
    """Forces row i of a batch to emit ``scripts[i]`` (token ids) and then ``end_id`` forever.

    The prompt length is taken from the first call, so use one instance per ``generate`` call.
    """

    def __init__(self, scripts: list[list[int]], end_id: int):
        self.scripts, self.end_id = scripts, end_id
        self.prompt_length: int | None = None

    def __call__(self, input_ids: torch.LongTensor, scores: torch.FloatTensor) -> torch.FloatTensor:
        if self.prompt_length is None:
            self.prompt_length = input_ids.shape[1]
        step = input_ids.shape[1] - self.prompt_length
        forced = torch.full_like(scores, float("-inf"))
        for row, script in enumerate(self.scripts):
            forced[row, script[step] if step < len(script) else self.end_id] = 0.0
        return forced


def scripted_stage1(processor, texts: list[str]) -> dict:
    """``stage1_generate_kwargs`` that make stage 1 produce ``texts`` (one per sample of the batch); as
    ``stage2_generate_kwargs`` they script the answer the same way."""
    tokenizer = processor.tokenizer
    scripts = [tokenizer(text, add_special_tokens=False)["input_ids"] for text in texts]
    end_id = tokenizer.convert_tokens_to_ids(tokenizer.eos_token)
    processor_list = LogitsProcessorList([ScriptedText(scripts, end_id)])
    return {"logits_processor": processor_list, "max_new_tokens": max(len(script) for script in scripts) + 1}


def zoom_text(box: tuple[int, int, int, int], thought: str = "The answer needs a closer look at this region.") -> str:
    """A stage-1 text in ERGO's format asking for ``box`` (coarse-image pixels)."""
    return f"<think> {thought} </think> <zoom>[{box[0]}, {box[1]}, {box[2]}, {box[3]}]</zoom>"
