"""Atomic file writes: write a temp file next to the target, fsync it, give it the normal file mode and rename it
into place. On any error (KeyboardInterrupt included) the temp file is removed and the target is untouched, so a
failed or interrupted run never leaves a half-written weights file, checkpoint or image behind."""
from __future__ import annotations

import contextlib
import io
import os
import tempfile
from typing import Callable, Iterator, Union

PathLike = Union[str, os.PathLike]


def _file_mode() -> int:
    """Mode for new files: 0o666 minus the process umask (mkstemp alone would leave 0o600)."""
    try:
        with open("/proc/self/status") as fh:
            for line in fh:
                if line.startswith("Umask:"):
                    return 0o666 & ~int(line.split()[1], 8)
    except OSError:
        pass
    return 0o644


def _fsync(path: str) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


@contextlib.contextmanager
def atomic_path(path: PathLike) -> Iterator[str]:
    """Yield a temp path next to ``path`` for a writer that takes a file name (e.g. safetensors' ``save_file``);
    once the block ends without error the file is made durable and renamed to ``path``."""
    path = os.fspath(path)
    folder = os.path.dirname(os.path.abspath(path))
    os.makedirs(folder, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{os.path.basename(path)}.", suffix=".tmp", dir=folder)
    os.close(fd)
    try:
        yield tmp
        _fsync(tmp)
        if os.name == "posix":
            os.chmod(tmp, _file_mode())
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(OSError):
            os.remove(tmp)
        raise
    if os.name == "posix":  # make the rename itself durable (best effort: some file systems refuse)
        with contextlib.suppress(OSError):
            _fsync(folder)


def atomic_write(path: PathLike, write: Callable[[io.BufferedWriter], None]) -> str:
    """Call ``write(fh)`` on a binary file that replaces ``path`` atomically. Returns the path."""
    with atomic_path(path) as tmp:
        with open(tmp, "wb") as fh:
            write(fh)
    return os.fspath(path)
