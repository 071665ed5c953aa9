"""Shared fixtures: one tiny ERGO Hub folder per test session, built offline and loaded back from disk."""

from __future__ import annotations

import random

import pytest
import torch
from PIL import Image

from ergo_vqa.tiny import build_model, build_processor, build_tokenizer
from hub_card import save_hub_folder
from modeling_ergo import ErgoForConditionalGeneration
from processing_ergo import ErgoProcessor


def noise_image(width: int, height: int, seed: int = 0, mode: str = "RGB") -> Image.Image:
    """A random RGB image: random-weight models then see different pixels per image."""
    rng = random.Random(seed)
    return Image.frombytes("RGB", (width, height), rng.randbytes(width * height * 3)).convert(mode)


@pytest.fixture(scope="session")
def tokenizer():
    return build_tokenizer()


@pytest.fixture(scope="session")
def tiny_folder(tmp_path_factory, tokenizer):
    folder = tmp_path_factory.mktemp("ergo_tiny")
    save_hub_folder(build_model(tokenizer), build_processor(tokenizer), folder)
    return folder


@pytest.fixture(scope="session")
def model(tiny_folder):
    return ErgoForConditionalGeneration.from_pretrained(tiny_folder, dtype=torch.float32).eval()


@pytest.fixture(scope="session")
def processor(tiny_folder):
    return ErgoProcessor.from_pretrained(tiny_folder, coarse_budget=64)
