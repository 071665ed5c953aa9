"""Small models of each ERGO family (Qwen2.5-VL, Qwen3-VL, Qwen3.5) built offline: tokenizer, processor and
random-weight model.

No hub access is needed: the byte-level BPE tokenizer is trained on ERGO's own prompt text, the chat template is the
family's, and the model is built from a config. Used by the embedded demo, the tests and the benchmarks; the folders
it writes load through the same ``from_pretrained`` paths as a Hub checkpoint. Every builder takes a ``family``
(``modeling_ergo.family_ergo``), Qwen2.5-VL by default.
"""

from __future__ import annotations

import json
from dataclasses import dataclass

import torch
from tokenizers import AddedToken, Regex, Tokenizer, decoders, normalizers, pre_tokenizers, trainers
from tokenizers.models import BPE
from transformers import PreTrainedModel, Qwen2Tokenizer, Qwen2VLImageProcessorPil

from modeling_ergo.configuration_ergo import CONFIG_CLASSES
from modeling_ergo.family_ergo import QWEN2_5_VL, QWEN3_5, QWEN3_VL, Family
from modeling_ergo.modeling_ergo import MODEL_CLASSES
from processing_ergo import ErgoProcessor
from processing_ergo.prompts_ergo import STAGE1_TEMPLATE, STAGE2_TEMPLATES, SYSTEM_PROMPT

QWEN2_5_VL_CHAT_TEMPLATE = (
    "{% set image_count = namespace(value=0) %}{% set video_count = namespace(value=0) %}{% for message in messages %}"
    "{% if loop.first and message['role'] != 'system' %}<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n"
    "{% endif %}<|im_start|>{{ message['role'] }}\n{% if message['content'] is string %}{{ message['content'] }}"
    "<|im_end|>\n{% else %}{% for content in message['content'] %}{% if content['type'] == 'image' or 'image' in "
    "content or 'image_url' in content %}{% set image_count.value = image_count.value + 1 %}{% if add_vision_id %}"
    "Picture {{ image_count.value }}: {% endif %}<|vision_start|><|image_pad|><|vision_end|>{% elif content['type'] "
    "== 'video' or 'video' in content %}{% set video_count.value = video_count.value + 1 %}{% if add_vision_id %}"
    "Video {{ video_count.value }}: {% endif %}<|vision_start|><|video_pad|><|vision_end|>{% elif 'text' in content "
    "%}{{ content['text'] }}{% endif %}{% endfor %}<|im_end|>\n{% endif %}{% endfor %}{% if add_generation_prompt %}"
    "<|im_start|>assistant\n{% endif %}"
)
"""Qwen2.5-VL-Instruct's chat template, verbatim."""

QWEN3_VL_CHAT_TEMPLATE = (
    "{%- if messages[0].role == 'system' %}{{- '<|im_start|>system\n' }}{%- if messages[0].content is string %}"
    "{{- messages[0].content }}{%- else %}{%- for content in messages[0].content %}{%- if 'text' in content %}"
    "{{- content.text }}{%- endif %}{%- endfor %}{%- endif %}{{- '<|im_end|>\n' }}{%- endif %}"
    "{%- set image_count = namespace(value=0) %}{%- set video_count = namespace(value=0) %}"
    "{%- for message in messages %}{%- if message.role == 'user' %}{{- '<|im_start|>' + message.role + '\n' }}"
    "{%- if message.content is string %}{{- message.content }}{%- else %}{%- for content in message.content %}"
    "{%- if content.type == 'image' or 'image' in content or 'image_url' in content %}"
    "{%- set image_count.value = image_count.value + 1 %}{%- if add_vision_id %}Picture {{ image_count.value }}: "
    "{% endif -%}<|vision_start|><|image_pad|><|vision_end|>{%- elif content.type == 'video' or 'video' in content %}"
    "{%- set video_count.value = video_count.value + 1 %}{%- if add_vision_id %}Video {{ video_count.value }}: "
    "{% endif -%}<|vision_start|><|video_pad|><|vision_end|>{%- elif 'text' in content %}{{- content.text }}"
    "{%- endif %}{%- endfor %}{%- endif %}{{- '<|im_end|>\n' }}{%- elif message.role == 'assistant' %}"
    "{{- '<|im_start|>' + message.role + '\n' }}{%- if message.content is string %}{{- message.content }}"
    "{%- else %}{%- for content_item in message.content %}{%- if 'text' in content_item %}"
    "{{- content_item.text }}{%- endif %}{%- endfor %}{%- endif %}{{- '<|im_end|>\n' }}{%- endif %}{%- endfor %}"
    "{%- if add_generation_prompt %}{{- '<|im_start|>assistant\n' }}{%- endif %}"
)
"""Qwen3-VL-Instruct's chat template without its tool-calling branches (ERGO sends no tools): no default system
prompt, otherwise Qwen2.5-VL's layout."""

QWEN3_5_CHAT_TEMPLATE = (
    "{%- set image_count = namespace(value=0) %}{%- set video_count = namespace(value=0) %}"
    "{%- macro render_content(content, do_vision_count, is_system_content=false) %}{%- if content is string %}"
    "{{- content }}{%- elif content is iterable and content is not mapping %}{%- for item in content %}"
    "{%- if 'image' in item or 'image_url' in item or item.type == 'image' %}{%- if is_system_content %}"
    "{{- raise_exception('System message cannot contain images.') }}{%- endif %}{%- if do_vision_count %}"
    "{%- set image_count.value = image_count.value + 1 %}{%- endif %}{%- if add_vision_id %}"
    "{{- 'Picture ' ~ image_count.value ~ ': ' }}{%- endif %}{{- '<|vision_start|><|image_pad|><|vision_end|>' }}"
    "{%- elif 'video' in item or item.type == 'video' %}{%- if is_system_content %}"
    "{{- raise_exception('System message cannot contain videos.') }}{%- endif %}{%- if do_vision_count %}"
    "{%- set video_count.value = video_count.value + 1 %}{%- endif %}{%- if add_vision_id %}"
    "{{- 'Video ' ~ video_count.value ~ ': ' }}{%- endif %}{{- '<|vision_start|><|video_pad|><|vision_end|>' }}"
    "{%- elif 'text' in item %}{{- item.text }}{%- else %}{{- raise_exception('Unexpected item type in content.') }}"
    "{%- endif %}{%- endfor %}{%- elif content is none or content is undefined %}{{- '' }}{%- else %}"
    "{{- raise_exception('Unexpected content type.') }}{%- endif %}{%- endmacro %}"
    "{%- if not messages %}{{- raise_exception('No messages provided.') }}{%- endif %}"
    "{%- if messages[0].role == 'system' %}{%- set content = render_content(messages[0].content, false, true)|trim %}"
    "{{- '<|im_start|>system\n' + content + '<|im_end|>\n' }}{%- endif %}"
    "{%- set ns = namespace(multi_step_tool=true, last_query_index=messages|length - 1) %}"
    "{%- for message in messages[::-1] %}{%- set index = (messages|length - 1) - loop.index0 %}"
    "{%- if ns.multi_step_tool and message.role == 'user' %}{%- set content = render_content(message.content, false)|trim %}"
    "{%- if not(content.startswith('<tool_response>') and content.endswith('</tool_response>')) %}"
    "{%- set ns.multi_step_tool = false %}{%- set ns.last_query_index = index %}{%- endif %}{%- endif %}{%- endfor %}"
    "{%- if ns.multi_step_tool %}{{- raise_exception('No user query found in messages.') }}{%- endif %}"
    "{%- for message in messages %}{%- set content = render_content(message.content, true)|trim %}"
    "{%- if message.role == 'system' %}{%- if not loop.first %}"
    "{{- raise_exception('System message must be at the beginning.') }}{%- endif %}"
    "{%- elif message.role == 'user' %}{{- '<|im_start|>' + message.role + '\n' + content + '<|im_end|>' + '\n' }}"
    "{%- elif message.role == 'assistant' %}{%- set reasoning_content = '' %}"
    "{%- if message.reasoning_content is string %}{%- set reasoning_content = message.reasoning_content %}{%- else %}"
    "{%- if '</think>' in content %}"
    "{%- set reasoning_content = content.split('</think>')[0].rstrip('\n').split('<think>')[-1].lstrip('\n') %}"
    "{%- set content = content.split('</think>')[-1].lstrip('\n') %}{%- endif %}{%- endif %}"
    "{%- set reasoning_content = reasoning_content|trim %}{%- if loop.index0 > ns.last_query_index %}"
    "{{- '<|im_start|>' + message.role + '\n<think>\n' + reasoning_content + '\n</think>\n\n' + content }}"
    "{%- else %}{{- '<|im_start|>' + message.role + '\n' + content }}{%- endif %}{{- '<|im_end|>\n' }}"
    "{%- else %}{{- raise_exception('Unexpected message role.') }}{%- endif %}{%- endfor %}"
    "{%- if add_generation_prompt %}{{- '<|im_start|>assistant\n' }}"
    "{%- if enable_thinking is defined and enable_thinking is true %}{{- '<think>\n' }}{%- else %}"
    "{{- '<think>\n\n</think>\n\n' }}{%- endif %}{%- endif %}"
)
"""Qwen3.5-2B's chat template (thinking off unless ``enable_thinking=True``) without its tool-calling branches: the
generation prompt opens an empty ``<think>`` block, and earlier assistant turns are rendered without their
reasoning (ERGO's stage 2 continues stage 1's own tokens instead; see ``docs/families.md``)."""

CHAT_TEMPLATES = {QWEN2_5_VL.model_type: QWEN2_5_VL_CHAT_TEMPLATE, QWEN3_VL.model_type: QWEN3_VL_CHAT_TEMPLATE,
                  QWEN3_5.model_type: QWEN3_5_CHAT_TEMPLATE}

SPECIAL_TOKENS = [
    "<|endoftext|>", "<|im_start|>", "<|im_end|>", "<|object_ref_start|>", "<|object_ref_end|>", "<|box_start|>",
    "<|box_end|>", "<|quad_start|>", "<|quad_end|>", "<|vision_start|>", "<|vision_end|>", "<|vision_pad|>",
    "<|image_pad|>", "<|video_pad|>",
]
_PRETOKENIZE = (
    r"""(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"""
)
_CORPUS = [
    SYSTEM_PROMPT, STAGE1_TEMPLATE, *STAGE2_TEMPLATES.values(),
    "<think> The target is small. </think> <zoom>[120, 48, 360, 212]</zoom>",
    "<think> I can read it now. </think> <answer>A</answer> <answer>(B)</answer>",
    "What is the color of the woman's bag?\n(A) red\n(B) black\n(C) white\n(D) blue",
    "Answer with the option's letter from the given choices directly. 0123456789",
]


def build_tokenizer(vocab_size: int = 400, family: Family = QWEN2_5_VL) -> Qwen2Tokenizer:
    """A small byte-level BPE with Qwen2's pre-tokenizer and special tokens, and the family's chat template;
    deterministic."""
    bpe = Tokenizer(BPE(unk_token=None, continuing_subword_prefix="", end_of_word_suffix="", fuse_unk=False))
    bpe.normalizer = normalizers.NFC()
    bpe.pre_tokenizer = pre_tokenizers.Sequence([
        pre_tokenizers.Split(Regex(_PRETOKENIZE), behavior="isolated", invert=False),
        pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False),
    ])
    bpe.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size, min_frequency=2, show_progress=False,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
    )
    bpe.train_from_iterator(_CORPUS * 4, trainer=trainer)
    model = json.loads(bpe.to_str())["model"]
    vocab = dict(model["vocab"])
    merges = [tuple(merge) if isinstance(merge, list) else tuple(merge.split(" ")) for merge in model["merges"]]
    for token in SPECIAL_TOKENS:
        vocab[token] = len(vocab)
    tokenizer = Qwen2Tokenizer(
        vocab=vocab, merges=merges, unk_token=None, bos_token=None, eos_token="<|im_end|>",
        pad_token="<|endoftext|>", errors="replace", model_max_length=32768,
        extra_special_tokens={
            "image_token": "<|image_pad|>", "video_token": "<|video_pad|>",
            "vision_bos_token": "<|vision_start|>", "vision_eos_token": "<|vision_end|>",
        },
    )
    tokenizer.add_special_tokens({"additional_special_tokens": [AddedToken(t, special=True) for t in SPECIAL_TOKENS]})
    tokenizer.chat_template = CHAT_TEMPLATES[family.model_type]
    return tokenizer


def build_processor(tokenizer: Qwen2Tokenizer | None = None, family: Family = QWEN2_5_VL,
                    **settings) -> ErgoProcessor:
    """``ErgoProcessor`` over the offline tokenizer (``tokenizer``, built for ``family`` when None) and the family's
    stock image-processor settings."""
    tokenizer = tokenizer or build_tokenizer(family=family)
    if family is QWEN2_5_VL:
        image_processor = Qwen2VLImageProcessorPil(min_pixels=56 * 56, max_pixels=28 * 28 * 16384)
    else:  # Qwen3-VL's and Qwen3.5's preprocessor_config.json
        image_processor = Qwen2VLImageProcessorPil(
            patch_size=family.patch_size, merge_size=family.merge_size, temporal_patch_size=2,
            image_mean=[0.5, 0.5, 0.5], image_std=[0.5, 0.5, 0.5],
            size={"shortest_edge": 65536, "longest_edge": 16777216})
    return ErgoProcessor(image_processor, tokenizer, chat_template=CHAT_TEMPLATES[family.model_type], **settings)


@dataclass(frozen=True)
class ModelShape:
    """Sizes of a model of any family (Qwen3.5 spends half its layers, at least one, on linear attention); ``TINY``
    tests the plumbing in milliseconds."""

    hidden_size: int = 64
    intermediate_size: int = 128
    layers: int = 2
    heads: int = 4
    kv_heads: int = 2
    vision_depth: int = 2
    vision_hidden: int = 32
    vision_intermediate: int = 64
    vision_heads: int = 2
    full_attention_blocks: tuple[int, ...] | None = None
    """Vision blocks with full (not windowed) attention; None: the last one."""
    vocab_size: int | None = None
    """Embedding rows; None: the tokenizer's size. Real shapes keep the real vocabulary so the LM head costs what
    it does in the real model, even though the offline tokenizer only uses its first few hundred ids."""
    initializer_range: float = 0.2
    """Init std. Qwen's 0.02 leaves a tiny random model's next token nearly independent of the context; at 0.2 it
    depends on every position, image and cached key, so equality tests can actually fail. Trained shapes use 0.02."""

    def mrope_section(self, rotary_fraction: float = 1.0) -> list[int]:
        """M-RoPE split of the rotated half head over (temporal, height, width), in Qwen2.5-VL's 2:3:3 proportions
        (``rotary_fraction``: the share of each head that is rotated; Qwen3.5 rotates part of it)."""
        half = int(self.hidden_size // self.heads * rotary_fraction) // 2
        temporal = half // 4
        height = (half - temporal) // 2
        return [temporal, height, half - temporal - height]


TINY = ModelShape()
DEMO = ModelShape(hidden_size=128, intermediate_size=384, layers=4, heads=4, kv_heads=2, vision_depth=4,
                  vision_hidden=96, vision_intermediate=192, vision_heads=3, initializer_range=0.02)
"""The synthetic demo model (``training.synthetic_recipe``): 1.6M parameters, trains on 2 CPU cores. Its last vision
block attends over the whole image, as Qwen2.5-VL's full-attention blocks do: with windowed attention only, the
digit stayed on the few tokens of its window, where the language model's attention never learned to find it
(``training.vision_warmup``); the whole-image block costs a 1344x1344 pass 0.24 s more on this CPU (0.42 s)."""
DEMO_VOCAB_SIZE = 1000
"""BPE merges for the demo model's tokenizer: ERGO's prompts in about 40% fewer tokens than the tests' 400."""


def config_kwargs(tokenizer: Qwen2Tokenizer, shape: ModelShape = TINY, family: Family = QWEN2_5_VL) -> dict:
    """The family's config arguments for ``shape`` whose special-token ids match ``tokenizer``."""
    ids = {token: tokenizer.convert_tokens_to_ids(token) for token in SPECIAL_TOKENS}
    special = dict(bos_token_id=ids["<|endoftext|>"], eos_token_id=ids["<|im_end|>"], pad_token_id=ids["<|endoftext|>"])
    text_config = dict(
        vocab_size=shape.vocab_size or len(tokenizer), hidden_size=shape.hidden_size, intermediate_size=shape.intermediate_size,
        num_hidden_layers=shape.layers, num_attention_heads=shape.heads, num_key_value_heads=shape.kv_heads,
        max_position_embeddings=32768, initializer_range=shape.initializer_range, **special,
    )
    vision_config = dict(
        depth=shape.vision_depth, hidden_size=shape.vision_hidden, intermediate_size=shape.vision_intermediate,
        num_heads=shape.vision_heads, out_hidden_size=shape.hidden_size, patch_size=family.patch_size,
        spatial_merge_size=family.merge_size, temporal_patch_size=2, initializer_range=shape.initializer_range,
    )
    if family is QWEN2_5_VL:
        text_config.update(max_window_layers=shape.layers, rope_parameters={
            "rope_type": "default", "rope_theta": 1e6, "mrope_section": shape.mrope_section()})
        vision_config.update(window_size=112, fullatt_block_indexes=list(
            shape.full_attention_blocks if shape.full_attention_blocks is not None else [shape.vision_depth - 1]))
    else:  # Qwen3-VL and Qwen3.5: interleaved M-RoPE, learned vision positions (a 16x16 grid, interpolated)
        rotary = 1.0 if family is QWEN3_VL else 0.5
        text_config.update(head_dim=shape.hidden_size // shape.heads, rope_parameters={
            "rope_type": "default", "rope_theta": 5e6, "mrope_section": shape.mrope_section(rotary),
            "mrope_interleaved": True, **({"partial_rotary_factor": rotary} if family is QWEN3_5 else {})})
        vision_config.update(num_position_embeddings=256)
    if family is QWEN3_VL:
        vision_config.update(deepstack_visual_indexes=[0])  # DeepStack features from the first vision block
    if family is QWEN3_5:
        linear = max(1, shape.layers // 2)
        text_config.update(
            layer_types=["linear_attention"] * linear + ["full_attention"] * (shape.layers - linear),
            linear_num_key_heads=shape.kv_heads, linear_num_value_heads=shape.heads,
            linear_key_head_dim=shape.hidden_size // shape.heads, linear_value_head_dim=shape.hidden_size // shape.heads)
    return dict(
        text_config=text_config, vision_config=vision_config, image_token_id=ids["<|image_pad|>"],
        video_token_id=ids["<|video_pad|>"], vision_start_token_id=ids["<|vision_start|>"],
        vision_end_token_id=ids["<|vision_end|>"], **special,
    )


def build_model(
    tokenizer: Qwen2Tokenizer,
    shape: ModelShape = TINY,
    seed: int = 0,
    device: str | torch.device = "cpu",
    dtype: torch.dtype = torch.float32,
    family: Family = QWEN2_5_VL,
) -> PreTrainedModel:
    """A random-weight ERGO model of ``family`` whose special-token ids match ``tokenizer``; greedy by default.

    The weights are created on ``device`` in ``dtype`` (a 7B shape never has to fit in host memory in fp32).
    """
    torch.manual_seed(seed)
    kwargs = config_kwargs(tokenizer, shape, family)
    config = CONFIG_CLASSES[family.model_type](**kwargs)
    with torch.device(device):
        model = MODEL_CLASSES[family.model_type]._from_config(config, dtype=dtype).eval()
    model.generation_config.eos_token_id = kwargs["eos_token_id"]
    model.generation_config.pad_token_id = kwargs["pad_token_id"]
    model.generation_config.do_sample = False
    return model
