"""``python -m hub_card SOURCE OUT``: turn a local Qwen2.5-VL, Qwen3-VL, Qwen3.5 or ERGO checkpoint into an ERGO Hub
folder, with a model card that reports ``ergo eval`` results when ``--results`` summaries are given."""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from huggingface_hub.utils import validate_repo_id

from modeling_ergo.family_ergo import GROUNDING_CONVENTIONS
from processing_ergo import FALLBACK_POLICIES
from processing_ergo.geometry_ergo import INFERENCE_BUDGET
from processing_ergo.prompts_ergo import STAGE2_TEMPLATES

from .results import check_summary
from .folder import convert_checkpoint, push_folder


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m hub_card", description=__doc__)
    parser.add_argument("source", help="local Qwen2.5-VL, Qwen3-VL, Qwen3.5 or ERGO checkpoint folder (safetensors)")
    parser.add_argument("out", help="folder to write (new or empty, unless --overwrite)")
    parser.add_argument("--coarse-budget", type=int,
                        help=f"stage-1 vision tokens (default: the source's; {INFERENCE_BUDGET} from a stock folder)")
    parser.add_argument("--crop-budget", type=int,
                        help="crop vision tokens (default: the source's; from a stock folder, the coarse budget)")
    parser.add_argument("--stage2-template", choices=sorted(STAGE2_TEMPLATES),
                        help="default: the source's; 'reference' from a stock folder")
    parser.add_argument("--fallback", choices=FALLBACK_POLICIES,
                        help="default: the source's; 'resize' from a stock folder")
    parser.add_argument("--grounding", choices=GROUNDING_CONVENTIONS,
                        help="how stage 1 writes its box (default: the source's; from a stock folder, the family's: "
                             "absolute pixels for Qwen2.5-VL, relative 0-1000 for Qwen3-VL and Qwen3.5)")
    parser.add_argument("--overwrite", action="store_true",
                        help="convert into a non-empty folder: its weight files are removed first, so that it holds "
                             "only this conversion's")
    parser.add_argument("--results", nargs="+", default=[], metavar="SUMMARY.json",
                        help="ergo eval summaries (<out>/<benchmark>-summary.json) to report in a new model card")
    parser.add_argument("--push-to-hub", metavar="REPO", help="also upload the folder to this Hub repository")
    parser.add_argument("--private", action="store_true", help="create the Hub repository as private")
    args = parser.parse_args(argv)
    settings = {key: value for key, value in (("coarse_budget", args.coarse_budget), ("crop_budget", args.crop_budget),
                                              ("stage2_template", args.stage2_template),
                                              ("fallback", args.fallback), ("grounding", args.grounding))
                if value is not None}
    try:
        if args.push_to_hub:
            validate_repo_id(args.push_to_hub)
        results = [summary for path in args.results for summary in _summaries(path)]
        conversion = convert_checkpoint(args.source, args.out, overwrite=args.overwrite, results=results, **settings)
    except (ValueError, OSError) as error:  # all raised before anything is written
        print(f"hub_card: error: {error}", file=sys.stderr)
        return 2
    for note in conversion.notes:
        print(note)
    print(f"wrote {conversion.folder}")
    if args.push_to_hub:
        print(f"pushed to {push_folder(conversion.folder, args.push_to_hub, private=args.private)}")
    return 0


def _summaries(path: str) -> list[dict]:
    """The ``ergo eval`` summaries in one ``--results`` file, checked, so a wrong file stops the command before it
    writes anything."""
    try:
        data = json.loads(Path(path).read_text())
    except FileNotFoundError:
        raise FileNotFoundError(f"--results {path}: no such file") from None
    except ValueError as error:  # not JSON, or not UTF-8
        raise ValueError(f"--results {path} is not JSON ({error})") from None
    summaries = data if isinstance(data, list) else [data]
    for summary in summaries:
        check_summary(summary, f"--results {path}")
    return summaries


if __name__ == "__main__":
    sys.exit(main())
