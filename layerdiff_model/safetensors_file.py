"""The project's one safetensors writer and header reader: tensors saved atomically (``atomic_file``) with string
metadata, and the JSON header read without loading a tensor (weights metadata, checkpoint family checks)."""
from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Mapping

import torch
from safetensors.torch import save_file

from .atomic_file import PathLike, atomic_path

MAX_HEADER_BYTES = 100_000_000  # safetensors' own limit


def save_safetensors(path: PathLike, tensors: Mapping[str, torch.Tensor], metadata: Mapping[str, object]) -> Path:
    """Write ``tensors`` (moved to CPU, made contiguous) and ``metadata`` (values turned into strings) to
    ``path`` atomically, creating its folder. Returns the path."""
    path = Path(path)
    cpu = {k: v.detach().to("cpu").contiguous() for k, v in tensors.items()}
    with atomic_path(path) as tmp:
        save_file(cpu, tmp, metadata={str(k): str(v) for k, v in metadata.items()})
    return path


def read_safetensors_header(path: PathLike) -> dict:
    """The JSON header of a .safetensors file: tensor name -> {dtype, shape, data_offsets}, plus ``__metadata__``.

    Raises OSError when the file cannot be read and ValueError when it is not a safetensors file.
    """
    size = os.path.getsize(path)
    with open(path, "rb") as fh:
        header_len = int.from_bytes(fh.read(8), "little")
        if not 2 <= header_len <= min(size - 8, MAX_HEADER_BYTES):
            raise ValueError("bad header length")
        header = json.loads(fh.read(header_len))
    if not isinstance(header, dict):
        raise ValueError("the header is not a JSON object")
    return header
