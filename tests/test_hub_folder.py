"""The saved folder is a self-contained Hub model: remote code only, Qwen2.5-VL-compatible weights and config."""

import json
import os
import subprocess
import sys
import textwrap

import pytest
import torch
from safetensors import safe_open
from transformers import Qwen2_5_VLConfig, Qwen2_5_VLForConditionalGeneration

from ergo_vqa.tiny import build_processor, config_kwargs
from hub_card import convert_checkpoint
from modeling_ergo import ErgoForConditionalGeneration
from processing_ergo import ErgoProcessor

FRESH_PROCESS_CHECK = textwrap.dedent('''
    import sys

    class BlockProject:
        """The project's own packages must not be importable: everything comes from the folder."""
        def find_spec(self, name, path=None, target=None):
            if name.split(".")[0] in {"modeling_ergo", "processing_ergo", "hub_card", "ergo_vqa", "training"}:
                raise ImportError("blocked: " + name)

    sys.meta_path.insert(0, BlockProject())
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
            "modeling_ergo.py", "processing_ergo.py", "geometry_ergo.py", "images_ergo.py", "prompts_ergo.py"} <= names
    assert not any(name.endswith((".bin", ".pt", ".pkl")) for name in names)
    for name in names:
        if name.endswith(".py"):
            source = (tiny_folder / name).read_text()
            for line in source.splitlines():
                if line.startswith(("import ", "from ")) and not line.startswith("from __future__"):
                    top = line.split()[1].split(".")[0]
                    assert top in {"", "torch", "transformers", "PIL", "huggingface_hub", "re", "math", "os", "io",
                                   "base64", "time", "json", "dataclasses", "contextlib", "typing", "concurrent"}, (name, line)
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


@pytest.fixture
def stock_checkpoint(tmp_path, tokenizer):
    """A stock Qwen2.5-VL folder (legacy Hub key layout), as Qwen/Qwen2.5-VL-*-Instruct are laid out."""
    torch.manual_seed(7)
    stock = Qwen2_5_VLForConditionalGeneration(Qwen2_5_VLConfig(**config_kwargs(tokenizer)))
    folder = tmp_path / "qwen"
    stock.save_pretrained(folder)
    build_processor(tokenizer).tokenizer.save_pretrained(folder)
    build_processor(tokenizer).image_processor.save_pretrained(folder)
    return folder, stock


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
    out = convert_checkpoint(folder, tmp_path / "ergo", coarse_budget=640)
    assert ErgoProcessor.from_pretrained(out).coarse_budget == 640
    loaded = ErgoForConditionalGeneration.from_pretrained(out, dtype=torch.float32)
    assert all(torch.equal(tensor, stock.state_dict()[key]) for key, tensor in loaded.state_dict().items())
    assert (out / "modeling_ergo.py").is_file() and "auto_map" in json.loads((out / "config.json").read_text())


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
    with pytest.raises(ValueError, match="Qwen2.5-VL"):
        convert_checkpoint(other, tmp_path / "out2")
    with pytest.raises(FileNotFoundError):
        convert_checkpoint(tmp_path / "missing", tmp_path / "out3")


def test_hub_card_command(stock_checkpoint, tmp_path, capsys):
    from hub_card.__main__ import main

    folder, _ = stock_checkpoint
    assert main([str(folder), str(tmp_path / "cli"), "--coarse-budget", "640", "--fallback", "coarse"]) == 0
    processor = ErgoProcessor.from_pretrained(tmp_path / "cli")
    assert (processor.coarse_budget, processor.fallback) == (640, "coarse")
    card = (tmp_path / "cli" / "README.md").read_text()
    assert "pipeline_tag: image-text-to-text" in card and "640 vision" in card
    assert main([str(tmp_path / "nothing"), str(tmp_path / "x")]) == 2
    assert "config.json" in capsys.readouterr().err
