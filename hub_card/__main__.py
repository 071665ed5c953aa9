"""``python -m hub_card SOURCE OUT``: turn a local Qwen2.5-VL or ERGO checkpoint into an ERGO Hub folder."""

from __future__ import annotations

import argparse
import sys

from processing_ergo import FALLBACK_POLICIES
from processing_ergo.prompts_ergo import STAGE2_TEMPLATES

from .folder import convert_checkpoint, push_folder


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m hub_card", description=__doc__)
    parser.add_argument("source", help="local Qwen2.5-VL or ERGO checkpoint folder (safetensors)")
    parser.add_argument("out", help="folder to write")
    parser.add_argument("--coarse-budget", type=int, default=1280, help="stage-1 vision tokens (default 1280)")
    parser.add_argument("--crop-budget", type=int, default=None, help="crop vision tokens (default: coarse budget)")
    parser.add_argument("--stage2-template", choices=sorted(STAGE2_TEMPLATES), default="reference")
    parser.add_argument("--fallback", choices=FALLBACK_POLICIES, default="resize")
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
    print(f"wrote {folder}")
    if args.push_to_hub:
        print(f"pushed to {push_folder(folder, args.push_to_hub, private=args.private)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
