"""Training batches from a layered dataset, bucketed by foreground count and resumable at a batch position
(docs/DESIGN.md 2.6). Folder datasets use :class:`BucketBatchSampler` (exact resume from ``(epoch, position)``); shard
datasets stream through :func:`bucketed_batches` and resume by replaying the epoch's stream to the position."""
from __future__ import annotations

from pathlib import Path
from typing import Any, Iterator

import torch

from ..data.batching import BucketBatchSampler, bucketed_batches, collate_layered
from ..data.loading import LayeredFolderDataset, LayeredShardDataset
from ..data.shards import find_shards
from ..data.validation import validate_dataset
from ..data.layered_sample import composite
from ..data.sample_files import list_sample_folders
from ..errors import DatasetError
from ..slots import unpack

SCRIPT = "train_layerdiff.py"


def open_dataset(path: str, resolution: int, seed: int = 0, rank: int = 0, world_size: int = 1):
    """A LayeredFolderDataset or LayeredShardDataset for ``path``; errors carry the validator's report."""
    root = Path(path)
    if not root.exists():
        raise DatasetError(f"{SCRIPT}: --data {root} does not exist. Point it at a folder of sample folders or "
                           "WebDataset .tar shards (see docs/TRAINING.md, scripts/make_shapes_dataset.py).")
    shards = find_shards(root)
    if shards and (root.is_file() or not list_sample_folders(root)):
        if len(shards) < world_size:
            raise DatasetError(f"{SCRIPT}: {len(shards)} shards for {world_size} processes: every process needs at "
                               "least one shard. Write more, smaller shards (samples_per_shard).")
        return LayeredShardDataset(shards, resolution, shuffle_shards=True, seed=seed, rank=rank,
                                   world_size=world_size)
    try:
        return LayeredFolderDataset(root, resolution)
    except DatasetError as exc:
        report = validate_dataset(root)
        raise DatasetError(f"{SCRIPT}: the dataset {root} has no usable sample.\n{report.format(max_listed=10)}\n"
                           f"Fix or remove the bad samples (scripts/validate_dataset.py {root} lists them all).") from exc


class BatchStream:
    """Endless batches with a resumable position ``(epoch, position)`` = batches consumed in that epoch."""

    def __init__(self, dataset, batch_size: int, seed: int, rank: int = 0, world_size: int = 1, workers: int = 0):
        self.dataset = dataset
        self.epoch, self.position = 0, 0
        self.batch_size, self.workers = batch_size, workers
        self.sampler = None
        if isinstance(dataset, LayeredFolderDataset):
            self.sampler = BucketBatchSampler(dataset.foreground_counts, batch_size, seed=seed, rank=rank,
                                              world_size=world_size)
            if len(self.sampler) == 0:
                raise DatasetError(f"{SCRIPT}: {len(dataset)} samples give no batch for {world_size} processes; "
                                   "use more samples or fewer processes.")

    @property
    def skipped(self) -> int:
        return self.dataset.skipped

    def state_dict(self) -> dict[str, int]:
        return {"epoch": self.epoch, "position": self.position}

    def load_state_dict(self, state: dict[str, int]) -> None:
        self.epoch, self.position = int(state["epoch"]), int(state["position"])

    def _epoch_batches(self) -> Iterator[dict[str, Any]]:
        if self.sampler is not None:
            self.sampler.load_state_dict({"epoch": self.epoch, "position": self.position})
            loader = torch.utils.data.DataLoader(self.dataset, batch_sampler=self.sampler, collate_fn=collate_layered,
                                                 num_workers=self.workers)
            yield from loader
            return
        self.dataset.set_epoch(self.epoch)
        for i, items in enumerate(bucketed_batches(iter(self.dataset), self.batch_size)):
            if i >= self.position:
                yield collate_layered(items)

    def __iter__(self) -> Iterator[dict[str, Any]]:
        while True:
            produced = False
            for batch in self._epoch_batches():
                produced = True
                self.position += 1
                yield batch
            if not produced and self.position == 0:
                raise DatasetError(f"{SCRIPT}: the dataset produced no batch (all samples bad?). Run "
                                   "scripts/validate_dataset.py on it.")
            self.epoch, self.position = self.epoch + 1, 0


def training_images(batch: dict[str, Any], composites: bool) -> tuple[torch.Tensor, int]:
    """(images [R, 3, H, W] in [0, 1], rows per sample): all slots, or one composite per sample."""
    if not composites:
        n = batch["num_foregrounds"]
        return batch["slots"], 2 * n + 1
    background, foregrounds, masks = unpack(batch["slots"], batch["num_foregrounds"])
    return composite(background, foregrounds, masks[:, :, :1]), 1


def base_model_images(batch: dict[str, Any], layer_images: bool) -> tuple[torch.Tensor, list[str]]:
    """Base-model training pairs: (images [R, 3, H, W], one prompt per image). Each sample's composite with its
    global prompt; with ``layer_images`` also its background and each foreground layer image, each with its own
    layer prompt (the masks are not base-model images)."""
    images, _ = training_images(batch, composites=True)
    prompts = list(batch["global_prompts"])
    if not layer_images:
        return images, prompts
    n = batch["num_foregrounds"]
    background, foregrounds, _ = unpack(batch["slots"], n)
    layers = torch.cat([background[:, None], foregrounds], dim=1).flatten(0, 1)  # [(b, 1 + n), 3, H, W]
    return torch.cat([images, layers]), prompts + [p for lp in batch["layer_prompts"] for p in lp]


def first_prompts(dataset, count: int) -> list[tuple[str, list[str]]]:
    """(global prompt, layer prompts) of the first ``count`` usable samples: the fixed validation prompts."""
    out: list[tuple[str, list[str]]] = []
    if isinstance(dataset, LayeredFolderDataset):
        for i in range(min(count, len(dataset))):
            item = dataset[i]
            out.append((item["global_prompt"], [item["background_prompt"], *item["foreground_prompts"]]))
        return out
    for item in dataset:
        out.append((item["global_prompt"], [item["background_prompt"], *item["foreground_prompts"]]))
        if len(out) >= count:
            break
    return out
