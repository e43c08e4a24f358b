"""Self-mask guidance, SMG (LayerDiff paper Sec. 3.4; our formulation in docs/DESIGN.md 2.4).

SAG-style guidance whose degradation map is the model's *own* mask prediction instead of self-attention:

1. read each foreground's mask from the predicted clean latent of its mask slot (``MaskReadout``);
2. blur each foreground slot's predicted clean latent (uncond branch) inside its mask, leave other slots alone;
3. re-noise the degraded latent with the same noise the sampler's current latent carries;
4. the host runs one unconditional pass on it; guidance adds ``scale * (uncond - degraded_pred)``.

Scale 0 is plain CFG exactly (the host skips the extra pass). All tensors are ``(b s)`` rows ``[B*S, C, h, w]``.
"""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F

from ..modules.mask_readout import MaskReadout
from ..slots import pack, unpack


def gaussian_blur(x: torch.Tensor, sigma: float) -> torch.Tensor:
    """Separable Gaussian blur with replicate padding. x [R, C, h, w] -> same shape."""
    if sigma <= 0:
        return x
    radius = max(1, math.ceil(3 * sigma))
    t = torch.arange(-radius, radius + 1, device=x.device, dtype=torch.float32)
    kernel = torch.exp(-0.5 * (t / sigma) ** 2)
    kernel = (kernel / kernel.sum()).to(x.dtype)
    c = x.shape[1]
    kx = kernel.view(1, 1, 1, -1).expand(c, 1, 1, -1)  # [C, 1, 1, k]
    ky = kernel.view(1, 1, -1, 1).expand(c, 1, -1, 1)  # [C, 1, k, 1]
    x = F.conv2d(F.pad(x, (radius, radius, 0, 0), mode="replicate"), kx, groups=c)
    return F.conv2d(F.pad(x, (0, 0, radius, radius), mode="replicate"), ky, groups=c)


def read_masks(x0: torch.Tensor, num_foregrounds: int, readout: MaskReadout) -> torch.Tensor:
    """Predicted clean latents [B*S, C, h, w] -> foreground masks [B, N, 1, h, w] in [0, 1]."""
    _, _, mask_latents = unpack(x0, num_foregrounds)  # [B, N, C, h, w]
    b, n = mask_latents.shape[:2]
    masks = readout(mask_latents.flatten(0, 1))  # [(b n), 1, h, w]
    return masks.view(b, n, 1, *masks.shape[-2:])


def degrade_foregrounds(x0: torch.Tensor, masks: torch.Tensor, num_foregrounds: int, blur_sigma: float) -> torch.Tensor:
    """Blur each foreground slot inside its mask. x0 [B*S, C, h, w], masks [B, N, 1, h, w] -> [B*S, C, h, w]."""
    background, foregrounds, mask_latents = unpack(x0, num_foregrounds)  # [B, C..], [B, N, C..], [B, N, C..]
    blurred = gaussian_blur(foregrounds.flatten(0, 1), blur_sigma).view_as(foregrounds)
    m = masks.to(x0.dtype)
    degraded = foregrounds * (1 - m) + blurred * m
    return pack(background, degraded, mask_latents)


def degraded_model_input(x: torch.Tensor, uncond_x0: torch.Tensor, degraded_x0: torch.Tensor) -> torch.Tensor:
    """Re-noise the degraded clean latent with the noise that ``x`` carries: x - uncond_x0 (as SAG does)."""
    return degraded_x0 + (x - uncond_x0)


def apply_guidance(cfg_x0: torch.Tensor, uncond_x0: torch.Tensor, degraded_pred_x0: torch.Tensor,
                   scale: float) -> torch.Tensor:
    """cfg + scale * (uncond - degraded_pred)."""
    return cfg_x0 + (uncond_x0 - degraded_pred_x0) * scale
