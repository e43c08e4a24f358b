#!/usr/bin/env python
"""Evaluate LayerDiff on held-out shapes prompts through the real ComfyUI nodes (the shapes proof of learning).

For every test sample (scripts/make_shapes_dataset.py --split test: colour/shape pairs never seen in training)
the prompts are run through Load Checkpoint -> LayerDiff Load Weights -> LayerDiff Apply -> LayerDiff Layer Prompt
Encode -> LayerDiff Enhance Layer Prompts -> LayerDiff Empty Layered Latent -> [Self-Attention Guidance] ->
LayerDiff SMG KSampler -> VAE Decode -> LayerDiff Split Layers, and the layers are scored with
layerdiff_toy/shapes_eval.py. Each --run names weights and guidance:

    --run full=runs/full.safetensors                      CFG (smg_scale 0)
    --run full+smg=runs/full.safetensors,guidance=smg     self-mask guidance (--smg-scale)
    --run full+sag=runs/full.safetensors,guidance=sag     ComfyUI's Self-Attention Guidance node + CFG
    --run untrained=zero                                  zero-initialised modules (= the base model in every slot)
    --run no-inter=runs/no_inter.safetensors              (the weights' own config switches branches off)
    --run smg1=runs/full.safetensors,guidance=smg,smg_scale=1,count=24   per-run scale and sample count
    --run dec=runs/full.safetensors,decompose=picture,denoise=0.8,strength=1
          decompose each sample's composite picture (LayerDiff Picture to Layered Latent, foreground slots starting
          from the picture or grey, + LayerDiff Composite Guidance): scored against the true layers (true-mask
          IoU) and by the PSNR of the layers' composite against the picture

Every run uses the same seeds per sample. Also reported: the scorer on the dataset's own layers ("ground truth")
and the chance level; with --vae-ceiling the true layers after a VAE round trip (the only row with known layouts,
hence the only one with a true-mask IoU); with --baseline NAME every run's paired difference from that run.
Colours are named with the palette the VAE decodes (measured on --calibration-data, the validation split, never
on the scored samples), or the nominal palette without it.
"""
from __future__ import annotations

import argparse
import json
import logging
import sys
import time
from pathlib import Path

# the repository root, for comfy_headless, layerdiff_toy and scripts (the one sys.path line; README "Code map")
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
REPO_ROOT = Path(__file__).resolve().parents[1]
SCRIPTS = REPO_ROOT / "scripts"

import torch  # noqa: E402

from comfy_headless import boot as headless  # noqa: E402
from comfy_headless.nodes_api import call_node, expose_model_file  # noqa: E402
from comfy_headless.product import product_module, product_names  # noqa: E402

LOG = logging.getLogger("evaluate_shapes")
GUIDANCE = ("cfg", "smg", "sag")
TRIVIAL = "trivial: the picture as background, no foreground (through the VAE)"
RUN_KEYS = {"guidance": str, "smg_scale": float, "sag_scale": float, "count": int, "max_foregrounds": int,
            "enhancer_width": int, "decompose": str, "denoise": float, "strength": float}


def parse_run(text: str) -> dict:
    name, _, spec = text.partition("=")
    parts = spec.split(",")
    run = {"name": name, "weights": parts[0], "guidance": "cfg"}
    for part in parts[1:]:
        key, _, value = part.partition("=")
        if key not in RUN_KEYS:
            raise argparse.ArgumentTypeError(f"bad --run {text!r}: unknown key {key!r} (keys: {', '.join(RUN_KEYS)})")
        try:
            run[key] = RUN_KEYS[key](value)
        except ValueError:
            raise argparse.ArgumentTypeError(f"bad --run {text!r}: {key} needs a {RUN_KEYS[key].__name__}") from None
    if not name or not run["weights"] or run["guidance"] not in GUIDANCE:
        raise argparse.ArgumentTypeError(f"bad --run {text!r}: NAME=WEIGHTS|zero[,guidance=cfg|smg|sag]")
    return run


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter, epilog=__doc__)
    p.add_argument("--checkpoint", required=True, type=Path, help="toy (or SD1.5) single-file checkpoint")
    p.add_argument("--toy-model", action="store_true", help="register the toy SD1.5 config first")
    p.add_argument("--data", required=True, type=Path, help="held-out shapes dataset folder")
    p.add_argument("--run", action="append", type=parse_run, required=True, dest="runs")
    p.add_argument("--count", type=int, default=48, help="test samples (the first COUNT of --data)")
    p.add_argument("--steps", type=int, default=16)
    p.add_argument("--cfg", type=float, default=5.0)
    p.add_argument("--sampler", default="euler")
    p.add_argument("--scheduler", default="normal")
    p.add_argument("--smg-scale", type=float, default=0.5)
    p.add_argument("--smg-start", type=float, default=0.2)
    p.add_argument("--sag-scale", type=float, default=0.5)
    p.add_argument("--seed", type=int, default=1000, help="sample i uses seed + i in every run")
    p.add_argument("--out", required=True, type=Path, help="JSON results (a .md table is written next to it)")
    p.add_argument("--calibration-data", type=Path,
                   help="shapes dataset (the validation split) whose true layers, through the VAE, set the decoded "
                        "colour palette used to name colours")
    p.add_argument("--calibration-count", type=int, default=32)
    p.add_argument("--baseline", help="run NAME: report every other run's paired difference from it")
    p.add_argument("--vae-ceiling", action="store_true",
                   help="also score the true layers after a VAE encode/decode round trip (what a perfect "
                        "diffusion model could reach with this VAE)")
    p.add_argument("--save-images", type=int, default=4, help="PNG sheet of the first N samples per run (0 = none)")
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--comfyui", default="", help="ComfyUI folder (default: $COMFYUI_PATH, else .cache/comfyui)")
    return p.parse_args(argv)


class NodeRunner:
    """Runs our nodes and ComfyUI's core nodes (classic or 0.3.x V3 API) in this process."""

    def __call__(self, name: str, **inputs) -> tuple:
        return call_node(name, **inputs)

    @staticmethod
    def module(name: str):
        return product_module(name)

    @staticmethod
    def install(folder: str, path: Path) -> str:
        """Make ``path`` visible in the host's model ``folder``; returns the name the loaders list."""
        return expose_model_file(folder, path)


def build_run(run: dict, node: NodeRunner, model) -> dict:
    if run["weights"] == "zero":
        adapter = node.module("nodes.host.inference")
        config = adapter.config_for_model(model, max_foregrounds=int(run.get("max_foregrounds", 3)),
                                          enhancer_width=int(run.get("enhancer_width", 64)))
        modules = adapter.build_modules(config, seed=0, zero_outputs=True)
    else:
        (modules,) = node("LayerDiffLoadWeights", weights_name=node.install("layerdiff", Path(run["weights"])))
    (patched,) = node("LayerDiffApply", model=model, layerdiff=modules)
    return {**run, "modules": modules, "model": patched, "scores": [], "seconds": 0.0}


def sample_one(run: dict, node: NodeRunner, vae, cond: tuple, num_fg: int, seed: int, args, picture=None) -> object:
    positive, negative = node("LayerDiffEnhancePrompts", layerdiff=run["modules"], positive=cond[0], negative=cond[1])
    model, smg, denoise = run["model"], 0.0, 1.0
    if run.get("decompose"):
        (latent,) = node("LayerDiffPictureToLatent", vae=vae, image=picture, foregrounds=num_fg,
                         foreground_start=run["decompose"])
        (model,) = node("LayerDiffCompositeGuidance", model=model, picture_latent=latent,
                        strength=run.get("strength", 1.0), start_percent=0.0)
        denoise = run.get("denoise", 0.8)
    else:
        (latent,) = node("LayerDiffEmptyLatent", width=64, height=64, foregrounds=num_fg, batch_size=1)
    if run["guidance"] == "sag":
        (model,) = node("SelfAttentionGuidance", model=model, scale=run.get("sag_scale", args.sag_scale),
                        blur_sigma=2.0)
    elif run["guidance"] == "smg":
        smg = run.get("smg_scale", args.smg_scale)
    (samples,) = node("LayerDiffSMGSampler", model=model, seed=seed, steps=args.steps, cfg=args.cfg,
                      sampler_name=args.sampler, scheduler=args.scheduler, positive=positive, negative=negative,
                      latent_image=latent, denoise=denoise, smg_scale=smg, smg_start_percent=args.smg_start)
    (images,) = node("VAEDecode", vae=vae, samples=samples)
    return node("LayerDiffSplitLayers", images=images, samples=samples)[0]


def vae_round_trip(node: NodeRunner, vae, layers, num_fg: int):
    """The true layers through VAE Encode -> VAE Decode -> LayerDiff Split Layers (masks binarized there)."""
    layers_to_slot_images = product_names("layerdiff_model.layers.compose", "layers_to_slot_images")

    (latent,) = node("VAEEncode", pixels=layers_to_slot_images(layers), vae=vae)
    (images,) = node("VAEDecode", vae=vae, samples=latent)
    samples = node.module("nodes.host.inference").make_layered_latent(latent["samples"], num_fg)
    return node("LayerDiffSplitLayers", images=images, samples=samples)[0]


def _file_name(name: str) -> str:
    return "".join(c if c.isalnum() or c in "-_" else "_" for c in name).strip("_")


def save_sheet(path: Path, rows: list) -> None:
    """One row per sample: background | fg_k, mask_k ... | composite."""
    from PIL import Image

    compose, LayeredImages = product_names("layerdiff_model.layers.compose", "compose", "LayeredImages")

    tiles = []
    for layers in rows:
        row = [layers.background[0]]
        for k in range(layers.foregrounds.shape[1]):
            row += [layers.foregrounds[0, k], layers.masks[0, k, ..., None].expand(-1, -1, 3)]
        row.append(compose(layers)[0])
        tiles.append(torch.cat(row, dim=1))
    width = max(t.shape[1] for t in tiles)
    sheet = torch.cat([torch.nn.functional.pad(t, (0, 0, 0, width - t.shape[1])) for t in tiles], dim=0)
    Image.fromarray((sheet.clamp(0, 1) * 255).round().byte().numpy()).save(path)


def main(argv=None) -> int:
    args = parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s")
    torch.set_num_threads(args.threads)
    headless.boot(comfy_root=args.comfyui or None)
    from layerdiff_toy import shapes_eval, toy_model  # after the boot: shapes_eval takes product modules

    compose, LayeredImages = product_names("layerdiff_model.layers.compose", "compose", "LayeredImages")

    if args.toy_model:
        toy_model.register_toy_sd15()
    list_sample_folders, read_sample = product_names("layerdiff_model.data.sample_files", "list_sample_folders",
                                                     "read_sample")
    node = NodeRunner()
    began = time.time()
    with torch.no_grad():  # 2024 ComfyUI builds the CLIP with in-place copies into parameters
        model, clip, vae = node("CheckpointLoaderSimple", ckpt_name=node.install("checkpoints", args.checkpoint))[:3]
    runs = [build_run(run, node, model) for run in args.runs]
    palette = shapes_eval.NOMINAL
    if args.calibration_data:
        calibration = [read_sample(f) for f in list_sample_folders(args.calibration_data)[:args.calibration_count]]
        with torch.no_grad():
            trips = [(vae_round_trip(node, vae, layers, len(s.foreground_prompts)), truth)
                     for s in calibration for layers, truth in [shapes_eval.truth_layers(s)]]
        palette = shapes_eval.decoded_palette(trips, source=f"decoded, {len(trips)} samples of {args.calibration_data}")
        LOG.info("decoded palette: %s", palette.as_dict())
    samples = [read_sample(f) for f in list_sample_folders(args.data)[:args.count]]
    truth_scores, vae_scores, truths, sheets = [], [], [], {run["name"]: [] for run in runs}
    trivial_scores = []
    for i, sample in enumerate(samples):
        layers, truth = shapes_eval.truth_layers(sample)
        truths.append(truth)
        truth_scores.append(shapes_eval.score_sample(layers, 0, truth, layout_is_true=True))
        if args.vae_ceiling:
            with torch.no_grad():
                round_trip = vae_round_trip(node, vae, layers, len(sample.foreground_prompts))
            vae_scores.append(shapes_eval.score_sample(round_trip, 0, truth, palette, layout_is_true=True))
            if i < args.save_images:
                sheets.setdefault("ground truth through the VAE", []).append(round_trip)
        cond = node("LayerDiffPromptEncode", clip=clip, global_prompt=sample.global_prompt,
                    background_prompt=sample.background_prompt,
                    foreground_prompts="\n".join(sample.foreground_prompts), negative_prompt="")
        picture = compose(layers)  # the flat picture a decomposition starts from [1, H, W, 3]
        if any(r.get("decompose") for r in runs):  # the trivial decomposition: all picture, no foreground
            trivial = LayeredImages(picture, torch.full_like(layers.foregrounds, 0.5), torch.zeros_like(layers.masks))
            with torch.no_grad():
                trivial = vae_round_trip(node, vae, trivial, len(sample.foreground_prompts))
            score = shapes_eval.score_sample(trivial, 0, truth, palette, layout_is_true=True)
            score.details["composite_psnr_db"] = shapes_eval.psnr_db(compose(trivial), picture)
            trivial_scores.append(score)
        for run in runs:
            if i >= run.get("count", len(samples)):
                continue
            t = time.time()
            with torch.no_grad():
                generated = sample_one(run, node, vae, cond, len(sample.foreground_prompts), args.seed + i, args,
                                       picture)
            run["seconds"] += time.time() - t
            decomposed = bool(run.get("decompose"))
            score = shapes_eval.score_sample(generated, 0, truth, palette, layout_is_true=decomposed)
            if decomposed:
                score.details["composite_psnr_db"] = shapes_eval.psnr_db(compose(generated), picture)
            run["scores"].append(score)
            if i < args.save_images:
                sheets[run["name"]].append(generated)
        if (i + 1) % 8 == 0:
            LOG.info("%d / %d samples (%.0f s)", i + 1, len(samples), time.time() - began)
    rows = {"chance": shapes_eval.chance_levels(truths), "ground truth layers": shapes_eval.summarize(truth_scores)}
    if vae_scores:
        rows["ground truth through the VAE"] = shapes_eval.summarize(vae_scores)
    times = {}
    for run in runs:
        rows[run["name"]] = shapes_eval.summarize(run["scores"])
        times[run["name"]] = f"{run['seconds'] / max(1, len(run['scores'])):.2f} s/sample"
    paired = {}
    if args.baseline:
        base = next((r for r in runs if r["name"] == args.baseline), None)
        if base is None:
            raise SystemExit(f"--baseline {args.baseline!r} is not a --run name ({[r['name'] for r in runs]})")
        paired = {r["name"]: {m: shapes_eval.paired_difference(r["scores"], base["scores"], m)
                              for m in ("composite_acc", "fg_colour_acc")} for r in runs if r is not base}
    args.out.parent.mkdir(parents=True, exist_ok=True)
    result = {"settings": {k: (str(v) if isinstance(v, Path) else v) for k, v in vars(args).items() if k != "runs"},
              "runs": [{k: v for k, v in run.items() if k not in ("modules", "model", "scores")} for run in runs],
              "palette": palette.as_dict(), "summary": rows, "paired_vs_baseline": paired,
              "seconds_per_sample": {r["name"]: r["seconds"] / max(1, len(r["scores"])) for r in runs},
              "per_sample": {r["name"]: [shapes_eval.score_dict(s) for s in r["scores"]] for r in runs},
              "seconds": round(time.time() - began, 1)}
    args.out.write_text(json.dumps(result, indent=1, default=str))
    table = shapes_eval.markdown_table(rows, times) + "\n\nLayer colour per prompt colour (right/layers):\n\n" + \
        shapes_eval.per_colour_table(rows)
    decompositions = {r["name"]: rows[r["name"]] for r in runs if r.get("decompose")}
    if trivial_scores:
        rows[TRIVIAL] = shapes_eval.summarize(trivial_scores)
        decompositions = {TRIVIAL: rows[TRIVIAL], **decompositions}
    if decompositions:
        table += "\n\nDecomposition of the samples' composites:\n\n" + shapes_eval.decomposition_table(decompositions)
    if paired:
        table += f"\n\nPaired difference from {args.baseline} (same prompts and seeds; mean +- standard error):\n\n" + \
            "\n".join(f"- {name}: composite {d['composite_acc']['mean']:+.3f} +- {d['composite_acc']['se']:.3f} "
                      f"({d['composite_acc']['n']} samples), layer colour {d['fg_colour_acc']['mean']:+.3f} +- "
                      f"{d['fg_colour_acc']['se']:.3f} ({d['fg_colour_acc']['n']} layers)"
                      for name, d in paired.items())
    args.out.with_suffix(".md").write_text(table + "\n")
    for name, layers in sheets.items():
        if layers:
            save_sheet(args.out.with_name(f"{args.out.stem}_{_file_name(name)}.png"), layers)
    print(table)
    return 0


if __name__ == "__main__":
    sys.exit(main())
