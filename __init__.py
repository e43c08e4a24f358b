"""ComfyUI-LayerDiff: text-guided multi-layered composable image synthesis (LayerDiff, arXiv 2403.11929).

Importing registers nodes and the models/layerdiff folder only; no model is loaded and nothing is downloaded.
Imported outside ComfyUI (test collectors, tools) it registers nothing.
"""
import importlib.util

if importlib.util.find_spec("comfy") is not None:
    from .nodes import NODE_CLASS_MAPPINGS, NODE_DISPLAY_NAME_MAPPINGS
else:  # not running inside ComfyUI
    NODE_CLASS_MAPPINGS, NODE_DISPLAY_NAME_MAPPINGS = {}, {}

__all__ = ["NODE_CLASS_MAPPINGS", "NODE_DISPLAY_NAME_MAPPINGS"]
