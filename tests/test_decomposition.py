"""Decompose a flat picture into layers: LayerDiff Picture to Layered Latent + LayerDiff Composite Guidance under a
standard sampler; the composite guidance maths (layerdiff_model/sampling/composite_guidance.py) on known masks.
The measured decomposition of shapes pictures is in docs/SHAPES_BENCHMARK.md ("Decomposition")."""
from __future__ import annotations

import pytest
import torch

from comfy_headless.product import product_module
from layerdiff_host import core_node, encode, node, package_module, sample, tiny_model, tiny_modules

guidance = product_module("layerdiff_model.sampling.composite_guidance")
slots = product_module("layerdiff_model.slots")
H = W = 64


def test_full_strength_makes_the_composite_the_picture_and_leaves_hidden_parts_alone():
    g = torch.Generator().manual_seed(0)
    b, n, c, h, w = 2, 2, 4, 8, 8
    x0 = torch.randn(b * (2 * n + 1), c, h, w, generator=g)
    masks = torch.zeros(b, n, 1, h, w)
    masks[:, 0, :, :4] = 1  # layer 1 covers the top half
    masks[:, 1, :, :, :4] = 1  # layer 2 the left half (its top-left quarter is behind layer 1)
    picture = torch.randn(b, c, h, w, generator=g)
    out = guidance.pull_to_picture(x0, masks, n, picture, 1.0)
    torch.testing.assert_close(guidance.composite_latent(out, masks, n), picture)
    bg0, fg0, m0 = slots.unpack(x0, n)
    bg1, fg1, m1 = slots.unpack(out, n)
    assert torch.equal(m1, m0)  # mask slots untouched
    assert torch.equal(fg1[:, 1, :, :4, :4], fg0[:, 1, :, :4, :4])  # layer 2 behind layer 1: hidden, kept
    assert torch.equal(bg1[:, :, :, :4], bg0[:, :, :, :4])  # background under layer 1: hidden, kept
    half = guidance.pull_to_picture(x0, masks, n, picture, 0.5)
    err = lambda x: float((guidance.composite_latent(x, masks, n) - picture).abs().mean())  # noqa: E731
    assert 0 < err(half) < err(x0) and err(half) == pytest.approx(err(x0) / 2, rel=1e-4)


@pytest.fixture(scope="module")
def tiny(comfyui):
    model, clip, vae = tiny_model()
    patched = node("LayerDiffApply").apply(model, tiny_modules(model))[0]
    return patched, clip, vae


def picture(seed=0):
    return torch.rand(1, H, W, 3, generator=torch.Generator().manual_seed(seed))


def test_picture_latent_puts_the_picture_in_the_layer_slots_and_grey_in_the_masks(tiny):
    _, _, vae = tiny
    image = picture()
    latent = node("LayerDiffPictureToLatent").encode(vae, image, 2, "picture")[0]
    rows = latent["samples"]
    encoded = core_node("VAEEncode", vae=vae, pixels=image)[0]["samples"]
    grey = core_node("VAEEncode", vae=vae, pixels=torch.full((1, H, W, 3), 0.5))[0]["samples"]
    assert rows.shape == (5, 4, H // 8, W // 8) and latent["layerdiff"]["num_foregrounds"] == 2
    for r in (0, 1, 2):
        torch.testing.assert_close(rows[r:r + 1], encoded, rtol=1e-4, atol=1e-5)
    for r in (3, 4):
        torch.testing.assert_close(rows[r:r + 1], grey, rtol=1e-4, atol=1e-5)
    starts_grey = node("LayerDiffPictureToLatent").encode(vae, image, 2, "grey")[0]["samples"]
    torch.testing.assert_close(starts_grey[1:2], grey, rtol=1e-4, atol=1e-5)


def test_composite_guidance_pulls_the_sampled_layers_toward_the_picture(tiny):
    model, clip, vae = tiny
    image = picture(1)
    latent = node("LayerDiffPictureToLatent").encode(vae, image, 2, "picture")[0]
    pos, neg, n = encode(clip, ["a cat", "a ball"])
    errors = {}
    for strength in (0.0, 1.0):
        guided = node("LayerDiffCompositeGuidance").patch(model, latent, strength, 0.0)[0]
        out = sample(guided, pos, neg, latent, steps=4, seed=2, denoise=0.8)[0].detach()
        state = package_module("nodes.host.inference").patch_state(model, "test")
        with torch.no_grad():
            masks = package_module("layerdiff_model.sampling.smg").read_masks(
                model.model.process_latent_in(out), n, state.modules.mask_readout)
        composite = guidance.composite_latent(out, masks, n)
        errors[strength] = float((composite - latent["layerdiff"]["picture"]).abs().mean())
    assert errors[1.0] < 0.5 * errors[0.0], errors


def test_decomposition_inputs_are_checked(tiny):
    model, _, vae = tiny
    with pytest.raises(Exception, match="multiples of 8"):
        node("LayerDiffPictureToLatent").encode(vae, torch.rand(1, 60, 64, 3), 1, "picture")
    with pytest.raises(Exception, match="3 lines for a background and 1 foregrounds"):
        node("LayerDiffPictureToLatent").encode(vae, picture(), 1, "picture", "a\nb\nc")
    empty = node("LayerDiffEmptyLatent").generate(W, H, 1, 1)[0]
    with pytest.raises(Exception, match="carries no picture") as info:
        node("LayerDiffCompositeGuidance").patch(model, empty, 1.0, 0.0)
    assert "LayerDiff Composite Guidance" in str(info.value)
