"""Nodes: layer prompt encoder and layer prompt enhancer."""
from __future__ import annotations

from ..layerdiff_model.sampling.conditioning import parse_foreground_prompts
from ..layerdiff_model.errors import LayoutError
from .host import inference

CATEGORY = "LayerDiff/conditioning"


class LayerDiffPromptEncode:
    DISPLAY_NAME = "LayerDiff Layer Prompt Encode"
    DESCRIPTION = ("Encodes a global prompt for the whole scene plus one prompt per layer (background, then "
                   "foregrounds top first) into layered positive and negative conditioning.")

    @classmethod
    def INPUT_TYPES(cls):
        return {"required": {
            "clip": ("CLIP",),
            "global_prompt": ("STRING", {"multiline": True, "default": "a red apple and a blue cup on a wooden table",
                                         "tooltip": "Describes the whole composed image."}),
            "background_prompt": ("STRING", {"multiline": True, "default": "a wooden table",
                                             "tooltip": "Describes the background layer alone."}),
            "foreground_prompts": ("STRING", {"multiline": True, "default": "a red apple\na blue cup", "tooltip":
                "One foreground prompt per line, top layer first. The number of lines is the number of layers."}),
            "negative_prompt": ("STRING", {"multiline": True, "default": "blurry, low quality",
                                           "tooltip": "Negative prompt for the whole image."}),
        }, "optional": {
            "layer_negative_prompt": ("STRING", {"multiline": True, "default": "", "tooltip":
                "Negative prompt used for every layer (empty = unconditional)."}),
        }}

    RETURN_TYPES = ("CONDITIONING", "CONDITIONING", "INT", "STRING")
    RETURN_NAMES = ("positive", "negative", "foregrounds", "layer_names")
    OUTPUT_TOOLTIPS = ("Layered positive conditioning.", "Layered negative conditioning.",
                       "Number of foreground layers: connect to 'LayerDiff Empty Layered Latent'.",
                       "The layer prompts as layer names (background first, one per line): connect to the Empty "
                       "Layered Latent so the names reach the saved files with any sampler.")
    FUNCTION = "encode"
    CATEGORY = CATEGORY

    def encode(self, clip, global_prompt, background_prompt, foreground_prompts, negative_prompt,
               layer_negative_prompt=""):
        if clip is None:
            raise LayoutError(f"{self.DISPLAY_NAME}: no CLIP connected; use the CLIP output of Load Checkpoint.")
        foregrounds = parse_foreground_prompts(foreground_prompts)
        if not foregrounds:
            raise LayoutError(
                f"{self.DISPLAY_NAME}: 'foreground_prompts' is empty. Write one prompt per line, top layer first "
                "(e.g. 'a red apple')."
            )
        positive = inference.encode_layered(clip, global_prompt, [background_prompt] + foregrounds)
        negative = inference.encode_layered(clip, negative_prompt, [layer_negative_prompt] * (1 + len(foregrounds)))
        names = "\n".join(" ".join(p.split()) for p in [background_prompt] + foregrounds)
        return (positive, negative, len(foregrounds), names)


class LayerDiffEnhancePrompts:
    DISPLAY_NAME = "LayerDiff Enhance Layer Prompts"
    DESCRIPTION = "Refines each layer prompt with context from the global prompt (LayerDiff's prompt enhancer)."

    @classmethod
    def INPUT_TYPES(cls):
        return {"required": {
            "layerdiff": ("LAYERDIFF", {"tooltip": "From 'LayerDiff Load Weights' (same weights as the UNet patch)."}),
            "positive": ("CONDITIONING", {"tooltip": "Layered conditioning from 'LayerDiff Layer Prompt Encode'."}),
            "negative": ("CONDITIONING",),
        }}

    RETURN_TYPES = ("CONDITIONING", "CONDITIONING")
    RETURN_NAMES = ("positive", "negative")
    FUNCTION = "enhance"
    CATEGORY = CATEGORY

    def enhance(self, layerdiff, positive, negative):
        return (inference.enhance(positive, layerdiff, self.DISPLAY_NAME),
                inference.enhance(negative, layerdiff, self.DISPLAY_NAME))
