"""Calling ComfyUI nodes and giving them model files, outside the executor (scripts, tests, benchmarks).

:func:`call_node` runs any registered node class, classic (INPUT_TYPES / FUNCTION) or 0.3.x V3 (``execute``
returning a NodeOutput), and returns its outputs as a tuple. :func:`expose_model_file` makes a file anywhere on
disk selectable in one of ComfyUI's model folders of this (booted) process.
"""
from __future__ import annotations

from pathlib import Path

from .boot import boot


def call_node(name: str, **inputs) -> tuple:
    """Run node ``name`` (its node id, ours or ComfyUI's) with keyword inputs; returns its outputs as a tuple."""
    boot()
    import nodes

    cls = nodes.NODE_CLASS_MAPPINGS[name]
    if hasattr(cls, "define_schema"):  # V3 node
        return tuple(cls.execute(**inputs).args)
    return tuple(getattr(cls(), cls.FUNCTION)(**inputs))


def expose_model_file(folder: str, path: Path) -> str:
    """Make ``path`` a file of ComfyUI's model folder ``folder`` (e.g. ``checkpoints``); returns the name the
    loaders list. A symlink in the first folder of that kind (the run's private models folder when booted by
    :func:`~comfy_headless.boot.boot`), or, where symlinks are refused, the file's own folder added to the list."""
    boot()
    import folder_paths

    path = Path(path)
    target = Path(folder_paths.get_folder_paths(folder)[0]) / path.name
    target.parent.mkdir(parents=True, exist_ok=True)
    if not target.exists():
        try:
            target.symlink_to(path.resolve())
        except OSError:  # no symlinks here (some Windows set-ups)
            folder_paths.add_model_folder_path(folder, str(path.resolve().parent))
    getattr(folder_paths, "filename_list_cache", {}).pop(folder, None)
    return path.name
