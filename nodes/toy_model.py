"""The toy SD1.5-architecture model family: what the shapes benchmark, the bundled toy weights and the tests run.

SD1.5 weights cannot be downloaded on every machine, so the project also runs on a tiny model with SD1.5's exact
architecture (same blocks, transformer sites, context width 768 and latent format) at a fraction of the width:
UNet ``model_channels`` 32 with channel_mult [1, 2], a 2-layer CLIP-L text encoder (tokenizer shipped in ComfyUI)
and a TAESD-topology VAE (ComfyUI's VAE loader hard-codes SD's VAE width, TAESD is what it accepts small).

ComfyUI's model detection only knows SD1.5 at width 320, so a toy checkpoint loads through
CheckpointLoaderSimple only after :func:`register_toy_sd15` (called by our scripts and tests, never at import:
nothing in ComfyUI is changed by importing the extension). The registered config subclasses ComfyUI's SD15, so
every SD1.5 family check passes. Requires ComfyUI to be importable; nothing here imports it at module import time.
"""
from __future__ import annotations

import os
import zlib
from pathlib import Path

import torch

TOY_CLIP_CONFIG = Path(__file__).resolve().parent / "toy_clip_l_config.json"
DEFAULT_SEED = 20240301

# The toy UNet in the LDM yaml layout that comfy.model_detection.convert_config reads.
TOY_UNET_YAML = {
    "use_checkpoint": False,
    "image_size": 32,
    "in_channels": 4,
    "out_channels": 4,
    "model_channels": 32,
    "attention_resolutions": [1, 2],
    "num_res_blocks": 1,
    "channel_mult": [1, 2],
    "transformer_depth": 1,
    "context_dim": 768,
    "use_spatial_transformer": True,
    "use_linear_in_transformer": False,
    "legacy": False,
    "adm_in_channels": None,
    "use_temporal_attention": False,
    "use_temporal_resblock": False,
}

_REGISTERED: dict[str, type] = {}


def register_toy_sd15() -> type:
    """Add the toy SD1.5 config to ComfyUI's model detection (idempotent) and return it."""
    if "ToySD15" in _REGISTERED:
        return _REGISTERED["ToySD15"]
    import comfy.supported_models as supported

    for known in supported.models:  # registered by another import of this file (e.g. the custom-node package)
        if getattr(known, "layerdiff_toy_model", False):
            _REGISTERED["ToySD15"] = known
            return known
    toy = _make_toy_sd15_class(supported)
    supported.models.insert(0, toy)
    _REGISTERED["ToySD15"] = toy
    return toy


def _make_toy_sd15_class(supported) -> type:
    from comfy import sd1_clip, supported_models_base

    class ToyClipL(sd1_clip.SDClipModel):
        """SD1 CLIP-L text encoder with the toy config (width 768, 2 layers)."""

        def __init__(self, device="cpu", dtype=None, **kwargs):
            kwargs["textmodel_json_config"] = str(TOY_CLIP_CONFIG)
            kwargs.setdefault("return_projected_pooled", False)  # as SD1.5 checkpoints: no text_projection
            super().__init__(device=device, dtype=dtype, **kwargs)

    class ToySD1ClipModel(sd1_clip.SD1ClipModel):
        def __init__(self, device="cpu", dtype=None, **kwargs):
            kwargs["clip_model"] = ToyClipL
            super().__init__(device=device, dtype=dtype, **kwargs)

    class ToySD15(supported.SD15):
        """Toy SD1.5 config (UNet model_channels 32, 2-layer CLIP-L)."""

        unet_config = {**supported.SD15.unet_config, "model_channels": 32}
        layerdiff_toy_model = True

        def clip_target(self, *args, **kwargs):
            return supported_models_base.ClipTarget(sd1_clip.SD1Tokenizer, ToySD1ClipModel)

    return ToySD15


def toy_unet_config(yaml_config: dict | None = None) -> dict:
    """ComfyUI's internal UNet config (``convert_config`` of the LDM yaml layout) for the toy UNet."""
    import comfy.model_detection

    return comfy.model_detection.convert_config(dict(yaml_config or TOY_UNET_YAML))


# ------------------------------------------------------------------------------------------------- weight init
def init_weights_(module: torch.nn.Module, seed: int = DEFAULT_SEED, std: float | str = 0.02, prefix: str = "") -> None:
    """Deterministically initialise a module whose ComfyUI ops skipped init.

    Weights ~ N(0, std) from a generator seeded by (seed, parameter name), so a tensor's values do not depend
    on creation order or on the ComfyUI version; ``std="fan_in"`` uses 1/sqrt(fan_in) instead (keeps the signal
    alive through deep plain conv stacks such as TAESD). Norm layers get weight 1 / bias 0, other biases 0;
    scalar parameters (``vae_scale``, ``logit_scale``...) keep their constructed values.
    """
    norms = (torch.nn.GroupNorm, torch.nn.LayerNorm, torch.nn.BatchNorm2d)
    with torch.no_grad():
        for mod_name, mod in module.named_modules():
            for p_name, param in mod.named_parameters(recurse=False):
                name = f"{prefix}{mod_name}.{p_name}" if mod_name else f"{prefix}{p_name}"
                _init_param_(param, name, isinstance(mod, norms), seed, std)


def _init_param_(param: torch.Tensor, name: str, is_norm: bool, seed: int, std: float | str) -> None:
    if param.ndim == 0:
        return
    if is_norm:
        param.fill_(1.0 if name.endswith("weight") else 0.0)
    elif name.endswith("bias"):
        param.zero_()
    else:
        if std == "fan_in":
            scale = (param[0].numel() if param.ndim > 1 else param.numel()) ** -0.5
        else:
            scale = float(std)
        generator = torch.Generator().manual_seed((seed * 1_000_003 + zlib.crc32(name.encode())) % 2**63)
        values = torch.randn(param.shape, generator=generator, dtype=torch.float32) * scale
        param.copy_(values.to(param.dtype))


# ------------------------------------------------------------------------------------------------- toy models
def cpu_model_config(config_class: type, unet_config: dict):
    model_config = config_class(unet_config)
    model_config.set_inference_dtype(torch.float32, None)
    return model_config


def build_toy_sd15_model(seed: int = DEFAULT_SEED):
    """The toy SD1.5 ``BaseModel`` (UNet initialised, on CPU, float32), built by ComfyUI's model classes."""
    config_class = register_toy_sd15()
    with torch.no_grad():
        model = cpu_model_config(config_class, toy_unet_config()).get_model({})
    init_weights_(model.diffusion_model, seed)
    return model


def build_toy_clip(model_config, seed: int = DEFAULT_SEED) -> torch.nn.Module:
    """The toy text encoder module of ``model_config``'s clip target (state dict keys ``clip_l.*``)."""
    target = model_config.clip_target()
    with torch.no_grad():
        clip = target.clip(device="cpu", dtype=torch.float32, **target.params)
    init_weights_(clip, seed)
    return clip


def build_vae_module(kind: str = "taesd", seed: int = DEFAULT_SEED) -> torch.nn.Module:
    """A VAE module that ``comfy.sd.VAE`` recognises from its state dict, 8x downscale, 4 latent channels.

    ``taesd``: TAESD (2.4M parameters). ``sd``: the real SD1.x AutoencoderKL topology (83M parameters).
    """
    with torch.no_grad():
        if kind == "taesd":
            import comfy.taesd.taesd

            vae = comfy.taesd.taesd.TAESD()
        elif kind == "sd":
            from comfy.ldm.models.autoencoder import AutoencoderKL

            ddconfig = {"double_z": True, "z_channels": 4, "resolution": 256, "in_channels": 3, "out_ch": 3,
                        "ch": 128, "ch_mult": [1, 2, 4, 4], "num_res_blocks": 2, "attn_resolutions": [],
                        "dropout": 0.0}
            vae = AutoencoderKL(ddconfig=ddconfig, embed_dim=4)
        else:
            raise ValueError(f"unknown VAE kind {kind!r} (use 'taesd' or 'sd')")
    init_weights_(vae, seed, std="fan_in")
    return vae


def toy_checkpoint_state_dict(model, clip_sd: dict, vae_sd: dict, dtype: torch.dtype = torch.float32) -> dict:
    """Single-file SD1.5 checkpoint keys (``model.diffusion_model.*``, ``first_stage_model.*``,
    ``cond_stage_model.transformer.text_model.*``) as ComfyUI's CheckpointSave writes them."""
    state_dict = model.state_dict_for_saving(clip_sd, vae_sd)
    return {k: v.detach().to(dtype).contiguous() for k, v in state_dict.items()}


def make_toy_sd15_checkpoint(path: str | os.PathLike, seed: int = DEFAULT_SEED, vae: str = "taesd",
                             dtype: torch.dtype = torch.float32, metadata: dict | None = None) -> Path:
    """Write a single-file SD1.5-layout checkpoint of the toy model with random weights to ``path``."""
    from safetensors.torch import save_file

    model = build_toy_sd15_model(seed)
    clip_sd = build_toy_clip(model.model_config, seed).state_dict()
    vae_sd = build_vae_module(vae, seed).state_dict()
    tensors = toy_checkpoint_state_dict(model, clip_sd, vae_sd, dtype)
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    save_file(tensors, str(path), metadata={"format": "pt", "layerdiff_toy_model": "toy_sd15", "seed": str(seed),
                                            **(metadata or {})})
    return path
