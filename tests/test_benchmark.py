"""Smoke run of the speed benchmark on the tiny shape: every mode runs and the accounting adds up."""

import importlib.util
import json
import sys
from pathlib import Path

import pytest

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


def test_tiny_benchmark_reports_every_mode_and_setting_with_consistent_accounting(benchmark, tmp_path):
    output = tmp_path / "bench.json"
    report = benchmark.main([
        "--shape", "tiny", "--repeats", "1", "--sizes", "840x560", "--throughput-size", "840x560",
        "--batch-sizes", "1,2", "--coarse-budget", "64", "--stage1-tokens", "30", "--answer-tokens", "3",
        "--crop-tokens", "40", "--answered-share", "0.5", "--early-exit", "--caches", "dynamic,static",
        "--output", str(output),
    ])
    assert json.loads(output.read_text()) == report
    rows = {(row["setting"], row["size"], row["batch"], row["mode"]): row for row in report["results"]}
    settings = ("dynamic/sdpa", "static/sdpa")
    assert report["settings"] == list(settings)
    assert set(rows) == {(s, "840x560", batch, mode) for s in settings for batch in (1, 2) for mode in benchmark.MODES}
    assert report["decode_floor_ms_per_token"] > 0

    coarse_h, coarse_w = smart_resize(560, 840, max_pixels=budget_to_pixels(64))
    for setting in settings:
        single = {mode: rows[(setting, "840x560", 1, mode)] for mode in benchmark.MODES}
        assert single["full_resolution"]["vision_tokens"] == vision_tokens(840, 560)  # under 16384: unresized
        assert single["full_same_length"]["vision_tokens"] == vision_tokens(840, 560)
        assert single["coarse_only"]["vision_tokens"] == vision_tokens(coarse_w, coarse_h)
        ergo = single["ergo_kv"]
        assert ergo["vision_tokens"] == single["ergo_reprefill"]["vision_tokens"]
        assert ergo["vision_tokens"] > vision_tokens(coarse_w, coarse_h)  # coarse view plus a crop
        assert ergo["prefill_tokens"] < single["ergo_reprefill"]["prefill_tokens"]
        assert ergo["stage2_cache"] == setting.split("/")[0] and single["ergo_reprefill"]["stage2_cache"] == "re-prefill"
        # (c2) generates what ERGO generates in both stages (ERGO also feeds stage 1's end token).
        assert single["full_same_length"]["generated_tokens"] == 30 + 3 == ergo["generated_tokens"] - 1
        assert single["full_resolution"]["generated_tokens"] == 3
        assert single["full_resolution"]["speedup_vs_full"] == 1.0
        assert single["full_same_length"]["speedup_vs_full_same_length"] == 1.0
        # With early exit on, the one sample in two whose stage 1 answers directly skips stage 2.
        assert [rows[(setting, "840x560", 2, mode)]["early_exits"] for mode in benchmark.MODES] == [1, 1, 0, 0, 0]
        assert ergo["early_exits"] == 0
    for row in report["results"]:
        assert row["wall_s"] > 0 and 0 < row["preprocess_share"] < 1 and row["decode_ms_per_token"] > 0
