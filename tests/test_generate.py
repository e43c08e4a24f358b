"""The headless runner (``scripts/generate_layers.py``, what ``bash scripts/generate.sh`` runs) end to end.

The command runs as users run it: a separate Python process with ``COMFYUI_PATH`` set, ComfyUI booted by the
runner, a shipped workflow through ComfyUI's executor. With the bundled toy shapes model when its assets are in
the checkout (``assets/toy_shapes``, the default path of the command); otherwise with a random-weight toy
checkpoint and random LayerDiff weights made here and passed as ``--checkpoint``/``--weights`` (the test id says
which). User errors must end in one line on stderr, exit status 1, no traceback.
"""
from __future__ import annotations

import os
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

import comfy_host
from comfy_headless.product import product_module
from layerdiff_host import save_tiny_weights, tiny_model, tiny_modules
from scripts import generate_layers
layered_files = product_module("layerdiff_model.layers.layered_files")

RUNNER = comfy_host.REPO_ROOT / "scripts" / "generate_layers.py"
WIDTH, HEIGHT = 64, 48


def _shipped_toy_model() -> bool:
    try:
        generate_layers.toy_sources()
    except generate_layers.RunError:
        return False
    return True


def generate(*args, cwd: Path) -> subprocess.CompletedProcess:
    env = {**os.environ, "COMFYUI_PATH": str(comfy_host.default_comfyui_path()), "LAYERDIFF_TORCH_THREADS": "1"}
    return subprocess.run([sys.executable, str(RUNNER), *map(str, args)], cwd=cwd, env=env, capture_output=True,
                          text=True, timeout=300)


@pytest.fixture(scope="module")
def model_args(comfyui) -> list[str]:
    """No arguments for the shipped toy model; else --checkpoint/--weights of random-weight toy files."""
    if _shipped_toy_model():
        return []
    checkpoint = comfyui.model_path("checkpoints", comfy_host.ensure_tiny_sd15_checkpoint())
    weights = save_tiny_weights("generate_random_toy.safetensors", tiny_modules(tiny_model()[0], random=True, seed=3))
    return ["--checkpoint", checkpoint, "--weights", comfyui.model_path("layerdiff", weights)]


def _one_line_error(result: subprocess.CompletedProcess, *fragments: str) -> str:
    assert result.returncode == 1, result.stderr
    errors = [line for line in result.stderr.splitlines() if line.startswith("generate_layers: error: ")]
    assert len(errors) == 1 and result.stderr.rstrip().endswith(errors[0]), result.stderr
    assert "Traceback" not in result.stderr + result.stdout
    for fragment in fragments:
        assert fragment in errors[0], errors[0]
    return errors[0]


@pytest.mark.slow  # generate.sh-style script run in a fresh process (~9-13 s)
@pytest.mark.parametrize("source", ["shipped-toy-assets" if _shipped_toy_model() else "random-weight-toy-files"])
def test_generate_command_writes_layered_picture(source, model_args, tmp_path):
    foregrounds = ["a red circle", "a blue square"]
    started = time.monotonic()
    result = generate(*model_args, "--prompt", "a red circle and a blue square on a green background",
                      "--background", "a green background", *[a for f in foregrounds for a in ("-f", f)],
                      "--width", WIDTH, "--height", HEIGHT, "--steps", 2, "--seed", 7, "--out", "layers",
                      cwd=tmp_path)
    elapsed = time.monotonic() - started
    assert result.returncode == 0, result.stderr
    print(f"{source}: generate command took {elapsed:.1f} s")
    assert "==> starting ComfyUI" in result.stderr and "text_to_3_layers.json" in result.stderr
    assert "LayerDiff SMG KSampler" in result.stderr  # per-node progress

    out = tmp_path / "layers"  # relative --out: the caller's folder
    files = sorted(out.iterdir())
    listed = [Path(line.strip()) for line in result.stdout.splitlines()[1:]]
    assert sorted(listed) == files and len(files) == 2 + 2 * len(foregrounds) + 2  # composite, bg, layers, masks, psd, ora
    assert all(p.stat().st_size > 0 for p in files)
    stem = "layerdiff_00001"
    with Image.open(out / f"{stem}_composite.png") as im:
        assert im.mode == "RGB" and im.size == (WIDTH, HEIGHT)
    for i in (1, 2):
        with Image.open(out / f"{stem}_layer{i}.png") as layer, Image.open(out / f"{stem}_mask{i}.png") as mask:
            assert layer.mode == "RGBA" and layer.size == (WIDTH, HEIGHT)
            assert np.array_equal(np.asarray(layer)[..., 3], np.asarray(mask.convert("L")))  # alpha = mask

    expected = foregrounds + ["a green background"]  # top first
    for layers in (layered_files.read_psd(out / f"{stem}.psd"), layered_files.read_ora(out / f"{stem}.ora")):
        assert [name for name, _ in layers] == expected
        assert all(array.shape == (HEIGHT, WIDTH, 4) for _, array in layers)
    if source == "shipped-toy-assets":
        assert generate_layers.toy_checkpoint_path().is_file()
        # "a green background" is all known words in an untrained phrasing: one warning line naming both prompts
        warnings = [line for line in result.stderr.splitlines() if "toy model cannot read" in line]
        assert len(warnings) == 1 and "--prompt" in warnings[0] and "--background" in warnings[0], result.stderr
        assert '"a plain green background"' in warnings[0] and "--foreground" not in warnings[0]
        assert "circle" in warnings[0].split("knows only the words")[1]


@pytest.mark.slow  # generate.sh-style script run in a fresh process (~9-13 s)
def test_one_foreground_runs_the_two_layer_workflow_and_wrong_weights_fail_in_one_line(comfyui, tmp_path):
    """Past ComfyUI's boot: the 2-layer workflow is picked, and a checkpoint given as --weights is refused by the
    LayerDiff Load Weights node; the runner prints that node's message as one line."""
    checkpoint = comfyui.model_path("checkpoints", comfy_host.ensure_tiny_sd15_checkpoint())
    result = generate("--checkpoint", checkpoint, "--weights", checkpoint, "-f", "a red circle", "--out", "out",
                      cwd=tmp_path)
    assert "text_to_2_layers.json" in result.stderr
    _one_line_error(result, "LayerDiff Load Weights", "not a LayerDiff weights file", "--weights")
    assert not any((tmp_path / "out").iterdir())


@pytest.mark.parametrize("args, fragments", [
    (["--checkpoint", "missing.safetensors", "--weights", "w.safetensors"], ["--checkpoint missing.safetensors: no such file"]),
    (["--checkpoint", "{weights}", "--weights", "{weights}"], ["not a single-file Stable Diffusion checkpoint"]),
    (["--checkpoint", "{sdxl}"], ["--checkpoint needs --weights too"]),
    (["--workflow", "nowhere.json"], ["--workflow nowhere.json: no such file"]),
], ids=["missing-file", "weights-as-checkpoint", "checkpoint-without-weights", "missing-workflow"])
def test_user_errors_are_one_line_before_comfyui_boots(args, fragments, tmp_path):
    result = generate(*[a.format(**_bad_files(tmp_path)) for a in args], cwd=tmp_path)
    _one_line_error(result, *fragments)
    assert "==> starting ComfyUI" not in result.stderr


@pytest.mark.slow  # generate.sh-style script run in a fresh process (~9-13 s)
def test_a_checkpoint_of_another_family_is_refused_in_one_line_before_any_model_loads(tmp_path):
    """The context-width check reads SD1.5's width from the booted package (one constant), before any model loads."""
    files = _bad_files(tmp_path)
    result = generate("--checkpoint", files["sdxl"], "--weights", files["weights"], "--out", "out", cwd=tmp_path)
    _one_line_error(result, "another model family", "context width 768", "SD1.5")
    assert "==> running" not in result.stderr
    assert not any((tmp_path / "out").iterdir())


def _bad_files(tmp_path: Path) -> dict:
    import torch
    from safetensors.torch import save_file

    weights = tmp_path / "w.safetensors"
    save_file({"blocks.0.weight": torch.zeros(2)}, str(weights), metadata={"format": "layerdiff"})
    sdxl = tmp_path / "sdxl.safetensors"
    save_file({"model.diffusion_model.input_blocks.4.1.transformer_blocks.0.attn2.to_k.weight": torch.zeros(4, 2048)},
              str(sdxl))
    return {"weights": weights, "sdxl": sdxl}


def test_node_errors_become_one_line_with_what_to_pass():
    """A model of another family reaching LayerDiff Apply (the check that also covers pickled checkpoints)."""
    error = comfy_host.NodeExecutionError({
        "node_id": "3", "node_type": "LayerDiffApply", "exception_type": "ModelFamilyError",
        "exception_message": "LayerDiff Apply (UNet patch): the model is SDXL, but LayerDiff works with SD1.5-family "
                             "checkpoints only.\nLoad an SD1.5 checkpoint.", "traceback": ["Traceback (most recent)"]})
    message = generate_layers.user_message(error)
    assert "\n" not in message and "the model is SDXL" in message and "Traceback" not in message
    assert message.endswith(generate_layers.CHECKPOINT_HINT)
    assert generate_layers.user_message(ValueError("a bug")) is None  # bugs keep their traceback
