"""Helpers shared by the host-integration tests: our loaded package's modules, tiny weights, layered runs."""
from __future__ import annotations

import importlib

import torch

import comfy_host


def package_module(name: str):
    """A submodule of the LayerDiff package as ComfyUI loaded it, e.g. ``nodes.host_adapter``."""
    comfy_host.boot()
    return importlib.import_module(f"{comfy_host.host().package.__name__}.{name}")


def node(name: str):
    return comfy_host.boot()[name]()


def adapter():
    return package_module("nodes.host_adapter")


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

    weights = package_module("layerdiff_model.weights")
    weights.save_weights(comfy_host.host().model_path("layerdiff", name), modules)
    getattr(folder_paths, "filename_list_cache", {}).pop("layerdiff", None)
    return name


def encode(clip, foregrounds, global_prompt="a scene", background="a background", negative="bad"):
    return node("LayerDiffPromptEncode").encode(clip, global_prompt, background, "\n".join(foregrounds), negative)


def empty_latent(foregrounds: int, batch: int = 1, size: int = 64):
    return node("LayerDiffEmptyLatent").generate(size, size, foregrounds, batch)[0]


def sample(model, positive, negative, latent, steps=3, cfg=5.0, smg_scale=0.0, seed=7, **kw):
    """The SMG KSampler node; returns the samples tensor."""
    out = node("LayerDiffSMGSampler").sample(model, seed, steps, cfg, "euler", "normal", positive, negative, latent,
                                             smg_scale=smg_scale, **kw)[0]
    return out["samples"], out


def core_node(name: str, **inputs) -> tuple:
    """Run the core ComfyUI node ``name`` (its node id) with keyword inputs; returns its outputs as a tuple.

    Classic nodes (INPUT_TYPES / FUNCTION) and 0.3.x V3 nodes (an ``execute`` classmethod returning a NodeOutput,
    e.g. Self-Attention Guidance, Rebatch Latents) alike.
    """
    import nodes

    comfy_host.boot()
    cls = nodes.NODE_CLASS_MAPPINGS[name]
    if hasattr(cls, "define_schema"):  # V3 node
        return tuple(cls.execute(**inputs).args)
    return tuple(getattr(cls(), cls.FUNCTION)(**inputs))
