"""Writing, converting and pushing ERGO Hub folders.

An ERGO Hub folder is a Qwen2.5-VL checkpoint (safetensors, legacy key layout, ``model_type: qwen2_5_vl``,
``architectures: [Qwen2_5_VLForConditionalGeneration]``) plus flat remote-code files and ``auto_map`` entries, so
that ``trust_remote_code`` loaders get the two-stage ERGO classes and engines that know Qwen2.5-VL serve it as is.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

from huggingface_hub import HfApi

import modeling_ergo.configuration_ergo
import modeling_ergo.generation_ergo
import modeling_ergo.modeling_ergo
import processing_ergo.geometry_ergo
import processing_ergo.images_ergo
import processing_ergo.processing_ergo
import processing_ergo.prompts_ergo
from modeling_ergo import ErgoConfig
from processing_ergo import ErgoProcessor

from .card import build_model_card

REMOTE_CODE_MODULES = (
    modeling_ergo.configuration_ergo,
    modeling_ergo.generation_ergo,
    modeling_ergo.modeling_ergo,
    processing_ergo.geometry_ergo,
    processing_ergo.images_ergo,
    processing_ergo.prompts_ergo,
    processing_ergo.processing_ergo,
)
"""The flat files a Hub folder carries; they import only each other, transformers, torch and Pillow."""

WEIGHT_PATTERNS = ("*.safetensors", "model.safetensors.index.json", "generation_config.json")


def copy_remote_code(folder: str | Path) -> list[Path]:
    """Copy ERGO's remote-code files into ``folder``."""
    copied = []
    for module in REMOTE_CODE_MODULES:
        target = Path(folder) / Path(module.__file__).name
        shutil.copyfile(module.__file__, target)
        copied.append(target)
    return copied


def write_card(folder: str | Path, base_model: str | None, processor: ErgoProcessor,
               results: list[dict] | None = None) -> Path:
    """The folder's model card; ``results``: ``ergo eval`` summaries to report."""
    path = Path(folder) / "README.md"
    build_model_card(base_model=base_model, coarse_budget=processor.coarse_budget, results=results).save(path)
    return path


def save_hub_folder(model, processor: ErgoProcessor, folder: str | Path, base_model: str | None = None) -> Path:
    """Save a model and processor as a complete ERGO Hub folder: their own ``save_pretrained`` already writes the
    weights, configs, remote code and ``auto_map``; this adds the model card."""
    folder = Path(folder)
    model.save_pretrained(folder)
    processor.save_pretrained(folder)
    write_card(folder, base_model, processor)
    return folder


def convert_checkpoint(source: str | Path, folder: str | Path, **processor_settings) -> Path:
    """Turn a local Qwen2.5-VL (or ERGO) checkpoint folder into an ERGO Hub folder without loading its weights.

    The safetensors shards are copied byte for byte (they already use the Hub key layout); the config and the
    processor are re-saved with ERGO's ``auto_map`` and settings. ``processor_settings`` are ``ErgoProcessor``
    arguments such as ``coarse_budget=640``.
    """
    source, folder = Path(source), Path(folder)
    if not (source / "config.json").is_file():
        raise FileNotFoundError(f"{source} has no config.json; pass a local Qwen2.5-VL checkpoint folder")
    model_type = json.loads((source / "config.json").read_text()).get("model_type")
    if model_type != "qwen2_5_vl":
        raise ValueError(f"{source} is a {model_type!r} checkpoint; ERGO runs on Qwen2.5-VL (qwen2_5_vl)")
    shards = sorted(source.glob("*.safetensors"))
    if not shards:
        found = sorted(path.name for path in source.glob("*.bin")) or "no weights"
        raise ValueError(f"{source} has no safetensors weights ({found}); ERGO folders load safetensors only")
    if source.resolve() == folder.resolve():
        raise ValueError("convert into a new folder, not onto the source")
    folder.mkdir(parents=True, exist_ok=True)
    for pattern in WEIGHT_PATTERNS:
        for path in source.glob(pattern):
            shutil.copyfile(path, folder / path.name)
    ErgoConfig.from_pretrained(source).save_pretrained(folder)
    processor = ErgoProcessor.from_pretrained(source, **processor_settings)
    processor.save_pretrained(folder)
    copy_remote_code(folder)
    write_card(folder, str(source), processor)
    return folder


def push_folder(folder: str | Path, repo_id: str, private: bool = False, token: str | None = None) -> str:
    """Upload an ERGO Hub folder; returns the repository URL."""
    api = HfApi(token=token)
    url = api.create_repo(repo_id, private=private, exist_ok=True)
    api.upload_folder(folder_path=str(folder), repo_id=repo_id, commit_message="Upload ERGO model folder")
    return str(url)
