"""Two-stage generate() on a tiny random-weight Qwen2.5-VL: scripted stage-1 text drives the crop."""

from pathlib import Path
from threading import Thread

import pytest
import torch
from torch._dynamo.utils import counters
from transformers import (
    CompileConfig,
    GenerationConfig,
    LogitsProcessor,
    LogitsProcessorList,
    Qwen2_5_VLConfig,
    Qwen2_5_VLForConditionalGeneration,
    TextIteratorStreamer,
)

from conftest import noise_image
from ergo_vqa.testing_utils import ScriptedText, scripted_stage1, zoom_text
from ergo_vqa.tiny import build_model, config_kwargs
from modeling_ergo import ErgoForConditionalGeneration
from modeling_ergo.configuration_ergo import ERGO_DEFAULTS, ergo_setting
from modeling_ergo.generation_ergo import DEFAULT_MAX_NEW_TOKENS, vision_placeholder_ids
from processing_ergo.geometry_ergo import (
    budget_to_pixels,
    crop_size,
    map_box_to_original,
    resize_to_budget,
    smart_resize,
    vision_tokens,
)
from processing_ergo.prompts_ergo import SYSTEM_PROMPT, stage1_prompt, stage2_prompt

QUESTION = "Which letter is on the sign?\n(A) E\n(B) F"


def image_prefills(model):
    """Record every forward pass that feeds image tokens: (the attended input ids, how many tokens were cached)."""
    seen = []
    vision_start = model.config.vision_start_token_id

    def hook(module, args, kwargs):
        ids, cache = kwargs.get("input_ids"), kwargs.get("past_key_values")
        if ids is not None and bool((ids[0] == vision_start).any()):
            past = int(cache.get_seq_length()) if cache is not None else 0
            mask = kwargs.get("attention_mask")  # generate drops it when nothing is padded
            if isinstance(mask, dict):  # a static cache gets 4D masks per layer type
                mask = next(iter(mask.values()))
            if mask is None:
                attended = torch.ones_like(ids[0], dtype=torch.bool)
            elif mask.dim() == 2:
                attended = mask[0, -ids.shape[1]:].bool()
            else:  # 4D over the whole cache: the last query's row, where the new tokens follow the cached ones
                row = mask[0, 0, -1]
                attended = (row if row.dtype == torch.bool else row == 0)[past: past + ids.shape[1]]
            seen.append((ids[0][attended].tolist(), past))

    return seen, model.register_forward_pre_hook(hook, with_kwargs=True)


@pytest.fixture(params=["dynamic", "static", "re_prefill"])
def cache_mode(request, model):
    """Runs the test with stage 2 continuing stage 1's dynamic cache, then its static cache (asked for in
    ``model.generation_config``, as a user would), then with stage 2 re-prefilled."""
    model.config.reuse_stage1_cache = request.param != "re_prefill"
    model.generation_config.cache_implementation = "static" if request.param == "static" else None
    yield request.param
    model.config.reuse_stage1_cache = True
    model.generation_config.cache_implementation = None


@pytest.fixture
def early_exit(model):
    model.config.skip_answered_stage2 = True
    yield
    model.config.skip_answered_stage2 = False


def run(model, processor, images, texts, questions=None, **kwargs):
    inputs = processor.prepare(images, questions or [QUESTION] * len(images), **kwargs)
    out = model.generate(**inputs, max_new_tokens=6, return_dict_in_generate=True,
                         stage1_generate_kwargs=scripted_stage1(processor, texts))
    return inputs, out


def test_scripted_region_is_mapped_cropped_and_continued_in_the_same_conversation(model, processor, cache_mode):
    image = noise_image(1400, 900)
    coarse_h, coarse_w = smart_resize(900, 1400, max_pixels=budget_to_pixels(64))
    box = (10, 8, 60, 40)
    seen, handle = image_prefills(model)
    try:
        inputs, out = run(model, processor, [image], [zoom_text(box)])
    finally:
        handle.remove()
    region = map_box_to_original(box, 1400 / coarse_w, 900 / coarse_h, 1400, 900)
    size = crop_size(region, budget_to_pixels(64))
    assert out.regions == [region] and out.crop_sizes == [size] and out.fallbacks == [None]
    assert out.stage1_texts == [zoom_text(box)]
    coarse_tokens = vision_tokens(coarse_w, coarse_h)
    assert out.vision_tokens[0] == {"stage1": coarse_tokens, "stage2": vision_tokens(*size),
                                    "total": coarse_tokens + vision_tokens(*size),
                                    "full_resolution": processor.full_resolution_tokens(image)}
    # Stage 2's prompt is the reference's two-turn conversation, token for token.
    tokenizer = processor.tokenizer
    expected = (
        f"<|im_start|>system\n{SYSTEM_PROMPT}<|im_end|>\n<|im_start|>user\n<|vision_start|>"
        + "<|image_pad|>" * coarse_tokens + "<|vision_end|>" + stage1_prompt("Which letter is on the sign?")
        + "<|im_end|>\n<|im_start|>assistant\n" + zoom_text(box) + "<|im_end|>\n<|im_start|>user\n<|vision_start|>"
        + "<|image_pad|>" * vision_tokens(*size) + "<|vision_end|>" + stage2_prompt(QUESTION)
        + "<|im_end|>\n<|im_start|>assistant\n"
    )
    conversation = tokenizer(expected, add_special_tokens=False)["input_ids"]
    new_turn = tokenizer(expected[expected.index(zoom_text(box)) + len(zoom_text(box)):], add_special_tokens=False)
    prompt, stage2 = inputs["input_ids"].shape[1], seen[-1]
    if cache_mode != "re_prefill":  # only the new turn is prefilled; the cache holds the prompt and stage 1's tokens
        assert stage2[0] == new_turn["input_ids"] and stage2[1] == len(conversation) - len(new_turn["input_ids"])
        assert out.cache == cache_mode
        assert out.stage2_prefill_tokens == [len(new_turn["input_ids"]) + 1]  # + stage 1's last, masked stop token
    else:
        assert stage2 == (conversation, 0)
        assert out.stage2_prefill_tokens == [len(conversation)] and out.cache == "re-prefill"
    assert len(seen) == 2 and seen[0] == (inputs["input_ids"][0].tolist(), 0) and prompt < len(conversation)

    # The returned sequences are the caller's prompt followed by the stage-2 answer.
    assert torch.equal(out.sequences[:, : inputs["input_ids"].shape[1]], inputs["input_ids"])
    assert set(out.timings[0]) == {"stage1", "zoom", "stage2", "total"}


def test_plain_tensor_output_matches_the_dict_output(model, processor):
    image = noise_image(800, 600, 3)
    inputs, out = run(model, processor, [image], [zoom_text((5, 5, 30, 30))])
    again = model.generate(**inputs, max_new_tokens=6, stage1_generate_kwargs=scripted_stage1(processor, [zoom_text((5, 5, 30, 30))]))
    assert torch.equal(again, out.sequences)


def test_greedy_batch_equals_one_by_one(model, processor):
    images = [noise_image(1400, 900, 1), noise_image(500, 1700, 2), noise_image(640, 480, 3)]
    texts = [zoom_text((10, 8, 60, 40)), "<think>no idea</think>", zoom_text((30, 30, 10, 10))]
    questions = [QUESTION, "What is shown?", "Is it red?\n(A) yes\n(B) no"]
    inputs, batch = run(model, processor, images, texts, questions)
    prompt = inputs["input_ids"].shape[1]
    for index in range(3):
        single_inputs, single = run(model, processor, [images[index]], [texts[index]], [questions[index]])
        single_answer = single.sequences[0, single_inputs["input_ids"].shape[1]:]
        batch_answer = batch.sequences[index, prompt: prompt + len(single_answer)]
        assert torch.equal(batch_answer, single_answer)
        assert (batch.regions[index], batch.fallbacks[index], batch.crop_sizes[index]) == (
            single.regions[0], single.fallbacks[0], single.crop_sizes[0])
    assert batch.fallbacks == [None, "no_region", "degenerate_box"]


@pytest.mark.parametrize("fallback", ["resize", "coarse", "reference"])
def test_cache_reuse_answers_exactly_as_re_prefill(model, processor, fallback):
    """Greedy fp32: continuing stage 1's dynamic or static cache and re-encoding the whole conversation give the same
    tokens, for a padded batch mixing a region, no region, a degenerate box and a stage 1 cut off by max_new_tokens
    (under ``coarse``, two rows skip stage 2: a static batch keeps and ends them, a dynamic one drops them)."""
    images = [noise_image(1400, 900, 11), noise_image(500, 1700, 12), noise_image(640, 480, 13), noise_image(900, 900, 14)]
    texts = [zoom_text((10, 8, 60, 40)), "<think>no idea</think>", zoom_text((30, 30, 10, 10)),
             zoom_text((0, 0, 30, 30), thought="a much longer look at the whole scene first, then the region")]
    questions = [QUESTION, "What is shown?", "Is it red?\n(A) yes\n(B) no", "Where is the small cup standing?"]
    inputs = processor.prepare(images, questions, fallback=fallback)
    stage1 = scripted_stage1(processor, texts)
    stage1["max_new_tokens"] -= 1  # the longest text ends without a stop token
    outputs = {}
    for mode, reuse, cache in [("dynamic", True, "dynamic"), ("static", True, "static"), ("re-prefill", False, None)]:
        model.config.reuse_stage1_cache = reuse
        outputs[mode] = model.generate(**inputs, max_new_tokens=10, min_new_tokens=10, return_dict_in_generate=True,
                                       stage1_generate_kwargs=dict(stage1), cache_implementation=cache)
    model.config.reuse_stage1_cache = True
    refused = model.ergo_family.recurrent_cache  # then a batch re-encodes stage 2 and says why (test_families.py)
    assert [outputs[mode].cache.split(" (")[0] for mode in outputs] == (["re-prefill"] * 3 if refused else list(outputs))
    if refused:
        assert all(refused in outputs[mode].cache for mode in ("dynamic", "static"))
    assert torch.equal(outputs["static"].sequences, outputs["dynamic"].sequences)
    assert torch.equal(outputs["static"].sequences, outputs["re-prefill"].sequences)
    assert outputs["static"].fallbacks == [None, "no_region", "degenerate_box", None]
    stage2_rows = [index for index, size in enumerate(outputs["static"].crop_sizes) if size is not None]
    assert stage2_rows == ([0, 3] if fallback == "coarse" else [0, 1, 2, 3])
    for index in range(4):
        reused = outputs["static"].stage2_prefill_tokens[index]
        assert reused == outputs["dynamic"].stage2_prefill_tokens[index]
        if refused:
            assert reused == outputs["re-prefill"].stage2_prefill_tokens[index]
        elif index in stage2_rows:
            # re-encoding also feeds the sample's prompt and stage-1 text, which the cache already holds
            prompt = int(inputs["attention_mask"][index].sum())
            assert 0 < reused <= outputs["re-prefill"].stage2_prefill_tokens[index] - prompt + 1
        else:
            assert reused == 0 == outputs["re-prefill"].stage2_prefill_tokens[index]


def test_static_cache_compiles_one_decode_step_for_both_stages_and_later_calls(model, processor):
    """transformers compiles the decode step for a static cache. ERGO keeps one cache per batch size, so stage 2 and
    later calls of the same batch size (whatever their lengths) run that same compiled step without recompiling,
    traced as one graph (``fullgraph=True``, as ``ergo`` runs it on CUDA: a graph break would raise). The eager
    backend on CPU: dynamo traces and guards exactly as with inductor on CUDA, without generating code."""
    torch._dynamo.reset()
    counters.clear()
    compile_config = CompileConfig(backend="eager", fullgraph=True)
    compile_config._compile_all_devices = True  # transformers compiles on CUDA only unless told otherwise
    model.generation_config.compile_config, model.generation_config.cache_implementation = compile_config, "static"
    calls, expected = [], 0
    try:
        for call, texts in enumerate([[zoom_text((10, 8, 60, 40)), "<think>no</think>"],
                                      [zoom_text((1, 1, 30, 40)), zoom_text((3, 3, 50, 50), thought="a longer look")],
                                      ["<think>none</think>", zoom_text((3, 3, 50, 50))]]):
            inputs = processor.prepare([noise_image(1400, 900, call), noise_image(500, 1700, call + 10)],
                                       ["What is it?", f"Which one, call {call}?"])
            stage1 = scripted_stage1(processor, texts)
            compiled = model.__dict__.get("_compiled_call")
            if compiled is not None:  # from the second call on, count the compiled step's calls
                model._compiled_call = lambda *args, _step=compiled, **kwargs: calls.append(1) or _step(*args, **kwargs)
                expected += (stage1["max_new_tokens"] - 1) + (5 - 1)  # decode steps after each stage's prefill
            out = model.generate(**inputs, max_new_tokens=5, min_new_tokens=5, return_dict_in_generate=True,
                                 stage1_generate_kwargs=stage1)
            if compiled is not None:
                model._compiled_call = compiled
            assert out.cache == "static" and all(out.stage2_prefill_tokens)
    finally:
        model.generation_config.compile_config = model.generation_config.cache_implementation = None
        model.__dict__.pop("_compiled_call", None)
        torch._dynamo.reset()
    assert counters["stats"]["unique_graphs"] == 1  # compiled once, one graph
    assert len(calls) == expected > 0  # every decode step of both stages of calls 2 and 3 ran through it


def test_early_exit_answers_from_stage1_when_it_gives_an_answer_and_no_region(model, processor, early_exit):
    images = [noise_image(800, 600, 15), noise_image(700, 900, 16), noise_image(600, 600, 17)]
    texts = ["<think>easy</think> <answer>B</answer>", zoom_text((5, 5, 40, 40)), "<think>hmm</think> <answer></answer>"]
    seen, handle = image_prefills(model)
    try:
        inputs, out = run(model, processor, images, texts)
    finally:
        handle.remove()
    assert out.fallbacks == ["answered", None, "no_region"]
    assert out.crop_sizes[0] is None and out.vision_tokens[0]["stage2"] == 0 and out.stage2_prefill_tokens[0] == 0
    answer = processor.decode(out.sequences[0, inputs["input_ids"].shape[1]:], skip_special_tokens=True)
    assert answer == texts[0]
    assert len(seen) == 2 and all(crop is not None for crop in out.crop_sizes[1:])  # one batched stage 2 for the rest


def test_beam_search_re_prefills_and_answers_as_without_cache_reuse(model, processor):
    inputs = processor.prepare([noise_image(900, 600, 18), noise_image(600, 900, 19)], ["What is it?", "Which color?"])
    outputs = []
    for reuse in (True, False):
        model.config.reuse_stage1_cache = reuse
        outputs.append(model.generate(**inputs, max_new_tokens=6, num_beams=2))
        outputs.append(model.generate(**inputs, max_new_tokens=6, stage2_generate_kwargs={"num_beams": 2},
                                      stage1_generate_kwargs=scripted_stage1(processor, [zoom_text((5, 5, 40, 40))] * 2)))
    model.config.reuse_stage1_cache = True
    assert torch.equal(outputs[0], outputs[2]) and torch.equal(outputs[1], outputs[3])


@pytest.mark.parametrize("stage1, stage2", [
    ({"cache_implementation": "static", "num_beams": 2}, {"cache_implementation": "static"}),
    ({"cache_implementation": "static"}, {"cache_implementation": "static", "num_beams": 2}),
    ({"cache_implementation": "static"}, {"cache_implementation": "dynamic"}),
    ({"cache_implementation": "dynamic"}, {"cache_implementation": "static"}),
], ids=["static_beams_stage1", "static_beams_stage2", "static_then_dynamic", "dynamic_then_static"])
def test_caches_stage2_cannot_continue_re_prefill_and_answer_the_same(model, processor, stage1, stage2):
    inputs = processor.prepare([noise_image(900, 600, 20), noise_image(600, 900, 21)], ["What is it?", "Which color?"])
    texts = [zoom_text((5, 5, 40, 40)), "<think>no idea</think>"]
    outputs = []
    for reuse in (True, False):
        model.config.reuse_stage1_cache = reuse
        outputs.append(model.generate(**inputs, max_new_tokens=6, return_dict_in_generate=True,
                                      stage1_generate_kwargs={**scripted_stage1(processor, texts), **stage1},
                                      stage2_generate_kwargs=stage2))
    model.config.reuse_stage1_cache = True
    assert [out.cache for out in outputs] == ["re-prefill", "re-prefill"]
    assert torch.equal(outputs[0].sequences, outputs[1].sequences)


def test_an_explicit_cache_implementation_still_reuses_the_cache(model, processor):
    inputs = processor.prepare([noise_image(900, 600, 18)], ["What is it?"])
    stage1 = scripted_stage1(processor, [zoom_text((5, 5, 40, 40))])
    out = model.generate(**inputs, max_new_tokens=4, cache_implementation="dynamic", stage1_generate_kwargs=stage1,
                         return_dict_in_generate=True)
    assert out.crop_sizes[0] is not None and out.stage2_prefill_tokens[0] < inputs["input_ids"].shape[1]


def test_early_exit_is_off_by_default(model, processor):
    _, out = run(model, processor, [noise_image(800, 600, 15)], ["<think>easy</think> <answer>B</answer>"])
    assert out.fallbacks == ["no_region"] and out.crop_sizes[0] is not None


@pytest.mark.parametrize("text, reason", [("<think>hmm</think>", "no_region"),
                                          (zoom_text((40, 40, 20, 20)), "degenerate_box"),
                                          ("<zoom>[1.5, 2, 30, 40]</zoom>", "no_region")])
def test_fallback_policies(model, processor, text, reason):
    image = noise_image(1500, 1000, 4)
    _, resized = run(model, processor, [image], [text], fallback="resize")
    whole = resize_to_budget(image, budget_to_pixels(64))
    assert resized.fallbacks == [reason] and resized.regions == [None] and resized.crop_sizes == [whole.size]
    assert resized.vision_tokens[0]["stage2"] == vision_tokens(*whole.size)

    _, reference = run(model, processor, [image], [text], fallback="reference")
    assert reference.crop_sizes == [(1500, 1000)]  # the unresized original, as the reference sends it
    assert reference.vision_tokens[0]["stage2"] == processor.full_resolution_tokens(image)

    inputs, coarse = run(model, processor, [image], [text], fallback="coarse")
    assert coarse.vision_tokens[0]["stage2"] == 0 and coarse.crop_sizes == [None]
    answer = processor.batch_decode(coarse.sequences[:, inputs["input_ids"].shape[1]:], skip_special_tokens=True)
    assert answer == [text]  # no stage 2: the stage-1 text is the answer


def test_stage_overrides_apply_per_stage(model, processor):
    image = noise_image(700, 500, 5)
    inputs = processor.prepare([image], [QUESTION])
    stage1 = scripted_stage1(processor, [zoom_text((1, 1, 20, 20))])
    out = model.generate(**inputs, max_new_tokens=9, stage1_generate_kwargs=stage1,
                         stage2_generate_kwargs={"max_new_tokens": 2, "min_new_tokens": 2},
                         return_dict_in_generate=True)
    assert out.sequences.shape[1] - inputs["input_ids"].shape[1] == 2
    with pytest.raises(ValueError, match="num_return_sequences"):
        model.generate(**inputs, num_return_sequences=2, num_beams=2)


def test_inputs_without_ergo_context_get_plain_qwen_generation(model, processor, tiny_folder):
    stock = Qwen2_5_VLForConditionalGeneration.from_pretrained(tiny_folder, dtype=torch.float32).eval()
    inputs = processor(text=["<|vision_start|><|image_pad|><|vision_end|>Describe."], images=[noise_image(224, 168)],
                       return_tensors="pt")
    ours = model.generate(**inputs, max_new_tokens=8, do_sample=False)
    theirs = stock.generate(**inputs, max_new_tokens=8, do_sample=False)
    assert torch.equal(ours, theirs)


def test_right_padded_and_separately_prepared_requests_batch_like_one_by_one(model, processor):
    """What pipeline(batch_size=N) hands over: per-request contexts and the tokenizer's (right) padding."""
    images, questions = [noise_image(900, 500, 8), noise_image(400, 700, 9)], ["Why?", "What is shown here, then?"]
    parts = [processor.prepare([image], [question]) for image, question in zip(images, questions)]
    width = max(part["input_ids"].shape[1] for part in parts)
    pad = model.generation_config.pad_token_id

    def right_pad(key, fill):
        return torch.cat([torch.nn.functional.pad(part[key], (0, width - part[key].shape[1]), value=fill) for part in parts])

    batch = {
        "input_ids": right_pad("input_ids", pad), "attention_mask": right_pad("attention_mask", 0),
        "mm_token_type_ids": right_pad("mm_token_type_ids", 0),
        "pixel_values": torch.cat([part["pixel_values"] for part in parts]),
        "image_grid_thw": torch.cat([part["image_grid_thw"] for part in parts]),
        "ergo_context": [part["ergo_context"] for part in parts],
    }
    out = model.generate(**batch, max_new_tokens=5)
    assert torch.equal(out[:, :width], batch["input_ids"])
    for index, part in enumerate(parts):
        single = model.generate(**part, max_new_tokens=5)[0, part["input_ids"].shape[1]:]
        assert torch.equal(out[index, width: width + len(single)], single)


def test_a_generation_config_object_is_read_over_the_models_as_transformers_reads_it(model, processor):
    """Sizing the static cache from the caller's GenerationConfig alone would miss what model.generation_config
    fills in (here a static cache and 300-token answers) and overflow the cache."""
    inputs = processor.prepare([noise_image(900, 600, 30), noise_image(600, 900, 31)], ["What is it?", "Which?"])
    texts = [zoom_text((5, 5, 40, 40)), "<think>no idea</think>"]
    outputs = {}
    try:
        model.generation_config.update(max_new_tokens=300, min_new_tokens=300)
        for cache in ("static", "dynamic"):
            outputs[cache] = model.generate(**inputs, generation_config=GenerationConfig(cache_implementation=cache),
                                            return_dict_in_generate=True,
                                            stage1_generate_kwargs={**scripted_stage1(processor, texts), "min_new_tokens": 0})
        model.generation_config.update(max_new_tokens=None, min_new_tokens=0, cache_implementation="static")
        outputs["model"] = model.generate(**inputs, generation_config=GenerationConfig(max_new_tokens=300,
                                                                                       min_new_tokens=300),
                                          return_dict_in_generate=True,
                                          stage1_generate_kwargs={**scripted_stage1(processor, texts), "min_new_tokens": 0})
    finally:
        model.generation_config.update(max_new_tokens=None, min_new_tokens=0, cache_implementation=None)
    assert [out.cache for out in outputs.values()] == ["static", "dynamic", "static"]
    assert outputs["static"].sequences.shape[1] == inputs["input_ids"].shape[1] + 300
    assert torch.equal(outputs["static"].sequences, outputs["dynamic"].sequences)
    assert torch.equal(outputs["model"].sequences, outputs["dynamic"].sequences)


def test_idle_rows_of_a_static_batch_end_with_the_configured_end_token(model, processor):
    """Rows that skip stage 2 are ended with the generation config's end token, and a None logits_processor works."""
    inputs = processor.prepare([noise_image(900, 600, 32), noise_image(600, 900, 33)], ["What is it?", "Which?"],
                               fallback="coarse")
    texts = [zoom_text((5, 5, 40, 40)), "<think>no idea</think>"]
    out = model.generate(**inputs, max_new_tokens=6, cache_implementation="static", logits_processor=None,
                         return_dict_in_generate=True, stage1_generate_kwargs=scripted_stage1(processor, texts))
    assert out.cache == "static" and out.crop_sizes[1] is None
    answer = processor.post_process_image_text_to_text(out.sequences[1], prompt_length=inputs["input_ids"].shape[1])
    assert answer == [texts[1]]  # the stage-1 text, untouched by the idle stage-2 row


def test_a_streamer_receives_stage_1_then_the_answer_and_ends_after_the_final_token(model, processor):
    inputs = processor.prepare([noise_image(900, 600, 40)], ["What is it?"])
    text = zoom_text((5, 5, 40, 40))
    streamer = TextIteratorStreamer(processor.tokenizer, skip_prompt=True, skip_special_tokens=True, timeout=60)
    result = {}
    worker = Thread(target=lambda: result.update(out=model.generate(
        **inputs, max_new_tokens=6, min_new_tokens=6, streamer=streamer, return_dict_in_generate=True,
        stage1_generate_kwargs=scripted_stage1(processor, [text]))))
    worker.start()
    streamed = "".join(streamer)  # returns only once the stream has ended
    worker.join()
    answer = processor.post_process_image_text_to_text(result["out"].sequences, prompt_length=inputs["input_ids"].shape[1])
    assert result["out"].crop_sizes[0] is not None and answer[0]
    assert streamed == text + answer[0]


def test_scores_and_other_per_step_outputs_are_refused_before_stage_1(model, processor):
    inputs = processor.prepare([noise_image(900, 600, 41)], ["What is it?"])
    for name in ("output_scores", "output_logits", "output_attentions", "output_hidden_states"):
        with pytest.raises(ValueError, match=f"{name} is not supported"):
            model.generate(**inputs, max_new_tokens=3, return_dict_in_generate=True, **{name: True})


def test_max_length_bounds_stage_1_and_stage_2_writes_as_many_new_tokens(model, processor):
    """transformers' max_length counts the prompt, and stage 2's prompt is the whole conversation: ERGO applies it to
    stage 1 and gives stage 2 as many new tokens, instead of failing between the stages."""
    inputs = processor.prepare([noise_image(900, 600, 42), noise_image(600, 900, 43)], ["What is it?", "Which?"])
    width = inputs["input_ids"].shape[1]
    out = model.generate(**inputs, max_length=width + 5, min_new_tokens=5, return_dict_in_generate=True)
    assert out.sequences.shape[1] == width + 5 and all(size is not None for size in out.crop_sizes)
    with pytest.raises(ValueError, match="give stage 2 max_new_tokens"):
        model.generate(**inputs, max_new_tokens=3, stage2_generate_kwargs={"max_length": 900})


def test_a_stage_1_cut_off_before_its_region_is_reported_as_truncated(model, processor):
    inputs = processor.prepare([noise_image(900, 600, 44), noise_image(600, 900, 45)], ["What is it?", "Which?"])
    texts = [zoom_text((5, 5, 40, 40), thought="a long look at every part of the picture first"), "<think>no</think>"]
    stage1 = scripted_stage1(processor, texts)
    stage1["max_new_tokens"] = len(processor.tokenizer(texts[1])["input_ids"]) + 3  # row 1 ends, row 0 is cut off
    out = model.generate(**inputs, max_new_tokens=3, return_dict_in_generate=True, stage1_generate_kwargs=stage1)
    assert out.fallbacks == ["truncated", "no_region"]
    assert out.regions == [None, None] and all(size is not None for size in out.crop_sizes)  # resize fallback


def test_ergo_class_runs_both_stages_with_a_stock_qwen_config(tiny_folder, tokenizer, processor):
    """A stock ``Qwen2_5_VLConfig`` has none of ERGO's fields (transformers' own tests build the class that way):
    every one then takes its documented default, and ``generate`` runs both stages as with ``ErgoConfig``."""
    torch.manual_seed(0)
    models = [
        ErgoForConditionalGeneration(Qwen2_5_VLConfig(**config_kwargs(tokenizer))).eval(),
        ErgoForConditionalGeneration.from_pretrained(tiny_folder, config=Qwen2_5_VLConfig(**config_kwargs(tokenizer))),
    ]
    for model in models:
        assert not hasattr(model.config, "vision_attention")
        _, out = run(model, processor, [noise_image(900, 600, 46)], [zoom_text((5, 5, 40, 40))])
        assert out.fallbacks == [None] and out.cache == "dynamic" and out.crop_sizes[0] is not None
    assert {name: ergo_setting(models[0].config, name) for name in ERGO_DEFAULTS} == {
        "stage1_generation_kwargs": None, "stage2_generation_kwargs": None, "reuse_stage1_cache": True,
        "skip_answered_stage2": False, "vision_attention": "auto"}


def test_without_any_length_each_stage_gets_the_default_not_transformers_20_tokens(tokenizer, processor):
    """``model.generate(**inputs)`` on a model whose generation config sets no length (built from a config): stage 1
    may write past transformers' default 20 tokens to its region, and stage 2 gets the same default, not a limit
    derived from 20 (it was 1 token: the answer read '<think')."""
    model = build_model(tokenizer)
    assert model.generation_config.max_new_tokens is None and model.generation_config.max_length is None
    inputs = processor.prepare([noise_image(900, 600, 47)], ["What is it?"])
    stage1_text = zoom_text((5, 5, 40, 40), thought="first a long look over every part of the whole picture")
    answer = "<think> The enlarged image shows it clearly: a sign. <think> <answer>A</answer>"
    end_id = tokenizer.convert_tokens_to_ids(tokenizer.eos_token)
    forced = [LogitsProcessorList([ScriptedText([tokenizer(text)["input_ids"]], end_id)])
              for text in (stage1_text, answer)]
    assert min(len(tokenizer(text)["input_ids"]) for text in (stage1_text, answer)) > 20
    out = model.generate(**inputs, return_dict_in_generate=True, stage1_generate_kwargs={"logits_processor": forced[0]},
                         stage2_generate_kwargs={"logits_processor": forced[1]})
    assert out.stage1_texts == [stage1_text] and out.fallbacks == [None]
    assert processor.post_process_image_text_to_text(out.sequences, prompt_length=inputs["input_ids"].shape[1]) == [answer]


def test_a_stage_1_cut_by_the_configured_length_is_truncated_and_stage_2_keeps_its_limit(model, processor,
                                                                                          monkeypatch):
    """A folder's ``max_new_tokens`` (its generation_config.json) bounds each stage; a stage 1 cut there is
    reported as ``truncated``, and a call's ``max_length`` still wins over the folder's ``max_new_tokens``."""
    monkeypatch.setattr(model.generation_config, "max_new_tokens", 12)
    inputs = processor.prepare([noise_image(900, 600, 48)], ["What is it?"])
    texts = [zoom_text((5, 5, 40, 40), thought="a long look at every part of the picture first")]
    stage1 = {"logits_processor": scripted_stage1(processor, texts)["logits_processor"]}
    out = model.generate(**inputs, min_new_tokens=12, return_dict_in_generate=True, stage1_generate_kwargs=stage1)
    assert out.fallbacks == ["truncated"] and out.sequences.shape[1] == inputs["input_ids"].shape[1] + 12
    width = inputs["input_ids"].shape[1]
    out = model.generate(**inputs, max_length=width + 4, min_new_tokens=4, return_dict_in_generate=True,
                         stage1_generate_kwargs={"logits_processor": scripted_stage1(processor, texts)["logits_processor"]})
    assert out.fallbacks == ["truncated"] and out.sequences.shape[1] == width + 4
    with pytest.raises(ValueError, match=f"max_length={width} leaves stage 1 no new tokens"):
        model.generate(**inputs, max_length=width)


def test_hub_folders_carry_the_default_length_in_their_generation_config(tiny_folder):
    """Where the default lives for every tool that reads a folder (pipeline, transformers serve, generate)."""
    demo = Path(__file__).resolve().parents[1] / "ergo_vqa" / "demo_model"
    for folder in (tiny_folder, demo):
        assert GenerationConfig.from_pretrained(folder).max_new_tokens == DEFAULT_MAX_NEW_TOKENS


def test_a_collated_batch_with_a_row_that_is_not_an_ergo_request_is_refused_naming_it(model, processor):
    """Issue 24 item 8: a collator lists each request's ``ergo_context``; a row without one is named, not merged."""
    inputs = processor.prepare([noise_image(300, 200, 70), noise_image(200, 300, 71)], [QUESTION] * 2)
    context = inputs.pop("ergo_context")
    with pytest.raises(ValueError, match=r"rows \[1\] of this batch are not ERGO requests .* while \[0\] are"):
        model.generate(**inputs, ergo_context=[context, None], max_new_tokens=2)


class PreferTokens(LogitsProcessor):
    """Raises the given tokens' scores far above the rest (a model that keeps wanting to write them)."""

    def __init__(self, token_ids: list[int]):
        self.token_ids = token_ids

    def __call__(self, input_ids: torch.LongTensor, scores: torch.FloatTensor) -> torch.FloatTensor:
        scores[:, self.token_ids] += 1e4
        return scores


def test_a_model_drawn_to_vision_placeholders_never_writes_one_and_stage_2_runs(model, processor):
    """A stage-1 reply holding ``<|image_pad|>`` would enter stage 2's conversation as an image without pixels
    ("Image features and image tokens do not match"): both stages never sample a vision placeholder."""
    placeholders = sorted(vision_placeholder_ids(processor.tokenizer))
    inputs = processor.prepare([noise_image(900, 600, 46), noise_image(600, 900, 47)], ["What is it?", "Which?"])
    out = model.generate(**inputs, max_new_tokens=4, return_dict_in_generate=True,
                         logits_processor=LogitsProcessorList([PreferTokens(placeholders)]))
    answers = out.sequences[:, inputs["input_ids"].shape[1]:]
    assert len(placeholders) == 5 and not any(token in placeholders for token in answers.flatten().tolist())
    assert all(size is not None for size in out.crop_sizes)
