"""This extension's modules, taken from the one copy of the package that ComfyUI loaded in this process.

ComfyUI loads the repository as a custom node under a name of its own choosing (the folder name in 2024, the
folder path in 0.3.x); the node classes and the host code import ``layerdiff_model`` relatively inside it. Scripts,
tests, benchmarks and the toy package take product modules from that same copy, never as a top-level
``layerdiff_model`` import, so every class exists once per process (an ``except LayerDiffError`` catches the
errors the nodes raise; configs compare equal). ``boot`` refuses to start after a top-level import.

    compose = product_module("layerdiff_model.layers.compose")
    LayerDiffConfig, Site = product_names("layerdiff_model.modules.config", "LayerDiffConfig", "Site")

Both boot ComfyUI with the defaults (CPU, a temporary work folder) when nothing has booted it yet; a script
that wants other settings calls :func:`comfy_headless.boot.boot` first.
"""
from __future__ import annotations

import importlib
from types import ModuleType

from .boot import HarnessError, boot, host


def package() -> ModuleType:
    """Our package's root module as ComfyUI loaded it (boots ComfyUI when needed)."""
    boot()
    loaded = host().package
    if loaded is None:
        raise HarnessError("ComfyUI booted but did not load ComfyUI-LayerDiff (the repository has no __init__.py)")
    return loaded


def product_module(name: str) -> ModuleType:
    """Submodule ``name`` of our package, e.g. ``"layerdiff_model.layers.compose"`` or ``"nodes.host.inference"``."""
    return importlib.import_module(f"{package().__name__}.{name}")


def product_names(module: str, *names: str):
    """The objects ``names`` of product module ``module``: one object for one name, else a tuple in order."""
    loaded = product_module(module)
    objects = tuple(getattr(loaded, name) for name in names)
    return objects[0] if len(objects) == 1 else objects
