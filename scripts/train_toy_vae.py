#!/usr/bin/env python
"""Train the toy model family's VAE (TAESD topology) on shapes images and write the initial toy checkpoint.

The toy SD1.5 checkpoint (layerdiff_toy/toy_model.py) = random UNet + random frozen 2-layer CLIP (both from --clip-seed)
+ this trained VAE. Its UNet is then trained on composites and the LayerDiff modules on layers by
scripts/train_layerdiff.py (scripts/shapes_benchmark.py runs the whole chain).

The VAE learns composites, backgrounds, foreground layers and masks (grey images, as LayerDiff encodes masks).
Latent scale: ComfyUI's VAE wrapper returns ``taesd_encoder(x) / vae_scale`` and the SD1.5 latent format multiplies
by 0.18215 before the UNet; with ``vae_scale = 0.18215`` the UNet therefore sees the encoder's raw output, which the
trainer keeps at mean 0 / std 1 per channel (what an SD1.5 UNet expects; SD's own VAE latents times 0.18215 have
std ~1). The script checks the round trip through ComfyUI's ``comfy.sd.VAE`` and reports the latent statistics.

    python scripts/train_toy_vae.py --data runs/shapes/data/train --test-data runs/shapes/data/test \
        --out-vae runs/shapes/toy_vae.safetensors --out-checkpoint runs/shapes/toy_init.safetensors
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
from comfy_headless.product import product_names  # noqa: E402
from layerdiff_toy import toy_model  # noqa: E402  (host-free at import)
from layerdiff_toy.autoencoder_training import (AutoencoderTrainConfig, evaluate_autoencoder,  # noqa: E402
                                                train_autoencoder)

LOG = logging.getLogger("train_toy_vae")
SD15_SCALE = 0.18215


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0],
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--data", required=True, type=Path, help="shapes dataset folder (scripts/make_shapes_dataset.py)")
    p.add_argument("--test-data", type=Path, help="held-out shapes folder for the reconstruction report")
    p.add_argument("--out-vae", required=True, type=Path, help="trained TAESD state dict (.safetensors)")
    p.add_argument("--out-checkpoint", type=Path, help="also write the initial toy checkpoint (random UNet + CLIP)")
    p.add_argument("--report", type=Path, help="JSON report (default: next to --out-vae)")
    p.add_argument("--max-samples", type=int, default=600, help="samples of --data used (4-6 images each)")
    p.add_argument("--steps", type=int, default=300)
    p.add_argument("--batch-size", type=int, default=8)
    p.add_argument("--crop", type=int, default=32, help="random crop side (0 = whole 64x64 images)")
    p.add_argument("--lr", type=float, default=1e-3)
    p.add_argument("--seed", type=int, default=0, help="VAE init and training order")
    p.add_argument("--clip-seed", type=int, default=None, help="seed of the random UNet and CLIP (default: toy)")
    toy = toy_model
    p.add_argument("--unet-width", type=int, default=toy.SHAPES_TOY_WIDTH, choices=toy.TOY_WIDTHS,
                   help=f"model_channels of the initial checkpoint's toy UNet (the shapes model is "
                        f"{toy.SHAPES_TOY_WIDTH})")
    p.add_argument("--init-vae", type=Path, help="continue from these TAESD weights (or the VAE of a toy checkpoint) instead of a random VAE")
    p.add_argument("--save-every", type=int, default=50, help="save --out-vae every N steps (0 = at the end only)")
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--comfyui", default="", help="ComfyUI folder (default: $COMFYUI_PATH, else .cache/comfyui)")
    return p.parse_args(argv)


def image_pool(folder: Path, max_samples: int) -> torch.Tensor:
    """uint8 [K, 3, H, W]: per sample its composite, background, foreground layers and masks (grey RGB)."""
    composite = product_names("layerdiff_model.data.layered_sample", "composite")
    list_sample_folders, read_sample = product_names("layerdiff_model.data.sample_files", "list_sample_folders",
                                                     "read_sample")
    images = []
    for path in list_sample_folders(folder)[:max_samples]:
        s = read_sample(path)
        images += [composite(s.background, s.foregrounds, s.masks), s.background, *s.foregrounds,
                   *(m.expand(3, -1, -1) for m in s.masks)]
    if not images:
        raise SystemExit(f"train_toy_vae.py: no samples in {folder}")
    return (torch.stack(images).clamp(0, 1) * 255).round().to(torch.uint8)


def zero_residual_branches_(vae: torch.nn.Module) -> int:
    """Zero the last conv of every residual block: each block starts as the identity (faster, stabler training
    of a deep conv stack without normalisation)."""
    count = 0
    for module in vae.modules():
        if type(module).__name__ == "Block" and isinstance(module.conv, torch.nn.Sequential):
            torch.nn.init.zeros_(module.conv[-1].weight)
            if module.conv[-1].bias is not None:
                torch.nn.init.zeros_(module.conv[-1].bias)
            count += 1
    return count


def vae_state_dict(vae: torch.nn.Module) -> dict:
    """TAESD state dict for a checkpoint; a zero ``vae_shift`` (0.3.x only) is dropped so both hosts load it."""
    state = {k: v.detach().float().contiguous() for k, v in vae.state_dict().items()}
    if "vae_shift" in state and float(state["vae_shift"]) == 0.0:
        del state["vae_shift"]
    return state


@torch.no_grad()
def comfy_round_trip(state: dict, images: torch.Tensor) -> dict:
    """Encode/decode through ComfyUI's VAE wrapper + the SD1.5 latent format, as sampling does."""
    import comfy.latent_formats
    import comfy.sd

    vae = comfy.sd.VAE(sd=dict(state))
    fmt = comfy.latent_formats.SD15()
    pixels = images[:64].float().div(255).movedim(1, -1)
    latents = fmt.process_in(vae.encode(pixels))
    decoded = vae.decode(fmt.process_out(latents)).clamp(0, 1)
    mse = ((decoded - pixels) ** 2).flatten(1).mean(1)
    return {"psnr_db": float((10 * torch.log10(1 / mse.clamp_min(1e-10))).mean()),
            "unet_latent_mean": float(latents.mean()), "unet_latent_std": float(latents.std()),
            "unet_latent_abs_max": float(latents.abs().max())}


def main(argv=None) -> int:
    args = parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s")
    torch.set_num_threads(args.threads)
    headless.boot(comfy_root=args.comfyui or None)
    toy = toy_model
    atomic_write = product_names("layerdiff_model.atomic_file", "atomic_write")
    save_safetensors = product_names("layerdiff_model.safetensors_file", "save_safetensors")
    from safetensors.torch import load_file

    began = time.time()
    train_images = image_pool(args.data, args.max_samples)
    test_images = image_pool(args.test_data, 64) if args.test_data else train_images[-256:]
    LOG.info("VAE data: %d training images, %d test images", len(train_images), len(test_images))
    vae = toy.build_vae_module("taesd", seed=args.seed + 1)
    if args.init_vae:
        prefix = "first_stage_model."  # a whole toy checkpoint (e.g. assets/toy_shapes/toy_shapes_base.safetensors)
        state = {k.removeprefix(prefix): v.float() for k, v in load_file(str(args.init_vae)).items()
                 if k.startswith(prefix) or not k.startswith(("model.", "cond_stage_model."))}
        missing, _ = vae.load_state_dict(state, strict=False)
        if [k for k in missing if k != "vae_shift"]:
            raise SystemExit(f"train_toy_vae.py: {args.init_vae} lacks TAESD weights {missing[:3]}")
    else:
        LOG.info("zero-initialised %d residual branches", zero_residual_branches_(vae))
    config = AutoencoderTrainConfig(steps=args.steps, batch_size=args.batch_size, crop=args.crop, lr=args.lr,
                                    lr_final=args.lr / 10, seed=args.seed)
    with torch.no_grad():
        vae.vae_scale.fill_(SD15_SCALE)  # used by ComfyUI's wrapper only, not by encoder/decoder training
    args.out_vae.parent.mkdir(parents=True, exist_ok=True)

    def save(step: int) -> None:
        save_safetensors(args.out_vae, vae_state_dict(vae), {"format": "pt", "layerdiff_toy_vae": "taesd",
                                                                   "steps": str(step)})

    summary = train_autoencoder(vae.taesd_encoder, vae.taesd_decoder, train_images, config, log=LOG.info,
                                on_checkpoint=save, checkpoint_every=args.save_every)
    save(args.steps)
    state = vae_state_dict(vae)
    report = {"train": summary, "config": vars(config),
              "test_direct": evaluate_autoencoder(vae.taesd_encoder, vae.taesd_decoder, test_images),
              "test_through_comfyui": comfy_round_trip(state, test_images),
              "train_images": len(train_images), "test_images": len(test_images)}
    if args.out_checkpoint:
        seed = toy.DEFAULT_SEED if args.clip_seed is None else args.clip_seed
        toy.make_toy_sd15_checkpoint(args.out_checkpoint, seed=seed, vae_state_dict=state, width=args.unet_width,
                                     metadata={"layerdiff_toy_vae": "trained on shapes"})
        report["checkpoint"] = str(args.out_checkpoint)
    report["seconds"] = round(time.time() - began, 1)
    report_path = args.report or args.out_vae.with_suffix(".json")
    atomic_write(report_path, lambda fh: fh.write(json.dumps(report, indent=1, default=str).encode()))
    LOG.info("VAE: test PSNR %.1f dB direct, %.1f dB through ComfyUI; UNet latent std %.2f; %.0f s",
             report["test_direct"]["psnr_db"], report["test_through_comfyui"]["psnr_db"],
             report["test_through_comfyui"]["unet_latent_std"], report["seconds"])
    return 0


if __name__ == "__main__":
    sys.exit(main())
