"""Shared pytest fixtures: a headless ComfyUI booted once per session (see tests/comfy_host.py).

Nothing here boots ComfyUI unless a test asks for one of the host fixtures, so host-free unit tests stay fast.
"""
from __future__ import annotations

import os
import sys

import pytest

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import comfy_host  # noqa: E402  (tests/ must be importable first)


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


def pytest_report_header(config):
    root = comfy_host.default_comfyui_path()
    state = comfy_host._comfy_version(root) if (root / "nodes.py").is_file() else "missing"
    return f"ComfyUI host: {root} ({state})"


@pytest.fixture(scope="session", autouse=True)
def _comfyui_folders_in_pytest_tmp(tmp_path_factory):
    """Whoever boots ComfyUI first (fixture or helper), its folders go to pytest's session temp dir (pytest keeps
    the last three sessions). Boots nothing by itself."""
    comfy_host.set_default_work_dir(lambda: tmp_path_factory.mktemp("comfyui"))
    yield
    comfy_host.set_default_work_dir(None)


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
