"""Composite guidance: decompose a flat picture into layers (docs/DESIGN.md 2.10).

The picture is encoded into the background and every foreground slot, the sampler denoises partially, and at each
step the predicted clean layers are pulled so that their composite reproduces the picture:

1. read each foreground's mask from its mask slot's predicted clean latent (the SMG read-out);
2. compose the predicted layers in latent space with the paper's equation (masks at latent resolution);
3. give the residual ``picture - composite`` back to the layer each position shows: foreground k gets
   ``w_k = m_k * prod_{j<k} (1 - m_j)`` of it, the background ``prod_k (1 - m_k)``; ``strength`` 1 makes the
   composite of the corrected layers match the picture wherever the masks are 0 or 1.

Hidden parts (a background behind a foreground, a foreground outside its mask) get nothing: the model draws them.
All tensors are ``(b s)`` rows ``[B*S, C, h, w]``; ``picture`` is ``[B, C, h, w]`` in the same latent space.
"""
from __future__ import annotations

import torch

from ..slots import pack, unpack


def visibility_weights(masks: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Foreground masks [B, N, 1, h, w] (index 0 = top) -> (foreground weights [B, N, 1, h, w], background weight
    [B, 1, h, w]): how much of each position each layer shows in the composite."""
    uncovered = torch.ones_like(masks[:, 0])
    weights = []
    for k in range(masks.shape[1]):
        weights.append(masks[:, k] * uncovered)
        uncovered = uncovered * (1 - masks[:, k])
    return torch.stack(weights, dim=1), uncovered


def composite_latent(x0: torch.Tensor, masks: torch.Tensor, num_foregrounds: int) -> torch.Tensor:
    """The layers of ``x0`` composed with ``masks`` -> [B, C, h, w]."""
    background, foregrounds, _ = unpack(x0, num_foregrounds)
    fg_weights, bg_weight = visibility_weights(masks.to(x0.dtype))
    return background * bg_weight + (foregrounds * fg_weights).sum(dim=1)


def pull_to_picture(x0: torch.Tensor, masks: torch.Tensor, num_foregrounds: int, picture: torch.Tensor,
                    strength: float) -> torch.Tensor:
    """``x0`` with its visible layer content moved ``strength`` of the way to ``picture`` (mask slots unchanged)."""
    background, foregrounds, mask_latents = unpack(x0, num_foregrounds)
    fg_weights, bg_weight = visibility_weights(masks.to(x0.dtype))
    residual = picture.to(x0.dtype) - (background * bg_weight + (foregrounds * fg_weights).sum(dim=1))
    background = background + strength * bg_weight * residual
    foregrounds = foregrounds + strength * fg_weights * residual[:, None]
    return pack(background, foregrounds, mask_latents)
