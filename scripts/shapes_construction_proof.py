#!/usr/bin/env python
"""Dataset construction checked against known layers: the pipeline on flat shapes pictures (docs/DATASET.md).

Writes the composites of shapes samples (the held-out "test" pairs) as PNG files with their global prompts as
captions, runs ``build_dataset.py pictures`` on them with the stand-in detector/segmenter (``toy-colours``),
OpenCV inpainting and the occlusion depth heuristic, reads the shards back with the ``webdataset`` library and
scores the recovered layers against the true ones (mask IoU, depth order, background PSNR).

    python scripts/shapes_construction_proof.py --count 200 --run-dir runs/construction_proof
"""
from __future__ import annotations

import argparse
import json
import shutil
import sys
from pathlib import Path

# the repository root, for comfy_headless, layerdiff_toy and scripts (the one sys.path line; README "Code map")
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import numpy as np  # noqa: E402
from PIL import Image  # noqa: E402

from scripts import build_dataset  # noqa: E402


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--run-dir", required=True, help="work folder (pictures/, shards/, score.json); replaced")
    p.add_argument("--count", type=int, default=200)
    p.add_argument("--size", type=int, default=128)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--split", default="test", choices=("train", "val", "test"))
    p.add_argument("--images-per-unit", type=int, default=100)
    return p.parse_args(argv)


def write_pictures(samples, folder: Path) -> None:
    folder.mkdir(parents=True, exist_ok=True)
    for sample in samples:
        pixels = (sample.composed().permute(1, 2, 0).numpy() * 255).round().astype(np.uint8)
        Image.fromarray(pixels).save(folder / f"{sample.key}.png")
        (folder / f"{sample.key}.txt").write_text(sample.global_prompt, "utf-8")


def read_back_with_webdataset(shards: list[Path]):
    """The samples of the shards as the ``webdataset`` library reads them (not our reader)."""
    import webdataset as wds
    from comfy_headless.product import product_names

    decode_files = product_names("layerdiff_model.data.sample_files", "decode_files")
    samples = []
    for record in wds.WebDataset([str(p) for p in shards], shardshuffle=False):
        files = {k: v for k, v in record.items() if not k.startswith("__")}
        sample, problems = decode_files(files, key=record["__key__"])
        if problems:
            raise RuntimeError(f"webdataset read back a bad sample {record['__key__']}: {problems}")
        samples.append(sample)
    return samples


def run(args: argparse.Namespace) -> dict:
    from layerdiff_toy import shapes
    from layerdiff_toy.shapes_construction import score_construction

    run_dir = Path(args.run_dir)
    shutil.rmtree(run_dir, ignore_errors=True)
    truth = list(shapes.generate_samples(args.seed, args.count, shapes.config_for_split(args.split, size=args.size)))
    write_pictures(truth, run_dir / "pictures")
    out = run_dir / "shards"
    build_dataset.main(["pictures", str(run_dir / "pictures"), "--out", str(out), "--detector", "toy-colours",
                        "--max-side", "0", "--images-per-unit", str(args.images_per_unit), "--no-progress",
                        "--device", "cpu"])
    recovered = read_back_with_webdataset(sorted(out.glob("*.tar")))
    score = score_construction(truth, recovered).to_json()
    score["report"] = json.loads((out / "report.json").read_text())
    (run_dir / "score.json").write_text(json.dumps(score, indent=1))
    return score


def main(argv=None) -> int:
    score = run(parse_args(argv))
    print(json.dumps({k: v for k, v in score.items() if k != "report"}, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
