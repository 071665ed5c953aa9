"""ERGO through transformers' ``pipeline("image-text-to-text")``: clean replies, and how ``transformers serve`` parses
them (the whole reply as content), on the tiny random-weight model with scripted stage-1 text."""

import copy

import pytest
from transformers import pipeline

from conftest import noise_image
from ergo_vqa.testing_utils import scripted_stage1, zoom_text
from ergo_vqa.tiny import build_processor
from processing_ergo.processing_ergo import RESPONSE_TEMPLATE, SAVED_RESPONSE_TEMPLATE

QUESTION = "Which letter is on the sign?\n(A) E\n(B) F"
SPECIALS = ("<|im_end|>", "<|endoftext|>", "<|im_start|>")
ANSWER = "<think> I can read it now. </think> <answer>A</answer>"


def chat(image, question: str = QUESTION) -> list[dict]:
    return [{"role": "user", "content": [{"type": "image", "image": image}, {"type": "text", "text": question}]}]


@pytest.fixture
def pipe(model, processor):
    return pipeline("image-text-to-text", model=model, processor=processor)


def forced(processor, count: int = 1) -> dict:
    """Generation arguments that make stage 1 ask for a region and stage 2 write ``ANSWER`` and its end token."""
    return {"max_new_tokens": 40, "stage1_generate_kwargs": scripted_stage1(processor, [zoom_text((5, 5, 40, 40))] * count),
            "stage2_generate_kwargs": {"logits_processor": scripted_stage1(processor, [ANSWER] * count)["logits_processor"]}}


def test_new_text_is_the_answer_without_special_tokens(pipe, model, processor):
    """``return_full_text=False`` gives the answer as ``post_process_image_text_to_text`` decodes it (special tokens
    skipped, the default), alone and batched (where right padding adds ``<|endoftext|>``)."""
    images = [noise_image(900, 600, 60), noise_image(600, 900, 61)]
    alone = pipe(text=chat(images[0]), return_full_text=False, generate_kwargs=forced(processor))
    inputs = processor.apply_chat_template(chat(images[0]), add_generation_prompt=True, tokenize=True,
                                           return_dict=True, return_tensors="pt")
    out = model.generate(**inputs, **forced(processor))
    expected = processor.post_process_image_text_to_text(out, prompt_length=inputs["input_ids"].shape[1])[0]
    assert alone[0]["generated_text"] == expected == ANSWER
    batched = pipe(text=[chat(image) for image in images], return_full_text=False, batch_size=2,
                   generate_kwargs=forced(processor, count=2))
    assert batched[0][0]["generated_text"] == expected
    for replies in [alone, *batched]:
        assert not any(token in replies[0]["generated_text"] for token in SPECIALS)
    kept = pipe(text=chat(images[0]), return_full_text=False, skip_special_tokens=False,
                generate_kwargs=forced(processor))
    assert kept[0]["generated_text"] == ANSWER + "<|im_end|>"  # asked for


def test_full_text_ends_with_the_answer_as_the_assistant_message(pipe, processor):
    image = noise_image(900, 600, 62)
    full = pipe(text=chat(image), generate_kwargs=forced(processor))
    assert full[0]["generated_text"][-1] == {"role": "assistant", "content": ANSWER}


@pytest.mark.parametrize("template", [SAVED_RESPONSE_TEMPLATE, RESPONSE_TEMPLATE])
def test_a_template_saved_by_earlier_folders_is_dropped(tokenizer, template):
    """Folders written before kept ERGO's response template in tokenizer_config.json; loading one must not bring
    the special tokens back into pipeline replies."""
    tokenizer = copy.deepcopy(tokenizer)
    tokenizer.response_template = template
    assert build_processor(tokenizer).tokenizer.response_template is None


def test_ergo_serve_returns_the_whole_reply_as_content(model, processor, monkeypatch):
    """What ``transformers serve`` does with a reply in ``ergo serve``'s process: the whole of it, ``<think>`` and
    ``<zoom>`` included, is the message's content (stage 1's goes back into stage 2 as written), not reasoning."""
    utils = pytest.importorskip("transformers.cli.serving.utils", reason="needs the serve extra")
    monkeypatch.setattr(utils, "_RESPONSE_TEMPLATE_FALLBACKS", dict(utils._RESPONSE_TEMPLATE_FALLBACKS))
    from ergo_vqa.serve import allow_ergo_in_transformers_serve

    prompt = processor.apply_chat_template(chat(noise_image(300, 200, 63)), add_generation_prompt=True, tokenize=True,
                                           return_dict=True, return_tensors="pt")["input_ids"]
    reply = zoom_text((5, 5, 40, 40))
    generated = processor.tokenizer(reply + "<|im_end|>")["input_ids"]
    _, reasoning, _ = utils.parse_assistant_message(processor, model, generated, prompt)
    assert reasoning is not None  # transformers' own Qwen2.5-VL template
    allow_ergo_in_transformers_serve()
    assert utils.parse_assistant_message(processor, model, generated, prompt) == (reply, None, None)


def test_a_mixed_list_gets_each_request_answered_as_alone(pipe, model, processor):
    """Issue 24 item 8: in one pipeline call, an ERGO request gets its two stages and a conversation with its own
    system turn gets plain single-pass generation, each as it would alone. Batched (``batch_size=2``) such a pair
    cannot be collated by transformers' pipeline, which refuses items with different keys: a conversation that is not
    an ERGO request is processed exactly as Qwen2.5-VL (no ``ergo_context`` key), as TRL's GRPO trainer needs (it
    turns every extra key of ``apply_chat_template``'s output into a tensor)."""
    image = noise_image(900, 600, 64)
    with_system = [{"role": "system", "content": "Be brief."}] + chat(image)
    replies = pipe(text=[chat(image), with_system], return_full_text=False, generate_kwargs=forced(processor))
    assert replies[0][0]["generated_text"] == ANSWER
    plain = processor.apply_chat_template(with_system, add_generation_prompt=True, tokenize=True, return_dict=True,
                                          return_tensors="pt")
    assert "ergo_context" not in plain
    out = model.generate(**plain, max_new_tokens=40)
    expected = processor.post_process_image_text_to_text(out, prompt_length=plain["input_ids"].shape[1])[0]
    assert replies[1][0]["generated_text"] == expected
