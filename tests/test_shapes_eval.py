"""Tests of the shapes benchmark scoring (layerdiff_toy/shapes_eval.py) and the autoencoder trainer (pure maths)."""
from __future__ import annotations

import math

import pytest
import torch

from comfy_headless.product import product_names
from layerdiff_toy import shapes, shapes_eval
from layerdiff_toy.autoencoder_training import (AutoencoderTrainConfig, evaluate_autoencoder, latent_penalty,
                                                 random_crops, train_autoencoder)

LayeredImages = product_names("layerdiff_model.layers.compose", "LayeredImages")


def _test_samples(count=12):
    return list(shapes.generate_samples(3, count, shapes.config_for_split("test", max_foregrounds=2)))


def test_ground_truth_layers_score_perfectly():
    scores = [shapes_eval.score_sample(*_pair(s)) for s in _test_samples()]
    summary = shapes_eval.summarize(scores)
    for key in ("fg_colour_acc", "fg_shape_acc", "bg_colour_acc", "bg_texture_acc", "composite_acc"):
        assert summary[key] == 1.0, key
    assert summary["mask_iou"] > 0.97


def _pair(sample):
    layers, truth = shapes_eval.truth_layers(sample)
    return layers, 0, truth


def test_wrong_colour_wrong_mask_and_grey_layer_are_caught():
    sample = next(s for s in _test_samples() if len(s.foreground_prompts) == 2)
    layers, _, truth = _pair(sample)
    want = truth.foregrounds[0].colour
    other = next(c for c in shapes.COLOURS if c not in (want, truth.foregrounds[1].colour, truth.background_colour))
    fg = layers.foregrounds.clone()
    fg[0, 0][layers.masks[0, 0] > 0.5] = torch.tensor(shapes.COLOURS[other], dtype=fg.dtype) / 255
    score = shapes_eval.score_sample(LayeredImages(layers.background, fg, layers.masks), 0, truth)
    assert not score.layers[0].colour_ok and score.layers[0].colour == other
    assert not score.composite_ok  # the top layer shows the wrong colour in the composite
    assert score.layers[1].colour_ok
    # a mask that misses the content: low IoU; an empty mask: colour/shape "none", IoU 0
    masks = layers.masks.clone()
    masks[0, 0] = torch.roll(masks[0, 0], shifts=(32, 32), dims=(0, 1))
    masks[0, 1] = 0
    score = shapes_eval.score_sample(LayeredImages(layers.background, layers.foregrounds, masks), 0, truth)
    assert score.layers[0].mask_iou < 0.5
    assert (score.layers[1].colour, score.layers[1].shape, score.layers[1].mask_iou) == ("none", "none", 0.0)
    # a plain grey foreground has no content region
    assert not shapes_eval.content_region(torch.full((64, 64, 3), shapes.FOREGROUND_FILL)).any()


def test_chance_levels_and_table():
    truths = [shapes.shapes_truth(s) for s in _test_samples()]
    chance = shapes_eval.chance_levels(truths)
    assert chance["fg_colour_acc"] == 1 / len(shapes.COLOURS) and chance["fg_shape_acc"] == 0.25
    assert 0.0 <= chance["mask_iou"] < 0.3
    assert chance["composite_acc"] < 0.02
    table = shapes_eval.markdown_table({"chance": chance}, {"chance": "1 s"})
    assert table.splitlines()[2].startswith("| chance | 0.12 | 0.25 |") and table.count("\n") == 2


def test_score_rejects_layer_count_mismatch():
    sample = next(s for s in _test_samples() if len(s.foreground_prompts) == 2)
    layers, _, truth = _pair(sample)
    truth.foregrounds.pop()
    with pytest.raises(ValueError, match="2 generated foregrounds for 1 prompts"):
        shapes_eval.score_sample(layers, 0, truth)


# ------------------------------------------------------------------------------------------ autoencoder trainer
def _tiny_autoencoder():
    torch.manual_seed(0)
    enc = torch.nn.Sequential(torch.nn.Conv2d(3, 16, 3, stride=2, padding=1), torch.nn.ReLU(),
                              torch.nn.Conv2d(16, 4, 3, stride=2, padding=1))
    dec = torch.nn.Sequential(torch.nn.Upsample(scale_factor=4), torch.nn.Conv2d(4, 16, 3, padding=1),
                              torch.nn.ReLU(), torch.nn.Conv2d(16, 3, 3, padding=1))
    return enc, dec


def test_autoencoder_training_reduces_reconstruction_error():
    samples = list(shapes.generate_samples(0, 8, shapes.ShapesConfig(size=32, max_foregrounds=1)))
    images = torch.stack([s.background for s in samples] + [s.foregrounds[0] for s in samples])
    enc, dec = _tiny_autoencoder()
    before = evaluate_autoencoder(enc, dec, images)
    summary = train_autoencoder(enc, dec, (images * 255).round().byte(),
                                AutoencoderTrainConfig(steps=60, batch_size=8, lr=3e-3, crop=16, downscale=4,
                                                       warmup=5, log_every=1000))
    after = evaluate_autoencoder(enc, dec, images)
    assert summary["steps"] == 60 and math.isfinite(summary["reconstruction_loss"])
    assert after["psnr_db"] > before["psnr_db"] + 3
    assert len(after["latent_std"]) == 4


def test_latent_penalty_and_crops():
    z = torch.randn(64, 4, 8, 8)
    assert latent_penalty(z, 1.0) < 0.01 < latent_penalty(3 * z + 1, 1.0)
    crops = random_crops(torch.rand(5, 3, 64, 64), 32, torch.Generator().manual_seed(0))
    assert crops.shape == (5, 3, 32, 32)
    enc, dec = _tiny_autoencoder()
    with pytest.raises(ValueError, match="multiple of the downscale"):
        train_autoencoder(enc, dec, torch.rand(4, 3, 32, 32), AutoencoderTrainConfig(steps=1, crop=12, downscale=8))
