"""Training metrics: always a JSON-lines file ``<run_dir>/metrics.jsonl``, plus TensorBoard event files under
``<run_dir>/tensorboard`` when ``torch.utils.tensorboard`` can be imported (it needs the ``tensorboard`` package,
which the extension does not require)."""
from __future__ import annotations

import json
import logging
import os
from pathlib import Path

from ..atomic_file import atomic_write

LOG = logging.getLogger("LayerDiff.train")
METRICS_FILE = "metrics.jsonl"


def _tensorboard_writer(folder: Path):
    try:
        from torch.utils.tensorboard import SummaryWriter
    except Exception:  # noqa: BLE001 - tensorboard missing or broken: JSONL only
        return None
    return SummaryWriter(str(folder))


class TrainLogger:
    """Writes one JSON object per logged step. On resume, lines of steps after the resumed step (written by the
    interrupted session after its last checkpoint) are dropped so the file reads like one uninterrupted run."""

    def __init__(self, run_dir: str | os.PathLike, enabled: bool = True, resume_step: int | None = None):
        self.enabled = enabled
        self.path = Path(run_dir) / METRICS_FILE
        self.tb = None
        if not enabled:
            return
        self.path.parent.mkdir(parents=True, exist_ok=True)
        if resume_step is not None and self.path.exists():
            self._truncate_after(resume_step)
        elif resume_step is None and self.path.exists():
            self.path.unlink()
        self.tb = _tensorboard_writer(self.path.parent / "tensorboard")
        LOG.info("Logging to %s%s", self.path, " and TensorBoard" if self.tb else " (TensorBoard not installed)")

    def _truncate_after(self, step: int) -> None:
        kept = []
        for line in self.path.read_text().splitlines():
            try:
                if json.loads(line).get("step", 0) <= step:
                    kept.append(line)
            except json.JSONDecodeError:
                continue
        atomic_write(self.path, lambda fh: fh.write("".join(k + "\n" for k in kept).encode()))

    def log(self, step: int, **values) -> None:
        if not self.enabled:
            return
        with open(self.path, "a") as fh:
            fh.write(json.dumps({"step": int(step), **values}) + "\n")
        if self.tb is not None:
            for k, v in values.items():
                if isinstance(v, (int, float)):
                    self.tb.add_scalar(k, v, step)

    def close(self) -> None:
        if self.tb is not None:
            self.tb.close()


def read_metrics(run_dir: str | os.PathLike) -> list[dict]:
    path = Path(run_dir) / METRICS_FILE
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()] if path.exists() else []
