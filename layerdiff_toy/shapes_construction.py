"""Dataset construction on the shapes composites: stand-in backends and the score against the true layers.

The automatic pipeline (``layerdiff_model.data.construction``) is run on flat shapes pictures with deterministic
stand-ins behind the real interfaces, so its logic (phrases, detection bookkeeping, filters, depth order,
background completion, sample assembly, shards) is checked against known layers without model weights:

- :class:`ColourShapeFinder` is the detector *and* the segmenter: a phrase "a red circle" selects the pixels of
  the vocabulary red (the toy draws exact colours); when two phrases share a colour, the connected regions are
  told apart by their shape.
- background completion is OpenCV's inpainting and depth order the occlusion heuristic, both the product's own.

:func:`score_construction` compares the recovered samples with the true ones (docs/DATASET.md, "Proof on the
shapes").
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Sequence

import numpy as np
import torch

from comfy_headless.product import product_names

from .shapes import COLOURS, SHAPES, mask_iou, shape_name_from_mask, shapes_truth
from .shapes_eval import psnr_db

box_iou = product_names("layerdiff_model.data.construction.quality_filters", "box_iou")
Detection = product_names("layerdiff_model.data.construction.stages", "Detection")

COLOUR_TOLERANCE = 30  # max per-channel difference from the vocabulary colour
MIN_REGION = 6  # pixels; smaller regions are ignored


def _phrase_words(phrase: str) -> tuple[str | None, str | None]:
    words = phrase.lower().split()
    colour = next((w for w in words if w in COLOURS), None)
    shape = next((w for w in words if w in SHAPES), None)
    return colour, shape


def colour_pixels(image: np.ndarray, colour: str) -> np.ndarray:
    """bool [H, W]: pixels within COLOUR_TOLERANCE of the vocabulary ``colour``."""
    diff = np.abs(image.astype(np.int16) - np.array(COLOURS[colour], np.int16)).max(-1)
    return diff <= COLOUR_TOLERANCE


def _regions(mask: np.ndarray) -> list[np.ndarray]:
    import cv2

    count, labels = cv2.connectedComponents(mask.astype(np.uint8), connectivity=8)
    regions = [labels == i for i in range(1, count)]
    return [r for r in regions if r.sum() >= MIN_REGION]


def _box(mask: np.ndarray) -> tuple[float, float, float, float]:
    ys, xs = np.nonzero(mask)
    return float(xs.min()), float(ys.min()), float(xs.max() + 1), float(ys.max() + 1)


def _border_colour(image: np.ndarray) -> str | None:
    border = np.concatenate([image[0], image[-1], image[:, 0], image[:, -1]])[None]  # [1, K, 3]
    counts = {c: int(colour_pixels(border, c).sum()) for c in COLOURS}
    best = max(counts, key=counts.get)
    return best if counts[best] else None


class ColourShapeFinder:
    """Stand-in :class:`Detector` and :class:`Segmenter` for the toy's exact vocabulary colours."""

    def detect(self, images: Sequence[np.ndarray], phrases: Sequence[Sequence[str]]):
        out = []
        for image, picture_phrases in zip(images, phrases):
            words = [_phrase_words(p) for p in picture_phrases]
            found = []
            for phrase, (colour, shape) in zip(picture_phrases, words):
                if colour is None:
                    continue
                pixels = colour_pixels(image, colour)
                if pixels.sum() < MIN_REGION:
                    continue
                if sum(1 for c, _ in words if c == colour) == 1:  # the only thing of its colour: all its pixels
                    found.append(Detection(phrase, _box(pixels), 0.9))
                    continue
                for region in _regions(pixels):  # shared colour: regions of the phrase's shape
                    match = shape is not None and shape_name_from_mask(region) == shape
                    found.append(Detection(phrase, _box(region), 0.9 if match else 0.35))
            out.append(found)
        return out

    def segment(self, images: Sequence[np.ndarray], boxes):
        out = []
        for image, picture_boxes in zip(images, boxes):
            behind = _border_colour(image)
            masks = []
            for x0, y0, x1, y1 in picture_boxes:
                inside = np.zeros(image.shape[:2], bool)
                inside[int(y0):int(np.ceil(y1)), int(x0):int(np.ceil(x1))] = True
                best, best_fit = np.zeros(image.shape[:2], bool), 0.0
                for colour in COLOURS:  # the colour whose pixels in the box span the box best
                    pixels = colour_pixels(image, colour) & inside
                    if colour == behind or pixels.sum() < MIN_REGION:
                        continue
                    fit = box_iou(_box(pixels), (x0, y0, x1, y1))
                    if fit > best_fit:
                        best, best_fit = pixels, fit
                masks.append(best)
            out.append(masks)
        return out


@dataclass
class ConstructionScore:
    samples: int = 0  # true samples given
    recovered: int = 0  # samples the pipeline wrote
    layers: int = 0  # true foregrounds of recovered samples
    matched: int = 0  # of them, recovered with their prompt
    visible_iou: list[float] = field(default_factory=list)  # recovered mask vs the true visible part
    full_iou: list[float] = field(default_factory=list)  # recovered mask vs the true full extent
    pairs: int = 0  # matched layer pairs whose true masks overlap (order visible in the picture)
    pairs_correct: int = 0
    all_pairs: int = 0
    all_pairs_correct: int = 0
    background_psnr: list[float] = field(default_factory=list)  # completed vs true background, whole image
    hole_psnr: list[float] = field(default_factory=list)  # the same inside the removed objects only

    def to_json(self) -> dict:
        def mean(v):
            return round(float(np.mean(v)), 4) if v else None
        return {
            "samples": self.samples, "recovered": self.recovered, "layers": self.layers, "matched": self.matched,
            "mask_iou_visible_mean": mean(self.visible_iou),
            "mask_iou_visible_at_least_0.9": round(float(np.mean(np.array(self.visible_iou) >= 0.9)), 4)
            if self.visible_iou else None,
            "mask_iou_full_mean": mean(self.full_iou),
            "depth_order_overlapping_pairs": self.pairs,
            "depth_order_correct_overlapping": round(self.pairs_correct / self.pairs, 4) if self.pairs else None,
            "depth_order_all_pairs": self.all_pairs,
            "depth_order_correct_all": round(self.all_pairs_correct / self.all_pairs, 4) if self.all_pairs else None,
            "background_psnr_db": mean(self.background_psnr), "hole_psnr_db": mean(self.hole_psnr),
        }


def _unit(array: np.ndarray) -> torch.Tensor:
    """uint8 pixels -> float tensor in [0, 1] (PSNR of the 8-bit images, as they are stored)."""
    return torch.from_numpy(array.astype(np.float64) / 255)


def _uint8(chw) -> np.ndarray:
    return (chw.permute(1, 2, 0).numpy() * 255).round().clip(0, 255).astype(np.uint8)


def score_construction(truth_samples, recovered_samples) -> ConstructionScore:
    """Recovered samples (matched to the true ones by key) against the truth; layers matched by prompt."""
    by_key = {s.key: s for s in recovered_samples}
    score = ConstructionScore(samples=len(truth_samples))
    for true in truth_samples:
        got = by_key.get(true.key)
        if got is None:
            continue
        score.recovered += 1
        truth = shapes_truth(true)
        prompts = list(got.foreground_prompts)
        positions = {}  # true index -> recovered index
        for t, (prompt, fg) in enumerate(zip(true.foreground_prompts, truth.foregrounds)):
            score.layers += 1
            if prompt not in prompts:
                continue
            r = prompts.index(prompt)
            positions[t] = r
            score.matched += 1
            mask = got.masks[r, 0].numpy() > 0.5
            score.visible_iou.append(mask_iou(mask, fg.visible.numpy()))
            score.full_iou.append(mask_iou(mask, fg.mask.numpy()))
        for a in positions:
            for b in positions:
                if a < b:  # true: a in front of b
                    correct = positions[a] < positions[b]
                    score.all_pairs += 1
                    score.all_pairs_correct += correct
                    if (truth.foregrounds[a].mask & truth.foregrounds[b].mask).any():
                        score.pairs += 1
                        score.pairs_correct += correct
        true_bg, got_bg = _uint8(true.background), _uint8(got.background)
        hole = (got.masks[:, 0] > 0.5).any(0).numpy()
        score.background_psnr.append(psnr_db(_unit(got_bg), _unit(true_bg)))
        if hole.any():
            score.hole_psnr.append(psnr_db(_unit(got_bg[hole]), _unit(true_bg[hole])))
    return score
