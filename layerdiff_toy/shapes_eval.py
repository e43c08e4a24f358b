"""Scoring generated layered images against their shapes prompts (the "shapes" proof of learning, docs/DESIGN.md 2.7).

A generated sample is scored against the *prompts* it was generated from (the layout is free: prompts say nothing
about where a shape goes). Colours are named with a :class:`ColourPalette`: the vocabulary colours plus the neutral
grey a foreground layer shows outside its shape, either as drawn (``NOMINAL``) or as this VAE decodes them
(:func:`decoded_palette`, measured on true layers after a VAE round trip). A pixel set whose median is nearest the
grey is named ``"none"``, so a layer that draws nothing never scores as a colour. Per sample:

- foreground k: **colour** = :func:`layer_colour_name` of the layer inside its own mask equals the prompt colour;
  **shape** = ``shape_name_from_mask(mask_k)`` equals the prompt shape; **mask/content agreement** = IoU of mask_k
  with the layer's content region (pixels nearer the layer's decoded colour than the decoded grey: a threshold per
  colour, set by the VAE); **true-mask IoU** = IoU of mask_k with the true mask, only where the layout is known
  (the true layers through the VAE; a decomposition of a known picture); an empty mask scores "none" and 0.
- background: **colour** = ``background_colour_name`` and **texture** = ``background_texture_name`` equal the prompt.
- **composite correct**: in the composite (the paper's equation over the generated layers), every foreground's
  visible region (its mask minus the masks above it) is non-empty and named the prompt colour (grey is "none"),
  and the uncovered region's background colour is the prompt's background colour (all must hold).

:func:`chance_levels` gives the uniform-guessing baseline of the classifiers and, for the true-mask IoU, the IoU of
the true masks of two different samples. The mask/content agreement has no chance level: its floor is the untrained
model (every slot draws the whole scene), which a report must show next to it.
"""
from __future__ import annotations

from dataclasses import asdict, dataclass, field
from typing import Sequence

import numpy as np
import torch

from comfy_headless.product import product_names

from . import shapes

LayeredImages, compose = product_names("layerdiff_model.layers.compose", "LayeredImages", "compose")

NO_COLOUR = "none"


@dataclass(frozen=True)
class ColourPalette:
    """RGB in [0, 1] of each vocabulary colour and of the neutral grey fill, as drawn or as decoded by a VAE."""

    colours: dict[str, tuple[float, float, float]]
    grey: tuple[float, float, float]
    source: str = "nominal"

    def named(self) -> tuple[list[str], torch.Tensor]:
        """(names, [C + 1, 3] RGB): the grey first (name NO_COLOUR), then the vocabulary."""
        names = [NO_COLOUR, *self.colours]
        return names, torch.tensor([self.grey, *self.colours.values()], dtype=torch.float32)

    def as_dict(self) -> dict:
        return {"source": self.source, "grey": list(self.grey),
                "colours": {k: list(v) for k, v in self.colours.items()}}


NOMINAL = ColourPalette({name: tuple(c / 255 for c in rgb) for name, rgb in shapes.COLOURS.items()},
                        (shapes.FOREGROUND_FILL,) * 3)


def decoded_palette(round_trips: Sequence[tuple["LayeredImages", "shapes.ShapesTruth"]],
                    source: str = "decoded") -> ColourPalette:
    """The colours a VAE gives back: per vocabulary colour, the median decoded pixel inside the true masks of the
    layers of that colour; the grey: the median decoded foreground-layer pixel outside the true masks.

    ``round_trips``: (true layers after VAE encode/decode, their truth) pairs, batch of one each. Colours that never
    occur keep their nominal value. Use samples that are not scored afterwards (the validation split).
    """
    inside: dict[str, list[torch.Tensor]] = {name: [] for name in shapes.COLOURS}
    outside: list[torch.Tensor] = []
    for layers, truth in round_trips:
        for k, fg_truth in enumerate(truth.foregrounds):
            fg = layers.foregrounds[0, k].float()  # [H, W, 3]
            inside[fg_truth.colour].append(fg[fg_truth.mask])
            outside.append(fg[~fg_truth.mask])
    colours = {name: tuple(float(v) for v in torch.cat(px).median(0).values) if px else NOMINAL.colours[name]
               for name, px in inside.items()}
    grey = tuple(float(v) for v in torch.cat(outside).median(0).values) if outside else NOMINAL.grey
    return ColourPalette(colours, grey, source)


def _nearest(pixels: torch.Tensor, palette: ColourPalette, restrict: str | None = None
             ) -> tuple[list[str], torch.Tensor]:
    """(names, index of the nearest palette entry per pixel); ``restrict``: only the grey and that colour."""
    names, rgb = palette.named()
    if restrict is not None:
        keep = [0] + ([names.index(restrict)] if restrict in palette.colours else list(range(1, len(names))))
        names, rgb = [names[i] for i in keep], rgb[keep]
    return names, ((pixels.float().cpu()[..., None, :] - rgb) ** 2).sum(-1).argmin(-1)


def layer_colour_name(image_hwc: torch.Tensor, mask: torch.Tensor, palette: ColourPalette = NOMINAL) -> str:
    """Name of the median colour of ``image_hwc`` [H, W, 3] inside ``mask`` [H, W]: a vocabulary colour, or
    NO_COLOUR when the median is nearest the grey fill or the mask is empty."""
    pixels = image_hwc[mask > 0.5] if mask.dtype != torch.bool else image_hwc[mask]
    if pixels.shape[0] == 0:
        return NO_COLOUR
    names, index = _nearest(pixels.float().median(0).values, palette)
    return names[int(index)]


def content_region(foreground: torch.Tensor, colour: str | None = None, palette: ColourPalette = NOMINAL
                   ) -> np.ndarray:
    """[H, W, 3] (or [3, H, W]) foreground layer -> bool [H, W]: where the layer shows its content.

    A pixel is content when it is nearer to ``colour`` (as ``palette`` has it) than to the palette's grey or,
    without a vocabulary ``colour``, nearer to any vocabulary colour than to the grey; then a 3x3 majority vote.
    With a decoded palette the threshold between a colour and the grey is where this VAE puts it, so a thin ring
    washed toward grey by decoding still counts as its colour.
    """
    fg = foreground if foreground.shape[-1] == 3 else foreground.permute(1, 2, 0)
    _, nearest = _nearest(fg, palette, colour)
    return shapes.majority_filter((nearest != 0).numpy())


@dataclass
class LayerScore:
    prompt_colour: str
    prompt_shape: str
    colour: str
    shape: str
    mask_agreement: float  # IoU of the mask with the layer's own content region
    mask_area: float  # fraction of the image
    true_mask_iou: float | None = None  # only where the layout is known

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


def _chw(image_hwc: torch.Tensor) -> torch.Tensor:
    return image_hwc.permute(2, 0, 1)


def score_sample(layers: LayeredImages, index: int, truth: shapes.ShapesTruth, palette: ColourPalette = NOMINAL,
                 layout_is_true: bool = False) -> SampleScore:
    """Score sample ``index`` of a batch of ``layers`` against the prompts described by ``truth``.

    ``layers``: background [B,H,W,3], foregrounds [B,N,H,W,3], masks [B,N,H,W] (binarized) as the Split node
    gives them; ``truth`` carries the prompt colours/shapes/texture and the true masks, which are compared only
    with ``layout_is_true`` (the layers claim to be the true ones: a VAE round trip, a decomposition).
    """
    bg = layers.background[index]
    fgs, masks = layers.foregrounds[index], layers.masks[index]
    if len(truth.foregrounds) != fgs.shape[0]:
        raise ValueError(f"{fgs.shape[0]} generated foregrounds for {len(truth.foregrounds)} prompts")
    layer_scores = []
    for k, want in enumerate(truth.foregrounds):
        mask = masks[k] > 0.5
        empty = not bool(mask.any())
        colour = layer_colour_name(fgs[k], mask, palette)
        agreement = 0.0 if empty else shapes.mask_iou(mask.numpy(), content_region(
            fgs[k], colour if colour != NO_COLOUR else None, palette))
        layer_scores.append(LayerScore(
            prompt_colour=want.colour, prompt_shape=want.shape, colour=colour,
            shape=shapes.shape_name_from_mask(mask), mask_agreement=agreement, mask_area=float(mask.float().mean()),
            true_mask_iou=shapes.mask_iou(mask.numpy(), want.mask.numpy()) if layout_is_true else None))
    bg_colour = shapes.background_colour_name(_chw(bg))
    bg_texture = shapes.background_texture_name(_chw(bg))
    composite_ok, visible_colours, uncovered_colour = _composite_check(layers, index, truth, palette)
    return SampleScore(bg_colour == truth.background_colour, bg_texture == truth.background_texture, composite_ok,
                       layer_scores, {"background_colour": bg_colour, "background_texture": bg_texture,
                                      "composite_visible_colours": visible_colours,
                                      "composite_uncovered_colour": uncovered_colour})


def _composite_check(layers: LayeredImages, index: int, truth: shapes.ShapesTruth, palette: ColourPalette
                     ) -> tuple[bool, list, str]:
    one = LayeredImages(layers.background[index:index + 1], layers.foregrounds[index:index + 1],
                        layers.masks[index:index + 1])
    image = compose(one)[0]  # [H, W, 3]
    masks = layers.masks[index] > 0.5  # [N, H, W]
    covered = torch.zeros_like(masks[0])
    ok, colours = True, []
    for k, want in enumerate(truth.foregrounds):
        visible = masks[k] & ~covered
        covered = covered | masks[k]
        colour = layer_colour_name(image, visible, palette)
        colours.append(colour)
        ok = ok and colour == want.colour
    uncovered = shapes.background_colour_name(_chw(image), ~covered) if (~covered).any() else NO_COLOUR
    return ok and uncovered == truth.background_colour, colours, uncovered


def _mean(values) -> float:
    values = [v for v in values if v is not None]
    return float(np.mean(values)) if values else float("nan")


def summarize(scores: Sequence[SampleScore]) -> dict:
    """Mean metrics over samples (per-layer metrics over all foreground layers), and layer colour per prompt
    colour (``per_colour``: colour -> [right, layers])."""
    layer_scores = [layer for s in scores for layer in s.layers]
    if not scores:
        return {}
    per_colour: dict[str, list[int]] = {}
    for layer in layer_scores:
        counts = per_colour.setdefault(layer.prompt_colour, [0, 0])
        counts[0] += layer.colour_ok
        counts[1] += 1
    return {
        "samples": len(scores),
        "layers": len(layer_scores),
        "fg_colour_acc": _mean([l.colour_ok for l in layer_scores]),
        "fg_shape_acc": _mean([l.shape_ok for l in layer_scores]),
        "mask_agreement": _mean([l.mask_agreement for l in layer_scores]),
        "true_mask_iou": _mean([l.true_mask_iou for l in layer_scores]),
        "bg_colour_acc": _mean([s.background_colour_ok for s in scores]),
        "bg_texture_acc": _mean([s.background_texture_ok for s in scores]),
        "composite_acc": _mean([s.composite_ok for s in scores]),
        "empty_mask_rate": _mean([l.mask_area == 0.0 for l in layer_scores]),
        "no_colour_rate": _mean([l.colour == NO_COLOUR for l in layer_scores]),
        "per_colour": {name: per_colour[name] for name in shapes.COLOURS if name in per_colour},
        "composite_psnr_db": _mean([s.details.get("composite_psnr_db") for s in scores]),
    }


def psnr_db(image: torch.Tensor, reference: torch.Tensor) -> float:
    """PSNR in dB of two images in [0, 1] (any equal shapes); inf for identical images."""
    mse = float(((image.float() - reference.float()) ** 2).mean())
    return float("inf") if mse == 0 else float(10 * np.log10(1.0 / mse))


def decomposition_table(rows: dict[str, dict]) -> str:
    """| variant | composite PSNR | true-mask IoU | layer colour | bg colour | composite |, for decompositions."""
    keys = ("composite_psnr_db", "true_mask_iou", "fg_colour_acc", "bg_colour_acc", "composite_acc")
    lines = ["| variant | composite PSNR (dB) | true-mask IoU | layer colour | bg colour | composite |",
             "|---|---|---|---|---|---|"]
    for name, m in rows.items():
        psnr = m.get("composite_psnr_db")
        cells = [f"{psnr:.1f}" if isinstance(psnr, float) and psnr == psnr else "n/a"]
        cells += [_cell(m.get(k)) for k in keys[1:]]
        lines.append(f"| {name} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def chance_levels(truths: Sequence[shapes.ShapesTruth]) -> dict:
    """Chance baseline: uniform guesses over the vocabulary; true-mask IoU of true masks of different samples.

    Composite chance = P(all foreground colours and the background colour guessed right), averaged over samples.
    The mask/content agreement has no chance level (its floor is the untrained model).
    """
    n_col, n_shape, n_tex = len(shapes.COLOURS), len(shapes.SHAPES), len(shapes.TEXTURES)
    masks = [f.mask for t in truths for f in t.foregrounds]
    ious = [shapes.mask_iou(masks[i].numpy(), masks[(i + 1) % len(masks)].numpy()) for i in range(len(masks))]
    composite = [n_col ** -(len(t.foregrounds) + 1) for t in truths]
    return {"samples": len(truths), "layers": len(masks), "fg_colour_acc": 1 / n_col, "fg_shape_acc": 1 / n_shape,
            "mask_agreement": float("nan"), "true_mask_iou": _mean(ious), "bg_colour_acc": 1 / n_col,
            "bg_texture_acc": 1 / n_tex, "composite_acc": _mean(composite), "empty_mask_rate": float("nan"),
            "no_colour_rate": float("nan")}


def paired_difference(a: Sequence[SampleScore], b: Sequence[SampleScore], metric: str) -> dict:
    """Mean and standard error of ``metric`` of ``a`` minus ``b`` over the same samples (same prompts and seeds).

    ``metric``: "composite_acc" (per sample) or "fg_colour_acc" (per layer). Pairing removes the spread between
    samples, so the standard error is that of the difference, not of either score.
    """
    n = min(len(a), len(b))
    if metric == "composite_acc":
        diffs = [float(x.composite_ok) - float(y.composite_ok) for x, y in zip(a[:n], b[:n])]
    elif metric == "fg_colour_acc":
        diffs = [float(la.colour_ok) - float(lb.colour_ok) for x, y in zip(a[:n], b[:n])
                 for la, lb in zip(x.layers, y.layers)]
    else:
        raise ValueError(f"paired_difference: unknown metric {metric!r} (composite_acc or fg_colour_acc)")
    values = np.asarray(diffs, dtype=np.float64)
    se = float(values.std(ddof=1) / np.sqrt(len(values))) if len(values) > 1 else float("nan")
    return {"metric": metric, "n": len(values), "mean": float(values.mean()) if len(values) else float("nan"),
            "se": se}


def truth_layers(sample) -> tuple[LayeredImages, shapes.ShapesTruth]:
    """A dataset sample's own layers as a batch of one (ComfyUI IMAGE/MASK layout) and its truth; scoring them
    checks the scorer itself."""
    layers = LayeredImages(sample.background.permute(1, 2, 0)[None], sample.foregrounds.permute(0, 2, 3, 1)[None],
                           sample.masks[:, 0][None])
    return layers, shapes.shapes_truth(sample)


METRICS = ("fg_colour_acc", "fg_shape_acc", "mask_agreement", "true_mask_iou", "bg_colour_acc", "bg_texture_acc",
           "composite_acc")
HEADERS = ("layer colour", "layer shape", "mask/content", "true-mask IoU", "bg colour", "bg texture", "composite")


def _cell(value) -> str:
    return f"{value:.2f}" if isinstance(value, float) and value == value else "n/a"


def markdown_table(rows: dict[str, dict], extra: dict[str, str] | None = None) -> str:
    """| variant | metrics... | (+ an optional extra column per row, e.g. the sampling time)."""
    extra = extra or {}
    head = "| variant | " + " | ".join(HEADERS) + (" | time |" if extra else " |")
    lines = [head, "|" + "---|" * (len(HEADERS) + 1 + bool(extra))]
    for name, m in rows.items():
        cells = [_cell(m.get(k)) for k in METRICS]
        lines.append(f"| {name} | " + " | ".join(cells) + (f" | {extra.get(name, '')} |" if extra else " |"))
    return "\n".join(lines)


def per_colour_table(rows: dict[str, dict]) -> str:
    """Layer colour per prompt colour: | variant | red | orange | ... | with "right/layers" in each cell."""
    colours = [c for c in shapes.COLOURS if any(c in m.get("per_colour", {}) for m in rows.values())]
    lines = ["| variant | " + " | ".join(colours) + " |", "|" + "---|" * (len(colours) + 1)]
    for name, m in rows.items():
        counts = m.get("per_colour")
        if not counts:
            continue
        cells = [f"{counts[c][0]}/{counts[c][1]}" if c in counts else "" for c in colours]
        lines.append(f"| {name} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def score_dict(score: SampleScore) -> dict:
    out = asdict(score)
    for layer, obj in zip(out["layers"], score.layers):
        layer.update(colour_ok=obj.colour_ok, shape_ok=obj.shape_ok)
    return out
