"""``python -m hub_card SOURCE OUT``: turn a local Qwen2.5-VL or ERGO checkpoint into an ERGO Hub folder, with a
model card that reports ``ergo eval`` results when ``--results`` summaries are given."""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from processing_ergo import FALLBACK_POLICIES, ErgoProcessor
from processing_ergo.geometry_ergo import INFERENCE_BUDGET
from processing_ergo.prompts_ergo import STAGE2_TEMPLATES

from .folder import convert_checkpoint, push_folder, write_card


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m hub_card", description=__doc__)
    parser.add_argument("source", help="local Qwen2.5-VL or ERGO checkpoint folder (safetensors)")
    parser.add_argument("out", help="folder to write")
    parser.add_argument("--coarse-budget", type=int, default=INFERENCE_BUDGET,
                        help=f"stage-1 vision tokens (default {INFERENCE_BUDGET})")
    parser.add_argument("--crop-budget", type=int, default=None, help="crop vision tokens (default: coarse budget)")
    parser.add_argument("--stage2-template", choices=sorted(STAGE2_TEMPLATES), default="reference")
    parser.add_argument("--fallback", choices=FALLBACK_POLICIES, default="resize")
    parser.add_argument("--results", nargs="+", default=[], metavar="SUMMARY.json",
                        help="ergo eval summaries (<out>/<benchmark>-summary.json) to report in the model card")
    parser.add_argument("--push-to-hub", metavar="REPO", help="also upload the folder to this Hub repository")
    parser.add_argument("--private", action="store_true", help="create the Hub repository as private")
    args = parser.parse_args(argv)
    try:
        folder = convert_checkpoint(args.source, args.out, coarse_budget=args.coarse_budget,
                                    crop_budget=args.crop_budget, stage2_template=args.stage2_template,
                                    fallback=args.fallback)
    except (ValueError, FileNotFoundError) as error:
        print(f"hub_card: error: {error}", file=sys.stderr)
        return 2
    if args.results:
        results = [summary for path in args.results for summary in _summaries(path)]
        write_card(folder, args.source, ErgoProcessor.from_pretrained(folder), results)
    print(f"wrote {folder}")
    if args.push_to_hub:
        print(f"pushed to {push_folder(folder, args.push_to_hub, private=args.private)}")
    return 0


def _summaries(path: str) -> list[dict]:
    data = json.loads(Path(path).read_text())
    return data if isinstance(data, list) else [data]


if __name__ == "__main__":
    sys.exit(main())
