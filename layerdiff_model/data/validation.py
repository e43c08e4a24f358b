"""Validating a layered dataset (sample folders or tar shards) into one :class:`DatasetReport` (docs/DESIGN.md 2.6)."""
from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Sequence

from .shards import find_shards, iter_shard_records
from .layered_sample import LayeredSample
from .sample_files import list_sample_folders, load_sample_folder


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
        sample, problems = load_sample_folder(folder)
        report.add(folder.name, sample, problems)
    return report


def validate_shards(paths: Sequence[str | Path], source: str | None = None) -> DatasetReport:
    report = DatasetReport(source or ", ".join(str(p) for p in paths))
    for record in iter_shard_records(paths):
        report.add(record.name, record.sample, record.problems)
    return report
