"""LayerDiff Apply ControlNet to Layers: a standard ComfyUI ControlNet (core loader, a tiny one built with ComfyUI's
own ControlNet classes) acts on the chosen layers' slot rows only; positive and negative still batch together;
several chain, each on its own layers."""
from __future__ import annotations

import pytest
import torch

import comfy_host
from layerdiff_host import core_ksampler, core_node, encode, node, package_module, sample, tiny_model, tiny_modules

SIZE = 64


@pytest.fixture(scope="module")
def tiny(comfyui):
    model, clip, vae = tiny_model()
    independent = node("LayerDiffApply").apply(model, tiny_modules(model, random=False))[0]  # slots do not mix
    mixing = node("LayerDiffApply").apply(model, tiny_modules(model, random=True))[0]
    control = core_node("ControlNetLoader", control_net_name=comfy_host.ensure_tiny_controlnet())[0]
    return independent, mixing, clip, control


def hint(seed):
    return torch.rand(1, SIZE, SIZE, 3, generator=torch.Generator().manual_seed(seed))


def on_layers(pos, neg, control, layers, seed=0, strength=1.0):
    return node("LayerDiffLayerControlNet").apply(pos, neg, control, hint(seed), layers, strength, 0.0, 1.0)


def run(model, pos, neg, n, sampler="smg"):
    latent = node("LayerDiffEmptyLatent").generate(SIZE, SIZE, n, 1)[0]
    if sampler == "smg":
        return sample(model, pos, neg, latent, steps=3, seed=4)[0]
    return core_ksampler(model, pos, neg, latent, seed=4)[0]


@pytest.mark.parametrize("sampler", ["smg", "core"])
def test_control_reaches_only_the_chosen_layer(tiny, sampler):
    """With slot-independent modules every slot not chosen is bit-identical to the run without the ControlNet;
    the chosen layer (image and mask slots) follows the control."""
    independent, _, clip, control = tiny
    pos, neg, n = encode(clip, ["a cat", "a ball"])
    plain = run(independent, pos, neg, n, sampler)
    out = run(independent, *on_layers(pos, neg, control, "1"), n, sampler)
    assert torch.equal(out[[0, 2, 4]], plain[[0, 2, 4]])  # background, layer 2, mask 2
    for r in (1, 3):  # layer 1 and its mask
        assert (out[r] - plain[r]).abs().mean() > 1e-3 * plain[r].abs().mean(), r
    core = core_node("ControlNetApplyAdvanced", positive=pos, negative=neg, control_net=control, image=hint(0),
                     strength=1.0, start_percent=0.0, end_percent=1.0)
    everywhere = run(independent, *core[:2], n, sampler)
    torch.testing.assert_close(out[[1, 3]], everywhere[[1, 3]], rtol=1e-5, atol=1e-5)  # same control as the core's


def test_chained_controlnets_each_act_on_their_own_layers(tiny):
    independent, _, clip, control = tiny
    pos, neg, n = encode(clip, ["a cat", "a ball"])
    pose = on_layers(pos, neg, control, "1", seed=0)
    both = node("LayerDiffLayerControlNet").apply(*pose, control, hint(1), "background", 0.8, 0.0, 1.0)
    depth = node("LayerDiffLayerControlNet").apply(pos, neg, control, hint(1), "background", 0.8, 0.0, 1.0)
    plain, chained = run(independent, pos, neg, n), run(independent, *both, n)
    pose_only, depth_only = run(independent, *pose, n), run(independent, *depth, n)
    assert torch.equal(chained[[2, 4]], plain[[2, 4]])
    torch.testing.assert_close(chained[[1, 3]], pose_only[[1, 3]], rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(chained[0], depth_only[0], rtol=1e-5, atol=1e-6)
    assert not torch.allclose(chained[0], plain[0])


def test_positive_and_negative_still_batch_together(tiny, monkeypatch):
    """One ControlNet pass per step with positive and negative rows together, as with the core node."""
    _, mixing, clip, control = tiny
    pos, neg, n = encode(clip, ["a cat"])
    calls = []
    hook = control.control_model.register_forward_pre_hook(lambda m, a, k: calls.append(k["x"].shape[0]),
                                                          with_kwargs=True)
    try:
        run(mixing, *on_layers(pos, neg, control, "1"), n)
    finally:
        hook.remove()
    assert calls == [2 * 3] * 3  # 3 steps, each one batch of cond + uncond rows (3 slots each)


def test_a_kept_layer_stays_bit_identical_when_a_controlled_layer_is_regenerated(tiny):
    """With real (slot-mixing) modules the other layers read the controlled one; regenerating only it keeps them
    exactly, so the control changes nothing else."""
    _, mixing, clip, control = tiny
    pos, neg, n = encode(clip, ["a cat", "a ball"])
    first = sample(mixing, pos, neg, node("LayerDiffEmptyLatent").generate(SIZE, SIZE, n, 1)[0], steps=2)[1]
    edit = node("LayerDiffRegenerateLayers").regenerate(first, "2", False)[0]
    out = sample(mixing, *on_layers(pos, neg, control, "2"), edit, steps=2, seed=9)[0]
    assert torch.equal(out[[0, 1, 3]], first["samples"][[0, 1, 3]])


def test_wrong_layers_and_another_model_family_are_refused(tiny):
    _, _, clip, control = tiny
    pos, neg, _ = encode(clip, ["a cat"])
    with pytest.raises(Exception, match="asks for layer 2 but the conditioning has 1 foreground"):
        on_layers(pos, neg, control, "2")
    import comfy.cldm.cldm
    import comfy.controlnet

    config = dict(comfy_host.build_tiny_sd15_model().model_config.unet_config)  # as the tiny ControlNet's, but
    config.pop("out_channels", None)
    config.update(hint_channels=3, context_dim=2048)  # SDXL-width text features
    sdxl_like = comfy.controlnet.ControlNet(comfy.cldm.cldm.ControlNet(**config))
    with pytest.raises(Exception, match="width 2048 but the conditioning has") as info:
        on_layers(pos, neg, sdxl_like, "1")
    assert type(info.value).__name__ == "ModelFamilyError" and "LayerDiff Apply ControlNet to Layers" in str(info.value)
    assert "control" not in pos[0][1]  # the input conditioning is untouched
    assert package_module("nodes.host.layer_control").SlotMaskedControl
