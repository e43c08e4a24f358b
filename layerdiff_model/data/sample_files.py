"""Sample folders: encode, write, decode, read and validate one layered sample on disk (docs/DESIGN.md 2.6).

One folder per sample::

    sample.json       {"format": "layerdiff-sample-1", "global_prompt": str, "background_prompt": str,
                       "foreground_prompts": [str, ...] (top first), "meta": {...} (optional, e.g. ground truth)}
    background.png    RGB
    foreground_k.png  RGB, full frame; pixels outside mask k are ignored          (k = 1..N)
    mask_k.png        L, 0 or 255; the layer's full (un-occluded) extent           (k = 1..N)
    composite.png     optional RGB, for viewing

The same file names and bytes make the members of WebDataset shards (:mod:`.dataset_shards`). In memory a
sample is a :class:`~.layered_sample.LayeredSample`.
"""
from __future__ import annotations

import io
import json
import os
import re
import shutil
import tempfile
from pathlib import Path
from typing import Iterable, Mapping

import numpy as np
import torch
from PIL import Image

from ..errors import DatasetError
from .layered_sample import LayeredSample, check_prompts, check_sample

SAMPLE_FORMAT = "layerdiff-sample-1"
SAMPLE_JSON = "sample.json"
BACKGROUND_PNG = "background.png"
COMPOSITE_PNG = "composite.png"
# A mask may hold at most this fraction of pixels outside {0, 255} (stray anti-aliasing) before it is rejected.
MASK_TOLERANCE = 0.001
_NUMBERED = re.compile(r"^(foreground|mask)_(\d+)\.png$")
_PNG_COMPRESS_LEVEL = 3


def foreground_name(k: int) -> str:
    return f"foreground_{k}.png"


def mask_name(k: int) -> str:
    return f"mask_{k}.png"


# ----------------------------------------------------------------------------------------------- encoding


def _png(array: np.ndarray) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(array).save(buf, format="PNG", compress_level=_PNG_COMPRESS_LEVEL)
    return buf.getvalue()


def _to_uint8(image: torch.Tensor) -> np.ndarray:
    """[C, H, W] float in [0, 1] -> [H, W, C] (or [H, W] when C == 1) uint8."""
    arr = (image.detach().float().cpu().clamp(0, 1) * 255).round().to(torch.uint8).permute(1, 2, 0).numpy()
    return arr[..., 0] if arr.shape[-1] == 1 else arr


def sample_files(sample: LayeredSample, with_composite: bool = False) -> dict[str, bytes]:
    """File name -> bytes of a sample, in the member order shards use. Raises DatasetError for a bad sample."""
    problems = check_sample(sample)
    if problems:
        raise DatasetError(f"Cannot write layered sample {sample.key or '(no key)'}: " + "; ".join(problems) + ".")
    header = {
        "format": SAMPLE_FORMAT,
        "global_prompt": sample.global_prompt,
        "background_prompt": sample.background_prompt,
        "foreground_prompts": list(sample.foreground_prompts),
    }
    if sample.meta:
        header["meta"] = sample.meta
    files = {SAMPLE_JSON: json.dumps(header, indent=1).encode("utf-8"),
             BACKGROUND_PNG: _png(_to_uint8(sample.background))}
    for k in range(1, sample.num_foregrounds + 1):
        files[foreground_name(k)] = _png(_to_uint8(sample.foregrounds[k - 1]))
    for k in range(1, sample.num_foregrounds + 1):
        files[mask_name(k)] = _png(_to_uint8((sample.masks[k - 1] > 0.5).float()))
    if sample.composite is not None or with_composite:
        comp = sample.composite if sample.composite is not None else sample.composed()
        files[COMPOSITE_PNG] = _png(_to_uint8(comp))
    return files


def write_sample(folder: str | Path, sample: LayeredSample, *, overwrite: bool = False,
                 with_composite: bool = False) -> Path:
    """Write ``sample`` as one sample folder, atomically (temp folder beside it, then rename)."""
    folder = Path(folder)
    files = sample_files(sample, with_composite)
    folder.parent.mkdir(parents=True, exist_ok=True)
    if folder.exists() and not overwrite:
        raise DatasetError(f"Sample folder {folder} already exists: pass overwrite=True or choose another folder.")
    tmp = Path(tempfile.mkdtemp(prefix=f".{folder.name}.", suffix=".tmp", dir=folder.parent))
    try:
        for name, data in files.items():
            (tmp / name).write_bytes(data)
        os.chmod(tmp, 0o755)
        if folder.exists():
            trash = Path(tempfile.mkdtemp(prefix=f".{folder.name}.", suffix=".old", dir=folder.parent))
            os.replace(folder, trash / folder.name)
            os.replace(tmp, folder)
            shutil.rmtree(trash, ignore_errors=True)
        else:
            os.replace(tmp, folder)
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)
    return folder


# ----------------------------------------------------------------------------------------------- decoding


def _parse_header(raw: bytes) -> tuple[dict | None, list[str]]:
    try:
        header = json.loads(raw.decode("utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        return None, [f"{SAMPLE_JSON} is not valid JSON ({e})"]
    if not isinstance(header, dict):
        return None, [f"{SAMPLE_JSON} must hold a JSON object, found {type(header).__name__}"]
    problems = []
    if header.get("format") != SAMPLE_FORMAT:
        problems.append(f"{SAMPLE_JSON} format is {header.get('format')!r}, expected {SAMPLE_FORMAT!r}")
    problems += check_prompts(header.get("global_prompt"), header.get("background_prompt"),
                              header.get("foreground_prompts"))
    if not isinstance(header.get("meta", {}), dict):
        problems.append(f"{SAMPLE_JSON} meta must be an object")
    return (None if problems else header), problems


def _numbered(names: Iterable[str]) -> tuple[list[int], list[int], list[str]]:
    """Foreground and mask numbers among file names, plus numbering problems."""
    found: dict[str, list[int]] = {"foreground": [], "mask": []}
    for name in names:
        m = _NUMBERED.match(name)
        if m:
            found[m.group(1)].append(int(m.group(2)))
    problems = []
    for kind, ks in found.items():
        ks.sort()
        if ks != list(range(1, len(ks) + 1)):
            problems.append(f"{kind} files must be numbered 1..N without gaps, found {kind}_{ks}")
    return found["foreground"], found["mask"], problems


def _count_problems(names: Iterable[str], header: dict | None) -> tuple[int, list[str]]:
    """N and the problems visible from file names and sample.json alone (no image decoding)."""
    names = set(names)
    fgs, masks, problems = _numbered(names)
    if BACKGROUND_PNG not in names:
        problems.append(f"missing {BACKGROUND_PNG}")
    if len(fgs) != len(masks):
        problems.append(f"{len(fgs)} foreground_k.png files but {len(masks)} mask_k.png files")
    if header is not None and len(header["foreground_prompts"]) != max(len(fgs), len(masks)):
        problems.append(f"{len(header['foreground_prompts'])} foreground prompts in {SAMPLE_JSON} but "
                        f"{len(fgs)} foreground and {len(masks)} mask files")
    n = len(fgs)
    if n == 0 and not problems:
        problems.append("no foreground layers (a sample needs foreground_1.png and mask_1.png at least)")
    return n, problems


def _check_layout(names: Iterable[str], raw_header: bytes | None) -> tuple[dict | None, int, list[str]]:
    """(header or None, N, problems) from file names and sample.json's bytes (None: missing) alone."""
    header, problems = None, []
    if raw_header is not None:
        header, problems = _parse_header(raw_header)
    else:
        problems.append(f"missing {SAMPLE_JSON}")
    n, count_problems = _count_problems(names, header)
    return header, n, problems + count_problems


def _decode_image(name: str, data: Path | bytes, mode: str) -> tuple[np.ndarray | None, str | None]:
    try:
        with Image.open(data if isinstance(data, Path) else io.BytesIO(data)) as im:
            im.load()
            return np.array(im.convert(mode)), None
    except (OSError, ValueError, SyntaxError, Image.DecompressionBombError) as e:
        return None, f"{name} is not a readable image ({type(e).__name__}: {e})"


def _read_bytes(data: Path | bytes) -> bytes:
    return data.read_bytes() if isinstance(data, Path) else data


def decode_files(files: Mapping[str, Path | bytes], key: str = "") -> tuple[LayeredSample | None, list[str]]:
    """Decode one sample from ``file name -> path or bytes``; returns (sample, []) or (None, problems)."""
    header, n, problems = _check_layout(files, _read_bytes(files[SAMPLE_JSON]) if SAMPLE_JSON in files else None)
    wanted = [(BACKGROUND_PNG, "RGB")] + [(foreground_name(k), "RGB") for k in range(1, n + 1)]
    wanted += [(mask_name(k), "L") for k in range(1, n + 1)] + [(COMPOSITE_PNG, "RGB")]
    arrays: dict[str, np.ndarray] = {}
    for name, mode in wanted:
        if name not in files:
            continue
        arr, error = _decode_image(name, files[name], mode)
        if error:
            problems.append(error)
        else:
            arrays[name] = arr
    sizes = {name: arr.shape[:2] for name, arr in arrays.items()}
    ref = sizes.get(BACKGROUND_PNG) or next(iter(sizes.values()), None)
    for name, size in sizes.items():
        if size != ref:
            problems.append(f"{name} is {size[1]}x{size[0]} but the layers are {ref[1]}x{ref[0]} (WxH)")
    for k in range(1, n + 1):
        arr = arrays.get(mask_name(k))
        if arr is None:
            continue
        grey = int(np.count_nonzero((arr != 0) & (arr != 255)))
        if grey > MASK_TOLERANCE * arr.size:
            problems.append(f"{mask_name(k)} is not binary: {grey} of {arr.size} pixels are neither 0 nor 255")
        elif not (arr >= 128).any():
            problems.append(f"{mask_name(k)} is empty (no pixel at 255)")
    if problems:
        return None, problems
    return _build_sample(header, arrays, n, key), []


def _image_tensor(arr: np.ndarray) -> torch.Tensor:
    return torch.from_numpy(arr).permute(2, 0, 1).float() / 255  # HWC -> CHW


def _build_sample(header: dict, arrays: dict[str, np.ndarray], n: int, key: str) -> LayeredSample:
    masks = [torch.from_numpy(arrays[mask_name(k)] >= 128).float()[None] for k in range(1, n + 1)]  # [1,H,W]
    comp = arrays.get(COMPOSITE_PNG)
    return LayeredSample(
        global_prompt=header["global_prompt"],
        background_prompt=header["background_prompt"],
        foreground_prompts=list(header["foreground_prompts"]),
        background=_image_tensor(arrays[BACKGROUND_PNG]),
        foregrounds=torch.stack([_image_tensor(arrays[foreground_name(k)]) for k in range(1, n + 1)]),
        masks=torch.stack(masks),
        composite=None if comp is None else _image_tensor(comp),
        meta=dict(header.get("meta", {})),
        key=key,
    )


def _folder_files(folder: Path) -> dict[str, Path]:
    return {p.name: p for p in folder.iterdir() if p.is_file()}


def load_sample_folder(folder: str | Path) -> tuple[LayeredSample | None, list[str]]:
    """(sample, []) or (None, problems) for one sample folder; decodes every image."""
    folder = Path(folder)
    if not folder.is_dir():
        return None, [f"{folder} is not a folder"]
    return decode_files(_folder_files(folder), key=folder.name)


def scan_sample_folder(folder: Path) -> tuple[int, list[str]]:
    """(N, problems) of a sample folder from its file names and sample.json alone (cheap: no image decoding)."""
    names = {p.name for p in folder.iterdir()}
    _, n, problems = _check_layout(names, (folder / SAMPLE_JSON).read_bytes() if SAMPLE_JSON in names else None)
    return n, problems


def read_sample(folder: str | Path) -> LayeredSample:
    """Read one sample folder; raises DatasetError naming every problem."""
    sample, problems = load_sample_folder(folder)
    if sample is None:
        raise DatasetError(f"Layered sample {folder} is unusable: " + "; ".join(problems) +
                           ". Run scripts/validate_dataset.py on the dataset to list every bad sample.")
    return sample


def validate_sample(folder: str | Path) -> list[str]:
    """Every problem of one sample folder (empty list = good). Decodes all images."""
    return load_sample_folder(folder)[1]


def list_sample_folders(root: str | Path) -> list[Path]:
    """Sample folders of a dataset root, sorted; ``root`` itself when it is a sample folder. Hidden names skipped."""
    root = Path(root)
    if not root.is_dir():
        raise DatasetError(f"Dataset folder {root} does not exist or is not a folder.")
    if (root / SAMPLE_JSON).exists():
        return [root]
    return sorted(p for p in root.iterdir() if p.is_dir() and not p.name.startswith("."))
