"""Composite guidance: decompose a flat picture into layers (docs/DESIGN.md 2.10).

The picture is encoded into the background and every foreground slot, the sampler denoises partially, and at each
step the predicted clean layers are pulled so that their composite reproduces the picture:

1. read each foreground's mask from its mask slot's predicted clean latent (the SMG read-out);
2. compose the predicted layers in latent space with the paper's equation (masks at latent resolution);
3. give the residual ``picture - composite`` back to the layer each position shows: foreground k gets
   ``w_k = m_k * prod_{j<k} (1 - m_j)`` of it, the background ``prod_k (1 - m_k)`` (``layers.compose.visibility``);
   ``strength`` 1 makes the composite of the corrected layers match the picture wherever the masks are 0 or 1.

Hidden parts (a background behind a foreground, a foreground outside its mask) get nothing: the model draws them.
All tensors are ``(b s)`` rows ``[B*S, C, h, w]``; ``picture`` is ``[B, C, h, w]`` in the same latent space.
"""
from __future__ import annotations

import torch

from ..layers.compose import blend, visibility
from ..slots import pack, unpack


def composite_latent(x0: torch.Tensor, masks: torch.Tensor, num_foregrounds: int) -> torch.Tensor:
    """The layers of ``x0`` composed with ``masks`` [B, N, 1, h, w] -> [B, C, h, w]."""
    background, foregrounds, _ = unpack(x0, num_foregrounds)
    return blend(background, foregrounds, masks.to(x0.dtype), dim=1)


def pull_to_picture(x0: torch.Tensor, masks: torch.Tensor, num_foregrounds: int, picture: torch.Tensor,
                    strength: float) -> torch.Tensor:
    """``x0`` with its visible layer content moved ``strength`` of the way to ``picture`` (mask slots unchanged)."""
    background, foregrounds, mask_latents = unpack(x0, num_foregrounds)
    fg_weights, bg_weight = visibility(masks.to(x0.dtype), dim=1)  # [B, N, 1, h, w], [B, 1, h, w]
    residual = picture.to(x0.dtype) - ((fg_weights * foregrounds).sum(dim=1) + bg_weight * background)  # blend's sum
    background = background + strength * bg_weight * residual
    foregrounds = foregrounds + strength * fg_weights * residual[:, None]
    return pack(background, foregrounds, mask_latents)
