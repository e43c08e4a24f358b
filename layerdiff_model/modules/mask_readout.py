"""Latent -> mask read-out used by self-mask guidance (docs/DESIGN.md 2.4).

Masks are encoded as grey RGB images (paper: masks are "treated as RGB images"), so a mask slot's clean latent
maps almost linearly to its grey level. The read-out is a 1x1 convolution ``[*, 4, h, w] -> [*, 1, h, w]``
initialised from SD1.5's latent->RGB preview factors averaged over RGB (grey = mean), then trained with the other
modules. Output is clamped to [0, 1].
"""
from __future__ import annotations

import torch
from torch import nn

# SD1.5 latent -> RGB factors (the same linear preview ComfyUI and A1111 use), rows = latent channels.
SD15_LATENT_RGB_FACTORS = (
    (0.3512, 0.2297, 0.3227),
    (0.3250, 0.4974, 0.2350),
    (-0.2829, 0.1762, 0.2721),
    (-0.2120, -0.2616, -0.7177),
)


class MaskReadout(nn.Module):
    def __init__(self, latent_channels: int = 4, dtype=None, device=None, operations=nn):
        super().__init__()
        self.proj = operations.Conv2d(latent_channels, 1, kernel_size=1, dtype=dtype, device=device)

    @torch.no_grad()
    def reset_parameters_from_preview_factors(self) -> None:
        """grey in [-1, 1] = mean_rgb(latent @ factors); mask = (grey + 1) / 2."""
        weight = torch.zeros_like(self.proj.weight)  # [1, C, 1, 1]
        if weight.shape[1] == len(SD15_LATENT_RGB_FACTORS):
            grey = torch.tensor([sum(row) / 3.0 for row in SD15_LATENT_RGB_FACTORS])
            weight[0, :, 0, 0] = grey * 0.5
        self.proj.weight.copy_(weight)
        self.proj.bias.fill_(0.5)

    def forward(self, latent: torch.Tensor) -> torch.Tensor:
        """latent [B, C, h, w] -> mask [B, 1, h, w] in [0, 1]."""
        return self.proj(latent.to(self.proj.weight.dtype)).clamp(0.0, 1.0).to(latent.dtype)
