"""Scoring generated layered images against their shapes prompts (the "shapes" proof of learning, docs/DESIGN.md 2.7).

A generated sample is scored against the *prompts* it was generated from (the layout is free: prompts say nothing
about where a shape goes). Per sample, with the classifiers of :mod:`.shapes`:

- foreground k: **colour** = ``dominant_colour_name(layer_k, mask_k)`` equals the prompt colour; **shape** =
  ``shape_name_from_mask(mask_k)`` equals the prompt shape; **mask IoU** = IoU of mask_k with the layer's content
  region (pixels of layer k nearer to the layer's dominant colour than to the neutral grey the dataset puts
  outside a shape, cleaned by a 3x3 majority vote); an empty mask scores colour "none", shape "none", IoU 0.
- background: **colour** = ``background_colour_name`` and **texture** = ``background_texture_name`` equal the prompt.
- **composite correct**: in the composite (the paper's equation over the generated layers), every foreground's
  visible region (its mask minus the masks above it) is non-empty and its dominant colour is the prompt colour,
  and the uncovered region's background colour is the prompt's background colour (all must hold).

:func:`chance_levels` gives the chance baseline: uniform guessing over the vocabulary for the classifiers and, for
mask IoU, the IoU of the true masks of two different test samples (a mask at a random place with a random shape).
"""
from __future__ import annotations

from dataclasses import asdict, dataclass, field
from typing import Sequence

import numpy as np
import torch

from comfy_headless.product import product_names

from . import shapes

LayeredImages, compose = product_names("layerdiff_model.layers.compose", "LayeredImages", "compose")



@dataclass
class LayerScore:
    prompt_colour: str
    prompt_shape: str
    colour: str
    shape: str
    mask_iou: float
    mask_area: float  # fraction of the image

    @property
    def colour_ok(self) -> bool:
        return self.colour == self.prompt_colour

    @property
    def shape_ok(self) -> bool:
        return self.shape == self.prompt_shape


@dataclass
class SampleScore:
    background_colour_ok: bool
    background_texture_ok: bool
    composite_ok: bool
    layers: list[LayerScore] = field(default_factory=list)
    details: dict = field(default_factory=dict)


def content_region(foreground: torch.Tensor, colour: str | None = None) -> np.ndarray:
    """[H, W, 3] (or [3, H, W]) foreground layer -> bool [H, W]: where the layer shows its content.

    A pixel is content when it is nearer to ``colour`` (the layer's colour name) than to the neutral grey fill, or,
    without ``colour``, nearer to any vocabulary colour than to the grey; then a 3x3 majority vote. Nearest-colour
    decisions keep a slightly tinted grey (VAE decoding) out of the content.
    """
    fg = foreground if foreground.shape[-1] == 3 else foreground.permute(1, 2, 0)
    colours = [shapes.COLOURS[colour]] if colour in shapes.COLOURS else list(shapes.COLOURS.values())
    palette = torch.tensor([[shapes.FOREGROUND_FILL * 255] * 3] + [list(c) for c in colours],
                           dtype=torch.float32) / 255
    nearest = ((fg.float().cpu()[..., None, :] - palette) ** 2).sum(-1).argmin(-1)  # [H, W], 0 = grey
    return shapes.majority_filter((nearest != 0).numpy())


def _chw(image_hwc: torch.Tensor) -> torch.Tensor:
    return image_hwc.permute(2, 0, 1)


def score_sample(layers: LayeredImages, index: int, truth: shapes.ShapesTruth) -> SampleScore:
    """Score sample ``index`` of a batch of generated ``layers`` against the prompts described by ``truth``.

    ``layers``: background [B,H,W,3], foregrounds [B,N,H,W,3], masks [B,N,H,W] (binarized) as the Split node
    gives them; ``truth`` carries the prompt colours/shapes/texture (its masks are not used: layouts are free).
    """
    bg = layers.background[index]
    fgs, masks = layers.foregrounds[index], layers.masks[index]
    if len(truth.foregrounds) != fgs.shape[0]:
        raise ValueError(f"{fgs.shape[0]} generated foregrounds for {len(truth.foregrounds)} prompts")
    layer_scores = []
    for k, want in enumerate(truth.foregrounds):
        mask = masks[k] > 0.5
        empty = not bool(mask.any())
        colour = "none" if empty else shapes.dominant_colour_name(_chw(fgs[k]), mask)
        layer_scores.append(LayerScore(
            prompt_colour=want.colour, prompt_shape=want.shape, colour=colour,
            shape=shapes.shape_name_from_mask(mask),
            mask_iou=0.0 if empty else shapes.mask_iou(mask.numpy(), content_region(fgs[k], colour)),
            mask_area=float(mask.float().mean())))
    bg_colour = shapes.background_colour_name(_chw(bg))
    bg_texture = shapes.background_texture_name(_chw(bg))
    composite_ok, visible_colours, uncovered_colour = _composite_check(layers, index, truth)
    return SampleScore(bg_colour == truth.background_colour, bg_texture == truth.background_texture, composite_ok,
                       layer_scores, {"background_colour": bg_colour, "background_texture": bg_texture,
                                      "composite_visible_colours": visible_colours,
                                      "composite_uncovered_colour": uncovered_colour})


def _composite_check(layers: LayeredImages, index: int, truth: shapes.ShapesTruth) -> tuple[bool, list, str]:
    one = LayeredImages(layers.background[index:index + 1], layers.foregrounds[index:index + 1],
                        layers.masks[index:index + 1])
    image = _chw(compose(one)[0])  # [3, H, W]
    masks = layers.masks[index] > 0.5  # [N, H, W]
    covered = torch.zeros_like(masks[0])
    ok, colours = True, []
    for k, want in enumerate(truth.foregrounds):
        visible = masks[k] & ~covered
        covered = covered | masks[k]
        colour = shapes.dominant_colour_name(image, visible) if visible.any() else "none"
        colours.append(colour)
        ok = ok and colour == want.colour
    uncovered = shapes.background_colour_name(image, ~covered) if (~covered).any() else "none"
    return ok and uncovered == truth.background_colour, colours, uncovered


def summarize(scores: Sequence[SampleScore]) -> dict:
    """Mean metrics over samples (per-layer metrics over all foreground layers)."""
    layer_scores = [layer for s in scores for layer in s.layers]
    if not scores:
        return {}
    mean = lambda values: float(np.mean(values)) if len(values) else float("nan")  # noqa: E731
    return {
        "samples": len(scores),
        "layers": len(layer_scores),
        "fg_colour_acc": mean([l.colour_ok for l in layer_scores]),
        "fg_shape_acc": mean([l.shape_ok for l in layer_scores]),
        "mask_iou": mean([l.mask_iou for l in layer_scores]),
        "bg_colour_acc": mean([s.background_colour_ok for s in scores]),
        "bg_texture_acc": mean([s.background_texture_ok for s in scores]),
        "composite_acc": mean([s.composite_ok for s in scores]),
        "empty_mask_rate": mean([l.mask_area == 0.0 for l in layer_scores]),
    }


def chance_levels(truths: Sequence[shapes.ShapesTruth]) -> dict:
    """Chance baseline: uniform guesses over the vocabulary; mask IoU of true masks of different samples.

    Composite chance = P(all foreground colours and the background colour guessed right), averaged over samples.
    """
    n_col, n_shape, n_tex = len(shapes.COLOURS), len(shapes.SHAPES), len(shapes.TEXTURES)
    masks = [f.mask for t in truths for f in t.foregrounds]
    ious = [shapes.mask_iou(masks[i].numpy(), masks[(i + 1) % len(masks)].numpy()) for i in range(len(masks))]
    composite = [n_col ** -(len(t.foregrounds) + 1) for t in truths]
    return {"samples": len(truths), "layers": len(masks), "fg_colour_acc": 1 / n_col, "fg_shape_acc": 1 / n_shape,
            "mask_iou": float(np.mean(ious)) if ious else float("nan"), "bg_colour_acc": 1 / n_col,
            "bg_texture_acc": 1 / n_tex, "composite_acc": float(np.mean(composite)) if composite else float("nan"),
            "empty_mask_rate": float("nan")}


def truth_layers(sample) -> tuple[LayeredImages, shapes.ShapesTruth]:
    """A dataset sample's own layers as a batch of one (ComfyUI IMAGE/MASK layout) and its truth; scoring them
    checks the scorer itself."""
    layers = LayeredImages(sample.background.permute(1, 2, 0)[None], sample.foregrounds.permute(0, 2, 3, 1)[None],
                           sample.masks[:, 0][None])
    return layers, shapes.shapes_truth(sample)


METRICS = ("fg_colour_acc", "fg_shape_acc", "mask_iou", "bg_colour_acc", "bg_texture_acc", "composite_acc")
HEADERS = ("layer colour", "layer shape", "mask IoU", "bg colour", "bg texture", "composite")


def markdown_table(rows: dict[str, dict], extra: dict[str, str] | None = None) -> str:
    """| variant | metrics... | (+ an optional extra column per row, e.g. the sampling time)."""
    extra = extra or {}
    head = "| variant | " + " | ".join(HEADERS) + (" | time |" if extra else " |")
    lines = [head, "|" + "---|" * (len(HEADERS) + 1 + bool(extra))]
    for name, m in rows.items():
        cells = [f"{m[k]:.2f}" if isinstance(m.get(k), float) and m[k] == m[k] else "n/a" for k in METRICS]
        lines.append(f"| {name} | " + " | ".join(cells) + (f" | {extra.get(name, '')} |" if extra else " |"))
    return "\n".join(lines)


def score_dict(score: SampleScore) -> dict:
    out = asdict(score)
    for layer, obj in zip(out["layers"], score.layers):
        layer.update(colour_ok=obj.colour_ok, shape_ok=obj.shape_ok)
    return out
