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
        cls = mappings[ntype]
        inputs, widgets = [], []
        for name, kind, _opts in _inputs(cls):
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
        cls = node.pop("_cls")
        names = getattr(cls, "RETURN_NAMES", None) or cls.RETURN_TYPES
        node["outputs"] = [{"name": names[i], "type": t, "links": outputs.get((node["id"], i), []), "slot_index": i}
                           for i, t in enumerate(cls.RETURN_TYPES)]
    return {"last_node_id": max(spec["nodes"]), "last_link_id": len(links), "nodes": nodes, "links": links,
            "groups": [], "config": {}, "extra": {"layerdiff": spec["about"]}, "version": 0.4}


def text_to_layers(foregrounds: list[str], global_prompt: str, background: str, about: str) -> dict:
    return {"about": about, "nodes": {
        1: ("CheckpointLoaderSimple", {"ckpt_name": "v1-5-pruned-emaonly.safetensors"}, (0, 0)),
        2: ("LayerDiffLoadWeights", {"weights_name": "layerdiff_sd15.safetensors"}, (0, 200)),
        3: ("LayerDiffApply", {"model": [1, 0], "layerdiff": [2, 0]}, (380, 0)),
        4: ("LayerDiffPromptEncode", {"clip": [1, 1], "global_prompt": global_prompt, "background_prompt": background,
                                      "foreground_prompts": "\n".join(foregrounds),
                                      "negative_prompt": "blurry, low quality, deformed", "layer_negative_prompt": ""},
            (0, 350)),
        5: ("LayerDiffEnhancePrompts", {"layerdiff": [2, 0], "positive": [4, 0], "negative": [4, 1]}, (450, 350)),
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
    }}


WORKFLOWS = {
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
