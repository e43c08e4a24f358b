"""WebDataset tar shards of layered samples: write, stream, find (docs/DESIGN.md 2.6).

A shard's members are ``<key>.<file name>`` (``<key>.sample.json``, ``<key>.background.png``,
``<key>.foreground_1.png`` ...; the file names and bytes of :mod:`.sample_files`), all members of one sample
contiguous. A key holds no dot (WebDataset splits the member name at the first dot of its base name).
"""
from __future__ import annotations

import io
import os
import tarfile
from dataclasses import dataclass
from pathlib import Path
from typing import Iterable, Iterator

from ..errors import DatasetError
from .layered_sample import LayeredSample
from .sample_files import decode_files, sample_files


def find_shards(path: str | Path) -> list[Path]:
    """``path`` itself when it is a .tar file, else the .tar files directly inside it (sorted)."""
    path = Path(path)
    if path.is_file():
        return [path]
    return sorted(p for p in path.glob("*.tar") if p.is_file() and not p.name.startswith(".")) if path.is_dir() else []


def _check_key(key: str) -> None:
    if not key or "." in key or "/" in key or key.startswith("_"):
        raise DatasetError(f"Sample key {key!r} cannot name WebDataset members: use a non-empty key without "
                           f"'.' or '/' that does not start with '_'.")


def write_shards(samples: Iterable[LayeredSample | tuple[str, LayeredSample]], out_dir: str | Path,
                 samples_per_shard: int = 1000, *, prefix: str = "shard", with_composite: bool = False) -> list[Path]:
    """Write WebDataset tar shards ``<prefix>-000000.tar`` ...; returns their paths. Each shard is atomic.

    ``samples`` yields samples (key = ``sample.key`` or the running index) or ``(key, sample)`` pairs.
    """
    if samples_per_shard < 1:
        raise DatasetError(f"samples_per_shard must be at least 1, got {samples_per_shard}.")
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    paths: list[Path] = []
    seen: set[str] = set()
    tar, tmp = None, None
    try:
        for i, item in enumerate(samples):
            key, sample = item if isinstance(item, tuple) else (item.key or f"{i:09d}", item)
            _check_key(key)
            if key in seen:
                raise DatasetError(f"Duplicate sample key {key!r}: every sample in a shard set needs its own key.")
            seen.add(key)
            if i % samples_per_shard == 0:
                if tar is not None:
                    tar.close()
                    os.replace(tmp, paths[-1])
                paths.append(out_dir / f"{prefix}-{len(paths):06d}.tar")
                tmp = out_dir / f".{paths[-1].name}.tmp"
                tar = tarfile.open(tmp, "w")
            for name, data in sample_files(sample, with_composite).items():
                info = tarfile.TarInfo(f"{key}.{name}")
                info.size, info.mode, info.mtime = len(data), 0o644, 0
                tar.addfile(info, io.BytesIO(data))
        if tar is not None:
            tar.close()
            os.replace(tmp, paths[-1])
            tar = None
    finally:
        if tar is not None:
            tar.close()
            tmp.unlink(missing_ok=True)
    return paths


def _split_member(name: str) -> tuple[str, str] | None:
    """WebDataset's rule: key = directory + base name up to its first dot; the rest is the file name."""
    directory, _, base = name.rpartition("/")
    if "." not in base:
        return None
    stem, _, rest = base.partition(".")
    return (f"{directory}/{stem}" if directory else stem), rest


@dataclass
class ShardRecord:
    shard: str
    key: str
    sample: LayeredSample | None
    problems: list[str]

    @property
    def name(self) -> str:
        """``shard.tar:key``, or just the shard for a shard-level problem."""
        return f"{self.shard}:{self.key}" if self.key else self.shard


def _tar_ends_cleanly(path: Path) -> bool:
    """A complete tar ends with two zero 512-byte blocks; tarfile silently stops at a cut header instead."""
    size = path.stat().st_size
    if size < 1024 or size % 512:
        return False
    with open(path, "rb") as f:
        f.seek(size - 1024)
        return not any(f.read(1024))


def iter_shard_records(paths: Iterable[str | Path]) -> Iterator[ShardRecord]:
    """Every sample of the shards, good or bad, streamed in order; a broken tar yields one record with key ''."""
    for path in paths:
        path = Path(path)
        seen: set[str] = set()
        key, files, dup = None, {}, []

        def flush() -> ShardRecord:
            sample, problems = decode_files(files, key=key)
            problems = dup + problems
            if key in seen:
                problems.insert(0, f"members of {key} are not contiguous in the shard")
            seen.add(key)
            return ShardRecord(path.name, key, None if problems else sample, problems)

        try:
            with tarfile.open(path, "r|*") as tar:
                for member in tar:
                    split = _split_member(member.name) if member.isfile() else None
                    if split is None:
                        continue
                    if split[0] != key:
                        if key is not None:
                            yield flush()
                        key, files, dup = split[0], {}, []
                    if split[1] in files:
                        dup.append(f"duplicate member {member.name}")
                    files[split[1]] = tar.extractfile(member).read()
            if key is not None:
                yield flush()
            if not _tar_ends_cleanly(path):
                yield ShardRecord(path.name, "", None, [f"shard {path} is truncated (no end-of-archive marker): "
                                                        f"re-create or re-copy it"])
        except (tarfile.TarError, OSError, EOFError) as e:
            yield ShardRecord(path.name, "", None, [f"shard {path} is unreadable ({type(e).__name__}: {e})"])


def iter_shard_samples(paths: Iterable[str | Path], *, skip_bad: bool = False) -> Iterator[LayeredSample]:
    """Good samples of the shards, in order (``sample.key`` = member key). Bad ones raise unless ``skip_bad``."""
    for record in iter_shard_records(paths):
        if record.sample is not None:
            yield record.sample
        elif not skip_bad:
            raise DatasetError(f"Bad sample {record.name}: " + "; ".join(record.problems) + ".")
