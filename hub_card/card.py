"""The model card of an ERGO Hub folder."""

from __future__ import annotations

from huggingface_hub import EvalResult, ModelCard, ModelCardData

from modeling_ergo.family_ergo import QWEN2_5_VL, Family

from .results import BENCHMARKS, results_table

RESULTS_TEMPLATE = """## Results

Measured with `ergo eval` (reference protocol: stage 1 sees the question stem, stage 2 the options and postfix;
prediction = the letters of the `<answer>` block, case-insensitive exact match; greedy decoding). A sample that
fails counts as wrong; the "reference protocol" column leaves failures out, as the reference evaluation does.
Modes: `ergo` (two stages at the stated budget), `full` (one pass at 16384 vision tokens), `coarse` (coarse view only).

{table}
"""

CARD_TEMPLATE = """---
{card_data}
---

# ERGO: two-stage high-resolution visual question answering on {family}

This folder is a {family} checkpoint with ERGO's remote code (arXiv 2509.21991). With
`trust_remote_code=True`, `generate()` first reasons over the image downsampled to **{coarse_budget} vision
tokens**, emits a region `<zoom>[x1, y1, x2, y2]</zoom>`, then answers from that region cropped out of the
original image at native resolution, in the same conversation.

## Usage

```python
from transformers import AutoModelForImageTextToText, AutoProcessor, pipeline

model = AutoModelForImageTextToText.from_pretrained(REPO, trust_remote_code=True, dtype="auto", device_map="auto")
processor = AutoProcessor.from_pretrained(REPO, trust_remote_code=True)
messages = [{{"role": "user", "content": [{{"type": "image", "image": "photo.jpg"}},
            {{"type": "text", "text": "What is the color of the bag?\\n(A) red\\n(B) black"}}]}}]
inputs = processor.apply_chat_template(messages, add_generation_prompt=True, tokenize=True,
                                       return_dict=True, return_tensors="pt").to(model.device)
out = model.generate(**inputs, max_new_tokens=512)
print(processor.post_process_image_text_to_text(out, prompt_length=inputs["input_ids"].shape[1])[0])

pipe = pipeline("image-text-to-text", model=REPO, trust_remote_code=True)
```

Command line (from the ERGO repository): `ergo infer --model REPO --image photo.jpg --question "..."`.

Engines that serve {family} natively (vLLM, SGLang) load this folder as the plain {family} it is
(`architectures` names the stock class); the two-stage loop then runs client-side.

{results}## Limitations

The two stages always use exactly one zoom. When stage 1 gives no usable region the processor's fallback
policy applies (default: the whole image at the crop budget) and the output reports it.

## Citation

```bibtex
@inproceedings{{lee2026ergo,
  title     = {{ERGO: Efficient High-Resolution Visual Understanding for Vision-Language Models}},
  author    = {{Lee, Jewon and Shin, Wooksu and Yang, Seungmin and Song, Ki-Ung and Lim, DongUk and Kim, Jaeyeon
               and Kim, Tae-Ho and Kim, Bo-Kyeong}},
  booktitle = {{International Conference on Learning Representations (ICLR)}},
  year      = {{2026}}
}}
```
"""


def build_model_card(base_model: str | None, coarse_budget: int, results: list[dict] | None = None,
                     model_name: str = "ERGO", family: Family = QWEN2_5_VL) -> ModelCard:
    """A model card with metadata (pipeline tag, library, base model), usage and, given ``ergo eval`` summaries,
    a results table and the model-index entries the Hub shows (the ``ergo`` mode's accuracy per benchmark)."""
    results = results or []
    eval_results = [
        EvalResult(task_type="visual-question-answering", dataset_type=BENCHMARKS[s["benchmark"]][0],
                   dataset_name=BENCHMARKS[s["benchmark"]][1], metric_type="accuracy",
                   metric_value=round(100 * s["accuracy"], 2),
                   metric_name=f"accuracy ({s['budget']} vision tokens, failures counted wrong)")
        for s in results if s["mode"] == "ergo" and s["accuracy"] is not None and s["benchmark"] in BENCHMARKS
    ]
    data = ModelCardData(
        library_name="transformers",
        pipeline_tag="image-text-to-text",
        license="apache-2.0",
        tags=["ergo", family.model_type, "high-resolution", "visual-question-answering", "custom_code"],
        base_model=base_model if base_model and "/" in base_model and not base_model.startswith(("/", ".")) else None,
        model_name=model_name if eval_results else None,
        eval_results=eval_results or None,
    )
    section = RESULTS_TEMPLATE.format(table=results_table(results)) if results else ""
    return ModelCard(CARD_TEMPLATE.format(card_data=data.to_yaml(), coarse_budget=coarse_budget, results=section,
                                          family=family.name))
