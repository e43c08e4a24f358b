"""Nodes: bring your own layers in. A background and foreground layers (RGBA images, or images + masks, from Load
Image, LayerDiff Split Layers or a file) become a layered latent the sampler and the editing nodes take."""
from __future__ import annotations

import torch

from ..layerdiff_model.errors import LayoutError
from ..layerdiff_model.layers import compose as layer_compose
from ..layerdiff_model.sampling.conditioning import parse_foreground_prompts
from .host import inference, layer_editing, layered_input
from .nodes_layers import LAYERS_TYPE

CATEGORY = "LayerDiff/layers"


class LayerDiffEncodeLayers:
    DISPLAY_NAME = "LayerDiff Encode Layers"
    DESCRIPTION = ("Builds a layered latent from your own layers: a background image and foreground layers given as "
                   "RGBA images or as images + masks, top layer first. Every layer and every mask (as a grey image) "
                   "is encoded by the same VAE, as the LayerDiff sampler expects.")

    @classmethod
    def INPUT_TYPES(cls):
        return {"required": {
            "vae": ("VAE", {"tooltip": "The SD1.5 VAE (the checkpoint's)."}),
            "background": ("IMAGE", {"tooltip": "Background layer, one image per layered image."}),
            "foregrounds": ("IMAGE", {"tooltip": "Foreground layers, top layer first (images x layers). RGBA images "
                                                 "carry their own mask (alpha); RGB images need 'masks'."}),
        }, "optional": {
            "masks": ("MASK", {"tooltip": "One mask per foreground layer, 1 = the layer is visible (LayerDiff Split "
                                          "Layers' masks). Load Image's MASK is 1 where the image is transparent: "
                                          "invert it first. Overrides an RGBA alpha."}),
            "layer_names": ("STRING", {"default": "", "multiline": True, "tooltip":
                "Optional layer names, one per line, background first (default: background, layer 1, ...)."}),
        }}

    RETURN_TYPES = ("LATENT", LAYERS_TYPE)
    RETURN_NAMES = ("latent", "layers")
    OUTPUT_TOOLTIPS = ("Layered latent (background, foregrounds, masks as slots) for the LayerDiff sampler.",
                       "The layers as given (original pixels), for Compose / Save.")
    FUNCTION = "encode"
    CATEGORY = CATEGORY

    def encode(self, vae, background, foregrounds, masks=None, layer_names=""):
        node = self.DISPLAY_NAME
        layers = layers_from_inputs(background, foregrounds, masks, layer_names, node)
        slots = layer_compose.layers_to_slot_images(layers)  # [(b s), H, W, 3]
        samples = vae.encode(slots)  # [(b s), 4, H/8, W/8]
        latent = inference.make_layered_latent(samples, layers.num_foregrounds, layers.names)
        return layer_editing.remember_source(latent, layers), layers


def layers_from_inputs(background: torch.Tensor, foregrounds: torch.Tensor, masks: torch.Tensor | None,
                       layer_names: str, node: str) -> layer_compose.LayeredImages:
    """IMAGE/MASK node inputs -> LayeredImages; raises LayoutError naming the input and the fix."""
    b, h, w = int(background.shape[0]), int(background.shape[1]), int(background.shape[2])
    if h % 8 or w % 8:
        raise LayoutError(f"{node}: the layers are {w}x{h}; width and height must be multiples of 8 for the VAE. "
                          "Scale or crop the images first (e.g. Upscale Image / ImageCrop).")
    rows = int(foregrounds.shape[0])
    if tuple(foregrounds.shape[1:3]) != (h, w):
        raise LayoutError(f"{node}: 'foregrounds' are {foregrounds.shape[2]}x{foregrounds.shape[1]} but the "
                          f"background is {w}x{h}; give every layer the background's size.")
    if rows % b:
        raise LayoutError(f"{node}: {rows} foreground images for {b} backgrounds; give the same number of "
                          "foreground layers for every background (images x layers, top layer first).")
    n = rows // b
    if masks is None:
        if foregrounds.shape[-1] != 4:
            raise LayoutError(f"{node}: 'foregrounds' are RGB images without alpha; connect 'masks' (one per "
                              "layer) or give RGBA layers.")
        masks = foregrounds[..., 3]
    if masks.ndim == 2:
        masks = masks[None]
    if tuple(masks.shape) != (rows, h, w):
        raise LayoutError(f"{node}: 'masks' must be {rows} masks of {w}x{h} (one per foreground layer), got "
                          f"{tuple(masks.shape)}.")
    names = parse_foreground_prompts(layer_names)
    if names and len(names) != n + 1:
        raise LayoutError(f"{node}: {len(names)} layer names for a background and {n} foreground layers; give "
                          f"{n + 1} lines, background first, or leave 'layer_names' empty.")
    fg = foregrounds[..., :3].reshape(b, n, h, w, 3)  # [(b n), H, W, 3] -> [B, N, H, W, 3]
    mk = masks.to(fg.dtype).reshape(b, n, h, w).clamp(0, 1)  # [(b n), H, W] -> [B, N, H, W]
    return layer_compose.LayeredImages(background[..., :3], fg, mk, names)


LAYERED_FILE_SUFFIXES = (".psd", ".ora")


class LayerDiffLoadLayeredFile:
    DISPLAY_NAME = "LayerDiff Load Layered File"
    DESCRIPTION = ("Loads a layered PSD or OpenRaster (ORA) file from ComfyUI's input folder: its bottom layer is "
                   "the background, every layer above it a foreground (top layer first) with its alpha as mask. "
                   "The layer names come out as prompts. Reads the files LayerDiff Save Layers writes and 8-bit RGB "
                   "files from Krita, GIMP or Photoshop (layer masks, blend modes and effects are ignored).")

    @classmethod
    def INPUT_TYPES(cls):
        return {"required": {
            "file": (layered_input.input_files(LAYERED_FILE_SUFFIXES), {"image_upload": True, "tooltip":
                "A .psd or .ora file in ComfyUI's input folder (copy it to ComfyUI/input: the upload picker of "
                "today's frontend lists PNG, JPEG and WebP only)."}),
        }}

    RETURN_TYPES = ("IMAGE", "IMAGE", "MASK", "STRING", "STRING")
    RETURN_NAMES = ("background", "foregrounds", "masks", "background_prompt", "foreground_prompts")
    OUTPUT_TOOLTIPS = ("The bottom layer (RGB).", "The other layers, top first (RGB).",
                       "Their alpha as masks (1 = visible).", "The bottom layer's name.",
                       "The other layers' names, one per line, top first.")
    FUNCTION = "load"
    CATEGORY = CATEGORY

    def load(self, file):
        node = self.DISPLAY_NAME
        path = layered_input.input_file_path(file, LAYERED_FILE_SUFFIXES, node, "file")
        return layered_input.read_layered_file(path, node)

    @classmethod
    def IS_CHANGED(cls, file):
        """The file's content hash, so an edited file re-runs the node; a bad name is reported by ``load``."""
        try:
            return layered_input.file_fingerprint(
                layered_input.input_file_path(file, LAYERED_FILE_SUFFIXES, cls.DISPLAY_NAME, "file"))
        except Exception as exc:  # noqa: BLE001 - ComfyUI calls this before running; load() raises the clear error
            return f"unreadable: {exc}"
