"""Headless ComfyUI harness for the tests.

The headless ComfyUI library (``comfy_headless.boot``: boot ComfyUI in this process, load this repository as a
custom node; ``comfy_headless.prompts``: UI workflow -> API prompt, ComfyUI's validator and executor) plus what
only tests need: tiny SD1.5-architecture models that ComfyUI's own loaders accept (the toy family of
``layerdiff_toy/toy_model.py``), a tiny ControlNet and an SDXL-family model that LayerDiff must refuse. The test-only
model configs are registered whenever ComfyUI boots, whoever boots it first.

Nothing here imports ComfyUI at module import time: call :func:`boot` first (the conftest fixtures do).
"""
from __future__ import annotations

import os
import zlib
from pathlib import Path
from types import ModuleType
from typing import Callable

import torch

from comfy_headless.boot import (  # noqa: F401  (re-exported: the harness API the tests use)
    PACKAGE_DIR_NAME,
    REPO_ROOT,
    HarnessError,
    HostInfo,
    _comfy_version,
    add_boot_hook,
    boot,
    default_comfyui_path,
    host,
    set_default_work_dir,
)
from comfy_headless.prompts import (  # noqa: F401
    CONTROL_AFTER_GENERATE,
    MODE_BYPASSED,
    MODE_MUTED,
    UI_ONLY_TYPES,
    WIDGET_TYPES,
    FakeServer,
    NodeExecutionError,
    PromptRun,
    PromptValidationError,
    UnknownNodeTypeError,
    load_workflow,
    run_prompt,
    ui_to_api,
    validate,
    widget_inputs,
    widget_specs,
)
from layerdiff_toy import toy_model

DATA_DIR = Path(__file__).resolve().parent / "data"
TINY_SD15_NAME = "tiny_sd15.safetensors"
TINY_CONTROLNET_NAME = "tiny_controlnet_sd15.safetensors"
DEFAULT_SEED = 20240301


# A tiny SDXL-family UNet (context 2048, pooled "adm" input): a model LayerDiff must refuse.
TINY_SDXL_UNET_YAML = {
    **toy_model.TOY_UNET_YAML,
    "context_dim": 2048,
    "use_linear_in_transformer": True,
    "adm_in_channels": 2816,
    "num_classes": "sequential",
}


# ------------------------------------------------------------------------------------------------- test model configs
# The toy SD1.5 family (UNet width 32, 2-layer CLIP, TAESD VAE) lives in layerdiff_toy/toy_model.py. The harness
# adds only what tests need on top (an SDXL-family model that must be refused, the tiny ControlNet).
_TEST_CONFIGS: dict[str, type] = {}


def register_test_model_configs() -> dict[str, type]:
    """Register the toy SD1.5 config with ComfyUI's model detection (idempotent) and return the test configs.

    ``TinySD15`` is the toy config (subclass of ``comfy.supported_models.SD15``). ``TinySDXL`` is not
    registered: it is only built directly.
    """
    if _TEST_CONFIGS:
        return _TEST_CONFIGS
    import comfy.supported_models as supported

    _TEST_CONFIGS.update(TinySD15=toy_model.register_toy_sd15(), TinySDXL=_make_tiny_sdxl_class(supported))
    return _TEST_CONFIGS


add_boot_hook(register_test_model_configs)


def _make_tiny_sdxl_class(supported: ModuleType) -> type:
    class TinySDXL(supported.SDXL):
        """Test-only SDXL-family config for a tiny UNet; never registered for detection."""

        unet_config = {**supported.SDXL.unet_config, "model_channels": 32, "transformer_depth": [1, 1]}
        unet_extra_config = {"num_heads": -1, "num_head_channels": 16}

    return TinySDXL


def tiny_unet_config(yaml_config: dict | None = None) -> dict:
    return toy_model.toy_unet_config(yaml_config)


def init_weights_(module: torch.nn.Module, seed: int = DEFAULT_SEED, std: float | str = 0.02, prefix: str = "") -> None:
    toy_model.init_weights_(module, seed, std, prefix)


def build_tiny_sd15_model(seed: int = DEFAULT_SEED):
    register_test_model_configs()
    return toy_model.build_toy_sd15_model(seed)


def make_tiny_sd15_checkpoint(path: str | os.PathLike, seed: int = DEFAULT_SEED, vae: str = "taesd",
                              dtype: torch.dtype = torch.float32) -> Path:
    """Write a toy SD1.5 checkpoint with random weights (loads after :func:`register_test_model_configs`)."""
    register_test_model_configs()
    return toy_model.make_toy_sd15_checkpoint(path, seed, vae, dtype)


def make_tiny_controlnet(path: str | os.PathLike, seed: int = DEFAULT_SEED + 1, zero_conv_std: float = 0.2) -> Path:
    """Write a ControlNet for the tiny UNet (keys as in ``control_v11*.safetensors``: no prefix).

    Built with ComfyUI's ``comfy.cldm.cldm.ControlNet`` from the config ComfyUI detects for the tiny UNet, so the
    core ControlNetLoader loads it. Zero convs get non-zero weights (std ``zero_conv_std``) so the control
    visibly changes the result.
    """
    import comfy.cldm.cldm
    from safetensors.torch import save_file

    config = dict(build_tiny_sd15_model(seed).model_config.unet_config)
    config.pop("out_channels", None)
    config["hint_channels"] = 3
    with torch.no_grad():
        control = comfy.cldm.cldm.ControlNet(**config)
    init_weights_(control, seed)
    _randomise_zero_convs_(control, seed, zero_conv_std)
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tensors = {k: v.detach().float().contiguous() for k, v in control.state_dict().items()}
    save_file(tensors, str(path), metadata={"format": "pt", "layerdiff_test_model": "tiny_controlnet"})
    return path


def _randomise_zero_convs_(control: torch.nn.Module, seed: int, std: float) -> None:
    with torch.no_grad():
        for name, param in control.named_parameters():
            if name.startswith(("zero_convs.", "middle_block_out.")):
                generator = torch.Generator().manual_seed(seed + zlib.crc32(name.encode()))
                param.copy_(torch.randn(param.shape, generator=generator) * std)


def make_tiny_sdxl_like_unet_model(seed: int = DEFAULT_SEED):
    """A ComfyUI ``ModelPatcher`` around a tiny SDXL-family model (context 2048, pooled input): not SD1.5.

    For "wrong model family" tests; it is not a checkpoint and has no text encoder or VAE.
    """
    import comfy.model_management
    import comfy.model_patcher

    config_class = register_test_model_configs()["TinySDXL"]
    with torch.no_grad():
        model = toy_model.cpu_model_config(config_class, tiny_unet_config(TINY_SDXL_UNET_YAML)).get_model({})
    init_weights_(model.diffusion_model, seed)
    device = comfy.model_management.get_torch_device()
    return comfy.model_patcher.ModelPatcher(model, load_device=device, offload_device=torch.device("cpu"))


def ensure_tiny_sd15_checkpoint(name: str = TINY_SD15_NAME, **kwargs) -> str:
    """Write the tiny checkpoint into this session's ``checkpoints`` folder (once) and return its name."""
    return _ensure_model("checkpoints", name, make_tiny_sd15_checkpoint, **kwargs)


def ensure_tiny_controlnet(name: str = TINY_CONTROLNET_NAME, **kwargs) -> str:
    """Write the tiny ControlNet into this session's ``controlnet`` folder (once) and return its name."""
    return _ensure_model("controlnet", name, make_tiny_controlnet, **kwargs)


def _ensure_model(folder: str, name: str, maker: Callable, **kwargs) -> str:
    import folder_paths

    path = host().model_path(folder, name)
    if not path.is_file():
        maker(path, **kwargs)
    getattr(folder_paths, "filename_list_cache", {}).pop(folder, None)
    if name not in folder_paths.get_filename_list(folder):
        raise HarnessError(f"{path} is not listed by folder_paths for {folder!r}")
    return name


def load_checkpoint(name: str = TINY_SD15_NAME):
    """(MODEL, CLIP, VAE) from the core CheckpointLoaderSimple node, called outside the executor.

    Runs under ``torch.no_grad()``: the executor runs nodes under ``torch.inference_mode()`` and 2024's CLIP
    constructor relies on it (an in-place copy into a parameter); ``no_grad`` keeps the weights usable for
    autograd later, which inference tensors are not.
    """
    import nodes

    with torch.no_grad():
        return nodes.CheckpointLoaderSimple().load_checkpoint(name)[:3]
