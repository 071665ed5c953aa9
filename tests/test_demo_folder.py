"""The shipped demo folder is a complete Hub folder: it loads as its card and the README say, in place."""

import json
from pathlib import Path

import torch
from transformers import AutoModelForImageTextToText, AutoProcessor

from ergo_vqa.cli import main
from ergo_vqa.demo import DEMO_MODEL
from ergo_vqa.evaluation import letters_match
from ergo_vqa.synthetic_task import generate_sample
from hub_card.folder import REMOTE_CODE_MODULES, write_video_processor_config
from processing_ergo import ErgoProcessor
from processing_ergo.prompts_ergo import MULTIPLE_CHOICE_POSTFIX


def test_demo_folder_carries_the_package_remote_code():
    """Issue 24.7: the folder's remote code is the package's own (links in the repository, so there is no second
    copy to drift), as ``trust_remote_code`` needs it next to the weights."""
    for module in REMOTE_CODE_MODULES:
        name = Path(module.__file__).name
        assert (DEMO_MODEL / name).is_file(), (
            f"{name} missing from {DEMO_MODEL}: restore it with `ln -s ../../{Path(module.__file__).parent.name}/"
            f"{name} {DEMO_MODEL}/{name}`")
        assert (DEMO_MODEL / name).read_bytes() == Path(module.__file__).read_bytes(), name


def test_demo_folder_loads_through_the_auto_classes_in_place():
    """Issue 24.7: the card's and the README's calls, on the shipped folder itself; the model answers a question
    from a seed it was not trained on."""
    model = AutoModelForImageTextToText.from_pretrained(str(DEMO_MODEL), trust_remote_code=True).eval()
    processor = AutoProcessor.from_pretrained(str(DEMO_MODEL), trust_remote_code=True)
    assert type(model).__module__.startswith("transformers_modules.")
    assert type(processor).__module__.startswith("transformers_modules.") and processor.coarse_budget == 144
    sample = generate_sample("demo-folder/0")
    question = "\n".join([sample.question, *sample.options, MULTIPLE_CHOICE_POSTFIX])
    messages = [{"role": "user", "content": [{"type": "image", "image": sample.image},
                                             {"type": "text", "text": question}]}]
    inputs = processor.apply_chat_template(messages, add_generation_prompt=True, tokenize=True, return_dict=True,
                                           return_tensors="pt")
    with torch.no_grad():
        out = model.generate(**inputs, max_new_tokens=64)
    reply = processor.post_process_image_text_to_text(out, prompt_length=inputs["input_ids"].shape[1])[0]
    assert letters_match(reply, sample.answer), (reply, sample.answer)


def test_ergo_infer_accepts_the_demo_folder(tmp_path, capsys):
    sample = generate_sample("demo-folder/1")
    image_path = tmp_path / "scene.png"
    sample.image.save(image_path)
    question = "\n".join([sample.question, *sample.options, MULTIPLE_CHOICE_POSTFIX])
    assert main(["infer", "--model", str(DEMO_MODEL), "--image", str(image_path), "--question", question,
                 "--max-new-tokens", "64", "--json"]) == 0
    result = json.loads(capsys.readouterr().out)
    assert result["vision_tokens"]["stage1"] <= 144 + 2 and letters_match(result["answer"], sample.answer), result


def test_demo_folder_video_processor_config_is_what_hub_card_writes(tmp_path):
    """Issue 23: vLLM needs the file; the shipped one must be what every hub_card folder gets."""
    written = write_video_processor_config(tmp_path, ErgoProcessor.from_pretrained(DEMO_MODEL))
    shipped = DEMO_MODEL / "video_preprocessor_config.json"
    assert shipped.is_file() and json.loads(shipped.read_text()) == json.loads(written.read_text())
