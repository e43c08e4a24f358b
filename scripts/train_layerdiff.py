#!/usr/bin/env python
"""Train LayerDiff modules (or the SD1.5 base model on composites) on a layered dataset; docs/TRAINING.md.

    python scripts/train_layerdiff.py --checkpoint ComfyUI/models/checkpoints/v1-5-pruned-emaonly.safetensors \
        --data data/my-layers --out ComfyUI/models/layerdiff/my_layerdiff.safetensors --run-dir runs/my-run
    torchrun --nproc_per_node 8 scripts/train_layerdiff.py ...same options...     # multi-GPU (DDP-style)

Boots ComfyUI headless first (``--comfyui``, else $COMFYUI_PATH, else the repo's .cache/comfyui), which loads this
repository as its custom node; the options, the training loop and the ComfyUI side (``nodes/host/training.py``)
all come from that one loaded copy. In-process API: :func:`train`.
"""
from __future__ import annotations

import argparse
import logging
import os
import sys
from pathlib import Path
from typing import Any

# the repository root, for comfy_headless, layerdiff_toy and scripts (the one sys.path line; README "Code map")
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from comfy_headless.boot import HarnessError, boot
from comfy_headless.product import product_module, product_names

LOG = logging.getLogger("LayerDiff.train")


def boot_comfyui(comfyui: str = "", device: str = "auto") -> None:
    """Boot ComfyUI once per process: CPU when there is no CUDA (or ``device == "cpu"``), fp32 master weights
    (mixed precision is autocast), the GPU of this torchrun rank."""
    import torch

    use_cuda = torch.cuda.is_available() and device != "cpu"
    if use_cuda and "LOCAL_RANK" in os.environ:
        torch.cuda.set_device(int(os.environ["LOCAL_RANK"]))
    boot(comfy_root=comfyui or None, cpu=not use_cuda, force_fp32=True)


def train(args_or_config: Any, cache=None) -> dict:
    """Train in this process. ``args_or_config``: a TrainConfig, a dict of options (names as in --help, with _ or
    -), an argparse Namespace, or an argv list. Boots ComfyUI if this process has not yet. ``cache``: a
    ``nodes.host.training.EncoderOutputCache`` shared with other runs of this process."""
    if isinstance(args_or_config, (list, tuple)):
        boot_comfyui(*_host_options(list(args_or_config)))
    elif isinstance(args_or_config, dict):
        boot_comfyui(str(args_or_config.get("comfyui") or ""), str(args_or_config.get("device") or "auto"))
    else:
        boot_comfyui(str(getattr(args_or_config, "comfyui", "") or ""), getattr(args_or_config, "device", "auto"))
    config = product_names("layerdiff_model.training.config", "as_config")(args_or_config)
    if config.toy_model:
        from layerdiff_toy.toy_model import register_toy_sd15

        register_toy_sd15()
    return product_module("nodes.host.training").train(config, cache=cache)


def _host_options(argv: list[str]) -> tuple[str, str]:
    """--comfyui and --device, read before ComfyUI boots (the full parser comes from the booted package)."""
    early = argparse.ArgumentParser(add_help=False)
    early.add_argument("--comfyui", default="")
    early.add_argument("--device", default="auto")
    known, _ = early.parse_known_args([str(a) for a in argv])
    return known.comfyui, known.device


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else list(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(message)s")
    try:
        boot_comfyui(*_host_options(argv))
    except HarnessError as exc:
        print(f"error: train_layerdiff.py: {exc}", file=sys.stderr)
        return 2
    build_parser = product_names("layerdiff_model.training.config", "build_parser")
    LayerDiffError = product_names("layerdiff_model.errors", "LayerDiffError")
    args = build_parser().parse_args(argv)
    try:
        summary = train(args)
    except LayerDiffError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    state = "finished" if summary["finished"] else f"stopped at step {summary['step']} (continue with --resume)"
    print(f"train_layerdiff.py: {state}; loss {summary['loss']:.4f}; {summary['skipped']} bad samples skipped; "
          f"output {summary['out']}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
