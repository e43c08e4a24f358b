#!/usr/bin/env python
"""Denoising diagnostics of a (toy) SD1.5 base model and of LayerDiff weights trained on it.

Everything runs through ComfyUI's ``apply_model`` with the training script's model code (the same path training and
sampling take); errors are of the predicted clean latent x0 = x - sigma * eps (x0-MSE).

``levels``: for a batch of dataset composites with their global prompts, per timestep t: the base model's x0-MSE
with the right prompts, with the prompts shuffled between samples (how much the model uses its text), and of the
trivial predictor "every latent is the dataset mean" (a model that does worse than that at high noise lays out
images from noise it cannot undo); also the eps error split into its per-channel spatial mean and the rest.

``slots``: for one-foreground training samples ([background, foreground, mask]) per timestep: each slot's x0-MSE
with all slots intact, and with the foreground or the mask slot replaced by another sample's latent at the same
noise level. A slot whose error rises when another slot is destroyed reads that slot (inter-layer attention).

    python scripts/denoising_diagnostics.py levels --checkpoint runs/shapes_benchmark/toy_base.safetensors \
        --data runs/shapes_benchmark/data/train --toy-model
    python scripts/denoising_diagnostics.py slots --checkpoint runs/shapes_benchmark/toy_base.safetensors \
        --weights runs/shapes_benchmark/layerdiff_full.safetensors --data runs/shapes_benchmark/data/train --toy-model
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

# the repository root, for comfy_headless, layerdiff_toy and scripts (the one sys.path line; README "Code map")
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch  # noqa: E402

from comfy_headless.product import product_module, product_names  # noqa: E402
from scripts import train_layerdiff  # noqa: E402

LEVEL_TIMESTEPS = (999, 950, 900, 800, 700, 500, 300, 100)
SLOT_TIMESTEPS = (900, 800, 700, 600, 400)
SLOTS = ("background", "foreground", "mask")


def parse_args(argv=None) -> argparse.Namespace:
    common = argparse.ArgumentParser(add_help=False)
    common.add_argument("--checkpoint", required=True, help="SD1.5-family single-file checkpoint (the base model)")
    common.add_argument("--data", required=True, help="layered dataset")
    common.add_argument("--toy-model", action="store_true", help="register the toy SD1.5 family first")
    common.add_argument("--samples", type=int, default=32)
    common.add_argument("--resolution", type=int, default=64)
    common.add_argument("--seed", type=int, default=0)
    common.add_argument("--threads", type=int, default=2)
    common.add_argument("--comfyui", default="", help="ComfyUI folder (default: $COMFYUI_PATH, else .cache/comfyui)")
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter, epilog=__doc__)
    sub = p.add_subparsers(dest="command", required=True)
    sub.add_parser("levels", parents=[common], help="base model: x0 error per noise level (composites)")
    slots = sub.add_parser("slots", parents=[common], help="LayerDiff weights: which slots each slot reads")
    slots.add_argument("--weights", required=True, help="LayerDiff weights trained on --checkpoint")
    return p.parse_args(argv)


def training_model(args, *options: str):
    """The training script's ComfyUI model for ``args`` (ComfyUI booted headless)."""
    argv = ["--checkpoint", args.checkpoint, "--data", args.data, "--out", "unused.safetensors", "--run-dir",
            "unused", "--resolution", str(args.resolution), "--batch-size", str(args.samples), "--comfyui",
            args.comfyui, *options, *(["--toy-model"] if args.toy_model else [])]
    train_layerdiff.boot_comfyui(args.comfyui)
    if args.toy_model:
        from layerdiff_toy.toy_model import register_toy_sd15

        register_toy_sd15()
    config = product_names("layerdiff_model.training.config", "as_config")(argv)
    return config, product_module("nodes.host.training").ComfyTrainingModel(config)


def noise_levels(args) -> None:
    BatchStream, base_model_images, open_dataset = product_names(
        "layerdiff_model.training.data", "BatchStream", "base_model_images", "open_dataset")

    config, model = training_model(args, "--train", "unet", "--composites")
    batch = next(iter(BatchStream(open_dataset(config.data, config.resolution), args.samples, args.seed)))
    generator = torch.Generator().manual_seed(args.seed)
    print("   t  sigma  x0-MSE right  shuffled  trivial  | eps-MSE  mean part  rest")
    with torch.no_grad():
        images, prompts = base_model_images(batch, False)
        latents = model.encode_images(images.to(model.device))
        right, shuffled = model.encode_prompts(prompts), model.encode_prompts(prompts[1:] + prompts[:1])
        trivial = float(((latents - latents.mean((0, 2, 3), keepdim=True)) ** 2).mean())
        for t in LEVEL_TIMESTEPS:
            ts = torch.full((len(prompts),), t, device=model.device)
            noise = torch.randn(latents.shape, generator=generator).to(model.device)
            noisy = model.noise_latents(latents, noise, ts)
            sigma = model.sigmas(ts).view(-1, 1, 1, 1)
            errors = []
            for conds in (right, shuffled):
                eps = model.predict_noise(noisy, ts, conds)
                errors.append((float(((noisy - sigma * eps - latents) ** 2).mean()), eps - noise))
            eps_error = errors[0][1]
            mean_part = eps_error.mean((2, 3), keepdim=True)
            print(f"{t:4d} {float(sigma.flatten()[0]):6.2f} {errors[0][0]:13.3f} {errors[1][0]:9.3f} {trivial:8.3f}  | "
                  f"{float((eps_error ** 2).mean()):7.4f} {float((mean_part ** 2).mean()):10.4f} "
                  f"{float(((eps_error - mean_part) ** 2).mean()):5.4f}")


def one_foreground_batch(config, samples: int, seed: int) -> dict:
    BatchStream, open_dataset = product_names("layerdiff_model.training.data", "BatchStream", "open_dataset")

    for batch in BatchStream(open_dataset(config.data, config.resolution), samples, seed):
        if batch["num_foregrounds"] == 1:
            return batch
    raise SystemExit("denoising_diagnostics.py slots: the dataset has no one-foreground samples")


def slot_reads(args) -> None:
    config, model = training_model(args, "--init-weights", args.weights)
    training_images = product_names("layerdiff_model.training.data", "training_images")

    batch = one_foreground_batch(config, args.samples, args.seed)
    generator = torch.Generator().manual_seed(args.seed)
    print("x0-MSE per slot [" + ", ".join(SLOTS) + "]")
    with torch.no_grad():
        images, rows = training_images(batch, False)
        latents = model.encode_images(images.to(model.device))
        conds = model.encode_prompts(batch["global_prompts"], [list(p) for p in batch["layer_prompts"]])
        b = len(batch["global_prompts"])
        for t in SLOT_TIMESTEPS:
            ts = torch.full((b,), t, device=model.device).repeat_interleave(rows)
            sigma = model.sigmas(ts).view(-1, 1, 1, 1)
            noise = torch.randn(latents.shape, generator=generator).to(model.device)
            noisy = model.noise_latents(latents, noise, ts)
            others = torch.randperm(b, generator=generator)  # another sample's slot, same noise level
            line = []
            for destroyed in (None, 1, 2):
                x = noisy.clone().view(b, rows, *noisy.shape[1:])
                if destroyed is not None:
                    fresh = torch.randn(x[:, destroyed].shape, generator=generator).to(model.device)
                    x[:, destroyed] = latents.view_as(x)[others, destroyed] + float(sigma.flatten()[0]) * fresh
                x = x.view_as(noisy)
                x0 = x - sigma * model.predict_noise(x, ts, conds)
                err = ((x0 - latents) ** 2).flatten(1).mean(1).view(b, rows).mean(0)
                line.append("[" + ", ".join(f"{float(e):.3f}" for e in err) + "]")
            print(f"t={t}: intact {line[0]}  foreground destroyed {line[1]}  mask destroyed {line[2]}")


def main(argv=None) -> int:
    args = parse_args(argv)
    torch.set_num_threads(args.threads)
    (noise_levels if args.command == "levels" else slot_reads)(args)
    return 0


if __name__ == "__main__":
    sys.exit(main())
