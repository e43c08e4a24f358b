"""A standard ComfyUI ControlNet on chosen layers only (docs/DESIGN.md 2.9).

ComfyUI adds a ControlNet's residuals to every row of the UNet batch. On a layered batch a row is a slot (row r of
a chunk is slot r % S), so one ``ControlBase`` wrapper multiplies its ControlNet's residuals by a per-row 0/1 mask:
the chosen layers' slot rows get the control, every other row gets exact zeros. Positive and negative share the
wrapper, as they share the core node's ControlNet, so ComfyUI still batches them together; wrappers chain through
``previous_controlnet`` like core ControlNets, each on its own layers.
"""
from __future__ import annotations

import torch

import comfy.controlnet

from ...layerdiff_model.errors import ModelFamilyError
from ...layerdiff_model.layer_selection import parse_layer_selection, slots_of_layers
from ...layerdiff_model.slots import num_slots
from . import compat, inference

CONTROL_KEYS = ("input", "middle", "output")


class SlotMaskedControl(comfy.controlnet.ControlBase):
    """``inner`` (a ControlNet with its hint set and no previous ControlNet) acting on the rows of ``slots`` only."""

    def __init__(self, inner, slots: list[int], slots_per_sample: int):
        super().__init__()
        self.inner, self.slots, self.slots_per_sample = inner, list(slots), slots_per_sample
        self.extra_hooks = getattr(inner, "extra_hooks", None)  # 0.3.x reads it along the previous_controlnet chain

    def _row_mask(self, rows: int, device) -> torch.Tensor:
        """Bool [rows, 1, 1, 1]: True on the chosen slots' rows (row r is slot r % S)."""
        slot = torch.arange(rows, device=device) % self.slots_per_sample
        chosen = torch.zeros(self.slots_per_sample, dtype=torch.bool, device=device)
        chosen[self.slots] = True
        return chosen[slot][:, None, None, None]

    def get_control(self, x_noisy, t, cond, batched_number, *args, **kwargs):
        own = self.inner.get_control(x_noisy, t, cond, batched_number, *args, **kwargs)
        prev = None
        if self.previous_controlnet is not None:
            prev = self.previous_controlnet.get_control(x_noisy, t, cond, batched_number, *args, **kwargs)
        if own is None:
            return prev
        rows = self._row_mask(x_noisy.shape[0], x_noisy.device)  # every residual has the batch's rows
        masked = {key: [None if x is None else x * rows.to(x.device, x.dtype) for x in own.get(key, [])]
                  for key in CONTROL_KEYS}
        return masked if prev is None else _merge(masked, prev)

    def pre_run(self, model, percent_to_timestep_function):
        super().pre_run(model, percent_to_timestep_function)
        self.inner.pre_run(model, percent_to_timestep_function)

    def cleanup(self):
        self.inner.cleanup()
        super().cleanup()

    def get_models(self):
        return super().get_models() + self.inner.get_models()

    def inference_memory_requirements(self, dtype):
        return super().inference_memory_requirements(dtype) + self.inner.inference_memory_requirements(dtype)

    def copy(self):
        return SlotMaskedControl(self.inner.copy(), self.slots, self.slots_per_sample)


def _merge(a: dict, b: dict) -> dict:
    """Residual lists summed position by position (None = nothing there), as ComfyUI merges chained ControlNets."""
    out = {}
    for key in CONTROL_KEYS:
        xs, ys = list(a.get(key, [])), list(b.get(key, []))
        merged = []
        for i in range(max(len(xs), len(ys))):
            x = xs[i] if i < len(xs) else None
            y = ys[i] if i < len(ys) else None
            merged.append(y if x is None else x if y is None else x + y)
        out[key] = merged
    return out


def _cross_attention_width(control_model) -> int | None:
    for name, module in control_model.named_modules():
        if name.endswith("attn2.to_k") and isinstance(module, torch.nn.Linear):
            return int(module.in_features)
    return None


def apply_to_layers(positive, negative, control_net, image, strength: float, layers: str, start_percent: float,
                    end_percent: float, node: str, vae=None) -> tuple[list, list]:
    """(positive, negative) with ``control_net`` acting on the chosen ``layers`` (their image and mask slots)."""
    n = inference.layers_of(positive, node, "positive").num_foregrounds
    inference.layers_of(negative, node, "negative")
    chosen = parse_layer_selection(layers, n, node, source="the conditioning")
    slots = slots_of_layers(chosen, n)
    model = getattr(control_net, "control_model", None)
    width, context = (_cross_attention_width(model) if model is not None else None), positive[0][0].shape[-1]
    if width is not None and width != context:
        raise ModelFamilyError(f"{node}: this ControlNet reads text features of width {width} but the conditioning "
                               f"has {context} (SD1.5: 768); load a ControlNet made for SD1.5 models.")
    hint = image.movedim(-1, 1)  # [B, 3, H, W]
    if hint.shape[0] > 1:  # one control image per layered sample: give it to every slot row of its sample
        hint = hint.repeat_interleave(num_slots(n), dim=0)
    wrappers: dict = {}
    out = []
    for conditioning in (positive, negative):
        entries = []
        for embedding, options in conditioning:
            options = dict(options)
            prev = options.get("control")
            if prev not in wrappers:
                inner = compat.set_control_hint(control_net.copy(), hint, strength, (start_percent, end_percent), vae)
                wrapper = SlotMaskedControl(inner, slots, num_slots(n))
                wrapper.set_previous_controlnet(prev)
                wrappers[prev] = wrapper
            options["control"] = wrappers[prev]
            options["control_apply_to_uncond"] = False
            entries.append([embedding, options])
        out.append(entries)
    return out[0], out[1]
