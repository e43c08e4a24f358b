#!/usr/bin/env python
"""Check a layered dataset (sample folders or WebDataset shards) and report every bad sample.

Exit status: 0 when every sample is good, 1 when a bad sample was found (or no sample at all), 2 for bad arguments.

Examples (from the repository root):
    python scripts/validate_dataset.py data/shapes-train
    python scripts/validate_dataset.py data/shapes-shards/shard-000000.tar data/shapes-shards/shard-000001.tar
"""
from __future__ import annotations

import sys
from pathlib import Path

# the repository root, for comfy_headless, layerdiff_toy and scripts (the one sys.path line; README "Code map")
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import argparse  # noqa: E402
import json  # noqa: E402
from comfy_headless.product import product_names  # noqa: E402

validate_dataset = product_names("layerdiff_model.data.validation", "validate_dataset")
LayerDiffError = product_names("layerdiff_model.errors", "LayerDiffError")


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        description="Validate a layered dataset: missing or unreadable files, layer size mismatches, non-binary "
                    "or empty masks, prompt count vs layer files, empty prompts, bad sample.json. Prints the "
                    "number of good samples per foreground count and every bad sample with its reasons.",
        epilog="Exit status: 0 all good, 1 bad samples found or no samples, 2 bad arguments.",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    parser.add_argument("paths", nargs="+", type=Path,
                        help="a dataset folder (one sub-folder per sample), one sample folder, a .tar shard, or a "
                             "folder of .tar shards; several may be given")
    parser.add_argument("--max-listed", type=int, default=50, help="list at most this many bad samples per path")
    parser.add_argument("--json", type=Path, default=None,
                        help="also write the full report (every bad sample) as JSON to this file")
    args = parser.parse_args(argv)
    for path in args.paths:
        if not path.exists():
            parser.error(f"path {path} does not exist")
    return args


def main(args: argparse.Namespace) -> int:
    reports = []
    for path in args.paths:
        try:
            report = validate_dataset(path)
        except LayerDiffError as e:
            print(f"Dataset {path}: {e}")
            return 1
        reports.append(report)
        print(report.format(args.max_listed))
    if args.json is not None:
        args.json.write_text(json.dumps([r.to_dict() for r in reports], indent=1))
    return 0 if all(r.ok for r in reports) else 1


if __name__ == "__main__":
    sys.exit(main(parse_args()))
