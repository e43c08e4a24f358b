"""A layered training sample in memory, its composite and its checks (docs/DESIGN.md 2.6).

A layered sample is a global prompt, a background prompt, N foreground prompts (depth order, fg_1 = top) and
the layer images. In memory (:class:`LayeredSample`) every image is a float32 tensor in [0, 1] (ComfyUI's IMAGE
range; use ``2*x - 1`` for a diffusers-style VAE): background [3,H,W], foregrounds [N,3,H,W], masks [N,1,H,W]
with values exactly 0 or 1. The layers composite as ``I = sum_k M_k*F_k*prod_{j<k}(1-M_j) + B*prod_k(1-M_k)``
(:func:`.compose.blend`). On disk: :mod:`.sample_files` (folders) and :mod:`.dataset_shards` (tar shards).
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import torch

from ..layers.compose import blend


@dataclass
class LayeredSample:
    """One layered sample; images float32 in [0, 1], masks exactly 0/1. ``meta`` is free JSON (ground truth)."""

    global_prompt: str
    background_prompt: str
    foreground_prompts: list[str]
    background: torch.Tensor  # [3, H, W]
    foregrounds: torch.Tensor  # [N, 3, H, W]
    masks: torch.Tensor  # [N, 1, H, W]
    composite: torch.Tensor | None = None  # [3, H, W], as stored; see :func:`composite`
    meta: dict[str, Any] = field(default_factory=dict)
    key: str = ""

    @property
    def num_foregrounds(self) -> int:
        return int(self.foregrounds.shape[0])

    @property
    def size(self) -> tuple[int, int]:
        """(H, W)."""
        return int(self.background.shape[-2]), int(self.background.shape[-1])

    @property
    def layer_prompts(self) -> list[str]:
        """[background, fg_1 .. fg_N]: index i is the prompt of layer i (slots.slot_prompt_index)."""
        return [self.background_prompt, *self.foreground_prompts]

    def composed(self) -> torch.Tensor:
        """The whole image the layers make, [3, H, W]."""
        return composite(self.background, self.foregrounds, self.masks)


def composite(background: torch.Tensor, foregrounds: torch.Tensor, masks: torch.Tensor) -> torch.Tensor:
    """``I = sum_k M_k*F_k*prod_{j<k}(1-M_j) + B*prod_k(1-M_k)``, k = 1 the top layer.

    background [..., C, H, W], foregrounds [..., N, C, H, W], masks [..., N, 1, H, W]  ->  [..., C, H, W].
    """
    return blend(background, foregrounds, masks, dim=-4)  # layers along the N axis, channel-first


def check_prompts(global_prompt: Any, background_prompt: Any, foreground_prompts: Any) -> list[str]:
    """Problems of the three prompt fields (as read from sample.json: any type); empty when all are usable."""
    problems = []
    for name, value in (("global_prompt", global_prompt), ("background_prompt", background_prompt)):
        if not isinstance(value, str):
            problems.append(f"{name} is missing or not a string")
        elif not value.strip():
            problems.append(f"{name} is empty")
    if not isinstance(foreground_prompts, list):
        problems.append("foreground_prompts is missing or not a list")
    else:
        for k, value in enumerate(foreground_prompts, 1):
            if not isinstance(value, str) or not value.strip():
                problems.append(f"foreground prompt {k} is empty or not a string")
    return problems


def check_sample(sample: LayeredSample) -> list[str]:
    """Problems of an in-memory sample (shapes, value ranges, prompts); empty when it can be written."""
    problems = check_prompts(sample.global_prompt, sample.background_prompt, sample.foreground_prompts)
    n = sample.foregrounds.shape[0] if sample.foregrounds.dim() == 4 else -1
    if sample.background.dim() != 3 or sample.background.shape[0] != 3:
        problems.append(f"background must be [3,H,W], found {tuple(sample.background.shape)}")
        return problems
    h, w = sample.size
    if tuple(sample.foregrounds.shape) != (n, 3, h, w) or n < 1:
        problems.append(f"foregrounds must be [N>=1,3,{h},{w}], found {tuple(sample.foregrounds.shape)}")
    if tuple(sample.masks.shape) != (n, 1, h, w):
        problems.append(f"masks must be [{n},1,{h},{w}], found {tuple(sample.masks.shape)}")
    if n != len(sample.foreground_prompts):
        problems.append(f"{len(sample.foreground_prompts)} foreground prompts for {n} foreground layers")
    if sample.masks.numel() and not bool(((sample.masks == 0) | (sample.masks == 1)).all()):
        problems.append("masks must hold only 0 and 1")
    if sample.composite is not None and tuple(sample.composite.shape) != (3, h, w):
        problems.append(f"composite must be [3,{h},{w}], found {tuple(sample.composite.shape)}")
    return problems
