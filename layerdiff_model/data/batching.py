"""Batching layered training items: one foreground count per batch, a resumable sampler, collation (docs/DESIGN.md 2.6).

:class:`BucketBatchSampler` batches samples with the same foreground count, deterministically and resumably
(map-style datasets); :func:`bucketed_batches` does the same for a stream. :func:`collate_layered` packs a batch
into ``(b s)`` slot rows (docs/DESIGN.md 2.1) ready to VAE-encode.
"""
from __future__ import annotations

from typing import Any, Callable, Iterable, Iterator, Mapping, Sequence

import numpy as np
import torch

from ..errors import DatasetError
from ..slots import pack


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