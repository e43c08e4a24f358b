"""Host side of layer editing (docs/DESIGN.md 2.9): regenerate chosen layers with ComfyUI's own noise mask, keep the
other slots exact, and give back the original pixels of layers that came in as images.

- ``regenerate``: a per-row ``noise_mask`` (1 on the chosen layers' slot rows, 0 elsewhere; times a noise mask the
  latent already had, e.g. from Set Latent Noise Mask, to redraw a region of a layer). Every ComfyUI sampler
  honours it (``KSamplerX0Inpaint``): at each step the kept rows are replaced by the original latent noised to the
  step's level, so the regenerated layers see the kept ones through inter-layer attention.
- ``restore_kept_rows``: ComfyUI returns the kept rows only up to float rounding (the latent scale round trip and
  the last Euler step); the LayerDiff samplers put the input rows back exactly.
- ``remember_source`` / ``original_pixels``: layers encoded from images keep those images in the LATENT's
  ``layerdiff`` entry with the rows they encoded to; a decoded row that still matches its source row is replaced
  by the source pixels, so a kept layer is saved without VAE round-trip loss.
"""
from __future__ import annotations

import torch

from ...layerdiff_model.errors import LayoutError
from ...layerdiff_model.layer_selection import kept_rows, parse_layer_selection, slot_row_mask, slots_of_layers
from ...layerdiff_model.layers.compose import LayeredImages
from ...layerdiff_model.slots import num_slots
from . import inference

EDIT_KEY = "edit"  # in the layerdiff entry: {"regenerate_slots": [...]}
SOURCE_KEY = "source"  # in the layerdiff entry: {"latent": rows, "background", "foregrounds", "masks"}
# A decoded row counts as its source when its latent equals the source row up to the rounding a core sampler adds
# to kept rows (measured below 1e-5 relative); any denoising step moves a row far more.
SOURCE_RTOL, SOURCE_ATOL = 1e-4, 1e-5


def regenerate(latent: dict, layers: str, keep_masks: bool, node: str) -> dict:
    """The layered ``latent`` with a noise mask on the chosen layers; raises LayoutError naming ``node``."""
    info = inference.layered_latent_info(latent, node, "samples")
    n = int(info["num_foregrounds"])
    chosen = parse_layer_selection(layers, n, node)
    slots = slots_of_layers(chosen, n, with_masks=not keep_masks)
    if len(slots) == num_slots(n):
        raise LayoutError(f"{node}: 'layers' chooses every layer and its mask, so nothing would stay fixed. For a "
                          "new picture use 'LayerDiff Empty Layered Latent'; to restyle everything connect the "
                          "latent to the sampler directly with denoise below 1; or turn on 'keep_masks'.")
    samples = latent["samples"]
    rows, _, h, w = samples.shape
    mask = slot_row_mask(slots, n, rows, h, w).to(samples.device, samples.dtype)
    if latent.get("noise_mask") is not None:  # e.g. Set Latent Noise Mask before: inpaint inside the chosen layers
        mask = mask * _spatial_mask(latent["noise_mask"], rows, h, w, node).to(mask)
    out = dict(latent, noise_mask=mask)
    out[inference.LATENT_KEY] = dict(info, **{EDIT_KEY: {"regenerate_slots": slots}})
    return out


def _spatial_mask(noise_mask: torch.Tensor, rows: int, h: int, w: int, node: str) -> torch.Tensor:
    """An existing noise mask ([H, W], [M, H, W] or [M, 1, H, W], any resolution) at latent size, one per row."""
    m = noise_mask.reshape(-1, 1, noise_mask.shape[-2], noise_mask.shape[-1]).float()
    m = torch.nn.functional.interpolate(m, size=(h, w), mode="bilinear")
    if m.shape[0] not in (1, rows):
        raise LayoutError(f"{node}: the latent already has a noise mask with {m.shape[0]} masks for {rows} slot "
                          "rows; give one mask (it applies inside every chosen layer) or none.")
    return m.expand(rows, -1, -1, -1)


def restore_kept_rows(latent_in: dict, latent_out: dict) -> dict:
    """``latent_out`` with the rows that ``regenerate`` kept set exactly to ``latent_in``'s (when sizes match)."""
    info = latent_in.get(inference.LATENT_KEY) or {}
    edit = info.get(EDIT_KEY)
    before, after = latent_in["samples"], latent_out["samples"]
    if not edit or before.shape != after.shape:
        return latent_out
    keep = kept_rows(edit["regenerate_slots"], int(info["num_foregrounds"]), after.shape[0]).to(after.device)
    restored = after.clone()
    restored[keep] = before[keep].to(after.device, after.dtype)
    return dict(latent_out, samples=restored)


def remember_source(latent: dict, layers: LayeredImages) -> dict:
    """``latent`` (just encoded from ``layers``) with the layers' pixels and its own rows in its entry."""
    info = dict(latent[inference.LATENT_KEY])
    info[SOURCE_KEY] = {"latent": latent["samples"].detach().clone(), "background": layers.background,
                        "foregrounds": layers.foregrounds, "masks": layers.masks}
    return dict(latent, **{inference.LATENT_KEY: info})


def original_pixels(layers: LayeredImages, latent: dict) -> LayeredImages:
    """Decoded ``layers`` of ``latent`` with every slot whose latent row still equals its source row replaced by
    the source pixels (background, foreground image or mask). Unchanged without a source or on other sizes."""
    info = latent.get(inference.LATENT_KEY) or {}
    source = info.get(SOURCE_KEY)
    samples = latent["samples"]
    if not source or source["latent"].shape != samples.shape or \
            tuple(source["background"].shape) != tuple(layers.background.shape):
        return layers
    n = int(info["num_foregrounds"])
    s = num_slots(n)
    src = source["latent"].to(samples.device, samples.dtype)
    same = [bool(torch.allclose(samples[r], src[r], rtol=SOURCE_RTOL, atol=SOURCE_ATOL))
            for r in range(samples.shape[0])]
    if not any(same):
        return layers
    bg, fg, mk = layers.background.clone(), layers.foregrounds.clone(), layers.masks.clone()
    for r, unchanged in enumerate(same):
        if not unchanged:
            continue
        b, slot = divmod(r, s)
        if slot == 0:
            bg[b] = source["background"][b].to(bg)
        elif slot <= n:
            fg[b, slot - 1] = source["foregrounds"][b, slot - 1].to(fg)
        else:
            mk[b, slot - n - 1] = source["masks"][b, slot - n - 1].to(mk)
    return LayeredImages(bg, fg, mk, list(layers.names))

