"""One output shard per work unit, written atomically, then its done marker; resume skips marked units.

``<out>/<unit>-000000.tar`` (WebDataset, :func:`..shards.write_shards`: written to a hidden temporary file and
renamed when complete) and then ``<out>/<unit>.done.json`` (the unit's :class:`~.run_report.RunReport` and
sample count, also written by rename). A run killed at any point leaves either a finished unit with its marker
or no marker; a unit without a marker is built again from scratch on the next run, replacing any shard it left.
``<out>/report.json`` is the sum of all markers, rewritten after each unit.
"""
from __future__ import annotations

import json
from pathlib import Path
from typing import Iterable

from ...atomic_file import atomic_write
from ..layered_sample import LayeredSample
from ..shards import write_shards
from .run_report import RunReport, merge_reports

MARKER_SUFFIX = ".done.json"
REPORT_JSON = "report.json"


def marker_path(out_dir: Path, unit: str) -> Path:
    return Path(out_dir) / f"{unit}{MARKER_SUFFIX}"


def unit_done(out_dir: Path, unit: str) -> bool:
    return marker_path(out_dir, unit).is_file()


def write_unit(out_dir: Path, unit: str, samples: Iterable[LayeredSample], report: RunReport) -> list[Path]:
    """Stream ``samples`` into the unit's shard (none for a unit without samples), then write its marker."""
    out_dir = Path(out_dir)
    for stale in out_dir.glob(f"{unit}-*.tar"):  # left by a run killed after the rename, before the marker
        stale.unlink()
    shards = write_shards(samples, out_dir, samples_per_shard=10 ** 9, prefix=unit)
    marker = {"unit": unit, "shards": [p.name for p in shards], "report": report.to_json()}
    _write_json(marker_path(out_dir, unit), marker)
    return shards


def _write_json(path: Path, data: dict) -> None:
    blob = json.dumps(data, indent=1).encode("utf-8")
    atomic_write(path, lambda fh: fh.write(blob))


def read_markers(out_dir: Path) -> list[dict]:
    return [json.loads(p.read_text("utf-8")) for p in sorted(Path(out_dir).glob(f"*{MARKER_SUFFIX}"))]


def folder_report(out_dir: Path) -> RunReport:
    """The sum of every finished unit's report in ``out_dir`` (all processes of the run)."""
    return merge_reports(RunReport.from_json(m["report"]) for m in read_markers(out_dir))


def write_folder_report(out_dir: Path) -> RunReport:
    report = folder_report(out_dir)
    _write_json(Path(out_dir) / REPORT_JSON, report.to_json())
    return report
