"""Nodes: edit chosen layers of a layered latent (regenerate or restyle them) while every other layer stays fixed."""
from __future__ import annotations

from .host import layer_control, layer_editing
from .input_checks import require_finite

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


class LayerDiffLayerControlNet:
    DISPLAY_NAME = "LayerDiff Apply ControlNet to Layers"
    DESCRIPTION = ("Applies a standard ControlNet (from the core ControlNet loaders) to chosen layers only: e.g. a "
                   "pose for layer 1, a depth map for the background. Every other layer gets no control at all. "
                   "Chain several, each with its own ControlNet, image and layers.")

    @classmethod
    def INPUT_TYPES(cls):
        return {"required": {
            "positive": ("CONDITIONING", {"tooltip": "Layered positive conditioning (LayerDiff Layer Prompt "
                                                     "Encode / Enhance Layer Prompts)."}),
            "negative": ("CONDITIONING", {"tooltip": "Layered negative conditioning."}),
            "control_net": ("CONTROL_NET", {"tooltip": "An SD1.5 ControlNet (core 'Load ControlNet Model')."}),
            "image": ("IMAGE", {"tooltip": "The control image (pose, depth, edges, ...): one, or one per layered "
                                           "image of the batch."}),
            "layers": ("STRING", {"default": "1", "tooltip":
                "Layers the control acts on, top layer first: '1', '2', '1,3' or 'background'. A foreground "
                "layer's mask slot gets the control too."}),
            "strength": ("FLOAT", {"default": 1.0, "min": 0.0, "max": 10.0, "step": 0.01}),
            "start_percent": ("FLOAT", {"default": 0.0, "min": 0.0, "max": 1.0, "step": 0.001}),
            "end_percent": ("FLOAT", {"default": 1.0, "min": 0.0, "max": 1.0, "step": 0.001}),
        }, "optional": {
            "vae": ("VAE", {"tooltip": "Only for ControlNets that need one (as the core Apply ControlNet)."}),
        }}

    RETURN_TYPES = ("CONDITIONING", "CONDITIONING")
    RETURN_NAMES = ("positive", "negative")
    FUNCTION = "apply"
    CATEGORY = CATEGORY

    def apply(self, positive, negative, control_net, image, layers, strength, start_percent, end_percent, vae=None):
        node = self.DISPLAY_NAME
        require_finite(node, strength=strength, start_percent=start_percent, end_percent=end_percent)
        if strength == 0:
            return (positive, negative)
        return layer_control.apply_to_layers(positive, negative, control_net, image, strength, layers,
                                             start_percent, end_percent, node, vae)
