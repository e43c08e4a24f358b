"""Bring your own layers in: LayerDiff Encode Layers turns a background and RGBA (or image + mask) foreground layers
into a layered latent, each slot encoded by the VAE exactly as VAE Encode would, masks as grey images."""
from __future__ import annotations

import pytest
import torch

from layerdiff_host import core_node, encode, node, package_module, sample, tiny_model, tiny_modules

H, W = 64, 48


@pytest.fixture(scope="module")
def tiny(comfyui):
    return tiny_model()


def layer_images(b=1, n=2, seed=0):
    g = torch.Generator().manual_seed(seed)
    background = torch.rand(b, H, W, 3, generator=g)
    rgb = torch.rand(b * n, H, W, 3, generator=g)
    masks = (torch.rand(b * n, H, W, generator=g) > 0.5).float()
    return background, rgb, masks


def test_each_slot_is_the_vae_encoding_of_its_layer_and_masks_are_grey_images(tiny):
    vae = tiny[2]
    background, rgb, masks = layer_images()
    latent, layers = node("LayerDiffEncodeLayers").encode(vae, background, rgb, masks, "a wall\na cat\na ball")
    samples = latent["samples"]
    assert samples.shape == (5, 4, H // 8, W // 8)
    info = latent["layerdiff"]
    assert (info["num_foregrounds"], info["layer_names"]) == (2, ["a wall", "a cat", "a ball"])
    assert torch.equal(info["source"]["latent"], samples)  # the source pixels ride along (layer editing)
    grey = [m[..., None].expand(H, W, 3) for m in masks]
    slot_images = [background[0], rgb[0], rgb[1], *grey]
    for s, image in enumerate(slot_images):  # slot order: background, fg 1, fg 2, mask 1, mask 2
        alone = core_node("VAEEncode", vae=vae, pixels=image[None].contiguous())[0]["samples"]
        torch.testing.assert_close(samples[s:s + 1], alone, rtol=1e-4, atol=1e-5)
    assert torch.equal(layers.foregrounds[0], rgb) and torch.equal(layers.masks[0], masks)  # original pixels kept


def test_rgba_layers_equal_image_plus_mask(tiny):
    background, rgb, masks = layer_images(b=2, n=1, seed=1)
    rgba = torch.cat([rgb, masks[..., None]], dim=-1)
    a, _ = node("LayerDiffEncodeLayers").encode(tiny[2], background, rgba)
    b, _ = node("LayerDiffEncodeLayers").encode(tiny[2], background, rgb, masks)
    assert torch.equal(a["samples"], b["samples"]) and a["samples"].shape[0] == 2 * 3
    assert a["layerdiff"]["layer_names"] == ["background", "layer 1"]


def test_the_encoded_layers_sample_and_decode_back_into_layers(tiny):
    model, clip, vae = tiny
    patched = node("LayerDiffApply").apply(model, tiny_modules(model))[0]
    background, rgb, masks = layer_images(n=2, seed=2)
    latent, _ = node("LayerDiffEncodeLayers").encode(vae, background, rgb, masks)
    pos, neg, n = encode(clip, ["a cat", "a ball"])
    samples, out = sample(patched, pos, neg, latent, steps=2, denoise=0.5)
    assert samples.shape == latent["samples"].shape and torch.isfinite(samples).all()
    images = core_node("VAEDecode", vae=vae, samples=out)[0]
    layers = node("LayerDiffSplitLayers").split(images, out)[0]
    assert layers.foregrounds.shape == (1, 2, H, W, 3) and layers.masks.shape == (1, 2, H, W)


@pytest.mark.parametrize("case, match", [
    ("size", "multiples of 8"),
    ("count", "3 foreground images for 2 backgrounds"),
    ("rgb", "without alpha; connect 'masks'"),
    ("mask_shape", "'masks' must be 2 masks of 48x64"),
    ("names", "2 layer names for a background and 2 foreground layers"),
    ("fg_size", "'foregrounds' are 40x64 but the background is 48x64"),
])
def test_bad_layers_are_refused_with_the_fix(tiny, case, match):
    background, rgb, masks = layer_images()
    kwargs = dict(foregrounds=rgb, masks=masks, layer_names="")
    if case == "size":
        background, kwargs["foregrounds"], kwargs["masks"] = background[:, :60], rgb[:, :60], masks[:, :60]
    elif case == "count":
        background, kwargs["masks"] = background.repeat(2, 1, 1, 1), None
        kwargs["foregrounds"] = torch.cat([rgb[:1].repeat(3, 1, 1, 1), torch.ones(3, H, W, 1)], dim=-1)
    elif case == "rgb":
        kwargs["masks"] = None
    elif case == "mask_shape":
        kwargs["masks"] = masks[:1]
    elif case == "names":
        kwargs["layer_names"] = "a wall\na cat"
    elif case == "fg_size":
        kwargs["foregrounds"] = rgb[:, :, :40]
    errors = package_module("layerdiff_model.errors")
    with pytest.raises(errors.LayoutError, match=rf"LayerDiff Encode Layers: .*{match}"):
        node("LayerDiffEncodeLayers").encode(tiny[2], background, **kwargs)


# ------------------------------------------------------------------------------------------ layered files in
def _write_layered_file(kind: str, name: str, seed: int = 3):
    """A PSD or ORA in ComfyUI's input folder, written by LayerDiff's own writer; returns (name, bg, rgba list)."""
    import numpy as np

    files = package_module("layerdiff_model.layers.layered_files")
    import comfy_host

    rng = np.random.default_rng(seed)
    bg = rng.integers(0, 256, (H, W, 3), dtype=np.uint8)
    rgba = [rng.integers(0, 256, (H, W, 4), dtype=np.uint8) for _ in range(2)]
    for layer in rgba:
        layer[..., 3] = np.where(rng.random((H, W)) > 0.5, 255, 0)
    writer = files.write_psd if kind == "psd" else files.write_ora
    writer(comfy_host.host().input_dir / name, [("a cat", rgba[0]), ("a ball", rgba[1])], ("a wall", bg), bg)
    return name, bg, rgba


@pytest.mark.parametrize("kind", ["psd", "ora"])
def test_a_layered_file_loads_as_layers_and_prompts(comfyui, kind):
    name, bg, rgba = _write_layered_file(kind, f"layers_in.{kind}")
    assert name in node("LayerDiffLoadLayeredFile").INPUT_TYPES()["required"]["file"][0]  # the upload combo lists it
    background, foregrounds, masks, bg_prompt, fg_prompts = node("LayerDiffLoadLayeredFile").load(name)
    assert torch.equal(background[0], torch.from_numpy(bg).float() / 255)
    for i, layer in enumerate(rgba):  # top first
        assert torch.equal(foregrounds[i], torch.from_numpy(layer[..., :3]).float() / 255)
        assert torch.equal(masks[i], torch.from_numpy(layer[..., 3]).float() / 255)
    assert bg_prompt == "a wall" and fg_prompts == "a cat\na ball"
    cls = type(node("LayerDiffLoadLayeredFile"))
    first = cls.IS_CHANGED(name)
    _write_layered_file(kind, name, seed=9)  # the file is edited: ComfyUI must run the node again
    assert cls.IS_CHANGED(name) != first and cls.IS_CHANGED("gone.psd").startswith("unreadable")


def test_a_loaded_file_runs_through_comfyui_into_a_layered_latent(tiny):
    import comfy_host

    name, _, _ = _write_layered_file("psd", "layers_run.psd", seed=4)
    prompt = {
        "1": {"class_type": "CheckpointLoaderSimple",
              "inputs": {"ckpt_name": comfy_host.ensure_tiny_sd15_checkpoint()}},
        "2": {"class_type": "LayerDiffLoadLayeredFile", "inputs": {"file": name}},
        "3": {"class_type": "LayerDiffEncodeLayers", "inputs": {"vae": ["1", 2], "background": ["2", 0],
                                                                 "foregrounds": ["2", 1], "masks": ["2", 2]}},
        "4": {"class_type": "VAEDecode", "inputs": {"samples": ["3", 0], "vae": ["1", 2]}},
        "5": {"class_type": "PreviewImage", "inputs": {"images": ["4", 0]}},
    }
    run = comfy_host.run_prompt(prompt)
    assert len([p for p in run.files() if p.suffix == ".png"]) == 5  # background, 2 layers, 2 masks
    bad = dict(prompt, **{"2": {"class_type": "LayerDiffLoadLayeredFile", "inputs": {"file": "missing.psd"}}})
    with pytest.raises(comfy_host.PromptValidationError, match="file"):
        comfy_host.validate(bad)  # not one of the listed files


def test_unreadable_or_foreign_files_are_refused(comfyui):
    import numpy as np

    import comfy_host

    errors = package_module("layerdiff_model.errors")
    files = package_module("layerdiff_model.layers.layered_files")
    loader = node("LayerDiffLoadLayeredFile")
    (comfy_host.host().input_dir / "broken.psd").write_bytes(b"8BPS not really")
    with pytest.raises(errors.LayerDiffError, match="LayerDiff Load Layered File: broken.psd"):
        loader.load("broken.psd")
    bg = np.zeros((H, W, 3), dtype=np.uint8)
    files.write_ora(comfy_host.host().input_dir / "flat.ora", [], ("only", bg), bg)
    with pytest.raises(errors.LayerDiffError, match="flat.ora: .*at least one layer above"):
        loader.load("flat.ora")
    with pytest.raises(errors.LayerDiffError, match="inside ComfyUI's input folder"):
        loader.load("../../etc/passwd.psd")
    with pytest.raises(errors.LayerDiffError, match="must be a .psd or .ora file"):
        loader.load("picture.png")


def test_psd_files_from_other_editors_layers_outside_the_canvas_16_bit_and_cmyk(comfyui):
    """Written with psd-tools (what Photoshop-compatible editors write): a layer hanging over the canvas edge is
    clipped to the canvas; 16-bit and CMYK documents are refused with the fix; a PSD with only a background too."""
    psd_tools = pytest.importorskip("psd_tools")
    from PIL import Image
    from psd_tools.api.layers import PixelLayer

    import comfy_host

    errors = package_module("layerdiff_model.errors")
    loader, folder = node("LayerDiffLoadLayeredFile"), comfy_host.host().input_dir
    psd = psd_tools.PSDImage.new("RGB", (W, H))
    psd.append(PixelLayer.frompil(Image.new("RGB", (W, H), (10, 20, 30)), psd, "a wall", 0, 0))
    psd.append(PixelLayer.frompil(Image.new("RGBA", (30, 30), (200, 0, 0, 255)), psd, "a red ball", H - 10, W - 12))
    psd.save(folder / "overhang.psd")
    bg, fgs, masks, bg_name, fg_names = loader.load("overhang.psd")
    assert (bg_name, fg_names) == ("a wall", "a red ball") and fgs.shape == (1, H, W, 3)
    expected = torch.zeros(H, W)
    expected[H - 10:, W - 12:] = 1.0  # the part inside the canvas
    assert torch.equal(masks[0], expected)
    assert torch.allclose(fgs[0][H - 10:, W - 12:], torch.tensor([200 / 255, 0.0, 0.0]))
    assert torch.allclose(bg[0], torch.tensor([10, 20, 30]) / 255)
    for name, mode, depth in (("deep.psd", "RGB", 16), ("print.psd", "CMYK", 8)):
        psd_tools.PSDImage.new(mode, (W, H), depth=depth).save(folder / name)
        with pytest.raises(errors.LayerDiffError, match=f"{name}: .*only 8-bit RGB PSD .* convert it to 8-bit RGB"):
            loader.load(name)
    only = psd_tools.PSDImage.new("RGB", (W, H))
    only.append(PixelLayer.frompil(Image.new("RGB", (W, H)), only, "a wall", 0, 0))
    only.save(folder / "one_layer.psd")
    with pytest.raises(errors.LayerDiffError, match="one_layer.psd: .*at least one layer above"):
        loader.load("one_layer.psd")
