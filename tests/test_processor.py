"""ErgoProcessor: stage-1 formatting, coarse resize, routing of non-ERGO inputs, settings round trip."""

import base64
import io

import pytest
import torch
from transformers import Qwen2VLImageProcessor, Qwen2VLImageProcessorPil
from transformers.utils import is_torchvision_available

from conftest import noise_image
from processing_ergo import ErgoProcessor
from processing_ergo.geometry_ergo import budget_to_pixels, smart_resize
from processing_ergo.prompts_ergo import SYSTEM_PROMPT, stage1_prompt, stage2_prompt

QUESTION = "What is the color of the bag?\n(A) red\n(B) black"


def chat(image, text=QUESTION):
    return [{"role": "user", "content": [{"type": "image", "image": image}, {"type": "text", "text": text}]}]


def test_stage1_input_is_the_reference_conversation_on_the_coarse_image(processor):
    image = noise_image(900, 500)
    inputs = processor.apply_chat_template(chat(image), add_generation_prompt=True, tokenize=True,
                                           return_dict=True, return_tensors="pt")
    height, width = smart_resize(500, 900, max_pixels=budget_to_pixels(64))
    assert inputs["image_grid_thw"].tolist() == [[1, height // 14, width // 14]]
    pads = (height // 28) * (width // 28)
    expected = (
        f"<|im_start|>system\n{SYSTEM_PROMPT}<|im_end|>\n<|im_start|>user\n<|vision_start|>"
        + "<|image_pad|>" * pads
        + f"<|vision_end|>{stage1_prompt('What is the color of the bag?')}<|im_end|>\n<|im_start|>assistant\n"
    )
    assert processor.tokenizer.decode(inputs["input_ids"][0]) == expected
    sample = inputs["ergo_context"].samples[0]
    assert sample.image.size == (900, 500) and sample.coarse_size == (width, height)
    assert sample.stage2_question == QUESTION


@pytest.mark.parametrize("form", ["pil", "path", "bytes", "data_uri"])
def test_image_sources(processor, tmp_path, form):
    image = noise_image(300, 200)
    buffer = io.BytesIO()
    image.save(buffer, format="PNG")
    path = tmp_path / "x.png"
    path.write_bytes(buffer.getvalue())
    source = {"pil": image, "path": str(path), "bytes": buffer.getvalue(),
              "data_uri": "data:image/png;base64," + base64.b64encode(buffer.getvalue()).decode()}[form]
    inputs = processor.apply_chat_template(chat(source), tokenize=True, return_dict=True, add_generation_prompt=True)
    assert inputs["ergo_context"].samples[0].image.tobytes() == image.tobytes()


def test_per_call_settings_override_the_processor(processor):
    image = noise_image(1200, 900)
    inputs = processor.apply_chat_template(chat(image), tokenize=True, return_dict=True, add_generation_prompt=True,
                                           coarse_budget=16, crop_budget=32, fallback="coarse")
    context = inputs["ergo_context"]
    assert int(inputs["image_grid_thw"][0].prod()) // 4 <= 16 + 2
    assert context.crop_max_pixels == budget_to_pixels(32) and context.fallback == "coarse"
    with pytest.raises(ValueError, match="fallback"):
        processor.prepare([image], ["q"], fallback="skip")


def test_non_ergo_conversations_are_processed_like_qwen(processor):
    image = noise_image(300, 200)
    two_images = [{"role": "user", "content": [{"type": "image", "image": image}, {"type": "image", "image": image},
                                                {"type": "text", "text": "Compare."}]}]
    with_system = [{"role": "system", "content": "Be brief."}] + chat(image)
    for conversation in (two_images, with_system):
        inputs = processor.apply_chat_template(conversation, tokenize=True, return_dict=True, add_generation_prompt=True)
        assert "ergo_context" not in inputs
        assert SYSTEM_PROMPT not in processor.tokenizer.decode(inputs["input_ids"][0])
    plain = processor.apply_chat_template(chat(image), tokenize=True, return_dict=True, ergo=False)
    assert "ergo_context" not in plain
    with pytest.raises(ValueError, match="single user message"):
        processor.apply_chat_template(two_images, tokenize=True, return_dict=True, ergo=True)
    # Untokenised rendering is Qwen's, untouched.
    assert "You are a helpful assistant.<|im_end|>" in processor.apply_chat_template(chat(image), tokenize=False)


def test_plain_call_stays_qwen(processor):
    inputs = processor(text=["<|vision_start|><|image_pad|><|vision_end|>hi"], images=[noise_image(56, 56)],
                       return_tensors="pt")
    assert set(inputs) >= {"input_ids", "pixel_values", "image_grid_thw"} and "ergo_context" not in inputs


def test_batch_is_left_padded(processor):
    inputs = processor.prepare([noise_image(300, 200), noise_image(1000, 700, 1)], ["a?", "a much longer question?"])
    assert inputs["attention_mask"][:, -1].tolist() == [1, 1]
    assert inputs["attention_mask"][:, 0].tolist().count(0) == 1


def test_stage2_turn_ends_stage1_and_opens_the_next_user_turn(processor):
    from processing_ergo.zoom_ergo import ZoomDecision, keep_size

    crop = noise_image(112, 84)
    suffix = processor.stage2_turn_tokens(ZoomDecision((0, 0, 1, 1), crop, None, keep_size(crop)), QUESTION, "reference")
    expected = ("<|im_end|>\n<|im_start|>user\n<|vision_start|>" + "<|image_pad|>" * 12 + "<|vision_end|>"
                + stage2_prompt(QUESTION) + "<|im_end|>\n<|im_start|>assistant\n")
    assert processor.tokenizer.decode(suffix["input_ids"][0]) == expected
    assert suffix["image_grid_thw"].tolist() == [[1, 6, 8]]


def test_settings_survive_save_and_load(processor, tmp_path):
    processor.coarse_budget, processor.stage2_template = 640, "fixed"
    try:
        processor.save_pretrained(tmp_path)
    finally:
        processor.coarse_budget, processor.stage2_template = 64, "reference"
    loaded = ErgoProcessor.from_pretrained(tmp_path)
    assert (loaded.coarse_budget, loaded.stage2_template, loaded.fallback) == (640, "fixed", "resize")
    # transformers' own choice of backend: PIL, or torchvision where it is installed (the vLLM venv has it)
    backend = Qwen2VLImageProcessor if is_torchvision_available() else Qwen2VLImageProcessorPil
    assert type(loaded.image_processor) is backend
    assert torch.equal(
        loaded(text=["hi"], return_tensors="pt")["input_ids"], processor(text=["hi"], return_tensors="pt")["input_ids"]
    )


def test_a_batch_processed_in_parallel_equals_one_image_processor_call(processor):
    """The processor runs the image processor per image on a thread pool; the tensors must be those of one call."""
    images = [noise_image(300, 200, 1), noise_image(200, 500, 2), noise_image(420, 420, 3)]
    texts = [f"<|vision_start|><|image_pad|><|vision_end|>{text}" for text in ("a", "bb", "ccc")]
    ours = processor(text=texts, images=images, padding=True, return_tensors="pt")
    stock = processor.image_processor(images, return_tensors="pt")
    assert torch.equal(ours["pixel_values"], stock["pixel_values"])
    assert torch.equal(ours["image_grid_thw"], stock["image_grid_thw"])
    pads = (ours["input_ids"] == processor.image_token_id).sum(dim=1)
    assert pads.tolist() == (stock["image_grid_thw"].prod(dim=-1) // 4).tolist()


def test_a_batch_mixing_ergo_and_other_conversations_names_the_others(processor):
    """Silently answering every conversation single-pass (what a mixed batch did) would turn ERGO off for the ERGO
    requests; the batch is refused, naming which conversations are which, and ergo=False still answers all."""
    image = noise_image(300, 200)
    with_system = [{"role": "system", "content": "Be brief."}] + chat(image)
    batch = [chat(image), with_system, chat(image)]
    with pytest.raises(ValueError, match=r"conversations \[1\] of this batch are not ERGO requests.*while \[0, 2\] are"):
        processor.apply_chat_template(batch, tokenize=True, return_dict=True, add_generation_prompt=True)
    plain = processor.apply_chat_template(batch, tokenize=True, return_dict=True, add_generation_prompt=True, ergo=False)
    assert "ergo_context" not in plain and len(plain["input_ids"]) == 3
    both = processor.apply_chat_template([with_system, with_system], tokenize=True, return_dict=True)
    assert "ergo_context" not in both
