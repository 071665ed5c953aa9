"""Writing, converting and pushing ERGO Hub folders.

An ERGO Hub folder is a stock checkpoint of one of ERGO's families (``modeling_ergo.family_ergo``: Qwen2.5-VL,
Qwen3-VL, Qwen3.5; safetensors in the family's Hub key layout, the stock ``model_type`` and ``architectures``) plus
flat remote-code files and ``auto_map`` entries, so that ``trust_remote_code`` loaders get the two-stage ERGO classes
and engines that know the family serve it as is.
"""

from __future__ import annotations

import json
import shutil
from dataclasses import dataclass
from pathlib import Path

from huggingface_hub import HfApi
from transformers import GenerationConfig

import modeling_ergo.compat_ergo
import modeling_ergo.configuration_ergo
import modeling_ergo.family_ergo
import modeling_ergo.generation_ergo
import modeling_ergo.modeling_ergo
import processing_ergo.geometry_ergo
import processing_ergo.images_ergo
import processing_ergo.processing_ergo
import processing_ergo.prompts_ergo
import processing_ergo.zoom_ergo
from modeling_ergo.configuration_ergo import CONFIG_CLASSES
from modeling_ergo.family_ergo import QWEN2_5_VL, Family, family_of
from modeling_ergo.generation_ergo import DEFAULT_MAX_NEW_TOKENS
from processing_ergo import ErgoProcessor

from .card import build_model_card
from .results import check_summary

REMOTE_CODE_MODULES = (
    modeling_ergo.compat_ergo,  # processing_ergo/compat_ergo.py is a link to it: one file in the flat folder
    modeling_ergo.configuration_ergo,
    modeling_ergo.family_ergo,  # processing_ergo/family_ergo.py is a link to it, as for compat_ergo
    modeling_ergo.generation_ergo,
    modeling_ergo.modeling_ergo,
    processing_ergo.geometry_ergo,
    processing_ergo.images_ergo,
    processing_ergo.prompts_ergo,
    processing_ergo.processing_ergo,
    processing_ergo.zoom_ergo,
)
"""The flat files a Hub folder carries; they import only each other, transformers, torch and Pillow."""

WEIGHT_PATTERNS = ("*.safetensors", "model.safetensors.index.json", "generation_config.json")
"""What a conversion copies from the source byte for byte."""

STALE_PATTERNS = ("*.safetensors", "*.bin", "*.pt", "*.pth", "*.ckpt", "*.index.json", "generation_config.json")
"""What converting with ``overwrite`` removes first: an earlier checkpoint's weights, indexes or generation defaults
left beside the new ones would be loaded with (or instead of) them."""

ERGO_SETTINGS = ("coarse_budget", "crop_budget", "stage2_template", "fallback", "grounding")
"""The ``ErgoProcessor`` settings an ERGO folder saves in ``processor_config.json``."""

VIDEO_PROCESSOR_KEYS = ("do_convert_rgb", "do_resize", "size", "resample", "do_rescale", "rescale_factor",
                        "do_normalize", "image_mean", "image_std", "patch_size", "temporal_patch_size", "merge_size")
"""Image-processor settings that ``Qwen2VLVideoProcessor`` takes under the same names."""


@dataclass
class Conversion:
    """What ``convert_checkpoint`` wrote: the folder and one line per setting, the card and each removed file."""

    folder: Path
    notes: list[str]


def copy_remote_code(folder: str | Path) -> list[Path]:
    """Copy ERGO's remote-code files into ``folder``."""
    copied = []
    for module in REMOTE_CODE_MODULES:
        target = Path(folder) / Path(module.__file__).name
        shutil.copyfile(module.__file__, target)
        copied.append(target)
    return copied


def write_video_processor_config(folder: str | Path, processor: ErgoProcessor, family: Family = QWEN2_5_VL) -> Path:
    """``video_preprocessor_config.json``: ERGO reads no video, but engines that load the family's own processor
    (vLLM) refuse a folder without a video processor. Its settings are the image processor's, as transformers derives
    them for a Qwen checkpoint that ships only image settings, under the family's video processor class. Written as
    JSON: that class itself needs torchvision, which this package never installs, and ``ErgoProcessor`` does not
    load it."""
    image = processor.image_processor.to_dict()
    config = {key: image[key] for key in VIDEO_PROCESSOR_KEYS if key in image}
    config.update(min_pixels=image["size"]["shortest_edge"], max_pixels=image["size"]["longest_edge"],
                  video_processor_type=family.video_processor)
    path = Path(folder) / "video_preprocessor_config.json"
    path.write_text(json.dumps(config, indent=2, sort_keys=True) + "\n")
    return path


def write_generation_defaults(folder: str | Path, family: Family) -> Path:
    """``generation_config.json`` with ERGO's per-stage length (``DEFAULT_MAX_NEW_TOKENS``) when it sets none, so
    that every tool reading the folder (``generate``, pipelines, ``transformers serve``) lets both stages finish;
    transformers' own default of 20 new tokens cuts stage 1 before its region."""
    folder = Path(folder)
    has_file = (folder / "generation_config.json").is_file()
    config = GenerationConfig.from_pretrained(folder) if has_file else GenerationConfig.from_model_config(
        CONFIG_CLASSES[family.model_type].from_pretrained(folder))
    if config.max_new_tokens is None and config.max_length is None:
        config.max_new_tokens = DEFAULT_MAX_NEW_TOKENS
        config.save_pretrained(folder)
    return folder / "generation_config.json"


def ergo_settings(folder: str | Path) -> dict | None:
    """The ERGO processor settings ``folder`` loads with (a setting it does not save, such as ``grounding`` in folders
    older than it, takes the processor's default); None when it is not an ERGO folder (a stock checkpoint)."""
    path = Path(folder) / "processor_config.json"
    saved = json.loads(path.read_text()) if path.is_file() else {}
    if saved.get("processor_class") != "ErgoProcessor":
        return None
    processor = ErgoProcessor.from_pretrained(folder)
    return {key: getattr(processor, key) for key in ERGO_SETTINGS}


def write_card(folder: str | Path, base_model: str | None, processor: ErgoProcessor,
               results: list[dict] | None = None, family: Family = QWEN2_5_VL) -> Path:
    """The folder's model card; ``results``: ``ergo eval`` summaries to report."""
    path = Path(folder) / "README.md"
    build_model_card(base_model=base_model, coarse_budget=processor.coarse_budget, results=results,
                     family=family).save(path)
    return path


def save_hub_folder(model, processor: ErgoProcessor, folder: str | Path, base_model: str | None = None) -> Path:
    """Save a model and processor as a complete ERGO Hub folder: their own ``save_pretrained`` already writes the
    weights, configs, remote code and ``auto_map``; this adds the video-processor file engines need and the card."""
    folder, family = Path(folder), model.ergo_family
    model.save_pretrained(folder)
    write_generation_defaults(folder, family)
    processor.save_pretrained(folder)
    write_video_processor_config(folder, processor, family)
    write_card(folder, base_model, processor, family=family)
    return folder


def convert_checkpoint(source: str | Path, folder: str | Path, overwrite: bool = False,
                       results: list[dict] | None = None, **processor_settings) -> Conversion:
    """Turn a local checkpoint folder of one of ERGO's families (stock or ERGO) into an ERGO Hub folder without loading
    its weights.

    The safetensors shards are copied byte for byte (they already use the Hub key layout); the config and the
    processor are re-saved with ERGO's ``auto_map``, and the source's ``video_preprocessor_config.json``, when it has
    one, is kept as it is (what engines load the stock processor with). ``processor_settings`` are ``ErgoProcessor`` arguments such as
    ``coarse_budget=640``; settings not given keep the source's (an ERGO folder's own, else ERGO's defaults), and an
    ERGO source's model card is kept unless ``results`` (``ergo eval`` summaries) ask for a new one. Everything is
    checked before anything is written. A non-empty ``folder`` is refused unless ``overwrite``, which first removes
    its weight files (``STALE_PATTERNS``), so that loading it never mixes two checkpoints.
    """
    source, folder = Path(source), Path(folder)
    family = _check_source(source)
    if source.resolve() == folder.resolve():
        raise ValueError("convert into a new folder, not onto the source")
    if folder.exists() and not folder.is_dir():
        raise ValueError(f"{folder} exists and is not a folder")
    if folder.is_dir() and any(folder.iterdir()) and not overwrite:
        raise FileExistsError(f"{folder} is not empty, and an earlier checkpoint's files there could load with this "
                              f"one's: choose an empty folder, or --overwrite (overwrite=True) to replace its weights")
    for index, summary in enumerate(results or []):
        check_summary(summary, f"results[{index}]")
    config = CONFIG_CLASSES[family.model_type].from_pretrained(source)
    processor = ErgoProcessor.from_pretrained(source, **processor_settings)  # checks the settings
    before, after = ergo_settings(source), {key: getattr(processor, key) for key in ERGO_SETTINGS}
    keep_card = before is not None and (source / "README.md").is_file() and not results

    folder.mkdir(parents=True, exist_ok=True)
    removed = sorted({path for pattern in STALE_PATTERNS for path in folder.glob(pattern)}) if overwrite else []
    for path in removed:
        path.unlink()
    for pattern in WEIGHT_PATTERNS:
        for path in source.glob(pattern):
            shutil.copyfile(path, folder / path.name)
    config.save_pretrained(folder)
    write_generation_defaults(folder, family)
    processor.save_pretrained(folder)
    copy_remote_code(folder)
    if (source / "video_preprocessor_config.json").is_file():
        shutil.copyfile(source / "video_preprocessor_config.json", folder / "video_preprocessor_config.json")
    else:
        write_video_processor_config(folder, processor, family)
    if keep_card:
        shutil.copyfile(source / "README.md", folder / "README.md")
    else:
        write_card(folder, str(source), processor, results, family)
    notes = _settings_notes(before, after)
    if keep_card:
        stale = " (written for the source's settings: update what it says about them)" if before != after else ""
        notes.append(f"README.md: kept from {source}{stale}")
    else:
        notes.append("README.md: new ERGO model card" + (f" with {len(results)} result(s)" if results else ""))
    notes += [f"removed {path.name} (left by an earlier conversion)" for path in removed]
    return Conversion(folder, notes)


def _check_source(source: Path) -> Family:
    """The family of a local checkpoint with safetensors weights, or a clear error."""
    if not (source / "config.json").is_file():
        raise FileNotFoundError(f"{source} has no config.json; pass a local Qwen2.5-VL, Qwen3-VL or Qwen3.5 "
                                "checkpoint folder")
    model_type = json.loads((source / "config.json").read_text()).get("model_type")
    try:
        family = family_of(model_type)
    except ValueError as error:
        raise ValueError(f"{source}: {error}") from None
    if not any(source.glob("*.safetensors")):
        found = sorted(path.name for path in source.glob("*.bin")) or "no weights"
        raise ValueError(f"{source} has no safetensors weights ({found}); ERGO folders load safetensors only")
    return family


def _settings_notes(before: dict | None, after: dict) -> list[str]:
    """What a conversion did to the processor settings, one line each for those it changed."""
    listed = ", ".join(f"{key}={value!r}" for key, value in after.items())
    if before is None:
        return [f"processor settings (new ERGO folder): {listed}"]
    changed = [f"{key}: {before[key]!r} -> {after[key]!r}" for key in ERGO_SETTINGS if before[key] != after[key]]
    return changed + [f"processor settings: {listed}" + ("" if changed else " (kept from the source)")]


def push_folder(folder: str | Path, repo_id: str, private: bool = False, token: str | None = None) -> str:
    """Upload an ERGO Hub folder; returns the repository URL."""
    api = HfApi(token=token)
    url = api.create_repo(repo_id, private=private, exist_ok=True)
    api.upload_folder(folder_path=str(folder), repo_id=repo_id, commit_message="Upload ERGO model folder")
    return str(url)
