"""Shared pytest fixtures: a headless ComfyUI booted once per session (see tests/comfy_host.py).

The extension's modules come from the one copy ComfyUI loads (comfy_headless.product), so the first test module
that takes one boots ComfyUI, at collection; its folders go to a session temp folder that is removed at the end.
"""
from __future__ import annotations

import os
import shutil
import tempfile

import pytest

import comfy_host

_WORK_DIR: str | None = None


def pytest_configure(config):
    """Tiny models gain nothing from intra-op threads, and two pytest processes sharing a small CPU with
    multi-threaded OpenMP slow each other down ~100x (busy-waiting); default to one thread.
    ``LAYERDIFF_TORCH_THREADS=N`` overrides it (0 keeps torch's default)."""
    import torch

    threads = int(os.environ.get("LAYERDIFF_TORCH_THREADS", "1"))
    if threads > 0:
        torch.set_num_threads(threads)
    # noise from ComfyUI's own modules, not from this project
    config.addinivalue_line("filterwarnings", "ignore:invalid escape sequence:DeprecationWarning")
    config.addinivalue_line("filterwarnings", "ignore:`torch.jit.script` is deprecated:FutureWarning")
    comfy_host.set_default_work_dir(_session_work_dir)


def _session_work_dir() -> str:
    global _WORK_DIR
    _WORK_DIR = tempfile.mkdtemp(prefix="layerdiff-pytest-comfyui-")
    return _WORK_DIR


def pytest_unconfigure(config):
    comfy_host.set_default_work_dir(None)
    if _WORK_DIR is not None:
        shutil.rmtree(_WORK_DIR, ignore_errors=True)


def pytest_report_header(config):
    root = comfy_host.default_comfyui_path()
    state = comfy_host._comfy_version(root) if (root / "nodes.py").is_file() else "missing"
    return f"ComfyUI host: {root} ({state})"


@pytest.fixture(scope="session")
def comfyui() -> comfy_host.HostInfo:
    """The booted headless ComfyUI (paths, version, our package); folders live in a session temp dir."""
    comfy_host.boot()
    return comfy_host.host()


@pytest.fixture(scope="session")
def layerdiff_nodes(comfyui) -> dict:
    """This repository's NODE_CLASS_MAPPINGS as ComfyUI loaded them (empty until the root __init__ exports some)."""
    return comfyui.node_mappings


@pytest.fixture(scope="session")
def tiny_sd15(comfyui) -> str:
    """Name of the tiny SD1.5-architecture checkpoint in the session's ``checkpoints`` folder."""
    return comfy_host.ensure_tiny_sd15_checkpoint()


@pytest.fixture(scope="session")
def tiny_sd15_models(tiny_sd15):
    """(MODEL, CLIP, VAE) of the tiny checkpoint, loaded once by CheckpointLoaderSimple. Clone before patching."""
    return comfy_host.load_checkpoint(tiny_sd15)


@pytest.fixture(scope="session")
def tiny_controlnet(tiny_sd15) -> str:
    """Name of the tiny ControlNet (for the tiny UNet) in the session's ``controlnet`` folder."""
    return comfy_host.ensure_tiny_controlnet()
