"""Background completion for dataset construction (nodes/host/dataset_inpainting.py): the user's SD1.5 inpainting
checkpoint, through ComfyUI's real loader, VAEEncodeForInpaint and common_ksampler, on tiny random-weight models.
A user notices: pixels outside the mask are exactly the input's, pixels inside are generated, any size works, a
seed reproduces, an empty mask costs nothing, a plain checkpoint works with a warning, a bad path says what to do."""
from __future__ import annotations

import logging

import numpy as np
import pytest
import torch

import comfy_host
from comfy_headless.product import product_module
from layerdiff_toy import toy_model

STEPS = 2


def make_tiny_sd15_inpainting_checkpoint(path, seed: int = comfy_host.DEFAULT_SEED):
    """The toy SD1.5 checkpoint with an inpainting UNet (9 input channels: latent + mask + masked-picture latent)."""
    from safetensors.torch import save_file

    comfy_host.register_test_model_configs()
    config_class = toy_model.register_toy_sd15(32)
    unet_config = comfy_host.tiny_unet_config({**toy_model.TOY_UNET_YAML, "in_channels": 9})
    with torch.no_grad():
        model = toy_model.cpu_model_config(config_class, unet_config).get_model({})
    comfy_host.init_weights_(model.diffusion_model, seed)
    clip_sd = toy_model.build_toy_clip(model.model_config, seed).state_dict()
    vae_sd = toy_model.build_vae_module("taesd", seed).state_dict()
    save_file(toy_model.toy_checkpoint_state_dict(model, clip_sd, vae_sd), str(path), metadata={"format": "pt"})
    return path


@pytest.fixture(scope="module")
def inp(comfyui):
    return product_module("nodes.host.dataset_inpainting")


@pytest.fixture(scope="module")
def inpainting_ckpt(comfyui, tmp_path_factory):
    return make_tiny_sd15_inpainting_checkpoint(tmp_path_factory.mktemp("inpaint") / "tiny_sd15_inpainting.safetensors")


@pytest.fixture(scope="module")
def inpainter(inp, inpainting_ckpt):
    return inp.ComfyInpainter(inpainting_ckpt, steps=STEPS, seed=7, prompt="a wall", batch_size=4)


def picture(h, w, seed=0):
    """A smooth colour picture with some texture, uint8 [h, w, 3]."""
    rng = np.random.default_rng(seed)
    y, x = np.mgrid[0:h, 0:w]
    base = np.stack([x * 255 // max(w - 1, 1), y * 255 // max(h - 1, 1), (x + y) * 127 // max(h + w - 2, 1)], -1)
    return np.clip(base + rng.integers(-20, 21, (h, w, 3)), 0, 255).astype(np.uint8)


def box_mask(h, w, y0, y1, x0, x1):
    mask = np.zeros((h, w), dtype=bool)
    mask[y0:y1, x0:x1] = True
    return mask


class SamplingSteps:
    """Counts sampler steps through ComfyUI's progress-bar hook (what the UI's progress bar shows)."""

    def __enter__(self):
        import comfy.utils

        self.steps, self._previous = 0, comfy.utils.PROGRESS_BAR_HOOK
        comfy.utils.set_progress_bar_global_hook(self._hook)
        return self

    def _hook(self, *args, **kwargs):
        self.steps += 1

    def __exit__(self, *exc):
        import comfy.utils

        comfy.utils.set_progress_bar_global_hook(self._previous)


def assert_filled(out, image, mask):
    assert out.dtype == np.uint8 and out.shape == image.shape
    np.testing.assert_array_equal(out[~mask], image[~mask])  # exactly the input outside the mask
    changed = np.any(out[mask] != image[mask], axis=-1)
    assert changed.mean() > 0.5, f"only {changed.mean():.0%} of the masked pixels were generated"


def test_tiny_inpainting_checkpoint_loads_as_an_inpainting_model(inpainter):
    model = inpainter.model.model
    assert inpainter.is_inpainting_model and model.model_config.inpaint_model()
    assert model.diffusion_model.input_blocks[0][0].in_channels == 9
    # ComfyUI feeds the noise mask and the masked picture's latent as the 5 extra input channels
    conds = model.extra_conds(noise=torch.zeros(1, 4, 8, 8), device=torch.device("cpu"),
                              denoise_mask=torch.ones(1, 1, 8, 8), latent_image=torch.zeros(1, 4, 8, 8))
    assert conds["c_concat"].cond.shape == (1, 5, 8, 8)


def test_fills_inside_the_mask_and_keeps_every_pixel_outside(inpainter):
    images = [picture(64, 48, 1), picture(37, 45, 2)]  # different sizes in one call; 37x45 is not a multiple of 8
    masks = [box_mask(64, 48, 16, 48, 8, 32), box_mask(37, 45, 5, 30, 20, 44)]
    with SamplingSteps() as counted:
        out = inpainter.inpaint(images, masks)
    assert len(out) == 2 and counted.steps == 2 * STEPS  # one sampling run per size
    for o, image, mask in zip(out, images, masks):
        assert_filled(o, image, mask)


def test_same_seed_reproduces_and_each_picture_has_its_own_noise(inpainter):
    image, mask = picture(32, 40, 3), box_mask(32, 40, 4, 28, 4, 36)
    first = inpainter.inpaint([image, image, image], [mask, mask, mask])
    again = inpainter.inpaint([image, image, image], [mask, mask, mask])
    for a, b in zip(first, again):
        np.testing.assert_array_equal(a, b)
    assert np.any(first[0] != first[1]) and np.any(first[1] != first[2])  # seed + per-picture offset
    try:  # batching does not change a picture's noise (batched convolutions may round differently by 1/255)
        inpainter.batch_size = 1
        one_by_one = inpainter.inpaint([image, image, image], [mask, mask, mask])
        inpainter.seed = 8
        other_seed = inpainter.inpaint([image], [mask])[0]
    finally:
        inpainter.batch_size, inpainter.seed = 4, 7
    for a, b in zip(first, one_by_one):
        assert np.abs(a.astype(int) - b).max() <= 2
    assert np.abs(other_seed.astype(int) - first[0]).mean() > 5  # another seed: another fill


def test_empty_mask_returns_the_picture_unchanged_without_sampling(inpainter):
    image, other = picture(40, 40, 4), picture(40, 40, 5)
    with SamplingSteps() as counted:
        (out,) = inpainter.inpaint([image], [np.zeros((40, 40), dtype=bool)])
    assert counted.steps == 0
    np.testing.assert_array_equal(out, image)
    mask = box_mask(40, 40, 8, 32, 8, 32)
    kept, filled = inpainter.inpaint([image, other], [np.zeros((40, 40), dtype=bool), mask])
    np.testing.assert_array_equal(kept, image)
    assert_filled(filled, other, mask)


def test_plain_sd15_checkpoint_works_and_warns(inp, tiny_sd15, caplog):
    path = comfy_host.host().model_path("checkpoints", tiny_sd15)
    with caplog.at_level(logging.WARNING):
        plain = inp.ComfyInpainter(path, steps=STEPS, seed=1)
    warnings = [r for r in caplog.records if r.levelno == logging.WARNING and "inpainting checkpoint" in r.getMessage()]
    assert len(warnings) == 1 and str(path) in warnings[0].getMessage()
    assert not plain.is_inpainting_model
    image, mask = picture(37, 45, 6), box_mask(37, 45, 0, 20, 0, 20)
    (out,) = plain.inpaint([image], [mask])
    assert_filled(out, image, mask)


def test_missing_or_unreadable_checkpoint_says_what_to_do(inp, tmp_path):
    missing = tmp_path / "nowhere" / "sd-inpainting.safetensors"
    with pytest.raises(inp.DatasetError) as err:
        inp.ComfyInpainter(missing)
    message = str(err.value)
    assert "--inpaint-checkpoint" in message and str(missing) in message and "does not exist" in message
    assert "inpainting checkpoint" in message
    broken = tmp_path / "broken.safetensors"
    broken.write_bytes(b"not a model at all" * 10)
    with pytest.raises(inp.DatasetError, match="--inpaint-checkpoint: cannot read .*broken.safetensors"):
        inp.ComfyInpainter(broken)


def test_malformed_inputs_are_clear_errors(inpainter, inp):
    image = picture(16, 16)
    with pytest.raises(inp.DatasetError, match="mask 0 is \\(8, 8\\) but its picture is 16x16"):
        inpainter.inpaint([image], [np.ones((8, 8), dtype=bool)])
    with pytest.raises(inp.DatasetError, match="1 pictures but 2 masks"):
        inpainter.inpaint([image], [np.ones((16, 16), dtype=bool)] * 2)
    with pytest.raises(inp.DatasetError, match="picture 0 must be uint8"):
        inpainter.inpaint([image.astype(np.float32)], [np.ones((16, 16), dtype=bool)])
