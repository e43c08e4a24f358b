"""Layered sampling with any batch, layer count, size and prompt length, through core latent and conditioning nodes.

Every test goes through the real ComfyUI classes on the tiny SD1.5 model.
"""
import pytest
import torch

from layerdiff_host import adapter, core_node, encode, node, package_module, sample, tiny_model, tiny_modules


@pytest.fixture(scope="module")
def tiny():
    return tiny_model()


@pytest.fixture(scope="module")
def patched(tiny):
    return adapter().apply_patch(tiny[0], tiny_modules(tiny[0], random=True, seed=9), "test")


@pytest.fixture(scope="module")
def errors():
    return package_module("layerdiff_model.errors")


def _latent(foregrounds, width=64, height=64, batch=1):
    return node("LayerDiffEmptyLatent").generate(width, height, foregrounds, batch)[0]


PROMPTS = ["a red circle", "a blue square", "a green ring"]


# ------------------------------------------------------------------------------------------ 3. batch x layers
@pytest.mark.parametrize("foregrounds", [1, 2, 3])
@pytest.mark.parametrize("batch", [1, 2, 3])
def test_any_batch_with_any_number_of_foregrounds(tiny, patched, batch, foregrounds):
    """Rows = B * (2N + 1) for every B and N: the layer axis is independent of the batch (no multiple-of-3 rule)."""
    pos, neg, n = encode(tiny[1], PROMPTS[:foregrounds])
    latent = _latent(n, batch=batch)
    rows = batch * (2 * foregrounds + 1)
    assert latent["samples"].shape == (rows, 4, 8, 8)
    out, info = sample(patched, pos, neg, latent, steps=1, smg_scale=0.5, smg_start_percent=0.0)
    assert out.shape == (rows, 4, 8, 8) and torch.isfinite(out).all()
    assert info["layerdiff"]["num_foregrounds"] == foregrounds


def test_more_foregrounds_than_the_weights_support_is_a_clear_error(tiny, patched, errors):
    pos, neg, n = encode(tiny[1], ["a", "b", "c", "d"])
    with pytest.raises(errors.LayoutError, match=r"SMG KSampler.*4 foregrounds requested.*at most 3"):
        sample(patched, pos, neg, _latent(n, batch=2))


# ------------------------------------------------------------------------------------------ 4. sizes, hires fix
@pytest.mark.parametrize("width,height", [(72, 40), (40, 72), (16, 16), (136, 24)])
def test_any_multiple_of_8_size_including_non_square(tiny, patched, width, height):
    pos, neg, n = encode(tiny[1], PROMPTS[:2])
    latent = _latent(n, width, height, batch=2)
    out, _ = sample(patched, pos, neg, latent, steps=2, smg_scale=0.5, smg_start_percent=0.0)
    assert out.shape == (10, 4, height // 8, width // 8) and torch.isfinite(out).all()


@pytest.fixture(scope="module")
def first_pass(tiny, patched):
    """A hires-fix first pass: 2 layered samples with 1 foreground (S = 3) at 64x64."""
    pos, neg, n = encode(tiny[1], ["a red circle"])
    _, out = sample(patched, pos, neg, _latent(n, batch=2), steps=2)
    return pos, neg, out


# (core node, inputs, rows after it, latent size after it)
KEEPS_WORKING = {
    "upscale": ("LatentUpscale", dict(upscale_method="nearest-exact", width=96, height=80, crop="disabled"), 6,
                (10, 12)),
    "upscale_by": ("LatentUpscaleBy", dict(upscale_method="bilinear", scale_by=1.5), 6, (12, 12)),
    "crop": ("LatentCrop", dict(width=40, height=48, x=8, y=8), 6, (6, 5)),
    "repeat": ("RepeatLatentBatch", dict(amount=2), 12, (8, 8)),
    "from_batch_whole_sample": ("LatentFromBatch", dict(batch_index=3, length=3), 3, (8, 8)),
}


@pytest.mark.parametrize("case", sorted(KEEPS_WORKING))
def test_core_latent_nodes_that_keep_the_layers_work_in_a_second_pass(patched, first_pass, case):
    """What each core node does to a layered LATENT: it keeps the 'layerdiff' entry and whole samples, so a
    second SMG KSampler pass (denoise 0.5) runs on it."""
    pos, neg, latent = first_pass
    name, inputs, rows, size = KEEPS_WORKING[case]
    (moved,) = core_node(name, samples=latent, **inputs)
    assert moved["layerdiff"]["num_foregrounds"] == 1 and moved["samples"].shape[0] == rows
    out, info = sample(patched, pos, neg, moved, steps=2, denoise=0.5, smg_scale=0.5, smg_start_percent=0.0)
    assert out.shape == (rows, 4, *size) and torch.isfinite(out).all()
    assert info["layerdiff"]["layer_names"] == ["a background", "a red circle"]


def test_a_whole_sample_picked_from_the_batch_gets_the_same_second_pass_as_in_the_full_batch(patched, first_pass):
    """Latent From Batch at a sample boundary: same slots, same noise (ComfyUI draws noise by batch_index), so the
    second pass equals that sample's rows of the full second pass: no layer was mixed up."""
    pos, neg, latent = first_pass
    full, _ = sample(patched, pos, neg, latent, steps=2, denoise=0.5)
    (second,) = core_node("LatentFromBatch", samples=latent, batch_index=3, length=3)
    alone, _ = sample(patched, pos, neg, second, steps=2, denoise=0.5)
    torch.testing.assert_close(alone, full[3:6], rtol=2e-3, atol=2e-3)  # float batching noise only


def test_picking_a_whole_sample_then_repeating_it_keeps_working(patched, first_pass):
    pos, neg, latent = first_pass
    (one,) = core_node("LatentFromBatch", samples=latent, batch_index=3, length=3)
    (two,) = core_node("RepeatLatentBatch", samples=one, amount=2)
    assert two["batch_index"] == [3, 4, 5, 6, 7, 8]
    out, _ = sample(patched, pos, neg, two, steps=2, denoise=0.5)
    assert out.shape == (6, 4, 8, 8) and torch.isfinite(out).all()


def _rebatch(latent):
    (latents,) = core_node("RebatchLatents", latents=[latent], batch_size=[3])
    return latents[0]


# core nodes that drop or cut the layer information: a clear error that names the node, never a silent mix-up
BREAKS = {
    "from_batch_offset_not_a_sample_start": (
        lambda lat: core_node("LatentFromBatch", samples=lat, batch_index=1, length=3)[0],
        r"row 0 is source row 1 .* 3 slots per sample.*mixed up.*'Latent From Batch'.*multiple of 3"),
    "from_batch_length_not_whole_samples": (
        lambda lat: core_node("LatentFromBatch", samples=lat, batch_index=0, length=4)[0],
        r"4 rows, not a multiple of 3 slots.*'Latent From Batch'"),
    "rebatch": (_rebatch, r"not a layered latent.*'Rebatch Latents'"),
}


@pytest.mark.parametrize("case", sorted(BREAKS))
def test_core_latent_nodes_that_break_the_layers_give_a_clear_error(patched, first_pass, errors, case):
    pos, neg, latent = first_pass
    cut, message = BREAKS[case]
    with pytest.raises(errors.LayoutError, match=message):
        sample(patched, pos, neg, cut(latent), steps=1, denoise=0.5)


# ------------------------------------------------------------------------------------------ 5. prompt lengths
def _words(count, vocabulary="red blue green small large round square bright dark striped"):
    words = vocabulary.split()
    return " ".join(words[i % len(words)] for i in range(count))


def _new_ending(count, ending=30):
    """``_words(count)`` with its last ``ending`` words replaced: the change sits past the first 77-token chunk."""
    return _words(count - ending) + " " + _words(ending, "cat dog house tree car boat lamp chair")


def _encode(clip, global_prompt, background, foregrounds, negative):
    return node("LayerDiffPromptEncode").encode(clip, global_prompt, background, "\n".join(foregrounds), negative)[:3]


def _counting_unet_calls(model, monkeypatch):
    layered = model.object_patches["apply_model"]
    calls, inner = [], layered.inner

    def counting(x, t, *args, **kwargs):
        calls.append(x.shape[0])
        return inner(x, t, *args, **kwargs)

    monkeypatch.setattr(layered, "inner", counting)
    return calls


@pytest.mark.parametrize("global_words,background_words,batched", [(200, 180, True), (400, 100, False)])
def test_long_prompts_of_different_lengths_per_layer_and_for_positive_and_negative(
        tiny, patched, monkeypatch, global_words, background_words, batched):
    """Global prompts of 200 or 400 tokens, layer prompts of 3 to 200 tokens, a 10-token negative. ComfyUI pads
    token lengths by repetition up to 4x: with 200 tokens (3 chunks of 77) cond and uncond still run in one UNet
    call; with 400 (6 chunks) it cannot batch them together and runs one call each."""
    clip = tiny[1]
    assert len(clip.tokenize(_words(global_words))["l"]) == -(-(global_words + 2) // 77)  # 77-token chunks
    pos, neg, n = _encode(clip, _words(global_words), _words(background_words), [_words(200), "a blue square"],
                          _words(10))
    latent = _latent(n, batch=2)
    calls = _counting_unet_calls(patched, monkeypatch)
    out, _ = sample(patched, pos, neg, latent, steps=2, smg_scale=0.5, smg_start_percent=0.0)
    rows = latent["samples"].shape[0]
    assert torch.isfinite(out).all()
    assert max(calls) == (2 * rows if batched else rows)
    monkeypatch.undo()
    # the words past the first 77 tokens are not dropped: a new ending of the global prompt changes every slot, a
    # new ending of the 200-token first foreground prompt changes that layer (its colour and mask slots) only
    scale = float(out.pow(2).mean().sqrt())
    layer = torch.tensor([row % 5 in (1, 3) for row in range(rows)])  # slots [bg, fg1, fg2, m1, m2]
    for prompts, changed in (((_new_ending(global_words), _words(background_words), [_words(200), "a blue square"]),
                              torch.ones(rows, dtype=torch.bool)),
                             ((_words(global_words), _words(background_words), [_new_ending(200), "a blue square"]),
                              layer)):
        new_pos, new_neg, _ = _encode(clip, *prompts, _words(10))
        new, _ = sample(patched, new_pos, new_neg, latent, steps=2, smg_scale=0.5, smg_start_percent=0.0)
        change = (new - out).flatten(1).pow(2).mean(1).sqrt()  # per row
        assert change[changed].min() > 1e-3 * scale, change  # measured >= 3.6e-3 (global), 4.0e-3 (layer)
        if not changed.all():
            assert change[~changed].max() < 0.05 * change[changed].min(), change  # measured < 0.01 of it


# ------------------------------------------------------------------------------------------ 6. area and mask conds
def _area_and_mask_conditionings(clip, pos):
    """name -> (conditioning, the latent region [h, w] its area or mask covers, whether it adds a second prompt
    there (else it restricts ``pos`` to it)). Images are 64x64, latents 8x8."""
    mask = torch.zeros(1, 64, 64)
    mask[:, :, :32] = 1.0
    left = torch.zeros(8, 8, dtype=torch.bool)
    left[:, :4] = True
    centre = torch.zeros(8, 8, dtype=torch.bool)
    centre[2:6, 2:6] = True
    other, _, _ = encode(clip, ["a green ring"], global_prompt="a ring on the left")
    other_area = core_node("ConditioningSetArea", conditioning=other, width=32, height=64, x=0, y=0, strength=1.0)[0]
    other_mask = core_node("ConditioningSetMask", conditioning=other, mask=mask, strength=1.0,
                           set_cond_area="default")[0]
    return {
        "set_area": (core_node("ConditioningSetArea", conditioning=pos, width=32, height=32, x=16, y=16,
                               strength=1.0)[0], centre, False),
        "set_mask": (core_node("ConditioningSetMask", conditioning=pos, mask=mask, strength=1.0,
                               set_cond_area="default")[0], left, False),
        "combine_full_and_area": (core_node("ConditioningCombine", conditioning_1=pos, conditioning_2=other_area)[0],
                                  left, True),
        "combine_full_and_mask": (core_node("ConditioningCombine", conditioning_1=pos, conditioning_2=other_mask)[0],
                                  left, True),
    }


def _change_inside_and_outside(out, plain, region):
    """RMS change of every slot of every sample, inside and outside ``region`` [h, w]."""
    change = (out - plain).float().pow(2).mean(1)  # [rows, h, w]
    return float(change[:, region].mean().sqrt()), float(change[:, ~region].mean().sqrt())


def test_area_and_mask_conditioning_from_core_nodes_act_in_their_region(tiny, patched):
    """Set Area / Set Mask on the only positive restrict it to the region: inside, the result stays near what the
    prompt gives everywhere; outside (where ComfyUI conditions on nothing) it changes completely. A second prompt
    combined in with an area or a mask changes the result inside its region and hardly outside. All slots of the
    layered sample follow the same region."""
    clip = tiny[1]
    pos, neg, n = encode(clip, ["a red circle"])
    latent = _latent(n, batch=2)
    plain, _ = sample(patched, pos, neg, latent, steps=2, smg_scale=0.5, smg_start_percent=0.0)
    scale = float(plain.pow(2).mean().sqrt())
    for name, (conditioning, region, adds) in _area_and_mask_conditionings(clip, pos).items():
        assert all(adapter().LAYERS_KEY in entry[1] for entry in conditioning), name  # layers survive the node
        out, _ = sample(patched, conditioning, neg, latent, steps=2, smg_scale=0.5, smg_start_percent=0.0)
        assert torch.isfinite(out).all(), name
        inside, outside = _change_inside_and_outside(out, plain, region)
        if adds:  # measured: inside 11-16x (area) and 56x (mask) outside; inside >= 6e-3 of the scale
            assert inside > 5 * outside and inside > 1e-3 * scale, (name, inside, outside)
        else:  # measured: outside ~11x the scale; inside <= 0.1x (area, cropped UNet input), 0.006x (mask) of it
            assert outside > 2 * scale and inside < 0.3 * outside, (name, inside, outside)
