"""Exponential moving average of trained parameters (optional in training, docs/DESIGN.md 2.6)."""
from __future__ import annotations

import contextlib
from typing import Iterable, Iterator

import torch


class EMA:
    """``shadow = decay * shadow + (1 - decay) * param`` after every optimizer step, kept in float32.

    The effective decay ramps up as ``min(decay, (1 + n) / (10 + n))`` over the first updates, so early weights do
    not dominate a short run.
    """

    def __init__(self, named_parameters: Iterable[tuple[str, torch.nn.Parameter]], decay: float):
        self.decay = float(decay)
        self.params = dict(named_parameters)
        self.shadow = {k: p.detach().float().clone() for k, p in self.params.items()}
        self.updates = 0

    def current_decay(self) -> float:
        return min(self.decay, (1 + self.updates) / (10 + self.updates))

    @torch.no_grad()
    def update(self) -> None:
        d = self.current_decay()
        for k, p in self.params.items():
            self.shadow[k].mul_(d).add_(p.detach().float(), alpha=1 - d)
        self.updates += 1

    def state_dict(self) -> dict:
        return {"decay": self.decay, "updates": self.updates, "shadow": {k: v.cpu() for k, v in self.shadow.items()}}

    def load_state_dict(self, state: dict) -> None:
        missing = set(self.shadow) - set(state["shadow"])
        if missing:
            raise KeyError(f"EMA state lacks {len(missing)} parameters, e.g. {sorted(missing)[:3]}")
        self.updates = int(state["updates"])
        for k in self.shadow:
            self.shadow[k].copy_(state["shadow"][k])

    @contextlib.contextmanager
    def swapped(self) -> Iterator[None]:
        """Parameters hold the EMA values inside the block (validation, export), the trained ones after it."""
        saved = {k: p.detach().clone() for k, p in self.params.items()}
        with torch.no_grad():
            for k, p in self.params.items():
                p.copy_(self.shadow[k].to(p.dtype))
        try:
            yield
        finally:
            with torch.no_grad():
                for k, p in self.params.items():
                    p.copy_(saved[k])
