"""Layer prompts as per-slot context rows (docs/DESIGN.md 2.1, 2.2, 4 "per-slot prompts ride on conditioning").

A layered conditioning keeps the global prompt as the ordinary cross-attention context (so ControlNet, area
and mask conditioning keep working) and carries the layer prompts next to it as one context row per slot:
``[S, t, d]`` with row s = the prompt slot s reads (mask i reads foreground i's prompt). The host tiles these rows
to the batch as ``r % S``, which is exactly the ``(b s)`` row order.

Prompts of different token lengths (ComfyUI encodes long prompts as several 77-token windows) are brought to a
common length by repeating each prompt's whole token sequence, which leaves softmax attention unchanged.
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field, replace

import torch

from ..errors import LayoutError
from ..slots import slot_prompt_index


@dataclass(frozen=True)
class LayerPrompts:
    """What a layered conditioning knows about its layers.

    prompts: [background, fg_1 .. fg_N] texts; embeds: matching token embeddings, each [1, t_i, d];
    enhanced: whether the layer prompt enhancer has already been applied.
    """

    prompts: tuple[str, ...]
    embeds: tuple[torch.Tensor, ...] = field(repr=False)
    enhanced: bool = False

    @property
    def num_foregrounds(self) -> int:
        return len(self.prompts) - 1

    def with_embeds(self, embeds, enhanced: bool) -> "LayerPrompts":
        return replace(self, embeds=tuple(embeds), enhanced=enhanced)


def parse_foreground_prompts(text: str) -> list[str]:
    """One foreground prompt per non-empty line, top layer first."""
    return [line.strip() for line in text.splitlines() if line.strip()]


def repeat_to_length(tokens: torch.Tensor, length: int) -> torch.Tensor:
    """[1, t, d] -> [1, length, d] by whole-sequence repetition (length must be a multiple of t)."""
    t = tokens.shape[1]
    if length % t != 0:
        raise LayoutError(f"Cannot bring a prompt of {t} tokens to {length} tokens by repetition.")
    return tokens.repeat(1, length // t, 1)


def common_token_length(embeds) -> int:
    return math.lcm(*(int(e.shape[1]) for e in embeds))


def stack_layer_embeds(embeds) -> torch.Tensor:
    """list of [1, t_i, d] -> [L, T, d] with T = lcm(t_i)."""
    length = common_token_length(embeds)
    return torch.cat([repeat_to_length(e, length) for e in embeds], dim=0)


def slot_context_rows(layers: LayerPrompts) -> torch.Tensor:
    """Per-slot context rows [S, T, d] in slot order [background, fg_1..fg_N, mask_1..mask_N]."""
    stacked = stack_layer_embeds(layers.embeds)  # [N+1, T, d]
    index = torch.tensor(slot_prompt_index(layers.num_foregrounds), device=stacked.device)
    return stacked[index]  # [S, T, d]


def distinct_rows(rows: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """[R, T, d] -> (distinct rows [U, T, d], index [R]) with ``distinct[index] == rows`` exactly.

    The layer context of a UNet call repeats a few prompts over many rows (every sample of a batch, mask i
    reading foreground i's prompt); projecting keys/values once per distinct prompt saves most of that work.
    Rows that carry gradients (training the enhancer) are returned as they are, with the identity index.
    """
    if rows.requires_grad:
        return rows, torch.arange(rows.shape[0], device=rows.device)
    flat = rows.reshape(rows.shape[0], -1)
    distinct, index = torch.unique(flat, dim=0, return_inverse=True)
    return distinct.view(-1, *rows.shape[1:]), index
