"""Validation images of a training run as one PNG grid: one row per prompt, columns
``background, layer 1..N, mask 1..N, composite`` (docs/DESIGN.md 2.1 slot order, composite by the paper's equation).
Rows with fewer layers are padded with grey. Pure torch + PIL."""
from __future__ import annotations

import os
from pathlib import Path
from typing import Sequence

import numpy as np
import torch
from PIL import Image

from ..atomic_file import atomic_path
from ..data.layered_sample import composite
from ..slots import num_foregrounds_from_slots


def layer_row(slots: torch.Tensor) -> torch.Tensor:
    """Decoded slots [S, 3, H, W] in [0, 1] -> [S + 1, 3, H, W]: the slots, then their composite (masks read as the
    mean of RGB, thresholded at 0.5)."""
    n = num_foregrounds_from_slots(slots.shape[0])
    slots = slots.float().clamp(0, 1)
    masks = (slots[1 + n:].mean(dim=1, keepdim=True) >= 0.5).float()
    return torch.cat([slots, composite(slots[0], slots[1:1 + n], masks)[None]])


def grid_image(rows: Sequence[torch.Tensor], pad: int = 2) -> np.ndarray:
    """Rows of images [k_i, 3, H, W] (same H, W) -> uint8 [rows*(H+pad)+pad, cols*(W+pad)+pad, 3]."""
    if not rows:
        raise ValueError("no validation rows to draw")
    h, w = rows[0].shape[-2:]
    cols = max(r.shape[0] for r in rows)
    canvas = torch.full((3, len(rows) * (h + pad) + pad, cols * (w + pad) + pad), 0.5)
    for i, row in enumerate(rows):
        for j, image in enumerate(row):
            top, left = pad + i * (h + pad), pad + j * (w + pad)
            canvas[:, top:top + h, left:left + w] = image.float().clamp(0, 1)
    return (canvas.permute(1, 2, 0).numpy() * 255).round().astype(np.uint8)


def save_grid(path: str | os.PathLike, rows: Sequence[torch.Tensor]) -> Path:
    """Write the grid as a PNG atomically."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    with atomic_path(path) as tmp:
        Image.fromarray(grid_image(rows)).save(tmp, format="PNG")
    return path
