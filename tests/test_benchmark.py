"""Smoke runs of the speed benchmark on each family's tiny shape: every mode runs and the accounting adds up; the real
shapes build the models their checkpoints describe (on the meta device: no weights)."""

import importlib.util
import json
import sys
from pathlib import Path

import pytest
import torch

from ergo_vqa.tiny import build_tokenizer
from processing_ergo.geometry_ergo import budget_to_pixels, smart_resize, vision_tokens

SCRIPT = Path(__file__).resolve().parents[1] / "benchmarks" / "two_stage_speed.py"


@pytest.fixture(scope="module")
def benchmark():
    spec = importlib.util.spec_from_file_location("two_stage_speed", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses look their module up there
    spec.loader.exec_module(module)
    yield module
    del sys.modules[spec.name]


ARGUMENTS = ["--repeats", "1", "--coarse-budget", "64", "--stage1-tokens", "30", "--answer-tokens", "3",
             "--crop-tokens", "40"]


def test_tiny_benchmark_reports_every_mode_and_setting_with_consistent_accounting(benchmark, tmp_path):
    output = tmp_path / "bench.json"
    report = benchmark.main(["--shape", "tiny", *ARGUMENTS, "--sizes", "840x560", "--throughput-size", "840x560",
                             "--batch-sizes", "1,2", "--answered-share", "0.5", "--early-exit",
                             "--caches", "dynamic,static", "--output", str(output)])
    assert json.loads(output.read_text()) == report
    rows = check_accounting(benchmark, report, ("dynamic/sdpa", "static/sdpa"), (1, 2), (840, 560))
    for setting in report["settings"]:
        # With early exit on, the one sample in two whose stage 1 answers directly skips stage 2.
        assert [rows[(setting, "840x560", 2, mode)]["early_exits"] for mode in benchmark.MODES] == [1, 1, 0, 0, 0]
        assert rows[(setting, "840x560", 1, "ergo_kv")]["early_exits"] == 0


@pytest.mark.parametrize("shape", ["tiny-qwen3-vl", "tiny-qwen3.5"])
def test_each_familys_shape_runs_at_its_factor_and_grounding(benchmark, tmp_path, shape):
    """The dynamic cache at batch 1 on a small image (the static cache costs minutes on this CPU, and Qwen3.5
    re-prefills it anyway)."""
    report = benchmark.main(["--shape", shape, *ARGUMENTS, "--sizes", "480x320", "--throughput-size", "480x320",
                             "--batch-sizes", "1", "--caches", "dynamic", "--output", str(tmp_path / "bench.json")])
    check_accounting(benchmark, report, ("dynamic/sdpa",), (1,), (480, 320))


def check_accounting(benchmark, report: dict, settings: tuple[str, ...], batches: tuple[int, ...],
                     size: tuple[int, int]) -> dict:
    """The rows of ``report`` by (setting, size, batch, mode), checked against the shape's family: every mode of every
    setting and batch, vision tokens at the family's factor, a crop of about --crop-tokens (so the scripted box was
    read in the family's grounding convention), stage 2 continuing stage 1's cache as the family can, lengths."""
    family = benchmark.SHAPES[report["shape"]].family
    assert report["family"] == family.name and report["settings"] == list(settings)
    rows = {(row["setting"], row["size"], row["batch"], row["mode"]): row for row in report["results"]}
    name = f"{size[0]}x{size[1]}"
    assert set(rows) == {(s, name, batch, mode) for s in settings for batch in batches for mode in benchmark.MODES}
    assert report["decode_floor_ms_per_token"] > 0
    factor = family.factor
    coarse_h, coarse_w = smart_resize(size[1], size[0], factor, max_pixels=budget_to_pixels(64, factor))
    coarse = vision_tokens(coarse_w, coarse_h, factor)
    full = vision_tokens(*smart_resize(size[1], size[0], factor)[::-1], factor)  # unresized: rounded to the factor
    for setting in settings:
        single = {mode: rows[(setting, name, 1, mode)] for mode in benchmark.MODES}
        assert single["full_resolution"]["vision_tokens"] == full == single["full_same_length"]["vision_tokens"]
        assert single["coarse_only"]["vision_tokens"] == coarse
        ergo = single["ergo_kv"]
        assert ergo["vision_tokens"] == single["ergo_reprefill"]["vision_tokens"]
        assert 30 <= ergo["vision_tokens"] - coarse <= 50
        continued = setting == "dynamic/sdpa" or family.recurrent_cache is None  # Qwen3.5: a lone dynamic cache only
        assert ergo["stage2_cache"].startswith(setting.split("/")[0] if continued else "re-prefill (")
        assert (ergo["prefill_tokens"] < single["ergo_reprefill"]["prefill_tokens"]) is continued
        assert single["ergo_reprefill"]["stage2_cache"] == "re-prefill"
        # (c2) generates what ERGO generates in both stages (ERGO also feeds stage 1's end token).
        assert single["full_same_length"]["generated_tokens"] == 30 + 3 == ergo["generated_tokens"] - 1
        assert single["full_resolution"]["generated_tokens"] == 3
        assert single["full_resolution"]["speedup_vs_full"] == 1.0
        assert single["full_same_length"]["speedup_vs_full_same_length"] == 1.0
    for row in report["results"]:
        assert row["wall_s"] > 0 and 0 < row["preprocess_share"] < 1 and row["decode_ms_per_token"] > 0
    return rows


@pytest.mark.parametrize("shape, billions, full_attention_layers", [
    ("qwen2.5-vl-7b", 8.29, 28), ("qwen3-vl-8b", 8.77, 36), ("qwen3.5-9b", 9.41, 8),
])
def test_real_shapes_build_the_checkpoints_models(benchmark, shape, billions, full_attention_layers):
    """Parameter counts as the model pages give them (Qwen2.5-VL-7B-Instruct 8.29B, Qwen3-VL-8B-Instruct 8.77B; for
    Qwen3.5-9B, transformers' Qwen3_5Config defaults with the merger at the text width), Qwen3.5's one full-attention
    layer in four, Qwen3-VL's DeepStack blocks, each family's ERGO class."""
    spec = benchmark.SHAPES[shape]
    model = benchmark.build_benchmark_model(spec, build_tokenizer(family=spec.family), "meta", torch.bfloat16)
    assert model.config.model_type == spec.family.model_type and type(model).__name__.startswith("Ergo")
    assert sum(p.numel() for p in model.parameters()) / 1e9 == pytest.approx(billions, rel=0.005)
    text = model.config.text_config
    assert getattr(text, "layer_types", ["full_attention"] * text.num_hidden_layers).count(
        "full_attention") == full_attention_layers
    if shape == "qwen3-vl-8b":
        assert model.config.vision_config.deepstack_visual_indexes == [8, 16, 24]
