"""Layer prompts as per-slot context rows (docs/DESIGN.md 2.1, 2.2, 4 "per-slot prompts ride on conditioning").

A layered conditioning keeps the global prompt as the ordinary cross-attention context (so ControlNet, area
and mask conditioning keep working) and carries the layer prompts next to it as one context row per slot:
``[S, t, d]`` with row s = the prompt slot s reads (mask i reads foreground i's prompt). The host tiles these rows
to the batch as ``r % S``, which is exactly the ``(b s)`` row order.

Prompts of different token lengths (ComfyUI encodes long prompts as several 77-token windows) are brought to one
length T. When their least common multiple is at most :data:`MAX_REPEAT` times the longest prompt (as ComfyUI's own
conditioning concat allows), each prompt's whole token sequence is repeated, which leaves softmax attention
unchanged; otherwise (e.g. 1, 5, 7, 8 and 9 windows: lcm 2,520 windows) shorter prompts are zero-padded to the
longest and the padding is masked out of the attention, so T never exceeds 4x the longest prompt. Every row
carries one extra last channel, the token validity (1 = a prompt token, 0 = padding): ``[S, T, d + 1]``. It rides
through ComfyUI's batching with the tokens (a core repeat repeats both) and is split off before the attention
(:func:`split_token_validity`).
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


MAX_REPEAT = 4  # repeat prompts to their common multiple only up to this many times the longest (ComfyUI's bound)


def common_token_length(embeds) -> int:
    """T for prompts of t_i tokens: lcm(t_i) when it is at most MAX_REPEAT * max(t_i), else max(t_i)."""
    lengths = [int(e.shape[1]) for e in embeds]
    lcm = math.lcm(*lengths)
    return lcm if lcm <= MAX_REPEAT * max(lengths) else max(lengths)


def to_length(tokens: torch.Tensor, length: int) -> torch.Tensor:
    """[1, t, d] -> [1, length, d + 1]: the tokens repeated (when t divides length) or zero-padded, plus the
    validity channel (1 for a token, 0 for padding)."""
    t = tokens.shape[1]
    if t > length:
        raise LayoutError(f"Cannot bring a prompt of {t} tokens to {length} tokens.")
    valid = torch.ones(1, t, 1, dtype=tokens.dtype, device=tokens.device)
    with_validity = torch.cat([tokens, valid], dim=-1)  # [1, t, d + 1]
    if length % t == 0:
        return with_validity.repeat(1, length // t, 1)
    pad = torch.zeros(1, length - t, tokens.shape[-1] + 1, dtype=tokens.dtype, device=tokens.device)
    return torch.cat([with_validity, pad], dim=1)


def stack_layer_embeds(embeds) -> torch.Tensor:
    """list of [1, t_i, d] -> [L, T, d + 1] (T: :func:`common_token_length`; last channel: token validity)."""
    length = common_token_length(embeds)
    return torch.cat([to_length(e, length) for e in embeds], dim=0)


def split_token_validity(rows: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor | None]:
    """[R, T, d + 1] -> (tokens [R, T, d], validity bool [R, T], or None when every token is valid)."""
    valid = rows[..., -1] > 0.5
    return rows[..., :-1], (None if bool(valid.all()) else valid)


def slot_context_rows(layers: LayerPrompts) -> torch.Tensor:
    """Per-slot context rows [S, T, d + 1] in slot order [background, fg_1..fg_N, mask_1..mask_N]."""
    stacked = stack_layer_embeds(layers.embeds)  # [N+1, T, d + 1]
    index = torch.tensor(slot_prompt_index(layers.num_foregrounds), device=stacked.device)
    return stacked[index]  # [S, T, d + 1]


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
