"""The few ComfyUI calls whose signatures differ between the pinned 2024 ComfyUI and current 0.3.x.

Everything version-dependent goes through this module (feature detection, never version-string parsing).
"""
from __future__ import annotations

import comfy.samplers


def calc_uncond(model, uncond, x, sigma, model_options):
    """Run only the unconditional branch, as SAG does. Returns the denoised prediction."""
    if hasattr(comfy.samplers, "calc_cond_batch"):  # 0.3.x
        (out,) = comfy.samplers.calc_cond_batch(model, [uncond], x, sigma, model_options)
        return out
    out, _ = comfy.samplers.calc_cond_uncond_batch(model, uncond, None, x, sigma, model_options)  # 2024
    return out


def register_model_folder(name: str, extensions: set[str]) -> None:
    """Register ComfyUI/models/<name>/ for a model type without clobbering paths users configured."""
    import os

    import folder_paths

    if name in folder_paths.folder_names_and_paths:
        paths, exts = folder_paths.folder_names_and_paths[name]
        folder_paths.folder_names_and_paths[name] = (paths, set(exts) | set(extensions))
        return
    folder_paths.folder_names_and_paths[name] = ([os.path.join(folder_paths.models_dir, name)], set(extensions))


def convert_cond(conditioning):
    """CONDITIONING -> the sampler's cond dicts (``comfy.sample.convert_cond`` in 2024, ``sampler_helpers`` in 0.3.x)."""
    try:
        from comfy.sampler_helpers import convert_cond as _convert
    except ImportError:  # 2024
        from comfy.sample import convert_cond as _convert
    return _convert(conditioning)


def transformer_blocks_mutate_in_place() -> bool:
    """Whether this ComfyUI's BasicTransformerBlock adds its attention residuals in place (``x += n``, 2024);
    gradient checkpointing cannot recompute such a block exactly (nodes/unet_checkpointing.py)."""
    import inspect

    from comfy.ldm.modules.attention import BasicTransformerBlock

    forward = BasicTransformerBlock.__dict__.get("_forward", BasicTransformerBlock.forward)
    try:
        return "x += n" in inspect.getsource(forward)
    except (OSError, TypeError):
        return True  # unknown: take the safe choice


def set_control_hint(control, hint, strength: float, percent_range: tuple[float, float], vae=None):
    """``control.set_cond_hint`` with the VAE where this ComfyUI takes one (0.3.x: ControlNets that work in latent
    space need it; the 2024 signature has no ``vae``)."""
    import inspect

    if vae is not None and "vae" in inspect.signature(control.set_cond_hint).parameters:
        return control.set_cond_hint(hint, strength, percent_range, vae=vae)
    return control.set_cond_hint(hint, strength, percent_range)


def on_sampling_done(model, callback) -> bool:
    """Have ``callback()`` called when a sampling run with ``model`` (a ModelPatcher) ends: the ON_CLEANUP callback
    of 0.3.x. Returns False where this ComfyUI has no such callback (2024)."""
    try:
        from comfy.patcher_extension import CallbacksMP
    except ImportError:  # 2024
        return False
    model.add_callback(CallbacksMP.ON_CLEANUP, lambda patcher: callback())
    return True
