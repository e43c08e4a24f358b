"""Nodes: empty layered latent, the SMG KSampler and self-mask guidance as a model patch for any sampler."""
from __future__ import annotations

import torch

from ..layerdiff_model.errors import LayoutError
from ..layerdiff_model.slots import check_foreground_count, num_slots
from .host import inference, layer_editing
from .input_checks import require_finite

CATEGORY = "LayerDiff/sampling"
MAX_RESOLUTION = 8192


def smg_inputs(prefix: str) -> dict:
    """The self-mask guidance widgets (``scale``, ``start_percent``, ``blur_sigma``, with ``prefix``)."""
    return {
        f"{prefix}scale": ("FLOAT", {"default": 0.5, "min": 0.0, "max": 10.0, "step": 0.05, "tooltip":
            "Self-mask guidance strength. 0 = plain CFG (exactly)."}),
        f"{prefix}start_percent": ("FLOAT", {"default": 0.2, "min": 0.0, "max": 1.0, "step": 0.01, "tooltip":
            "Warm-up: SMG starts after this fraction of the noise schedule, once masks have formed."}),
        f"{prefix}blur_sigma": ("FLOAT", {"default": 2.0, "min": 0.1, "max": 10.0, "step": 0.1, "tooltip":
            "Blur (in latent pixels) applied to each foreground inside its own predicted mask."}),
    }


class LayerDiffEmptyLatent:
    DISPLAY_NAME = "LayerDiff Empty Layered Latent"
    DESCRIPTION = ("An empty layered latent: per image one background, N foregrounds and N masks, each an ordinary "
                   "SD latent on the batch axis.")

    @classmethod
    def INPUT_TYPES(cls):
        return {"required": {
            "width": ("INT", {"default": 512, "min": 16, "max": MAX_RESOLUTION, "step": 8}),
            "height": ("INT", {"default": 512, "min": 16, "max": MAX_RESOLUTION, "step": 8}),
            "foregrounds": ("INT", {"default": 2, "min": 1, "max": 16, "tooltip":
                "Number of foreground layers; connect the 'foregrounds' output of the prompt encoder."}),
            "batch_size": ("INT", {"default": 1, "min": 1, "max": 64, "tooltip": "Layered images to generate."}),
        }, "optional": {
            "layer_names": ("STRING", {"forceInput": True, "tooltip":
                "Layer names, background first, one per line: connect the prompt encoder's 'layer_names' so any "
                "sampler's output keeps them (the LayerDiff SMG KSampler sets them itself)."}),
        }}

    RETURN_TYPES = ("LATENT",)
    FUNCTION = "generate"
    CATEGORY = CATEGORY

    def generate(self, width, height, foregrounds, batch_size, layer_names=None):
        import comfy.model_management

        names = layer_names.split("\n") if layer_names else None
        if names is not None and len(names) != foregrounds + 1:
            raise LayoutError(f"{self.DISPLAY_NAME}: 'layer_names' has {len(names)} lines for a background and "
                              f"{foregrounds} foregrounds; connect the same prompt encoder to both inputs.")
        rows = batch_size * num_slots(foregrounds)
        samples = torch.zeros([rows, 4, height // 8, width // 8], device=comfy.model_management.intermediate_device())
        return (inference.make_layered_latent(samples, foregrounds, names),)


class LayerDiffSMGSampler:
    DISPLAY_NAME = "LayerDiff SMG KSampler"
    DESCRIPTION = ("KSampler for layered latents with LayerDiff's self-mask guidance (SMG). SMG scale 0 is plain CFG.")

    @classmethod
    def INPUT_TYPES(cls):
        import comfy.samplers

        return {"required": {
            "model": ("MODEL", {"tooltip": "A model patched by 'LayerDiff Apply'."}),
            "seed": ("INT", {"default": 0, "min": 0, "max": 0xFFFFFFFFFFFFFFFF}),
            "steps": ("INT", {"default": 25, "min": 1, "max": 10000}),
            "cfg": ("FLOAT", {"default": 7.0, "min": 0.0, "max": 100.0, "step": 0.1, "round": 0.01}),
            "sampler_name": (comfy.samplers.KSampler.SAMPLERS,),
            "scheduler": (comfy.samplers.KSampler.SCHEDULERS,),
            "positive": ("CONDITIONING", {"tooltip": "Layered positive conditioning."}),
            "negative": ("CONDITIONING", {"tooltip": "Layered negative conditioning."}),
            "latent_image": ("LATENT", {"tooltip": "A layered latent ('LayerDiff Empty Layered Latent')."}),
            "denoise": ("FLOAT", {"default": 1.0, "min": 0.0, "max": 1.0, "step": 0.01}),
            **smg_inputs("smg_"),
        }}

    RETURN_TYPES = ("LATENT",)
    OUTPUT_TOOLTIPS = ("Layered latent: VAE Decode it, then 'LayerDiff Split Layers'.",)
    FUNCTION = "sample"
    CATEGORY = CATEGORY

    def sample(self, model, seed, steps, cfg, sampler_name, scheduler, positive, negative, latent_image,
               denoise=1.0, smg_scale=0.5, smg_start_percent=0.2, smg_blur_sigma=2.0):
        import nodes as comfy_nodes

        node = self.DISPLAY_NAME
        require_finite(node, cfg=cfg, denoise=denoise, smg_scale=smg_scale, smg_start_percent=smg_start_percent,
                       smg_blur_sigma=smg_blur_sigma)
        info = inference.layered_latent_info(latent_image, node)
        n = int(info["num_foregrounds"])
        state = inference.patch_state(model, node)
        for name, cond in (("positive", positive), ("negative", negative)):
            layers = inference.layers_of(cond, node, name)
            if layers.num_foregrounds != n:
                raise LayoutError(
                    f"{node}: the latent has {n} foreground layers but '{name}' has {layers.num_foregrounds} "
                    "foreground prompts. Connect the prompt encoder's 'foregrounds' output to the Empty Layered "
                    "Latent, or give one prompt per layer."
                )
        check_foreground_count(n, state.modules.config.max_foregrounds, node)
        guided = inference.with_self_mask_guidance(model, smg_scale, smg_start_percent, smg_blur_sigma, node)
        try:
            (out,) = comfy_nodes.common_ksampler(guided, seed, steps, cfg, sampler_name, scheduler, positive,
                                                 negative, latent_image, denoise=denoise)
        finally:
            state.prompt_kv.clear()  # the layer prompts' keys/values live for one run only
        names = inference.layers_of(positive, node, "positive").prompts
        out = layer_editing.restore_kept_rows(latent_image, dict(out))  # kept layers exactly as they came in
        out[inference.LATENT_KEY] = dict(info, layer_names=list(names))
        return (out,)


class LayerDiffSelfMaskGuidance:
    DISPLAY_NAME = "LayerDiff Self-Mask Guidance"
    DESCRIPTION = ("Adds LayerDiff's self-mask guidance (SMG) to a LayerDiff-patched model, like the core "
                   "Self-Attention Guidance node: use it with KSampler, KSamplerAdvanced, SamplerCustom or "
                   "SamplerCustomAdvanced on a layered latent. Scale 0 is plain CFG (exactly).")

    @classmethod
    def INPUT_TYPES(cls):
        return {"required": {
            "model": ("MODEL", {"tooltip": "A model patched by 'LayerDiff Apply'."}),
            **smg_inputs(""),
        }}

    RETURN_TYPES = ("MODEL",)
    OUTPUT_TOOLTIPS = ("The model with self-mask guidance: connect it to any sampler with layered conditioning.",)
    FUNCTION = "patch"
    CATEGORY = CATEGORY

    def patch(self, model, scale=0.5, start_percent=0.2, blur_sigma=2.0):
        node = self.DISPLAY_NAME
        require_finite(node, scale=scale, start_percent=start_percent, blur_sigma=blur_sigma)
        return (inference.with_self_mask_guidance(model, scale, start_percent, blur_sigma, node),)
