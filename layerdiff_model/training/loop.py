"""The LayerDiff training loop (docs/DESIGN.md 2.6): data -> epsilon loss -> optimizer, EMA, checkpoints, logging and
validation grids. Host-free: it talks to the diffusion model only through :class:`TrainableModel`, which the
ComfyUI adapter (``nodes/host/training.py``) implements with ComfyUI's own UNet, VAE and text encoder.

Per micro-batch: VAE-encode every slot (or one composite per sample with ``--composites``), drop all prompts of a
sample with probability ``prompt_dropout`` (empty prompts = the CFG unconditional), draw one DDPM timestep per
sample (shared by its slots) and independent noise per slot, predict the noise and take the MSE over all slots.
All randomness comes from one generator per process, saved in checkpoints, so a resumed run is identical to an
uninterrupted one. Multi-process: launched by torchrun (``RANK``/``WORLD_SIZE``/``LOCAL_RANK``); gradients are
averaged with ``all_reduce`` once per optimizer step.
"""
from __future__ import annotations

import contextlib
import logging
import math
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any, ContextManager, Protocol, Sequence

import torch

from . import state as train_state
from .ema import EMA
from .log import TrainLogger
from ..errors import LayerDiffError
from .config import SCRIPT, TrainConfig, TrainConfigError, check_resume_compatible
from .data import BatchStream, base_model_images, first_prompts, open_dataset, training_images
from ..slots import unpack
from .validation_grid import layer_row, save_grid

LOG = logging.getLogger("LayerDiff.train")


class TrainableModel(Protocol):
    """What the loop needs from a diffusion model. Latents and noise live on ``device``."""

    device: torch.device
    num_timesteps: int

    def trainable_parameters(self) -> list[tuple[str, torch.nn.Parameter]]: ...
    def encode_images(self, images: torch.Tensor) -> torch.Tensor: ...  # [R,3,H,W] in [0,1] -> latents [R,4,h,w]
    def encode_prompts(self, global_prompts: Sequence[str], layer_prompts: Sequence[Sequence[str]] | None) -> Any: ...
    def sigmas(self, timesteps: torch.Tensor) -> torch.Tensor: ...  # per-row noise std of the timesteps
    def noise_latents(self, latents: torch.Tensor, noise: torch.Tensor, timesteps: torch.Tensor) -> torch.Tensor: ...
    def predict_noise(self, noisy: torch.Tensor, timesteps: torch.Tensor, conds: Any) -> torch.Tensor: ...
    def autograd_context(self) -> ContextManager: ...
    def sample_layers(self, global_prompt: str, layer_prompts: Sequence[str] | None, seed: int,
                      steps: int, cfg: float) -> torch.Tensor: ...  # decoded slots [S,3,H,W] in [0,1]
    def export(self, path: str, metadata: dict) -> Path: ...


class TrainingDivergedError(LayerDiffError):
    """The processes of a multi-process run hold different trained tensors."""


@dataclass
class Distributed:
    rank: int = 0
    world_size: int = 1
    local_rank: int = 0

    @property
    def enabled(self) -> bool:
        return self.world_size > 1

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    def barrier(self) -> None:
        if self.enabled:
            torch.distributed.barrier()

    def all_gather(self, obj: Any) -> list[Any]:
        if not self.enabled:
            return [obj]
        out = [None] * self.world_size
        torch.distributed.all_gather_object(out, obj)
        return out

    def average_gradients(self, params: Sequence[torch.nn.Parameter]) -> None:
        """Average the gradients over the processes (one ``all_reduce``). A parameter that took no part in this
        rank's micro-batches (a slot role absent from its bucket, say) but did on another rank joins with zeros,
        so every rank reduces the same tensors in the same order and applies the same update."""
        if not self.enabled:
            return
        device = params[0].device
        used = torch.tensor([p.grad is not None for p in params], dtype=torch.int32, device=device)
        torch.distributed.all_reduce(used)
        for p, n in zip(params, used.tolist()):
            if n and p.grad is None:
                p.grad = torch.zeros_like(p)
        grads = [p.grad for p in params if p.grad is not None]
        if not grads:
            return
        flat = torch.cat([g.reshape(-1) for g in grads])
        torch.distributed.all_reduce(flat)
        flat /= self.world_size
        offset = 0
        for g in grads:
            g.copy_(flat[offset:offset + g.numel()].view_as(g))
            offset += g.numel()

    def check_in_sync(self, named_params: Sequence[tuple[str, torch.nn.Parameter]], step: int) -> None:
        """Raise when the processes no longer hold the same trained tensors: they start equal (same seed) and
        apply the same averaged update, so a difference means the run diverged and its checkpoints would be
        rank 0's alone. Compares one float64 sum per tensor (one small ``all_gather``)."""
        if not self.enabled:
            return
        sums = [float(p.detach().double().sum()) for _, p in named_params]
        for rank, other in enumerate(self.all_gather(sums)):
            for (name, _), mine, theirs in zip(named_params, sums, other):
                if abs(mine - theirs) > 1e-6 * (1.0 + abs(mine)):
                    raise TrainingDivergedError(
                        f"{SCRIPT}: at step {step} process {rank} holds different values of {name} than process "
                        f"{self.rank} ({theirs:.9g} vs {mine:.9g} summed): the processes of this torchrun job "
                        "diverged. Check that every process runs the same code and options on the same ComfyUI "
                        "and checkpoint, then resume from the last checkpoint.")


def distributed_from_env(device_type: str) -> Distributed:
    """torchrun sets RANK/WORLD_SIZE/LOCAL_RANK; initialise the process group (NCCL on CUDA, else Gloo)."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world <= 1:
        return Distributed()
    if not torch.distributed.is_initialized():
        torch.distributed.init_process_group(backend="nccl" if device_type == "cuda" else "gloo")
    return Distributed(torch.distributed.get_rank(), world, int(os.environ.get("LOCAL_RANK", "0")))


def lr_lambda(config: TrainConfig):
    def factor(step: int) -> float:
        if config.lr_warmup and step < config.lr_warmup:
            return (step + 1) / config.lr_warmup
        if config.lr_schedule == "cosine":
            span = max(1, config.steps - config.lr_warmup)
            return 0.5 * (1 + math.cos(math.pi * min(1.0, (step - config.lr_warmup) / span)))
        return 1.0
    return factor


def mask_readout_loss(readout: torch.nn.Module, latents: torch.Tensor, images: torch.Tensor, num_foregrounds: int
                      ) -> torch.Tensor:
    """MSE between the mask read-out of the clean mask-slot latents and the true masks at latent resolution
    (docs/DESIGN.md 2.4: the read-out that self-mask guidance uses is trained with the modules)."""
    _, _, mask_latents = unpack(latents, num_foregrounds)  # [B, N, C, h, w]
    _, _, mask_images = unpack(images, num_foregrounds)  # [B, N, 3, H, W]
    h = mask_latents.shape[-2]
    target = torch.nn.functional.adaptive_avg_pool2d(mask_images.float().mean(2, keepdim=True).flatten(0, 1), h)
    pred = readout(mask_latents.flatten(0, 1))
    return torch.nn.functional.mse_loss(pred.float(), target)


def autocast_context(config: TrainConfig, device: torch.device) -> ContextManager:
    if config.mixed_precision == "no":
        return contextlib.nullcontext()
    dtype = torch.float16 if config.mixed_precision == "fp16" else torch.bfloat16
    return torch.autocast(device_type=device.type, dtype=dtype)


def layers_ahead_of_masks(timesteps: torch.Tensor, num_foregrounds: int, prob: float, gen: torch.Generator
                          ) -> torch.Tensor:
    """Per-slot timesteps ``[b*S]`` (one per sample, repeated over its S = 2N+1 slots) -> the same with, for each
    sample with probability ``prob``, its background and foreground slots at a timestep drawn uniformly in
    ``[0, t]`` while its mask slots keep ``t`` (docs/DESIGN.md 2.8).

    A mask is a function of its foreground, but at one shared timestep the mask's own noisy latent is the clearer
    signal, so mask slots learn to ignore their foregrounds. With the layers ahead, reading the foreground is the
    way to a low mask loss. Sampling still uses one timestep for all slots.
    """
    slots = 2 * num_foregrounds + 1
    per_sample = timesteps.view(-1, slots)  # [b, S]
    b = per_sample.shape[0]
    picked = torch.rand(b, generator=gen) < prob
    ahead = (torch.rand(b, generator=gen) * (per_sample[:, 0].float() + 1)).floor().long().clamp(max=per_sample[:, 0])
    out = per_sample.clone()
    layer_slots = slice(0, num_foregrounds + 1)
    out[:, layer_slots] = torch.where(picked[:, None], ahead[:, None], per_sample[:, layer_slots])
    return out.reshape(-1)


def epsilon_loss(pred: torch.Tensor, noise: torch.Tensor, sigmas: torch.Tensor | None = None,
                 min_snr_gamma: float = 0.0, high_noise_weight: float = 0.0) -> torch.Tensor:
    """Epsilon MSE over all rows, optionally weighted per row by the row's ``sigmas``.

    In terms of the error of the predicted clean latent (x0 = x - sigma * eps, so x0-MSE = sigma^2 * eps-MSE, and
    SNR = 1 / sigma^2) the plain epsilon loss weights x0 errors by SNR. The weight used here is
    ``min(SNR, gamma) + high_noise_weight`` in x0 terms, i.e. per-row eps-MSE times
    ``min(1, gamma * sigma^2) + high_noise_weight * sigma^2``:
    - ``min_snr_gamma`` > 0 caps the weight of nearly clean rows (Min-SNR weighting, Hang et al. 2023);
    - ``high_noise_weight`` > 0 keeps x0 errors of very noisy rows from vanishing (1 = the weighting of the
      v-prediction objective, ``SNR + 1``). Plain SNR weighting leaves the steps where a sampler lays out the
      image almost untrained on a small model: its x0 predictions there end up worse than predicting the mean.
    """
    if sigmas is None or (min_snr_gamma <= 0 and high_noise_weight <= 0):
        return torch.nn.functional.mse_loss(pred, noise)
    per_row = ((pred - noise) ** 2).flatten(1).mean(1)
    sigma2 = sigmas.float() ** 2
    weight = (min_snr_gamma * sigma2).clamp(max=1.0) if min_snr_gamma > 0 else torch.ones_like(sigma2)
    weight = weight + high_noise_weight * sigma2
    return (per_row * weight).mean()


class Trainer:
    def __init__(self, config: TrainConfig, model: TrainableModel, dist: Distributed | None = None, dataset=None):
        self.config, self.model, self.dist = config, model, dist or Distributed()
        self.run_dir = Path(config.run_dir)
        self.named_params = list(model.trainable_parameters())
        if not self.named_params:
            raise TrainConfigError(f"{SCRIPT}: nothing to train (--train {config.train} selected no parameters).")
        self.params = [p for _, p in self.named_params]
        self.optimizer = torch.optim.AdamW(self.params, lr=config.lr, weight_decay=config.weight_decay)
        self.scheduler = torch.optim.lr_scheduler.LambdaLR(self.optimizer, lr_lambda(config))
        use_scaler = config.mixed_precision == "fp16" and model.device.type == "cuda"
        self.scaler = torch.amp.GradScaler("cuda", enabled=use_scaler)
        self.ema = EMA(self.named_params, config.ema_decay) if config.ema_decay > 0 else None
        self.generator = torch.Generator().manual_seed(config.seed * 1_000_003 + self.dist.rank)
        self.dataset = dataset if dataset is not None else open_dataset(config.data, config.resolution, config.seed,
                                                                        self.dist.rank, self.dist.world_size)
        self.stream = BatchStream(self.dataset, config.batch_size, config.seed, self.dist.rank, self.dist.world_size,
                                  config.workers)
        self.step = 0
        self.last_loss = self.last_mask_loss = float("nan")

    # ------------------------------------------------------------------------------------------- one step
    def micro_step(self, batch: dict[str, Any]) -> float:
        """Forward and backward of one micro-batch; returns its epsilon loss (``last_mask_loss`` holds the
        mask read-out loss). A host that mutates tensors saved for backward makes the first micro-step fail: the
        model switches to mutation-safe autograd (``use_mutation_safe_autograd``) and the micro-step is repeated
        with the same random draws, so the run is the same as if it had started that way."""
        state = self.generator.get_state()
        try:
            return self._micro_step(batch)
        except RuntimeError as exc:
            switch = getattr(self.model, "use_mutation_safe_autograd", None)
            if "modified by an inplace operation" not in str(exc) or switch is None or not switch():
                raise
            LOG.warning("The host modified a tensor saved for backward; repeating this step and continuing with "
                        "mutation-safe autograd (exact; speed differs by model size).")
            self.generator.set_state(state)
            for p in self.params:
                p.grad = None
            return self._micro_step(batch)

    def _micro_step(self, batch: dict[str, Any]) -> float:
        cfg, model, gen = self.config, self.model, self.generator
        if cfg.composites:  # base model: every image is its own sample
            images, prompts = base_model_images(batch, cfg.layer_images)
            rows = 1
        else:
            (images, rows), prompts = training_images(batch, False), batch["global_prompts"]
        b = len(prompts)
        drop = (torch.rand(b, generator=gen) < cfg.prompt_dropout).tolist()
        timesteps = torch.randint(0, model.num_timesteps, (b,), generator=gen).repeat_interleave(rows)
        if cfg.mask_follow_prob > 0 and not cfg.composites:
            timesteps = layers_ahead_of_masks(timesteps, batch["num_foregrounds"], cfg.mask_follow_prob, gen)
        with torch.no_grad():
            latents = model.encode_images(images.to(model.device))
        noise = torch.randn(latents.shape, generator=gen, dtype=torch.float32).to(model.device)
        global_prompts = ["" if d else p for d, p in zip(drop, prompts)]
        layer_prompts = None if cfg.composites else [[""] * len(lp) if d else list(lp)
                                                     for d, lp in zip(drop, batch["layer_prompts"])]
        timesteps = timesteps.to(model.device)
        with model.autograd_context():
            with autocast_context(cfg, model.device):
                conds = model.encode_prompts(global_prompts, layer_prompts)
                noisy = model.noise_latents(latents, noise, timesteps)
                pred = model.predict_noise(noisy, timesteps, conds)
            weighted = cfg.min_snr_gamma > 0 or cfg.high_noise_weight > 0
            loss = epsilon_loss(pred.float(), noise, model.sigmas(timesteps) if weighted else None,
                                cfg.min_snr_gamma, cfg.high_noise_weight)
            total = loss
            readout = getattr(model, "mask_readout", None)
            if readout is not None and not cfg.composites and cfg.mask_loss_weight > 0:
                mask_loss = mask_readout_loss(readout, latents, images.to(latents.device), batch["num_foregrounds"])
                total = loss + cfg.mask_loss_weight * mask_loss
                self.last_mask_loss = float(mask_loss.detach())
            self.scaler.scale(total / cfg.grad_accum).backward()
        return float(loss.detach())

    def optimizer_step(self) -> None:
        self.dist.average_gradients(self.params)
        self.scaler.unscale_(self.optimizer)
        if self.config.max_grad_norm > 0:
            torch.nn.utils.clip_grad_norm_(self.params, self.config.max_grad_norm)
        self.scaler.step(self.optimizer)
        self.scaler.update()
        self.scheduler.step()
        self.optimizer.zero_grad(set_to_none=True)
        if self.ema is not None:
            self.ema.update()

    # ------------------------------------------------------------------------------------------- state
    def state_dict(self) -> dict[str, Any]:
        return {
            "config": self.config.to_dict(),
            "trainable": {k: p.detach().cpu().clone() for k, p in self.named_params},
            "optimizer": self.optimizer.state_dict(),
            "scheduler": self.scheduler.state_dict(),
            "scaler": self.scaler.state_dict(),
            "ema": self.ema.state_dict() if self.ema else None,
            "data": self.dist.all_gather(self.stream.state_dict()),
            "rng": self.dist.all_gather(train_state.capture_rng(self.generator)),
            "skipped": self.stream.skipped,
            "world_size": self.dist.world_size,
        }

    def load_state_dict(self, state: dict[str, Any], source: str) -> None:
        check_resume_compatible(state["config"], self.config, source)
        if state.get("world_size", 1) != self.dist.world_size:
            raise TrainConfigError(f"{SCRIPT}: {source} was written by {state.get('world_size')} processes, this run "
                                   f"has {self.dist.world_size}; resume with the same number of processes.")
        saved = state["trainable"]
        missing = [k for k, _ in self.named_params if k not in saved]
        if missing:
            raise TrainConfigError(f"{SCRIPT}: {source} lacks trained tensors such as {missing[:3]}: it is from "
                                   "another model or --train mode; use a new --run-dir.")
        with torch.no_grad():
            for k, p in self.named_params:
                p.copy_(saved[k])
        self.optimizer.load_state_dict(state["optimizer"])
        self.scheduler.load_state_dict(state["scheduler"])
        self.scaler.load_state_dict(state["scaler"])
        if self.ema is not None:
            self.ema.load_state_dict(state["ema"])
        self.stream.load_state_dict(state["data"][self.dist.rank])
        train_state.restore_rng(state["rng"][self.dist.rank], self.generator)
        self.step = int(state["step"])

    def save(self) -> None:
        self.dist.check_in_sync(self.named_params, self.step)  # collective, like state_dict()
        state = self.state_dict()  # collective: every rank takes part
        if self.dist.is_main:
            path = train_state.save_checkpoint(self.run_dir, self.step, state, self.config.keep_checkpoints)
            LOG.info("step %d: checkpoint %s", self.step, path)
        self.dist.barrier()

    def maybe_resume(self) -> None:
        latest = train_state.latest_checkpoint(self.run_dir)
        if latest is None:
            if self.config.resume:
                LOG.info("--resume: no checkpoint in %s yet, starting from step 0", self.run_dir)
            return
        if not self.config.resume:
            raise TrainConfigError(f"{SCRIPT}: {self.run_dir} already holds checkpoints (newest {latest.name}). Pass "
                                   "--resume to continue that run, or choose a new --run-dir.")
        self.load_state_dict(train_state.load_checkpoint(latest), str(latest))
        LOG.info("Resumed from %s at step %d", latest, self.step)

    # ------------------------------------------------------------------------------------------- outputs
    def validate(self) -> Path | None:
        cfg = self.config
        if not self.dist.is_main:
            return None
        rows = []
        with (self.ema.swapped() if self.ema else contextlib.nullcontext()), torch.no_grad():
            for i, (glob, layers) in enumerate(first_prompts(self.dataset, cfg.validation_samples)):
                slots = self.model.sample_layers(glob, None if cfg.composites else layers, cfg.seed + i,
                                                 cfg.validation_steps, cfg.validation_cfg)
                rows.append(slots.cpu() if cfg.composites else layer_row(slots.cpu()))
        path = save_grid(self.run_dir / "validation" / f"step-{self.step:08d}.png", rows)
        LOG.info("step %d: validation grid %s", self.step, path)
        return path

    def export(self) -> Path | None:
        if not self.dist.is_main:
            return None
        meta = {"trained_steps": self.step, "train_mode": self.config.train, "seed": self.config.seed,
                "base_checkpoint": Path(self.config.checkpoint).name, "ema": bool(self.ema),
                "skipped_samples": self.stream.skipped}
        with self.ema.swapped() if self.ema else contextlib.nullcontext():
            path = self.model.export(self.config.out, meta)
        LOG.info("Wrote %s", path)
        return path

    # ------------------------------------------------------------------------------------------- the loop
    def run(self) -> dict[str, Any]:
        cfg = self.config
        self.maybe_resume()
        resumed_at = self.step
        logger = TrainLogger(self.run_dir, self.dist.is_main, resumed_at if cfg.resume else None)
        end = min(cfg.steps, cfg.stop_after) if cfg.stop_after else cfg.steps
        bar = _progress(cfg, self.dist, self.step)
        batches = iter(self.stream)
        self.optimizer.zero_grad(set_to_none=True)
        try:
            while self.step < end:
                losses = [self.micro_step(next(batches)) for _ in range(cfg.grad_accum)]
                self.optimizer_step()
                self.step += 1
                self.last_loss = sum(losses) / len(losses)
                lr = self.scheduler.get_last_lr()[0]
                if bar is not None:
                    bar.update(1)
                    bar.set_postfix(loss=f"{self.last_loss:.4f}", lr=f"{lr:.2e}", skipped=self.stream.skipped)
                if self.step % cfg.log_every == 0 or self.step == end:
                    logger.log(self.step, loss=self.last_loss, mask_loss=self.last_mask_loss, lr=lr, skipped=self.stream.skipped,
                               epoch=self.stream.epoch)
                if cfg.validate_every and self.step % cfg.validate_every == 0:
                    self.validate()
                if (cfg.checkpoint_every and self.step % cfg.checkpoint_every == 0) or self.step == end:
                    self.save()
        finally:
            if bar is not None:
                bar.close()
            logger.close()
        out = self.export()
        if self.stream.skipped:
            LOG.warning("%d bad dataset samples were skipped (see the warnings above)", self.stream.skipped)
        return {"step": self.step, "resumed_at": resumed_at, "finished": self.step >= cfg.steps, "out": out,
                "loss": self.last_loss, "skipped": self.stream.skipped}


def _progress(config: TrainConfig, dist: Distributed, initial: int):
    if not (config.progress and dist.is_main):
        return None
    try:
        from tqdm import tqdm
    except ImportError:
        return None
    return tqdm(total=config.steps, initial=initial, desc="LayerDiff training", unit="step", dynamic_ncols=True)
