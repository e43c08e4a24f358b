"""The procedural "shapes" layered dataset and its evaluation helpers (docs/DESIGN.md 2.7).

Each sample: a background (plain, striped, checkered or dotted, in one vocabulary colour) and 1..N foreground
shapes (circle, square, triangle, ring) in vocabulary colours, depth-ordered (fg_1 on top) and occluding each
other. Prompts: "a red circle", "a blue striped background", and the global prompt
"a red circle and a green square on a blue striped background" (top layer named first). Everything follows from
``(seed, index)``, so a sample can be regenerated alone and two runs give identical files.

Images are [3,H,W] float in [0, 1] like every
:class:`~layerdiff_model.data.layered_sample.LayeredSample`. A foreground layer is its shape in
its colour on neutral grey (0.5, i.e. 0 in the VAE's [-1, 1] range); its mask is the full, un-occluded shape.
A texture alternates the background colour with its "shade" (the colour half-way to grey).

Ground truth (colours, shapes, texture) rides in ``sample.meta`` and therefore in sample.json;
:func:`shapes_truth` turns it back into :class:`ShapesTruth`. The classifiers at the bottom (no learning) read
colour, shape and texture back from images, so an evaluation can check what a model generated per layer.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Iterator, Sequence

import numpy as np
import torch
from PIL import Image, ImageDraw

from comfy_headless.product import product_names

LayeredSample = product_names("layerdiff_model.data.layered_sample", "LayeredSample")
DatasetError = product_names("layerdiff_model.errors", "DatasetError")

GENERATOR = "layerdiff-shapes-1"

# Well-separated RGB colours (0-255); the closest pair (orange, yellow) is ~80 apart.
COLOURS: dict[str, tuple[int, int, int]] = {
    "red": (220, 40, 40),
    "orange": (245, 140, 30),
    "yellow": (240, 220, 40),
    "green": (40, 170, 60),
    "blue": (40, 80, 220),
    "purple": (140, 60, 190),
    "white": (245, 245, 245),
    "black": (25, 25, 25),
}
SHAPES: tuple[str, ...] = ("circle", "square", "triangle", "ring")
TEXTURES: tuple[str, ...] = ("plain", "striped", "checkered", "dotted")
FOREGROUND_FILL = 0.5  # grey outside the shape in a foreground layer
RING_INNER = 0.5  # inner / outer radius of a ring
# One random stream per split: the same seed gives unrelated samples. "val" is the held-out seed range of the
# held-out pairs: the test pairs in other layouts, for every tuning decision (the test split is scored once per run).
_SPLIT_STREAMS = {"all": 0, "train": 1, "test": 2, "val": 3}


def shade(colour: str) -> tuple[int, int, int]:
    """The second colour of a textured background: ``colour`` half-way to mid-grey."""
    return tuple(int(round(c + 0.5 * (128 - c))) for c in COLOURS[colour])


def _a(phrase: str) -> str:
    return ("an " if phrase[0] in "aeiou" else "a ") + phrase


def shape_prompt(colour: str, shape: str) -> str:
    return _a(f"{colour} {shape}")


def background_prompt(colour: str, texture: str) -> str:
    return f"a plain {colour} background" if texture == "plain" else _a(f"{colour} {texture} background")


def global_prompt(foregrounds: Sequence[tuple[str, str]], colour: str, texture: str) -> str:
    """"a red circle, a green square and a blue ring on a white dotted background" (top layer first)."""
    names = [shape_prompt(c, s) for c, s in foregrounds]
    things = names[0] if len(names) == 1 else ", ".join(names[:-1]) + " and " + names[-1]
    return f"{things} on {background_prompt(colour, texture)}"


def vocabulary() -> tuple[str, ...]:
    """Every word a shapes prompt can contain (the toy model's random, frozen text encoder knows no other)."""
    return ("a", "an", *COLOURS, *SHAPES, *TEXTURES, "background", "and", "on")


def unknown_words(prompt: str) -> list[str]:
    """Words of ``prompt`` that no shapes prompt contains, in order of appearance (case and commas ignored)."""
    known, seen = set(vocabulary()), []
    for word in prompt.lower().replace(",", " ").split():
        if word not in known and word not in seen:
            seen.append(word)
    return seen


def _words(prompt: str) -> list[str]:
    return prompt.lower().replace(",", " ").split()


def _parse_thing(words: list[str]) -> bool:
    return len(words) == 3 and words[0] in ("a", "an") and words[1] in COLOURS and words[2] in SHAPES


def _parse_background(words: list[str]) -> bool:
    return (len(words) == 4 and words[0] == "a" and words[1] == "plain" and words[2] in COLOURS
            and words[3] == "background") or (len(words) == 4 and words[0] in ("a", "an") and words[1] in COLOURS
                                              and words[2] in TEXTURES[1:] and words[3] == "background")


def prompt_problem(prompt: str, kind: str) -> str | None:
    """Why the toy model cannot read ``prompt`` as a ``kind`` ("foreground", "background" or "global") prompt, or
    None. The toy's text encoder is random and frozen, so it knows only the dataset's words *and* phrasing: "a green
    background" is all known words, but the trained form is "a plain green background"."""
    words = unknown_words(prompt)
    if words:
        return f"words it never saw: {' '.join(words)}"
    tokens = _words(prompt)
    if kind == "foreground":
        ok, form = _parse_thing(tokens), shape_prompt("red", "circle")
    elif kind == "background":
        ok, form = _parse_background(tokens), background_prompt("green", "plain")
    else:
        ok, form = False, global_prompt([("red", "circle"), ("blue", "square")], "green", "plain")
        if "on" in tokens:
            cut = len(tokens) - 1 - tokens[::-1].index("on")
            things, parts, current = tokens[:cut], [], []
            for word in things:
                if word == "and" or (word in ("a", "an") and current):
                    parts.append(current)
                    current = [] if word == "and" else [word]
                else:
                    current.append(word)
            parts.append(current)
            ok = all(_parse_thing(p) for p in parts if p) and _parse_background(tokens[cut + 1:])
    return None if ok else f"phrasing it was never trained on (trained form: \"{form}\")"


def all_combinations(colours: Sequence[str] = tuple(COLOURS), shapes: Sequence[str] = SHAPES
                     ) -> list[tuple[str, str]]:
    return [(c, s) for c in colours for s in shapes]


def held_out_combinations(seed: int = 0, colours: Sequence[str] = tuple(COLOURS), shapes: Sequence[str] = SHAPES,
                          per_colour: int = 1) -> tuple[list[tuple[str, str]], list[tuple[str, str]]]:
    """Deterministic (train, test) split of (colour, shape) pairs; test pairs are never seen in training.

    Every colour loses ``per_colour`` shapes to the test set and the held-out shapes rotate over colours, so every
    colour and every shape still appears in training: the test set measures unseen *combinations*.
    """
    colours, shapes = list(colours), list(shapes)
    if not 0 < per_colour < len(shapes):
        raise DatasetError(f"per_colour must be between 1 and {len(shapes) - 1} (number of shapes - 1), "
                           f"got {per_colour}.")
    rng = np.random.default_rng([seed, 0x5EED])
    order, offset = rng.permutation(len(colours)), int(rng.integers(len(shapes)))
    test = {(colours[ci], shapes[(rank * per_colour + j + offset) % len(shapes)])
            for rank, ci in enumerate(order) for j in range(per_colour)}
    every = all_combinations(colours, shapes)
    return [p for p in every if p not in test], [p for p in every if p in test]


def split_combinations(split: str, seed: int = 0) -> list[tuple[str, str]]:
    """Foreground pairs allowed in a split: "train", "test" and "val" (both the held-out pairs) or "all"."""
    if split == "all":
        return all_combinations()
    if split not in ("train", "test", "val"):
        raise DatasetError(f"Unknown split {split!r}: expected 'train', 'val', 'test' or 'all'.")
    train, test = held_out_combinations(seed)
    return train if split == "train" else test


def config_for_split(split: str, size: int = 64, min_foregrounds: int = 1, max_foregrounds: int = 3,
                     split_seed: int = 0) -> "ShapesConfig":
    """Generator settings for "train" (seen pairs), "val" / "test" (held-out pairs, separate streams) or "all"."""
    combos = tuple(split_combinations(split, split_seed))
    return ShapesConfig(size=size, min_foregrounds=min_foregrounds, max_foregrounds=max_foregrounds,
                        combos=combos, split=split)


@dataclass(frozen=True)
class ShapesConfig:
    """size: image side (multiple of 8, >= 32); combos: allowed (colour, shape) foregrounds (None = all)."""

    size: int = 64
    min_foregrounds: int = 1
    max_foregrounds: int = 3
    combos: tuple[tuple[str, str], ...] | None = None
    textures: tuple[str, ...] = TEXTURES
    min_visible: float = 0.5  # every foreground keeps at least this fraction of its area visible in the composite
    split: str = "all"  # recorded in meta; also picks the random stream, so splits never share samples

    def check(self) -> None:
        if self.size % 8 or self.size < 32:
            raise DatasetError(f"Shapes image size must be a multiple of 8 and at least 32, got {self.size}.")
        if self.split not in _SPLIT_STREAMS:
            raise DatasetError(f"Unknown split {self.split!r}: expected one of {list(_SPLIT_STREAMS)}.")
        combos = self.combos or all_combinations()
        unknown = [t for t in self.textures if t not in TEXTURES] + \
            [p for p in combos if p[0] not in COLOURS or p[1] not in SHAPES]
        if unknown or not self.textures:
            raise DatasetError(f"Unknown shapes vocabulary {unknown}: colours {list(COLOURS)}, shapes "
                               f"{list(SHAPES)}, textures {list(TEXTURES)} (at least one texture).")
        if not 1 <= self.min_foregrounds <= self.max_foregrounds <= len(combos):
            raise DatasetError(f"Foreground counts {self.min_foregrounds}..{self.max_foregrounds} need "
                               f"1 <= min <= max <= {len(combos)} (the number of allowed colour/shape pairs).")


# ----------------------------------------------------------------------------------------------- rendering


def _scaled(period: int, size: int) -> int:
    return max(4, int(round(period * size / 64)))


def render_background(colour: str, texture: str, size: int, rng: np.random.Generator) -> tuple[np.ndarray, dict]:
    """[H, W, 3] uint8 background and its texture parameters."""
    yy, xx = np.mgrid[0:size, 0:size]
    params: dict = {}
    if texture == "plain":
        pattern = np.zeros((size, size), bool)
    elif texture == "striped":
        period = _scaled(int(rng.choice([8, 12, 16])), size)
        orientation = str(rng.choice(["horizontal", "vertical"]))
        coord = yy if orientation == "horizontal" else xx
        pattern = (coord + int(rng.integers(period))) % period < period // 2
        params = {"period": period, "orientation": orientation}
    elif texture == "checkered":
        cell = _scaled(int(rng.choice([8, 16])), size)
        oy, ox = (int(v) for v in rng.integers(cell, size=2))
        pattern = ((yy + oy) // cell + (xx + ox) // cell) % 2 == 1
        params = {"cell": cell}
    elif texture == "dotted":
        period = _scaled(int(rng.choice([10, 12, 16])), size)
        oy, ox = (int(v) for v in rng.integers(period, size=2))
        dy, dx = (yy + oy) % period - (period - 1) / 2, (xx + ox) % period - (period - 1) / 2
        pattern = dy ** 2 + dx ** 2 <= (0.25 * period) ** 2
        params = {"period": period}
    else:
        raise DatasetError(f"Unknown texture {texture!r}: expected one of {list(TEXTURES)}.")
    image = np.where(pattern[..., None], np.array(shade(colour), np.uint8), np.array(COLOURS[colour], np.uint8))
    return image.astype(np.uint8), params


def render_shape(shape: str, box: tuple[int, int, int, int], size: int) -> np.ndarray:
    """Binary [H, W] mask of ``shape`` filling the square ``box`` = (x0, y0, x1, y1), inclusive corners."""
    img = Image.new("L", (size, size), 0)
    draw = ImageDraw.Draw(img)
    x0, y0, x1, y1 = box
    if shape == "circle":
        draw.ellipse(box, fill=255)
    elif shape == "square":
        draw.rectangle(box, fill=255)
    elif shape == "triangle":
        draw.polygon([((x0 + x1) / 2, y0), (x0, y1), (x1, y1)], fill=255)
    elif shape == "ring":
        draw.ellipse(box, fill=255)
        cx, cy, r = (x0 + x1) / 2, (y0 + y1) / 2, RING_INNER * (x1 - x0) / 2
        draw.ellipse((cx - r, cy - r, cx + r, cy + r), fill=0)
    else:
        raise DatasetError(f"Unknown shape {shape!r}: expected one of {list(SHAPES)}.")
    return np.asarray(img) >= 128


def _place(shapes: Sequence[str], size: int, min_visible: float, rng: np.random.Generator
           ) -> tuple[list[tuple[int, int, int, int]], list[np.ndarray]]:
    """Random boxes inside the image such that each layer stays ``min_visible`` visible (best of 50 tries)."""
    best = None
    for _ in range(50):
        boxes, masks = [], []
        for shape in shapes:
            side = int(rng.integers(int(0.28 * size), int(0.5 * size) + 1))
            x0, y0 = (int(v) for v in rng.integers(1, size - side, size=2))
            boxes.append((x0, y0, x0 + side - 1, y0 + side - 1))
            masks.append(render_shape(shape, boxes[-1], size))
        covered, worst = np.zeros((size, size), bool), 1.0
        for m in masks:  # top first
            worst = min(worst, (m & ~covered).sum() / max(1, m.sum()))
            covered |= m
        if best is None or worst > best[0]:
            best = (worst, boxes, masks)
        if worst >= min_visible:
            break
    return best[1], best[2]


def generate_sample(seed: int, index: int, config: ShapesConfig = ShapesConfig()) -> LayeredSample:
    """Sample ``index`` of the shapes dataset with ``seed``; identical for identical arguments.

    Use ``config_for_split`` for the train/test splits of held-out colour/shape combinations.
    """
    config.check()
    rng = np.random.default_rng([seed, index, _SPLIT_STREAMS[config.split]])
    combos = list(config.combos or all_combinations())
    n = int(rng.integers(config.min_foregrounds, config.max_foregrounds + 1))
    picked = [combos[i] for i in rng.choice(len(combos), size=n, replace=False)]
    free = [c for c in COLOURS if c not in {c for c, _ in picked}] or list(COLOURS)
    bg_colour, texture = str(rng.choice(free)), str(rng.choice(list(config.textures)))
    background, params = render_background(bg_colour, texture, config.size, rng)
    boxes, masks = _place([s for _, s in picked], config.size, config.min_visible, rng)
    fgs = []
    for (colour, _), mask in zip(picked, masks):
        layer = np.full((config.size, config.size, 3), round(FOREGROUND_FILL * 255), np.uint8)
        layer[mask] = COLOURS[colour]
        fgs.append(torch.from_numpy(layer).permute(2, 0, 1).float() / 255)  # HWC -> CHW
    meta = {"generator": GENERATOR, "seed": seed, "index": index, "split": config.split,
            "background": {"colour": bg_colour, "texture": texture, **params},
            "foregrounds": [{"colour": c, "shape": s, "box": list(b)} for (c, s), b in zip(picked, boxes)]}
    return LayeredSample(
        global_prompt=global_prompt(picked, bg_colour, texture),
        background_prompt=background_prompt(bg_colour, texture),
        foreground_prompts=[shape_prompt(c, s) for c, s in picked],
        background=torch.from_numpy(background).permute(2, 0, 1).float() / 255,
        foregrounds=torch.stack(fgs),
        masks=torch.stack([torch.from_numpy(m).float()[None] for m in masks]),  # [N,1,H,W]
        meta=meta,
        key=f"{index:08d}",
    )


def generate_samples(seed: int, count: int, config: ShapesConfig = ShapesConfig(), start: int = 0
                     ) -> Iterator[LayeredSample]:
    for index in range(start, start + count):
        yield generate_sample(seed, index, config)


@dataclass
class ForegroundTruth:
    colour: str
    shape: str
    mask: torch.Tensor  # [H, W] bool, full (un-occluded) extent
    visible: torch.Tensor  # [H, W] bool, the part seen in the composite


@dataclass
class ShapesTruth:
    background_colour: str
    background_texture: str
    foregrounds: list[ForegroundTruth] = field(default_factory=list)  # top first


def shapes_truth(sample: LayeredSample) -> ShapesTruth:
    """Ground truth of a shapes sample (from ``sample.meta``, e.g. read back from sample.json)."""
    meta = sample.meta
    if meta.get("generator") != GENERATOR:
        raise DatasetError(f"Sample {sample.key or '(no key)'} was not made by the shapes generator "
                           f"(meta.generator = {meta.get('generator')!r}, expected {GENERATOR!r}).")
    masks = sample.masks[:, 0] > 0.5  # [N, H, W]
    covered = torch.zeros_like(masks[0])
    fgs = []
    for info, mask in zip(meta["foregrounds"], masks):
        fgs.append(ForegroundTruth(info["colour"], info["shape"], mask, mask & ~covered))
        covered = covered | mask
    return ShapesTruth(meta["background"]["colour"], meta["background"]["texture"], fgs)


# ----------------------------------------------------------------------------------------------- classifiers


def _as_numpy(x) -> np.ndarray:
    arr = x.detach().cpu().numpy() if isinstance(x, torch.Tensor) else np.asarray(x)
    return arr.astype(np.float64) / 255 if arr.dtype == np.uint8 else arr.astype(np.float64)


def _pixels(rgb, mask=None) -> np.ndarray:
    """[K, 3] pixels in [0, 1] from a [3,H,W] image (optionally masked by [H,W]/[1,H,W]) or a [K,3] array."""
    arr = _as_numpy(rgb)
    if arr.ndim == 3 and arr.shape[0] == 3:
        arr = arr.transpose(1, 2, 0)  # CHW -> HWC
        if mask is not None:
            arr = arr[_as_numpy(mask).reshape(arr.shape[:2]) > 0.5]
        return arr.reshape(-1, 3)
    if arr.ndim == 2 and arr.shape[1] == 3:
        return arr
    raise DatasetError(f"Expected a [3,H,W] image or [K,3] pixels, got shape {arr.shape}.")


_VOCAB = np.array(list(COLOURS.values()), np.float64) / 255  # [C, 3]
_NAMES = list(COLOURS)


def dominant_colour_name(rgb_pixels, mask=None) -> str:
    """Vocabulary colour nearest to the per-channel median of the pixels ("none" when no pixel)."""
    px = _pixels(rgb_pixels, mask)
    if len(px) == 0:
        return "none"
    median = np.median(px, axis=0)
    return _NAMES[int(np.argmin(((_VOCAB - median) ** 2).sum(1)))]


def background_colour_name(rgb, mask=None) -> str:
    """Colour of a (possibly textured) background: every pixel votes for the nearest colour or shade."""
    px = _pixels(rgb, mask)
    if len(px) == 0:
        return "none"
    palette = np.concatenate([_VOCAB, np.array([shade(c) for c in _NAMES], np.float64) / 255])  # [2C, 3]
    nearest = ((px[:, None, :] - palette[None]) ** 2).sum(-1).argmin(1) % len(_NAMES)
    return _NAMES[int(np.bincount(nearest, minlength=len(_NAMES)).argmax())]


def _binary(mask) -> np.ndarray:
    arr = _as_numpy(mask)
    arr = arr[0] if arr.ndim == 3 else arr
    return arr > 0.5


def majority_filter(mask) -> np.ndarray:
    """3x3 majority vote of a binary [H, W] mask (removes isolated pixels and pin holes)."""
    m = _binary(mask)
    padded = np.pad(m.astype(np.int32), 1)
    h, w = m.shape
    votes = sum(padded[dy:dy + h, dx:dx + w] for dy in range(3) for dx in range(3))
    return votes >= 5


def largest_component(mask) -> np.ndarray:
    """The largest 4-connected region of a binary [H, W] mask (label propagation, no scipy)."""
    m = _binary(mask)
    if not m.any():
        return m
    big = m.size  # label = flat index of a pixel of the same region; ``big`` marks the outside
    labels = np.where(m, np.arange(m.size).reshape(m.shape), big)
    while True:
        padded = np.pad(labels, 1, constant_values=big)
        neighbours = np.minimum.reduce([padded[:-2, 1:-1], padded[2:, 1:-1], padded[1:-1, :-2], padded[1:-1, 2:]])
        new = np.where(m, np.minimum(labels, neighbours), big)
        flat = new.reshape(-1)
        for _ in range(4):  # pointer jumping: take the label of the pixel the label points at
            flat[m.reshape(-1)] = flat[flat[m.reshape(-1)]]
        if np.array_equal(new, labels):
            break
        labels = new
    values, counts = np.unique(labels[m], return_counts=True)
    return labels == values[counts.argmax()]


def shape_name_from_mask(mask, clean: bool = True) -> str:
    """circle / square / triangle / ring from bounding-box fill ratio, a centre hole and top-bottom symmetry.

    Fill ratios: square ~1.0, circle ~0.785, ring ~0.59, triangle ~0.5. ``clean`` removes speckle (3x3 majority)
    and keeps the largest region only.
    Returns "none" for an empty mask.
    """
    m = largest_component(majority_filter(mask)) if clean else _binary(mask)
    if not m.any():
        return "none"
    ys, xs = np.nonzero(m)
    box = m[ys.min():ys.max() + 1, xs.min():xs.max() + 1]
    h, w = box.shape
    fill = box.mean()
    cy, cx, r = (h - 1) / 2, (w - 1) / 2, max(1.0, min(h, w) / 10)  # centre window, ~1/5 of the box
    centre = box[int(np.ceil(cy - r)): int(np.floor(cy + r)) + 1, int(np.ceil(cx - r)): int(np.floor(cx + r)) + 1]
    if min(h, w) >= 6 and centre.mean() < 0.5:
        return "ring"
    top, bottom = box[: h // 2].sum(), box[(h + 1) // 2:].sum()
    if top < 0.6 * bottom or bottom < 0.6 * top:
        return "triangle"
    prototypes = {"square": 1.0, "circle": np.pi / 4, "triangle": 0.5}
    return min(prototypes, key=lambda k: abs(prototypes[k] - fill))


def mask_iou(a, b) -> float:
    """Intersection over union of two binary masks (threshold 0.5); 1.0 when both are empty."""
    ma, mb = _binary(a), _binary(b)
    union = np.logical_or(ma, mb).sum()
    return 1.0 if union == 0 else float(np.logical_and(ma, mb).sum() / union)


def _two_means(values: np.ndarray) -> tuple[np.ndarray, float]:
    """Split 1-D values in two clusters; returns (is_high, separation = gap of the means / within-cluster std)."""
    threshold = (np.percentile(values, 5) + np.percentile(values, 95)) / 2
    for _ in range(10):
        low, high = values[values <= threshold], values[values > threshold]
        if len(low) == 0 or len(high) == 0:
            return values > threshold, 0.0
        threshold = (low.mean() + high.mean()) / 2
    within = np.sqrt((((low - low.mean()) ** 2).sum() + ((high - high.mean()) ** 2).sum()) / len(values))
    return values > threshold, float((high.mean() - low.mean()) / max(within, 1e-6))


def background_texture_name(rgb) -> str:
    """plain / striped / checkered / dotted for a [3,H,W] background image.

    Pixels are projected on their main colour axis. No variation, or no two well separated colour clusters
    (noise only), is plain; variation along one image axis only is striped; otherwise the share of the minority
    cluster separates checkered (~1/2) from dotted (~1/5).
    """
    px = _pixels(rgb)
    h, w = _as_numpy(rgb).shape[-2:]
    centred = px - px.mean(0)
    _, _, vt = np.linalg.svd(centred, full_matrices=False)
    s = (centred @ vt[0]).reshape(h, w)  # [H, W] main-axis projection
    if s.std() < 0.02:
        return "plain"
    high, separation = _two_means(s.reshape(-1))
    if separation < 3.0:  # a unimodal spread: Gaussian noise splits at ~2.7, a texture at > 3
        return "plain"
    along_rows, along_cols = s.var(axis=1).mean(), s.var(axis=0).mean()
    if min(along_rows, along_cols) < 0.25 * max(along_rows, along_cols):
        return "striped"
    return "checkered" if min(high.mean(), 1 - high.mean()) > 0.35 else "dotted"


def classify_sample_layers(sample: LayeredSample) -> dict:
    """What the classifiers read from each layer: background colour/texture, per foreground colour and shape.

    Same layout as ``sample.meta`` of a shapes sample, so a result compares directly with the ground truth.
    """
    return {
        "background": {"colour": background_colour_name(sample.background),
                       "texture": background_texture_name(sample.background)},
        "foregrounds": [{"colour": dominant_colour_name(fg, m), "shape": shape_name_from_mask(m)}
                        for fg, m in zip(sample.foregrounds, sample.masks)],
    }
