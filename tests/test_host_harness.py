"""The headless ComfyUI harness works: boot, tiny models, UI->API conversion, prompt execution and errors."""
from __future__ import annotations

import time

import pytest
import torch
from PIL import Image

import comfy_host

DATA = comfy_host.DATA_DIR


def core_prompt(ckpt: str, prefix: str = "layerdiff_core", steps: int = 4, size: int = 64) -> dict:
    """CheckpointLoaderSimple -> CLIPTextEncode x2 -> EmptyLatentImage -> KSampler -> VAEDecode -> SaveImage."""
    return {
        "1": {"class_type": "CheckpointLoaderSimple", "inputs": {"ckpt_name": ckpt}},
        "2": {"class_type": "CLIPTextEncode", "inputs": {"text": "a red circle", "clip": ["1", 1]}},
        "3": {"class_type": "CLIPTextEncode", "inputs": {"text": "", "clip": ["1", 1]}},
        "4": {"class_type": "EmptyLatentImage", "inputs": {"width": size, "height": size, "batch_size": 1}},
        "5": {"class_type": "KSampler", "inputs": {
            "model": ["1", 0], "positive": ["2", 0], "negative": ["3", 0], "latent_image": ["4", 0],
            "seed": 7, "steps": steps, "cfg": 7.0, "sampler_name": "euler", "scheduler": "normal", "denoise": 1.0}},
        "6": {"class_type": "VAEDecode", "inputs": {"samples": ["5", 0], "vae": ["1", 2]}},
        "7": {"class_type": "SaveImage", "inputs": {"images": ["6", 0], "filename_prefix": prefix}},
    }


EXPECTED_UI_CONVERSION = {
    "4": {"class_type": "CheckpointLoaderSimple", "inputs": {"ckpt_name": "tiny_sd15.safetensors"}},
    "6": {"class_type": "CLIPTextEncode", "inputs": {"text": "a red circle on a blue background", "clip": ["4", 1]}},
    "7": {"class_type": "CLIPTextEncode", "inputs": {"text": "blurry", "clip": ["4", 1]}},
    "5": {"class_type": "EmptyLatentImage", "inputs": {"width": 64, "height": 64, "batch_size": 1}},
    "3": {"class_type": "KSampler", "inputs": {
        "seed": 42, "steps": 4, "cfg": 7.0, "sampler_name": "euler", "scheduler": "normal", "denoise": 1.0,
        "model": ["4", 0], "positive": ["6", 0], "negative": ["7", 0], "latent_image": ["5", 0]}},
    "8": {"class_type": "VAEDecode", "inputs": {"samples": ["3", 0], "vae": ["4", 2]}},
    "9": {"class_type": "SaveImage", "inputs": {"filename_prefix": "layerdiff_ui_test", "images": ["8", 0]}},
}


# ------------------------------------------------------------------------------------------------- boot and models
def test_boot_loads_core_nodes_and_our_package(comfyui, layerdiff_nodes):
    import nodes

    assert {"KSampler", "CheckpointLoaderSimple", "ControlNetApply", "SelfAttentionGuidance"} <= set(nodes.NODE_CLASS_MAPPINGS)
    assert comfy_host.boot() is layerdiff_nodes  # idempotent
    for name, cls in layerdiff_nodes.items():
        assert nodes.NODE_CLASS_MAPPINGS[name] is cls
    if (comfy_host.REPO_ROOT / "__init__.py").is_file():
        assert comfyui.package is not None
    import comfy.model_management

    assert comfy.model_management.get_torch_device().type == "cpu"
    print(f"ComfyUI {comfyui.version} at {comfyui.comfy_root}; {len(layerdiff_nodes)} LayerDiff nodes")


def test_tiny_checkpoint_loads_as_sd15(tiny_sd15_models):
    import comfy.supported_models

    model, clip, vae = tiny_sd15_models
    assert isinstance(model.model.model_config, comfy.supported_models.SD15)
    assert model.model.diffusion_model.model_channels == 32
    with torch.no_grad():
        tokens = clip.tokenize("a red circle")
        cond = clip.encode_from_tokens(tokens)
        image = vae.decode(torch.randn(1, 4, 8, 8, generator=torch.Generator().manual_seed(0)))
    assert cond.shape == (1, 77, 768) and torch.isfinite(cond).all()
    assert image.shape == (1, 64, 64, 3)
    assert image.std() > 0.01, "the tiny VAE should not decode to a flat image"


def test_core_ksampler_is_fast_on_cpu(tiny_sd15_models):
    import nodes

    model, clip, _ = tiny_sd15_models
    with torch.no_grad():
        positive = nodes.CLIPTextEncode().encode(clip, "a red circle")[0]
        negative = nodes.CLIPTextEncode().encode(clip, "")[0]
        latent = nodes.EmptyLatentImage().generate(64, 64, 1)[0]
        nodes.common_ksampler(model, 1, 4, 7.0, "euler", "normal", positive, negative, latent)  # warm-up
        start = time.perf_counter()
        out = nodes.common_ksampler(model, 1, 4, 7.0, "euler", "normal", positive, negative, latent)[0]
        elapsed = time.perf_counter() - start
    print(f"4-step KSampler, 8x8 latent, cfg 7: {elapsed:.3f}s")
    assert out["samples"].shape == (1, 4, 8, 8) and torch.isfinite(out["samples"]).all()
    assert elapsed < 5.0


def test_weight_init_is_deterministic_by_name():
    a, b = torch.nn.Linear(4, 4), torch.nn.Sequential(torch.nn.Linear(4, 4))
    comfy_host.init_weights_(a, seed=3, prefix="0.")
    comfy_host.init_weights_(b, seed=3)
    assert torch.equal(a.weight, b[0].weight) and not a.bias.any()
    comfy_host.init_weights_(b, seed=4)
    assert not torch.equal(a.weight, b[0].weight)


def test_non_sd15_model_for_family_checks(comfyui):
    import comfy.supported_models

    model = comfy_host.make_tiny_sdxl_like_unet_model()
    config = model.model.model_config
    assert isinstance(config, comfy.supported_models.SDXL)
    assert not isinstance(config, comfy.supported_models.SD15)
    assert config.unet_config["context_dim"] == 2048


# ------------------------------------------------------------------------------------------------- run_prompt
def test_core_workflow_runs_and_saves_png(tiny_sd15):
    start = time.perf_counter()
    run = comfy_host.run_prompt(core_prompt(tiny_sd15))
    print(f"core workflow through PromptExecutor: {time.perf_counter() - start:.2f}s")
    files = run.files()
    assert len(files) == 1 and files[0].suffix == ".png" and files[0].is_file()
    with Image.open(files[0]) as png:
        assert png.size == (64, 64)
    assert run.output("5")["samples"].shape == (1, 4, 8, 8)
    assert any(event == "executing" for event, _ in run.messages)


def test_validation_errors_name_the_node(tiny_sd15):
    prompt = core_prompt(tiny_sd15)
    prompt["1"]["inputs"]["ckpt_name"] = "no_such_model.safetensors"
    with pytest.raises(comfy_host.PromptValidationError, match="CheckpointLoaderSimple") as info:
        comfy_host.run_prompt(prompt)
    assert "1" in info.value.node_errors
    with pytest.raises(comfy_host.PromptValidationError, match="NoSuchNode"):
        comfy_host.run_prompt({"1": {"class_type": "NoSuchNode", "inputs": {}}})


class _RaisingNode:
    """Test-only output node that always fails."""

    @classmethod
    def INPUT_TYPES(cls):
        return {"required": {"text": ("STRING", {"default": "x"})}}

    RETURN_TYPES = ()
    FUNCTION = "run"
    OUTPUT_NODE = True
    CATEGORY = "testing"

    def run(self, text):
        raise ValueError(f"boom: {text}")


def test_execution_errors_raise_with_node_text(comfyui, monkeypatch):
    import nodes

    monkeypatch.setitem(nodes.NODE_CLASS_MAPPINGS, "LayerDiffTestRaise", _RaisingNode)
    with pytest.raises(comfy_host.NodeExecutionError, match="boom: hello") as info:
        comfy_host.run_prompt({"1": {"class_type": "LayerDiffTestRaise", "inputs": {"text": "hello"}}})
    assert info.value.node_id == "1" and info.value.node_type == "LayerDiffTestRaise"
    assert "ValueError" in info.value.exception_type


# ------------------------------------------------------------------------------------------------- ui_to_api
def test_ui_to_api_converts_the_fixture_workflow(comfyui):
    assert comfy_host.ui_to_api(DATA / "ui_workflow_core.json") == EXPECTED_UI_CONVERSION


def test_ui_to_api_output_runs(tiny_sd15):
    prompt = comfy_host.ui_to_api(comfy_host.load_workflow(DATA / "ui_workflow_core.json"))
    files = comfy_host.run_prompt(prompt).files()
    assert [f.name.startswith("layerdiff_ui_test") for f in files] == [True]


def test_ui_to_api_rejects_unknown_node_types(comfyui):
    workflow = comfy_host.load_workflow(DATA / "ui_workflow_core.json")
    workflow["nodes"][0]["type"] = "NoSuchNodeType"
    with pytest.raises(comfy_host.UnknownNodeTypeError, match="NoSuchNodeType"):
        comfy_host.ui_to_api(workflow)


def test_ui_to_api_widget_mapping_details(comfyui):
    import nodes

    ksampler = nodes.NODE_CLASS_MAPPINGS["KSampler"]
    values = [5, "randomize", 3, 6.5, "euler", "karras", 0.5]
    assert comfy_host.widget_inputs(ksampler, values) == {
        "seed": 5, "steps": 3, "cfg": 6.5, "sampler_name": "euler", "scheduler": "karras", "denoise": 0.5}
    assert comfy_host.widget_inputs(ksampler, {"seed": 1, "steps": 2}) == {"seed": 1, "steps": 2}
    assert [name for name, _ in comfy_host.widget_specs(nodes.NODE_CLASS_MAPPINGS["VAEDecode"])] == []


# ------------------------------------------------------------------------------------------------- ControlNet
def controlnet_prompt(ckpt: str, controlnet: str, strength: float) -> dict:
    prompt = core_prompt(ckpt, prefix="layerdiff_cn")
    prompt["7"] = {"class_type": "PreviewImage", "inputs": {"images": ["6", 0]}}
    prompt["8"] = {"class_type": "ControlNetLoader", "inputs": {"control_net_name": controlnet}}
    prompt["9"] = {"class_type": "EmptyImage", "inputs": {"width": 64, "height": 64, "batch_size": 1, "color": 0xFF8000}}
    prompt["10"] = {"class_type": "ControlNetApply", "inputs": {
        "conditioning": ["2", 0], "control_net": ["8", 0], "image": ["9", 0], "strength": strength}}
    prompt["5"]["inputs"]["positive"] = ["10", 0]
    return prompt


def test_tiny_controlnet_loads_and_changes_the_sample(tiny_sd15, tiny_controlnet):
    import comfy.controlnet

    with_control = comfy_host.run_prompt(controlnet_prompt(tiny_sd15, tiny_controlnet, 1.0))
    assert isinstance(with_control.output("8"), comfy.controlnet.ControlNet)
    without = comfy_host.run_prompt(controlnet_prompt(tiny_sd15, tiny_controlnet, 0.0))
    a, b = with_control.output("5")["samples"], without.output("5")["samples"]
    assert torch.isfinite(a).all()
    difference = (a - b).abs().mean() / b.abs().mean()
    print(f"relative latent change from the tiny ControlNet: {difference:.3f}")
    assert difference > 0.01
