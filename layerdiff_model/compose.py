"""Layers <-> composite (LayerDiff paper, Sec. 3.1 "composable" layered images).

A layered image is a background B and N foregrounds F_k with masks M_k, k = 1 the top layer. They compose as

    I = sum_k M_k * F_k * prod_{j<k} (1 - M_j)  +  B * prod_k (1 - M_k)

Shapes follow ComfyUI: images ``[B, H, W, 3]`` in [0, 1], masks ``[B, H, W]``; per-layer tensors add an N axis
after the batch axis. Decoded slots arrive as ``[B*S, H, W, 3]`` in ``(b s)`` order (DESIGN.md 2.1); mask slots
are grey images, read back as the mean of RGB and binarized (paper: masks are binarized after decoding).
"""
from __future__ import annotations

from dataclasses import dataclass, field

import torch

from .errors import LayoutError
from .slots import num_slots, pack, unpack


@dataclass
class LayeredImages:
    """background [B, H, W, 3], foregrounds [B, N, H, W, 3], masks [B, N, H, W]; names: background first."""

    background: torch.Tensor
    foregrounds: torch.Tensor
    masks: torch.Tensor
    names: list[str] = field(default_factory=list)

    @property
    def num_foregrounds(self) -> int:
        return int(self.foregrounds.shape[1])


def split_decoded_slots(images: torch.Tensor, num_foregrounds: int, binarize: bool = True,
                        threshold: float = 0.5) -> LayeredImages:
    """Decoded slots [B*S, H, W, 3] -> LayeredImages."""
    s = num_slots(num_foregrounds)
    if images.shape[0] % s != 0:
        raise LayoutError(
            f"{images.shape[0]} decoded images are not whole layered images of {s} slots (background, "
            f"{num_foregrounds} foregrounds, {num_foregrounds} masks): decode the whole layered latent."
        )
    background, foregrounds, mask_images = unpack(images[..., :3], num_foregrounds)  # [B,H,W,3], [B,N,H,W,3] x2
    masks = mask_images.mean(dim=-1)  # [B, N, H, W]
    masks = (masks >= threshold).to(images.dtype) if binarize else masks.clamp(0, 1)
    names = ["background"] + [f"layer {i}" for i in range(1, num_foregrounds + 1)]
    return LayeredImages(background, foregrounds, masks, names)


def visibility(masks: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-layer visible weight and the background's weight.

    masks [B, N, H, W] -> weights [B, N, H, W] = M_k * prod_{j<k}(1 - M_j), background [B, H, W] = prod_k(1 - M_k).
    """
    keep = 1 - masks  # [B, N, H, W]
    above = torch.cumprod(torch.cat([torch.ones_like(keep[:, :1]), keep[:, :-1]], dim=1), dim=1)  # prod_{j<k}
    return masks * above, keep.prod(dim=1)


def compose(layers: LayeredImages) -> torch.Tensor:
    """The composite image [B, H, W, 3]."""
    weights, background_weight = visibility(layers.masks.to(layers.foregrounds.dtype))
    fg = (weights.unsqueeze(-1) * layers.foregrounds).sum(dim=1)  # [B, H, W, 3]
    return fg + background_weight.unsqueeze(-1) * layers.background


def to_rgba(layers: LayeredImages) -> torch.Tensor:
    """Foreground layers as RGBA [B, N, H, W, 4], alpha = mask."""
    return torch.cat([layers.foregrounds, layers.masks.unsqueeze(-1).to(layers.foregrounds.dtype)], dim=-1)


def rgba_to_layer(rgba: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """RGBA [..., H, W, 4] -> (rgb [..., H, W, 3], mask [..., H, W])."""
    return rgba[..., :3], rgba[..., 3]


def layers_to_slot_images(layers: LayeredImages) -> torch.Tensor:
    """Inverse of :func:`split_decoded_slots`: [B*S, H, W, 3] with masks as grey RGB images, ready to VAE-encode
    into a layered latent."""
    masks_rgb = layers.masks.unsqueeze(-1).expand(*layers.masks.shape, 3).to(layers.foregrounds.dtype)
    return pack(layers.background, layers.foregrounds, masks_rgb)
