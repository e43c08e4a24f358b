"""Resumable training state on disk: atomic checkpoint files and RNG capture (docs/DESIGN.md 2.6).

A checkpoint is one ``torch.save`` file ``<run_dir>/checkpoints/step-<step>.pt`` holding everything a resumed run
needs to continue bit-for-bit: trained tensors, optimizer, LR scheduler, grad scaler, EMA, step, data position
and every random generator. It is written to a hidden temporary file in the same folder, flushed to disk and
renamed over the final name, so a crash or kill mid-write leaves the previous checkpoints intact and no partial
file under a checkpoint name (a stale hidden temp file from a killed process is removed on the next save).
"""
from __future__ import annotations

import os
import random
import re
from pathlib import Path
from typing import Any

import numpy as np
import torch

from ..atomic_file import atomic_write
from ..errors import LayerDiffError

STATE_FORMAT = "layerdiff-train-state-1"
CHECKPOINT_DIR = "checkpoints"
_NAME = re.compile(r"^step-(\d{8})\.pt$")


class CheckpointError(LayerDiffError):
    """A training checkpoint is missing, unreadable or from another kind of run."""


def checkpoint_dir(run_dir: str | os.PathLike) -> Path:
    return Path(run_dir) / CHECKPOINT_DIR


def checkpoint_name(step: int) -> str:
    return f"step-{step:08d}.pt"


def list_checkpoints(run_dir: str | os.PathLike) -> list[tuple[int, Path]]:
    """Complete checkpoints of a run, oldest first."""
    folder = checkpoint_dir(run_dir)
    if not folder.is_dir():
        return []
    found = [(int(m.group(1)), p) for p in folder.iterdir() if (m := _NAME.match(p.name)) and p.is_file()]
    return sorted(found)


def latest_checkpoint(run_dir: str | os.PathLike) -> Path | None:
    found = list_checkpoints(run_dir)
    return found[-1][1] if found else None


def atomic_torch_save(obj: Any, path: str | os.PathLike) -> Path:
    """``torch.save`` to ``path`` via a temporary file in the same folder and ``os.replace``."""
    atomic_write(path, lambda fh: torch.save(obj, fh))
    return Path(path)


def save_checkpoint(run_dir: str | os.PathLike, step: int, state: dict[str, Any], keep: int = 2) -> Path:
    """Write the checkpoint of ``step`` atomically, then delete all but the newest ``keep`` and stale temp files."""
    folder = checkpoint_dir(run_dir)
    folder.mkdir(parents=True, exist_ok=True)
    for stale in folder.glob(".step-*.tmp"):
        stale.unlink(missing_ok=True)
    path = atomic_torch_save({"format": STATE_FORMAT, "step": int(step), **state}, folder / checkpoint_name(step))
    for _, old in list_checkpoints(run_dir)[:-keep]:
        old.unlink(missing_ok=True)
    return path


def load_checkpoint(path: str | os.PathLike) -> dict[str, Any]:
    path = Path(path)
    try:
        state = torch.load(path, map_location="cpu", weights_only=False)
    except Exception as exc:  # noqa: BLE001 - any unpickling failure means an unusable file
        raise CheckpointError(f"Training checkpoint {path} cannot be read ({type(exc).__name__}: {exc}); delete it "
                              "to resume from the one before.") from exc
    if not isinstance(state, dict) or state.get("format") != STATE_FORMAT:
        raise CheckpointError(f"{path} is not a LayerDiff training checkpoint (format {STATE_FORMAT}).")
    return state


# ----------------------------------------------------------------------------------------------- RNG
def capture_rng(generator: torch.Generator | None = None) -> dict[str, Any]:
    """Every RNG a training step may touch: ours, torch's global CPU/CUDA, numpy's, Python's."""
    state = {"torch": torch.get_rng_state(), "numpy": np.random.get_state(), "python": random.getstate()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    if generator is not None:
        state["generator"] = generator.get_state()
    return state


def restore_rng(state: dict[str, Any], generator: torch.Generator | None = None) -> None:
    torch.set_rng_state(state["torch"])
    np.random.set_state(state["numpy"])
    random.setstate(state["python"])
    if "cuda" in state and torch.cuda.is_available() and len(state["cuda"]) == torch.cuda.device_count():
        torch.cuda.set_rng_state_all(state["cuda"])
    if generator is not None and "generator" in state:
        generator.set_state(state["generator"])
