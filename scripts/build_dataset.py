#!/usr/bin/env python
"""Build LayerDiff training data: pictures, layered files or cut-outs -> WebDataset shards (docs/DATASET.md).

    python scripts/build_dataset.py pictures data/photos --out data/layers \
        --captioner Salesforce/instructblip-vicuna-7b --detector google/owlv2-base-patch16-ensemble \
        --segmenter facebook/sam-vit-base --depth LiheYoung/depth-anything-small-hf \
        --inpaint-checkpoint ComfyUI/models/checkpoints/sd-v1-5-inpainting.safetensors \
        --clip openai/clip-vit-large-patch14
    torchrun --nproc_per_node 8 scripts/build_dataset.py pictures laion-shards/ --out data/layers ...  # 8 GPUs
    sbatch --array=0-63 --wrap "python scripts/build_dataset.py pictures laion-shards/ --out data/layers ..."
    python scripts/build_dataset.py layered-files my-psds/ --out data/my-layers
    python scripts/build_dataset.py cutouts --cutouts cutouts/ --backgrounds backgrounds/ --count 5000 --out data/c
    python scripts/build_dataset.py report data/layers

Every process builds its share of the work units (input shards, or runs of --images-per-unit files): one output
shard per unit, written atomically with a done marker, so a killed run resumes where it stopped. The output
folder's report.json counts the samples and every reject reason; each run prints seconds and pictures/s per
stage. Boots ComfyUI headless (for SD inpainting through ComfyUI's model code, and the one copy of the package).
"""
from __future__ import annotations

import argparse
import logging
import os
import sys
from pathlib import Path

# the repository root, for comfy_headless, layerdiff_toy and scripts (the one sys.path line; README "Code map")
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from comfy_headless.boot import boot  # noqa: E402
from comfy_headless.product import product_module  # noqa: E402

LOG = logging.getLogger("layerdiff.dataset")
CONSTRUCTION = "layerdiff_model.data.construction"
TOY_COLOURS = "toy-colours"  # the shapes stand-in detector + segmenter (layerdiff_toy.shapes_construction)


def _module(name: str):
    return product_module(f"{CONSTRUCTION}.{name}")


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest="command", required=True)

    def common(p):
        p.add_argument("--out", required=True, help="output folder of shards, done markers and report.json")
        p.add_argument("--comfyui", default="", help="ComfyUI folder (default: $COMFYUI_PATH, else .cache/comfyui)")
        p.add_argument("--device", default="auto", help="auto (the GPU of this rank when there is one), cpu, cuda")
        p.add_argument("--local-files-only", action="store_true", help="never download: models must be local")
        p.add_argument("--no-progress", action="store_true", help="no progress bar")

    p = sub.add_parser("pictures", help="the automatic pipeline: folders of images or img2dataset tar shards")
    p.add_argument("inputs", nargs="+", help="folders of images (captions in <name>.txt) or .tar shards")
    common(p)
    p.add_argument("--captioner", default="", help="BLIP-2 or InstructBLIP model (path or hub name); default: "
                   "use the captions the pictures come with")
    p.add_argument("--recaption", action="store_true", help="caption every picture, ignoring given captions")
    p.add_argument("--detector", required=True, help=f"OWLv2 or Grounding DINO model, or {TOY_COLOURS}")
    p.add_argument("--segmenter", default="", help=f"SAM model (not needed with --detector {TOY_COLOURS})")
    p.add_argument("--depth", default="occlusion", help="Depth Anything model, or occlusion (the mask heuristic)")
    p.add_argument("--inpaint-checkpoint", default="", help="SD1.5 inpainting checkpoint for background "
                   "completion through ComfyUI; default: OpenCV inpainting (light, no model)")
    p.add_argument("--inpaint-steps", type=int, default=20)
    p.add_argument("--layer-prompts", choices=("phrase", "caption"), default="phrase",
                   help="phrase: the detected phrase; caption: the captioner's caption of the layer's crop")
    p.add_argument("--clip", default="", help="CLIP model for the layer/prompt agreement filter (default: off)")
    p.add_argument("--batch-size", type=int, default=8, help="pictures per model batch")
    p.add_argument("--images-per-unit", type=int, default=1000, help="folder images per work unit / shard")
    p.add_argument("--max-side", type=int, default=768, help="shrink larger pictures to this side (0: never)")
    p.add_argument("--max-per-phrase", type=int, default=1, help="objects kept per phrase")
    p.add_argument("--no-residue-check", action="store_true", help="skip re-detecting objects in the background")
    f = _module("quality_filters").FilterSettings()
    for name in ("min_detection_score", "min_mask_fraction", "max_mask_fraction", "max_overlap",
                 "min_clip_similarity", "max_residue_score"):
        p.add_argument("--" + name.replace("_", "-"), type=float, default=getattr(f, name), help=f"default "
                       f"{getattr(f, name)}")
    p.add_argument("--max-foregrounds", type=int, default=f.max_foregrounds)

    p = sub.add_parser("layered-files", help="PSD and OpenRaster files -> samples")
    p.add_argument("inputs", nargs="+", help="folders of .psd / .ora files")
    common(p)
    p.add_argument("--captioner", default="", help="caption the composite as the global prompt (and layers with "
                   "editor-default names); default: build the global prompt from the layer names")
    p.add_argument("--max-foregrounds", type=int, default=4)
    p.add_argument("--files-per-unit", type=int, default=1000)

    p = sub.add_parser("cutouts", help="RGBA cut-outs placed on backgrounds -> composed samples")
    common(p)
    p.add_argument("--cutouts", required=True, help="folder of RGBA images (prompt: <name>.txt or the file name)")
    p.add_argument("--backgrounds", required=True, help="folder of background images (prompt as for cut-outs)")
    p.add_argument("--count", type=int, required=True)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--size", type=int, default=512)
    p.add_argument("--min-foregrounds", type=int, default=1)
    p.add_argument("--max-foregrounds", type=int, default=3)
    p.add_argument("--samples-per-unit", type=int, default=1000)

    p = sub.add_parser("report", help="print the summed report of an output folder")
    p.add_argument("out")
    return parser.parse_args(argv)


# ------------------------------------------------------------------------------------------------- backends
def _torch_device(arg: str) -> tuple[str, object]:
    import torch

    if arg == "cpu" or not torch.cuda.is_available():
        return "cpu", torch.float32
    rank = os.environ.get("LOCAL_RANK")
    return (f"cuda:{rank}" if arg == "auto" and rank else ("cuda" if arg == "auto" else arg)), torch.float16


def pipeline_backends(args: argparse.Namespace):
    stages = _module("pipeline")
    light = _module("light_backends")
    device, dtype = _torch_device(args.device)
    loaders = lambda: _module("transformers_backends")  # noqa: E731  (imports transformers only when needed)
    opts = {"device": device, "dtype": dtype, "local_files_only": args.local_files_only}
    captioner = loaders().load_captioner(args.captioner, **opts) if args.captioner else None
    if args.detector == TOY_COLOURS:
        from layerdiff_toy.shapes_construction import ColourShapeFinder

        detector = segmenter = ColourShapeFinder()
    else:
        if not args.segmenter:
            raise SystemExit("build_dataset pictures: --segmenter (a SAM model) is needed with --detector "
                             f"{args.detector}; only --detector {TOY_COLOURS} segments by itself.")
        detector = loaders().load_detector(args.detector, **opts)
        segmenter = loaders().load_segmenter(args.segmenter, **opts)
    depth = None if args.depth == "occlusion" else loaders().load_depth_estimator(args.depth, **opts)
    if args.inpaint_checkpoint:
        inpainter = product_module("nodes.host.dataset_inpainting").ComfyInpainter(
            args.inpaint_checkpoint, steps=args.inpaint_steps)
    else:
        inpainter = light.OpenCVInpainter()
    if args.layer_prompts == "caption":
        if captioner is None:
            raise SystemExit("build_dataset pictures: --layer-prompts caption needs --captioner.")
        layer_prompter = light.CropCaptionPrompter(captioner)
    else:
        layer_prompter = light.PhrasePrompter()
    scorer = loaders().load_image_text_scorer(args.clip, **opts) if args.clip else None
    return stages.Backends(detector=detector, segmenter=segmenter, inpainter=inpainter, captioner=captioner,
                           depth=depth, layer_prompter=layer_prompter, scorer=scorer)


def _progress(args, total: int | None):
    if args.no_progress:
        return None, lambda n: None
    from tqdm import tqdm

    bar = tqdm(total=total, unit="img", desc="build dataset", dynamic_ncols=True)
    return bar, bar.update


def _build(units, out: Path, samples_of, bar):
    try:
        return _module("construction_run").build_units(units, out, samples_of)
    finally:
        if bar is not None:
            bar.close()


# ------------------------------------------------------------------------------------------------- commands
def run_pictures(args: argparse.Namespace):
    inputs, shares = _module("picture_inputs"), _module("work_shares")
    run, pipeline_module = _module("construction_run"), _module("pipeline")
    filters = _module("quality_filters").FilterSettings(
        min_detection_score=args.min_detection_score, min_mask_fraction=args.min_mask_fraction,
        max_mask_fraction=args.max_mask_fraction, max_overlap=args.max_overlap,
        min_clip_similarity=args.min_clip_similarity, max_residue_score=args.max_residue_score,
        max_foregrounds=args.max_foregrounds)
    position = shares.worker_position()
    units = shares.my_share(inputs.find_work_units(args.inputs, args.images_per_unit), position)
    out = Path(args.out)
    todo = [u for u in units if not _module("unit_output").unit_done(out, u.name)]
    LOG.info("process %d of %d (%s): %d work units, %d to build", position.index, position.count,
             position.launcher, len(units), len(todo))
    pipeline = pipeline_module.LayeringPipeline(pipeline_backends(args), filters, recaption=args.recaption,
                                                max_per_phrase=args.max_per_phrase,
                                                check_residue=not args.no_residue_check)
    total = None if any(u.tar for u in todo) else sum(len(u.files) for u in todo)
    bar, tick = _progress(args, total)

    def samples_of(unit, report):
        return run.unit_samples(unit, pipeline, report, batch_size=args.batch_size, max_side=args.max_side,
                                on_pictures=tick)

    return _build(todo, out, samples_of, bar)


class _Unit:
    def __init__(self, name: str, items):
        self.name, self.items = name, items


def run_layered_files(args: argparse.Namespace):
    importer, shares = _module("layered_file_import"), _module("work_shares")
    device, dtype = _torch_device(args.device)
    captioner = (_module("transformers_backends").load_captioner(
        args.captioner, device=device, dtype=dtype, local_files_only=args.local_files_only)
        if args.captioner else None)
    files = []
    for folder in args.inputs:
        folder = Path(folder)
        if not folder.is_dir():
            raise SystemExit(f"build_dataset layered-files: {folder} is not a folder of .psd / .ora files.")
        files += sorted(p for p in folder.rglob("*") if p.suffix.lower() in (".psd", ".ora") and p.is_file())
    units = [_Unit(f"layered-{i // args.files_per_unit:06d}", files[i:i + args.files_per_unit])
             for i in range(0, len(files), args.files_per_unit)]
    units = shares.my_share(units, shares.worker_position())
    bar, tick = _progress(args, sum(len(u.items) for u in units))

    def samples_of(unit, report):
        keys: set[str] = set()
        for path in unit.items:
            tick(1)
            report.pictures += 1
            key = importer.sample_key(path.name, keys)
            try:
                sample = importer.import_layered_file(path, key=key, captioner=captioner,
                                                      max_foregrounds=args.max_foregrounds)
            except importer.ImportRejected as e:
                report.reject(e.reason)
                LOG.info("skipped %s: %s", path, e)
                continue
            report.samples += 1
            yield sample

    return _build(units, Path(args.out), samples_of, bar)


def run_cutouts(args: argparse.Namespace):
    cut, shares = _module("cutout_composition"), _module("work_shares")
    cutouts, skipped = cut.read_cutout_folder(args.cutouts)
    backgrounds, skipped_bg = cut.read_background_folder(args.backgrounds)
    for path, reason in skipped + skipped_bg:
        LOG.warning("skipped %s: %s", path, reason)
    per = args.samples_per_unit
    units = [_Unit(f"cutouts-{i // per:06d}", range(i, min(i + per, args.count))) for i in range(0, args.count, per)]
    units = shares.my_share(units, shares.worker_position())
    bar, tick = _progress(args, sum(len(u.items) for u in units))

    def samples_of(unit, report):
        if unit.items.start == 0:  # the skipped input files are counted once, in the first unit's report
            for _, reason in skipped + skipped_bg:
                report.reject(reason)
        for sample in cut.compose_cutout_samples(
                cutouts, backgrounds, len(unit.items), seed=args.seed, size=(args.size, args.size),
                min_foregrounds=args.min_foregrounds, max_foregrounds=args.max_foregrounds,
                start=unit.items.start):
            tick(1)
            report.pictures += 1
            report.samples += 1
            yield sample

    return _build(units, Path(args.out), samples_of, bar)


def boot_comfyui(argv: list[str] | None) -> None:
    """Boot ComfyUI with --comfyui / --device before the full parser (which reads the package's defaults)."""
    import torch

    pre = argparse.ArgumentParser(add_help=False)
    pre.add_argument("--comfyui", default="")
    pre.add_argument("--device", default="auto")
    known, _ = pre.parse_known_args(argv)
    if known.device != "cpu" and torch.cuda.is_available() and "LOCAL_RANK" in os.environ:
        torch.cuda.set_device(int(os.environ["LOCAL_RANK"]))
    boot(comfy_root=known.comfyui or None, cpu=known.device == "cpu" or not torch.cuda.is_available())


def main(argv: list[str] | None = None) -> int:
    boot_comfyui(argv if argv is not None else sys.argv[1:])
    args = parse_args(argv)
    if not LOG.handlers:  # our own handler: a host may already have configured the root logger (0.3.x does)
        handler = logging.StreamHandler()
        handler.setFormatter(logging.Formatter("%(message)s"))
        LOG.addHandler(handler)
        LOG.setLevel(logging.INFO)
        LOG.propagate = False
    if args.command == "report":
        print(_module("unit_output").write_folder_report(Path(args.out)).summary())
        return 0
    report = {"pictures": run_pictures, "layered-files": run_layered_files, "cutouts": run_cutouts}[
        args.command](args)
    print("this process:\n" + report.summary())
    print(f"whole output folder ({Path(args.out) / 'report.json'}):\n"
          + _module("unit_output").folder_report(Path(args.out)).summary())
    return 0


if __name__ == "__main__":
    sys.exit(main())
