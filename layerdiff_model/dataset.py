"""Layered training data: on-disk format, validation, WebDataset shards, torch datasets (DESIGN.md 2.6).

A layered sample is a global prompt, a background prompt, N foreground prompts (depth order, fg_1 = top) and
the layer images. In memory (:class:`LayeredSample`) every image is a float32 tensor in [0, 1] (ComfyUI's IMAGE
range; use ``2*x - 1`` for a diffusers-style VAE): background [3,H,W], foregrounds [N,3,H,W], masks [N,1,H,W]
with values exactly 0 or 1. The layers composite as ``I = sum_k M_k*F_k*prod_{j<k}(1-M_j) + B*prod_k(1-M_k)``.

On disk, one folder per sample::

    sample.json       {"format": "layerdiff-sample-1", "global_prompt": str, "background_prompt": str,
                       "foreground_prompts": [str, ...] (top first), "meta": {...} (optional, e.g. ground truth)}
    background.png    RGB
    foreground_k.png  RGB, full frame; pixels outside mask k are ignored          (k = 1..N)
    mask_k.png        L, 0 or 255; the layer's full (un-occluded) extent           (k = 1..N)
    composite.png     optional RGB, for viewing

or WebDataset tar shards whose members are ``<key>.<file name>`` (``<key>.sample.json``, ``<key>.background.png``,
``<key>.foreground_1.png`` ...), all members of one sample contiguous. A key holds no dot (WebDataset splits the
member name at the first dot of its base name).

Training reads samples through :class:`LayeredFolderDataset` or :class:`LayeredShardDataset`; both skip bad
samples (counted in ``skipped``, one warning per sample). :class:`BucketBatchSampler` batches samples with the same
foreground count, deterministically and resumably, and :func:`collate_layered` packs a batch into ``(b s)`` slot
rows (DESIGN.md 2.1) ready to VAE-encode.
"""
from __future__ import annotations

import io
import json
import logging
import os
import re
import shutil
import tarfile
import tempfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterable, Iterator, Mapping, Sequence

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image

from .errors import DatasetError
from .slots import pack

logger = logging.getLogger(__name__)

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


@dataclass
class LayeredSample:
    """One layered sample; images float32 in [0, 1], masks exactly 0/1. ``meta`` is free JSON (ground truth)."""

    global_prompt: str
    background_prompt: str
    foreground_prompts: list[str]
    background: torch.Tensor  # [3, H, W]
    foregrounds: torch.Tensor  # [N, 3, H, W]
    masks: torch.Tensor  # [N, 1, H, W]
    composite: torch.Tensor | None = None  # [3, H, W], as stored; see :func:`composite`
    meta: dict[str, Any] = field(default_factory=dict)
    key: str = ""

    @property
    def num_foregrounds(self) -> int:
        return int(self.foregrounds.shape[0])

    @property
    def size(self) -> tuple[int, int]:
        """(H, W)."""
        return int(self.background.shape[-2]), int(self.background.shape[-1])

    @property
    def layer_prompts(self) -> list[str]:
        """[background, fg_1 .. fg_N]: index i is the prompt of layer i (slots.slot_prompt_index)."""
        return [self.background_prompt, *self.foreground_prompts]

    def composed(self) -> torch.Tensor:
        """The whole image the layers make, [3, H, W]."""
        return composite(self.background, self.foregrounds, self.masks)


def composite(background: torch.Tensor, foregrounds: torch.Tensor, masks: torch.Tensor) -> torch.Tensor:
    """``I = sum_k M_k*F_k*prod_{j<k}(1-M_j) + B*prod_k(1-M_k)``, k = 1 the top layer.

    background [..., C, H, W], foregrounds [..., N, C, H, W], masks [..., N, 1, H, W]  ->  [..., C, H, W].
    """
    out = torch.zeros_like(background)
    visible = torch.ones_like(masks.select(-4, 0))  # prod_{j<k} (1 - M_j): [..., 1, H, W]
    for k in range(foregrounds.shape[-4]):
        m = masks.select(-4, k)
        out = out + m * foregrounds.select(-4, k) * visible
        visible = visible * (1 - m)
    return out + background * visible


def check_sample(sample: LayeredSample) -> list[str]:
    """Problems of an in-memory sample (shapes, value ranges, prompts); empty when it can be written."""
    problems = _check_prompts(sample.global_prompt, sample.background_prompt, sample.foreground_prompts)
    n = sample.foregrounds.shape[0] if sample.foregrounds.dim() == 4 else -1
    if sample.background.dim() != 3 or sample.background.shape[0] != 3:
        problems.append(f"background must be [3,H,W], found {tuple(sample.background.shape)}")
        return problems
    h, w = sample.size
    if tuple(sample.foregrounds.shape) != (n, 3, h, w) or n < 1:
        problems.append(f"foregrounds must be [N>=1,3,{h},{w}], found {tuple(sample.foregrounds.shape)}")
    if tuple(sample.masks.shape) != (n, 1, h, w):
        problems.append(f"masks must be [{n},1,{h},{w}], found {tuple(sample.masks.shape)}")
    if n != len(sample.foreground_prompts):
        problems.append(f"{len(sample.foreground_prompts)} foreground prompts for {n} foreground layers")
    if sample.masks.numel() and not bool(((sample.masks == 0) | (sample.masks == 1)).all()):
        problems.append("masks must hold only 0 and 1")
    if sample.composite is not None and tuple(sample.composite.shape) != (3, h, w):
        problems.append(f"composite must be [3,{h},{w}], found {tuple(sample.composite.shape)}")
    return problems


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


def _check_prompts(global_prompt: Any, background_prompt: Any, foreground_prompts: Any) -> list[str]:
    problems = []
    for name, value in (("global_prompt", global_prompt), ("background_prompt", background_prompt)):
        if not isinstance(value, str):
            problems.append(f"{name} is missing or not a string")
        elif not value.strip():
            problems.append(f"{name} is empty")
    if not isinstance(foreground_prompts, list):
        problems.append("foreground_prompts is missing or not a list")
    else:
        for k, value in enumerate(foreground_prompts, 1):
            if not isinstance(value, str) or not value.strip():
                problems.append(f"foreground prompt {k} is empty or not a string")
    return problems


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
    problems += _check_prompts(header.get("global_prompt"), header.get("background_prompt"),
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
    header, problems = None, []
    if SAMPLE_JSON in files:
        header, problems = _parse_header(_read_bytes(files[SAMPLE_JSON]))
    else:
        problems.append(f"missing {SAMPLE_JSON}")
    n, count_problems = _count_problems(files, header)
    problems += count_problems
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


def _load_folder(folder: str | Path) -> tuple[LayeredSample | None, list[str]]:
    folder = Path(folder)
    if not folder.is_dir():
        return None, [f"{folder} is not a folder"]
    return decode_files(_folder_files(folder), key=folder.name)


def read_sample(folder: str | Path) -> LayeredSample:
    """Read one sample folder; raises DatasetError naming every problem."""
    sample, problems = _load_folder(folder)
    if sample is None:
        raise DatasetError(f"Layered sample {folder} is unusable: " + "; ".join(problems) +
                           ". Run scripts/validate_dataset.py on the dataset to list every bad sample.")
    return sample


def validate_sample(folder: str | Path) -> list[str]:
    """Every problem of one sample folder (empty list = good). Decodes all images."""
    return _load_folder(folder)[1]


# ----------------------------------------------------------------------------------------------- dataset roots


def list_sample_folders(root: str | Path) -> list[Path]:
    """Sample folders of a dataset root, sorted; ``root`` itself when it is a sample folder. Hidden names skipped."""
    root = Path(root)
    if not root.is_dir():
        raise DatasetError(f"Dataset folder {root} does not exist or is not a folder.")
    if (root / SAMPLE_JSON).exists():
        return [root]
    return sorted(p for p in root.iterdir() if p.is_dir() and not p.name.startswith("."))


def find_shards(path: str | Path) -> list[Path]:
    """``path`` itself when it is a .tar file, else the .tar files directly inside it (sorted)."""
    path = Path(path)
    if path.is_file():
        return [path]
    return sorted(p for p in path.glob("*.tar") if p.is_file() and not p.name.startswith(".")) if path.is_dir() else []


@dataclass
class DatasetReport:
    """Result of validating a dataset: good samples per foreground count and the bad samples with reasons."""

    source: str
    by_foregrounds: dict[int, int] = field(default_factory=dict)
    bad: list[tuple[str, list[str]]] = field(default_factory=list)

    @property
    def good(self) -> int:
        return sum(self.by_foregrounds.values())

    @property
    def total(self) -> int:
        return self.good + len(self.bad)

    @property
    def ok(self) -> bool:
        return not self.bad and self.good > 0

    def add(self, name: str, sample: LayeredSample | None, problems: list[str]) -> None:
        if problems or sample is None:
            self.bad.append((name, problems))
        else:
            n = sample.num_foregrounds
            self.by_foregrounds[n] = self.by_foregrounds.get(n, 0) + 1

    def to_dict(self) -> dict[str, Any]:
        return {"source": self.source, "total": self.total, "good": self.good,
                "by_foregrounds": dict(sorted(self.by_foregrounds.items())),
                "bad": [{"sample": name, "problems": problems} for name, problems in self.bad]}

    def format(self, max_listed: int = 50) -> str:
        lines = [f"Dataset {self.source}: {self.total} samples, {self.good} good, {len(self.bad)} bad."]
        for n, count in sorted(self.by_foregrounds.items()):
            lines.append(f"  {n} foreground(s): {count} samples")
        if self.total == 0:
            lines.append("  no samples found (expected sample folders or .tar shards)")
        for name, problems in self.bad[:max_listed]:
            lines.append(f"  BAD {name}: " + "; ".join(problems))
        if len(self.bad) > max_listed:
            lines.append(f"  ... and {len(self.bad) - max_listed} more bad samples")
        return "\n".join(lines)


def validate_dataset(root: str | Path) -> DatasetReport:
    """Validate a folder of sample folders, one sample folder, a .tar shard, or a folder of shards."""
    root = Path(root)
    if root.is_file() or (root.is_dir() and find_shards(root) and not list_sample_folders(root)):
        return validate_shards(find_shards(root), source=str(root))
    report = DatasetReport(str(root))
    for folder in list_sample_folders(root):
        sample, problems = _load_folder(folder)
        report.add(folder.name, sample, problems)
    return report


# ----------------------------------------------------------------------------------------------- shards


def _check_key(key: str) -> None:
    if not key or "." in key or "/" in key or key.startswith("_"):
        raise DatasetError(f"Sample key {key!r} cannot name WebDataset members: use a non-empty key without "
                           f"'.' or '/' that does not start with '_'.")


def write_shards(samples: Iterable[LayeredSample | tuple[str, LayeredSample]], out_dir: str | Path,
                 samples_per_shard: int = 1000, *, prefix: str = "shard", with_composite: bool = False) -> list[Path]:
    """Write WebDataset tar shards ``<prefix>-000000.tar`` ...; returns their paths. Each shard is atomic.

    ``samples`` yields samples (key = ``sample.key`` or the running index) or ``(key, sample)`` pairs.
    """
    if samples_per_shard < 1:
        raise DatasetError(f"samples_per_shard must be at least 1, got {samples_per_shard}.")
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    paths: list[Path] = []
    seen: set[str] = set()
    tar, tmp = None, None
    try:
        for i, item in enumerate(samples):
            key, sample = item if isinstance(item, tuple) else (item.key or f"{i:09d}", item)
            _check_key(key)
            if key in seen:
                raise DatasetError(f"Duplicate sample key {key!r}: every sample in a shard set needs its own key.")
            seen.add(key)
            if i % samples_per_shard == 0:
                if tar is not None:
                    tar.close()
                    os.replace(tmp, paths[-1])
                paths.append(out_dir / f"{prefix}-{len(paths):06d}.tar")
                tmp = out_dir / f".{paths[-1].name}.tmp"
                tar = tarfile.open(tmp, "w")
            for name, data in sample_files(sample, with_composite).items():
                info = tarfile.TarInfo(f"{key}.{name}")
                info.size, info.mode, info.mtime = len(data), 0o644, 0
                tar.addfile(info, io.BytesIO(data))
        if tar is not None:
            tar.close()
            os.replace(tmp, paths[-1])
            tar = None
    finally:
        if tar is not None:
            tar.close()
            tmp.unlink(missing_ok=True)
    return paths


def _split_member(name: str) -> tuple[str, str] | None:
    """WebDataset's rule: key = directory + base name up to its first dot; the rest is the file name."""
    directory, _, base = name.rpartition("/")
    if "." not in base:
        return None
    stem, _, rest = base.partition(".")
    return (f"{directory}/{stem}" if directory else stem), rest


@dataclass
class ShardRecord:
    shard: str
    key: str
    sample: LayeredSample | None
    problems: list[str]

    @property
    def name(self) -> str:
        """``shard.tar:key``, or just the shard for a shard-level problem."""
        return f"{self.shard}:{self.key}" if self.key else self.shard


def _tar_ends_cleanly(path: Path) -> bool:
    """A complete tar ends with two zero 512-byte blocks; tarfile silently stops at a cut header instead."""
    size = path.stat().st_size
    if size < 1024 or size % 512:
        return False
    with open(path, "rb") as f:
        f.seek(size - 1024)
        return not any(f.read(1024))


def iter_shard_records(paths: Iterable[str | Path]) -> Iterator[ShardRecord]:
    """Every sample of the shards, good or bad, streamed in order; a broken tar yields one record with key ''."""
    for path in paths:
        path = Path(path)
        seen: set[str] = set()
        key, files, dup = None, {}, []

        def flush() -> ShardRecord:
            sample, problems = decode_files(files, key=key)
            problems = dup + problems
            if key in seen:
                problems.insert(0, f"members of {key} are not contiguous in the shard")
            seen.add(key)
            return ShardRecord(path.name, key, None if problems else sample, problems)

        try:
            with tarfile.open(path, "r|*") as tar:
                for member in tar:
                    split = _split_member(member.name) if member.isfile() else None
                    if split is None:
                        continue
                    if split[0] != key:
                        if key is not None:
                            yield flush()
                        key, files, dup = split[0], {}, []
                    if split[1] in files:
                        dup.append(f"duplicate member {member.name}")
                    files[split[1]] = tar.extractfile(member).read()
            if key is not None:
                yield flush()
            if not _tar_ends_cleanly(path):
                yield ShardRecord(path.name, "", None, [f"shard {path} is truncated (no end-of-archive marker): "
                                                        f"re-create or re-copy it"])
        except (tarfile.TarError, OSError, EOFError) as e:
            yield ShardRecord(path.name, "", None, [f"shard {path} is unreadable ({type(e).__name__}: {e})"])


def iter_shard_samples(paths: Iterable[str | Path], *, skip_bad: bool = False) -> Iterator[LayeredSample]:
    """Good samples of the shards, in order (``sample.key`` = member key). Bad ones raise unless ``skip_bad``."""
    for record in iter_shard_records(paths):
        if record.sample is not None:
            yield record.sample
        elif not skip_bad:
            raise DatasetError(f"Bad sample {record.name}: " + "; ".join(record.problems) + ".")


def validate_shards(paths: Sequence[str | Path], source: str | None = None) -> DatasetReport:
    report = DatasetReport(source or ", ".join(str(p) for p in paths))
    for record in iter_shard_records(paths):
        report.add(record.name, record.sample, record.problems)
    return report


# ----------------------------------------------------------------------------------------------- torch side


def _check_resolution(resolution: int | Sequence[int] | None) -> tuple[int, int] | None:
    if resolution is None:
        return None
    h, w = (resolution, resolution) if isinstance(resolution, int) else tuple(resolution)
    if h <= 0 or w <= 0 or h % 8 or w % 8:
        raise DatasetError(f"Resolution {h}x{w} must be positive multiples of 8 (SD latents are 1/8 of the image).")
    return int(h), int(w)


def resize_center_crop(images: torch.Tensor, size: tuple[int, int], binary: bool = False) -> torch.Tensor:
    """Scale [..., C, H, W] so it covers ``size`` (H, W), then crop the centre. ``binary`` re-thresholds at 0.5."""
    h, w = images.shape[-2:]
    th, tw = size
    if (h, w) != (th, tw):
        scale = max(th / h, tw / w)
        nh, nw = max(th, round(h * scale)), max(tw, round(w * scale))
        lead = images.shape[:-3]
        flat = images.reshape(-1, *images.shape[-3:])  # (lead) C H W
        flat = F.interpolate(flat, size=(nh, nw), mode="bilinear", align_corners=False, antialias=True)
        top, left = (nh - th) // 2, (nw - tw) // 2
        images = flat[..., top:top + th, left:left + tw].reshape(*lead, images.shape[-3], th, tw)
    if binary:
        images = (images >= 0.5).float()
    return images.clamp(0, 1)


def sample_to_item(sample: LayeredSample, resolution: tuple[int, int] | None = None) -> dict[str, Any]:
    """A training item: prompts, tensors in [0, 1] at ``resolution`` (H, W), and ``num_foregrounds``."""
    bg, fgs, masks = sample.background, sample.foregrounds, sample.masks
    if resolution is not None:
        bg, fgs = resize_center_crop(bg, resolution), resize_center_crop(fgs, resolution)
        masks = resize_center_crop(masks, resolution, binary=True)
    return {"key": sample.key, "global_prompt": sample.global_prompt, "background_prompt": sample.background_prompt,
            "foreground_prompts": list(sample.foreground_prompts), "background": bg, "foregrounds": fgs,
            "masks": masks, "num_foregrounds": sample.num_foregrounds}


class _SkipCounter:
    """Bad samples seen by this process: one warning each. Counts are per process (DataLoader workers own copies)."""

    def __init__(self) -> None:
        self.bad: set[str] = set()

    @property
    def skipped(self) -> int:
        return len(self.bad)

    def mark(self, name: str, problems: list[str]) -> None:
        if name not in self.bad:
            self.bad.add(name)
            logger.warning("Skipping bad layered sample %s: %s", name, "; ".join(problems))


class LayeredFolderDataset(torch.utils.data.Dataset, _SkipCounter):
    """Map-style dataset over a folder of sample folders.

    Construction reads only sample.json and file names (cheap); samples bad at that level are dropped.
    A sample whose images turn out bad when loaded is replaced by the next good sample with the same foreground
    count, so bucketed batches stay single-N. ``skipped`` counts bad samples met so far in this process.
    """

    def __init__(self, root: str | Path, resolution: int | Sequence[int] | None = None):
        _SkipCounter.__init__(self)
        self.root = Path(root)
        self.resolution = _check_resolution(resolution)
        self.folders: list[Path] = []
        self.foreground_counts: list[int] = []  # per index
        for folder in list_sample_folders(self.root):
            n, problems = self._scan(folder)
            if problems:
                self.mark(folder.name, problems)
            else:
                self.folders.append(folder)
                self.foreground_counts.append(n)
        if not self.folders:
            raise DatasetError(f"No usable layered samples under {self.root} ({self.skipped} bad): run "
                               f"scripts/validate_dataset.py {self.root} to see why.")
        self._buckets = bucket_by_foregrounds(range(len(self.folders)), self.foreground_counts)
        self._bucket_pos = [0] * len(self.folders)  # index -> its position inside its bucket
        for bucket in self._buckets.values():
            for pos, i in enumerate(bucket):
                self._bucket_pos[i] = pos

    @staticmethod
    def _scan(folder: Path) -> tuple[int, list[str]]:
        names = {p.name for p in folder.iterdir()}
        header, problems = None, []
        if SAMPLE_JSON in names:
            header, problems = _parse_header((folder / SAMPLE_JSON).read_bytes())
        else:
            problems.append(f"missing {SAMPLE_JSON}")
        n, count_problems = _count_problems(names, header)
        return n, problems + count_problems

    def __len__(self) -> int:
        return len(self.folders)

    def __getitem__(self, index: int) -> dict[str, Any]:
        n = self.foreground_counts[index]
        bucket = self._buckets[n]
        start = self._bucket_pos[index]
        for step in range(len(bucket)):
            j = bucket[(start + step) % len(bucket)]
            if self.folders[j].name in self.bad:
                continue
            sample, problems = _load_folder(self.folders[j])
            if sample is not None:
                return sample_to_item(sample, self.resolution)
            self.mark(self.folders[j].name, problems)
        raise DatasetError(f"Every sample with {n} foregrounds under {self.root} is bad: "
                           f"run scripts/validate_dataset.py {self.root}.")


class LayeredShardDataset(torch.utils.data.IterableDataset, _SkipCounter):
    """Iterable dataset over WebDataset shards; shards are split across ranks, then DataLoader workers.

    Give each rank x worker at least one shard. ``shuffle_shards`` permutes the shard order per epoch
    (``set_epoch``), deterministically from ``seed``. Bad samples are skipped and counted.
    """

    def __init__(self, paths: Sequence[str | Path], resolution: int | Sequence[int] | None = None, *,
                 shuffle_shards: bool = False, seed: int = 0, rank: int = 0, world_size: int = 1):
        _SkipCounter.__init__(self)
        self.paths = [Path(p) for p in paths]
        if not self.paths:
            raise DatasetError("LayeredShardDataset needs at least one .tar shard.")
        self.resolution = _check_resolution(resolution)
        self.shuffle_shards, self.seed, self.rank, self.world_size = shuffle_shards, seed, rank, world_size
        self.epoch = 0

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def _my_shards(self) -> list[Path]:
        order = list(range(len(self.paths)))
        if self.shuffle_shards:
            order = np.random.default_rng([self.seed, self.epoch]).permutation(len(self.paths)).tolist()
        mine = order[self.rank::self.world_size]
        info = torch.utils.data.get_worker_info()
        if info is not None:
            mine = mine[info.id::info.num_workers]
        return [self.paths[i] for i in mine]

    def __iter__(self) -> Iterator[dict[str, Any]]:
        for record in iter_shard_records(self._my_shards()):
            if record.sample is None:
                self.mark(record.name, record.problems)
            else:
                yield sample_to_item(record.sample, self.resolution)


def bucketed_batches(items: Iterable[dict[str, Any]], batch_size: int, drop_last: bool = False
                     ) -> Iterator[list[dict[str, Any]]]:
    """Group a stream of items into batches of equal ``num_foregrounds`` (for iterable datasets)."""
    pending: dict[int, list[dict[str, Any]]] = {}
    for item in items:
        bucket = pending.setdefault(item["num_foregrounds"], [])
        bucket.append(item)
        if len(bucket) == batch_size:
            yield pending.pop(item["num_foregrounds"])
    if not drop_last:
        for n in sorted(pending):
            yield pending[n]


def bucket_by_foregrounds(indices: Iterable[int], num_fg_of: Callable[[int], int] | Sequence[int] | Mapping[int, int]
                          ) -> dict[int, list[int]]:
    """Foreground count -> indices (in input order)."""
    lookup = num_fg_of if callable(num_fg_of) else num_fg_of.__getitem__
    buckets: dict[int, list[int]] = {}
    for i in indices:
        buckets.setdefault(int(lookup(i)), []).append(i)
    return buckets


class BucketBatchSampler(torch.utils.data.Sampler):
    """Batches of dataset indices that share one foreground count; deterministic per (seed, epoch); resumable.

    Each epoch shuffles every bucket, cuts it into batches, and shuffles the batch order. ``position`` counts
    batches already yielded in the current epoch; finishing an epoch moves to the next one. With
    ``world_size > 1`` each rank takes every world_size-th batch (the epoch is cut to a multiple of world_size).

    Resuming exactly: save ``{"epoch": e, "position": p}`` where p is the number of batches the *training loop*
    consumed in epoch e (a DataLoader prefetches, so the sampler's own position runs ahead), then
    ``load_state_dict`` it before iterating again.
    """

    def __init__(self, num_foregrounds: Sequence[int], batch_size: int, *, seed: int = 0, shuffle: bool = True,
                 drop_last: bool = False, rank: int = 0, world_size: int = 1):
        if batch_size < 1:
            raise DatasetError(f"batch_size must be at least 1, got {batch_size}.")
        self.buckets = bucket_by_foregrounds(range(len(num_foregrounds)), num_foregrounds)
        self.batch_size, self.seed, self.shuffle, self.drop_last = batch_size, seed, shuffle, drop_last
        self.rank, self.world_size = rank, world_size
        self.epoch, self.position = 0, 0

    def epoch_batches(self, epoch: int) -> list[list[int]]:
        """All batches of ``epoch`` for this rank, in order."""
        rng = np.random.default_rng([self.seed, epoch])
        batches: list[list[int]] = []
        for n in sorted(self.buckets):
            idx = np.asarray(self.buckets[n])
            if self.shuffle:
                idx = idx[rng.permutation(len(idx))]
            for start in range(0, len(idx), self.batch_size):
                batch = idx[start:start + self.batch_size].tolist()
                if len(batch) == self.batch_size or not self.drop_last:
                    batches.append(batch)
        if self.shuffle:
            batches = [batches[i] for i in rng.permutation(len(batches))]
        usable = len(batches) - len(batches) % self.world_size
        return batches[:usable][self.rank::self.world_size]

    def __len__(self) -> int:
        return len(self.epoch_batches(self.epoch))

    def __iter__(self) -> Iterator[list[int]]:
        batches = self.epoch_batches(self.epoch)
        while self.position < len(batches):
            self.position += 1
            yield batches[self.position - 1]
        self.epoch, self.position = self.epoch + 1, 0

    def set_epoch(self, epoch: int) -> None:
        self.epoch, self.position = epoch, 0

    def state_dict(self) -> dict[str, int]:
        return {"epoch": self.epoch, "position": self.position, "seed": self.seed}

    def load_state_dict(self, state: Mapping[str, int]) -> None:
        if "seed" in state and state["seed"] != self.seed:
            raise DatasetError(f"Sampler state was saved with seed {state['seed']} but this sampler uses "
                               f"{self.seed}: resume with the same --seed to replay the same batches.")
        self.epoch, self.position = int(state["epoch"]), int(state["position"])


def collate_layered(items: Sequence[dict[str, Any]]) -> dict[str, Any]:
    """Items of one foreground count -> a batch.

    Returns global_prompts [B], layer_prompts [B][N+1] ([background, fg_1..fg_N], see slots.slot_prompt_index),
    slots [B*S, 3, H, W] in (b s) order and [0, 1] (masks RGB-replicated), num_foregrounds N, keys [B].
    """
    counts = {item["num_foregrounds"] for item in items}
    if len(counts) != 1:
        raise DatasetError(f"A batch mixes foreground counts {sorted(counts)}: batch with BucketBatchSampler or "
                           f"bucketed_batches so every sample in a batch has the same number of layers.")
    sizes = {tuple(item["background"].shape[-2:]) for item in items}
    if len(sizes) != 1:
        raise DatasetError(f"A batch mixes image sizes {sorted(sizes)}: give the dataset a resolution.")
    n = counts.pop()
    background = torch.stack([item["background"] for item in items])  # [B,3,H,W]
    foregrounds = torch.stack([item["foregrounds"] for item in items])  # [B,N,3,H,W]
    masks = torch.stack([item["masks"] for item in items]).expand(-1, -1, 3, -1, -1)  # [B,N,1,H,W] -> [B,N,3,H,W]
    slots = pack(background, foregrounds, masks)  # (b s) 3 H W, S = num_slots(n) rows per sample
    return {"global_prompts": [item["global_prompt"] for item in items],
            "layer_prompts": [[item["background_prompt"], *item["foreground_prompts"]] for item in items],
            "slots": slots.contiguous(), "num_foregrounds": n, "keys": [item["key"] for item in items]}
