"""LayerDiff weights file I/O (docs/DESIGN.md 2.5; the paper's trained modules, Sec. 3.2-3.4, as one file).

One ``.safetensors`` file with every new module (attention blocks, role embeddings, enhancer, mask read-out) and
metadata: format name and version, base family, max foregrounds, and the full :class:`LayerDiffConfig` as JSON.
Loading is strict: a missing or unexpected key, or a shape that differs from the config, is reported with the
file name, expected vs found. Writing is atomic (temp file + rename): a failure never leaves a half-written file.
Tensors are stored under their ``LayerDiffModules.state_dict()`` names with the shapes the config implies.
"""
from __future__ import annotations

import json
import os
from pathlib import Path

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file

from ..safetensors_file import read_safetensors_header, save_safetensors
from .config import FORMAT_NAME, FORMAT_VERSION, LayerDiffConfig
from ..errors import WeightsFileError
from .container import LayerDiffModules


def save_weights(path: str | os.PathLike, modules: LayerDiffModules, extra_metadata: dict | None = None) -> Path:
    """Write ``modules`` and their config to ``path`` atomically."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    config = modules.config
    metadata = {
        "format": FORMAT_NAME,
        "format_version": str(FORMAT_VERSION),
        "base_family": config.base_family,
        "max_foregrounds": str(config.max_foregrounds),
        "config": config.to_json(),
    }
    for k, v in (extra_metadata or {}).items():
        metadata[str(k)] = v if isinstance(v, str) else json.dumps(v)
    return save_safetensors(path, modules.state_dict(), metadata)


def read_metadata(path: str | os.PathLike) -> dict:
    """The metadata header only (cheap: no tensor is read)."""
    path = Path(path)
    _check_exists(path)
    try:
        header = read_safetensors_header(path)
    except (OSError, ValueError) as exc:
        raise WeightsFileError(
            f"LayerDiff weights file '{path.name}' is corrupted or not a .safetensors file ({exc}). "
            "Re-download or re-export it (the training script writes valid files)."
        ) from exc
    meta = header.get("__metadata__") or {}
    if meta.get("format") != FORMAT_NAME:
        raise WeightsFileError(
            f"'{path.name}' is a .safetensors file but not a LayerDiff weights file (no 'format: {FORMAT_NAME}' "
            "metadata). Checkpoints, LoRAs and ControlNets go in their own loaders; pick a file written by the "
            "LayerDiff training script."
        )
    return meta


def load_config(path: str | os.PathLike) -> LayerDiffConfig:
    meta = read_metadata(path)
    name = Path(path).name
    version = int(meta.get("format_version", "0"))
    if version > FORMAT_VERSION:
        raise WeightsFileError(
            f"'{name}' uses LayerDiff weights format version {version}, this extension reads up to "
            f"{FORMAT_VERSION}: update ComfyUI-LayerDiff."
        )
    if version < 1:
        raise WeightsFileError(f"'{name}' has an unknown LayerDiff format version {meta.get('format_version')!r}.")
    try:
        return LayerDiffConfig.from_json(meta["config"])
    except (KeyError, TypeError, ValueError) as exc:
        raise WeightsFileError(f"'{name}' has a damaged LayerDiff config in its metadata ({exc}).") from exc


def load_modules(path: str | os.PathLike, device: str | torch.device = "cpu", operations=torch.nn,
                 dtype: torch.dtype | None = None) -> LayerDiffModules:
    """Build :class:`LayerDiffModules` from the file's config and load its tensors strictly.

    ``dtype`` None keeps the file's float dtype (an fp16 file is held in fp16: no fp32 copy; ComfyUI's
    manual-cast ops compute in the input's dtype); training passes float32 for its master weights."""
    path = Path(path)
    config = load_config(path)
    try:
        state = load_file(str(path), device=str(device))
    except (SafetensorError, OSError, ValueError) as exc:
        raise WeightsFileError(
            f"LayerDiff weights file '{path.name}' could not be read ({exc}); it is probably truncated or "
            "corrupted. Re-download it or re-run the training script's export."
        ) from exc
    stored = {t.dtype for t in state.values() if t.is_floating_point()}
    if dtype is None and len(stored) == 1:
        dtype = stored.pop()
    modules = LayerDiffModules(config, dtype=dtype, device=device, operations=operations)
    load_state_strict(modules, state, path.name)
    modules.source_name = path.name
    return modules


def load_state_strict(modules: LayerDiffModules, state: dict[str, torch.Tensor], source: str) -> None:
    expected = modules.state_dict()
    missing = sorted(set(expected) - set(state))
    unexpected = sorted(set(state) - set(expected))
    wrong = [f"{k}: expected {tuple(expected[k].shape)}, found {tuple(state[k].shape)}"
             for k in expected if k in state and state[k].shape != expected[k].shape]
    if missing or unexpected or wrong:
        lines = [f"LayerDiff weights '{source}' do not match their own config:"]
        if missing:
            lines.append(f"  missing {len(missing)} tensors, e.g. {missing[:3]}")
        if unexpected:
            lines.append(f"  unexpected {len(unexpected)} tensors, e.g. {unexpected[:3]}")
        if wrong:
            lines.append("  wrong shapes: " + "; ".join(wrong[:3]))
        lines.append("The file is damaged or was edited; re-export it with the training script.")
        raise WeightsFileError("\n".join(lines))
    with torch.no_grad():
        for k, v in modules.state_dict().items():
            v.copy_(state[k])


def _check_exists(path: Path) -> None:
    if not path.is_file():
        raise WeightsFileError(
            f"LayerDiff weights file not found: '{path}'. Put the .safetensors file written by the training "
            "script into ComfyUI/models/layerdiff/ and pick it in the loader."
        )
