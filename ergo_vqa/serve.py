"""``ergo serve``: ``transformers serve`` for one ERGO folder, with both stages running inside the server.

``transformers serve --trust-remote-code <ERGO folder>`` loads the folder (its ``auto_map`` names the ERGO class for
``AutoModelForMultimodalLM``, which the server loads with) but then refuses every request: transformers 5.23 decides
a served model's modality by looking its class name up in its built-in tables of model classes, where no
``trust_remote_code`` class appears (``ValueError: Unknown modality for: ErgoForConditionalGeneration``). This
command is ``transformers serve`` with ERGO's class name added to the image-text-to-text table of its own process,
and with two of its classes replaced, in this process only, by the subclasses below:

- ``ErgoModelManager`` serves the one folder given and loads no other, unless ``--allow-other-models``
  (``--trust-remote-code`` runs a folder's code, and transformers' ``/load_model`` ignores its own pin); its
  ``/v1/models`` lists that folder, also on a machine without a Hub cache folder (a 500 in transformers 5.23).
- ``ErgoChatCompletionHandler`` refuses ``n`` other than 1 (transformers ignores it and returns one choice),
  samples when a request asks for a temperature above 0 (transformers keeps a greedy folder greedy), and answers an
  image it cannot read with HTTP 400 naming the image (a bare 500 in transformers).

A chat request with one user message holding one image and the question then goes through
``ErgoProcessor.apply_chat_template`` and ``ErgoForConditionalGeneration.generate``: both stages in the server, the
reply being stage 2's answer. Any other conversation (a system turn, several images, earlier turns) is served as
plain Qwen2.5-VL, which is how ``ErgoClient`` drives the stages from the client side.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from typing import ClassVar

from fastapi import HTTPException
from fastapi.responses import Response
from huggingface_hub.errors import CacheNotFound
from transformers.cli.serving.chat_completion import ChatCompletionHandler
from transformers import GenerationConfig
from transformers.cli.serving.model_manager import ModelManager

from modeling_ergo import FAMILIES
from modeling_ergo.modeling_ergo import MODEL_CLASSES
from processing_ergo.images_ergo import ErgoImageError, load_image
from processing_ergo.processing_ergo import RESPONSE_TEMPLATE

ALLOW_OTHER_MODELS = "--allow-other-models"
"""``ergo serve``'s own flag: requests may name other folders or Hub ids, loaded on demand (their code runs)."""
USAGE = (f"usage: ergo serve [OPTIONS] FOLDER [{ALLOW_OTHER_MODELS}]\n\n"
         "Serves the ERGO folder (or Hub id) FOLDER with transformers serve (--trust-remote-code added) on an "
         "OpenAI-compatible API, both stages inside the server. Requests must name FOLDER as their model; "
         f"{ALLOW_OTHER_MODELS} lets them name other folders or Hub ids, which are then loaded and their code run.\n"
         "OPTIONS are transformers serve's, in any order around FOLDER; its help follows (its FORCE_MODEL is "
         "FOLDER):\n")


@dataclass(frozen=True)
class ServeOptions:
    folder: str
    """The folder or Hub id served."""
    other_models: bool
    """Whether requests may name other models (``--allow-other-models``)."""
    arguments: list[str]
    """``transformers serve``'s arguments, the folder among them."""


def parse_arguments(arguments: list[str]) -> ServeOptions:
    """``ergo serve``'s arguments, parsed as ``transformers serve`` parses them (options before or after the
    folder); ValueError with one line for what it would refuse, or when no folder is given."""
    import click
    from transformers.cli.transformers import app

    other_models = ALLOW_OTHER_MODELS in arguments
    rest = ["--help" if argument == "-h" else argument for argument in arguments if argument != ALLOW_OTHER_MODELS]
    if "--help" in rest:
        print(USAGE)
    command = app.get_command(click.Context(app), "serve")
    try:
        folder = command.make_context("ergo serve", list(rest)).params["force_model"]
    except click.exceptions.Exit as done:  # --help, printed
        raise SystemExit(done.exit_code) from None
    except click.ClickException as error:
        raise ValueError(error.format_message()) from None
    if folder is None:
        raise ValueError(f"ergo serve needs the folder (or Hub id) to serve: ergo serve [OPTIONS] FOLDER; "
                         f"add {ALLOW_OTHER_MODELS} to let requests load other models too")
    return ServeOptions(folder, other_models, rest)


def run(options: ServeOptions) -> int:
    """Runs ``transformers serve`` (``--trust-remote-code`` added) with ERGO's additions until it is stopped."""
    from transformers.cli.serving import chat_completion, model_manager
    from transformers.cli.transformers import app

    allow_ergo_in_transformers_serve()
    ErgoModelManager.other_models = options.other_models
    model_manager.ModelManager = ErgoModelManager  # transformers serve imports both when it starts
    chat_completion.ChatCompletionHandler = ErgoChatCompletionHandler
    arguments = options.arguments if "--trust-remote-code" in options.arguments else [
        *options.arguments, "--trust-remote-code"]
    app(args=["serve", *arguments], prog_name="ergo serve", standalone_mode=False)
    return 0


def allow_ergo_in_transformers_serve() -> None:
    """Lists ERGO's model class of every family among transformers' image-text-to-text classes in this process,
    where ``transformers serve`` looks up the modality of the model it serves."""
    from transformers.models.auto.modeling_auto import MODEL_FOR_IMAGE_TEXT_TO_TEXT_MAPPING_NAMES

    for model_type, model_class in MODEL_CLASSES.items():
        MODEL_FOR_IMAGE_TEXT_TO_TEXT_MAPPING_NAMES.setdefault(f"ergo_{model_type}", model_class.__name__)
    use_ergo_response_template()


def use_ergo_response_template() -> None:
    """Makes ``transformers serve`` in this process return an ERGO reply whole as the message's content (ERGO's
    ``RESPONSE_TEMPLATE``). It parses replies by the tokenizer's ``response_template``, else by its table of
    templates per ``model_type``, whose Qwen2.5-VL and Qwen3-VL entry would split ``<think>…</think>`` off as
    reasoning; ERGO's tokenizer carries none (pipelines would then keep special tokens), so ERGO's goes first in that
    table, for every family."""
    from transformers.cli.serving import utils

    templates = utils._RESPONSE_TEMPLATE_FALLBACKS
    ordered = {tuple(FAMILIES): RESPONSE_TEMPLATE, **templates}
    templates.clear()
    templates.update(ordered)


class ErgoModelManager(ModelManager):
    """``transformers serve``'s model manager, serving ``force_model`` (the folder given) for the server's lifetime.

    Every model name a request gives passes through ``process_model_name`` before anything loads (chat, responses,
    completions, ``/load_model``, transcriptions): any but the served folder is refused with HTTP 403 unless
    ``other_models``, in which case it loads on demand and unloads after ``--model-timeout`` idle seconds.
    """

    other_models: ClassVar[bool] = False

    def __init__(self, *, force_model: str, model_timeout: int = 300, **settings) -> None:
        self.served, self.started = force_model, int(time.time())
        if not self.other_models:
            super().__init__(force_model=force_model, model_timeout=model_timeout, **settings)
            return
        super().__init__(model_timeout=-1, **settings)  # not pinned: the served folder loaded now, never unloaded
        self.load_model_and_processor(self.process_model_name(force_model))
        self.model_timeout = model_timeout

    def process_model_name(self, model_id: str) -> str:
        """``model_id@revision``, or HTTP 403 for a model other than the served one (without ``other_models``)."""
        name = ModelManager.process_model_name(model_id)
        if not self.other_models and name != ModelManager.process_model_name(self.served):
            raise HTTPException(status_code=403, detail=(
                f"this server serves {self.served} only, not {model_id}: start ergo serve with "
                f"{ALLOW_OTHER_MODELS} to let requests load other models (and run their code)"))
        return name

    def get_gen_models(self, cache_dir: str | None = None) -> list[dict]:
        """``/v1/models``: the served folder; with ``other_models`` also the generative models of the Hub cache
        (none without a cache folder, where transformers 5.23 fails)."""
        served = [{"id": self.served, "object": "model", "owned_by": "", "created": self.started}]
        if not self.other_models:
            return served
        try:
            cached = ModelManager.get_gen_models(cache_dir)
        except CacheNotFound:
            cached = []
        return served + [model for model in cached if model["id"] != self.served]


class ErgoChatCompletionHandler(ChatCompletionHandler):
    """``/v1/chat/completions`` of ``transformers serve``, refusing clearly what it would silently ignore or fail
    on with a bare HTTP 500."""

    async def handle_request(self, body: dict, request_id: str) -> Response:
        """Refuses ``n`` other than 1 (HTTP 400); an image that cannot be read is an HTTP 400 naming it."""
        n = body.get("n")
        if n is not None and n != 1:
            raise HTTPException(status_code=400, detail=(
                f"n={n}: ergo serve returns one choice per request (transformers serve has no n); send {n} "
                f"requests instead, with a temperature above 0 for different replies"))
        try:
            return await super().handle_request(body, request_id)
        except HTTPException:
            raise
        except Exception as error:
            problem = unreadable_image(body.get("messages"))
            if problem is None:
                raise
            raise HTTPException(status_code=400, detail=problem) from error

    def _build_generation_config(self, body: dict, model_generation_config: GenerationConfig,
                                 use_cb: bool = False) -> GenerationConfig:
        """transformers serve's, except that a temperature above 0 samples, even where the folder's generation
        config is greedy (``do_sample`` false), where transformers 5.23 keeps it greedy."""
        config = super()._build_generation_config(body, model_generation_config, use_cb=use_cb)
        if body.get("temperature") is not None and float(body["temperature"]) > 0:
            config.do_sample = True
        return config


def unreadable_image(messages: object) -> str | None:
    """Why the first image of OpenAI chat ``messages`` that cannot be read is unusable, naming where it is
    (``messages[i].content[j].image_url: ...``); None when every image reads."""
    for i, message in enumerate(messages if isinstance(messages, list) else []):
        content = message.get("content") if isinstance(message, dict) else None
        for j, block in enumerate(content if isinstance(content, list) else []):
            if not isinstance(block, dict) or block.get("type") != "image_url":
                continue
            url = block.get("image_url")
            url = url.get("url") if isinstance(url, dict) else url
            try:
                load_image(url, name=f"messages[{i}].content[{j}].image_url")
            except ErgoImageError as error:
                return str(error)
    return None
