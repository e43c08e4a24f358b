"""Host-free training of an image autoencoder (an encoder/decoder pair of plain ``nn.Module``s).

Used to train the toy model family's TAESD-topology VAE on the procedural shapes images (docs/DESIGN.md 2.7), but
takes any encoder ``image [B,3,H,W] in [0,1] -> latent [B,C,h,w]`` and decoder ``latent -> image in [0,1]``.

Besides reconstruction, the latent is kept in the range a diffusion model expects: a penalty pulls every latent
channel's batch mean to 0 and standard deviation to ``latent_std`` (the diffusion model sees these latents
unscaled, see ``scripts/train_toy_vae.py``), and the decoder is trained on slightly noised latents so that the
small errors a sampler leaves do not turn into artefacts. Training can run on random crops: the networks are fully
convolutional and a crop of half the side costs a quarter of the time.
"""
from __future__ import annotations

import math
import time
from dataclasses import dataclass
from typing import Callable

import torch
import torch.nn.functional as F


@dataclass(frozen=True)
class AutoencoderTrainConfig:
    steps: int = 300
    batch_size: int = 8
    lr: float = 2e-3
    lr_final: float = 2e-4  # cosine decay to this value
    warmup: int = 20
    crop: int = 0  # 0 = whole images; else random square crops of this side (a multiple of the downscale)
    downscale: int = 8
    latent_std: float = 1.0
    latent_weight: float = 0.05
    latent_noise: float = 0.05  # std of the noise added to latents before decoding
    l1_weight: float = 0.5  # loss = mse + l1_weight * l1 (L1 keeps flat colours crisp)
    seed: int = 0
    log_every: int = 25


def latent_penalty(z: torch.Tensor, target_std: float) -> torch.Tensor:
    """Per-channel (mean^2 + (std - target)^2), averaged over channels. z [B, C, h, w]."""
    flat = z.transpose(0, 1).reshape(z.shape[1], -1)
    return (flat.mean(1) ** 2 + (flat.std(1) - target_std) ** 2).mean()


def random_crops(images: torch.Tensor, crop: int, generator: torch.Generator) -> torch.Tensor:
    """Same-size random square crops of a [B, C, H, W] batch (one offset per image)."""
    b, _, h, w = images.shape
    if crop <= 0 or crop >= min(h, w):
        return images
    ys = torch.randint(0, h - crop + 1, (b,), generator=generator).tolist()
    xs = torch.randint(0, w - crop + 1, (b,), generator=generator).tolist()
    return torch.stack([img[:, y:y + crop, x:x + crop] for img, y, x in zip(images, ys, xs)])


def _lr_at(step: int, cfg: AutoencoderTrainConfig) -> float:
    if step < cfg.warmup:
        return cfg.lr * (step + 1) / cfg.warmup
    progress = (step - cfg.warmup) / max(1, cfg.steps - cfg.warmup)
    return cfg.lr_final + 0.5 * (cfg.lr - cfg.lr_final) * (1 + math.cos(math.pi * min(1.0, progress)))


def reconstruction_loss(recon: torch.Tensor, target: torch.Tensor, l1_weight: float) -> torch.Tensor:
    return F.mse_loss(recon, target) + l1_weight * F.l1_loss(recon, target)


def train_autoencoder(encoder: torch.nn.Module, decoder: torch.nn.Module, images: torch.Tensor,
                      config: AutoencoderTrainConfig = AutoencoderTrainConfig(),
                      log: Callable[[str], None] | None = None,
                      on_checkpoint: Callable[[int], None] | None = None, checkpoint_every: int = 0) -> dict:
    """Train ``encoder``/``decoder`` in place on ``images`` ([N, 3, H, W], float in [0, 1] or uint8).

    ``on_checkpoint(step)`` is called every ``checkpoint_every`` steps (e.g. to save the weights so far).

    Returns a summary: final losses (mean over the last 10% of steps), seconds, steps, images seen.
    """
    if images.ndim != 4 or images.shape[1] != 3:
        raise ValueError(f"images must be [N, 3, H, W], got {tuple(images.shape)}")
    if config.crop and config.crop % config.downscale:
        raise ValueError(f"crop {config.crop} must be a multiple of the downscale {config.downscale}")
    generator = torch.Generator().manual_seed(config.seed)
    params = [p for m in (encoder, decoder) for p in m.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=config.lr, weight_decay=0.0)
    encoder.train()
    decoder.train()
    history: list[tuple[float, float]] = []
    began = time.time()
    for step in range(config.steps):
        for group in optimizer.param_groups:
            group["lr"] = _lr_at(step, config)
        index = torch.randint(0, images.shape[0], (config.batch_size,), generator=generator)
        batch = images[index]
        batch = batch.float() / 255 if batch.dtype == torch.uint8 else batch.float()
        batch = random_crops(batch, config.crop, generator)
        z = encoder(batch)
        noisy = z + config.latent_noise * torch.randn(z.shape, generator=generator) if config.latent_noise else z
        recon = decoder(noisy)
        rec = reconstruction_loss(recon, batch, config.l1_weight)
        reg = latent_penalty(z, config.latent_std)
        loss = rec + config.latent_weight * reg
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        optimizer.step()
        history.append((rec.item(), reg.item()))
        if log and (step % config.log_every == 0 or step == config.steps - 1):
            log(f"autoencoder step {step + 1}/{config.steps}: reconstruction {history[-1][0]:.4f} "
                f"latent {history[-1][1]:.4f} lr {_lr_at(step, config):.2e} ({time.time() - began:.0f} s)")
        if on_checkpoint and checkpoint_every and (step + 1) % checkpoint_every == 0 and step + 1 < config.steps:
            on_checkpoint(step + 1)
            encoder.train()
            decoder.train()
    encoder.eval()
    decoder.eval()
    tail = history[-max(1, len(history) // 10):] or [(float("nan"), float("nan"))]
    return {"steps": config.steps, "images_seen": config.steps * config.batch_size,
            "seconds": round(time.time() - began, 1),
            "reconstruction_loss": sum(r for r, _ in tail) / len(tail),
            "latent_penalty": sum(g for _, g in tail) / len(tail)}


@torch.no_grad()
def evaluate_autoencoder(encoder: torch.nn.Module, decoder: torch.nn.Module, images: torch.Tensor,
                         batch_size: int = 16) -> dict:
    """Reconstruction quality on whole images: PSNR (dB), mean absolute error, latent mean/std per channel."""
    errors, abs_errors, latents = [], [], []
    for start in range(0, images.shape[0], batch_size):
        batch = images[start:start + batch_size]
        batch = batch.float() / 255 if batch.dtype == torch.uint8 else batch.float()
        z = encoder(batch)
        recon = decoder(z).clamp(0, 1)
        errors.append(((recon - batch) ** 2).flatten(1).mean(1))
        abs_errors.append((recon - batch).abs().flatten(1).mean(1))
        latents.append(z.transpose(0, 1).reshape(z.shape[1], -1))
    mse = torch.cat(errors)
    z = torch.cat(latents, 1)
    return {"psnr_db": float((10 * torch.log10(1.0 / mse.clamp_min(1e-10))).mean()),
            "mae": float(torch.cat(abs_errors).mean()),
            "latent_mean": [round(float(v), 3) for v in z.mean(1)],
            "latent_std": [round(float(v), 3) for v in z.std(1)]}
