"""Torch datasets over layered samples: training items at one resolution, bad samples skipped (docs/DESIGN.md 2.6).

Training reads samples through :class:`LayeredFolderDataset` (sample folders) or :class:`LayeredShardDataset`
(tar shards); both skip bad samples (counted in ``skipped``, one warning per sample). Batch them with
:mod:`.dataset_batching`.
"""
from __future__ import annotations

import logging
from pathlib import Path
from typing import Any, Iterator, Sequence

import numpy as np
import torch
import torch.nn.functional as F

from .batching import bucket_by_foregrounds
from .shards import iter_shard_records
from ..errors import DatasetError
from .layered_sample import LayeredSample
from .sample_files import list_sample_folders, load_sample_folder, scan_sample_folder

logger = logging.getLogger("LayerDiff.dataset")  # one name whatever ComfyUI calls the package


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
            n, problems = scan_sample_folder(folder)
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
            sample, problems = load_sample_folder(self.folders[j])
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
