"""Keys and values of the layer prompts, kept across sampling steps (inference only).

Every UNet call of a sampling run carries the same layer prompts, so each intra-layer cross-attention would
project the same prompt tokens to keys and values at every step; at small resolutions that projection is most of
LayerDiff's cost. The cache keeps, per distinct layer-context tensor (compared by value), one dict that each
attention module fills with its ``(k, v)`` on first use. Results are identical to recomputing them.

Only used when no gradient is being recorded (training changes the weights between calls). Entries are
bounded (a few prompt sets: cond/uncond chunks, a second sampler pass) and are dropped with the patch.
Shapes: a layer context ``[(b s), t, d]`` -> per attention module ``k, v`` of ``[(b s), t, c]`` (c: the site's width).
"""
from __future__ import annotations

import threading

import torch


class PromptKVCache:
    def __init__(self, max_entries: int = 4):
        self.max_entries = max_entries
        self._entries: list[tuple[torch.Tensor, torch.dtype, dict]] = []
        self._lock = threading.Lock()

    def lookup(self, context: torch.Tensor, compute_dtype: torch.dtype) -> dict | None:
        """The per-module (k, v) store for this exact ``context`` [U, T, d]; None while gradients are recorded."""
        if torch.is_grad_enabled() or context.requires_grad:
            return None
        with self._lock:
            for i, (known, dtype, store) in enumerate(self._entries):
                if (dtype == compute_dtype and known.shape == context.shape and known.dtype == context.dtype
                        and known.device == context.device and torch.equal(known, context)):
                    self._entries.append(self._entries.pop(i))  # most recently used last
                    return store
            store: dict = {}
            self._entries.append((context.detach().clone(), compute_dtype, store))
            del self._entries[:-self.max_entries]
            return store

    def clear(self) -> None:
        with self._lock:
            self._entries.clear()

    def __len__(self) -> int:
        return len(self._entries)
