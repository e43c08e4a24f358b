"""The shipped toy shapes model (assets/toy_shapes) end to end through the ComfyUI nodes, and its asset tooling.

The toy checkpoint is assembled from the shipped small files (the random text encoder is regenerated from its seed
and checked against a stored SHA-256), loaded by the core CheckpointLoaderSimple, patched with the shipped LayerDiff
weights, and prompted "a red circle": the foreground layer must be mostly red inside its own mask, and the mask
must be where the red circle is (docs/SHAPES_BENCHMARK.md gives the measurements behind the thresholds).
"""
from __future__ import annotations

import json
import shutil

import numpy as np
import pytest
import torch

import comfy_host
import layerdiff_host as ld
from comfy_headless.product import product_names
from layerdiff_toy import shapes, toy_model
from layerdiff_toy.shapes_eval import content_region

SEEDS = tuple(range(8))
MIN_PASSING = 7  # of SEEDS; measured pass rate of the shipped weights: docs/SHAPES_BENCHMARK.md ("end-to-end test")
STEPS = 16
RED_SHARE_MIN = 0.6  # "mostly red"
IOU_MIN = 0.5


def toy():
    return toy_model


@pytest.fixture(scope="module")
def toy_shapes_models(comfyui):
    """(MODEL, CLIP, VAE, layerdiff weights name) of the shipped toy shapes model in this session's folders."""
    t = toy()
    t.register_toy_sd15()
    ckpt = comfyui.model_path("checkpoints", t.TOY_CHECKPOINT_NAME)
    if not ckpt.exists():
        t.assemble_toy_checkpoint(ckpt)
    weights = comfyui.model_path("layerdiff", t.TOY_LAYERDIFF_ASSET)
    weights.parent.mkdir(parents=True, exist_ok=True)
    shutil.copyfile(t.toy_layerdiff_weights_path(), weights)
    import folder_paths

    for folder in ("checkpoints", "layerdiff"):
        getattr(folder_paths, "filename_list_cache", {}).pop(folder, None)
    model, clip, vae = comfy_host.load_checkpoint(t.TOY_CHECKPOINT_NAME)
    return model, clip, vae, weights.name


def generate(models, prompt: str, background: str, seed: int):
    """One layered image through our nodes + the core VAE Decode; returns (foreground [H,W,3], mask [H,W])."""
    model, clip, vae, weights = models
    (modules,) = ld.node("LayerDiffLoadWeights").load(weights)
    (patched,) = ld.node("LayerDiffApply").apply(model, modules)
    positive, negative, n, _ = ld.node("LayerDiffPromptEncode").encode(clip, f"{prompt} on {background}",
                                                                         background, prompt, "")
    positive, negative = ld.node("LayerDiffEnhancePrompts").enhance(modules, positive, negative)
    latent = ld.empty_latent(n, size=64)
    _, out = ld.sample(patched, positive, negative, latent, steps=STEPS, cfg=5.0, smg_scale=0.0, seed=seed)
    (images,) = ld.core_node("VAEDecode", vae=vae, samples=out)
    layers = ld.node("LayerDiffSplitLayers").split(images, out)[0]
    return layers.foregrounds[0, 0], layers.masks[0, 0]


def red_share(foreground: torch.Tensor, mask: torch.Tensor) -> float:
    """Fraction of the mask's pixels whose nearest vocabulary colour is red."""
    vocab = torch.tensor(list(shapes.COLOURS.values()), dtype=torch.float32) / 255  # [C, 3]
    pixels = foreground[mask > 0.5].float()  # [K, 3]
    if pixels.shape[0] == 0:
        return 0.0
    nearest = ((pixels[:, None, :] - vocab[None]) ** 2).sum(-1).argmin(1)
    return float((nearest == list(shapes.COLOURS).index("red")).float().mean())


def red_circle_check(models, seed: int) -> tuple[bool, str]:
    """Prompt one layer "a red circle" on "a plain blue background": (passed, what was measured)."""
    fg, mask = generate(models, "a red circle", "a plain blue background", seed)
    share = red_share(fg, mask)
    red = np.asarray(content_region(fg, "red"))  # where the layer is nearer red than the neutral grey
    iou = shapes.mask_iou(mask.numpy(), red)
    area = int(mask.sum())
    passed = area > 30 and share >= RED_SHARE_MIN and iou >= IOU_MIN
    return passed, f"seed {seed}: mask {area} px, {share:.0%} red inside it, IoU with the red region {iou:.2f}"


# The acceptance test of issue 3, on the shipped weights, over several seeds (deterministic on CPU for given
# weights): at least MIN_PASSING of SEEDS must give a layer that is mostly red inside its mask, with a mask where the
# red circle is. docs/SHAPES_BENCHMARK.md ("end-to-end test") reports the measured pass rate.
def test_red_circle_layer_is_red_inside_its_mask_and_mask_covers_the_circle(toy_shapes_models):
    torch.set_num_threads(1)
    results = [red_circle_check(toy_shapes_models, seed) for seed in SEEDS]
    passed = sum(ok for ok, _ in results)
    assert passed >= MIN_PASSING, f"{passed} of {len(SEEDS)} seeds pass (need {MIN_PASSING}):\n" + \
        "\n".join(text for _, text in results)


def test_prompt_colour_changes_the_layer(toy_shapes_models):
    """Same seeds, other colour: the layer follows its own prompt (the red-circle test is not a constant)."""
    torch.set_num_threads(1)
    red = [red_share(*generate(toy_shapes_models, "a red circle", "a plain blue background", s)) for s in SEEDS]
    green = [red_share(*generate(toy_shapes_models, "a green square", "a plain white background", s)) for s in SEEDS]
    assert max(green) < 0.2, f"a green square layer came out red: red shares {green}"
    assert np.mean(red) - np.mean(green) > 0.5, (red, green)


# ------------------------------------------------------------------------------------------------ asset tooling
def test_export_then_assemble_reproduces_the_checkpoint(comfyui, tmp_path):
    from safetensors.torch import load_file

    t = toy()
    source = comfyui.model_path("checkpoints", comfy_host.ensure_tiny_sd15_checkpoint())
    written = t.export_toy_assets(source, None, tmp_path / "assets", dtype=torch.float32)
    assert written["base"].stat().st_size < 20 * 2**20  # the 150 MB text encoder is not stored
    out = t.assemble_toy_checkpoint(tmp_path / "full.safetensors", tmp_path / "assets")
    a, b = load_file(str(source)), load_file(str(out))
    assert set(a) == set(b)
    assert all(torch.equal(a[k].float(), b[k].float()) for k in a)


def test_assemble_fails_loudly_when_the_regenerated_text_encoder_differs(tmp_path):
    from safetensors import safe_open
    from safetensors.torch import save_file

    t = toy()
    with safe_open(str(t.TOY_ASSETS_DIR / t.TOY_BASE_ASSET), framework="pt") as fh:
        meta, tensors = fh.metadata(), {k: fh.get_tensor(k) for k in fh.keys()}
    recipe = json.loads(meta["clip_recipe"])
    assert any(e["key"].endswith("token_embedding.weight") for e in recipe)  # regenerated, not shipped
    bad = tmp_path / "bad"
    bad.mkdir()
    save_file(tensors, str(bad / t.TOY_BASE_ASSET), metadata={**meta, "clip_sha256": "0" * 64})
    with pytest.raises(t.ToyAssetError, match="does not match the checksum"):
        t.assemble_toy_checkpoint(tmp_path / "out.safetensors", bad)
    assert not (tmp_path / "out.safetensors").exists()
    with pytest.raises(t.ToyAssetError, match="not found"):
        t.assemble_toy_checkpoint(tmp_path / "out.safetensors", tmp_path / "missing")


def test_shipped_assets_are_small_and_the_weights_load():
    t = toy()
    load_config = product_names("layerdiff_model.modules.weights", "load_config")

    sizes = {p.name: p.stat().st_size for p in t.TOY_ASSETS_DIR.glob("*.safetensors")}
    assert set(sizes) == {t.TOY_BASE_ASSET, t.TOY_LAYERDIFF_ASSET}
    assert sum(sizes.values()) < 24 * 2**20, sizes
    from safetensors import safe_open

    with safe_open(str(t.TOY_ASSETS_DIR / t.TOY_BASE_ASSET), framework="pt") as fh:
        assert fh.get_slice("model.diffusion_model.input_blocks.0.0.weight").get_shape()[0] == t.SHAPES_TOY_WIDTH
    config = load_config(t.toy_layerdiff_weights_path())
    assert config.base_family == "sd15" and config.max_foregrounds >= 1
