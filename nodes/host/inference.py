"""Host adapter: the one module that installs LayerDiff on a ComfyUI ModelPatcher, hooks the sampler and loads
weights files. Nodes call it; the training script calls it too, so what is trained is exactly what runs.

How the patch rides on ComfyUI (docs/DESIGN.md 4):
- layer prompts travel inside the conditioning as two model conds, ``layerdiff_context`` ([S, T, d + 1] context
  rows, the last channel the token validity of padded prompts) and ``layerdiff_slots`` ([S, 2] slot index and
  foreground count); ComfyUI tiles both to the batch as ``r % S``, batches them with cond/uncond, repeats token
  lengths to a common multiple, and hands them to ``apply_model`` as keyword arguments;
- an object patch on ``apply_model`` moves them into a per-call ``transformer_options`` entry (never global
  state), checks the rows are whole samples, and afterwards that every site fired;
- per transformer block, a ``middle_patch`` stashes the residual stream ``x`` in that block's ``extra_options``
  and an ``attn2_output_patch`` returns ``n + block(x + n)``.
All three are added to a clone; the input model is never touched.
"""
from __future__ import annotations

import contextlib
import copy
import functools
import logging
from dataclasses import dataclass, field

import torch

import comfy.conds
import comfy.samplers
import comfy.ops
import comfy.supported_models
from comfy.ldm.modules.attention import SpatialTransformer

from ...layerdiff_model.sampling.conditioning import (LayerPrompts, distinct_rows, slot_context_rows,
                                                       split_token_validity)
from ...layerdiff_model.modules.config import SD15_CONTEXT_DIM, LayerDiffConfig, Site
from ...layerdiff_model.errors import LayerDiffError, LayoutError, ModelFamilyError, WeightsFileError
from ...layerdiff_model.modules.container import LayerDiffModules
from ...layerdiff_model.sampling.prompt_kv_cache import PromptKVCache
from ...layerdiff_model.slots import roles_for_rows, rows_layout, slot_info_table
from ...layerdiff_model.sampling import smg
from . import compat

LOG = logging.getLogger("LayerDiff")

CONTEXT_COND = "layerdiff_context"
SLOTS_COND = "layerdiff_slots"
LAYERS_KEY = "layerdiff_layers"
PATCH_KEY = "layerdiff_patch"
RUN_KEY = "layerdiff_run"
STASH_KEY = "layerdiff_x"
CONTEXT_WINDOW_KEY = "context_window"  # set by ComfyUI 0.3.x's context-window handler while it runs a window
WEIGHTS_FOLDER = "layerdiff"


# ----------------------------------------------------------------------------------------------- model checks
def unet_of(model):
    return model.model.diffusion_model


def unet_sites(model) -> list[Site]:
    """Every transformer block of the loaded UNet as a :class:`Site`, in ComfyUI's block numbering."""
    unet = unet_of(model)
    groups = (("input", unet.input_blocks), ("middle", [unet.middle_block]), ("output", unet.output_blocks))
    sites = []
    for block_name, blocks in groups:
        for block_id, block in enumerate(blocks):
            for layer in block:
                if isinstance(layer, SpatialTransformer):
                    for index, tb in enumerate(layer.transformer_blocks):
                        sites.append(Site(block_name, block_id, index, int(tb.norm1.normalized_shape[0]),
                                          int(tb.n_heads)))
    return sites


def unet_context_dim(model) -> int:
    for layer in unet_of(model).modules():
        if isinstance(layer, SpatialTransformer):
            return int(layer.transformer_blocks[0].attn2.to_k.in_features)
    return -1


def check_sd15(model, node: str) -> None:
    """Raise ModelFamilyError unless ``model`` is an SD1.5-family UNet."""
    config = getattr(model.model, "model_config", None)
    family = type(config).__name__ if config is not None else type(model.model).__name__
    if not isinstance(config, comfy.supported_models.SD15) or unet_context_dim(model) != SD15_CONTEXT_DIM:
        raise ModelFamilyError(
            f"{node}: the model is {family}, but LayerDiff works with SD1.5-family checkpoints only (SD1.5 and its "
            "fine-tunes, merges and LoRAs). Load an SD1.5 checkpoint with Load Checkpoint and connect that MODEL."
        )


def config_for_model(model, **overrides) -> LayerDiffConfig:
    """A LayerDiffConfig whose sites and widths are read from the loaded UNet."""
    return LayerDiffConfig(sites=tuple(unet_sites(model)), context_dim=unet_context_dim(model), **overrides)


def check_weights_fit(modules: LayerDiffModules, model, node: str) -> None:
    config = modules.config
    found = {s.key: s for s in unet_sites(model)}
    expected = {s.key: s for s in config.sites}
    problems = []
    if set(found) != set(expected):
        problems.append(f"the UNet has {len(found)} transformer blocks, the weights expect {len(expected)}")
    for key, site in expected.items():
        if key in found and (found[key].width, found[key].heads) != (site.width, site.heads):
            problems.append(f"block {key}: weights for width {site.width}, UNet width {found[key].width}")
    if config.context_dim != unet_context_dim(model):
        problems.append(f"text context {config.context_dim} vs UNet {unet_context_dim(model)}")
    if problems:
        which = f"the LayerDiff weights '{modules.source_name}'" if modules.source_name else "these LayerDiff weights"
        raise WeightsFileError(
            f"{node}: {which} were made for another UNet ({'; '.join(problems[:3])}). "
            "Use weights trained for this SD1.5 architecture."
        )


def is_patched(model) -> bool:
    return PATCH_KEY in model.model_options.get("transformer_options", {})


def patch_state(model, node: str) -> "PatchState":
    state = model.model_options.get("transformer_options", {}).get(PATCH_KEY)
    if state is None:
        raise LayerDiffError(
            f"{node}: the MODEL is not LayerDiff-patched. Pass it through 'LayerDiff Apply' (with LayerDiff "
            "weights) before sampling layers."
        )
    return state


# ----------------------------------------------------------------------------------------------- the patch
class PatchState:
    """Shared by the three patch objects of one application: modules, sites and switches. Immutable."""

    def __init__(self, modules: LayerDiffModules, sites: list[Site], inter: bool = True, intra: bool = True):
        self.modules = modules
        self.sites = {s.key: s for s in sites}
        self.inter = inter
        self.intra = intra
        self.prompt_kv = PromptKVCache()

    def ensure_device(self, device: torch.device) -> None:
        param = next(self.modules.parameters())
        if param.device != device:
            self.modules.to(device)
            self.prompt_kv.clear()

    def __deepcopy__(self, memo):  # ModelPatcher.clone() deep-copies model_options; weights are shared
        return self


class _PatchCallable:
    def __init__(self, state: PatchState):
        self.state = state

    def to(self, device_or_dtype):
        """ModelPatcher moves patches with ``.to(device)`` and ``.to(dtype)``. We move devices only: the layers
        are manual-cast and compute in the UNet's dtype. Tolerant during interpreter shutdown."""
        try:
            if isinstance(device_or_dtype, (torch.device, str)):
                self.state.modules.to(device_or_dtype)
                self.state.prompt_kv.clear()
        except Exception:  # noqa: BLE001 - torch may be half torn down at exit
            pass
        return self

    def models(self):
        return []

    def __deepcopy__(self, memo):
        return self


class StashResidual(_PatchCallable):
    """middle_patch: remember the block's residual stream for the attn2 output patch of the same block."""

    def __call__(self, x, extra_options):
        if RUN_KEY not in extra_options:
            raise LayerDiffError(
                "LayerDiff: the UNet ran without LayerDiff's apply_model hook, so the layers cannot be told apart. "
                "A node applied after 'LayerDiff Apply' replaced the model's apply_model; apply LayerDiff last."
            )
        extra_options[STASH_KEY] = x
        return x


class InjectLayerAttention(_PatchCallable):
    """attn2_output_patch: ``n -> n + layer_block(x + n)``."""

    def __call__(self, n, extra_options):
        run = extra_options.get(RUN_KEY)
        x = extra_options.pop(STASH_KEY, None)
        block = extra_options.get("block")
        if run is None or x is None or block is None:
            return n
        key = (block[0], block[1], extra_options.get("block_index", 0))
        site = self.state.sites.get(key)
        if site is None:
            return n
        self.state.ensure_device(n.device)
        module = self.state.modules.site_module(site)
        delta = module(x + n, run.roles, run.slots, run.context, inter=self.state.inter, intra=self.state.intra,
                       context_index=run.context_index, kv_store=run.kv_store, token_valid=run.token_valid)
        run.fired.add(key)
        return n + delta


@dataclass
class LayerRun:
    """Per UNet call: row roles [R], slots per sample, the distinct layer context rows [U, T, d], which one
    each row reads [R], their token validity [U, T] (None: no padding), sites that fired."""

    roles: torch.Tensor
    slots: int
    context: torch.Tensor
    context_index: torch.Tensor
    token_valid: torch.Tensor | None = None
    kv_store: dict | None = None
    fired: set = field(default_factory=set)


class LayeredApplyModel(_PatchCallable):
    """Object patch on ``BaseModel.apply_model``: turns the layer model conds into a per-call LayerRun."""

    def __init__(self, state: PatchState, inner):
        super().__init__(state)
        self.inner = inner

    def __call__(self, x, t, *args, transformer_options=None, **kwargs):
        if (transformer_options or {}).get(CONTEXT_WINDOW_KEY) is not None:
            raise LayoutError(
                "LayerDiff: ComfyUI's context windows (e.g. the 'Context Windows (Manual)' node) run the batch in "
                "windows of rows, which cut layered samples apart and shift their slots; LayerDiff generates all "
                "layers of a sample together. Remove the context-window node from this model."
            )
        context = kwargs.pop(CONTEXT_COND, None)
        slot_info = kwargs.pop(SLOTS_COND, None)
        if context is None or slot_info is None:
            raise LayoutError(
                "LayerDiff: the patched model received conditioning without layer prompts (for example a plain "
                "CLIP Text Encode, or a conditioning combined with one). Encode both positive and negative with "
                "'LayerDiff Layer Prompt Encode'."
            )
        _, slots = rows_layout(slot_info)
        if slot_info.shape[0] != x.shape[0] or context.shape[0] != x.shape[0]:
            raise LayoutError(f"LayerDiff: {x.shape[0]} latent rows but {slot_info.shape[0]} layer rows.")
        roles = roles_for_rows(slot_info, self.state.modules.config.max_foregrounds).to(x.device)
        distinct, index = distinct_rows(context)
        tokens, valid = split_token_validity(distinct)
        run = LayerRun(roles=roles, slots=slots, context=tokens, context_index=index.to(x.device),
                       token_valid=valid, kv_store=self.state.prompt_kv.lookup(distinct, x.dtype))
        options = dict(transformer_options or {})
        options[RUN_KEY] = run
        out = self.inner(x, t, *args, transformer_options=options, **kwargs)
        missing = set(self.state.sites) - run.fired
        if missing:
            raise LayerDiffError(
                f"LayerDiff: the layer attention did not run in {len(missing)} of {len(self.state.sites)} UNet "
                f"blocks (e.g. {sorted(missing)[:2]}). Another node replaced the transformer blocks' forward; "
                "apply LayerDiff to a model without that patch."
            )
        return out


def apply_patch(model, modules: LayerDiffModules, node: str, inter: bool = True, intra: bool = True,
                match_model_dtype: bool = True):
    """Return a clone of ``model`` with LayerDiff installed. ``model`` itself is never modified.

    With ``match_model_dtype`` (inference) modules stored in another float dtype than the UNet's weights are
    used as a copy in the UNet's dtype (an fp16 UNet does not carry fp32 LayerDiff weights); training passes
    False and keeps its own parameters.
    """
    check_sd15(model, node)
    check_weights_fit(modules, model, node)
    if is_patched(model):
        raise LayerDiffError(f"{node}: this MODEL already has LayerDiff applied; apply it once per model.")
    if match_model_dtype:
        modules = _in_unet_dtype(modules, model)
    state = PatchState(modules, unet_sites(model), inter=inter, intra=intra)
    patched = model.clone()
    patched.set_model_patch(StashResidual(state), "middle_patch")
    patched.set_model_attn2_output_patch(InjectLayerAttention(state))
    inner = patched.object_patches.get("apply_model")
    if inner is None:
        inner = functools.partial(type(patched.model).apply_model, patched.model)
    patched.add_object_patch("apply_model", LayeredApplyModel(state, inner))
    patched.model_options["transformer_options"][PATCH_KEY] = state
    compat.on_sampling_done(patched, state.prompt_kv.clear)  # no prompt keys/values outlive a run (0.3.x)
    return patched


def _in_unet_dtype(modules: LayerDiffModules, model) -> LayerDiffModules:
    """A copy in the UNet's dtype only when that is narrower (fp32 modules on an fp16 UNet). Narrower modules
    (fp16 weights with an fp32 UNet) are used as they are: the manual-cast layers compute in the UNet's dtype, and
    casting fp16 to fp32 is exact, so an fp32 copy would only cost memory."""
    unet_dtype = next(unet_of(model).parameters()).dtype
    module_dtype = next(modules.parameters()).dtype
    if unet_dtype == module_dtype or not unet_dtype.is_floating_point or \
            torch.finfo(module_dtype).bits <= torch.finfo(unet_dtype).bits:
        return modules
    return copy.deepcopy(modules).to(unet_dtype)


def build_modules(config: LayerDiffConfig, seed: int = 0, zero_outputs: bool = True) -> LayerDiffModules:
    """Fresh modules in ComfyUI's manual-cast ops (compute in the UNet's dtype)."""
    return LayerDiffModules(config, operations=comfy.ops.manual_cast).initialize(seed, zero_outputs=zero_outputs)


# ----------------------------------------------------------------------------------------------- conditioning
def encode_text(clip, text: str):
    tokens = clip.tokenize(text)
    cond, pooled = clip.encode_from_tokens(tokens, return_pooled=True)
    return cond, pooled


def layered_entry(global_cond, extra: dict, layers: LayerPrompts) -> list:
    """One CONDITIONING entry with the layer prompts attached as model conds."""
    rows = slot_context_rows(layers)  # [S, T, d + 1]: the last channel is the token validity
    model_conds = dict(extra.get("model_conds", {}))
    model_conds[CONTEXT_COND] = comfy.conds.CONDCrossAttn(rows)
    model_conds[SLOTS_COND] = comfy.conds.CONDRegular(slot_info_table(layers.num_foregrounds))
    out = dict(extra)
    out[LAYERS_KEY] = layers
    out["model_conds"] = model_conds
    return [global_cond, out]


def encode_layered(clip, global_prompt: str, layer_prompts: list[str], encode=None) -> list:
    """CONDITIONING for a global prompt and [background, fg_1..fg_N] layer prompts.

    ``encode(clip, text) -> (cond, pooled)`` replaces :func:`encode_text` (e.g. a cache in training)."""
    encode = encode or encode_text
    global_cond, pooled = encode(clip, global_prompt)
    embeds = tuple(encode(clip, p)[0] for p in layer_prompts)
    layers = LayerPrompts(prompts=tuple(layer_prompts), embeds=embeds)
    return [layered_entry(global_cond, {"pooled_output": pooled}, layers)]


def layers_of(conditioning, node: str, input_name: str) -> LayerPrompts:
    """The layer prompts of a layered CONDITIONING; every entry must be layered with the same count."""
    if not conditioning:
        raise LayoutError(f"{node}: '{input_name}' is empty; connect 'LayerDiff Layer Prompt Encode'.")
    counts = set()
    for entry in conditioning:
        layers = entry[1].get(LAYERS_KEY)
        if layers is None:
            raise LayoutError(
                f"{node}: '{input_name}' has an entry without layer prompts (e.g. from CLIP Text Encode). Encode it "
                "with 'LayerDiff Layer Prompt Encode' so every layer gets its prompt."
            )
        counts.add(layers.num_foregrounds)
    if len(counts) > 1:
        raise LayoutError(f"{node}: '{input_name}' mixes entries with {sorted(counts)} foregrounds.")
    return conditioning[0][1][LAYERS_KEY]


def enhance(conditioning, modules: LayerDiffModules, node: str, track_grad: bool = False) -> list:
    """Apply the layer prompt enhancer to every entry, using that entry's global prompt as context.
    ``track_grad`` keeps the autograd graph (training the enhancer); nodes run it without."""
    layers_of(conditioning, node, "conditioning")
    out = []
    with contextlib.nullcontext() if track_grad else torch.no_grad():
        for global_cond, extra in conditioning:
            layers = extra[LAYERS_KEY]
            if layers.enhanced:
                out.append([global_cond, extra])
                continue
            embeds = [modules.enhance(e, global_cond) for e in layers.embeds]
            out.append(layered_entry(global_cond, extra, layers.with_embeds(embeds, enhanced=True)))
    return out


# ----------------------------------------------------------------------------------------------- SMG
def num_foregrounds_of_conds(conds) -> int:
    for c in conds:
        mc = c.get("model_conds", {})
        if SLOTS_COND in mc:
            return int(mc[SLOTS_COND].cond[0, 1])
    raise LayoutError("Self-mask guidance needs layered negative conditioning ('LayerDiff Layer Prompt Encode').")


class SelfMaskGuidance:
    """Post-CFG function (like SAG's): cfg + scale * (uncond - uncond_on_mask_blurred_foregrounds)."""

    def __init__(self, state: PatchState, scale: float, sigma_start: float, blur_sigma: float):
        self.state = state
        self.scale = scale
        self.sigma_start = sigma_start
        self.blur_sigma = blur_sigma

    def __deepcopy__(self, memo):
        return self

    def __call__(self, args):
        cfg_x0 = args["denoised"]
        uncond = args["uncond"]
        sigma = args["sigma"]
        if self.scale == 0 or uncond is None or float(sigma.max()) > self.sigma_start:
            return cfg_x0
        nfg = num_foregrounds_of_conds(uncond)
        uncond_x0, cond_x0, x = args["uncond_denoised"], args["cond_denoised"], args["input"]
        self.state.ensure_device(x.device)
        with torch.no_grad():
            masks = smg.read_masks(cond_x0, nfg, self.state.modules.mask_readout)
            degraded = smg.degrade_foregrounds(uncond_x0, masks, nfg, self.blur_sigma)
            x_degraded = smg.degraded_model_input(x, uncond_x0, degraded)
        pred = compat.calc_uncond(args["model"], uncond, x_degraded, sigma, args["model_options"])
        return smg.apply_guidance(cfg_x0, uncond_x0, pred, self.scale)


def with_self_mask_guidance(model, scale: float, start_percent: float, blur_sigma: float, node: str):
    """Clone of a LayerDiff-patched model with SMG installed; scale 0 returns a plain clone (exact CFG)."""
    state = patch_state(model, node)
    return with_post_cfg_guidance(model, scale, start_percent,
                                  lambda sigma_start: SelfMaskGuidance(state, scale, sigma_start, blur_sigma))


def with_post_cfg_guidance(model, strength: float, start_percent: float, make_guidance):
    """Clone of ``model`` with the post-CFG function ``make_guidance(sigma_start)`` (``sigma_start``: the sigma of
    ``start_percent``), run with the uncond branch even at CFG 1; ``strength`` 0 returns a plain clone."""
    patched = model.clone()
    if strength == 0:
        return patched
    sigma_start = float(model.model.model_sampling.percent_to_sigma(start_percent))
    patched.set_model_sampler_post_cfg_function(make_guidance(sigma_start), disable_cfg1_optimization=True)
    return patched


# ----------------------------------------------------------------------------------------------- cond pipeline
def model_conds_kwargs(model, conds: list, x: torch.Tensor, node: str) -> dict:
    """The sampler's cond pipeline outside the sampler: one conditioning per sample (``conds[i]`` conditions rows
    ``i * rows:(i + 1) * rows`` of ``x``), through ``encode_model_conds`` -> ``process_cond`` -> ``concat``, as
    ComfyUI batches them. Returns the keyword arguments of ``apply_model`` (``c_crossattn``, the layer conds)."""
    rows = x.shape[0] // len(conds)
    pieces: dict[str, list] = {}
    for i, conditioning in enumerate(conds):
        part = x[i * rows:(i + 1) * rows]
        entries = comfy.samplers.encode_model_conds(model.model.extra_conds, compat.convert_cond(conditioning), part,
                                                    part.device, "positive")
        if len(entries) != 1:
            raise LayoutError(f"{node}: expected one conditioning entry per sample, got {len(entries)}.")
        for key, cond in entries[0]["model_conds"].items():
            pieces.setdefault(key, []).append(cond.process_cond(batch_size=rows, device=part.device, area=None))
    return {k: (v[0].concat(v[1:]) if len(v) > 1 else v[0].cond) for k, v in pieces.items()}


def apply_model_with_conds(model, x: torch.Tensor, sigma: torch.Tensor, conds: list, node: str) -> torch.Tensor:
    """ComfyUI's ``apply_model`` on ``x`` (rows of whole samples) at ``sigma`` (one per row) with ``conds`` (one
    conditioning per sample) and the model's own transformer options, as one positive pass of the sampler does:
    what training and the benchmarks call. Returns the denoised prediction. ``model`` must be loaded."""
    options = dict(model.model_options.get("transformer_options", {}))
    options["cond_or_uncond"] = [0]
    options["sigmas"] = sigma
    kwargs = model_conds_kwargs(model, conds, x, node)
    return model.model.apply_model(x, sigma, transformer_options=options, **kwargs)


# ----------------------------------------------------------------------------------------------- files
def register_folders() -> None:
    compat.register_model_folder(WEIGHTS_FOLDER, {".safetensors"})


def weights_path(name: str, node: str) -> str:
    import folder_paths

    path = folder_paths.get_full_path(WEIGHTS_FOLDER, name) if name else None
    if path is None:
        raise WeightsFileError(
            f"{node}: LayerDiff weights '{name}' not found. Put the .safetensors file written by the LayerDiff "
            "training script into ComfyUI/models/layerdiff/ and refresh the node list."
        )
    return path


def load_weights(name: str, node: str) -> LayerDiffModules:
    from ...layerdiff_model.modules.weights import load_modules

    path = weights_path(name, node)
    try:
        return load_modules(path, operations=comfy.ops.manual_cast)
    except WeightsFileError as exc:
        raise WeightsFileError(f"{node}: {exc}") from exc


# ----------------------------------------------------------------------------------------------- layered latents
LATENT_KEY = "layerdiff"


def make_layered_latent(samples: torch.Tensor, num_foregrounds: int, layer_names=None) -> dict:
    info = {"num_foregrounds": int(num_foregrounds)}
    if layer_names:
        info["layer_names"] = list(layer_names)
    return {"samples": samples, LATENT_KEY: info}


def layered_latent_info(latent: dict, node: str, input_name: str = "latent_image") -> dict:
    """The ``layerdiff`` entry of a LATENT, checked against its row count."""
    from ...layerdiff_model.slots import num_slots

    info = latent.get(LATENT_KEY) if isinstance(latent, dict) else None
    if not info:
        rebuilt = isinstance(latent, dict) and "batch_index" in latent
        raise LayoutError(
            f"{node}: '{input_name}' is not a layered latent (it has no layer information). Start from "
            "'LayerDiff Empty Layered Latent'; a latent node in between may have dropped the layer information"
            + (" ('Rebatch Latents' rebuilds the latent without it: do not rebatch layered latents)." if rebuilt
               else ".")
        )
    n = int(info["num_foregrounds"])
    s = num_slots(n)
    rows = latent["samples"].shape[0]
    if rows % s != 0:
        raise LayoutError(
            f"{node}: '{input_name}' has {rows} rows, not a multiple of {s} slots (background + {n} "
            "foregrounds + masks). A batch/crop node (e.g. 'Latent From Batch') cut the layered batch; keep whole "
            f"samples together (batch_index and length multiples of {s})."
        )
    _check_whole_samples(latent.get("batch_index"), rows, s, node, input_name)
    return info


def _check_whole_samples(batch_index, rows: int, slots: int, node: str, input_name: str) -> None:
    """Rows picked by core batch nodes carry their source row numbers in ``batch_index`` (Latent From Batch sets
    it, Repeat Latent Batch / Latent Batch extend it). Row r must come from a source row with the same slot."""
    if batch_index is None or len(batch_index) != rows:
        return
    bad = next((r for r, i in enumerate(batch_index) if int(i) % slots != r % slots), None)
    if bad is not None:
        raise LayoutError(
            f"{node}: '{input_name}' row {bad} is source row {int(batch_index[bad])} of a layered batch with "
            f"{slots} slots per sample, so its layers would be mixed up (batch_index {list(batch_index)[:8]}). "
            "'Latent From Batch' picked rows that do not start at a sample boundary: set its batch_index to a "
            f"multiple of {slots} (sample k starts at k*{slots}) and its length to a multiple of {slots}."
        )
