"""The embedded default: ERGO end to end on a generated high-resolution image, offline, on a locally built model.

The model folder is written once (random weights, see ``ergo_vqa.tiny``) and then loaded back through
``AutoModelForImageTextToText``/``AutoProcessor`` with ``trust_remote_code``, exactly as a Hub model is. A
random-weight model cannot find anything, so its stage-1 text is scripted to zoom on the target; everything
after that (parsing, mapping, cropping, stage 2, accounting) is the real pipeline. The output says so.
"""

from __future__ import annotations

import random
from dataclasses import dataclass
from pathlib import Path

from PIL import Image, ImageDraw

from hub_card import save_hub_folder
from processing_ergo.geometry_ergo import budget_to_pixels, smart_resize

from .inference import answer, draw_region, load, summary
from .scripted import scripted_stage1, zoom_text
from .tiny import build_model, build_processor, build_tokenizer


@dataclass
class Scene:
    image: Image.Image
    question: str
    answer: str
    target: tuple[int, int, int, int]


def generate_scene(seed: int = 0, size: tuple[int, int] = (3072, 2048)) -> Scene:
    """A large cluttered image with one small red square marked by a letter, and a question about the letter."""
    rng = random.Random(seed)
    image = Image.new("RGB", size, (228, 226, 218))
    draw = ImageDraw.Draw(image)
    for _ in range(160):
        x, y = rng.randrange(size[0]), rng.randrange(size[1])
        w, h = rng.randrange(20, 220), rng.randrange(20, 220)
        color = (rng.randrange(40, 200), rng.randrange(90, 230), rng.randrange(90, 230))
        draw.rectangle((x, y, x + w, y + h), fill=color)
    letters = rng.sample("EFHKLPTZ", 4)
    side = 48
    x, y = rng.randrange(side, size[0] - 2 * side), rng.randrange(side, size[1] - 2 * side)
    target = (x, y, x + side, y + side)
    draw.rectangle(target, fill=(220, 30, 30))
    draw.text((x + side // 3, y + side // 4), letters[0], fill=(255, 255, 255))
    options = "\n".join(f"({chr(65 + i)}) {letter}" for i, letter in enumerate(sorted(letters)))
    question = f"Which letter is written on the small red square?\n{options}"
    return Scene(image, question, chr(65 + sorted(letters).index(letters[0])), target)


def ensure_model(folder: Path) -> Path:
    """Write the random-weight demo model folder once."""
    if not (folder / "config.json").is_file():
        tokenizer = build_tokenizer()
        save_hub_folder(build_model(tokenizer), build_processor(tokenizer), folder)
    return folder


def run(out_dir: str | Path = "ergo-demo", budget: int = 640, seed: int = 0) -> str:
    """Run the demo, write the scene and the zoomed region as PNGs under ``out_dir``; returns the report."""
    out_dir = Path(out_dir)
    model_dir = ensure_model(out_dir / "model")
    model, processor = load(str(model_dir), device="cpu")
    scene = generate_scene(seed)
    coarse_h, coarse_w = smart_resize(scene.image.height, scene.image.width, max_pixels=budget_to_pixels(budget))
    scale_x, scale_y = coarse_w / scene.image.width, coarse_h / scene.image.height
    pad = 24  # a little context around the target, in original pixels
    x1, y1, x2, y2 = scene.target
    coarse_box = (int((x1 - pad) * scale_x), int((y1 - pad) * scale_y),
                  int((x2 + pad) * scale_x) + 1, int((y2 + pad) * scale_y) + 1)
    result = answer(model, processor, scene.image, scene.question, budget=budget, max_new_tokens=24,
                    stage1_generate_kwargs=scripted_stage1(processor, [zoom_text(coarse_box)]))
    scene_path = draw_region(scene.image, result.region, out_dir / "scene.png")
    return "\n".join([
        f"ERGO demo: {scene.image.width}x{scene.image.height} generated image, budget {budget} vision tokens",
        f"model:     {model_dir} (random weights, loaded with trust_remote_code)",
        f"question:  {scene.question!r} (correct: {scene.answer})",
        "NOTE: the weights are random, so stage 1 is scripted to zoom on the target and the answer text is noise.",
        summary(result),
        f"picture:   {scene_path} (region outlined in red)",
    ])
