"""``scripts/shapes_benchmark.py`` end to end at toy settings: every stage runs with the project's own scripts
(dataset, VAE + initial checkpoint, base model, full model and the three ablations, evaluation through the ComfyUI
nodes, report), and the exported assets assemble into a checkpoint ComfyUI loads; the denoising diagnostics run on
its outputs. The numbers of such a tiny run mean nothing; the reported benchmark (docs/SHAPES_BENCHMARK.md) uses the
same command with the default settings.
"""
from __future__ import annotations

import json
import os
import subprocess
import sys

import math
from pathlib import Path

import pytest

import comfy_host
from comfy_headless.product import product_names
from layerdiff_toy import toy_model

pytestmark = pytest.mark.slow  # the whole benchmark chain (about a minute): bash scripts/test.sh -m slow

SCRIPT = comfy_host.REPO_ROOT / "scripts" / "shapes_benchmark.py"
DIAGNOSTICS = comfy_host.REPO_ROOT / "scripts" / "denoising_diagnostics.py"
TINY = {"train_count": 12, "test_count": 2, "val_count": 2, "ablation_test_count": 2, "vae_steps": 2, "base_steps": 3,
        "base_batch": 4, "module_steps": 2, "module_batch": 2, "eval_steps": 2}


def run_script(script: Path, *argv, comfy_root: Path) -> str:
    env = {**os.environ, "COMFYUI_PATH": str(comfy_root)}
    result = subprocess.run([sys.executable, str(script), *map(str, argv)], cwd=comfy_host.REPO_ROOT, env=env,
                            capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    return result.stdout


@pytest.fixture(scope="module")
def benchmark_run(comfyui, tmp_path_factory) -> tuple[Path, Path]:
    """(run folder, exported assets folder) of one tiny benchmark run."""
    tmp = tmp_path_factory.mktemp("shapes_benchmark")
    run_dir, assets = tmp / "run", tmp / "assets"
    sets = [a for k, v in TINY.items() for a in ("--set", f"{k}={v}")]
    run_script(SCRIPT, "--quick", "--run-dir", run_dir, "--export-assets", assets, *sets, comfy_root=comfyui.comfy_root)
    return run_dir, assets


def test_every_stage_runs_and_the_exported_assets_load(benchmark_run, tmp_path):
    run_dir, assets = benchmark_run

    report = json.loads((run_dir / "report.json").read_text())
    assert set(report["timings_s"]) == {"data", "vae", "base", "full", "no_intra", "no_inter", "no_enhancer", "tune",
                                        "eval"}
    assert report["tuned"]["split"] == "val" and report["tuned"]["smg_scale"] == 0.5  # the only --quick scale
    assert report["palette"]["source"].startswith("decoded")
    rows = report["summary"]
    for name in ("chance", "ground truth through the VAE", "untrained", "full (CFG)", "full + SAG", "full + SMG",
                 "no-intra (CFG)", "no-inter (CFG)", "no-enhancer (CFG)"):
        assert 0.0 <= rows[name]["fg_colour_acc"] <= 1.0, (name, rows[name])
    assert "| full + SMG |" in (run_dir / "report.md").read_text()
    for name in ("full", "no_intra", "no_inter", "no_enhancer"):
        assert (run_dir / f"layerdiff_{name}.safetensors").stat().st_size > 0

    toy = toy_model
    checkpoint = toy.assemble_toy_checkpoint(tmp_path / "toy.safetensors", assets)
    from safetensors import safe_open

    with safe_open(str(checkpoint), framework="pt") as fh:
        width = fh.get_slice("model.diffusion_model.input_blocks.0.0.weight").get_shape()[0]
    assert width == toy.SHAPES_TOY_WIDTH
    load_modules = product_names("layerdiff_model.modules.weights", "load_modules")

    modules = load_modules(toy.toy_layerdiff_weights_path(assets))
    assert modules.config.max_foregrounds == 2 and modules.config.use_role_modulation


def test_denoising_diagnostics_run_on_the_benchmark_outputs(benchmark_run, comfyui):
    run_dir, _ = benchmark_run
    common = ["--checkpoint", run_dir / "toy_base.safetensors", "--data", run_dir / "data" / "train", "--toy-model",
              "--samples", 4]
    levels = [line.split() for line in run_script(DIAGNOSTICS, "levels", *common, comfy_root=comfyui.comfy_root)
              .splitlines() if line.strip()[:1].isdigit()]
    assert [int(row[0]) for row in levels] == [999, 950, 900, 800, 700, 500, 300, 100]
    assert all(math.isfinite(float(v)) and float(v) >= 0 for row in levels for v in row[1:] if v != "|")
    slots = run_script(DIAGNOSTICS, "slots", *common, "--weights", run_dir / "layerdiff_full.safetensors",
                       comfy_root=comfyui.comfy_root)
    rows = [line for line in slots.splitlines() if line.startswith("t=")]
    assert len(rows) == 5 and all(line.count("[") == 3 for line in rows), slots
