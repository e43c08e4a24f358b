"""Quality filters of constructed samples, with their defaults (docs/DATASET.md, "Filters").

Object filters drop one found object (it stays part of the background); picture filters reject the whole
picture. Every drop and reject has a reason, and the run report counts them.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Sequence

import numpy as np

from .stages import Box, FoundObject


@dataclass(frozen=True)
class FilterSettings:
    min_detection_score: float = 0.3  # detector score in [0, 1]
    min_mask_fraction: float = 0.01  # an object's mask covers at least this fraction of the picture ...
    max_mask_fraction: float = 0.7  # ... and at most this (bigger is usually the scene itself)
    max_overlap: float = 0.6  # of the smaller mask covered by another object: the lower-scoring one is dropped
    min_clip_similarity: float = 0.2  # CLIP cosine of the layer crop and its prompt (only with a CLIP model)
    max_residue_score: float = 0.3  # the detector still finds the object in the completed background: reject
    max_foregrounds: int = 4  # the paper's samples have 1-4 foregrounds; extra objects (lowest score) are dropped

    def check(self) -> None:
        if not 0 <= self.min_mask_fraction < self.max_mask_fraction <= 1:
            raise ValueError("mask fractions need 0 <= min_mask_fraction < max_mask_fraction <= 1, got "
                             f"{self.min_mask_fraction} and {self.max_mask_fraction}")
        if self.max_foregrounds < 1:
            raise ValueError(f"max_foregrounds must be at least 1, got {self.max_foregrounds}")


def box_iou(a: Box, b: Box) -> float:
    ix = max(0.0, min(a[2], b[2]) - max(a[0], b[0]))
    iy = max(0.0, min(a[3], b[3]) - max(a[1], b[1]))
    inter = ix * iy
    union = (a[2] - a[0]) * (a[3] - a[1]) + (b[2] - b[0]) * (b[3] - b[1]) - inter
    return inter / union if union > 0 else 0.0


def mask_problem(obj: FoundObject, settings: FilterSettings) -> str | None:
    """Why an object's mask is unusable (too small or too large a part of the picture), or None."""
    fraction = float(obj.mask.mean())
    if fraction < settings.min_mask_fraction:
        return "mask smaller than min_mask_fraction"
    if fraction > settings.max_mask_fraction:
        return "mask larger than max_mask_fraction"
    return None


def drop_overlapping(objects: Sequence[FoundObject], settings: FilterSettings
                     ) -> tuple[list[FoundObject], list[str]]:
    """Keep objects best score first; drop one whose mask is mostly covered by (or covers) a kept one."""
    kept, dropped = [], []
    for obj in sorted(objects, key=lambda o: -o.score):
        area = obj.mask.sum()
        clash = False
        for other in kept:
            inter = np.logical_and(obj.mask, other.mask).sum()
            if inter > settings.max_overlap * max(1, min(area, other.mask.sum())):
                clash = True
                break
        if clash:
            dropped.append("overlaps a better-scoring object")
        else:
            kept.append(obj)
    if len(kept) > settings.max_foregrounds:
        dropped += ["more objects than max_foregrounds"] * (len(kept) - settings.max_foregrounds)
        kept = kept[: settings.max_foregrounds]
    return kept, dropped
