"""Loading an ERGO folder or a stock checkpoint of a supported family and answering one question, as the CLI and
the demo do."""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
from PIL import Image, ImageDraw
from transformers import AutoConfig, AutoModelForImageTextToText, AutoProcessor, CompileConfig, PreTrainedConfig

from modeling_ergo import family_of
from modeling_ergo.modeling_ergo import MODEL_CLASSES
from processing_ergo import ErgoProcessor
from processing_ergo.prompts_ergo import extract_answer


@dataclass
class ErgoResult:
    """One answered request, in plain types (JSON-ready)."""

    answer: str | None
    final_text: str
    stage1_text: str
    region: list[int] | None
    fallback: str | None
    second_image_size: list[int] | None
    vision_tokens: dict[str, int]
    seconds: dict[str, float]
    prompt_tokens: dict[str, int | None] | None = None
    """Per stage and in total, from the server's ``usage`` (``ErgoClient`` only)."""
    completion_tokens: dict[str, int | None] | None = None
    cached_prompt_tokens: dict[str, int | None] | None = None
    """Of ``prompt_tokens``, those the engine served from its prefix cache, where it reports them (vLLM)."""
    error: str | None = None
    """Why there is no answer (``ErgoClient`` only: a failed request or an unreadable image)."""

    def to_json(self) -> str:
        return json.dumps(asdict(self), indent=2)


CACHE_CHOICES = ("auto", "dynamic", "static")


def load(model_id: str, device: str = "auto", dtype: str = "auto", cache: str = "auto", **processor_settings):
    """(model, processor) from an ERGO folder (through ``trust_remote_code``, like any Hub user) or from a stock
    Qwen2.5-VL, Qwen3-VL or Qwen3.5 folder (through the installed ERGO class of its family, which reads it as is).

    ``cache="auto"`` generates with a static cache on CUDA (transformers then compiles the decode step, which both
    ERGO stages share) and with a dynamic one elsewhere (where nothing is compiled and a dynamic cache is faster)."""
    if cache not in CACHE_CHOICES:
        raise ValueError(f"cache must be one of {CACHE_CHOICES}, got {cache!r}")
    device = check_device(device)
    torch_dtype = {"auto": torch.bfloat16 if device.startswith("cuda") else torch.float32,
                   "bfloat16": torch.bfloat16, "float16": torch.float16, "float32": torch.float32}[dtype]
    config = AutoConfig.from_pretrained(model_id, trust_remote_code=True)
    if "AutoModelForImageTextToText" in (getattr(config, "auto_map", None) or {}):
        model = AutoModelForImageTextToText.from_pretrained(model_id, trust_remote_code=True, dtype=torch_dtype)
        processor = AutoProcessor.from_pretrained(model_id, trust_remote_code=True, **processor_settings)
    else:
        model = ergo_class(model_id).from_pretrained(model_id, dtype=torch_dtype)
        processor = ErgoProcessor.from_pretrained(model_id, **processor_settings)
    use_cache(model, "static" if cache == "static" or (cache == "auto" and device.startswith("cuda")) else "dynamic")
    return model.to(device).eval(), processor


def ergo_class(model_id: str | Path, revision: str | None = None) -> type:
    """The installed ERGO generation class of a checkpoint's family (an ERGO folder or a stock one, read from its
    ``config.json`` alone): what loads a folder without running its remote code, as training does."""
    config, _ = PreTrainedConfig.get_config_dict(str(model_id), revision=revision)
    return MODEL_CLASSES[family_of(config.get("model_type")).model_type]


def check_device(device: str) -> str:
    """The device to run on (``"auto"``: CUDA when there is one, else the CPU), checked before any weights load: a
    typo or an absent accelerator is then one clear ValueError, not a traceback from ``model.to`` after loading."""
    if device == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    try:
        parsed = torch.device(device)
    except RuntimeError:
        raise ValueError(f"unknown device {device!r}: use auto, cpu, cuda, cuda:N or mps") from None
    if parsed.type == "cpu":
        return device
    backend = getattr(torch, parsed.type, None)  # torch.cuda, torch.mps, torch.xpu, ...
    count = backend.device_count() if hasattr(backend, "device_count") and backend.is_available() else 0
    if count == 0:
        raise ValueError(f"device {device!r}: this machine has no {parsed.type} device available to torch "
                         f"{torch.__version__}; use cpu or auto")
    if parsed.index is not None and parsed.index >= count:
        raise ValueError(f"device {device!r}: this machine has {count} {parsed.type} device(s), "
                         f"{parsed.type}:0 to {parsed.type}:{count - 1}")
    return device


def use_cache(model, cache: str) -> None:
    """Generate with a ``"dynamic"`` or a ``"static"`` KV cache. Static: transformers compiles the decode step on
    CUDA, here as one graph (``fullgraph=True``: 8.9 against 10.3 ms/token with the default in the GPU issue's H100
    probes of the 7B shape); ERGO's two stages and later calls of the same batch size share it."""
    static = cache == "static"
    model.generation_config.cache_implementation = "static" if static else None
    model.generation_config.compile_config = CompileConfig(fullgraph=True) if static else None


def answer(model, processor, image, question: str, budget: int | None = None, max_new_tokens: int = 1024,
           stage1_generate_kwargs: dict | None = None) -> ErgoResult:
    """Run ERGO on one (image, question); ``budget`` (vision tokens) sets both the coarse and the crop budget."""
    inputs = processor.prepare([image], [question], coarse_budget=budget, crop_budget=budget).to(model.device)
    out = model.generate(**inputs, max_new_tokens=max_new_tokens, return_dict_in_generate=True,
                         stage1_generate_kwargs=stage1_generate_kwargs)
    final_text = processor.post_process_image_text_to_text(out.sequences, prompt_length=inputs["input_ids"].shape[1])[0]
    return ErgoResult(
        answer=extract_answer(final_text),
        final_text=final_text,
        stage1_text=out.stage1_texts[0],
        region=list(out.regions[0]) if out.regions[0] else None,
        fallback=out.fallbacks[0],
        second_image_size=list(out.crop_sizes[0]) if out.crop_sizes[0] else None,
        vision_tokens=out.vision_tokens[0],
        seconds={key: round(value, 4) for key, value in out.timings[0].items()},
    )


def draw_region(image: Image.Image, region, path: str | Path) -> Path:
    """Save ``image`` with ``region`` outlined (nothing drawn when there is no region)."""
    canvas = image.convert("RGB").copy()
    if region:
        width = max(3, min(canvas.size) // 200)
        ImageDraw.Draw(canvas).rectangle(region, outline=(255, 0, 0), width=width)
    canvas.save(path)
    return Path(path)


def summary(result: ErgoResult) -> str:
    """Human-readable report of one result."""
    if result.error:
        return f"failed:        {result.error}"
    tokens = result.vision_tokens
    full = tokens["full_resolution"]
    baseline = f"{full} for one full-resolution pass ({tokens['total'] / full:.0%})" if full else "no full-resolution pass possible"
    region = result.region if result.region else f"none ({result.fallback})"
    return "\n".join([
        f"answer:        {result.answer if result.answer is not None else result.final_text!r}",
        f"region:        {region}",
        f"second image:  {result.second_image_size}",
        f"vision tokens: stage 1 {tokens['stage1']} + stage 2 {tokens['stage2']} = {tokens['total']}  vs {baseline}",
        "seconds:       " + ", ".join(f"{key} {value:.3f}" for key, value in result.seconds.items()),
        *([f"usage:         prompt tokens {_per_stage(result.prompt_tokens)}; completion tokens "
           f"{_per_stage(result.completion_tokens)}"] if result.prompt_tokens else []),
        *([f"prefix cache:  cached prompt tokens {_per_stage(result.cached_prompt_tokens)}"]
          if result.cached_prompt_tokens and result.cached_prompt_tokens["total"] is not None else []),
        f"stage 1 said:  {result.stage1_text!r}",
    ])


def _per_stage(counts: dict) -> str:
    return f"stage 1 {counts['stage1']} + stage 2 {counts['stage2']} = {counts['total']}"
