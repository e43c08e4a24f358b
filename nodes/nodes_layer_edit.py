"""Nodes: edit chosen layers of a layered latent (regenerate or restyle them) while every other layer stays fixed."""
from __future__ import annotations

from .host import layer_editing

CATEGORY = "LayerDiff/editing"


class LayerDiffRegenerateLayers:
    DISPLAY_NAME = "LayerDiff Regenerate Layers"
    DESCRIPTION = ("Marks layers of a layered latent for regeneration; every other layer stays exactly as it is. "
                   "Connect the result to any sampler (KSampler, LayerDiff SMG KSampler, ...) with a new seed or a "
                   "new layer prompt: denoise 1.0 redraws the chosen layers, about 0.5 restyles them (change or "
                   "add a style in their prompt). Uses ComfyUI's own noise mask, one row per layer slot.")

    @classmethod
    def INPUT_TYPES(cls):
        return {"required": {
            "samples": ("LATENT", {"tooltip": "A layered latent: from LayerDiff Encode Layers (your layers) or a "
                                              "LayerDiff sampler (a generated picture)."}),
            "layers": ("STRING", {"default": "1", "tooltip":
                "Layers to change, top layer first: '1' (the top layer), '2', '1,3', '1-2' or 'background'. "
                "A foreground layer's mask is regenerated with it unless 'keep_masks' is on."}),
            "keep_masks": ("BOOLEAN", {"default": False, "tooltip":
                "Keep the chosen layers' masks (their shapes) and regenerate only their pixels: for restyling "
                "inside the same silhouette."}),
        }}

    RETURN_TYPES = ("LATENT",)
    OUTPUT_TOOLTIPS = ("The same layered latent with a per-layer noise mask: connect it to the sampler's "
                       "latent_image.",)
    FUNCTION = "regenerate"
    CATEGORY = CATEGORY

    def regenerate(self, samples, layers, keep_masks=False):
        return (layer_editing.regenerate(samples, layers, keep_masks, self.DISPLAY_NAME),)
