"""Layers <-> composite: the "composable" layered image of LayerDiff (arXiv 2403.11929, Sec. 3).

A layered image is a background B and N foregrounds F_k with masks M_k, k = 1 the top layer. The paper composes
them front to back, each layer showing only where no layer above it covers the pixel:

    I = sum_k M_k * F_k * prod_{j<k} (1 - M_j)  +  B * prod_k (1 - M_k)

Masks are "treated as RGB images": they are generated and VAE-decoded as grey images, and binarized after
decoding. Here they are read back as the mean of RGB and thresholded (or kept soft on request).

Shapes follow ComfyUI: images ``[B, H, W, 3]`` in [0, 1], masks ``[B, H, W]``; per-layer tensors add an N axis after
the batch axis (``[B, N, H, W, 3]``, ``[B, N, H, W]``). Decoded slots arrive as one IMAGE batch ``[B*S, H, W, 3]``
in ``(b s)`` order with ``S = 2N + 1`` slots ``[background, fg_1 .. fg_N, mask_1 .. mask_N]`` (docs/DESIGN.md 2.1).
Pure torch: this module never imports ComfyUI.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Optional, Sequence

import torch

from ..errors import LayoutError
from ..slots import num_slots, pack, unpack


def default_layer_names(num_foregrounds: int) -> list[str]:
    """``["background", "layer 1", .., "layer N"]`` (layer 1 = top)."""
    return ["background"] + [f"layer {i}" for i in range(1, num_foregrounds + 1)]


@dataclass
class LayeredImages:
    """One batch of layered images.

    background [B, H, W, 3], foregrounds [B, N, H, W, 3] (index 0 = top layer), masks [B, N, H, W] in [0, 1];
    names: N + 1 layer names, background first (e.g. the layer prompts). Empty names get default ones.
    """

    background: torch.Tensor
    foregrounds: torch.Tensor
    masks: torch.Tensor
    names: list[str] = field(default_factory=list)

    def __post_init__(self):
        bg, fg, mk = self.background, self.foregrounds, self.masks
        b, h, w = (bg.shape[0], bg.shape[1], bg.shape[2]) if bg.ndim == 4 else (None, None, None)
        ok = (bg.ndim == 4 and bg.shape[-1] == 3 and fg.ndim == 5 and fg.shape[-1] == 3 and mk.ndim == 4
              and tuple(fg.shape[:4]) == (b, fg.shape[1], h, w) and tuple(mk.shape) == tuple(fg.shape[:4])
              and fg.shape[1] >= 1)
        if not ok:
            raise LayoutError(
                f"Layers do not fit together: background {tuple(bg.shape)} must be [B, H, W, 3], foregrounds "
                f"{tuple(fg.shape)} [B, N, H, W, 3] and masks {tuple(mk.shape)} [B, N, H, W] with the same B, H, W "
                "and N >= 1. Connect images of one size and one layered batch."
            )
        n = int(fg.shape[1])
        if not self.names:
            self.names = default_layer_names(n)
        elif len(self.names) != n + 1:
            raise LayoutError(
                f"{len(self.names)} layer names given for a background and {n} foregrounds: expected {n + 1} "
                "names, background first."
            )
        else:
            self.names = [str(x) for x in self.names]

    @property
    def num_foregrounds(self) -> int:
        return int(self.foregrounds.shape[1])

    @property
    def batch_size(self) -> int:
        return int(self.background.shape[0])


def split_decoded_slots(images: torch.Tensor, num_foregrounds: int, binarize: bool = True,
                        threshold: float = 0.5, names: Optional[Sequence[str]] = None) -> LayeredImages:
    """Decoded slots ``[B*S, H, W, C>=3]`` in ``(b s)`` order -> :class:`LayeredImages`.

    Mask slots become ``mean(RGB)``; with ``binarize`` they are ``1`` where the mean is ``>= threshold`` and ``0``
    elsewhere (the paper's binarization), otherwise they stay soft (clamped to [0, 1]).
    """
    s = num_slots(num_foregrounds)
    if num_foregrounds < 1:
        raise LayoutError("A layered image needs at least one foreground layer (num_foregrounds >= 1).")
    if images.ndim != 4 or images.shape[-1] < 3:
        raise LayoutError(f"Decoded slots must be an IMAGE batch [B*S, H, W, 3], got shape {tuple(images.shape)}.")
    if images.shape[0] % s != 0:
        raise LayoutError(
            f"{images.shape[0]} decoded images are not whole layered images of {s} slots (background, "
            f"{num_foregrounds} foregrounds, {num_foregrounds} masks): decode the whole layered latent and do "
            "not cut or re-order the batch."
        )
    rgb = images[..., :3]  # [B*S, H, W, 3]
    background, foregrounds, mask_images = unpack(rgb, num_foregrounds)  # [B,H,W,3], [B,N,H,W,3], [B,N,H,W,3]
    masks = mask_images.mean(dim=-1)  # [B, N, H, W]
    masks = (masks >= threshold).to(images.dtype) if binarize else masks.clamp(0, 1)
    return LayeredImages(background, foregrounds, masks, list(names) if names else [])


def visibility(masks: torch.Tensor, dim: int = 1) -> tuple[torch.Tensor, torch.Tensor]:
    """Weight of every layer in the composite, the layers along ``dim`` (index 0 = top).

    masks [B, N, H, W] -> (weights [B, N, H, W] = M_k * prod_{j<k}(1 - M_j), background [B, H, W] = prod_k(1 - M_k));
    any other layout works the same with ``dim`` its layer axis (the background weight drops that axis).
    """
    keep = 1 - masks  # [B, N, H, W]: how much of what lies below layer k shows through it
    n = keep.shape[dim]
    shifted = torch.cat([torch.ones_like(keep.narrow(dim, 0, 1)), keep.narrow(dim, 0, n - 1)], dim=dim)  # 1, keep_1 ..
    above = torch.cumprod(shifted, dim=dim)  # [B, N, H, W]: prod_{j<k} (1 - M_j), empty product = 1
    return masks * above, keep.prod(dim=dim)  # [B, N, H, W], [B, H, W]


def blend(background: torch.Tensor, foregrounds: torch.Tensor, masks: torch.Tensor, dim: int) -> torch.Tensor:
    """The paper's equation ``I = sum_k M_k*F_k*prod_{j<k}(1-M_j) + B*prod_k(1-M_k)`` in any layout.

    ``dim`` is the layer axis of ``foregrounds`` and ``masks`` (masks broadcast against the foregrounds, e.g. with a
    channel axis of size 1); ``background`` is one layer without that axis. Soft masks allowed.
    """
    weights, background_weight = visibility(masks, dim)  # masks' shape, masks' shape without ``dim``
    return (weights * foregrounds).sum(dim=dim) + background_weight * background


def compose(layers: LayeredImages) -> torch.Tensor:
    """The composite image ``[B, H, W, 3]`` (the paper's equation; soft masks allowed)."""
    dtype = layers.foregrounds.dtype
    masks = layers.masks.to(dtype).unsqueeze(-1)  # [B, N, H, W, 1]: one weight for all three channels
    return blend(layers.background.to(dtype), layers.foregrounds, masks, dim=1)  # [B, H, W, 3]


def to_rgba(layers: LayeredImages) -> torch.Tensor:
    """Foreground layers as RGBA ``[B, N, H, W, 4]``, alpha = mask."""
    alpha = layers.masks.unsqueeze(-1).to(layers.foregrounds.dtype)  # [B, N, H, W, 1]
    return torch.cat([layers.foregrounds, alpha], dim=-1)  # [B, N, H, W, 4]


def rgba_to_layer(rgba: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Inverse of :func:`to_rgba`: RGBA ``[..., H, W, 4]`` -> (rgb ``[..., H, W, 3]``, mask ``[..., H, W]``)."""
    if rgba.shape[-1] != 4:
        raise LayoutError(f"RGBA layers must have 4 channels in the last axis, got shape {tuple(rgba.shape)}.")
    return rgba[..., :3], rgba[..., 3]


def layers_from_rgba(background: torch.Tensor, rgba: torch.Tensor,
                     names: Optional[Sequence[str]] = None) -> LayeredImages:
    """Existing layers -> :class:`LayeredImages`: background [B, H, W, 3(+)], RGBA foregrounds [B, N, H, W, 4]."""
    rgb, masks = rgba_to_layer(rgba)  # [B, N, H, W, 3], [B, N, H, W]
    return LayeredImages(background[..., :3], rgb, masks, list(names) if names else [])


def layers_to_slot_images(layers: LayeredImages) -> torch.Tensor:
    """Inverse of :func:`split_decoded_slots`: ``[B*S, H, W, 3]`` in ``(b s)`` order, each mask as a grey RGB
    image, ready to VAE-encode into a layered latent."""
    dtype = layers.foregrounds.dtype
    masks_rgb = layers.masks.to(dtype).unsqueeze(-1).expand(*layers.masks.shape, 3)  # [B, N, H, W, 3]
    return pack(layers.background.to(dtype), layers.foregrounds, masks_rgb)  # [B*S, H, W, 3]


def layers_from_file_stack(stack_top_first: Sequence[tuple[str, object]]) -> LayeredImages:
    """The layers of a layered file, ``(name, RGBA uint8 [H, W, 4])`` top first (the bottom one is the background)
    -> one :class:`LayeredImages` (B = 1): the background's alpha is dropped, each foreground's alpha is its mask."""
    import numpy as np

    if len(stack_top_first) < 2:
        raise LayoutError(f"A layered file needs a background and at least one layer above it; this one has "
                          f"{len(stack_top_first)} layer(s).")
    arrays = [np.asarray(rgba) for _, rgba in stack_top_first]
    if len({a.shape for a in arrays}) != 1 or arrays[0].ndim != 3 or arrays[0].shape[-1] != 4:
        raise LayoutError("The file's layers are not RGBA images of one canvas size.")
    pixels = torch.from_numpy(np.stack(arrays)).float() / 255.0  # [K, H, W, 4], top first, background last
    names = [str(name) for name, _ in stack_top_first]
    return layers_from_rgba(pixels[-1:], pixels[None, :-1], [names[-1]] + names[:-1])
