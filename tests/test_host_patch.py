"""The UNet patch and the SMG sampler through the real ComfyUI ModelPatcher and samplers (tiny SD1.5 model)."""
import pytest
import torch

import comfy_host
from layerdiff_host import (adapter, core_ksampler, empty_latent, encode, package_module, sample, tiny_model,
                            tiny_modules)


@pytest.fixture(scope="module")
def tiny():
    return tiny_model()


@pytest.fixture(scope="module")
def random_patched(tiny):
    model, _, _ = tiny
    return adapter().apply_patch(model, tiny_modules(model, random=True), "test")


def test_zero_initialised_patch_reproduces_the_base_model_exactly(tiny):
    model, clip, _ = tiny
    pos, neg, n = encode(clip, ["a red circle", "a blue square"])
    latent = empty_latent(n, batch=2)
    base = core_ksampler(model, pos, neg, latent)[0]
    patched = adapter().apply_patch(model, tiny_modules(model, random=False), "test")
    out, _ = sample(patched, pos, neg, latent)
    assert torch.equal(out, base)


def test_patch_changes_output_and_leaves_input_model_untouched(tiny, random_patched):
    model, clip, _ = tiny
    pos, neg, n = encode(clip, ["a red circle"])
    latent = empty_latent(n)
    before = core_ksampler(model, pos, neg, latent)[0]
    out, _ = sample(random_patched, pos, neg, latent)
    assert (out - before).abs().max() > 1e-3
    assert not adapter().is_patched(model)
    assert torch.equal(core_ksampler(model, pos, neg, latent)[0], before)


def _slots_after_prompt_change(model, clip, inter: bool):
    a = adapter()
    modules = tiny_modules(model, random=True, seed=3)
    patched = a.apply_patch(model, modules, "test", inter=inter)
    latent = empty_latent(2)
    pos1, neg, _ = encode(clip, ["a red circle", "a blue square"])
    pos2, _, _ = encode(clip, ["a green triangle", "a blue square"])
    out1, _ = sample(patched, pos1, neg, latent, steps=2)
    out2, _ = sample(patched, pos2, neg, latent, steps=2)
    return (out1 - out2).flatten(1).abs().amax(1)  # per slot: [bg, fg1, fg2, m1, m2]


def test_changing_one_layer_prompt_changes_its_slots_and_via_inter_layer_attention_the_others(tiny):
    model, clip, _ = tiny
    diff = _slots_after_prompt_change(model, clip, inter=True)
    assert diff[1] > 1e-3 and diff[3] > 1e-3  # fg1 and its mask read the changed prompt
    assert diff[0] > 1e-4 and diff[2] > 1e-4 and diff[4] > 1e-4  # the other layers see it through inter-layer attention
    isolated = _slots_after_prompt_change(model, clip, inter=False)
    assert isolated[1] > 1e-3 and isolated[3] > 1e-3
    assert isolated[0] == 0 and isolated[2] == 0 and isolated[4] == 0  # no information exchange without it


@pytest.mark.parametrize("foregrounds", [1, 3])
def test_batched_samples_equal_samples_run_alone(tiny, random_patched, foregrounds):
    """Slot order holds across a batch of samples and any foreground count: each sample of a batch of 2 matches
    the same sample generated alone with the same noise."""
    import comfy.sample
    _, clip, _ = tiny
    prompts = ["a red circle", "a blue square", "a green ring"][:foregrounds]
    pos, neg, n = encode(clip, prompts)
    s = 2 * n + 1
    latent = empty_latent(n, batch=2)
    noise = comfy.sample.prepare_noise(latent["samples"], 11)
    both = comfy.sample.sample(random_patched, noise, 2, 5.0, "euler", "normal", pos, neg, latent["samples"],
                               seed=11, disable_pbar=True)
    for b in range(2):
        rows = slice(b * s, (b + 1) * s)
        alone = comfy.sample.sample(random_patched, noise[rows], 2, 5.0, "euler", "normal", pos, neg,
                                    latent["samples"][rows], seed=11, disable_pbar=True)
        torch.testing.assert_close(both[rows], alone, rtol=2e-3, atol=2e-3)  # float batching noise only


def test_cond_and_uncond_in_separate_unet_calls_give_the_same_result(tiny, random_patched, monkeypatch):
    """When ComfyUI cannot batch cond and uncond together (low memory), each chunk runs in its own call."""
    _, clip, _ = tiny
    pos, neg, n = encode(clip, ["a red circle", "a blue square"])
    latent = empty_latent(n, batch=2)
    together, _ = sample(random_patched, pos, neg, latent)
    calls = []
    inner = random_patched.object_patches["apply_model"].inner

    def counting(x, t, *args, **kwargs):
        calls.append(x.shape[0])
        return inner(x, t, *args, **kwargs)

    monkeypatch.setattr(random_patched.object_patches["apply_model"], "inner", counting)
    monkeypatch.setattr(random_patched.model, "memory_required", lambda *a, **k: float("inf"))
    apart, _ = sample(random_patched, pos, neg, latent)
    assert calls and max(calls) == latent["samples"].shape[0]  # one chunk (cond or uncond) per call
    # float sums differ slightly with batch size; a slot mix-up would differ by O(1)
    torch.testing.assert_close(apart, together, rtol=2e-3, atol=2e-3)


def test_prompts_of_different_lengths_and_long_prompts(tiny, random_patched):
    _, clip, _ = tiny
    long_prompt = ", ".join(["a very detailed red circle with a thin outline"] * 12)  # > 77 tokens
    pos, neg, n = encode(clip, [long_prompt, "a square"], global_prompt=long_prompt)
    out, _ = sample(random_patched, pos, neg, empty_latent(n))
    assert torch.isfinite(out).all() and out.shape[0] == 5


def _rms(x):
    return float(x.float().pow(2).mean().sqrt())


def test_smg_scale_zero_is_exactly_cfg_and_the_foregrounds_change_more_as_the_scale_grows(tiny, random_patched):
    """SMG blurs the foregrounds (docs/DESIGN.md 2.4): it moves the foreground slots by a sizeable part of their own
    magnitude, more for each larger smg_scale, and leaves the background and mask slots nearly as CFG made them."""
    _, clip, _ = tiny
    pos, neg, n = encode(clip, ["a red circle", "a blue square"])
    latent = empty_latent(n)
    cfg_only = core_ksampler(random_patched, pos, neg, latent)[0]
    smg0, _ = sample(random_patched, pos, neg, latent, smg_scale=0.0)
    assert torch.equal(smg0, cfg_only)
    fg, others = [1, 2], [0, 3, 4]  # [bg, fg1, fg2, m1, m2]
    changes = []
    for scale in (0.1, 0.25, 0.5):
        out, _ = sample(random_patched, pos, neg, latent, smg_scale=scale, smg_start_percent=0.0)
        assert torch.isfinite(out).all()
        fg_change = _rms(out[fg] - cfg_only[fg]) / _rms(cfg_only[fg])
        other_change = _rms(out[others] - cfg_only[others]) / _rms(cfg_only[others])
        assert other_change < 0.01 * fg_change, scale  # measured ~6e-4 of it
        changes.append(fg_change)
    assert 0.05 < changes[0] < changes[1] < changes[2], changes  # measured 0.22, 0.64, 1.56


def test_smg_changes_the_foregrounds_only_inside_their_masks(tiny, random_patched, monkeypatch):
    """The guidance reads the masks from the model's prediction (replaced here by chosen masks) and blurs inside
    them: with empty masks, or no blur, it is CFG up to the float noise of its extra UNet pass; with masks over the
    left half of the image the foregrounds change on the left and hardly on the right."""
    _, clip, _ = tiny
    pos, neg, n = encode(clip, ["a red circle", "a blue square"])
    latent = empty_latent(n)
    cfg_only = core_ksampler(random_patched, pos, neg, latent)[0]
    guided = dict(smg_scale=0.5, smg_start_percent=0.0)
    unblurred, _ = sample(random_patched, pos, neg, latent, smg_blur_sigma=0.0, **guided)
    torch.testing.assert_close(unblurred, cfg_only, rtol=0, atol=1e-2)  # measured 1.2e-4; values reach ~300
    smg = package_module("layerdiff_model.sampling.smg")
    read_masks = smg.read_masks

    def chosen_masks(left_half):
        def masks_of(x0, num_foregrounds, readout):
            masks = torch.zeros_like(read_masks(x0, num_foregrounds, readout))  # [B, N, 1, h, w]
            if left_half:
                masks[..., :masks.shape[-1] // 2] = 1.0
            return masks
        return masks_of

    monkeypatch.setattr(smg, "read_masks", chosen_masks(left_half=False))
    empty, _ = sample(random_patched, pos, neg, latent, **guided)
    torch.testing.assert_close(empty, cfg_only, rtol=0, atol=1e-2)
    monkeypatch.setattr(smg, "read_masks", chosen_masks(left_half=True))
    left, _ = sample(random_patched, pos, neg, latent, **guided)
    change = left[1:3] - cfg_only[1:3]  # the foreground slots [2, C, h, w]
    half = change.shape[-1] // 2
    assert _rms(change) > 0.5 * _rms(cfg_only[1:3])  # measured 1.44
    assert _rms(change[..., :half]) > 5 * _rms(change[..., half:])  # measured 28x


def test_sampler_output_carries_layer_names(tiny, random_patched):
    _, clip, _ = tiny
    pos, neg, n = encode(clip, ["a red circle"], background="a blue wall")
    _, out = sample(random_patched, pos, neg, empty_latent(n))
    assert out["layerdiff"] == {"num_foregrounds": 1, "layer_names": ["a blue wall", "a red circle"]}


def test_enhancer_is_identity_untrained_and_changes_layer_context_when_trained(tiny):
    model, clip, _ = tiny
    pos, neg, _ = encode(clip, ["a red circle"])
    a = adapter()
    same = a.enhance(pos, tiny_modules(model, random=False), "test")
    key = a.CONTEXT_COND
    assert torch.equal(same[0][1]["model_conds"][key].cond, pos[0][1]["model_conds"][key].cond)
    changed = a.enhance(pos, tiny_modules(model, random=True), "test")
    assert not torch.equal(changed[0][1]["model_conds"][key].cond, pos[0][1]["model_conds"][key].cond)
    assert changed[0][1][a.LAYERS_KEY].enhanced and torch.equal(changed[0][0], pos[0][0])


def test_controlnet_apply_on_global_conditioning_works_with_layered_sampling(tiny, random_patched):
    import nodes
    _, clip, _ = tiny
    pos, neg, n = encode(clip, ["a red circle"])
    latent = empty_latent(n)
    control = nodes.ControlNetLoader().load_controlnet(comfy_host.ensure_tiny_controlnet())[0]
    hint = torch.rand(1, 64, 64, 3, generator=torch.Generator().manual_seed(0))
    controlled = nodes.ControlNetApply().apply_controlnet(pos, control, hint, 1.0)[0]
    plain, _ = sample(random_patched, pos, neg, latent)
    with_cn, _ = sample(random_patched, controlled, neg, latent)
    assert torch.isfinite(with_cn).all() and (with_cn - plain).abs().max() > 1e-4


def test_layer_prompt_keys_values_are_projected_once_per_sampling_run_with_the_same_result(tiny, monkeypatch):
    """The intra-layer attention projects the layer prompts once per run (not once per step): the sampled
    latent is the same as with the cache switched off, and the projection runs once per distinct prompt set."""
    model, clip, _ = tiny
    a = adapter()
    patched = a.apply_patch(model, tiny_modules(model, random=True, seed=5), "test")
    state = a.patch_state(patched, "test")
    site = next(iter(state.sites.values()))
    calls = []
    handle = state.modules.site_module(site).intra.to_k.register_forward_hook(lambda *args: calls.append(1))
    pos, neg, n = encode(clip, ["a red circle", "a blue square"])
    latent = empty_latent(n, batch=2)
    try:
        cached, _ = sample(patched, pos, neg, latent, steps=4, smg_scale=0.5, smg_start_percent=0.0)
        projections_cached = len(calls)
        calls.clear()
        monkeypatch.setattr(type(state.prompt_kv), "lookup", lambda self, context, dtype: None)
        uncached, _ = sample(patched, pos, neg, latent, steps=4, smg_scale=0.5, smg_start_percent=0.0)
    finally:
        handle.remove()
    assert torch.equal(cached, uncached)
    assert projections_cached <= 2 < len(calls)  # cond+uncond batch and the SMG uncond pass, vs every call


def test_no_prompt_keys_values_outlive_a_sampling_run(tiny):
    """The cache is emptied when a run ends: by the LayerDiff SMG KSampler on every host, and on 0.3.x (which has
    a ModelPatcher cleanup callback) after any core sampler too; the 2024 host keeps at most its few entries."""
    model, clip, _ = tiny
    a = adapter()
    patched = a.apply_patch(model, tiny_modules(model, random=True, seed=5), "test")
    state = a.patch_state(patched, "test")
    pos, neg, n = encode(clip, ["a red circle"])
    latent = empty_latent(n)
    sample(patched, pos, neg, latent, steps=2)
    assert len(state.prompt_kv) == 0
    core_ksampler(patched, pos, neg, latent)
    has_cleanup_callback = package_module("nodes.host.compat").on_sampling_done(model.clone(), lambda: None)
    if has_cleanup_callback:
        assert len(state.prompt_kv) == 0
    else:
        assert 0 < len(state.prompt_kv) <= state.prompt_kv.max_entries


def test_fp16_weights_file_is_held_in_fp16_and_samples_like_an_fp32_copy(tiny, tmp_path):
    """No fp32 copy of fp16 weights: an fp16 file loads as fp16 modules, the fp32 UNet uses them as they are
    (manual-cast layers), and the result equals the one of an explicit fp32 copy exactly (fp16 -> fp32 is exact)."""
    import copy

    import comfy.ops

    model, clip, _ = tiny
    weights = package_module("layerdiff_model.modules.weights")
    path = tmp_path / "half.safetensors"
    weights.save_weights(path, tiny_modules(model, random=True).to(torch.float16))
    half = weights.load_modules(path, operations=comfy.ops.manual_cast)
    assert {p.dtype for p in half.parameters()} == {torch.float16}
    assert {p.dtype for p in weights.load_modules(path, dtype=torch.float32).parameters()} == {torch.float32}
    patched = adapter().apply_patch(model, half, "test")
    assert adapter().patch_state(patched, "test").modules is half  # not copied to the UNet's fp32
    full = copy.deepcopy(half).to(torch.float32)
    pos, neg, n = encode(clip, ["a red circle", "a blue square"])
    latent = empty_latent(n)
    out, _ = sample(patched, pos, neg, latent)
    reference, _ = sample(adapter().apply_patch(model, full, "test"), pos, neg, latent)
    assert torch.equal(out, reference)
