#!/usr/bin/env python
"""Generate the procedural "shapes" layered dataset (docs/DESIGN.md 2.7) as sample folders or WebDataset shards.

Examples (from the repository root):
    python scripts/make_shapes_dataset.py --out data/shapes-train --count 20000 --split train
    python scripts/make_shapes_dataset.py --out data/shapes-val --count 500 --split val --seed 1
    python scripts/make_shapes_dataset.py --out data/shapes-test --count 500 --split test --seed 1
    python scripts/make_shapes_dataset.py --out data/shapes-shards --count 100000 --format shards
"""
from __future__ import annotations

import sys
from pathlib import Path

# the repository root, for comfy_headless, layerdiff_toy and scripts (the one sys.path line; README "Code map")
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import argparse  # noqa: E402
import json  # noqa: E402
import logging  # noqa: E402
import time  # noqa: E402
from comfy_headless.product import product_names  # noqa: E402

write_shards = product_names("layerdiff_model.data.shards", "write_shards")
write_sample = product_names("layerdiff_model.data.sample_files", "write_sample")
LayerDiffError = product_names("layerdiff_model.errors", "LayerDiffError")
from layerdiff_toy.shapes import GENERATOR, config_for_split, generate_samples  # noqa: E402

logger = logging.getLogger("make_shapes_dataset")
INFO_FILE = "shapes_dataset.json"


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        description="Generate the procedural 'shapes' layered dataset: coloured circles, squares, triangles and "
                    "rings (1..N foreground layers, depth-ordered, with full masks) on plain, striped, checkered "
                    "or dotted backgrounds, with global, background and per-layer prompts. Deterministic: the "
                    "same arguments always give the same files.",
        epilog="The train and test splits use disjoint (colour, shape) pairs (fixed by --split-seed), so a model "
               "trained on --split train is evaluated on unseen prompt combinations with --split test.",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    parser.add_argument("--out", required=True, type=Path,
                        help="output folder: one sub-folder per sample (--format folder) or .tar shards "
                             "(--format shards); created if missing")
    parser.add_argument("--count", type=int, default=1000, help="number of samples to generate")
    parser.add_argument("--start", type=int, default=0,
                        help="index of the first sample (generate a large set in disjoint parts with --start)")
    parser.add_argument("--size", type=int, default=64, help="image side in pixels (a multiple of 8, at least 32)")
    parser.add_argument("--min-foregrounds", type=int, default=1, help="fewest foreground layers per sample")
    parser.add_argument("--max-foregrounds", type=int, default=3, help="most foreground layers per sample")
    parser.add_argument("--seed", type=int, default=0, help="random seed; sample i depends only on seed, split, i")
    parser.add_argument("--format", choices=("folder", "shards"), default="folder",
                        help="'folder': <out>/<index>/sample.json + PNGs; 'shards': WebDataset .tar shards")
    parser.add_argument("--split", choices=("train", "val", "test", "all"), default="train",
                        help="which (colour, shape) pairs the foregrounds use: seen (train), held out (test, and "
                             "val: the same held-out pairs from a separate random stream, for tuning), or every "
                             "pair (all)")
    parser.add_argument("--split-seed", type=int, default=0,
                        help="seed of the train/test split of (colour, shape) pairs; keep it equal for the train "
                             "and test sets of one experiment")
    parser.add_argument("--samples-per-shard", type=int, default=1000, help="samples per .tar (--format shards)")
    parser.add_argument("--with-composite", action="store_true",
                        help="also store composite.png (the flattened image) with every sample, for viewing")
    parser.add_argument("--overwrite", action="store_true",
                        help="allow writing into a non-empty --out, replacing samples or shards of the same name")
    args = parser.parse_args(argv)
    if args.count < 1:
        parser.error(f"--count must be at least 1, got {args.count}")
    if args.start < 0:
        parser.error(f"--start must be >= 0, got {args.start}")
    if args.size < 32 or args.size % 8:
        parser.error(f"--size must be a multiple of 8 and at least 32, got {args.size}")
    if not 1 <= args.min_foregrounds <= args.max_foregrounds:
        parser.error(f"need 1 <= --min-foregrounds ({args.min_foregrounds}) <= --max-foregrounds "
                     f"({args.max_foregrounds})")
    if args.samples_per_shard < 1:
        parser.error(f"--samples-per-shard must be at least 1, got {args.samples_per_shard}")
    if args.out.exists() and any(args.out.iterdir()) and not args.overwrite:
        parser.error(f"--out {args.out} is not empty: choose a new folder or pass --overwrite")
    return args


def main(args: argparse.Namespace) -> int:
    config = config_for_split(args.split, args.size, args.min_foregrounds, args.max_foregrounds, args.split_seed)
    config.check()
    args.out.mkdir(parents=True, exist_ok=True)
    samples = generate_samples(args.seed, args.count, config, start=args.start)
    began = time.time()
    if args.format == "folder":
        for i, sample in enumerate(samples, 1):
            write_sample(args.out / sample.key, sample, overwrite=args.overwrite, with_composite=args.with_composite)
            if i % 1000 == 0:
                logger.info("%d / %d samples written", i, args.count)
        written = f"{args.count} sample folders"
    else:
        prefix = f"shapes-{args.split}-{args.seed}-{args.start}"
        shards = write_shards(samples, args.out, args.samples_per_shard, prefix=prefix,
                              with_composite=args.with_composite)
        written = f"{len(shards)} shards ({args.count} samples)"
    info = {"generator": GENERATOR, "seed": args.seed, "start": args.start, "count": args.count,
            "size": args.size, "min_foregrounds": args.min_foregrounds, "max_foregrounds": args.max_foregrounds,
            "split": args.split, "split_seed": args.split_seed, "format": args.format,
            "combinations": [list(c) for c in config.combos]}
    (args.out / INFO_FILE).write_text(json.dumps(info, indent=1))
    logger.info("Wrote %s to %s in %.1f s", written, args.out, time.time() - began)
    return 0


if __name__ == "__main__":
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    try:
        sys.exit(main(parse_args()))
    except LayerDiffError as e:
        logger.error("%s", e)
        sys.exit(1)
