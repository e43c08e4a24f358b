"""Cut-outs (RGBA objects) + background pictures -> composed layered samples with exact ground truth.

- :func:`read_cutout_folder`: every image with an alpha channel, cropped to its alpha's bounding box; the prompt
  comes from a sidecar ``<name>.txt`` next to it, else from the file name (``red_car_02.png`` -> "red car").
  Images without alpha, with no pixel of alpha >= 128, or that cannot be decoded are skipped with a reason.
- :func:`read_background_folder`: every image as 8-bit RGB (alpha dropped; grayscale, CMYK, palette and 16-bit
  images converted), prompts likewise.
- :func:`compose_cutout_samples`: per sample index a generator seeded with ``(seed, index)`` picks a background
  (resized to cover ``size`` = (H, W) and centre-cropped), distinct cut-outs, their scale (the longest side as a
  fraction of the canvas' shorter side), position (at most a quarter of each side outside the canvas) and depth
  order; placements are redrawn until every layer keeps ``min_visible`` of its mask visible (not covered by the
  layers above, not outside the canvas). Masks are alpha >= 128 of the resized cut-out; foreground RGB is the
  cut-out's RGB inside its mask and grey 0.5 elsewhere.
"""
from __future__ import annotations

from pathlib import Path
from typing import Iterator, Sequence

import numpy as np
import torch

from ...errors import DatasetError
from ..layered_sample import LayeredSample
from .picture_inputs import refusing_truncated_images
from .prompts import clean_prompt, global_prompt_from_layers, prompt_from_file_name

MASK_THRESHOLD = 128
GREY = 0.5
IMAGE_SUFFIXES = (".png", ".webp", ".tif", ".tiff", ".jpg", ".jpeg", ".bmp", ".gif")
MAX_OUTSIDE = 0.25  # at most this fraction of a cut-out's width / height may lie outside the canvas
PLACEMENT_TRIES = 40  # positions tried per layer ...
SAMPLE_TRIES = 20  # ... and whole samples redrawn before giving up

Item = tuple[str, np.ndarray]  # (prompt, uint8 image)
Skipped = tuple[Path, str]  # (path, reason)


def _image_files(folder) -> list[Path]:
    folder = Path(folder)
    if not folder.is_dir():
        raise DatasetError(f"image folder {folder} does not exist or is not a folder.")
    return sorted(p for p in folder.iterdir() if p.is_file() and p.suffix.lower() in IMAGE_SUFFIXES
                  and not p.name.startswith("."))


def _prompt(path: Path) -> str:
    sidecar = path.with_suffix(".txt")
    if sidecar.is_file():
        text = clean_prompt(sidecar.read_text(encoding="utf-8", errors="replace"))
        if text:
            return text
    return prompt_from_file_name(path)


def _open(path: Path):
    """The decoded Pillow image (fully loaded, so a truncated file fails here) or the reason it is skipped."""
    from PIL import Image

    try:
        with refusing_truncated_images():
            im = Image.open(path)
            im.load()
        return im, None
    except Exception as e:  # noqa: BLE001  (Pillow raises OSError, SyntaxError, ValueError ... for bad files)
        return None, f"cannot be decoded ({type(e).__name__}: {e})"


def _decoded_images(folder, skipped: list[Skipped]):
    """(path, open Pillow image) for every image file of ``folder`` that decodes; the others join ``skipped``."""
    for path in _image_files(folder):
        im, reason = _open(path)
        if im is None:
            skipped.append((path, reason))
        else:
            yield path, im


def _has_alpha(im) -> bool:
    return "A" in im.getbands() or (im.mode == "P" and "transparency" in im.info)


def read_cutout_folder(folder) -> tuple[list[Item], list[Skipped]]:
    """(cut-outs as (prompt, RGBA uint8 [h, w, 4]) cropped to the alpha's bounding box, skipped (path, reason))."""
    cutouts, skipped = [], []
    for path, im in _decoded_images(folder, skipped):
        with im:
            if not _has_alpha(im):
                skipped.append((path, f"has no alpha channel (mode {im.mode}); save the cut-out as a PNG with "
                                      "transparency"))
                continue
            rgba = np.asarray(im.convert("RGBA")).copy()  # [h, w, 4]
        if not (rgba[..., 3] >= MASK_THRESHOLD).any():
            skipped.append((path, "its alpha channel is empty (no pixel with alpha >= 128)"))
            continue
        prompt = _prompt(path)
        if not prompt:
            skipped.append((path, "has no prompt: add a <name>.txt next to it or rename the file"))
            continue
        ys, xs = np.nonzero(rgba[..., 3])
        cutouts.append((prompt, rgba[ys.min():ys.max() + 1, xs.min():xs.max() + 1].copy()))
    return cutouts, skipped


def _to_rgb8(im) -> np.ndarray:
    """Any Pillow image -> uint8 [H, W, 3] RGB; 16/32-bit integer and float grayscale are rescaled, not clipped."""
    if im.mode in ("I;16", "I;16B", "I;16L", "I;16N", "I", "F"):
        values = np.asarray(im).astype(np.float64)  # [H, W]
        top = 1.0 if im.mode == "F" else (65535.0 if im.mode.startswith("I;16") or values.max() > 255 else 255.0)
        grey = np.round(np.clip(values / top, 0, 1) * 255).astype(np.uint8)
        return np.repeat(grey[..., None], 3, axis=2)
    return np.asarray(im.convert("RGB")).copy()


def read_background_folder(folder, min_side: int = 64) -> tuple[list[Item], list[Skipped]]:
    """(backgrounds as (prompt, RGB uint8 [H, W, 3]), skipped (path, reason)); pictures with a side under
    ``min_side`` px are skipped."""
    backgrounds, skipped = [], []
    for path, im in _decoded_images(folder, skipped):
        with im:
            rgb = _to_rgb8(im)
        if min(rgb.shape[:2]) < min_side:
            skipped.append((path, f"is {rgb.shape[1]}x{rgb.shape[0]} px, smaller than {min_side} px a side"))
            continue
        prompt = _prompt(path)
        if not prompt:
            skipped.append((path, "has no prompt: add a <name>.txt next to it or rename the file"))
            continue
        backgrounds.append((prompt, rgb))
    return backgrounds, skipped


def cover_resize(rgb: np.ndarray, size: tuple[int, int]) -> np.ndarray:
    """Resize uint8 [h, w, 3] to cover (H, W) keeping its aspect ratio, then centre-crop -> [H, W, 3]."""
    from PIL import Image

    h, w = size
    ih, iw = rgb.shape[:2]
    scale = max(h / ih, w / iw)
    nh, nw = max(h, round(ih * scale)), max(w, round(iw * scale))
    resized = np.asarray(Image.fromarray(rgb).resize((nw, nh), Image.Resampling.LANCZOS))
    y0, x0 = (nh - h) // 2, (nw - w) // 2
    return resized[y0:y0 + h, x0:x0 + w].copy()


def _resize_cutout(rgba: np.ndarray, longest: int) -> np.ndarray:
    from PIL import Image

    ih, iw = rgba.shape[:2]
    f = longest / max(ih, iw)
    nh, nw = max(1, round(ih * f)), max(1, round(iw * f))
    return np.asarray(Image.fromarray(rgba).resize((nw, nh), Image.Resampling.LANCZOS))  # premultiplied resampling


def _chw(array: np.ndarray) -> torch.Tensor:
    """uint8 [H, W, 3] -> float32 [3, H, W] in [0, 1]."""
    return torch.from_numpy(np.ascontiguousarray(array.transpose(2, 0, 1))).float() / 255


def _check_args(cutouts, backgrounds, count, size, min_foregrounds, max_foregrounds, scale_range, min_visible):
    if not cutouts:
        raise DatasetError("no cut-outs to compose: the cut-out folder has no usable RGBA images (see the skipped "
                           "files).")
    if not backgrounds:
        raise DatasetError("no backgrounds to compose on: the background folder has no usable images.")
    if not isinstance(count, int) or count < 0:
        raise DatasetError(f"count must be an integer >= 0, got {count!r}.")
    if len(size) != 2 or min(size) < 8:
        raise DatasetError(f"size must be (height, width) of at least 8 px, got {size!r}.")
    if not (1 <= min_foregrounds <= max_foregrounds):
        raise DatasetError(f"need 1 <= min_foregrounds <= max_foregrounds, got {min_foregrounds}, {max_foregrounds}.")
    if len(cutouts) < min_foregrounds:
        raise DatasetError(f"min_foregrounds={min_foregrounds} distinct cut-outs per sample, but only "
                           f"{len(cutouts)} cut-outs were given: add cut-outs or lower min_foregrounds.")
    lo, hi = scale_range
    if not (0 < lo <= hi <= 1):
        raise DatasetError(f"scale_range must satisfy 0 < low <= high <= 1 (a fraction of the canvas side), "
                           f"got {scale_range!r}.")
    if not (0 <= min_visible <= 1):
        raise DatasetError(f"min_visible must be in [0, 1], got {min_visible!r}.")
    for i, (prompt, rgba) in enumerate(cutouts):
        if not isinstance(rgba, np.ndarray) or rgba.dtype != np.uint8 or rgba.ndim != 3 or rgba.shape[2] != 4:
            raise DatasetError(f"cut-out {i} ({prompt!r}) must be RGBA uint8 [h, w, 4] (read_cutout_folder).")
    for i, (prompt, rgb) in enumerate(backgrounds):
        if not isinstance(rgb, np.ndarray) or rgb.dtype != np.uint8 or rgb.ndim != 3 or rgb.shape[2] != 3:
            raise DatasetError(f"background {i} ({prompt!r}) must be RGB uint8 [H, W, 3] (read_background_folder).")


def _place(rng, rgba: np.ndarray, size, above: np.ndarray, min_visible: float):
    """Try positions for one resized cut-out; (x0, y0, canvas mask bool [H, W], visible fraction) or None."""
    h, w = size
    ch, cw = rgba.shape[:2]
    local = rgba[..., 3] >= MASK_THRESHOLD  # [ch, cw]
    area = int(local.sum())
    if area == 0:
        return None
    for _ in range(PLACEMENT_TRIES):
        x0 = int(rng.integers(-int(MAX_OUTSIDE * cw), w - cw + int(MAX_OUTSIDE * cw) + 1))
        y0 = int(rng.integers(-int(MAX_OUTSIDE * ch), h - ch + int(MAX_OUTSIDE * ch) + 1))
        mask = np.zeros((h, w), bool)
        ys, xs = slice(max(y0, 0), min(y0 + ch, h)), slice(max(x0, 0), min(x0 + cw, w))
        mask[ys, xs] = local[ys.start - y0:ys.stop - y0, xs.start - x0:xs.stop - x0]
        visible = float((mask & ~above).sum()) / area
        if visible >= min_visible and mask.any():
            return x0, y0, mask, visible
    return None


def _compose_one(cutouts, backgrounds, index, seed, size, min_fg, max_fg, scale_range, min_visible):
    rng = np.random.default_rng([seed, index])
    h, w = size
    for _ in range(SAMPLE_TRIES):
        bg_index = int(rng.integers(len(backgrounds)))
        n = int(rng.integers(min_fg, min(max_fg, len(cutouts)) + 1))
        order = [int(i) for i in rng.choice(len(cutouts), n, replace=False)]  # top first: random depth order
        above = np.zeros((h, w), bool)
        layers = []
        for ci in order:  # a layer's visibility depends only on the layers above it: place top-down
            scale = float(rng.uniform(*scale_range))
            resized = _resize_cutout(cutouts[ci][1], max(1, round(scale * min(h, w))))
            placed = _place(rng, resized, size, above, min_visible)
            if placed is None:
                break
            x0, y0, mask, visible = placed
            layers.append((ci, scale, resized, x0, y0, mask, visible))
            above |= mask
        else:
            return bg_index, layers
    raise DatasetError(f"could not place the cut-outs of sample {index} so that each keeps {min_visible:.0%} "
                       f"visible after {SAMPLE_TRIES} tries: lower min_visible, max_foregrounds or scale_range.")


def compose_cutout_samples(cutouts: Sequence[Item], backgrounds: Sequence[Item], count: int, *, seed: int,
                           size: tuple[int, int] = (512, 512), min_foregrounds: int = 1, max_foregrounds: int = 3,
                           scale_range: tuple[float, float] = (0.25, 0.6), min_visible: float = 0.5,
                           start: int = 0) -> Iterator[LayeredSample]:
    """``count`` samples with indices ``start .. start+count-1``; sample i depends only on (seed, i) and the
    inputs. ``size`` is (H, W). ``meta["placement"]`` records the background index and, top first, each layer's
    cut-out index, scale, box (x0, y0, x1, y1; may extend past the canvas) and visible fraction."""
    _check_args(cutouts, backgrounds, count, size, min_foregrounds, max_foregrounds, scale_range, min_visible)
    h, w = int(size[0]), int(size[1])
    for index in range(start, start + count):
        bg_index, layers = _compose_one(cutouts, backgrounds, index, seed, (h, w), min_foregrounds,
                                        max_foregrounds, scale_range, min_visible)
        rgb = cover_resize(backgrounds[bg_index][1], (h, w))  # [H, W, 3]
        fgs = torch.full((len(layers), 3, h, w), GREY)
        masks = torch.zeros((len(layers), 1, h, w))
        placement = []
        for k, (ci, scale, resized, x0, y0, mask, visible) in enumerate(layers):
            ch, cw = resized.shape[:2]
            canvas = np.zeros((h, w, 3), np.uint8)
            ys, xs = slice(max(y0, 0), min(y0 + ch, h)), slice(max(x0, 0), min(x0 + cw, w))
            canvas[ys, xs] = resized[ys.start - y0:ys.stop - y0, xs.start - x0:xs.stop - x0, :3]
            m = torch.from_numpy(mask)
            fgs[k] = torch.where(m, _chw(canvas), fgs[k])
            masks[k, 0] = m.float()
            placement.append({"cutout": ci, "scale": round(scale, 6), "box": [x0, y0, x0 + cw, y0 + ch],
                              "visible": round(visible, 6)})
        prompts = [cutouts[p["cutout"]][0] for p in placement]
        bg_prompt = backgrounds[bg_index][0]
        yield LayeredSample(global_prompt=global_prompt_from_layers(prompts, bg_prompt), background_prompt=bg_prompt,
                            foreground_prompts=prompts, background=_chw(rgb),
                            foregrounds=fgs, masks=masks, key=f"cutout{index:08d}",
                            meta={"source": "cutouts", "seed": seed, "index": index,
                                  "placement": {"background": bg_index, "order": [p["cutout"] for p in placement],
                                                "layers": placement}})
