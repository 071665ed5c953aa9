"""The same behaviour on every family ERGO runs on (``modeling_ergo.family_ergo``: Qwen2.5-VL, Qwen3-VL, Qwen3.5),
each a tiny random-weight model built from config, saved as an ERGO Hub folder and loaded back through the Auto
classes with ``trust_remote_code`` (so the folder's own flat code runs). Where ``test_generate`` or ``test_pipeline``
already checks a behaviour on Qwen2.5-VL, its test runs here unchanged on each family's model and processor."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file
from transformers import AutoConfig, AutoModelForImageTextToText, AutoProcessor, pipeline

from conftest import noise_image
from ergo_vqa.testing_utils import scripted_stage1, zoom_text
from ergo_vqa.tiny import build_model, build_processor, build_tokenizer
from hub_card import save_hub_folder
from hub_card.__main__ import main as hub_card_main
from modeling_ergo.family_ergo import FAMILIES, QWEN2_5_VL, QWEN3_VL, Family
from processing_ergo import ErgoProcessor
from processing_ergo.geometry_ergo import (
    box_scale,
    budget_to_pixels,
    crop_region,
    crop_size,
    map_box_to_original,
    smart_resize,
    vision_tokens,
)
from processing_ergo.prompts_ergo import stage1_prompt
from test_generate import QUESTION, image_prefills, run
from test_generate import test_a_streamer_receives_stage_1_then_the_answer_and_ends_after_the_final_token as streams
from test_generate import test_cache_reuse_answers_exactly_as_re_prefill as continues_like_re_prefill
from test_generate import test_greedy_batch_equals_one_by_one as batches_like_singles
from test_hub_folder import save_stock
from test_pipeline import ANSWER, chat, forced
from test_pipeline import test_new_text_is_the_answer_without_special_tokens as pipes

BUDGET = 64
NEW_FAMILIES = pytest.mark.parametrize("family", [family for family in FAMILIES.values() if family is not QWEN2_5_VL],
                                       ids=lambda family: family.model_type, indirect=True)
"""For the tests imported from ``test_generate`` and ``test_pipeline``, which run on Qwen2.5-VL there already."""


@pytest.fixture(scope="module", params=list(FAMILIES.values()), ids=list(FAMILIES))
def family(request) -> Family:
    return request.param


@pytest.fixture(scope="module")
def folder(family, tmp_path_factory) -> Path:
    """The family's tiny ERGO Hub folder."""
    tokenizer = build_tokenizer(family=family)
    out = tmp_path_factory.mktemp(f"ergo_{family.model_type}")
    save_hub_folder(build_model(tokenizer, family=family), build_processor(tokenizer, family=family), out)
    return out


@pytest.fixture(scope="module")
def model(folder):
    return AutoModelForImageTextToText.from_pretrained(folder, trust_remote_code=True, dtype=torch.float32).eval()


@pytest.fixture(scope="module")
def processor(folder):
    return AutoProcessor.from_pretrained(folder, trust_remote_code=True, coarse_budget=BUDGET)


def test_the_folder_is_the_stock_model_to_engines_and_ergo_to_remote_code(family, folder, model, processor):
    config = json.loads((folder / "config.json").read_text())
    assert config["model_type"] == family.model_type
    assert config["architectures"] == [family.model_class.__name__]
    assert config["auto_map"]["AutoModelForImageTextToText"] == f"modeling_ergo.{type(model).__name__}"
    assert type(model).__module__.startswith("transformers_modules.")  # the folder's flat code, not the package's
    assert type(AutoConfig.from_pretrained(folder, trust_remote_code=True)).__module__.startswith("transformers_modules.")
    assert (processor.factor, processor.grounding) == (family.factor, family.grounding)
    assert json.loads((folder / "processor_config.json").read_text())["grounding"] == family.grounding
    video = json.loads((folder / "video_preprocessor_config.json").read_text())
    assert (video["video_processor_type"], video["patch_size"]) == (family.video_processor, family.patch_size)
    saved = load_file(folder / "model.safetensors")
    loaded = model.state_dict()
    stock = family.model_class.from_pretrained(folder, dtype=torch.float32).state_dict()
    assert set(stock) == set(loaded) and all(torch.equal(stock[key], loaded[key]) for key in stock)
    assert len(saved) == len(loaded)


def test_a_forced_region_is_mapped_in_the_familys_convention_and_cropped_at_native_resolution(family, model,
                                                                                              processor):
    """Stage 1 is asked for its box in the family's convention; the box maps to the original (per axis, from the
    coarse view's pixels or from thousandths), the crop is the original's pixels resized to the family's factor, and
    every count follows that factor."""
    image, box = noise_image(1400, 900, 1), (100, 80, 600, 400)
    inputs, out = run(model, processor, [image], [zoom_text(box)])
    coarse_h, coarse_w = smart_resize(900, 1400, family.factor, max_pixels=budget_to_pixels(BUDGET, family.factor))
    assert coarse_w % family.factor == coarse_h % family.factor == 0
    region = map_box_to_original(box, *box_scale((1400, 900), (coarse_w, coarse_h), family.grounding), 1400, 900)
    if family.grounding == "relative":
        assert region == (140, 72, 840, 360)  # thousandths of 1400 x 900
    size = crop_size(region, budget_to_pixels(BUDGET, family.factor), family.factor)
    assert out.regions == [region] and out.crop_sizes == [size] and out.fallbacks == [None]
    coarse, crop = vision_tokens(coarse_w, coarse_h, family.factor), vision_tokens(*size, family.factor)
    assert out.vision_tokens[0] == {"stage1": coarse, "stage2": crop, "total": coarse + crop,
                                    "full_resolution": vision_tokens(*full_resolution(family), family.factor)}
    prompt = processor.decode(inputs["input_ids"][0])
    assert prompt.count("<|image_pad|>") == coarse and stage1_prompt("Which letter is on the sign?",
                                                                     family.grounding) in prompt
    decision = processor.plan_zooms(inputs["ergo_context"], out.stage1_texts)[0]
    assert decision.image.tobytes() == crop_region(image, region, size).tobytes()
    turn = processor.stage2_turn_tokens(decision, QUESTION, "reference")
    assert turn["image_grid_thw"].tolist() == [[1, size[1] // family.patch_size, size[0] // family.patch_size]]
    assert len(turn["input_ids"][0]) <= processor.max_stage2_turn_tokens(inputs["ergo_context"])


@pytest.mark.parametrize("cut_off", [False, True], ids=["stopped", "cut_off"])
def test_a_lone_sample_continues_stage_1s_cache_exactly_as_re_prefill(family, model, processor, cut_off):
    """Every family continues a lone sample's dynamic cache (Qwen3.5's recurrent states included: they hold exactly
    its prompt and reply), feeding only the new turn; only the crop goes through the vision tower, and on Qwen3-VL
    its DeepStack features reach the decoder beside its tokens. Stage 1 ends on its stop token (never fed back), or
    writes its whole text and is cut off by the limit before it (its last token then comes with the new turn)."""
    inputs = processor.prepare([noise_image(900, 700, 2)], ["What is written on the sign?"])
    stage1 = scripted_stage1(processor, [zoom_text((50, 50, 500, 500))])
    stage1["max_new_tokens"] -= cut_off
    deepstack, hook = [], model.model.language_model.register_forward_pre_hook(
        lambda module, args, kwargs: deepstack.append(
            [len(feature) for feature in kwargs.get("deepstack_visual_embeds") or []]), with_kwargs=True)
    seen, prefills = image_prefills(model)
    outputs = []
    try:
        for reuse in (True, False):
            model.config.reuse_stage1_cache = reuse
            outputs.append(model.generate(**inputs, max_new_tokens=8, min_new_tokens=8, return_dict_in_generate=True,
                                          stage1_generate_kwargs=dict(stage1)))
    finally:
        model.config.reuse_stage1_cache = True
        hook.remove()
        prefills.remove()
    continued, re_prefilled = outputs
    assert (continued.cache, re_prefilled.cache) == ("dynamic", "re-prefill")
    assert torch.equal(continued.sequences, re_prefilled.sequences)
    assert continued.fallbacks == [None] and continued.stage1_texts[0] == stage1_text(processor, stage1)
    (fed, cached), (conversation, _) = seen[1], seen[3]  # stage 2 continued, then re-prefilled
    assert fed == conversation[cached:] and len(fed) < len(conversation)  # only what the cache lacks
    if family is QWEN3_VL:
        crop, coarse = continued.vision_tokens[0]["stage2"], continued.vision_tokens[0]["stage1"]
        prefills = [sizes for sizes in deepstack if sizes]  # each call: stage 1, then stage 2 continued or re-prefilled
        assert prefills == [[coarse], [crop], [coarse], [coarse + crop]]
    else:
        assert not any(deepstack)


def full_resolution(family: Family) -> tuple[int, int]:
    """A 1400x900 image's size in the paper's 16384-token baseline: the image processor's rounding to the factor."""
    height, width = smart_resize(900, 1400, family.factor, max_pixels=budget_to_pixels(16384, family.factor))
    return width, height


def stage1_text(processor, stage1: dict) -> str:
    """The text a scripted stage 1 writes when it is not cut off."""
    script = stage1["logits_processor"][0].scripts[0]
    return processor.tokenizer.decode(script, skip_special_tokens=True)


@NEW_FAMILIES
def test_a_padded_batch_continues_or_re_prefills_and_says_why(family, model, processor):
    """The padded batch of ``test_generate``, rows skipping stage 2 included, with the dynamic and static caches:
    token for token as re-prefilled; Qwen3.5's recurrent states re-encode and ``cache`` gives the reason."""
    continues_like_re_prefill(model, processor, "coarse")


@NEW_FAMILIES
def test_a_greedy_batch_equals_its_samples_one_by_one(model, processor):
    batches_like_singles(model, processor)


@NEW_FAMILIES
def test_a_streamer_receives_stage_1_then_the_answer(model, processor):
    streams(model, processor)


@NEW_FAMILIES
def test_the_image_text_to_text_pipeline_answers_as_generate(model, processor):
    pipes(pipeline("image-text-to-text", model=model, processor=processor), model, processor)


def test_the_pipeline_loads_the_folder_with_trust_remote_code(folder):
    pipe = pipeline("image-text-to-text", model=str(folder), trust_remote_code=True)
    reply = pipe(text=chat(noise_image(600, 500, 3)), return_full_text=False, generate_kwargs=forced(pipe.processor))
    assert reply[0]["generated_text"] == ANSWER


def test_hub_card_converts_a_stock_checkpoint_weights_unchanged(family, tmp_path, capsys):
    """A stock checkpoint laid out as the family's Hub folders are, converted: the safetensors byte for byte, the
    stock model type, the remote code loading it with the same tensors, the processor (which stock transformers
    cannot build without torchvision for Qwen3-VL and Qwen3.5) with the family's geometry and grounding."""
    source, stock = save_stock(tmp_path / "stock", build_tokenizer(family=family), family=family)
    assert ErgoProcessor.from_pretrained(source).grounding == family.grounding  # the stock folder itself loads
    assert hub_card_main([str(source), str(tmp_path / "ergo")]) == 0
    assert f"grounding={family.grounding!r}" in capsys.readouterr().out
    out = tmp_path / "ergo"
    assert (out / "model.safetensors").read_bytes() == (source / "model.safetensors").read_bytes()
    if family is not QWEN2_5_VL:  # what engines load the stock processor with is the source's own
        assert (out / "video_preprocessor_config.json").read_text() == (
            source / "video_preprocessor_config.json").read_text()
    config = json.loads((out / "config.json").read_text())
    assert (config["model_type"], config["architectures"]) == (family.model_type, [family.model_class.__name__])
    loaded = AutoModelForImageTextToText.from_pretrained(out, trust_remote_code=True, dtype=torch.float32)
    expected = stock.state_dict()
    assert set(loaded.state_dict()) == set(expected)
    assert all(torch.equal(tensor, expected[key]) for key, tensor in loaded.state_dict().items())
    converted = AutoProcessor.from_pretrained(out, trust_remote_code=True)
    assert (converted.factor, converted.grounding) == (family.factor, family.grounding)
    assert f"on {family.name}" in (out / "README.md").read_text()
