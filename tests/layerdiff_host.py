"""Helpers shared by the host-integration tests: our loaded package's modules, tiny weights, layered runs."""
from __future__ import annotations


import comfy_host
from comfy_headless.nodes_api import call_node
from comfy_headless.product import product_module as package_module  # noqa: F401  (the tests' name for it)


def node(name: str):
    return comfy_host.boot()[name]()


def adapter():
    return package_module("nodes.host.inference")


def tiny_model():
    """(MODEL, CLIP, VAE) of the tiny SD1.5 checkpoint, loaded by the core CheckpointLoaderSimple."""
    comfy_host.boot()
    return comfy_host.load_checkpoint(comfy_host.ensure_tiny_sd15_checkpoint())


def tiny_modules(model, random: bool = True, seed: int = 1, **config):
    """LayerDiff modules sized for ``model``: random non-zero weights, or zero-initialised outputs."""
    a = adapter()
    cfg = a.config_for_model(model, **config)
    return a.build_modules(cfg, seed=seed, zero_outputs=not random)


def save_tiny_weights(name: str, modules) -> str:
    """Write ``modules`` into this session's models/layerdiff folder; returns the name the loader lists."""
    import folder_paths

    weights = package_module("layerdiff_model.modules.weights")
    weights.save_weights(comfy_host.host().model_path("layerdiff", name), modules)
    getattr(folder_paths, "filename_list_cache", {}).pop("layerdiff", None)
    return name


def encode(clip, foregrounds, global_prompt="a scene", background="a background", negative="bad"):
    return node("LayerDiffPromptEncode").encode(clip, global_prompt, background, "\n".join(foregrounds), negative)[:3]


def empty_latent(foregrounds: int, batch: int = 1, size: int = 64):
    return node("LayerDiffEmptyLatent").generate(size, size, foregrounds, batch)[0]


def sample(model, positive, negative, latent, steps=3, cfg=5.0, smg_scale=0.0, seed=7, **kw):
    """The SMG KSampler node; returns the samples tensor."""
    out = node("LayerDiffSMGSampler").sample(model, seed, steps, cfg, "euler", "normal", positive, negative, latent,
                                             smg_scale=smg_scale, **kw)[0]
    return out["samples"], out


def core_ksampler(model, positive, negative, latent, steps=3, cfg=5.0, seed=7, denoise=1.0):
    """The core KSampler node (euler, normal) with the settings of :func:`sample`; returns (samples, LATENT)."""
    out = core_node("KSampler", model=model, seed=seed, steps=steps, cfg=cfg, sampler_name="euler",
                    scheduler="normal", positive=positive, negative=negative, latent_image=latent, denoise=denoise)[0]
    return out["samples"], out


def core_node(name: str, **inputs) -> tuple:
    """Run the core ComfyUI node ``name`` (its node id) with keyword inputs; returns its outputs as a tuple
    (classic and 0.3.x V3 nodes alike)."""
    return call_node(name, **inputs)


def for_tiny_models(api: dict, weights: str, width: int = 64, height: int = 48, **sampler) -> dict:
    """Point an API prompt of a shipped workflow at the tiny checkpoint and ``weights`` and shrink it to run in
    seconds on a CPU; ``sampler`` overrides inputs of the SMG KSampler."""
    for entry in api.values():
        inputs = entry["inputs"]
        if entry["class_type"] == "CheckpointLoaderSimple":
            inputs["ckpt_name"] = comfy_host.ensure_tiny_sd15_checkpoint()
        elif entry["class_type"] == "LayerDiffLoadWeights":
            inputs["weights_name"] = weights
        elif entry["class_type"] == "LayerDiffEmptyLatent":
            inputs["width"], inputs["height"] = width, height
        elif entry["class_type"] == "LayerDiffSMGSampler":
            inputs.update(steps=2, smg_start_percent=0.0, **sampler)
        elif entry["class_type"] == "ControlNetLoader":
            inputs["control_net_name"] = comfy_host.ensure_tiny_controlnet()
    return api
