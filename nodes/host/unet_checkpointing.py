"""Gradient checkpointing through ComfyUI's UNet, LayerDiff patches included (training only).

ComfyUI's ``forward_timestep_embed`` calls every ResBlock and SpatialTransformer of the UNet directly, so each such
layer's ``forward`` is replaced (on the instance, reversibly) by a non-reentrant ``torch.utils.checkpoint`` of the
original. The UNet mutates its ``transformer_options`` while it runs (``block``, ``block_index``), and the LayerDiff
patches read the block identity from them: the wrapper hands the recomputation a snapshot of the options as they
were in the forward pass, so the recomputed block runs exactly the same patches. Without autograd (sampling,
validation) the original forward runs.

Hosts whose transformer blocks add residuals in place (2024 ComfyUI: ``x += n`` on tensors that the block's own
layers saved for backward) cannot recompute a transformer block exactly (the recomputed saved tensors are mutated
before backward reads them, and ``allow_mutation_on_saved_tensors`` does not reach into a recomputation). There the
SpatialTransformers run normally and the LayerDiff blocks inside them are checkpointed instead.
"""
from __future__ import annotations

import torch
import torch.utils.checkpoint
from comfy.ldm.modules.attention import SpatialTransformer
from comfy.ldm.modules.diffusionmodules.openaimodel import ResBlock

from .compat import transformer_blocks_mutate_in_place

_MARK = "_layerdiff_checkpointed_forward"


def _wrap(original):
    def forward(*args, **kwargs):
        if not torch.is_grad_enabled():
            return original(*args, **kwargs)
        if "transformer_options" in kwargs:
            kwargs["transformer_options"] = dict(kwargs["transformer_options"])
        args = tuple(dict(a) if isinstance(a, dict) else a for a in args)
        return torch.utils.checkpoint.checkpoint(original, *args, use_reentrant=False, **kwargs)

    return forward


def _checkpoint(layer: torch.nn.Module) -> bool:
    if hasattr(layer, _MARK):
        return False
    setattr(layer, _MARK, True)
    layer.forward = _wrap(layer.forward)
    return True


def enable(unet: torch.nn.Module, layer_blocks: torch.nn.Module | None = None) -> int:
    """Checkpoint the ResBlocks and SpatialTransformers of ``unet`` (or, on in-place hosts, the ResBlocks and the
    LayerDiff blocks in ``layer_blocks``); returns how many layers were wrapped."""
    in_place = transformer_blocks_mutate_in_place()
    kinds = (ResBlock,) if in_place else (ResBlock, SpatialTransformer)
    count = sum(_checkpoint(layer) for layer in unet.modules() if isinstance(layer, kinds))
    if in_place and layer_blocks is not None:
        count += sum(_checkpoint(block) for block in layer_blocks.values())
    return count


def disable(*roots: torch.nn.Module) -> int:
    count = 0
    for root in roots:
        for layer in root.modules():
            if hasattr(layer, _MARK):
                del layer.forward
                delattr(layer, _MARK)
                count += 1
    return count
