#!/usr/bin/env python
"""Train LayerDiff modules (or the SD1.5 base model on composites) on a layered dataset; docs/TRAINING.md.

    python scripts/train_layerdiff.py --checkpoint ComfyUI/models/checkpoints/v1-5-pruned-emaonly.safetensors \
        --data data/my-layers --out ComfyUI/models/layerdiff/my_layerdiff.safetensors --run-dir runs/my-run
    torchrun --nproc_per_node 8 scripts/train_layerdiff.py ...same options...     # multi-GPU (DDP-style)

Boots ComfyUI headless (``--comfyui``, else $COMFYUI_PATH, else the repo's .cache/comfyui), loads this repository's
packages under their own name (never the repository's ``__init__``, never as top-level ``nodes``: that is
ComfyUI's ``nodes.py``), and runs ``nodes/training_adapter.train``. In-process API: :func:`train`.
"""
from __future__ import annotations

import importlib
import logging
import os
import sys
import types
from pathlib import Path
from typing import Any

REPO_ROOT = Path(__file__).resolve().parents[1]
PACKAGE_NAME = "comfyui_layerdiff_train"
if str(REPO_ROOT) not in sys.path:
    sys.path.insert(0, str(REPO_ROOT))

from layerdiff_model.errors import LayerDiffError  # noqa: E402
from layerdiff_model.training_config import as_config, build_parser  # noqa: E402

LOG = logging.getLogger("LayerDiff.train")


def comfyui_root(option: str = "") -> Path:
    raw = option or os.environ.get("COMFYUI_PATH") or str(REPO_ROOT / ".cache" / "comfyui")
    return Path(raw).expanduser().resolve()


def boot_comfyui(root: Path, device: str = "auto") -> None:
    """Import ComfyUI headless once per process: its argv parser never sees ours; CPU when there is no CUDA;
    fp32 master weights on GPU (mixed precision is autocast); offline Hugging Face hub."""
    if "comfy.model_management" in sys.modules:
        return
    if not (root / "nodes.py").is_file() or not (root / "comfy").is_dir():
        raise LayerDiffError(f"train_layerdiff.py: no ComfyUI at {root}. Pass --comfyui /path/to/ComfyUI or set "
                             "COMFYUI_PATH (or run `bash scripts/setup_comfyui.sh` for the pinned copy).")
    import torch

    if str(root) in sys.path:
        sys.path.remove(str(root))
    sys.path.insert(0, str(root))
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
    saved, sys.argv = sys.argv, [sys.argv[0] if sys.argv else "train_layerdiff.py"]
    try:
        import comfy.cli_args
    finally:
        sys.argv = saved
    use_cuda = torch.cuda.is_available() and device != "cpu"
    comfy.cli_args.args.cpu = not use_cuda
    comfy.cli_args.args.force_fp32 = True
    if use_cuda and "LOCAL_RANK" in os.environ:
        torch.cuda.set_device(int(os.environ["LOCAL_RANK"]))
    if (root / "utils" / "__init__.py").is_file():  # 0.3.x: ComfyUI's main.py imports its utils package early
        import utils  # noqa: F401
    import comfy.model_management  # noqa: F401


def training_adapter() -> types.ModuleType:
    """``nodes/training_adapter.py`` of this repository: the copy ComfyUI already loaded (tests, a running
    ComfyUI), else this repository imported as package ``comfyui_layerdiff_train``."""
    wanted = (REPO_ROOT / "nodes" / "training_adapter.py").resolve()
    for module in list(sys.modules.values()):
        file = getattr(module, "__file__", None)
        if file and module.__name__.endswith("nodes.training_adapter") and Path(file).resolve() == wanted:
            return module
    for module in list(sys.modules.values()):  # our package loaded by ComfyUI but the adapter not imported yet
        file = getattr(module, "__file__", None)
        if file and module.__name__.endswith(".nodes.host_adapter") and \
                Path(file).resolve() == (REPO_ROOT / "nodes" / "host_adapter.py").resolve():
            return importlib.import_module(module.__name__.rsplit(".", 1)[0] + ".training_adapter")
    if PACKAGE_NAME not in sys.modules:
        package = types.ModuleType(PACKAGE_NAME)
        package.__path__ = [str(REPO_ROOT)]
        package.__package__ = PACKAGE_NAME
        sys.modules[PACKAGE_NAME] = package
    return importlib.import_module(f"{PACKAGE_NAME}.nodes.training_adapter")


def train(args_or_config: Any) -> dict:
    """Train in this process. ``args_or_config``: a TrainConfig, a dict of options (names as in --help, with _ or
    -), an argparse Namespace, or an argv list. Boots ComfyUI if this process has not yet."""
    config = as_config(args_or_config)
    boot_comfyui(comfyui_root(config.comfyui), config.device)
    return training_adapter().train(config)


def is_user_error(exc: BaseException) -> bool:
    """A LayerDiffError of either copy of ``layerdiff_model``: this script imports it as top-level
    ``layerdiff_model`` (option parsing), the training adapter as part of its package (everything else)."""
    return any(cls.__name__ == LayerDiffError.__name__ and cls.__module__.endswith("layerdiff_model.errors")
               for cls in type(exc).__mro__)


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(message)s")
    try:
        summary = train(args)
    except Exception as exc:  # noqa: BLE001  (re-raised unless it is a LayerDiffError)
        if not is_user_error(exc):
            raise
        print(f"error: {exc}", file=sys.stderr)
        return 2
    state = "finished" if summary["finished"] else f"stopped at step {summary['step']} (continue with --resume)"
    print(f"train_layerdiff.py: {state}; loss {summary['loss']:.4f}; {summary['skipped']} bad samples skipped; "
          f"output {summary['out']}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
