"""What a careless or hostile API client can send (README "Reliability"): NaN and infinity in every numeric input,
a combo value that is not one of the choices, and what it must not change: ComfyUI's own range checks."""
from __future__ import annotations

import json
import math
from pathlib import Path

import pytest

import comfy_host
from layerdiff_host import (empty_latent, encode, for_tiny_models, node, package_module, save_tiny_weights,
                            tiny_model, tiny_modules)

SAMPLER_FLOATS = ("cfg", "denoise", "smg_scale", "smg_start_percent", "smg_blur_sigma")
WORKFLOW = comfy_host.REPO_ROOT / "workflows" / "text_to_2_layers.json"


@pytest.fixture(scope="module")
def tiny(comfyui):
    return tiny_model()


@pytest.fixture(scope="module")
def patched(tiny):
    return node("LayerDiffApply").apply(tiny[0], tiny_modules(tiny[0]))[0]


@pytest.fixture(scope="module")
def weights(tiny):
    return save_tiny_weights("hostile_input.safetensors", tiny_modules(tiny[0], random=True, seed=3))


def errors():
    return package_module("layerdiff_model.errors")


@pytest.mark.parametrize("bad", [math.nan, math.inf, -math.inf], ids=["nan", "inf", "-inf"])
@pytest.mark.parametrize("name", SAMPLER_FLOATS)
def test_every_float_of_the_smg_sampler_refuses_non_finite_values(tiny, patched, name, bad):
    pos, neg, n = encode(tiny[1], ["a red circle"])
    inputs = dict(cfg=5.0, denoise=1.0, smg_scale=0.5, smg_start_percent=0.0, smg_blur_sigma=2.0)
    inputs[name] = bad
    with pytest.raises(errors().LayerDiffError, match=rf"LayerDiff SMG KSampler: input '{name}' is .*not a finite"):
        node("LayerDiffSMGSampler").sample(patched, 1, 2, inputs.pop("cfg"), "euler", "normal", pos, neg,
                                           empty_latent(n), **inputs)


def test_split_layers_refuses_a_non_finite_mask_threshold(tiny):
    import torch

    latent = empty_latent(1)
    images = torch.zeros(3, 64, 64, 3)
    with pytest.raises(errors().LayerDiffError, match="LayerDiff Split Layers: input 'mask_threshold' is nan"):
        node("LayerDiffSplitLayers").split(images, latent, True, math.nan)


def _api(weights: str, **sampler) -> dict:
    api = comfy_host.ui_to_api(json.loads(Path(WORKFLOW).read_text(encoding="utf-8")))
    return for_tiny_models(api, weights, width=64, height=64, **sampler)


def test_nan_over_the_api_passes_comfyui_validation_and_is_refused_by_the_node(weights):
    """ComfyUI's ``val < min`` / ``val > max`` checks are both false for NaN: the node refuses it, writes no file."""
    api = _api(weights, smg_scale=math.nan)
    comfy_host.validate(api)  # what ComfyUI itself lets through
    before = set(comfy_host.host().output_dir.rglob("*"))
    with pytest.raises(comfy_host.NodeExecutionError, match="input 'smg_scale' is nan"):
        comfy_host.run_prompt(api)
    assert set(comfy_host.host().output_dir.rglob("*")) == before


def test_comfyui_range_checks_still_apply(weights):
    with pytest.raises(comfy_host.PromptValidationError, match="smg_scale"):
        comfy_host.validate(_api(weights, smg_scale=11.0))


def test_a_layered_file_that_is_not_a_choice_is_refused_by_validation(weights):
    """The combo is a list, so ComfyUI's validation checks it ("PSD" used to run and silently write no PSD)."""
    api = _api(weights)
    save = next(e for e in api.values() if e["class_type"] == "LayerDiffSaveLayers")
    save["inputs"]["layered_file"] = "PSD"
    with pytest.raises(comfy_host.PromptValidationError, match="layered_file"):
        comfy_host.validate(api)


def test_every_combo_of_our_nodes_is_a_list(layerdiff_nodes):
    """ComfyUI validates combo values only when the options are a list."""
    tuples = []
    for name, cls in layerdiff_nodes.items():
        spec = cls.INPUT_TYPES()
        for section in ("required", "optional"):
            for input_name, value in spec.get(section, {}).items():
                if isinstance(value[0], tuple):
                    tuples.append(f"{name}.{input_name}")
    assert not tuples, tuples


def _windows(count: int, word: str) -> str:
    """A prompt of ``count`` CLIP windows (ComfyUI encodes 75 tokens + start/end per window)."""
    return " ".join([word] * (75 * count - 10))


def test_long_layer_prompts_of_unlike_lengths_pad_instead_of_repeating_with_the_same_result(tiny, patched,
                                                                                          monkeypatch):
    """Layer prompts of 5 and 7 windows: padding to the longest (7 windows) with a mask gives the same layers as
    repeating both to their least common multiple (35 windows, the old, exact but unbounded way)."""
    conditioning = package_module("layerdiff_model.sampling.conditioning")
    a = package_module("nodes.host.inference")
    pos, neg, n = encode(tiny[1], [_windows(7, "red")], background=_windows(5, "blue"))
    rows = pos[0][1]["model_conds"][a.CONTEXT_COND].cond
    assert rows.shape[1] == 77 * 7
    from layerdiff_host import sample

    padded, _ = sample(patched, pos, neg, empty_latent(n), steps=2)
    monkeypatch.setattr(conditioning, "MAX_REPEAT", 10**6)  # the old behaviour: always the lcm
    pos_lcm, neg_lcm, _ = encode(tiny[1], [_windows(7, "red")], background=_windows(5, "blue"))
    assert pos_lcm[0][1]["model_conds"][a.CONTEXT_COND].cond.shape[1] == 77 * 35
    repeated, _ = sample(patched, pos_lcm, neg_lcm, empty_latent(n), steps=2)
    # equal up to float summation order (2,695 vs 539 keys per row)
    assert float((padded - repeated).abs().max()) < 1e-3
    other_pos, other_neg, _ = encode(tiny[1], [_windows(7, "green")], background=_windows(5, "blue"))
    other, _ = sample(patched, other_pos, other_neg, empty_latent(n), steps=2)
    assert float((other - padded).abs().max()) > 1e-2  # a different layer prompt does change the result


@pytest.mark.filterwarnings("ignore:Using a non-tuple sequence:UserWarning")  # ComfyUI's own indexing, 0.3.64
def test_context_windows_are_refused(tiny, patched):
    """0.3.x context windows slice the batch into row windows (S = 3, 24 rows, length 12, overlap 4: a window can
    start off a sample boundary and pass the layout check with shifted slots); they are refused by name."""
    import nodes

    if "ContextWindowsManual" not in nodes.NODE_CLASS_MAPPINGS:
        pytest.skip("this ComfyUI (2024) has no context windows")
    from layerdiff_host import core_node, sample

    windowed = core_node("ContextWindowsManual", model=patched, context_length=12, context_overlap=4,
                         context_schedule="standard_static", context_stride=1, closed_loop=False,
                         fuse_method="pyramid", dim=0)[0]
    pos, neg, n = encode(tiny[1], ["a red circle"])
    with pytest.raises(errors().LayoutError, match="context windows.*Remove the context-window node"):
        sample(windowed, pos, neg, empty_latent(n, batch=8), steps=23)
    # (23 steps: 24 sigmas, one per row; with fewer, ComfyUI's own handler fails first comparing sigmas to rows)
    small, _ = sample(windowed, pos, neg, empty_latent(n, batch=2), steps=1)  # 6 rows: no window, runs
    assert small.shape[0] == 6
