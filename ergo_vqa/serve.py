"""``ergo serve``: ``transformers serve`` for an ERGO folder, with both stages running inside the server.

``transformers serve --trust-remote-code <ERGO folder>`` loads the folder (its ``auto_map`` names the ERGO class for
``AutoModelForMultimodalLM``, which the server loads with) but then refuses every request: transformers 5.23 decides
a served model's modality by looking its class name up in its built-in tables of model classes, where no
``trust_remote_code`` class appears (``ValueError: Unknown modality for: ErgoForConditionalGeneration``). This
command is ``transformers serve`` with ERGO's class name added to the image-text-to-text table of its own process,
and nothing else changed. A chat request with one user message holding one image and the question then goes
through ``ErgoProcessor.apply_chat_template`` and ``ErgoForConditionalGeneration.generate``: both stages in the
server, the reply being stage 2's answer. Any other conversation (a system turn, several images, earlier turns)
is served as plain Qwen2.5-VL, which is how ``ErgoClient`` drives the stages from the client side.
"""

from __future__ import annotations

from modeling_ergo import ErgoForConditionalGeneration
from processing_ergo.processing_ergo import RESPONSE_TEMPLATE


def allow_ergo_in_transformers_serve() -> None:
    """Lists ERGO's model class among transformers' image-text-to-text classes in this process, where
    ``transformers serve`` looks up the modality of the model it serves."""
    from transformers.models.auto.modeling_auto import MODEL_FOR_IMAGE_TEXT_TO_TEXT_MAPPING_NAMES

    MODEL_FOR_IMAGE_TEXT_TO_TEXT_MAPPING_NAMES.setdefault("ergo", ErgoForConditionalGeneration.__name__)
    use_ergo_response_template()


def use_ergo_response_template() -> None:
    """Makes ``transformers serve`` in this process return an ERGO reply whole as the message's content (ERGO's
    ``RESPONSE_TEMPLATE``). It parses replies by the tokenizer's ``response_template``, else by its table of
    templates per ``model_type``, whose Qwen2.5-VL entry would split ``<think>…</think>`` off as reasoning; ERGO's
    tokenizer carries none (pipelines would then keep special tokens), so ERGO's goes first in that table."""
    from transformers.cli.serving import utils

    templates = utils._RESPONSE_TEMPLATE_FALLBACKS
    ordered = {("qwen2_5_vl",): RESPONSE_TEMPLATE, **templates}
    templates.clear()
    templates.update(ordered)


def main(arguments: list[str]) -> int:
    """Runs ``transformers serve <arguments>`` (``--trust-remote-code`` added) until it is stopped."""
    from transformers.cli.transformers import app
    from transformers.utils.import_utils import is_serve_available

    if not is_serve_available():
        raise OSError('ergo serve needs the serving extra: pip install "ergo-vqa[serve]"')
    allow_ergo_in_transformers_serve()
    if "--trust-remote-code" not in arguments:
        arguments = [*arguments, "--trust-remote-code"]
    app(args=["serve", *arguments], prog_name="ergo serve", standalone_mode=False)
    return 0
