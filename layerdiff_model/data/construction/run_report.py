"""Counts and times of a construction run: pictures in, samples out, rejects by reason, seconds per stage.

One :class:`RunReport` per work unit goes into the unit's done marker; :func:`merge_reports` adds them up for
the whole output folder (any process, any time), so a run split over ranks or array tasks has one report.
"""
from __future__ import annotations

import time
from collections import Counter
from contextlib import contextmanager
from dataclasses import dataclass, field


@dataclass
class RunReport:
    pictures: int = 0  # pictures read (broken inputs are not pictures: they are in ``rejects``)
    samples: int = 0  # samples written
    rejects: Counter = field(default_factory=Counter)  # reason -> count (inputs and pictures)
    converted: Counter = field(default_factory=Counter)  # e.g. "grayscale" -> count, pictures made 8-bit RGB
    dropped_objects: Counter = field(default_factory=Counter)  # reason -> objects dropped from kept pictures
    stage_seconds: Counter = field(default_factory=Counter)
    stage_items: Counter = field(default_factory=Counter)
    wall_seconds: float = 0.0  # whole units: reading, every stage, encoding and writing the shards

    def reject(self, reason: str, count: int = 1) -> None:
        self.rejects[reason] += count

    @contextmanager
    def stage(self, name: str, items: int):
        """Time a stage that handles ``items`` pictures."""
        start = time.perf_counter()
        try:
            yield
        finally:
            self.stage_seconds[name] += time.perf_counter() - start
            self.stage_items[name] += items

    def to_json(self) -> dict:
        return {"pictures": self.pictures, "samples": self.samples, "rejects": dict(self.rejects),
                "converted": dict(self.converted), "dropped_objects": dict(self.dropped_objects),
                "stage_seconds": {k: round(v, 4) for k, v in self.stage_seconds.items()},
                "stage_items": dict(self.stage_items), "wall_seconds": round(self.wall_seconds, 4)}

    @classmethod
    def from_json(cls, data: dict) -> "RunReport":
        return cls(pictures=int(data.get("pictures", 0)), samples=int(data.get("samples", 0)),
                   rejects=Counter(data.get("rejects", {})), converted=Counter(data.get("converted", {})),
                   dropped_objects=Counter(data.get("dropped_objects", {})),
                   stage_seconds=Counter(data.get("stage_seconds", {})),
                   stage_items=Counter(data.get("stage_items", {})),
                   wall_seconds=float(data.get("wall_seconds", 0.0)))

    def add(self, other: "RunReport") -> None:
        self.pictures += other.pictures
        self.samples += other.samples
        self.wall_seconds += other.wall_seconds
        for mine, theirs in ((self.rejects, other.rejects), (self.converted, other.converted),
                             (self.dropped_objects, other.dropped_objects),
                             (self.stage_seconds, other.stage_seconds), (self.stage_items, other.stage_items)):
            mine.update(theirs)

    def summary(self) -> str:
        """Human-readable: totals, rejects by reason, then seconds and pictures/s per stage."""
        lines = [f"pictures read: {self.pictures}, samples written: {self.samples}, "
                 f"rejected inputs and pictures: {sum(self.rejects.values())}"]
        for title, counts in (("rejected", self.rejects), ("converted to 8-bit RGB", self.converted),
                              ("objects dropped", self.dropped_objects)):
            for reason, count in sorted(((r, c) for r, c in counts.items() if c), key=lambda kv: (-kv[1], kv[0])):
                lines.append(f"  {title}: {reason}: {count}")
        if self.stage_seconds:
            lines.append(f"  {'stage':<16} {'seconds':>9} {'pictures':>9} {'pictures/s':>11}")
            for name, seconds in self.stage_seconds.items():
                items = self.stage_items[name]
                rate = f"{items / seconds:11.1f}" if seconds > 0 else f"{'-':>11}"
                lines.append(f"  {name:<16} {seconds:9.2f} {items:9d} {rate}")
        if self.wall_seconds > 0:
            lines.append(f"  {'whole units':<16} {self.wall_seconds:9.2f} {self.pictures:9d} "
                         f"{self.pictures / self.wall_seconds:11.1f}   (reading, stages, PNG encoding, writing)")
        return "\n".join(lines)


def merge_reports(reports) -> RunReport:
    total = RunReport()
    for report in reports:
        total.add(report)
    return total
