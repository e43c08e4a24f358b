"""Slot layout of a layered sample (docs/DESIGN.md 2.1).

A layered sample with N foregrounds is S = 2N + 1 ordinary SD latents on the batch axis, in slot order
``[background, fg_1 .. fg_N, mask_1 .. mask_N]`` (fg_1 is the top layer). A batch of B samples is B*S rows in
``(b s)`` order, i.e. row r belongs to sample r // S and slot r % S.

Slot *roles* are independent of N so that one set of learned role embeddings serves every foreground count:
role 0 = background, role i = foreground i (1..max_fg), role max_fg + i = mask i.
"""
from __future__ import annotations

import torch

from .errors import LayoutError


def num_slots(num_foregrounds: int) -> int:
    """S = 2N + 1."""
    return 2 * num_foregrounds + 1


def num_foregrounds_from_slots(slots: int) -> int:
    if slots < 3 or slots % 2 == 0:
        raise LayoutError(f"{slots} slots is not a layered sample: expected 2N+1 slots with N >= 1 foregrounds.")
    return (slots - 1) // 2


def num_roles(max_foregrounds: int) -> int:
    """Background + one role per foreground + one per mask."""
    return 1 + 2 * max_foregrounds


def check_foreground_count(num_foregrounds: int, max_foregrounds: int, node: str = "") -> None:
    """Raise LayoutError unless 1 <= ``num_foregrounds`` <= ``max_foregrounds`` (the weights' limit)."""
    prefix = f"{node}: " if node else ""
    if num_foregrounds < 1:
        raise LayoutError(f"{prefix}A layered sample needs at least one foreground layer.")
    if num_foregrounds > max_foregrounds:
        raise LayoutError(
            f"{prefix}{num_foregrounds} foregrounds requested but these LayerDiff weights support at most "
            f"{max_foregrounds}: use fewer foreground prompts or weights trained for more layers."
        )


def slot_roles(num_foregrounds: int, max_foregrounds: int) -> list[int]:
    """Role id of each slot, in slot order. Length S."""
    check_foreground_count(num_foregrounds, max_foregrounds)
    fgs = list(range(1, num_foregrounds + 1))
    masks = [max_foregrounds + i for i in fgs]
    return [0] + fgs + masks


def slot_prompt_index(num_foregrounds: int) -> list[int]:
    """Which layer prompt each slot reads: 0 = background, i = foreground i; mask i reads foreground i's prompt."""
    fgs = list(range(1, num_foregrounds + 1))
    return [0] + fgs + fgs


def background_slot() -> int:
    return 0


def foreground_slot(i: int) -> int:
    """Slot index of foreground i (1-based, 1 = top)."""
    return i


def mask_slot(i: int, num_foregrounds: int) -> int:
    """Slot index of the mask of foreground i (1-based)."""
    return num_foregrounds + i


def pack(background: torch.Tensor, foregrounds: torch.Tensor, masks: torch.Tensor) -> torch.Tensor:
    """Stack per-slot tensors into ``(b s)`` rows.

    background: [B, *X]; foregrounds, masks: [B, N, *X]  ->  [B*S, *X] with S = 2N+1.
    """
    if foregrounds.shape[:2] != masks.shape[:2] or foregrounds.shape[0] != background.shape[0]:
        raise LayoutError(
            f"Cannot pack layers: background {tuple(background.shape)}, foregrounds {tuple(foregrounds.shape)} "
            f"and masks {tuple(masks.shape)} must agree on batch size and foreground count."
        )
    stacked = torch.cat([background.unsqueeze(1), foregrounds, masks], dim=1)  # [B, S, *X]
    return stacked.reshape(-1, *stacked.shape[2:])  # (b s) *X


def unpack(rows: torch.Tensor, num_foregrounds: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Inverse of :func:`pack`: [B*S, *X] -> background [B, *X], foregrounds [B, N, *X], masks [B, N, *X]."""
    s = num_slots(num_foregrounds)
    if rows.shape[0] % s != 0:
        raise LayoutError(
            f"{rows.shape[0]} rows cannot be split into layered samples of {s} slots "
            f"({num_foregrounds} foregrounds): the batch was cut or re-ordered by another node."
        )
    grouped = rows.reshape(rows.shape[0] // s, s, *rows.shape[1:])  # [B, S, *X]
    n = num_foregrounds
    return grouped[:, 0], grouped[:, 1 : 1 + n], grouped[:, 1 + n :]


def slot_info_table(num_foregrounds: int) -> torch.Tensor:
    """Per-slot metadata that rides along with the rows through the sampler: long [S, 2] = (slot, N).

    ComfyUI tiles a conditioning tensor to the batch as row r -> r % S, which is exactly the ``(b s)`` order, so
    after tiling every row carries its own slot index and foreground count.
    """
    s = num_slots(num_foregrounds)
    return torch.stack([torch.arange(s), torch.full((s,), num_foregrounds)], dim=1).long()


def rows_layout(slot_info: torch.Tensor) -> tuple[int, int]:
    """Check that rows with metadata ``slot_info`` [R, 2] are whole samples in ``(b s)`` order.

    Returns (num_foregrounds, S). Raises LayoutError when rows were cut or re-ordered (e.g. by a context window
    or a batch node that does not know about layers).
    """
    info = slot_info.detach().to("cpu", torch.long)
    nfg = int(info[0, 1])
    s = num_slots(nfg)
    rows = info.shape[0]
    expected = torch.arange(rows) % s
    if rows % s != 0 or not torch.equal(info[:, 0], expected) or not bool((info[:, 1] == nfg).all()):
        raise LayoutError(
            f"The UNet received {rows} rows that are not whole layered samples of {s} slots in order "
            "[background, foregrounds, masks]. Something split or re-ordered the batch (e.g. context windows or "
            "latent batch nodes); LayerDiff needs every sample's slots in one UNet call."
        )
    return nfg, s


def roles_for_rows(slot_info: torch.Tensor, max_foregrounds: int) -> torch.Tensor:
    """Role id of every row (see module docstring). slot_info [R, 2] -> roles [R]."""
    slot, nfg = slot_info[:, 0].long(), slot_info[:, 1].long()
    is_mask = slot > nfg
    return torch.where(is_mask, slot - nfg + max_foregrounds, slot)
