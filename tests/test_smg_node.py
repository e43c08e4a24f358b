"""Self-mask guidance as a MODEL -> MODEL node (like core's SAG node): the same guidance under ComfyUI's own
samplers as under the LayerDiff SMG KSampler."""
from __future__ import annotations

import math

import pytest
import torch

from layerdiff_host import core_node, empty_latent, encode, node, sample, tiny_model, tiny_modules

STEPS, CFG, SEED, SCALE = 4, 5.0, 11, 1.5


@pytest.fixture(scope="module")
def setup(comfyui):
    model, clip, _ = tiny_model()
    patched = node("LayerDiffApply").apply(model, tiny_modules(model, random=True, seed=4))[0]
    pos, neg, n = encode(clip, ["a red circle", "a green square"])
    return patched, pos, neg, empty_latent(n)


@pytest.fixture(scope="module")
def reference(setup):
    """The SMG KSampler's result (guidance from the first step), and plain CFG for contrast."""
    patched, pos, neg, latent = setup
    smg, _ = sample(patched, pos, neg, latent, steps=STEPS, cfg=CFG, seed=SEED, smg_scale=SCALE, smg_start_percent=0.0)
    cfg_only, _ = sample(patched, pos, neg, latent, steps=STEPS, cfg=CFG, seed=SEED, smg_scale=0.0)
    assert (smg - cfg_only).abs().max() > 1e-3  # guidance changes the result, so the comparisons below can fail
    return smg


def guided(patched, scale=SCALE):
    return node("LayerDiffSelfMaskGuidance").patch(patched, scale, 0.0, 2.0)[0]


def test_under_ksampler(setup, reference, comfyui):
    patched, pos, neg, latent = setup
    out = core_node("KSampler", model=guided(patched), seed=SEED, steps=STEPS, cfg=CFG, sampler_name="euler",
                    scheduler="normal", positive=pos, negative=neg, latent_image=latent, denoise=1.0)[0]
    assert torch.equal(out["samples"], reference)
    assert out["layerdiff"]["num_foregrounds"] == 2  # the layered latent stays layered


def test_layer_names_reach_the_files_through_a_core_sampler(setup):
    """The prompt encoder's layer names ride on the empty latent, which core samplers copy."""
    patched, _, _, _ = setup
    clip = tiny_model()[1]
    pos, neg, n, names = node("LayerDiffPromptEncode").encode(clip, "a scene", "a  blue\nwall", "a red circle\n"
                                                              "a green square", "bad")
    assert names == "a blue wall\na red circle\na green square"
    latent = node("LayerDiffEmptyLatent").generate(64, 64, n, 1, names)[0]
    out = core_node("KSampler", model=guided(patched), seed=SEED, steps=2, cfg=CFG, sampler_name="euler",
                    scheduler="normal", positive=pos, negative=neg, latent_image=latent, denoise=1.0)[0]
    assert out["layerdiff"]["layer_names"] == ["a blue wall", "a red circle", "a green square"]
    images = core_node("VAEDecode", vae=tiny_model()[2], samples=out)[0]
    layers = node("LayerDiffSplitLayers").split(images, out)[0]
    assert layers.names == ["a blue wall", "a red circle", "a green square"]
    with pytest.raises(Exception, match="'layer_names' has 2 lines for a background and 2 foregrounds"):
        node("LayerDiffEmptyLatent").generate(64, 64, 2, 1, "a\nb")


def test_under_ksampler_advanced(setup, reference):
    patched, pos, neg, latent = setup
    out = core_node("KSamplerAdvanced", model=guided(patched), add_noise="enable", noise_seed=SEED, steps=STEPS,
                    cfg=CFG, sampler_name="euler", scheduler="normal", positive=pos, negative=neg,
                    latent_image=latent, start_at_step=0, end_at_step=STEPS,
                    return_with_leftover_noise="disable")[0]
    assert torch.equal(out["samples"], reference)


def _custom_parts(model):
    sampler = core_node("KSamplerSelect", sampler_name="euler")[0]
    sigmas = core_node("BasicScheduler", model=model, scheduler="normal", steps=STEPS, denoise=1.0)[0]
    return sampler, sigmas


def test_under_sampler_custom(setup, reference):
    patched, pos, neg, latent = setup
    model = guided(patched)
    sampler, sigmas = _custom_parts(model)
    out = core_node("SamplerCustom", model=model, add_noise=True, noise_seed=SEED, cfg=CFG, positive=pos,
                    negative=neg, sampler=sampler, sigmas=sigmas, latent_image=latent)[0]
    torch.testing.assert_close(out["samples"], reference, rtol=1e-5, atol=1e-6)


def test_under_sampler_custom_advanced(setup, reference):
    import nodes

    if "SamplerCustomAdvanced" not in nodes.NODE_CLASS_MAPPINGS:
        pytest.skip("this ComfyUI (2024) has no SamplerCustomAdvanced; SamplerCustom is tested instead")
    patched, pos, neg, latent = setup
    model = guided(patched)
    sampler, sigmas = _custom_parts(model)
    guider = core_node("CFGGuider", model=model, positive=pos, negative=neg, cfg=CFG)[0]
    noise = core_node("RandomNoise", noise_seed=SEED)[0]
    out = core_node("SamplerCustomAdvanced", noise=noise, guider=guider, sampler=sampler, sigmas=sigmas,
                    latent_image=latent)[0]
    torch.testing.assert_close(out["samples"], reference, rtol=1e-5, atol=1e-6)


def test_scale_zero_is_plain_cfg_and_the_input_model_is_untouched(setup):
    patched, pos, neg, latent = setup
    before = dict(patched.model_options)
    plain = core_node("KSampler", model=patched, seed=SEED, steps=STEPS, cfg=CFG, sampler_name="euler",
                      scheduler="normal", positive=pos, negative=neg, latent_image=latent, denoise=1.0)[0]
    zero = core_node("KSampler", model=guided(patched, 0.0), seed=SEED, steps=STEPS, cfg=CFG, sampler_name="euler",
                     scheduler="normal", positive=pos, negative=neg, latent_image=latent, denoise=1.0)[0]
    assert torch.equal(plain["samples"], zero["samples"])
    assert patched.model_options.keys() == before.keys() and not patched.model_options.get("sampler_post_cfg_function")


@pytest.mark.parametrize("name", ["scale", "start_percent", "blur_sigma"])
def test_non_finite_inputs_are_refused(setup, name):
    values = dict(scale=0.5, start_percent=0.2, blur_sigma=2.0)
    values[name] = math.nan
    with pytest.raises(Exception, match=rf"LayerDiff Self-Mask Guidance: input '{name}' is nan"):
        node("LayerDiffSelfMaskGuidance").patch(setup[0], **values)


def test_an_unpatched_model_is_refused(comfyui):
    model = tiny_model()[0]
    with pytest.raises(Exception, match="LayerDiff Self-Mask Guidance"):
        node("LayerDiffSelfMaskGuidance").patch(model, 0.5, 0.2, 2.0)
