"""Regenerate or restyle chosen layers (LayerDiff Regenerate Layers): the chosen slots are redrawn through the
standard samplers with ComfyUI's own noise mask, every other slot stays bit-identical in latent space, and layers
that came in as images keep their original pixels through VAE Decode and Split Layers."""
from __future__ import annotations

import pytest
import torch

from layerdiff_host import core_ksampler, core_node, encode, node, sample, tiny_model, tiny_modules

H, W = 64, 48


@pytest.fixture(scope="module")
def tiny(comfyui):
    model, clip, vae = tiny_model()
    patched = node("LayerDiffApply").apply(model, tiny_modules(model))[0]
    return patched, clip, vae


def own_layers(seed=0, n=2):
    g = torch.Generator().manual_seed(seed)
    background = torch.rand(1, H, W, 3, generator=g)
    rgb = torch.rand(n, H, W, 3, generator=g)
    masks = torch.zeros(n, H, W)
    for k in range(n):
        masks[k, 8 + 8 * k: 40 + 8 * k, 8: 32] = 1.0
    return background, rgb, masks


def encoded(tiny, seed=0):
    vae = tiny[2]
    background, rgb, masks = own_layers(seed)
    latent, layers = node("LayerDiffEncodeLayers").encode(vae, background, rgb, masks, "a wall\na cat\na ball")
    return latent, layers


def regenerate(latent, layers="2", keep_masks=False):
    return node("LayerDiffRegenerateLayers").regenerate(latent, layers, keep_masks)[0]


ROWS = {"2": [2, 4], "1,2": [1, 2, 3, 4], "background": [0]}  # slots: bg, fg1, fg2, mask1, mask2


@pytest.mark.parametrize("which", ["2", "background", "1,2"])
@pytest.mark.parametrize("sampler", ["smg", "core"])
def test_regenerated_layers_change_and_the_others_stay_fixed(tiny, which, sampler):
    model, clip, _ = tiny
    latent, _ = encoded(tiny)
    pos, neg, _ = encode(clip, ["a cat", "a red ball"])
    edit = regenerate(latent, which)
    assert edit["noise_mask"].shape == (5, 1, H // 8, W // 8)
    if sampler == "smg":
        out = sample(model, pos, neg, edit, steps=3, seed=3, smg_scale=0.5, smg_start_percent=0.0)[1]
    else:
        out = core_ksampler(model, pos, neg, edit, seed=3)[1]
    before, after = latent["samples"], out["samples"]
    chosen = ROWS[which]
    kept = [r for r in range(5) if r not in chosen]
    for r in chosen:
        assert (after[r] - before[r]).abs().mean() > 0.1 * before[r].abs().mean(), (which, r)
    if sampler == "smg":  # the LayerDiff sampler puts the kept rows back exactly
        assert torch.equal(after[kept], before[kept])
    else:  # ComfyUI's own noise mask: kept up to the rounding of its latent scale round trip
        torch.testing.assert_close(after[kept], before[kept], rtol=1e-5, atol=1e-6)


def test_kept_layers_keep_their_original_pixels_through_decode_and_split(tiny):
    """Your own layers in, layer 2 regenerated: Split Layers gives back the background, layer 1 and its mask
    exactly as they came in (no VAE round trip), under the core KSampler too; layer 2 is new."""
    model, clip, vae = tiny
    latent, layers_in = encoded(tiny)
    pos, neg, _ = encode(clip, ["a cat", "a red ball"])
    for out in (sample(model, pos, neg, regenerate(latent, "2"), steps=3, seed=3)[1],
                core_ksampler(model, pos, neg, regenerate(latent, "2"), seed=3)[1]):
        images = core_node("VAEDecode", vae=vae, samples=out)[0]
        layers = node("LayerDiffSplitLayers").split(images, out)[0]
        assert torch.equal(layers.background, layers_in.background)
        assert torch.equal(layers.foregrounds[0, 0], layers_in.foregrounds[0, 0])
        assert torch.equal(layers.masks[0, 0], layers_in.masks[0, 0])
        assert (layers.foregrounds[0, 1] - layers_in.foregrounds[0, 1]).abs().mean() > 0.02  # regenerated
    # without an edit, a sampled latent is not the source any more: nothing is substituted
    plain = sample(model, pos, neg, latent, steps=2, seed=3)[1]
    images = core_node("VAEDecode", vae=vae, samples=plain)[0]
    layers = node("LayerDiffSplitLayers").split(images, plain)[0]
    assert not torch.equal(layers.background, layers_in.background)


def test_the_regenerated_layer_reads_the_kept_layers(tiny):
    """Same seed and prompts, other kept layers: the regenerated layer differs, i.e. it is drawn to fit them
    (inter-layer attention), not on its own."""
    model, clip, _ = tiny
    pos, neg, _ = encode(clip, ["a cat", "a red ball"])
    outs = [sample(model, pos, neg, regenerate(encoded(tiny, seed)[0], "2"), steps=3, seed=3)[0] for seed in (0, 5)]
    assert (outs[0][2] - outs[1][2]).abs().mean() > 1e-3


def test_restyle_at_half_denoise_stays_closer_to_the_layer_than_a_full_regeneration(tiny):
    model, clip, _ = tiny
    latent, _ = encoded(tiny)
    pos, neg, _ = encode(clip, ["a cat", "a ball, watercolor style"])
    edit = regenerate(latent, "2", keep_masks=True)
    assert edit["noise_mask"][:, 0, 0, 0].tolist() == [0, 0, 1, 0, 0]  # only the layer's pixels, not its mask
    half = sample(model, pos, neg, edit, steps=4, seed=3, denoise=0.5)[0]
    full = sample(model, pos, neg, edit, steps=4, seed=3, denoise=1.0)[0]
    before = latent["samples"]
    assert torch.equal(half[[0, 1, 3, 4]], before[[0, 1, 3, 4]])
    assert 0 < (half[2] - before[2]).abs().mean() < (full[2] - before[2]).abs().mean()


def test_generated_latent_regenerates_through_the_executor_prompt_chain(tiny):
    """A generated picture (no source images) can be edited too: only the chosen slot changes."""
    model, clip, _ = tiny
    pos, neg, n = encode(clip, ["a cat", "a ball"])
    first = sample(model, pos, neg, node("LayerDiffEmptyLatent").generate(W, H, n, 1)[0], steps=2, seed=1)[1]
    again = sample(model, pos, neg, regenerate(first, "1", keep_masks=True), steps=2, seed=9)[1]
    assert torch.equal(again["samples"][[0, 2, 3, 4]], first["samples"][[0, 2, 3, 4]])
    assert not torch.equal(again["samples"][1], first["samples"][1])
    assert again["layerdiff"]["layer_names"] == ["a background", "a cat", "a ball"]


@pytest.mark.parametrize("layers, keep_masks, match", [
    ("3", False, "asks for layer 3 but the latent has 2 foreground layer"),
    ("0-2", False, "asks for layer 0"),
    ("cat", False, "'cat', which is not a layer"),
    ("", False, "'layers' is empty"),
    ("2-1", False, "write it low-high"),
    ("background,1,2", False, "chooses every layer and its mask"),
])
def test_bad_layer_choices_are_refused_with_the_fix(tiny, layers, keep_masks, match):
    latent, _ = encoded(tiny)
    with pytest.raises(Exception, match=match) as info:
        regenerate(latent, layers, keep_masks)
    assert type(info.value).__name__ == "LayoutError" and "LayerDiff Regenerate Layers" in str(info.value)
    assert "noise_mask" not in latent  # the input latent is untouched
    regenerate(latent, "background,1,2", keep_masks=True)  # every layer's pixels, masks kept: allowed


def test_a_latent_without_layers_is_refused(tiny):
    with pytest.raises(Exception, match="not a layered latent"):
        regenerate({"samples": torch.zeros(5, 4, 8, 6)}, "1")


def test_a_noise_mask_set_before_redraws_only_that_region_of_the_chosen_layer(tiny):
    """Set Latent Noise Mask (core) on the left half, then Regenerate Layers '2': only the left half of layer 2
    changes; a mask per slot row that does not fit is refused."""
    model, clip, _ = tiny
    latent, _ = encoded(tiny)
    left = torch.zeros(1, H, W)
    left[..., : W // 2] = 1.0
    masked = core_node("SetLatentNoiseMask", samples=latent, mask=left)[0]
    pos, neg, _ = encode(clip, ["a cat", "a red ball"])
    out = sample(model, pos, neg, regenerate(masked, "2", keep_masks=True), steps=3, seed=3)[0]
    before, half = latent["samples"], (W // 8) // 2
    assert torch.equal(out[[0, 1, 3, 4]], before[[0, 1, 3, 4]])
    change = (out[2] - before[2]).abs()
    assert change[..., :half].mean() > 0.1 * before[2].abs().mean()
    assert change[..., half + 1:].mean() < 0.05 * change[..., :half].mean()  # the right half stays (up to the seam)
    with pytest.raises(Exception, match="noise mask with 2 masks for 5 slot rows"):
        regenerate(dict(latent, noise_mask=torch.ones(2, H, W)), "2")
