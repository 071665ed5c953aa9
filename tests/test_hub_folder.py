"""The saved folder is a self-contained Hub model: remote code only, Qwen2.5-VL-compatible weights and config."""

import json
import os
import subprocess
import sys
import textwrap

import pytest
import torch
from safetensors import safe_open
from transformers import Qwen2_5_VLForConditionalGeneration

from ergo_vqa.demo import DEMO_MODEL
from ergo_vqa.tiny import TINY, ModelShape, build_processor, config_kwargs
from hub_card import convert_checkpoint
from hub_card.__main__ import main as hub_card_main
from modeling_ergo import ErgoForConditionalGeneration
from modeling_ergo.family_ergo import QWEN2_5_VL, Family
from processing_ergo import ErgoProcessor

FRESH_PROCESS_CHECK = textwrap.dedent('''
    import sys

    class BlockProject:
        """The project's own packages must not be importable: everything comes from the folder."""
        def find_spec(self, name, path=None, target=None):
            if name.split(".")[0] in {"modeling_ergo", "processing_ergo", "hub_card", "ergo_vqa", "training"}:
                raise ImportError("blocked: " + name)

    sys.meta_path.insert(0, BlockProject())
    sys.modules["torchvision"] = None  # as where it is not installed: the video-processor file must not need it
    import json, random
    from PIL import Image
    from transformers import AutoConfig, AutoModel, AutoModelForImageTextToText, AutoProcessor, pipeline

    folder = sys.argv[1]
    rng = random.Random(0)
    image = Image.frombytes("RGB", (900, 600), rng.randbytes(900 * 600 * 3))
    messages = [{"role": "user", "content": [{"type": "image", "image": image},
                {"type": "text", "text": "What is it?\\n(A) a cat\\n(B) a dog"}]}]
    report = {
        "config": type(AutoConfig.from_pretrained(folder, trust_remote_code=True)).__module__,
        "auto_model": type(AutoModel.from_pretrained(folder, trust_remote_code=True)).__name__,
    }
    model = AutoModelForImageTextToText.from_pretrained(folder, trust_remote_code=True)
    processor = AutoProcessor.from_pretrained(folder, trust_remote_code=True)
    inputs = processor.apply_chat_template(messages, add_generation_prompt=True, tokenize=True,
                                           return_dict=True, return_tensors="pt")
    out = model.generate(**inputs, max_new_tokens=6, return_dict_in_generate=True)
    answer = processor.batch_decode(out.sequences[:, inputs["input_ids"].shape[1]:], skip_special_tokens=True)[0]
    pipe = pipeline("image-text-to-text", model=folder, trust_remote_code=True)
    piped = pipe(text=messages, max_new_tokens=6, return_full_text=False)[0]["generated_text"]
    tall = Image.frombytes("RGB", (300, 800), rng.randbytes(300 * 800 * 3))
    other = [{"role": "user", "content": [{"type": "image", "image": tall}, {"type": "text", "text": "Why?"}]}]
    alone = pipe(text=other, max_new_tokens=6, return_full_text=False)[0]["generated_text"]
    batched = pipe(text=[messages, other], max_new_tokens=6, return_full_text=False, batch_size=2)
    report["pipeline_batch_equal"] = [item[0]["generated_text"] for item in batched] == [piped, alone]
    report.update(model=type(model).__module__, processor=type(processor).__module__, answer=answer, piped=piped,
                  fallbacks=out.fallbacks, stage1=out.vision_tokens[0]["stage1"],
                  leaked=sorted(m for m in sys.modules if m.split(".")[0] in {"modeling_ergo", "processing_ergo"}))
    print("REPORT" + json.dumps(report))
''')


def test_folder_loads_in_a_fresh_process_without_the_project(tiny_folder, tmp_path):
    script = tmp_path / "check.py"
    script.write_text(FRESH_PROCESS_CHECK)
    env = {key: value for key, value in os.environ.items() if key != "PYTHONPATH"}
    env.update(HF_HUB_OFFLINE="1", HF_HOME=str(tmp_path / "hf_home"))
    done = subprocess.run([sys.executable, "-I", str(script), str(tiny_folder)], cwd=tmp_path, env=env,
                          capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    report = json.loads(done.stdout.split("REPORT", 1)[1])
    for key in ("config", "model", "processor"):
        assert report[key].startswith("transformers_modules."), report
    assert report["auto_model"] == "ErgoForConditionalGeneration"
    assert report["fallbacks"] == ["truncated"] and report["stage1"] > 0  # a random stage 1 runs out of its 6 tokens
    assert report["piped"] == report["answer"]  # the pipeline gives the same two-stage answer
    assert report["pipeline_batch_equal"]
    assert report["leaked"] == []


def test_folder_files_and_remote_code_are_self_contained(tiny_folder):
    names = set(os.listdir(tiny_folder))
    assert {"config.json", "model.safetensors", "processor_config.json", "README.md", "configuration_ergo.py",
            "modeling_ergo.py", "processing_ergo.py", "geometry_ergo.py", "images_ergo.py", "prompts_ergo.py",
            "zoom_ergo.py", "generation_ergo.py", "video_preprocessor_config.json"} <= names
    assert not any(name.endswith((".bin", ".pt", ".pkl")) for name in names)
    for name in names:
        if name.endswith(".py"):
            source = (tiny_folder / name).read_text()
            for line in source.splitlines():
                if line.startswith(("import ", "from ")) and not line.startswith("from __future__"):
                    top = line.split()[1].split(".")[0]
                    assert top in {"", "torch", "transformers", "PIL", "huggingface_hub", "re", "math", "os", "io",
                                   "base64", "time", "json", "dataclasses", "contextlib", "typing", "concurrent", "copy"}, (name, line)
            assert "eval(" not in source and "pickle" not in source
    config = json.loads((tiny_folder / "config.json").read_text())
    assert config["model_type"] == "qwen2_5_vl"
    assert config["architectures"] == ["Qwen2_5_VLForConditionalGeneration"]
    assert set(config["auto_map"]) == {"AutoConfig", "AutoModel", "AutoModelForImageTextToText",
                                      "AutoModelForMultimodalLM"}
    processor_config = json.loads((tiny_folder / "processor_config.json").read_text())
    assert processor_config["auto_map"]["AutoProcessor"] == "processing_ergo.ErgoProcessor"


def test_engines_that_know_qwen2_5_vl_read_the_folder_natively(tiny_folder, model):
    # What vLLM relies on: the stock class and the Hub key layout (`model.layers.*`, `visual.*`).
    stock = Qwen2_5_VLForConditionalGeneration.from_pretrained(tiny_folder, dtype=torch.float32)
    ours = model.state_dict()
    assert all(torch.equal(tensor, ours[key]) for key, tensor in stock.state_dict().items())
    with safe_open(str(tiny_folder / "model.safetensors"), "pt") as weights:
        keys = list(weights.keys())
    assert any(key.startswith("model.layers.") for key in keys) and any(key.startswith("visual.") for key in keys)
    assert not any(key.startswith("model.language_model.") for key in keys)


def save_stock(folder, tokenizer, seed: int = 7, shape: ModelShape = TINY, family: Family = QWEN2_5_VL,
               **save_kwargs):
    """A stock folder of ``family`` (Qwen2.5-VL: the legacy Hub key layout), as Qwen/Qwen2.5-VL-*-Instruct are laid
    out; Qwen3-VL and Qwen3.5 folders as theirs are: a fast image processor and the stock processor class named, a
    chat template file and a video processor file. ``save_kwargs`` such as ``max_shard_size`` go to
    ``save_pretrained``."""
    torch.manual_seed(seed)
    stock = family.model_class(family.config_class(**config_kwargs(tokenizer, shape, family)))
    stock.save_pretrained(folder, **save_kwargs)
    processor = build_processor(tokenizer, family=family)
    processor.tokenizer.save_pretrained(folder)
    processor.image_processor.save_pretrained(folder)
    if family is not QWEN2_5_VL:
        image = json.loads((folder / "preprocessor_config.json").read_text())
        image.update(image_processor_type="Qwen2VLImageProcessorFast", processor_class="Qwen3VLProcessor")
        (folder / "preprocessor_config.json").write_text(json.dumps(image))
        video = {"video_processor_type": family.video_processor, "patch_size": family.patch_size,
                 "temporal_patch_size": 2, "merge_size": family.merge_size, "fps": 2, "do_sample_frames": True}
        (folder / "video_preprocessor_config.json").write_text(json.dumps(video))
        (folder / "chat_template.jinja").write_text(processor.chat_template)
    return folder, stock


@pytest.fixture
def stock_checkpoint(tmp_path, tokenizer):
    return save_stock(tmp_path / "qwen", tokenizer)


def test_ergo_loads_a_stock_qwen_checkpoint_with_identical_weights(stock_checkpoint):
    folder, stock = stock_checkpoint
    config = json.loads((folder / "config.json").read_text())
    assert config["architectures"] == ["Qwen2_5_VLForConditionalGeneration"] and "auto_map" not in config
    loaded = ErgoForConditionalGeneration.from_pretrained(folder, dtype=torch.float32)
    expected = stock.state_dict()
    assert set(loaded.state_dict()) == set(expected)
    assert all(torch.equal(tensor, expected[key]) for key, tensor in loaded.state_dict().items())
    processor = ErgoProcessor.from_pretrained(folder)
    assert processor.coarse_budget == 1280 and processor.tokenizer.eos_token == "<|im_end|>"


def test_convert_checkpoint_writes_an_ergo_folder(stock_checkpoint, tmp_path):
    folder, stock = stock_checkpoint
    out = convert_checkpoint(folder, tmp_path / "ergo", coarse_budget=640).folder
    assert ErgoProcessor.from_pretrained(out).coarse_budget == 640
    loaded = ErgoForConditionalGeneration.from_pretrained(out, dtype=torch.float32)
    assert all(torch.equal(tensor, stock.state_dict()[key]) for key, tensor in loaded.state_dict().items())
    assert (out / "modeling_ergo.py").is_file() and "auto_map" in json.loads((out / "config.json").read_text())
    assert (out / "video_preprocessor_config.json").is_file()


def test_convert_checkpoint_refuses_what_it_cannot_load_safely(stock_checkpoint, tmp_path):
    folder, _ = stock_checkpoint
    pickled = tmp_path / "pickled"
    pickled.mkdir()
    (pickled / "config.json").write_text((folder / "config.json").read_text())
    (pickled / "pytorch_model.bin").write_bytes(b"not loaded")
    with pytest.raises(ValueError, match="safetensors only"):
        convert_checkpoint(pickled, tmp_path / "out")
    other = tmp_path / "other"
    other.mkdir()
    (other / "config.json").write_text(json.dumps({"model_type": "llama"}))
    with pytest.raises(ValueError, match=r"Qwen2.5-VL \(qwen2_5_vl\), Qwen3-VL \(qwen3_vl\), Qwen3.5 \(qwen3_5\)"):
        convert_checkpoint(other, tmp_path / "out2")
    with pytest.raises(FileNotFoundError):
        convert_checkpoint(tmp_path / "missing", tmp_path / "out3")


def test_hub_card_command(stock_checkpoint, tmp_path, capsys):
    main = hub_card_main
    folder, _ = stock_checkpoint
    assert main([str(folder), str(tmp_path / "cli"), "--coarse-budget", "640", "--fallback", "coarse"]) == 0
    processor = ErgoProcessor.from_pretrained(tmp_path / "cli")
    assert (processor.coarse_budget, processor.fallback) == (640, "coarse")
    card = (tmp_path / "cli" / "README.md").read_text()
    assert "pipeline_tag: image-text-to-text" in card and "640 vision" in card
    assert main([str(tmp_path / "nothing"), str(tmp_path / "x")]) == 2
    assert "config.json" in capsys.readouterr().err


def test_video_processor_config_matches_the_image_processor(tiny_folder):
    """vLLM's Qwen2.5-VL processor refuses a folder without a video processor (issue 23); ERGO reads no video, so
    the file only has to describe the same pixels and patches as the image processor, in keys transformers'
    ``Qwen2VLVideoProcessor`` accepts. (Loading it needs torchvision; the fresh-process test loads the folder
    without torchvision.)"""
    from transformers.processing_utils import VideosKwargs

    video = json.loads((tiny_folder / "video_preprocessor_config.json").read_text())
    image = json.loads((tiny_folder / "processor_config.json").read_text())["image_processor"]
    assert video["video_processor_type"] == "Qwen2VLVideoProcessor"
    for key in ("patch_size", "temporal_patch_size", "merge_size", "image_mean", "image_std", "size", "resample",
                "rescale_factor", "do_normalize", "do_rescale", "do_resize", "do_convert_rgb"):
        assert video[key] == image[key], key
    assert (video["min_pixels"], video["max_pixels"]) == (image["size"]["shortest_edge"], image["size"]["longest_edge"])
    qwen_video_keys = {"min_pixels", "max_pixels", "patch_size", "temporal_patch_size", "merge_size",
                       "video_processor_type"}
    assert set(video) <= set(VideosKwargs.__annotations__) | qwen_video_keys


def test_reconverting_into_a_used_folder_needs_overwrite_and_keeps_only_the_new_weights(tmp_path, tokenizer, capsys):
    """Issue 24.1: A's one-file checkpoint, then B's shards into the same folder. Without ``--overwrite``: refused,
    one line; with it, A's ``model.safetensors`` is gone and the folder loads B's weights."""
    one_file, _ = save_stock(tmp_path / "a", tokenizer, seed=1)
    sharded, stock_b = save_stock(tmp_path / "b", tokenizer, seed=2, max_shard_size="200KB")
    assert (sharded / "model.safetensors.index.json").is_file()
    out = tmp_path / "out"
    assert hub_card_main([str(one_file), str(out)]) == 0
    capsys.readouterr()
    assert hub_card_main([str(sharded), str(out)]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("hub_card: error:") and "--overwrite" in err[0], err
    assert (out / "model.safetensors").is_file()  # refused before anything changed

    assert hub_card_main([str(sharded), str(out), "--overwrite"]) == 0
    assert "model.safetensors" in capsys.readouterr().out  # the removal is reported
    weights = sorted(path.name for path in out.glob("model*.safetensors*"))
    assert weights == sorted(path.name for path in sharded.glob("model*.safetensors*")) and len(weights) > 2
    loaded = ErgoForConditionalGeneration.from_pretrained(out, dtype=torch.float32)
    expected = stock_b.state_dict()
    assert all(torch.equal(tensor, expected[key]) for key, tensor in loaded.state_dict().items())


def test_converting_an_ergo_folder_keeps_its_settings_and_card(tmp_path, capsys):
    """Issue 24.2: the demo model (coarse budget 144) converted as is keeps 144 and its card; a flag changes only
    what it names, and the command says what changed."""
    source_settings = json.loads((DEMO_MODEL / "processor_config.json").read_text())
    assert source_settings["coarse_budget"] == 144
    assert hub_card_main([str(DEMO_MODEL), str(tmp_path / "same")]) == 0
    printed = capsys.readouterr().out
    kept = ErgoProcessor.from_pretrained(tmp_path / "same")
    assert (kept.coarse_budget, kept.crop_budget, kept.fallback, kept.stage2_template) == (144, None, "resize",
                                                                                             "reference")
    assert (tmp_path / "same" / "README.md").read_text() == (DEMO_MODEL / "README.md").read_text()
    assert "coarse_budget=144" in printed and "README.md: kept" in printed, printed

    assert hub_card_main([str(DEMO_MODEL), str(tmp_path / "changed"), "--fallback", "coarse"]) == 0
    printed = capsys.readouterr().out
    changed = ErgoProcessor.from_pretrained(tmp_path / "changed")
    assert (changed.coarse_budget, changed.fallback) == (144, "coarse")
    assert "fallback: 'resize' -> 'coarse'" in printed and "coarse_budget: " not in printed, printed


@pytest.mark.parametrize("case, message", [
    ("missing results", "missing.json"),
    ("results not json", "not JSON"),
    ("results not a summary", "not an `ergo eval` summary"),
    ("bad budget", "budget"),
    ("out is a file", "not a folder"),
])
def test_bad_inputs_are_refused_before_anything_is_written(stock_checkpoint, tmp_path, capsys, case, message):
    """Issue 24.3: each bad input exits 2 with one line, and the output folder is not created."""
    folder, _ = stock_checkpoint
    out = tmp_path / "out"
    (tmp_path / "broken.json").write_text("{not json")
    (tmp_path / "other.json").write_text(json.dumps({"benchmark": "vstar"}))
    extra = {"missing results": ["--results", str(tmp_path / "missing.json")],
             "results not json": ["--results", str(tmp_path / "broken.json")],
             "results not a summary": ["--results", str(tmp_path / "other.json")],
             "bad budget": ["--coarse-budget", "3"],
             "out is a file": []}[case]
    if case == "out is a file":
        out.write_text("a file")
    assert hub_card_main([str(folder), str(out), *extra]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("hub_card: error:") and message in err[0], err
    assert out.is_file() if case == "out is a file" else not out.exists()
