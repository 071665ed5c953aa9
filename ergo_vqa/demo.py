"""The embedded default: ERGO end to end on a generated high-resolution image, offline, with the shipped model.

The model in ``ergo_vqa/demo_model`` is a 1.6M-parameter Qwen2.5-VL trained from scratch on the synthetic task
(``ergo_vqa.synthetic_task``) by this project's own recipe (``python -m training.synthetic_recipe``). It is loaded the way a
Hub model is (``AutoModelForImageTextToText`` / ``AutoProcessor`` with ``trust_remote_code``) and answers a test
question it has not seen: it looks at the coarse view, picks a region, reads the digit in the native-resolution crop.
"""

from __future__ import annotations

import shutil
from pathlib import Path

from hub_card.folder import copy_remote_code
from processing_ergo.geometry_ergo import budget_to_pixels, resize_to_budget
from processing_ergo.prompts_ergo import MULTIPLE_CHOICE_POSTFIX

from .evaluation import letters_match
from .inference import answer, draw_region, load, summary
from .synthetic_task import generate_sample

DEMO_MODEL = Path(__file__).resolve().parent / "demo_model"
"""The demo model as a complete Hub folder: weights, configs, tokenizer, and its remote code as symbolic links to
the package's modules (one copy of the code in the repository; a wheel carries them as files)."""


def hub_folder(out_dir: str | Path, model_dir: str | Path = DEMO_MODEL) -> Path:
    """A copy of the demo model under ``out_dir`` (written once) with the installed remote code as plain files, as
    a Hub download has it: a folder to serve, push or edit without touching the shipped one."""
    model_dir = Path(model_dir)
    if not (model_dir / "config.json").is_file():
        raise FileNotFoundError(f"no demo model in {model_dir}: rebuild it with `python -m training.synthetic_recipe "
                                f"runs/synthetic --ship` (about 52 minutes on 2 CPU cores)")
    folder = Path(out_dir) / "model"
    if not (folder / "config.json").is_file():
        shutil.copytree(model_dir, folder, dirs_exist_ok=True)
        copy_remote_code(folder)
    return folder


def run(out_dir: str | Path = "ergo-demo", budget: int | None = None, seed: int = 0,
        model_dir: str | Path = DEMO_MODEL, variant: str = "original") -> str:
    """Answer one generated question; write the image and the question (``image.png``, ``question.txt``), the scene
    with the region, the coarse view and the crop as PNGs under ``out_dir``. Returns the report. ``budget`` defaults to the one the model was trained at;
    ``variant`` is the synthetic task's (``synthetic_task.VARIANTS``)."""
    out_dir = Path(out_dir)
    folder = hub_folder(out_dir, model_dir)
    model, processor = load(str(folder), device="cpu")
    budget = budget or processor.coarse_budget
    sample = generate_sample(f"demo/{seed}", variant=variant)
    # As the model was trained and evaluated: the options, then V*'s answer-format line.
    question = "\n".join([sample.question, *sample.options, MULTIPLE_CHOICE_POSTFIX])
    result = answer(model, processor, sample.image, question, budget=budget, max_new_tokens=64)
    sample.image.save(out_dir / "image.png")  # the question and the unmarked image, to ask them elsewhere
    (out_dir / "question.txt").write_text(question + "\n")
    scene_path = draw_region(sample.image, result.region, out_dir / "scene.png")
    coarse_path = out_dir / "coarse.png"
    resize_to_budget(sample.image, budget_to_pixels(budget)).save(coarse_path)
    lines = [
        f"ERGO demo: {sample.image.width}x{sample.image.height} generated image, budget {budget} vision tokens",
        f"model:         {folder} (trained on the synthetic task, loaded with trust_remote_code)",
        f"question:      {question!r}",
        f"correct:       {sample.answer} (the digit {sample.digit}, on the "
        f"{'tag' if variant == 'context' else 'shape'} inside {sample.gt_bbox})",
        summary(result),
        f"verdict:       {'correct' if letters_match(result.final_text, sample.answer) else 'wrong'}",
        f"picture:       {scene_path} (region outlined in red); coarse view the model saw first: {coarse_path}",
    ]
    if result.region:
        crop_path = out_dir / "crop.png"
        sample.image.crop(result.region).save(crop_path)
        lines.append(f"crop:          {crop_path} (the region at native resolution, what stage 2 read)")
    return "\n".join(lines)
