"""Every shipped workflow parses, uses only registered nodes, and runs headlessly through ComfyUI's executor
(tiny SD1.5 checkpoint, tiny LayerDiff weights and a tiny ControlNet standing in for the real files; the input
pictures and the layered file are written into the input folder by the test)."""
import json
import re
from pathlib import Path

import numpy as np
import pytest

import comfy_host
from comfy_headless.prompts import UI_ONLY_TYPES
from layerdiff_host import for_tiny_models, package_module, save_tiny_weights, tiny_model, tiny_modules

EDITING = {"edit_regenerate_layer.json", "edit_restyle_layer.json", "layers_from_images.json",
           "controlnet_on_layers.json", "decompose_picture.json"}
W, H = 64, 48

WORKFLOWS = sorted((comfy_host.REPO_ROOT / "workflows").glob("*.json"))


def test_workflows_are_shipped():
    names = {p.name for p in WORKFLOWS}
    assert {"text_to_2_layers.json", "text_to_3_layers.json"} | EDITING <= names
    for path in WORKFLOWS:  # each says what it does and how to run it on the toy model
        notes = [n for n in json.loads(path.read_text())["nodes"] if n["type"] == "Note"]
        assert path.name not in EDITING or (len(notes) == 1 and "toy" in notes[0]["widgets_values"][0]), path.name


def _rgba(seed: int, alpha: bool) -> np.ndarray:
    g = np.random.default_rng(seed)
    image = g.integers(0, 256, (H, W, 4 if alpha else 3), dtype=np.uint8)
    if alpha:
        image[..., 3] = 0
        image[8:40, 10:40, 3] = 255
    return image


@pytest.fixture(scope="module")
def input_files(comfyui) -> dict:
    """The pictures and the layered file the editing workflows load, in ComfyUI's input folder."""
    import folder_paths
    from PIL import Image

    files = package_module("layerdiff_model.layers.layered_files")
    folder = Path(folder_paths.get_input_directory())
    folder.mkdir(parents=True, exist_ok=True)
    written = {}
    for name, seed, alpha in (("background.png", 1, False), ("foreground.png", 2, True), ("pose.png", 3, False),
                              ("depth.png", 4, False), ("picture.png", 5, False)):
        written[name] = _rgba(seed, alpha)
        Image.fromarray(written[name]).save(folder / name)
    layers = [("a cat", _rgba(6, True)), ("a ball", _rgba(7, True))]
    background = _rgba(8, False)
    files.write_psd(folder / "layers.psd", layers, ("a bright living room", background), background)
    written["layers.psd"] = files.read_psd(folder / "layers.psd")
    return written


@pytest.fixture(scope="module")
def tiny_weights(comfyui):
    model, _, _ = tiny_model()
    return save_tiny_weights("tiny_layerdiff.safetensors", tiny_modules(model, random=True, seed=5))


@pytest.mark.parametrize("path", WORKFLOWS, ids=lambda p: p.name)
def test_workflow_runs_and_saves_named_layers(path, comfyui, tiny_weights, input_files):
    import nodes

    workflow = json.loads(Path(path).read_text(encoding="utf-8"))
    types = {n["type"] for n in workflow["nodes"]} - UI_ONLY_TYPES
    assert types <= set(nodes.NODE_CLASS_MAPPINGS), types - set(nodes.NODE_CLASS_MAPPINGS)
    api = for_tiny_models(comfy_host.ui_to_api(workflow), tiny_weights)
    encoder = next(n["inputs"] for n in api.values() if n["class_type"] == "LayerDiffPromptEncode")
    foregrounds = [line for line in encoder["foreground_prompts"].splitlines() if line.strip()]
    run = comfy_host.run_prompt(api)

    files = [p for p in run.files() if p.suffix == ".png"]
    composites = [p for p in files if p.name.endswith("_composite.png")]
    layers = [p for p in files if re.search(r"_layer\d+\.png$", p.name)]
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
    saved = package_module("layerdiff_model.layers.layered_files").read_psd(psd)  # top first, RGBA on the canvas
    if path.name == "edit_regenerate_layer.json":  # layer 2 redrawn; layer 1 and the background as in the file
        source = input_files["layers.psd"]
        assert np.array_equal(saved[0][1], source[0][1]) and np.array_equal(saved[-1][1], source[-1][1])
        assert not np.array_equal(saved[1][1], source[1][1])
    if path.name == "edit_restyle_layer.json":  # the mask (alpha) of layer 2 kept too
        source = input_files["layers.psd"]
        assert np.array_equal(saved[1][1][..., 3], source[1][1][..., 3])
        assert not np.array_equal(saved[1][1][..., :3], source[1][1][..., :3])
    if path.name == "layers_from_images.json":  # the foreground PNG kept exactly, the background redrawn
        assert np.array_equal(saved[0][1], input_files["foreground.png"])
        assert not np.array_equal(saved[-1][1][..., :3], input_files["background.png"])
