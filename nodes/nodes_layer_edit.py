"""Nodes: edit chosen layers of a layered latent (regenerate or restyle them, ControlNet on them) while every other
layer stays fixed, and decompose a flat picture into layers."""
from __future__ import annotations

from .host import decomposition, layer_control, layer_editing
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


class LayerDiffPictureToLatent:
    DISPLAY_NAME = "LayerDiff Picture to Layered Latent"
    DESCRIPTION = ("Starts a decomposition of a flat picture into layers: the picture goes into the background slot "
                   "(and the foreground slots), the masks start grey. Sample it at partial denoise with a model "
                   "that has 'LayerDiff Composite Guidance', the global prompt and one prompt per layer.")

    @classmethod
    def INPUT_TYPES(cls):
        return {"required": {
            "vae": ("VAE", {"tooltip": "The SD1.5 VAE (the checkpoint's)."}),
            "image": ("IMAGE", {"tooltip": "The picture to decompose (width and height multiples of 8)."}),
            "foregrounds": ("INT", {"default": 2, "min": 1, "max": 16, "tooltip":
                "Number of foreground layers to find; connect the prompt encoder's 'foregrounds'."}),
            "foreground_start": (list(decomposition.FOREGROUND_STARTS), {"default": "picture", "tooltip":
                "What the foreground slots start from: the picture, or neutral grey."}),
        }, "optional": {
            "layer_names": ("STRING", {"forceInput": True, "tooltip": "The prompt encoder's 'layer_names'."}),
        }}

    RETURN_TYPES = ("LATENT",)
    OUTPUT_TOOLTIPS = ("Layered latent carrying the picture: sample it (denoise about 0.8) and connect it to "
                       "'LayerDiff Composite Guidance' too.",)
    FUNCTION = "encode"
    CATEGORY = CATEGORY

    def encode(self, vae, image, foregrounds, foreground_start="picture", layer_names=None):
        names = layer_names.split("\n") if layer_names else None
        return (decomposition.picture_latent(vae, image, foregrounds, foreground_start, names, self.DISPLAY_NAME),)


class LayerDiffCompositeGuidance:
    DISPLAY_NAME = "LayerDiff Composite Guidance"
    DESCRIPTION = ("Pulls the composite of the layers being generated toward a picture at every step, so the "
                   "layers decompose it: each position's difference goes to the layer visible there (by the "
                   "model's own predicted masks). Works with any sampler; strength 0 changes nothing.")

    @classmethod
    def INPUT_TYPES(cls):
        return {"required": {
            "model": ("MODEL", {"tooltip": "A model patched by 'LayerDiff Apply'."}),
            "picture_latent": ("LATENT", {"tooltip": "The output of 'LayerDiff Picture to Layered Latent'."}),
            "strength": ("FLOAT", {"default": 1.0, "min": 0.0, "max": 1.0, "step": 0.05, "tooltip":
                "1 = the visible layer content matches the picture after each step; lower keeps more of what "
                "the model draws."}),
            "start_percent": ("FLOAT", {"default": 0.0, "min": 0.0, "max": 1.0, "step": 0.01, "tooltip":
                "Guidance starts after this fraction of the noise schedule."}),
        }}

    RETURN_TYPES = ("MODEL",)
    FUNCTION = "patch"
    CATEGORY = CATEGORY

    def patch(self, model, picture_latent, strength=1.0, start_percent=0.0):
        node = self.DISPLAY_NAME
        require_finite(node, strength=strength, start_percent=start_percent)
        return (decomposition.with_composite_guidance(model, picture_latent, strength, start_percent, node),)
