"""Layered files (PSD, ORA) made by artists -> layered training samples.

Rules (docs/DATASET.md):

- The file is read as a layer tree (:func:`..layers.layer_tree.read_layer_tree`). Hidden layers, hidden groups
  and everything inside a hidden group are dropped. A *top-level* group becomes ONE layer: its visible children
  (nested groups included) alpha-composited in their order, with the group's opacity; its prompt is the group's
  name. Layers are clipped to the canvas; a top-level entry with no pixel of alpha >= 128 left (outside the
  canvas, fully or faintly transparent) is dropped as empty.
- The bottom remaining entry is the background (its name -> background prompt). Where it is not opaque it is
  composited over the mean colour of its opaque (alpha >= 128) pixels, so the background is a full opaque image.
- Every entry above is a foreground, top first: RGB on the full frame, grey 0.5 outside its mask; mask = alpha
  >= 128 (the :data:`MASK_THRESHOLD`); prompt = the name with whitespace collapsed.
- A name that is an editor default ("Layer 3", "Layer 3 copy", "Ebene 2", "Calque 1", "Background", "Group 1",
  ...; :func:`is_default_layer_name`) is no prompt: with a captioner the layer's crop (its bounding box, RGB over
  grey) is captioned instead; without one the file is rejected (``"default-layer-names"``), except for the bottom
  layer, whose prompt becomes "a background" (Photoshop names nearly every bottom layer "Background").
- Global prompt: the captioner's caption of the visible composite, else
  :func:`.prompts.global_prompt_from_layers`.
- Rejected files raise :class:`ImportRejected` with a stable ``reason`` code (see :data:`REJECT_REASONS`).
  ``sample.meta["import"]`` counts what was dropped: ``{"source", "layers", "hidden", "empty", "groups",
  "captioned"}`` (``hidden``: pixel layers hidden themselves or inside a hidden group; ``empty``: visible top-level
  entries without pixels; ``groups``: top-level groups merged into one layer each).
"""
from __future__ import annotations

import re
from pathlib import Path
from typing import Iterator, Sequence

import numpy as np
import torch

from ...errors import DatasetError
from ...layers.layer_tree import LayerTree, PsdColourModeError, TreeNode, flatten_visible, read_layer_tree
from ...layers.layered_files import LayeredFileError
from ..layered_sample import LayeredSample
from .prompts import clean_prompt, global_prompt_from_layers
from .sample_keys import key_from_name, unique_key

MASK_THRESHOLD = 128  # alpha >= 128 (of 255) is inside a layer's mask
GREY = 0.5  # foreground RGB outside the mask
GENERIC_BACKGROUND_PROMPT = "a background"  # for a bottom layer with an editor-default name and no captioner
LAYERED_SUFFIXES = (".psd", ".ora")
REJECT_REASONS = ("unreadable", "not-layered-file", "unsupported-colour-mode", "too-small", "no-layers",
                  "only-background", "too-many-layers", "default-layer-names", "empty-caption")

_DEFAULT_WORDS = (
    r"layer|paint layer|vector layer|pasted layer|shape|shape layer|ebene|calque|capa|livello|laag|warstwa"
    r"|camada|слой|图层|圖層|レイヤー|레이어|group|group layer|gruppe|groupe|grupo|gruppo|groep|"
    r"background|hintergrund|arrière-plan|arriere-plan|fondo|sfondo|achtergrond|tło|fundo|背景|фон|"
    r"untitled|unnamed|new layer|neue ebene|nouveau calque|"
)
_COPY_WORDS = r"copy|kopie|copie|copia|kopia|cópia|копия"
_DEFAULT_NAME = re.compile(
    rf"^(?:{_DEFAULT_WORDS})\s*#?\s*\d*(?:\s+(?:{_COPY_WORDS})(?:\s*#?\s*\d+)?)*$", re.IGNORECASE)


class ImportRejected(DatasetError):
    """A layered file that cannot become a sample; ``reason`` is a short stable code (:data:`REJECT_REASONS`)."""

    def __init__(self, reason: str, message: str):
        super().__init__(message)
        self.reason = reason

    def __reduce__(self):  # picklable across worker processes
        return type(self), (self.reason, str(self))


def is_default_layer_name(name: str) -> bool:
    """True for names editors give new layers ("Layer 3", "Layer 3 copy 2", "Ebene 2", "Calque 1", "Background",
    "Hintergrund", "Group 1", "Paint Layer 4", an empty name): they describe nothing."""
    return bool(_DEFAULT_NAME.match(clean_prompt(name)))


def _reject(reason: str, path, message: str) -> ImportRejected:
    return ImportRejected(reason, f"{Path(path).name}: {message}")


def _read(path) -> LayerTree:
    path = Path(path)
    if path.suffix.lower() not in LAYERED_SUFFIXES:
        raise _reject("not-layered-file", path, f"is not a .psd or .ora file (found {path.suffix or 'no suffix'}).")
    try:
        if path.stat().st_size == 0:
            raise _reject("unreadable", path, "the file is empty (0 bytes); export it again from your editor.")
        return read_layer_tree(path)
    except PsdColourModeError as e:
        raise ImportRejected("unsupported-colour-mode", str(e)) from e
    except LayeredFileError as e:
        raise ImportRejected("unreadable", f"{e} Save it again from your editor.") from e
    except OSError as e:
        raise _reject("unreadable", path, f"cannot be read: {e}.") from e


def _flatten_entries(tree: LayerTree, stats: dict) -> list[tuple[str, np.ndarray]]:
    """Top-level entries -> visible (name, RGBA [H, W, 4]) pairs, top first; counts hidden / empty / groups."""
    h, w = tree.size
    out = []
    for node in tree.layers:
        pixel_layers = node.pixel_layers()
        stats["layers"] += len(pixel_layers)
        if not node.visible:
            stats["hidden"] += len(pixel_layers)
            continue
        if node.is_group:
            stats["hidden"] += _hidden_inside(node)
            rgba = flatten_visible([node], h, w)
            stats["groups"] += 1
        else:
            rgba = node.rgba
        if rgba is None or not (rgba[..., 3] >= MASK_THRESHOLD).any():
            stats["empty"] += 1
            continue
        out.append((node.name, rgba))
    return out


def _hidden_inside(group: TreeNode) -> int:
    n = 0
    for child in group.children:
        if not child.visible:
            n += len(child.pixel_layers())
        elif child.is_group:
            n += _hidden_inside(child)
    return n


def _opaque_background(rgba: np.ndarray) -> np.ndarray:
    """RGB uint8 [H, W, 3]: the layer over the mean colour of its opaque (alpha >= 128) pixels."""
    alpha = rgba[..., 3:].astype(np.float32) / 255  # [H, W, 1]
    if (alpha == 1).all():
        return rgba[..., :3].copy()
    opaque = rgba[..., 3] >= MASK_THRESHOLD
    mean = rgba[..., :3][opaque].astype(np.float32).mean(axis=0)  # [3]; the caller keeps only non-empty layers
    out = rgba[..., :3].astype(np.float32) * alpha + mean * (1 - alpha)
    return np.round(out).astype(np.uint8)


def _crop_over_grey(rgba: np.ndarray) -> np.ndarray:
    """The layer's bounding box (alpha > 0), RGB over grey -> uint8 [h, w, 3] (what the captioner sees)."""
    ys, xs = np.nonzero(rgba[..., 3])
    crop = rgba[ys.min():ys.max() + 1, xs.min():xs.max() + 1].astype(np.float32)
    alpha = crop[..., 3:] / 255
    return np.round(crop[..., :3] * alpha + 255 * GREY * (1 - alpha)).astype(np.uint8)


def _caption(captioner, images: list[np.ndarray], path) -> list[str]:
    if not hasattr(captioner, "caption"):
        raise DatasetError(f"captioner {type(captioner).__name__} has no caption(images) method (stages.Captioner).")
    captions = list(captioner.caption(images)) if images else []
    if len(captions) != len(images):
        raise DatasetError(f"captioner {type(captioner).__name__} returned {len(captions)} captions for "
                           f"{len(images)} images (file {Path(path).name}); it must return one per image.")
    captions = [clean_prompt(c) for c in captions]
    if not all(captions):
        raise _reject("empty-caption", path, "the captioner returned an empty caption for a layer.")
    return captions


def _to_chw(array: np.ndarray) -> torch.Tensor:
    """uint8 [H, W, C] -> float32 [C, H, W] in [0, 1]."""
    return torch.from_numpy(np.ascontiguousarray(array.transpose(2, 0, 1))).float() / 255


def import_layered_file(path, *, key: str, captioner=None, max_foregrounds: int = 4,
                        min_side: int = 64) -> LayeredSample:
    """One 8-bit RGB PSD or an ORA -> a :class:`LayeredSample` (rules in the module docstring).

    Raises :class:`ImportRejected` (``.reason``) for files that cannot become a sample, :class:`DatasetError` for
    bad arguments or a misbehaving captioner.
    """
    if not isinstance(max_foregrounds, int) or max_foregrounds < 1:
        raise DatasetError(f"max_foregrounds must be an integer >= 1, got {max_foregrounds!r}.")
    if not key or "." in key or "/" in key:
        raise DatasetError(f"sample key {key!r} must be non-empty, without '.' or '/'.")
    path = Path(path)
    tree = _read(path)
    h, w = tree.size
    if min(h, w) < min_side:
        raise _reject("too-small", path, f"the canvas is {w}x{h} px; samples need at least {min_side} px a side.")
    stats = {"source": path.name, "layers": 0, "hidden": 0, "empty": 0, "groups": 0, "captioned": 0}
    if not tree.layers:
        raise _reject("no-layers", path, "has no layers (only a flattened image); save it with its layers.")
    entries = _flatten_entries(tree, stats)
    if not entries:
        raise _reject("no-layers", path, f"has no visible layer with pixels ({stats['hidden']} hidden, "
                                         f"{stats['empty']} empty); show the layers you want imported.")
    if len(entries) == 1:
        raise _reject("only-background", path, "has only a background layer; layered samples need at least one "
                                               "layer above the background.")
    (bg_name, bg_rgba), fg_entries = entries[-1], entries[:-1]
    if len(fg_entries) > max_foregrounds:
        raise _reject("too-many-layers", path, f"has {len(fg_entries)} layers above the background, at most "
                                               f"{max_foregrounds} are allowed: merge layers into groups (a "
                                               "top-level group becomes one layer).")
    background = _opaque_background(bg_rgba)
    names = [clean_prompt(name) for name, _ in fg_entries] + [clean_prompt(bg_name)]
    defaults = [i for i, name in enumerate(names) if is_default_layer_name(name)]
    if captioner is None and defaults and defaults[-1] == len(names) - 1:
        # Photoshop calls nearly every bottom layer "Background": without a captioner it is just the background
        names[-1], defaults = GENERIC_BACKGROUND_PROMPT, defaults[:-1]
        stats["generic_background_prompt"] = True
    if defaults and captioner is None:
        listed = ", ".join(repr(names[i] or "(no name)") for i in defaults)
        raise _reject("default-layer-names", path, f"layer names {listed} are editor defaults, not prompts: "
                                                   "rename the layers after what they show (e.g. 'a red car') "
                                                   "or import with a captioner.")
    masks = np.stack([rgba[..., 3] >= MASK_THRESHOLD for _, rgba in fg_entries])  # [N, H, W] bool
    composite = flatten_visible([TreeNode("", True, rgba) for _, rgba in fg_entries]
                                + [TreeNode("", True, _rgba(background))], h, w)[..., :3]  # [H, W, 3]
    if captioner is not None:
        layers = [rgba for _, rgba in fg_entries] + [_rgba(background)]
        captions = _caption(captioner, [_crop_over_grey(layers[i]) for i in defaults] + [composite], path)
        for i, caption in zip(defaults, captions):
            names[i] = caption
        stats["captioned"] = len(defaults)
        global_prompt = captions[-1]
    else:
        global_prompt = global_prompt_from_layers(names[:-1], names[-1])
    fg = torch.stack([_to_chw(rgba[..., :3]) for _, rgba in fg_entries])  # [N, 3, H, W]
    m = torch.from_numpy(masks)[:, None]  # [N, 1, H, W] bool
    fg = torch.where(m, fg, torch.full_like(fg, GREY))
    return LayeredSample(global_prompt=global_prompt, background_prompt=names[-1], foreground_prompts=names[:-1],
                         background=_to_chw(background), foregrounds=fg, masks=m.float(),
                         meta={"import": stats}, key=key)


def _rgba(rgb: np.ndarray) -> np.ndarray:
    return np.concatenate([rgb, np.full(rgb.shape[:2] + (1,), 255, np.uint8)], axis=2)


def sample_key(name: str, taken: set[str]) -> str:
    """A unique sample key (:mod:`.sample_keys`) from a file name's stem; it joins ``taken``."""
    return unique_key(key_from_name(Path(name).stem), taken)


def import_layered_folder(folder, *, captioner=None, max_foregrounds: int = 4, min_side: int = 64
                          ) -> Iterator[tuple[Path, LayeredSample | ImportRejected]]:
    """(path, sample or :class:`ImportRejected`) for every .psd / .ora file in ``folder`` (sorted by name; not
    recursive). Keys come from the file names (:func:`sample_key`)."""
    folder = Path(folder)
    if not folder.is_dir():
        raise DatasetError(f"layered file folder {folder} does not exist or is not a folder.")
    paths: Sequence[Path] = sorted(p for p in folder.iterdir()
                                   if p.is_file() and p.suffix.lower() in LAYERED_SUFFIXES)
    taken: set[str] = set()
    for path in paths:
        key = sample_key(path.name, taken)
        try:
            yield path, import_layered_file(path, key=key, captioner=captioner, max_foregrounds=max_foregrounds,
                                            min_side=min_side)
        except ImportRejected as rejected:
            yield path, rejected
