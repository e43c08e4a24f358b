"""Regenerate the shipped UI-format workflows in workflows/ from a compact description.

The widget order and the input/output types are read from the live node classes (ours and ComfyUI's), so the
files always match the nodes. Run from the repo root: ``python scripts/make_workflows.py`` (needs ComfyUI at
COMFYUI_PATH or .cache/comfyui, as set up by scripts/setup_comfyui.sh).
"""
from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path

# the repository root, for comfy_headless, layerdiff_toy and scripts (the one sys.path line; README "Code map")
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from comfy_headless import boot as headless  # noqa: E402

REPO = str(headless.REPO_ROOT)
SEED_WIDGETS = ("seed", "noise_seed")


def _boot(comfy_root: str) -> dict:
    """Boot ComfyUI headless (it loads this repository as its custom node); ComfyUI's and our node classes."""
    headless.boot(comfy_root=comfy_root)
    import nodes

    return dict(nodes.NODE_CLASS_MAPPINGS)


def _inputs(cls) -> list[tuple[str, object, dict]]:
    spec = cls.INPUT_TYPES()
    out = []
    for section in ("required", "optional"):
        for name, value in spec.get(section, {}).items():
            out.append((name, value[0], value[1] if len(value) > 1 else {}))
    return out


def _is_widget(kind) -> bool:
    return isinstance(kind, (list, tuple)) or kind in ("INT", "FLOAT", "STRING", "BOOLEAN")


def build(spec: dict, mappings: dict) -> dict:
    """spec: {"nodes": {id: (type, {input: value | [src_id, src_slot]}, (x, y))}}"""
    nodes, links = [], []
    outputs = {}  # (node id, slot) -> list of link ids
    for order, (nid, (ntype, values, pos)) in enumerate(spec["nodes"].items()):
        if ntype == "Note":  # a frontend-only node: its text is its one widget
            nodes.append({"id": nid, "type": "Note", "pos": list(pos), "size": [420, 200], "flags": {},
                          "order": order, "mode": 0, "inputs": [], "outputs": [], "properties": {},
                          "widgets_values": [values["text"]], "color": "#432", "bgcolor": "#653"})
            continue
        cls = mappings[ntype]
        inputs, widgets = [], []
        for name, kind, _opts in _inputs(cls):
            if _opts.get("forceInput"):  # a socket only, never a widget
                kind = "*"
            value = values.get(name)
            linked = isinstance(value, list)
            if linked:
                link_id = len(links) + 1
                src, slot = value
                src_cls = mappings[spec["nodes"][src][0]]
                ltype = src_cls.RETURN_TYPES[slot]
                links.append([link_id, src, slot, nid, len(inputs), ltype])
                outputs.setdefault((src, slot), []).append(link_id)
                entry = {"name": name, "type": ltype if not _is_widget(kind) else kind, "link": link_id}
                if _is_widget(kind):
                    entry["type"] = kind if isinstance(kind, str) else "COMBO"
                    entry["widget"] = {"name": name}
                inputs.append(entry)
            if _is_widget(kind):
                if value is None or linked:
                    value = values.get(f"{name}__value", _opts.get("default", kind[0] if isinstance(kind, (list, tuple)) else None))
                widgets.append(value)
                if name in SEED_WIDGETS:
                    widgets.append("fixed")
        nodes.append({"id": nid, "type": ntype, "pos": list(pos), "size": [320, 120], "flags": {}, "order": order,
                      "mode": 0, "inputs": inputs, "outputs": [], "properties": {"Node name for S&R": ntype},
                      "widgets_values": widgets, "_cls": cls})
    for node in nodes:
        if node["type"] == "Note":
            continue
        cls = node.pop("_cls")
        names = getattr(cls, "RETURN_NAMES", None) or cls.RETURN_TYPES
        node["outputs"] = [{"name": names[i], "type": t, "links": outputs.get((node["id"], i), []), "slot_index": i}
                           for i, t in enumerate(cls.RETURN_TYPES)]
    return {"last_node_id": max(spec["nodes"]), "last_link_id": len(links), "nodes": nodes, "links": links,
            "groups": [], "config": {}, "extra": {"layerdiff": spec["about"]}, "version": 0.4}


def text_to_layers(foregrounds: list[str], global_prompt: str, background: str, about: str) -> dict:
    nodes = _model_and_prompts(global_prompt, background, foregrounds)
    nodes.update({
        6: ("LayerDiffEmptyLatent", {"width": 512, "height": 512, "foregrounds": [4, 2],
                                     "foregrounds__value": len(foregrounds), "batch_size": 1}, (450, 550)),
        7: ("LayerDiffSMGSampler", {"model": [3, 0], "seed": 42, "steps": 25, "cfg": 7.0, "sampler_name": "dpmpp_2m",
                                    "scheduler": "karras", "positive": [5, 0], "negative": [5, 1],
                                    "latent_image": [6, 0]}, (800, 0)),
        8: ("VAEDecode", {"samples": [7, 0], "vae": [1, 2]}, (1150, 0)),
        9: ("LayerDiffSplitLayers", {"images": [8, 0], "samples": [7, 0]}, (1150, 150)),
        10: ("LayerDiffComposeLayers", {"layers": [9, 0]}, (1500, 0)),
        11: ("PreviewImage", {"images": [10, 0]}, (1850, 0)),
        12: ("PreviewImage", {"images": [9, 4]}, (1500, 300)),
        13: ("LayerDiffSaveLayers", {"layers": [9, 0], "filename_prefix": "LayerDiff/layers", "layered_file": "psd"},
             (1850, 350)),
    })
    return {"about": about, "nodes": nodes}


TOY_NOTE = ("With the bundled toy shapes model (bash scripts/generate.sh assembles it into .cache/toy_shapes; copy "
            "layerdiff_toy_shapes_sd15.safetensors to models/checkpoints and layerdiff_toy_shapes.safetensors to "
            "models/layerdiff; it loads only where layerdiff_toy.toy_model.register_toy_sd15() ran, as in the "
            "scripts and tests): 64x64 images, 16 steps, CFG 5, euler / normal, SMG scale 0, and prompts in its "
            "vocabulary only: 'a plain green background', 'a blue striped background', 'a red circle', "
            "'a yellow square' (8 colours, circle/square/triangle/ring, plain/striped/checkered/dotted).")


def _model_and_prompts(global_prompt: str, background: str, foregrounds: list[str], y: int = 0) -> dict:
    """Checkpoint, LayerDiff weights and patch (ids 1-3), layered prompts (4) and enhancer (5)."""
    return {
        1: ("CheckpointLoaderSimple", {"ckpt_name": "v1-5-pruned-emaonly.safetensors"}, (0, y)),
        2: ("LayerDiffLoadWeights", {"weights_name": "layerdiff_sd15.safetensors"}, (0, y + 200)),
        3: ("LayerDiffApply", {"model": [1, 0], "layerdiff": [2, 0]}, (380, y)),
        4: ("LayerDiffPromptEncode", {"clip": [1, 1], "global_prompt": global_prompt, "background_prompt": background,
                                      "foreground_prompts": "\n".join(foregrounds),
                                      "negative_prompt": "blurry, low quality, deformed", "layer_negative_prompt": ""},
            (0, y + 350)),
        5: ("LayerDiffEnhancePrompts", {"layerdiff": [2, 0], "positive": [4, 0], "negative": [4, 1]}, (450, y + 350)),
    }


def _sample_and_save(model, positive, negative, latent, denoise: float, prefix: str, x: int = 800) -> dict:
    """SMG KSampler (20) -> VAE Decode (21) -> Split Layers (22) -> preview (23) + Save Layers (24)."""
    return {
        20: ("LayerDiffSMGSampler", {"model": model, "seed": 7, "steps": 25, "cfg": 7.0, "sampler_name": "dpmpp_2m",
                                     "scheduler": "karras", "positive": positive, "negative": negative,
                                     "latent_image": latent, "denoise": denoise}, (x, 0)),
        21: ("VAEDecode", {"samples": [20, 0], "vae": [1, 2]}, (x + 350, 0)),
        22: ("LayerDiffSplitLayers", {"images": [21, 0], "samples": [20, 0]}, (x + 350, 150)),
        23: ("PreviewImage", {"images": [22, 4]}, (x + 700, 300)),
        24: ("LayerDiffSaveLayers", {"layers": [22, 0], "filename_prefix": prefix, "layered_file": "psd"},
             (x + 700, 0)),
    }


def regenerate_layer(restyle: bool) -> dict:
    """Load a layered file -> Encode Layers -> Regenerate Layers (layer 2) -> sample -> save."""
    about = ("Restyle layer 2 of a layered PSD/ORA at denoise 0.5 (its mask kept, a style added to its prompt); every "
             "other layer stays as it is in the file." if restyle else
             "Regenerate layer 2 of a layered PSD/ORA (put it in ComfyUI/input) from a new seed and a new prompt for "
             "it; the background and layer 1 keep their pixels exactly.")
    nodes = _model_and_prompts("a cat sitting next to a blue ball in a bright living room", "a bright living room",
                               ["a cat", "a blue ball, watercolor style" if restyle else "a blue ball"], y=400)
    nodes.update({
        10: ("LayerDiffLoadLayeredFile", {"file": "layers.psd"}, (0, 0)),
        11: ("LayerDiffEncodeLayers", {"vae": [1, 2], "background": [10, 0], "foregrounds": [10, 1],
                                       "masks": [10, 2]}, (380, 150)),
        12: ("LayerDiffRegenerateLayers", {"samples": [11, 0], "layers": "2", "keep_masks": restyle}, (450, 600)),
        30: ("Note", {"text": about + " Layer numbers count from the top (1 = top layer). " + TOY_NOTE}, (800, 500)),
    })
    nodes.update(_sample_and_save([3, 0], [5, 0], [5, 1], [12, 0], 0.5 if restyle else 1.0,
                                  "LayerDiff/restyled" if restyle else "LayerDiff/regenerated"))
    return {"about": about, "nodes": nodes}


def layers_from_images() -> dict:
    """Load Image (background) + Load Image (an RGBA foreground) -> Encode Layers -> regenerate the background."""
    about = ("Bring your own layers: a background picture and a transparent PNG foreground (Load Image's mask is 1 "
             "where the PNG is transparent, hence Invert Mask) are encoded as layers; the background is redrawn to "
             "fit the foreground, which keeps its pixels.")
    nodes = _model_and_prompts("a red apple on a wooden table", "a wooden table", ["a red apple"], y=400)
    nodes.update({
        10: ("LoadImage", {"image": "background.png"}, (0, 0)),
        13: ("LoadImage", {"image": "foreground.png"}, (0, 150)),
        14: ("InvertMask", {"mask": [13, 1]}, (300, 150)),
        11: ("LayerDiffEncodeLayers", {"vae": [1, 2], "background": [10, 0], "foregrounds": [13, 0],
                                       "masks": [14, 0]}, (380, 0)),
        12: ("LayerDiffRegenerateLayers", {"samples": [11, 0], "layers": "background", "keep_masks": False},
             (450, 600)),
        30: ("Note", {"text": about + " " + TOY_NOTE}, (800, 500)),
    })
    nodes.update(_sample_and_save([3, 0], [5, 0], [5, 1], [12, 0], 1.0, "LayerDiff/own_layers"))
    return {"about": about, "nodes": nodes}


def controlnet_on_layers() -> dict:
    """Text to layers with one ControlNet on layer 1 (a pose) and another on the background (a depth map)."""
    about = ("A ControlNet on chosen layers only: an openpose image guides layer 1, a depth map the background; "
             "layer 2 gets no control. Chain more, each with its own layers.")
    nodes = _model_and_prompts("a dancer in front of a tree in a park", "a park", ["a dancer", "a tree"])
    nodes.update({
        6: ("LayerDiffEmptyLatent", {"width": 512, "height": 512, "foregrounds": [4, 2], "foregrounds__value": 2,
                                     "batch_size": 1}, (450, 550)),
        10: ("ControlNetLoader", {"control_net_name": "control_v11p_sd15_openpose.pth"}, (0, 700)),
        11: ("LoadImage", {"image": "pose.png"}, (0, 850)),
        12: ("LayerDiffLayerControlNet", {"positive": [5, 0], "negative": [5, 1], "control_net": [10, 0],
                                          "image": [11, 0], "layers": "1", "strength": 1.0}, (450, 750)),
        13: ("ControlNetLoader", {"control_net_name": "control_v11f1p_sd15_depth.pth"}, (0, 1000)),
        14: ("LoadImage", {"image": "depth.png"}, (0, 1150)),
        15: ("LayerDiffLayerControlNet", {"positive": [12, 0], "negative": [12, 1], "control_net": [13, 0],
                                          "image": [14, 0], "layers": "background", "strength": 0.8}, (450, 1000)),
        30: ("Note", {"text": about + " " + TOY_NOTE}, (800, 500)),
    })
    nodes.update(_sample_and_save([3, 0], [15, 0], [15, 1], [6, 0], 1.0, "LayerDiff/controlled"))
    return {"about": about, "nodes": nodes}


def decompose_picture() -> dict:
    """Load Image -> Picture to Layered Latent + Composite Guidance -> sample at denoise 0.8 -> save the layers."""
    about = ("Decompose a flat picture into a background, foreground layers and masks whose composite reproduces it: "
             "describe the scene and each layer; the picture is encoded into the layer slots and the composite "
             "of the layers being drawn is pulled toward it at every step. Measured on the toy shapes set: "
             "docs/SHAPES_BENCHMARK.md (Decomposition).")
    nodes = _model_and_prompts("a red apple on a wooden table", "a wooden table", ["a red apple"], y=400)
    nodes.update({
        10: ("LoadImage", {"image": "picture.png"}, (0, 0)),
        11: ("LayerDiffPictureToLatent", {"vae": [1, 2], "image": [10, 0], "foregrounds": [4, 2],
                                          "foregrounds__value": 1, "foreground_start": "picture",
                                          "layer_names": [4, 3]}, (380, 150)),
        12: ("LayerDiffCompositeGuidance", {"model": [3, 0], "picture_latent": [11, 0], "strength": 1.0,
                                            "start_percent": 0.0}, (450, 600)),
        30: ("Note", {"text": about + " " + TOY_NOTE}, (800, 500)),
    })
    nodes.update(_sample_and_save([12, 0], [5, 0], [5, 1], [11, 0], 0.8, "LayerDiff/decomposed"))
    return {"about": about, "nodes": nodes}


WORKFLOWS = {
    "edit_regenerate_layer.json": regenerate_layer(restyle=False),
    "edit_restyle_layer.json": regenerate_layer(restyle=True),
    "layers_from_images.json": layers_from_images(),
    "controlnet_on_layers.json": controlnet_on_layers(),
    "decompose_picture.json": decompose_picture(),
    "text_to_2_layers.json": text_to_layers(
        ["a red apple"], "a red apple on a wooden table", "a wooden table",
        "Text to a background + 1 foreground layer + its mask (2 layers). Needs an SD1.5 checkpoint and LayerDiff "
        "weights in models/layerdiff."),
    "text_to_3_layers.json": text_to_layers(
        ["a cat", "a potted plant"], "a cat sitting in front of a potted plant in a bright living room",
        "a bright living room",
        "Text to a background + 2 foreground layers + masks (3 layers). Needs an SD1.5 checkpoint and LayerDiff "
        "weights in models/layerdiff."),
}


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--comfyui", default=os.environ.get("COMFYUI_PATH", os.path.join(REPO, ".cache", "comfyui")),
                        help="ComfyUI root (default: $COMFYUI_PATH or .cache/comfyui)")
    parser.add_argument("--out", default=os.path.join(REPO, "workflows"), help="output folder")
    args = parser.parse_args(argv)
    mappings = _boot(args.comfyui)
    os.makedirs(args.out, exist_ok=True)
    for name, spec in WORKFLOWS.items():
        with open(os.path.join(args.out, name), "w", encoding="utf-8") as fh:
            json.dump(build(spec, mappings), fh, indent=2)
            fh.write("\n")
        print(os.path.join(args.out, name))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
