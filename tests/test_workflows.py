"""Every shipped workflow parses, uses only registered nodes, and runs headlessly through ComfyUI's executor
(tiny SD1.5 checkpoint and tiny LayerDiff weights standing in for the real files)."""
import json
from pathlib import Path

import pytest

import comfy_host
from layerdiff_host import for_tiny_models, save_tiny_weights, tiny_model, tiny_modules

WORKFLOWS = sorted((comfy_host.REPO_ROOT / "workflows").glob("*.json"))


def test_workflows_are_shipped():
    names = {p.name for p in WORKFLOWS}
    assert {"text_to_2_layers.json", "text_to_3_layers.json"} <= names


@pytest.fixture(scope="module")
def tiny_weights(comfyui):
    model, _, _ = tiny_model()
    return save_tiny_weights("tiny_layerdiff.safetensors", tiny_modules(model, random=True, seed=5))


@pytest.mark.parametrize("path", WORKFLOWS, ids=lambda p: p.name)
def test_workflow_runs_and_saves_named_layers(path, comfyui, tiny_weights):
    import nodes

    workflow = json.loads(Path(path).read_text(encoding="utf-8"))
    types = {n["type"] for n in workflow["nodes"]}
    assert types <= set(nodes.NODE_CLASS_MAPPINGS), types - set(nodes.NODE_CLASS_MAPPINGS)
    api = for_tiny_models(comfy_host.ui_to_api(workflow), tiny_weights)
    encoder = next(n["inputs"] for n in api.values() if n["class_type"] == "LayerDiffPromptEncode")
    foregrounds = [line for line in encoder["foreground_prompts"].splitlines() if line.strip()]
    run = comfy_host.run_prompt(api)

    files = [p for p in run.files() if p.suffix == ".png"]
    composites = [p for p in files if p.name.endswith("_composite.png")]
    layers = [p for p in files if "_layer" in p.name]
    assert len(composites) == 1 and len(layers) == len(foregrounds)
    from PIL import Image
    with Image.open(layers[0]) as im:
        assert im.mode == "RGBA" and im.size == (64, 48)
    psd = composites[0].with_name(composites[0].name.replace("_composite.png", ".psd"))
    assert psd.is_file()
    psd_tools = pytest.importorskip("psd_tools")
    doc = psd_tools.PSDImage.open(psd)
    assert [layer.name for layer in doc] == [encoder["background_prompt"]] + foregrounds[::-1]  # bottom first
    assert doc.size == (64, 48)
