"""Choosing layers of a layered sample for editing (docs/DESIGN.md 2.9).

Users name layers as they see them: ``background`` (or ``bg``, ``0``) and foregrounds by their number, top layer
first (``1`` = top), several with commas (``1,3``) or ranges (``1-3``). A foreground layer is two slots, its image
and its mask (docs/DESIGN.md 2.1), so regenerating layer k regenerates both unless its mask is kept.
"""
from __future__ import annotations

import torch

from .errors import LayoutError
from .slots import num_slots

BACKGROUND_NAMES = ("background", "bg", "0")


def parse_layer_selection(text: str, num_foregrounds: int, node: str, input_name: str = "layers",
                          source: str = "the latent") -> list[int]:
    """``"2"``, ``"1,3"``, ``"1-2"``, ``"background"`` -> sorted layer indices (0 = background, k = foreground k).

    Raises LayoutError naming ``node`` and ``input_name`` for an empty selection, a word that is not a layer, or
    an index outside 1..``num_foregrounds`` (the layer count of ``source``, e.g. "the conditioning").
    """
    picked: set[int] = set()
    for part in (p.strip().lower() for p in str(text).replace(";", ",").split(",")):
        if not part:
            continue
        if part in BACKGROUND_NAMES:
            picked.add(0)
            continue
        low, dash, high = part.partition("-")
        try:
            first, last = int(low), int(high) if dash else int(low)
        except ValueError:
            raise LayoutError(f"{node}: '{input_name}' has {part!r}, which is not a layer. Name layers by number, "
                              f"top layer first (1..{num_foregrounds}), or 'background'; e.g. '2', '1,3', "
                              "'background'.") from None
        if first > last:
            raise LayoutError(f"{node}: '{input_name}' has the range {part!r}; write it low-high, e.g. '1-2'.")
        for k in range(first, last + 1):
            if not 1 <= k <= num_foregrounds:
                raise LayoutError(f"{node}: '{input_name}' asks for layer {k} but {source} has {num_foregrounds} "
                                  f"foreground layer(s); use 1..{num_foregrounds} (1 = top) or 'background'.")
            picked.add(k)
    if not picked:
        raise LayoutError(f"{node}: '{input_name}' is empty; name the layers to change, e.g. '2', '1,3' or "
                          "'background'.")
    return sorted(picked)


def slots_of_layers(layers: list[int], num_foregrounds: int, with_masks: bool = True) -> list[int]:
    """Layer indices -> slot indices: background -> 0; foreground k -> k and, ``with_masks``, its mask N + k."""
    slots = set()
    for k in layers:
        slots.add(k)
        if k and with_masks:
            slots.add(num_foregrounds + k)
    return sorted(slots)


def slot_row_mask(slots: list[int], num_foregrounds: int, rows: int, height: int, width: int) -> torch.Tensor:
    """A per-row noise mask ``[rows, 1, height, width]``: 1 on every row of the chosen ``slots`` (in every sample
    of the ``(b s)`` batch), 0 on the others."""
    s = num_slots(num_foregrounds)
    if rows % s:
        raise LayoutError(f"{rows} rows is not a whole number of layered samples of {s} slots.")
    chosen = torch.zeros(s)
    chosen[list(slots)] = 1.0
    return chosen.repeat(rows // s)[:, None, None, None].expand(rows, 1, height, width).contiguous()


def kept_rows(slots: list[int], num_foregrounds: int, rows: int) -> torch.Tensor:
    """Bool ``[rows]``: True on the rows that are *not* among ``slots`` (kept unchanged by an edit)."""
    s = num_slots(num_foregrounds)
    keep = torch.ones(s, dtype=torch.bool)
    keep[list(slots)] = False
    return keep.repeat(rows // s)
