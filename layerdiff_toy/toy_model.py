"""The toy SD1.5-architecture model family: what the shapes benchmark, the bundled toy weights and the tests run.

SD1.5 weights cannot be downloaded on every machine, so the project also runs on tiny models with SD1.5's exact
architecture (same blocks, transformer sites, context width 768 and latent format) at a fraction of the width:
UNet ``model_channels`` 32 or 64 (:data:`TOY_WIDTHS`) with channel_mult [1, 2], a 2-layer CLIP-L text encoder
(tokenizer shipped in ComfyUI) and a TAESD-topology VAE (ComfyUI's VAE loader hard-codes SD's VAE width, TAESD is
what it accepts small). Width 32 is the tests' model (fastest). The shapes model is width 64
(:data:`SHAPES_TOY_WIDTH`): SD1.5's GroupNorm has 32 groups, so at width 32 every norm is a per-channel instance
norm that erases each channel's spatial mean, which on an 8x8 latent is a large part of the noise the UNet must
predict (docs/SHAPES_BENCHMARK.md); from width 64 on, a group holds several channels, as in SD1.5 (10 per group).

ComfyUI's model detection only knows SD1.5 at width 320, so a toy checkpoint loads through
CheckpointLoaderSimple only after :func:`register_toy_sd15` (called by our scripts and tests, never at import:
nothing in ComfyUI is changed by importing the extension). The registered configs subclass ComfyUI's SD15, so
every SD1.5 family check passes. Requires ComfyUI to be importable; nothing here imports it at module import time.
"""
from __future__ import annotations

import os
import zlib
from pathlib import Path

import torch

TOY_CLIP_CONFIG = Path(__file__).resolve().parent / "toy_clip_l_config.json"
DEFAULT_SEED = 20240301
TOY_WIDTHS = (32, 64)  # UNet model_channels of the registered toy configs
SHAPES_TOY_WIDTH = 64

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

_REGISTERED: dict[int, type] = {}


def register_toy_sd15(width: int = 32) -> type:
    """Add the toy SD1.5 configs (every width in :data:`TOY_WIDTHS`) to ComfyUI's model detection (idempotent) and
    return the one of ``width``."""
    if width not in TOY_WIDTHS:
        raise ValueError(f"no toy SD1.5 config of width {width}; toy widths are {TOY_WIDTHS}")
    if not _REGISTERED:
        import comfy.supported_models as supported

        for known in supported.models:  # registered by another import of this file (e.g. the custom-node package)
            toy_width = getattr(known, "layerdiff_toy_model", None)
            if toy_width in TOY_WIDTHS:
                _REGISTERED[toy_width] = known
        for w in TOY_WIDTHS:
            if w not in _REGISTERED:
                _REGISTERED[w] = _make_toy_sd15_class(supported, w)
                supported.models.insert(0, _REGISTERED[w])
    return _REGISTERED[width]


def _make_toy_sd15_class(supported, width: int) -> type:
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
        """Toy SD1.5 config (UNet model_channels ``width``, 2-layer CLIP-L)."""

        unet_config = {**supported.SD15.unet_config, "model_channels": width}
        layerdiff_toy_model = width

        def clip_target(self, *args, **kwargs):
            return supported_models_base.ClipTarget(sd1_clip.SD1Tokenizer, ToySD1ClipModel)

    ToySD15.__name__ = ToySD15.__qualname__ = f"ToySD15W{width}"
    return ToySD15


def toy_unet_yaml(width: int = 32) -> dict:
    """The toy UNet of ``width`` in the LDM yaml layout."""
    return {**TOY_UNET_YAML, "model_channels": int(width)}


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


def build_toy_sd15_model(seed: int = DEFAULT_SEED, width: int = 32):
    """The toy SD1.5 ``BaseModel`` of UNet ``width`` (initialised, on CPU, float32), built by ComfyUI's classes."""
    config_class = register_toy_sd15(width)
    with torch.no_grad():
        model = cpu_model_config(config_class, toy_unet_config(toy_unet_yaml(width))).get_model({})
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
                             dtype: torch.dtype = torch.float32, metadata: dict | None = None,
                             vae_state_dict: dict | None = None, width: int = 32) -> Path:
    """Write a single-file SD1.5-layout checkpoint of the toy model with random weights to ``path`` (atomically).

    ``vae_state_dict``: use these VAE weights (e.g. a trained TAESD) instead of random ones of kind ``vae``;
    ``width``: the UNet's model_channels (:data:`TOY_WIDTHS`).
    """
    model = build_toy_sd15_model(seed, width)
    clip_sd = build_toy_clip(model.model_config, seed).state_dict()
    vae_sd = vae_state_dict if vae_state_dict is not None else build_vae_module(vae, seed).state_dict()
    tensors = toy_checkpoint_state_dict(model, clip_sd, vae_sd, dtype)
    return _atomic_save(tensors, Path(path), {"format": "pt", "layerdiff_toy_model": "toy_sd15", "seed": str(seed),
                                              **(metadata or {})})


# ------------------------------------------------------------------------------------------------- shipped assets
# The trained toy model of the shapes benchmark ships as small files (docs/SHAPES_BENCHMARK.md): UNet and VAE in
# fp16, plus the LayerDiff weights. The text encoder is random and frozen, and its token embedding alone is 150 MB,
# so it is not shipped: :func:`assemble_toy_checkpoint` regenerates it from its seed with :func:`init_weights_`'s
# generator and checks a SHA-256 of the regenerated values, so a change of torch's RNG fails loudly.
TOY_ASSETS_DIR = Path(__file__).resolve().parents[1] / "assets" / "toy_shapes"
TOY_BASE_ASSET = "toy_shapes_base.safetensors"
TOY_LAYERDIFF_ASSET = "layerdiff_toy_shapes.safetensors"
TOY_CHECKPOINT_NAME = "layerdiff_toy_shapes_sd15.safetensors"
CLIP_KEY_PREFIX = "cond_stage_model."
_ASSET_FORMAT = "layerdiff-toy-assets-1"


class ToyAssetError(RuntimeError):
    """The shipped toy assets are missing, damaged, or their text encoder cannot be regenerated exactly."""


def toy_layerdiff_weights_path(assets_dir: str | os.PathLike = TOY_ASSETS_DIR) -> Path:
    """The shipped LayerDiff weights of the toy shapes model (the loader's format, layerdiff_model/modules/weights.py)."""
    return Path(assets_dir) / TOY_LAYERDIFF_ASSET


def _clip_init_name(checkpoint_key: str) -> str:
    """``cond_stage_model.transformer...`` -> the parameter name :func:`build_toy_clip` initialised it under."""
    return "clip_l." + checkpoint_key[len(CLIP_KEY_PREFIX):]


_DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}


def _regenerate(entry: dict, seed: int) -> torch.Tensor:
    """The tensor of one recipe entry, in the stored dtype. ``round``: the dtype the values were rounded through
    (ComfyUI keeps a CPU text encoder in fp16, so a checkpoint saved from a loaded model holds fp16-rounded values)."""
    shape = tuple(entry["shape"])
    if entry["kind"] == "fill":
        values = torch.full(shape, float(entry["value"]), dtype=torch.float32)
    else:
        values = torch.empty(shape, dtype=torch.float32)
        _init_param_(values, entry["name"], False, seed, float(entry["std"]))
    values = values.to(_DTYPES[entry.get("round", "float32")])
    return values.to(_DTYPES[entry.get("dtype", "float32")])


def _clip_recipe(checkpoint: dict, seed: int) -> tuple[list[dict], dict]:
    """Split the checkpoint's text encoder into tensors regenerable from ``seed`` (recipe) and the rest (kept)."""
    recipe, kept = [], {}
    for key in sorted(k for k in checkpoint if k.startswith(CLIP_KEY_PREFIX)):
        tensor = checkpoint[key].float()  # for the constant check
        dtype = str(checkpoint[key].dtype).replace("torch.", "")
        candidates = [{"kind": "randn", "name": _clip_init_name(key), "std": 0.02, "round": r}
                      for r in ("float32", "float16", "bfloat16")]
        if tensor.numel() and bool((tensor == tensor.reshape(-1)[0]).all()):
            candidates.insert(0, {"kind": "fill", "value": float(tensor.reshape(-1)[0])})
        for entry in candidates:
            entry = {"key": key, "shape": list(tensor.shape), "dtype": dtype, **entry}
            if dtype in _DTYPES and tensor.ndim and torch.equal(_regenerate(entry, seed), checkpoint[key]):
                recipe.append(entry)
                break
        else:
            kept[key] = checkpoint[key].contiguous()
    return recipe, kept


def _clip_digest(tensors: list[torch.Tensor]) -> str:
    import hashlib

    digest = hashlib.sha256()
    for t in tensors:
        digest.update(t.float().contiguous().numpy().tobytes())
    return digest.hexdigest()


def export_toy_assets(checkpoint_path: str | os.PathLike, layerdiff_path: str | os.PathLike | None = None,
                      assets_dir: str | os.PathLike = TOY_ASSETS_DIR, seed: int = DEFAULT_SEED,
                      dtype: torch.dtype = torch.float16, metadata: dict | None = None) -> dict[str, Path]:
    """Split a trained full toy checkpoint into the shipped files; copy the LayerDiff weights next to them.

    ``seed`` must be the seed the checkpoint's text encoder was generated with: every text-encoder tensor must be
    regenerable exactly (or is stored as is when small). Host-free (safetensors + torch only).
    """
    import json

    from safetensors import safe_open
    from safetensors.torch import load_file

    checkpoint = load_file(str(checkpoint_path))
    recipe, kept = _clip_recipe(checkpoint, seed)
    kept_bytes = sum(t.numel() * t.element_size() for t in kept.values())
    if kept_bytes > 4 * 2**20:
        raise ToyAssetError(f"{checkpoint_path}: {kept_bytes / 2**20:.0f} MB of the text encoder is not regenerable "
                            f"from seed {seed} (e.g. {sorted(kept)[:3]}); was it made with another seed or trained?")
    tensors = {k: v.to(dtype).contiguous() for k, v in checkpoint.items()
               if not k.startswith(CLIP_KEY_PREFIX) and v.is_floating_point()}
    tensors.update({k: v for k, v in checkpoint.items() if not k.startswith(CLIP_KEY_PREFIX)
                    and not v.is_floating_point()})
    tensors.update(kept)
    info = {"format": _ASSET_FORMAT, "clip_seed": str(seed), "clip_recipe": json.dumps(recipe),
            "clip_sha256": _clip_digest([_regenerate(e, seed) for e in recipe]), **(metadata or {})}
    out = Path(assets_dir)
    out.mkdir(parents=True, exist_ok=True)
    written = {"base": _atomic_save(tensors, out / TOY_BASE_ASSET, info)}
    if layerdiff_path is not None:  # same file in ``dtype`` (the loader casts to the UNet's dtype)
        with safe_open(str(layerdiff_path), framework="pt") as fh:
            layer_meta = fh.metadata() or {}
            layer_tensors = {k: fh.get_tensor(k) for k in fh.keys()}
        layer_tensors = {k: (v.to(dtype) if v.is_floating_point() else v).contiguous() for k, v in layer_tensors.items()}
        written["layerdiff"] = _atomic_save(layer_tensors, toy_layerdiff_weights_path(out), layer_meta)
    return written


def assemble_toy_checkpoint(out_path: str | os.PathLike, assets_dir: str | os.PathLike = TOY_ASSETS_DIR) -> Path:
    """Write the full, ComfyUI-loadable single-file toy checkpoint (fp32) from the shipped assets, atomically.

    The text encoder is regenerated from the seed in the asset metadata and verified against the stored SHA-256;
    a mismatch (e.g. torch changed its random generator) raises :class:`ToyAssetError` instead of writing a model
    with a different text encoder. Load the result with CheckpointLoaderSimple after :func:`register_toy_sd15`.
    """
    import json

    from safetensors import safe_open

    source = Path(assets_dir) / TOY_BASE_ASSET
    if not source.is_file():
        raise ToyAssetError(f"toy model asset not found: {source} (it ships in assets/toy_shapes/ of the repository; "
                            "re-create it with scripts/shapes_benchmark.py --export-assets).")
    try:
        with safe_open(str(source), framework="pt") as fh:
            meta = fh.metadata() or {}
            tensors = {k: fh.get_tensor(k) for k in fh.keys()}
    except Exception as exc:  # noqa: BLE001 - safetensors raises several types for damaged files
        raise ToyAssetError(f"toy model asset {source} is damaged ({exc}); restore it from the repository.") from exc
    if meta.get("format") != _ASSET_FORMAT:
        raise ToyAssetError(f"{source} is not a toy model asset (format {meta.get('format')!r}, "
                            f"expected {_ASSET_FORMAT!r}).")
    seed, recipe = int(meta["clip_seed"]), json.loads(meta["clip_recipe"])
    clip = {e["key"]: _regenerate(e, seed) for e in recipe}
    digest = _clip_digest(list(clip.values()))
    if digest != meta["clip_sha256"]:
        raise ToyAssetError(
            f"the toy text encoder regenerated from seed {seed} does not match the checksum stored in {source.name} "
            f"({digest[:12]} != {meta['clip_sha256'][:12]}): this torch version draws different random numbers "
            f"(torch {torch.__version__}). Re-create the assets with this torch (scripts/shapes_benchmark.py) or use "
            "the torch version the assets were made with.")
    state = {k: (v.float() if v.is_floating_point() else v) for k, v in tensors.items()}
    state.update(clip)
    keep = {k: v for k, v in meta.items() if k not in ("clip_recipe",)}
    return _atomic_save(state, Path(out_path), {**keep, "format": "pt", "layerdiff_toy_model": "toy_sd15"})


def _atomic_save(tensors: dict, path: Path, metadata: dict) -> Path:
    from comfy_headless.product import product_names

    return product_names("layerdiff_model.safetensors_file", "save_safetensors")(path, tensors, metadata)
