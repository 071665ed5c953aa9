"""``ergo infer`` / ``ergo demo`` as a user runs them."""

import json
import subprocess
import sys

import pytest
from PIL import Image

from conftest import noise_image
from ergo_vqa.cli import main


def test_infer_prints_answer_region_tokens_and_timings(tiny_folder, tmp_path, capsys):
    image_path = tmp_path / "photo.png"
    noise_image(1200, 800).save(image_path)
    viz = tmp_path / "viz.png"
    code = main(["infer", "--model", str(tiny_folder), "--image", str(image_path), "--question",
                 "What is it?\n(A) x\n(B) y", "--budget", "64", "--max-new-tokens", "4", "--viz", str(viz)])
    printed = capsys.readouterr().out
    assert code == 0
    for label in ("answer:", "region:", "vision tokens: stage 1", "for one full-resolution pass", "seconds:"):
        assert label in printed
    assert Image.open(viz).size == (1200, 800)


def test_infer_json(tiny_folder, tmp_path, capsys):
    image_path = tmp_path / "photo.jpg"
    noise_image(640, 480).save(image_path)
    assert main(["infer", "--model", str(tiny_folder), "--image", str(image_path), "--question", "Why?",
                 "--budget", "16", "--max-new-tokens", "3", "--json"]) == 0
    result = json.loads(capsys.readouterr().out)
    assert result["vision_tokens"]["stage1"] <= 16 + 2
    assert set(result) >= {"answer", "region", "fallback", "vision_tokens", "seconds", "stage1_text"}


def test_infer_with_a_static_cache_answers_as_with_a_dynamic_one(tiny_folder, tmp_path, capsys):
    """``--cache static`` (the CUDA default) on CPU: same answer, region and tokens as ``--cache dynamic``."""
    image_path = tmp_path / "photo.png"
    noise_image(900, 700, 3).save(image_path)
    results = []
    for cache in ("dynamic", "static"):
        assert main(["infer", "--model", str(tiny_folder), "--image", str(image_path), "--question", "Why?",
                     "--budget", "16", "--max-new-tokens", "6", "--json", "--cache", cache]) == 0
        result = json.loads(capsys.readouterr().out)
        results.append({key: value for key, value in result.items() if key != "seconds"})
    assert results[0] == results[1]


@pytest.mark.parametrize(
    "args, message",
    [
        (["--image", "MISSING", "--question", "q"], "not found"),
        (["--image", "CORRUPT", "--question", "q"], "cannot read image"),
        (["--image", "GOOD", "--question", "  "], "question is empty"),
    ],
)
def test_infer_errors_are_clear(tiny_folder, tmp_path, capsys, args, message):
    (tmp_path / "corrupt.png").write_bytes(b"\x89PNG broken")
    noise_image(50, 50).save(tmp_path / "good.png")
    paths = {"MISSING": str(tmp_path / "missing.png"), "CORRUPT": str(tmp_path / "corrupt.png"),
             "GOOD": str(tmp_path / "good.png")}
    args = [paths.get(arg, arg) for arg in args]
    assert main(["infer", "--model", str(tiny_folder), *args]) == 2
    assert message in capsys.readouterr().err


def test_bad_arguments_exit_with_usage(tmp_path):
    for args in (["infer", "--model", "m", "--image", "i", "--question", "q", "--budget", "3"],
                 ["infer", "--model", "m", "--image", "i", "--question", "q", "--budget", "lots"], ["infer"]):
        done = subprocess.run([sys.executable, "-m", "ergo_vqa.cli", *args], capture_output=True, text=True)
        assert done.returncode == 2 and "usage: ergo" in done.stderr


def test_missing_model_is_reported(tmp_path, capsys):
    noise_image(50, 50).save(tmp_path / "good.png")
    assert main(["infer", "--model", str(tmp_path / "nope"), "--image", str(tmp_path / "good.png"),
                 "--question", "q"]) == 2
    assert "model not found" in capsys.readouterr().err


def test_demo_runs_offline_end_to_end(tmp_path, capsys):
    """`make demo`: the shipped trained model on a generated image, with the answer, the region and the pictures."""
    assert main(["demo", "--out", str(tmp_path / "demo")]) == 0
    printed = capsys.readouterr().out
    for label in ("trained on the synthetic task", "answer:", "region:", "correct:", "verdict:", "vision tokens:"):
        assert label in printed
    assert (tmp_path / "demo" / "scene.png").is_file() and (tmp_path / "demo" / "coarse.png").is_file()


def test_demo_without_a_model_says_how_to_build_one(tmp_path):
    from ergo_vqa.demo import run

    with pytest.raises(FileNotFoundError, match="python -m training.synthetic_recipe"):
        run(tmp_path / "out", model_dir=tmp_path / "missing")


def test_eval_reads_the_synthetic_split(tiny_folder, tmp_path, capsys):
    from ergo_vqa.synthetic_task import write_split

    write_split(tmp_path / "data", "test", 2)
    assert main(["eval", "--model", str(tiny_folder), "--dataset", "synthetic", "--data-root", str(tmp_path / "data"),
                 "--mode", "coarse", "--budget", "64", "--max-new-tokens", "3", "--out", str(tmp_path / "eval")]) == 0
    summary = json.loads((tmp_path / "eval" / "synthetic-coarse-64.summary.json").read_text())
    assert summary["samples"] == 2 and "| synthetic | coarse |" in capsys.readouterr().out
