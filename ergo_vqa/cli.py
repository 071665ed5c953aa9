"""``ergo``: the command line. ``ergo infer`` answers one question; ``ergo demo`` runs the offline demo;
``ergo eval`` scores a model on V*, HR-Bench, MME-RealWorld-lite or the synthetic task; ``ergo eval-download``
fetches the published benchmarks."""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from PIL import Image

from hub_card.results import BENCHMARKS
from processing_ergo.geometry_ergo import PAPER_BUDGET, budget_to_pixels
from processing_ergo.images_ergo import ErgoImageError, load_image
from processing_ergo.processing_ergo import FALLBACK_POLICIES
from processing_ergo.prompts_ergo import stage_questions

from .eval_data import SYNTHETIC_DATASETS
from .evaluation import MODES
from .inference import CACHE_CHOICES, check_device
from .synthetic_task import VARIANTS

ENGINES = ("transformers", "vllm")


def _budget(text: str) -> int:
    try:
        value = int(text)
        budget_to_pixels(value)
    except ValueError:
        raise argparse.ArgumentTypeError(f"budget must be an integer number of vision tokens >= 4, got {text!r}")
    return value


def _positive(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        value = 0
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be a positive integer, got {text!r}")
    return value


def _json_object(text: str) -> dict:
    try:
        value = json.loads(text)
    except json.JSONDecodeError as error:
        raise argparse.ArgumentTypeError(f"not JSON: {error}") from None
    if not isinstance(value, dict):
        raise argparse.ArgumentTypeError(f"must be a JSON object, got {text!r}")
    return value


def _picture_path(path: str) -> None:
    """``--viz`` is checked before the model loads and runs, so a typo does not cost the run."""
    target = Path(path)
    if not target.parent.is_dir():
        raise FileNotFoundError(f"--viz {path}: folder {target.parent} not found")
    Image.init()
    if Image.registered_extensions().get(target.suffix.lower()) not in Image.SAVE:
        raise ValueError(f"--viz {path}: Pillow cannot write {target.suffix or 'files without a suffix'}; "
                         f"use .png or .jpg")


def _load(args: argparse.Namespace):
    """``inference.load``; weights that cannot be read (a truncated download) become one clear OSError."""
    from safetensors import SafetensorError

    from .inference import load

    try:
        return load(args.model, device=args.device, cache=args.cache)
    except SafetensorError as error:
        raise OSError(f"cannot read the weights of {args.model} ({error}): a truncated or corrupt file? "
                      f"download it again") from None


def _infer(args: argparse.Namespace) -> int:
    from .inference import answer, draw_region, summary

    _check_target(args)  # everything the user typed is checked before a model loads or a request goes out
    stage_questions(args.question)
    image = load_image(args.image, name=args.image)
    if args.viz:
        _picture_path(args.viz)
    if args.endpoint:
        budgets = {"coarse_budget": args.budget, "crop_budget": args.budget} if args.budget else {}
        result = _client(args).answer(image, args.question, **budgets)
    else:
        model, processor = _load(args)
        result = answer(model, processor, image, args.question, budget=args.budget,
                        max_new_tokens=args.max_new_tokens)
    print(result.to_json() if args.json else summary(result))
    if result.error:
        return 1
    if args.viz:
        draw_region(image, result.region, args.viz)
        if not args.json:
            print(f"picture:       {args.viz}")
    return 0


def _check_model(model: str, message: str | None = None) -> None:
    """``model`` is a local folder or looks like a Hub id (org/name); else FileNotFoundError with ``message``."""
    if not Path(model).exists() and model.count("/") != 1:
        raise FileNotFoundError(message or f"model not found: {model} (a local folder or a Hub id like org/name)")


def _check_target(args: argparse.Namespace) -> None:
    """A local model (``--model``, ``--device``, ``--cache``, ``--batch-size``) or a served one (``--endpoint``,
    ``--served-model``, ``--timeout``, ``--concurrency``), never flags of one with the other."""
    served = {"--served-model": args.served_model, "--timeout": args.timeout,
              "--concurrency": getattr(args, "concurrency", None)}
    local = {"--device": args.device != "auto", "--cache": args.cache != "auto",
             "--batch-size": getattr(args, "batch_size", None)}
    if getattr(args, "engine_args", None) is not None and args.engine != "vllm":
        raise ValueError("--engine-args: only with --engine vllm")
    if getattr(args, "engine", "transformers") == "vllm":
        if args.endpoint:
            raise ValueError("--engine vllm runs the model in this process: not with --endpoint")
        if any(local.values()):
            raise ValueError(f"{', '.join(flag for flag, value in local.items() if value)}: for transformers' "
                             f"generate() only, not with --engine vllm (vLLM batches each stage itself)")
    if args.endpoint:
        if not args.served_model:
            raise ValueError("--endpoint needs --served-model, the name the server serves the model under")
        if any(local.values()):
            raise ValueError(f"{', '.join(flag for flag, value in local.items() if value)}: for a local model only, "
                             f"not with --endpoint (--concurrency sets the requests in flight)")
        source = args.model or args.served_model
        _check_model(source, f"no processor settings at {source}: with --endpoint, --model names the folder or Hub "
                             f"id the served model was made from (default: --served-model)")
        return
    if any(value is not None for value in served.values()):
        raise ValueError(f"{', '.join(flag for flag, value in served.items() if value is not None)}: only with --endpoint")
    if not args.model:
        raise ValueError(f"{args.command} needs --model, or --endpoint and --served-model")
    _check_model(args.model)
    check_device(args.device)


def _client(args: argparse.Namespace):
    """``ErgoClient`` for ``--endpoint``: the processor (settings only, no weights) from ``--model``, else from the
    served model's name."""
    from .client import ErgoClient

    given = {"concurrency": getattr(args, "concurrency", None), "timeout": args.timeout}
    return ErgoClient(args.endpoint, args.served_model, args.model or args.served_model,
                      max_tokens=args.max_new_tokens, **{key: value for key, value in given.items() if value is not None})


def _vllm(args: argparse.Namespace):
    """``ErgoVLLM`` for ``--engine vllm``: the model runs on an in-process vLLM, one batch per stage."""
    try:
        from .vllm_runner import ErgoVLLM

        return ErgoVLLM(args.model, max_tokens=args.max_new_tokens, engine_args=args.engine_args)
    except ImportError as error:
        raise ValueError(f"--engine vllm needs vLLM in this environment ({error}): `pip install vllm` on a GPU "
                         f"machine; on x86-64 CPUs with AVX-512, `make vllm-env` builds .venv-vllm") from None


def _demo(args: argparse.Namespace) -> int:
    from .demo import run

    print(run(args.out, budget=args.budget, seed=args.seed, variant=args.variant))
    return 0


def _eval(args: argparse.Namespace) -> int:
    from hub_card.results import results_table

    from .eval_data import load_benchmark
    from .evaluation import comparable, evaluate, run_settings
    from .plot import plot

    _check_target(args)
    samples = load_benchmark(args.dataset, args.data_root, limit=args.limit, split=args.split)
    if args.endpoint:
        model = _client(args)
        processor = model.processor
    elif args.engine == "vllm":
        model = _vllm(args)
        processor = model.processor
    else:
        model, processor = _load(args)
    out = Path(args.out)
    failed = 0
    for mode in args.mode:
        summary = evaluate(model, processor, samples, mode, out, args.dataset, budget=args.budget,
                           batch_size=args.batch_size or 1, max_new_tokens=args.max_new_tokens,
                           fallback=args.fallback, mask_target=args.mask_target)
        failed += summary["failed"] + summary["missing"]
    # The combined table and plot cover every mode and budget evaluated into this folder so far with this run's
    # other settings (model, weights, generation, fallback, template): never rows made under different ones.
    settings = run_settings(model, processor, args.dataset, "ergo", args.budget, args.max_new_tokens, args.fallback,
                            args.mask_target)
    found = sorted(out.glob(f"{args.dataset}-*.summary.json"))
    summaries = comparable([json.loads(path.read_text()) for path in found], settings)
    table = results_table(summaries)
    (out / f"{args.dataset}-summary.md").write_text(table)
    (out / f"{args.dataset}-summary.json").write_text(json.dumps(summaries, indent=2) + "\n")
    plot(summaries, out / f"{args.dataset}-accuracy-vs-tokens.png")
    print(table)
    print("settings: " + ", ".join(f"{key} {value}" for key, value in settings.items()
                                   if key not in ("mode", "budget")))
    print(f"records, summaries and plot in {out}")
    if failed:
        print(f"ergo: {failed} sample(s) failed (listed under 'failures' in the summaries); "
              f"a rerun with the same settings retries them", file=sys.stderr)
        return 1
    return 0


def _serve(args: argparse.Namespace) -> int:
    from transformers.utils.import_utils import is_serve_available

    if not is_serve_available():
        raise OSError('ergo serve needs the serving extra: pip install "ergo-vqa[serve]"')
    from .serve import parse_arguments, run

    options = parse_arguments(args.arguments)
    _check_model(options.folder)
    return run(options)


def _eval_download(args: argparse.Namespace) -> int:
    from .eval_data import download

    print(download(args.dataset, args.data_root))
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="ergo", description="ERGO two-stage high-resolution VQA on Qwen2.5-VL, Qwen3-VL and Qwen3.5")
    commands = parser.add_subparsers(dest="command", required=True)

    infer = commands.add_parser("infer", help="answer one question about one image")
    infer.add_argument("--model", help="ERGO folder or stock Qwen2.5-VL, Qwen3-VL or Qwen3.5 one, or Hub id (with "
                                       "--endpoint: where the processor settings come from; default --served-model)")
    infer.add_argument("--image", required=True, help="image file")
    infer.add_argument("--question", required=True, help="question; answer options may follow on their own lines")
    infer.add_argument("--budget", type=_budget, default=None, help="vision tokens for the coarse view and the crop")
    infer.add_argument("--max-new-tokens", type=_positive, default=1024,
                       help="per stage (default 1024, as the reference)")
    infer.add_argument("--device", default="auto", help="auto, cpu, cuda, cuda:1, ...")
    infer.add_argument("--cache", choices=CACHE_CHOICES, default="auto",
                       help="KV cache; auto: static (compiled decode) on CUDA, dynamic elsewhere")
    infer.add_argument("--viz", metavar="OUT.png", help="write the image with the region drawn")
    infer.add_argument("--json", action="store_true", help="print the result as JSON")
    _endpoint_arguments(infer)
    infer.set_defaults(run=_infer)

    demo = commands.add_parser("demo", help="offline demo: the shipped synthetic-task model on a generated image")
    demo.add_argument("--out", default="ergo-demo", help="folder for the pictures (default ergo-demo)")
    demo.add_argument("--budget", type=_budget, default=None, help="vision tokens (default: the model's, 144)")
    demo.add_argument("--seed", type=int, default=0)
    demo.add_argument("--variant", choices=VARIANTS, default="original",
                      help="original: the digit on the one saturated shape; context: the digit on a tag found "
                           "through its relation to a landmark")
    demo.set_defaults(run=_demo)

    evaluation = commands.add_parser("eval", help="accuracy, vision tokens and latency on a benchmark")
    evaluation.add_argument("--model", help="ERGO folder or stock Qwen2.5-VL, Qwen3-VL or Qwen3.5 one, or Hub id "
                                            "(with --endpoint: where the processor settings come from; default "
                                            "--served-model)")
    evaluation.add_argument("--dataset", required=True, choices=[*BENCHMARKS, *SYNTHETIC_DATASETS])
    evaluation.add_argument("--data-root", required=True,
                            help="folder holding the downloaded benchmark (synthetic: the folder of split files)")
    evaluation.add_argument("--split", default="test", help="synthetic only: which split file (default test)")
    evaluation.add_argument("--mask-target", action="store_true",
                            help="the masking test: the target's gt_bbox painted out of the coarse view only (stage 2 "
                                 "still crops the original); modes ergo and coarse, local models, synthetic datasets")
    evaluation.add_argument("--mode", nargs="+", choices=MODES, default=["ergo"],
                            help="ergo (two stages), full (16384-token single pass), coarse (coarse view only)")
    evaluation.add_argument("--budget", type=_budget, default=PAPER_BUDGET,
                            help=f"coarse and crop budget (default {PAPER_BUDGET}, the paper's headline)")
    evaluation.add_argument("--limit", type=_positive, default=None, help="first K samples only")
    evaluation.add_argument("--batch-size", type=_positive, default=None, help="samples per generate (default 1)")
    evaluation.add_argument("--fallback", choices=FALLBACK_POLICIES, default="reference",
                            help="ERGO mode without a usable region (default: the reference's, the whole original)")
    evaluation.add_argument("--max-new-tokens", type=_positive, default=1024, help="per stage (default 1024)")
    evaluation.add_argument("--device", default="auto", help="auto, cpu, cuda, cuda:1, ...")
    evaluation.add_argument("--cache", choices=CACHE_CHOICES, default="auto",
                            help="KV cache; auto: static (compiled decode) on CUDA, dynamic elsewhere")
    evaluation.add_argument("--out", required=True, help="folder for per-sample records, summaries and the plot")
    evaluation.add_argument("--engine", choices=ENGINES, default="transformers",
                            help="runs --model with transformers' generate() (default) or on an in-process vLLM, "
                                 "one batch per stage (needs vLLM installed)")
    evaluation.add_argument("--engine-args", type=_json_object, default=None, metavar="JSON",
                            help='with --engine vllm: vllm.LLM arguments, e.g. \'{"dtype": "float32", '
                                 '"enforce_eager": true, "max_model_len": 4096}\'')
    _endpoint_arguments(evaluation)
    evaluation.add_argument("--concurrency", type=_positive, default=None,
                            help="with --endpoint: requests in flight (default 16, as the published evaluation)")
    evaluation.set_defaults(run=_eval)

    # Everything after `serve` goes to transformers serve's own parser (options before or after the folder, which
    # argparse cannot tell apart without knowing which options take values); `ergo serve --help` prints it.
    serve = commands.add_parser(
        "serve", help="transformers serve for one ERGO folder, both stages inside the server (needs the serve extra)",
        prefix_chars="+", add_help=False)
    serve.add_argument("arguments", nargs=argparse.REMAINDER, help="[OPTIONS] FOLDER [--allow-other-models]")
    serve.set_defaults(run=_serve)

    fetch = commands.add_parser("eval-download", help="download a benchmark from the Hub (needs network)")
    fetch.add_argument("dataset", choices=list(BENCHMARKS))
    fetch.add_argument("--data-root", required=True)
    fetch.set_defaults(run=_eval_download)
    return parser


def _endpoint_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--endpoint", metavar="URL",
                        help="an OpenAI-compatible server (vLLM, SGLang, ergo serve), e.g. http://localhost:8000/v1: "
                             "the two stages run against it instead of a local model")
    parser.add_argument("--served-model", metavar="NAME", help="with --endpoint: the model name the server serves")
    parser.add_argument("--timeout", type=_positive, default=None,
                        help="with --endpoint: seconds per request attempt (default 120; 3 retries with backoff)")


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return args.run(args)
    except (ErgoImageError, ValueError, FileNotFoundError, OSError) as error:
        print(f"ergo: error: {error}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
