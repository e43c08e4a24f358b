"""Which work units this process builds, from the launcher's environment (no launcher of our own).

- torchrun and accelerate set ``RANK`` / ``WORLD_SIZE`` (and ``LOCAL_RANK``, which picks the GPU);
- a SLURM job array sets ``SLURM_ARRAY_TASK_ID`` and ``SLURM_ARRAY_TASK_COUNT`` (or ``..._MIN`` / ``..._MAX``);
- both at once (torchrun inside each array task) split each task's share again by rank.
Units go round-robin by index, so each process's share is fixed by the unit list and its own position; the
done markers (:mod:`.unit_output`) make a re-run skip what any process finished.
"""
from __future__ import annotations

import os
from dataclasses import dataclass
from typing import Mapping, Sequence, TypeVar

from ...errors import DatasetError

T = TypeVar("T")


@dataclass(frozen=True)
class WorkerPosition:
    index: int  # this process among all of the run
    count: int
    local_rank: int | None  # the GPU of this process on its machine (torchrun / accelerate), None if not set
    launcher: str  # "single", "torchrun", "slurm-array", "slurm-array+torchrun"


def _int(env: Mapping[str, str], name: str) -> int | None:
    value = env.get(name)
    if value is None or value == "":
        return None
    try:
        return int(value)
    except ValueError:
        raise DatasetError(f"Environment variable {name}={value!r} is not an integer; unset it or fix the "
                           f"launcher's settings.") from None


def worker_position(env: Mapping[str, str] | None = None) -> WorkerPosition:
    env = os.environ if env is None else env
    rank, world = _int(env, "RANK"), _int(env, "WORLD_SIZE")
    task = _int(env, "SLURM_ARRAY_TASK_ID")
    tasks = _int(env, "SLURM_ARRAY_TASK_COUNT")
    if task is not None and tasks is None:
        low, high = _int(env, "SLURM_ARRAY_TASK_MIN"), _int(env, "SLURM_ARRAY_TASK_MAX")
        if low is None or high is None:
            raise DatasetError("SLURM_ARRAY_TASK_ID is set but neither SLURM_ARRAY_TASK_COUNT nor "
                               "SLURM_ARRAY_TASK_MIN/MAX: run under sbatch --array.")
        task, tasks = task - low, high - low + 1
    elif task is not None:
        low = _int(env, "SLURM_ARRAY_TASK_MIN") or 0
        task -= low
    rank, world = (0, 1) if rank is None or world is None else (rank, world)
    task, tasks = (0, 1) if task is None else (task, tasks)
    if not (0 <= rank < world and 0 <= task < tasks):
        raise DatasetError(f"Launcher environment out of range: RANK={rank} of WORLD_SIZE={world}, array task "
                           f"{task} of {tasks}.")
    launcher = {(False, False): "single", (True, False): "torchrun", (False, True): "slurm-array",
                (True, True): "slurm-array+torchrun"}[(world > 1, tasks > 1)]
    return WorkerPosition(task * world + rank, tasks * world, _int(env, "LOCAL_RANK"), launcher)


def my_share(units: Sequence[T], position: WorkerPosition) -> list[T]:
    """Units ``index, index + count, ...``: every unit belongs to exactly one process."""
    return list(units[position.index::position.count])
