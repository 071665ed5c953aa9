"""``ergo infer`` / ``ergo demo`` as a user runs them."""

import json
import os
import socket
import subprocess
import sys

import pytest
import torch
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
    assert "verdict:       correct" in printed  # the shipped model answers this generated question right
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
    [path] = (tmp_path / "eval").glob("synthetic-coarse-64-*.summary.json")
    summary = json.loads(path.read_text())
    assert summary["samples"] == 2 and "| synthetic | coarse |" in capsys.readouterr().out


def _one_line_error(capsys, *words: str) -> str:
    """Exit-2 errors are one ``ergo: error:`` line on stderr, and nothing ran (stdout is empty)."""
    captured = capsys.readouterr()
    assert captured.out == "" and len(captured.err.splitlines()) == 1, captured
    assert captured.err.startswith("ergo: error: ") and all(word in captured.err for word in words), captured.err
    return captured.err


DEVICES = ["banana", "cuda:99",
           pytest.param("cuda", marks=pytest.mark.skipif(torch.cuda.is_available(), reason="needs no CUDA"))]


@pytest.mark.parametrize("device", DEVICES)
def test_an_unusable_device_is_one_line_for_infer_and_eval(tiny_folder, tmp_path, capsys, device):
    from ergo_vqa.synthetic_task import write_split

    noise_image(60, 40).save(tmp_path / "good.png")
    write_split(tmp_path / "data", "test", 1)
    assert main(["infer", "--model", str(tiny_folder), "--image", str(tmp_path / "good.png"), "--question", "q",
                 "--max-new-tokens", "2", "--device", device]) == 2
    _one_line_error(capsys, repr(device))
    assert main(["eval", "--model", str(tiny_folder), "--dataset", "synthetic", "--data-root", str(tmp_path / "data"),
                 "--mode", "coarse", "--max-new-tokens", "2", "--device", device, "--out", str(tmp_path / "e")]) == 2
    _one_line_error(capsys, repr(device))
    assert not (tmp_path / "e").exists()


def test_truncated_weights_are_one_line(tiny_folder, tmp_path, capsys):
    import shutil

    folder = shutil.copytree(tiny_folder, tmp_path / "model")
    weights = folder / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[: weights.stat().st_size // 2])  # an interrupted download
    noise_image(60, 40).save(tmp_path / "good.png")
    assert main(["infer", "--model", str(folder), "--image", str(tmp_path / "good.png"), "--question", "q",
                 "--max-new-tokens", "2"]) == 2
    _one_line_error(capsys, "cannot read the weights", str(folder), "truncated")


@pytest.mark.parametrize("viz, words", [("missing/region.png", ("--viz", "not found")),
                                        ("region.txt", ("--viz", "cannot write .txt"))])
def test_viz_is_checked_before_the_model_runs(tiny_folder, tmp_path, capsys, viz, words):
    noise_image(60, 40).save(tmp_path / "good.png")
    assert main(["infer", "--model", str(tiny_folder), "--image", str(tmp_path / "good.png"), "--question", "q",
                 "--max-new-tokens", "2", "--viz", str(tmp_path / viz)]) == 2
    _one_line_error(capsys, *words)  # no answer printed: nothing was loaded or run


@pytest.mark.parametrize("args", [["eval", "--batch-size", "-2"], ["eval", "--batch-size", "0"],
                                  ["eval", "--limit", "-1"], ["eval", "--limit", "x"],
                                  ["eval", "--max-new-tokens", "0"], ["infer", "--max-new-tokens", "-5"]])
def test_counts_must_be_positive_before_anything_loads(tmp_path, capsys, args):
    command, *option = args
    required = {"infer": ["--image", "i.png", "--question", "q"],
                "eval": ["--dataset", "vstar", "--data-root", str(tmp_path), "--out", str(tmp_path / "out")]}[command]
    with pytest.raises(SystemExit) as exit_:
        main([command, "--model", str(tmp_path / "no-model"), *required, *option])
    assert exit_.value.code == 2
    assert f"argument {option[0]}: must be a positive integer, got {option[1]!r}" in capsys.readouterr().err


def test_serve_without_a_folder_refuses_to_start(tmp_path):
    """``ergo serve`` alone used to start a server that loads (and, with ``--trust-remote-code``, runs) whatever
    folder a client names: it now needs the one folder it serves, and says so before anything starts."""
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    done = subprocess.run([sys.executable, "-m", "ergo_vqa.cli", "serve", "--host", "127.0.0.1", "--port", str(port)],
                          capture_output=True, text=True, timeout=120, env={**os.environ, "HF_HUB_OFFLINE": "1"})
    assert done.returncode == 2 and done.stdout == "" and len(done.stderr.splitlines()) == 1, done
    assert done.stderr.startswith("ergo: error: ergo serve needs the folder") and "--allow-other-models" in done.stderr


@pytest.mark.parametrize("args, words", [
    (["MISSING"], ["model not found: MISSING"]),
    (["--host", "127.0.0.1", "--port", "8123", "MISSING"], ["model not found: MISSING"]),  # options first
    (["MISSING", "--allow-other-models", "--device", "cpu"], ["model not found: MISSING"]),
    (["--port", "eighty", "MISSING"], ["'--port'", "'eighty' is not a valid integer"]),
    (["--bogus", "MISSING"], ["No such option", "--bogus"]),
])
def test_serve_arguments_are_checked_first_in_any_order(tmp_path, capsys, args, words):
    missing = str(tmp_path / "missing" / "folder")
    args = [missing if arg == "MISSING" else arg for arg in args]
    assert main(["serve", *args]) == 2
    _one_line_error(capsys, *[word.replace("MISSING", missing) for word in words])
