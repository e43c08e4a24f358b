"""Build work units: stream each unit's samples into its shard and mark it done; skip units marked done."""
from __future__ import annotations

import logging
import time
from pathlib import Path
from typing import Callable, Iterator, Sequence

from .picture_inputs import BrokenInput, WorkUnit, read_unit
from .pipeline import LayeringPipeline
from .run_report import RunReport
from .sample_keys import unique_key
from .unit_output import unit_done, write_folder_report, write_unit

log = logging.getLogger("layerdiff.dataset")


def unit_samples(unit: WorkUnit, pipeline: LayeringPipeline, report: RunReport, *, batch_size: int = 8,
                 max_side: int = 0, on_pictures: Callable[[int], None] | None = None) -> Iterator:
    """The samples of one unit, streamed; broken inputs and rejected pictures are counted in ``report``."""
    seen: set[str] = set()
    batch = []

    def run_batch():
        outcomes = pipeline.run(batch, report)
        if on_pictures:
            on_pictures(len(batch))
        batch.clear()
        return [o.sample for o in outcomes if o.sample is not None]

    for item, converted in read_unit(unit, max_side):
        if isinstance(item, BrokenInput):
            report.reject(item.reason)
            log.info("skipped %s: %s", item.source, item.reason)
            if on_pictures:
                on_pictures(1)
            continue
        if converted:
            report.converted[converted] += 1
        item.key = unique_key(item.key, seen)
        batch.append(item)
        if len(batch) >= batch_size:
            yield from run_batch()
    if batch:
        yield from run_batch()


def build_units(units: Sequence, out_dir: str | Path, samples_of: Callable[[object, RunReport], Iterator]
                ) -> RunReport:
    """Build every unit without a done marker in ``out_dir`` (``samples_of(unit, report)`` streams its samples);
    returns the report of the units built now. ``unit.name`` names the unit's shard and marker."""
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    total = RunReport()
    for unit in units:
        if unit_done(out_dir, unit.name):
            log.info("unit %s is done already: skipped", unit.name)
            continue
        report = RunReport()
        start = time.perf_counter()

        def timed(samples, report=report, start=start):
            yield from samples
            report.wall_seconds = time.perf_counter() - start  # before the marker is written

        write_unit(out_dir, unit.name, timed(samples_of(unit, report)), report)
        total.add(report)
        write_folder_report(out_dir)
    return total
