"""The evaluation harness on small fixtures written in each benchmark's published format, with the tiny model."""

from __future__ import annotations

import base64
import io
import json
import shutil

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from conftest import noise_image
from ergo_vqa.cli import main as cli
from ergo_vqa.eval_data import load_benchmark
from ergo_vqa.evaluation import comparable, evaluate, letters_match, summarize
from hub_card import build_model_card
from hub_card.results import results_table
from processing_ergo.prompts_ergo import LETTER_POSTFIX, stage_questions


def only(folder, pattern: str):
    """The one file matching ``pattern`` (file names carry a hash of the run's settings)."""
    [path] = folder.glob(pattern)
    return path


def png(width: int, height: int, seed: int = 0) -> bytes:
    buffer = io.BytesIO()
    noise_image(width, height, seed).save(buffer, format="PNG")
    return buffer.getvalue()


@pytest.fixture
def data_root(tmp_path):
    vstar = tmp_path / "vstar_bench"
    (vstar / "direct_attributes").mkdir(parents=True)
    noise_image(420, 300).save(vstar / "direct_attributes" / "a.png")
    (vstar / "direct_attributes" / "broken.png").write_bytes(b"not an image")
    questions = [
        {"text": "What is the color of the cup?\n(A) red\n(B) blue\nAnswer with the option's letter from the given "
                 "choices directly.", "image": "direct_attributes/a.png", "label": "A", "category": "direct_attributes",
         "question_id": 0},
        {"text": "Is the cup left of the dog?\n(A) yes\n(B) no\nAnswer with the option's letter from the given "
                 "choices directly.", "image": "direct_attributes/broken.png", "label": "B",
         "category": "relative_position", "question_id": 1},
    ]
    (vstar / "test_questions.jsonl").write_text("\n".join(json.dumps(q) for q in questions) + "\n")

    hr = tmp_path / "HR-Bench"
    hr.mkdir()
    row = {"index": 7, "question": "Which sign is red?", "A": "left", "B": "right", "C": "top", "D": "none",
           "answer": "C", "category": "FSP", "image": base64.b64encode(png(400, 280, 1)).decode()}
    pq.write_table(pa.Table.from_pylist([row]), hr / "hr_bench_4k.parquet")
    header = list(row)
    (hr / "hr_bench_8k.tsv").write_text("\t".join(header) + "\n" + "\t".join(str(row[k]) for k in header) + "\n")

    mme = tmp_path / "MME-RealWorld-lite-lmms-eval" / "data"
    mme.mkdir(parents=True)
    rows = [{"index": "m1", "question": "What does the board say?", "multi-choice options": ["(A) stop", "(B) go"],
             "answer": "A", "category": "Perception/Monitoring", "bytes": base64.b64encode(png(300, 300, 2)).decode()},
            {"index": "m2", "question": "Count the cars.", "multi-choice options": ["(A) 1", "(B) 2"],
             "answer": "B", "category": "Other/Unlisted", "bytes": base64.b64encode(png(300, 200, 3)).decode()}]
    pq.write_table(pa.Table.from_pylist(rows), mme / "train-00000-of-00001.parquet")
    return tmp_path


def test_loaders_read_each_published_format(data_root):
    vstar = load_benchmark("vstar", data_root)
    assert [(s.stem, s.options, s.answer, s.category) for s in vstar] == [
        ("What is the color of the cup?", ["(A) red", "(B) blue"], "A", "direct_attributes"),
        ("Is the cup left of the dog?", ["(A) yes", "(B) no"], "B", "relative_position")]
    assert stage_questions(vstar[0].stem, vstar[0].options, vstar[0].postfix)[1] == (
        "What is the color of the cup?\n(A) red\n(B) blue\nAnswer with the option's letter from the given choices directly.")
    hr = load_benchmark("hrbench", data_root)
    assert [(s.id, s.category, s.options[0], s.postfix) for s in hr] == [
        ("4k-7", "4k", "A:left", LETTER_POSTFIX), ("8k-7", "8k", "A:left", LETTER_POSTFIX)]
    assert hr[0].image == hr[1].image == png(400, 280, 1)  # parquet and tsv carry the same base64 image
    # HR-Bench's stage-2 question: no space after the colon, a leading space before the postfix (reference §3.1).
    assert stage_questions(hr[0].stem, hr[0].options, hr[0].postfix)[1].endswith("D:none\n Answer with the option's "
                                                                                "letter from the given choices directly.")
    mme = load_benchmark("mmerwl", data_root)
    assert [(s.id, s.options, s.category) for s in mme] == [
        ("m1", ["(A) stop", "(B) go"], "Perception/Monitoring"), ("m2", ["(A) 1", "(B) 2"], "Other/Unlisted")]
    assert [s.id for s in load_benchmark("hrbench", data_root, limit=1)] == ["4k-7"]
    with pytest.raises(FileNotFoundError, match="ergo eval-download vstar"):
        load_benchmark("vstar", data_root / "elsewhere")


@pytest.mark.parametrize("reply, expected", [
    ("<answer>A</answer>", True), ("<answer>(A)</answer>", True), ("<answer>a</answer>", True),
    ("<answer>A. rubber</answer>", False), ("A", True), ("The answer is A", False), ("(A)", True), ("", False),
])
def test_scoring_follows_the_reference(reply, expected):
    assert letters_match(reply, "A") is expected


def test_end_to_end_in_all_modes_with_a_failure_counted(model, processor, data_root, tmp_path):
    samples = load_benchmark("vstar", data_root)
    summaries = [evaluate(model, processor, samples, mode, tmp_path / "out", "vstar", budget=64, batch_size=2,
                          max_new_tokens=3, progress=False) for mode in ("ergo", "full", "coarse")]
    for summary in summaries:
        assert summary["samples"] == 2 and [f["id"] for f in summary["failures"]] == ["1"]
        assert "cannot read image" in summary["failures"][0]["failure"]
        assert summary["accuracy"] in (0.0, 0.5)  # the failed sample counts as wrong
        assert summary["accuracy_reference_protocol"] in (0.0, 1.0)  # ... and is left out here, as the reference does
    ergo, full, coarse = (s["mean_vision_tokens"] for s in summaries)
    # 420x300 costs 165 tokens in one full pass; ERGO adds a second image to its ~64-token coarse view (with the
    # reference fallback and a random model, the whole original).
    assert coarse < full and coarse < ergo
    records = only(tmp_path / "out", "vstar-ergo-64-*.jsonl").read_text().splitlines()
    records = [json.loads(line) for line in records]
    assert records[0]["vision_tokens"]["stage1"] > 0 and records[0]["seconds"] > 0 and records[1]["correct"] is False
    assert "| vstar | ergo |" in results_table(summaries)


def test_an_interrupted_run_resumes_where_it_stopped(model, processor, data_root, tmp_path):
    samples = load_benchmark("mmerwl", data_root)
    out = tmp_path / "out"
    evaluate(model, processor, samples[:1], "coarse", out, "mmerwl", budget=64, max_new_tokens=2, progress=False)
    records = only(out, "mmerwl-coarse-64-*.jsonl")
    records.write_text(records.read_text() + '{"id": "m2", "categ')  # a line cut off by the interruption
    summary = evaluate(model, processor, samples, "coarse", out, "mmerwl", budget=64, max_new_tokens=2, progress=False)
    ids = [json.loads(line)["id"] for line in records.read_text().splitlines() if line.endswith("}")]
    assert ids == ["m1", "m2"]  # m1 was not run again
    assert summary["samples"] == 1 and set(summary["categories"]) == {"Perception/Monitoring", "Other/Unlisted"}
    # Another budget is another run, in its own file; a smaller selection is summarised on its own samples.
    other = evaluate(model, processor, samples[:1], "coarse", out, "mmerwl", budget=32, max_new_tokens=2,
                     progress=False)
    assert only(out, "mmerwl-coarse-32-*.jsonl").is_file() and other["budget"] == 32 and len(other["categories"]) == 1


def test_failed_samples_run_again_on_the_next_run(model, processor, data_root, tmp_path):
    samples = load_benchmark("vstar", data_root)
    out = tmp_path / "out"
    evaluate(model, processor, samples, "coarse", out, "vstar", budget=64, max_new_tokens=2, progress=False)
    noise_image(420, 300, 5).save(data_root / "vstar_bench" / "direct_attributes" / "broken.png")  # repaired
    summary = evaluate(model, processor, samples, "coarse", out, "vstar", budget=64, max_new_tokens=2, progress=False)
    assert summary["failures"] == [] and summary["samples"] == 2


def test_cli_writes_summary_table_and_plot_and_the_card_reports_them(tiny_folder, data_root, tmp_path, capsys):
    out = tmp_path / "out"
    assert cli(["eval", "--model", str(tiny_folder), "--dataset", "hrbench", "--data-root", str(data_root),
                "--mode", "ergo", "coarse", "--budget", "64", "--max-new-tokens", "2", "--device", "cpu",
                "--out", str(out)]) == 0
    assert "| hrbench | ergo |" in capsys.readouterr().out
    assert (out / "hrbench-accuracy-vs-tokens.png").read_bytes().startswith(b"\x89PNG")
    summaries = json.loads((out / "hrbench-summary.json").read_text())
    card = build_model_card("Qwen/Qwen2.5-VL-7B-Instruct", 64, results=summaries)
    assert card.data.eval_results[0].dataset_name == "HR-Bench"
    assert card.data.eval_results[0].metric_value == round(100 * summaries[0]["accuracy"], 2)
    assert "## Results" in card.text and "| hrbench | coarse |" in card.text
    assert "model-index" in str(card)


def test_summary_of_no_records_is_empty_not_an_error():
    summary = summarize([], {"benchmark": "vstar", "mode": "ergo", "budget": 640}, requested=0)
    assert summary["accuracy"] is None and summary["requested"] == summary["missing"] == 0


def test_other_settings_never_reuse_records_and_the_same_settings_resume(tiny_folder, data_root, tmp_path, capsys):
    out = tmp_path / "out"
    base = ["eval", "--model", str(tiny_folder), "--dataset", "vstar", "--data-root", str(data_root), "--mode", "ergo",
            "--budget", "64", "--device", "cpu", "--out", str(out)]
    assert cli([*base, "--max-new-tokens", "2", "--fallback", "coarse"]) == 1  # sample 1 fails: the exit status says so
    assert cli([*base, "--max-new-tokens", "3", "--fallback", "reference"]) == 1
    files = sorted(out.glob("vstar-ergo-64-*.jsonl"), key=lambda path: path.stat().st_mtime)
    assert len(files) == 2  # one records file per settings: the second run reused nothing
    for path, (tokens, fallback) in zip(files, [(2, "coarse"), (3, "reference")]):
        records = [json.loads(line) for line in path.read_text().splitlines()]
        assert len(records) == 2
        for record in records:
            settings = record["settings"]
            assert (settings["max_new_tokens"], settings["fallback"], settings["budget"]) == (tokens, fallback, 64)
            assert settings["stage2_template"] == "reference" and "model" not in settings  # the weights identify it
            assert settings["weights"] and settings["mode"] == "ergo"
    # The combined summary covers this run's settings only; the table names them.
    [combined] = json.loads((out / "vstar-summary.json").read_text())
    assert combined["settings"]["max_new_tokens"] == 3 and combined["requested"] == 2
    assert combined["records"] == files[1].name and combined["settings_id"] in files[1].name
    assert "max_new_tokens 3, " in capsys.readouterr().out
    # The same settings again: sample 0 resumes, only the failed sample 1 runs again.
    assert cli([*base, "--max-new-tokens", "3", "--fallback", "reference"]) == 1
    assert [json.loads(line)["id"] for line in files[1].read_text().splitlines()] == ["0", "1", "1"]
    assert len(files[0].read_text().splitlines()) == 2
    # A copy of the same checkpoint, named another way, is the same model: it resumes the same records.
    copy = shutil.copytree(tiny_folder, tmp_path / "copy")
    moved = [str(copy) + "/" if arg == str(tiny_folder) else arg for arg in base]
    assert cli([*moved, "--max-new-tokens", "3", "--fallback", "reference"]) == 1
    assert len(sorted(out.glob("vstar-ergo-64-*.jsonl"))) == 2
    assert [json.loads(line)["id"] for line in files[1].read_text().splitlines()] == ["0", "1", "1", "1"]


def test_the_weights_fingerprint_follows_the_weights_not_the_object(model, tiny_folder):
    import copy

    import torch

    from ergo_vqa.evaluation import weights_fingerprint
    from modeling_ergo import ErgoForConditionalGeneration

    again = ErgoForConditionalGeneration.from_pretrained(tiny_folder, dtype=torch.float32)
    assert weights_fingerprint(again) == weights_fingerprint(model)
    retrained = copy.deepcopy(model)
    with torch.no_grad():
        next(retrained.parameters()).add_(0.01)  # same shapes, same files' sizes: other weights
    assert weights_fingerprint(retrained) != weights_fingerprint(model)
    assert weights_fingerprint(copy.deepcopy(model).to(torch.bfloat16)) != weights_fingerprint(model)


def test_malformed_rows_fail_alone_with_file_and_line(model, processor, data_root, tmp_path):
    questions = data_root / "vstar_bench" / "test_questions.jsonl"
    good = json.loads(questions.read_text().splitlines()[0])
    rows = [json.dumps(good), json.dumps({k: v for k, v in good.items() if k != "label"}), '{"text": "cut off',
            json.dumps({**good, "question_id": 9})]
    questions.write_text("\n".join(rows) + "\n")
    samples = load_benchmark("vstar", data_root)
    summary = evaluate(model, processor, samples, "coarse", tmp_path / "out", "vstar", budget=64, batch_size=4,
                       max_new_tokens=2, progress=False)
    failures = {f["id"]: f["failure"] for f in summary["failures"]}
    where = "vstar_bench/test_questions.jsonl line"
    assert sorted(failures) == [f"{where} 2", f"{where} 3"]  # the rows are named by file and line, and go on
    assert failures[f"{where} 2"] == f"{where} 2: missing or empty field 'label'"
    assert failures[f"{where} 3"].startswith(f"{where} 3: not JSON")
    assert (summary["requested"], summary["run"], summary["failed"], summary["missing"]) == (4, 2, 2, 0)
    assert summary["samples"] == 4 and summary["accuracy"] <= 0.5
    assert summary["categories"]["unreadable rows"]["samples"] == 1  # the line that is not JSON has no category

    table = data_root / "HR-Bench" / "hr_bench_8k.tsv"
    table.write_text(table.read_text() + "8\tWhich one?\tleft\n")  # a row with cells missing
    broken = load_benchmark("hrbench", data_root)[-1]
    assert broken.error == "HR-Bench/hr_bench_8k.tsv line 3: missing or empty field 'B'"


def test_every_requested_sample_is_counted(model, processor, data_root, tmp_path):
    """requested = run + failed + missing: a sample without a record of its own (here a duplicated id) shows up."""
    samples = load_benchmark("mmerwl", data_root)
    samples.append(samples[0])
    summary = evaluate(model, processor, samples, "coarse", tmp_path / "out", "mmerwl", budget=64, max_new_tokens=2,
                       progress=False)
    assert (summary["requested"], summary["run"], summary["failed"], summary["missing"]) == (3, 2, 0, 1)
    assert "| mmerwl | coarse | 64 |" in results_table([summary]) and "| 3 | 2 | 0 | 1 |" in results_table([summary])
    with pytest.raises(ValueError, match="must be positive"):
        evaluate(model, processor, samples, "coarse", tmp_path / "out", "mmerwl", batch_size=-2, progress=False)


PLOTTED = [("vstar", "ergo", 640, 820, 0.81), ("vstar", "full", 16384, 5200, 0.79), ("vstar", "coarse", 640, 640, 0.62),
           ("hrbench", "ergo", 640, 900, 0.70), ("hrbench", "ergo", 1280, 1700, 0.72)]
CROWDED = PLOTTED + [("mmerwl", "ergo", 640, 820, 0.81), ("mmerwl", "ergo", 1280, 830, 0.80),
                     ("synthetic", "full", 16384, 16384, 1.0), ("synthetic", "ergo", 144, 4, 0.0)]


@pytest.mark.parametrize("points", [PLOTTED, CROWDED], ids=["paper-like", "crowded"])
def test_plot_labels_name_the_budget_stay_inside_and_do_not_overlap(tmp_path, points):
    from PIL import Image

    from ergo_vqa.plot import plot, plot_layout

    summaries = [{"benchmark": b, "mode": m, "budget": budget, "mean_vision_tokens": tokens, "accuracy": accuracy}
                 for b, m, budget, tokens, accuracy in points]
    layout = plot_layout(summaries)
    assert [label.text for label in layout.labels] == [f"{b} {m} {budget}" for b, m, budget, *_ in points]

    def inside(box, outer):
        return outer[0] <= box[0] < box[2] <= outer[2] and outer[1] <= box[1] < box[3] <= outer[3]

    def overlap(a, b):
        return min(a[2], b[2]) > max(a[0], b[0]) and min(a[3], b[3]) > max(a[1], b[1])

    canvas = (0, 0, *layout.size)
    markers = [(x - 6, y - 6, x + 6, y + 6) for x, y in (label.point for label in layout.labels)]
    boxes = [label.box for label in layout.labels]
    assert all(inside(box, layout.area) for box in boxes)
    assert all(inside(box, canvas) for _, box in layout.texts)
    assert not any(overlap(a, b) for i, a in enumerate(boxes) for b in boxes[i + 1:])
    assert not any(overlap(box, other) for box in boxes for other in markers + [box for _, box in layout.texts])
    assert not any(overlap(a, b) for i, (_, a) in enumerate(layout.texts) for _, b in layout.texts[i + 1:])
    assert Image.open(plot(summaries, tmp_path / "plot.png")).size == layout.size


def test_a_local_and_a_served_run_never_share_a_table():
    shared = {"benchmark": "vstar", "mode": "ergo", "budget": 640, "max_new_tokens": 8}
    local = {"settings": {**shared, "weights": "0123abcd"}}
    served = {"settings": {**shared, "endpoint": "http://127.0.0.1:8000/v1", "served_model": "ergo"}}
    assert comparable([local, served], local["settings"]) == [local]
    assert comparable([local, served], served["settings"]) == [served]


def test_a_repeated_id_is_refused_up_front_naming_the_id_and_its_lines(tiny_folder, data_root, tmp_path, capsys):
    """Records are kept per id, so two rows with one id would leave one of them without a record on every rerun
    (exit 1 forever): ``ergo eval`` refuses such a file before anything loads, naming the id and both lines."""
    questions = data_root / "vstar_bench" / "test_questions.jsonl"
    rows = questions.read_text().splitlines()
    questions.write_text("\n".join([*rows, rows[0]]) + "\n")  # line 3 repeats line 1's question_id 0
    status = cli(["eval", "--model", str(tiny_folder), "--dataset", "vstar", "--data-root", str(data_root),
                  "--mode", "coarse", "--budget", "64", "--max-new-tokens", "2", "--out", str(tmp_path / "out")])
    captured = capsys.readouterr()
    assert status == 2 and captured.out == "" and len(captured.err.splitlines()) == 1, captured
    where = "vstar_bench/test_questions.jsonl line"
    assert captured.err.startswith("ergo: error: ") and f"id '0' at {where} 1 and {where} 3" in captured.err
    assert not (tmp_path / "out").exists()  # nothing ran
    assert [sample.id for sample in load_benchmark("vstar", data_root, limit=2)] == ["0", "1"]  # not in the selection


def _red_patches(pixel_values) -> int:
    """Patches of a Qwen2.5-VL ``pixel_values`` (channel-major, CLIP-normalised) that are mostly saturated red."""
    red, green = pixel_values.unflatten(-1, (3, -1)).mean(-1).unbind(-1)[:2]
    return int((red - green > 2).sum())


def test_masking_hides_the_target_from_the_coarse_view_only(model, processor, tmp_path):
    """The masking test (``mask_target``): stage 1's view has the target's box painted over in its surroundings'
    colour, and stage 2 still crops the unmasked original. The target fills all but an 8 px ring of the image, so
    whatever region (or fallback) stage 1 gives, the second image shows it. Watched at the vision tower's input."""
    from PIL import Image, ImageDraw

    from ergo_vqa.evaluation import mask_box

    image = Image.new("RGB", (448, 448), (128, 128, 128))
    ImageDraw.Draw(image).rectangle((8, 8, 439, 439), fill=(230, 20, 20))
    assert (np.asarray(mask_box(image, [8, 8, 440, 440])) == 128).all()  # filled with its ring's median colour
    image.save(tmp_path / "scene.png")
    row = {"id": "a", "image": "scene.png", "question": "What is red?", "options": ["(A) a", "(B) b"],
           "answer": "A", "gt_bbox": [8, 8, 440, 440]}
    (tmp_path / "test.jsonl").write_text(json.dumps(row) + "\n")
    samples = load_benchmark("synthetic", tmp_path)
    seen = []
    hook = model.model.visual.register_forward_pre_hook(lambda module, args: seen.append(_red_patches(args[0])))
    try:
        summaries = {mask: evaluate(model, processor, samples, "ergo", tmp_path / "out", "synthetic", budget=64,
                                    max_new_tokens=4, progress=False, mask_target=mask) for mask in (False, True)}
    finally:
        hook.remove()
    unmasked_coarse, unmasked_second, masked_coarse, masked_second = seen
    assert unmasked_coarse > 0 and masked_coarse == 0  # the target is gone from the masked run's coarse view only
    assert unmasked_second > 0 and masked_second > 0
    assert summaries[True]["settings"]["mask"] and "mask" not in summaries[False]["settings"]  # records apart
    with pytest.raises(ValueError, match="modes ergo and coarse"):
        evaluate(model, processor, samples, "full", tmp_path / "out", "synthetic", mask_target=True)
    (tmp_path / "test.jsonl").write_text(json.dumps({**row, "gt_bbox": None}) + "\n")
    with pytest.raises(ValueError, match="gt_bbox"):
        evaluate(model, processor, load_benchmark("synthetic", tmp_path), "ergo", tmp_path / "out", "synthetic",
                 mask_target=True)


def test_cli_evaluates_the_contextual_variant_with_the_target_masked(tiny_folder, tmp_path, capsys):
    """``ergo eval --dataset synthetic-context --mask-target`` reads the contextual split from the data root's
    ``context/`` folder and keeps the masked run's records and table apart from the unmasked one's."""
    from ergo_vqa.synthetic_task import write_splits

    write_splits(tmp_path / "data", {"test": 2}, variant="context")
    for flags in ([], ["--mask-target"]):
        assert cli(["eval", "--model", str(tiny_folder), "--dataset", "synthetic-context", "--data-root",
                    str(tmp_path / "data"), "--out", str(tmp_path / "eval"), "--mode", "coarse", "--budget", "64",
                    "--max-new-tokens", "2", *flags]) == 0
    found = (tmp_path / "eval").glob("synthetic-context-coarse-*.summary.json")
    summaries = [json.loads(path.read_text()) for path in found]
    assert sorted("mask" in summary["settings"] for summary in summaries) == [False, True]
    assert all(summary["samples"] == 2 for summary in summaries)
    assert "| synthetic-context | coarse |" in capsys.readouterr().out
