"""Nodes: split decoded slots into layers, compose layers, save layers (RGBA PNGs + PSD/ORA)."""
from __future__ import annotations

import os

import numpy as np
import torch

from ..layerdiff_model.layers import compose as layer_compose
from ..layerdiff_model.layers import layered_files
from ..layerdiff_model.errors import LayoutError
from .host import inference, layer_editing
from .input_checks import require_finite

CATEGORY = "LayerDiff/layers"
LAYERS_TYPE = "LAYERDIFF_LAYERS"


def _layer_names(info: dict, num_foregrounds: int) -> list[str]:
    defaults = layer_compose.default_layer_names(num_foregrounds)
    names = list(info.get("layer_names") or [])
    if len(names) != num_foregrounds + 1:
        return defaults
    return [n if n.strip() else default for n, default in zip(names, defaults)]


class LayerDiffSplitLayers:
    DISPLAY_NAME = "LayerDiff Split Layers"
    DESCRIPTION = "Splits decoded layered slots into background, foreground layers, masks and RGBA layers."

    @classmethod
    def INPUT_TYPES(cls):
        return {"required": {
            "images": ("IMAGE", {"tooltip": "VAE Decode output of a layered latent (all slots)."}),
            "samples": ("LATENT", {"tooltip": "The layered latent that was decoded (gives the layer count and names)."}),
        }, "optional": {
            "binarize_masks": ("BOOLEAN", {"default": True, "tooltip": "Threshold decoded masks to 0/1 (paper)."}),
            "mask_threshold": ("FLOAT", {"default": 0.5, "min": 0.0, "max": 1.0, "step": 0.01}),
        }}

    RETURN_TYPES = (LAYERS_TYPE, "IMAGE", "IMAGE", "MASK", "IMAGE")
    RETURN_NAMES = ("layers", "background", "foregrounds", "masks", "rgba_layers")
    OUTPUT_TOOLTIPS = ("All layers with their names: connect to Compose / Save.", "Background layer per image.",
                       "Foreground layers (batch of images x layers, top first).", "One mask per foreground layer.",
                       "Foreground layers as RGBA (alpha = mask).")
    FUNCTION = "split"
    CATEGORY = CATEGORY

    def split(self, images, samples, binarize_masks=True, mask_threshold=0.5):
        node = self.DISPLAY_NAME
        require_finite(node, mask_threshold=mask_threshold)
        info = inference.layered_latent_info(samples, node, "samples")
        n = int(info["num_foregrounds"])
        if images.shape[0] != samples["samples"].shape[0]:
            raise LayoutError(
                f"{node}: 'images' has {images.shape[0]} images but the layered latent has "
                f"{samples['samples'].shape[0]} slots; decode exactly this latent and connect both."
            )
        layers = layer_compose.split_decoded_slots(images, n, binarize=binarize_masks, threshold=mask_threshold)
        layers = layer_compose.LayeredImages(layers.background, layers.foregrounds, layers.masks,
                                             _layer_names(info, n))
        layers = layer_editing.original_pixels(layers, samples)  # layers that came in as images and were kept
        fg = layers.foregrounds.flatten(0, 1)  # [(b n), H, W, 3]
        masks = layers.masks.flatten(0, 1)  # [(b n), H, W]
        rgba = layer_compose.to_rgba(layers).flatten(0, 1)  # [(b n), H, W, 4]
        return (layers, layers.background, fg, masks, rgba)


class LayerDiffComposeLayers:
    DISPLAY_NAME = "LayerDiff Compose Layers"
    DESCRIPTION = ("Composes layers into one image with the depth-ordered compositing equation. Optional inputs "
                   "replace the background, the foregrounds or the masks, for layer-by-layer editing.")

    @classmethod
    def INPUT_TYPES(cls):
        return {"required": {"layers": (LAYERS_TYPE,)}, "optional": {
            "background": ("IMAGE", {"tooltip": "Replaces the background layer (same size)."}),
            "foregrounds": ("IMAGE", {"tooltip": "Replaces the foreground layers (images x layers, top first)."}),
            "masks": ("MASK", {"tooltip": "Replaces the masks (images x layers, top first)."}),
        }}

    RETURN_TYPES = ("IMAGE", LAYERS_TYPE)
    RETURN_NAMES = ("image", "layers")
    FUNCTION = "compose"
    CATEGORY = CATEGORY

    def compose(self, layers, background=None, foregrounds=None, masks=None):
        layers = _replace_layers(layers, background, foregrounds, masks, self.DISPLAY_NAME)
        return (layer_compose.compose(layers), layers)


def _replace_layers(layers, background, foregrounds, masks, node):
    b, n = layers.foregrounds.shape[:2]
    size = tuple(layers.background.shape[1:3])

    def check(name, tensor, rows):
        if tensor.shape[0] != rows or tuple(tensor.shape[1:3]) != size:
            raise LayoutError(f"{node}: '{name}' must be {rows} images of {size[1]}x{size[0]}, got "
                              f"{tensor.shape[0]} of {tensor.shape[2]}x{tensor.shape[1]}.")

    bg, fg, mk = layers.background, layers.foregrounds, layers.masks
    if background is not None:
        check("background", background, b)
        bg = background[..., :3]
    if foregrounds is not None:
        check("foregrounds", foregrounds, b * n)
        fg = foregrounds[..., :3].reshape(b, n, *size, 3)  # [(b n), H, W, 3] -> [B, N, H, W, 3]
    if masks is not None:
        check("masks", masks, b * n)
        mk = masks.reshape(b, n, *size)  # [(b n), H, W] -> [B, N, H, W]
    return layer_compose.LayeredImages(bg, fg, mk, list(layers.names))


def _to_uint8(t: torch.Tensor) -> np.ndarray:
    return (t.detach().clamp(0, 1).cpu().numpy() * 255.0 + 0.5).astype(np.uint8)


class LayerDiffSaveLayers:
    DISPLAY_NAME = "LayerDiff Save Layers"
    DESCRIPTION = ("Saves every layer as an RGBA PNG, the background, the masks and the composite, plus one "
                   "layered file (PSD for Photoshop/GIMP/Krita, ORA for Krita/GIMP) with layers named after prompts.")

    @classmethod
    def INPUT_TYPES(cls):
        return {"required": {
            "layers": (LAYERS_TYPE,),
            "filename_prefix": ("STRING", {"default": "LayerDiff/layers", "tooltip": "Prefix under ComfyUI/output."}),
            "layered_file": (list(layered_files.LAYERED_FILE_CHOICES),
                             {"default": "psd", "tooltip": "Layered file to write next to the PNGs."}),
        }}

    RETURN_TYPES = ()
    OUTPUT_NODE = True
    FUNCTION = "save"
    CATEGORY = CATEGORY

    def save(self, layers, filename_prefix, layered_file):
        import folder_paths

        height, width = layers.background.shape[1:3]
        folder, name, counter, subfolder, _ = folder_paths.get_save_image_path(
            filename_prefix, folder_paths.get_output_directory(), width, height)
        composite = layer_compose.compose(layers)
        rgba = layer_compose.to_rgba(layers)  # [B, N, H, W, 4]
        previews = []
        for b in range(layers.background.shape[0]):
            stem = f"{name}_{counter + b:05}"
            files = _save_sample(folder, stem, layers, b, composite[b], rgba[b], layered_file)
            previews += [{"filename": f, "subfolder": subfolder, "type": "output"} for f in files]
        return {"ui": {"images": previews}}


def _save_sample(folder, stem, layers, b, composite, rgba, layered_file) -> list[str]:
    """Write one layered image; returns the PNG file names (composite first) for the UI preview."""
    from PIL import Image

    names = layers.names
    pngs = {f"{stem}_composite.png": _to_uint8(composite), f"{stem}_background.png": _to_uint8(layers.background[b])}
    for i in range(rgba.shape[0]):
        pngs[f"{stem}_layer{i + 1}.png"] = _to_uint8(rgba[i])
        pngs[f"{stem}_mask{i + 1}.png"] = _to_uint8(layers.masks[b, i])
    for file_name, array in pngs.items():
        layered_files.atomic_write(os.path.join(folder, file_name), lambda fh, a=array: Image.fromarray(a).save(fh, "PNG"))
    named = [(names[i + 1], _to_uint8(rgba[i])) for i in range(rgba.shape[0])]
    background = (names[0], _to_uint8(layers.background[b]))
    formats = layered_files.layered_file_formats(layered_file)
    if "psd" in formats:
        layered_files.write_psd(os.path.join(folder, f"{stem}.psd"), named, background, _to_uint8(composite))
    if "ora" in formats:
        layered_files.write_ora(os.path.join(folder, f"{stem}.ora"), named, background, _to_uint8(composite))
    return [f for f in pngs if not f.endswith(tuple(f"_mask{i + 1}.png" for i in range(rgba.shape[0])))]
