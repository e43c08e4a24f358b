"""Nodes: load LayerDiff weights, patch an SD1.5 MODEL with them."""
from __future__ import annotations

from .host import inference

CATEGORY = "LayerDiff"


class LayerDiffLoadWeights:
    DISPLAY_NAME = "LayerDiff Load Weights"
    DESCRIPTION = "Loads LayerDiff module weights (.safetensors from ComfyUI/models/layerdiff/)."

    @classmethod
    def INPUT_TYPES(cls):
        import folder_paths

        return {"required": {"weights_name": (folder_paths.get_filename_list(inference.WEIGHTS_FOLDER), {
            "tooltip": "A LayerDiff weights file written by the bundled training script, in models/layerdiff/."})}}

    RETURN_TYPES = ("LAYERDIFF",)
    RETURN_NAMES = ("layerdiff",)
    OUTPUT_TOOLTIPS = ("LayerDiff modules: connect to 'LayerDiff Apply' and 'LayerDiff Enhance Layer Prompts'.",)
    FUNCTION = "load"
    CATEGORY = CATEGORY

    def load(self, weights_name):
        return (inference.load_weights(weights_name, self.DISPLAY_NAME),)


class LayerDiffApply:
    DISPLAY_NAME = "LayerDiff Apply (UNet patch)"
    DESCRIPTION = ("Adds LayerDiff's layer-collaborative attention to any SD1.5-family MODEL. Returns a patched copy; "
                   "the input MODEL is left unchanged.")

    @classmethod
    def INPUT_TYPES(cls):
        return {"required": {
            "model": ("MODEL", {"tooltip": "An SD1.5-family model (SD1.5, fine-tunes, merges, LoRA-patched)."}),
            "layerdiff": ("LAYERDIFF", {"tooltip": "From 'LayerDiff Load Weights'."}),
        }, "optional": {
            "inter_layer_attention": ("BOOLEAN", {"default": True, "tooltip":
                "Information exchange between layers. Turn off only to compare (ablation)."}),
            "intra_layer_attention": ("BOOLEAN", {"default": True, "tooltip":
                "Each layer follows its own prompt. Turn off only to compare (ablation)."}),
        }}

    RETURN_TYPES = ("MODEL",)
    OUTPUT_TOOLTIPS = ("The patched model: sample it with 'LayerDiff SMG KSampler' on a layered latent.",)
    FUNCTION = "apply"
    CATEGORY = CATEGORY

    def apply(self, model, layerdiff, inter_layer_attention=True, intra_layer_attention=True):
        return (inference.apply_patch(model, layerdiff, self.DISPLAY_NAME, inter=inter_layer_attention,
                                         intra=intra_layer_attention),)
